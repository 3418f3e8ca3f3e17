"""The two factors of a LoRA adapter, by the suffix of their keys ("...lora_A", "...lora_B"): what a job may
train and what travels (FedSA-LoRA uploads only A, FFA-LoRA trains and uploads only B). A *partial* adapter
holds the keys of some factors only; its bytes are what it holds. The helpers take any dict keyed like an
adapter (weights, or the bank's shapes)."""

from __future__ import annotations

from typing import TypeVar

V = TypeVar("V")

PARTS: tuple[str, ...] = ("A", "B")


GATE = "gate"  # a gate's keys ("<module path>.gate", the bank's GateMix): never one of PARTS, so they never travel as one


def part_of(key: str) -> str:
    """The factor a key belongs to ("...lora_A" -> "A"; a gate's "...q_proj.gate" -> "gate")."""
    tail = key.rsplit(".", 1)[-1]
    return GATE if tail == GATE else key.rsplit("_", 1)[-1]


def split_gate(weights: dict[str, V]) -> tuple[dict[str, V], dict[str, V]]:
    """An adapter that carries its gate's keys (a gated job's result) as (the adapter, the gate)."""
    gate = {k: v for k, v in weights.items() if part_of(k) == GATE}
    return {k: v for k, v in weights.items() if k not in gate}, gate


def only(weights: dict[str, V], parts: tuple[str, ...]) -> dict[str, V]:
    """The keys of `weights` that belong to `parts` (the same values, not copies)."""
    return {k: v for k, v in weights.items() if part_of(k) in parts}


def merged(base: dict[str, V], over: dict[str, V]) -> dict[str, V]:
    """`base` with the keys `over` holds replaced by `over`'s (a partial adapter completed)."""
    return {**base, **over}
