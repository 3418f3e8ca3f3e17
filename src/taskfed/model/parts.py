"""The two factors of a LoRA adapter, by the suffix of their keys ("...lora_A", "...lora_B"): what a job may
train and what travels (FedSA-LoRA uploads only A, FFA-LoRA trains and uploads only B). A *partial* adapter
holds the keys of some factors only; its bytes are what it holds. The helpers take any dict keyed like an
adapter (weights, or the bank's shapes)."""

from __future__ import annotations

from typing import TypeVar

V = TypeVar("V")

PARTS: tuple[str, ...] = ("A", "B")


def part_of(key: str) -> str:
    """The factor a key belongs to ("...lora_A" -> "A")."""
    return key.rsplit("_", 1)[-1]


def only(weights: dict[str, V], parts: tuple[str, ...]) -> dict[str, V]:
    """The keys of `weights` that belong to `parts` (the same values, not copies)."""
    return {k: v for k, v in weights.items() if part_of(k) in parts}


def merged(base: dict[str, V], over: dict[str, V]) -> dict[str, V]:
    """`base` with the keys `over` holds replaced by `over`'s (a partial adapter completed)."""
    return {**base, **over}
