"""Adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, loadable by peft."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from taskfed.errors import TaskfedError
from taskfed.model.bank import AdapterWeights
from taskfed.model.parts import GATE, only, part_of
from taskfed.state import save_safetensors

PREFIX = "base_model.model."


def to_peft_state(weights: AdapterWeights) -> dict[str, torch.Tensor]:
    """`model.layers.0.self_attn.q_proj.lora_A` -> `base_model.model.model.layers.0...lora_A.weight`."""
    return {f"{PREFIX}{k}.weight": v.contiguous() for k, v in sorted(weights.items())}


def from_peft_state(state: dict[str, torch.Tensor], where: str) -> AdapterWeights:
    out: AdapterWeights = {}
    for key, value in state.items():
        if not (key.startswith(PREFIX) and key.endswith(".weight") and (".lora_A." in key or ".lora_B." in key)):
            raise TaskfedError(f"{where}: unexpected tensor '{key}' in a LoRA adapter file.")
        if not value.is_floating_point():  # checked before the cast below would hide it
            raise TaskfedError(f"{where}: tensor '{key}' has dtype {value.dtype}, expected floating point.")
        out[key[len(PREFIX):-len(".weight")]] = value.to(torch.float32)
    return out


def save_adapter(weights: AdapterWeights, directory: str | Path, *, base_model: str, r: int, alpha: float,
                 target_modules: list[str]) -> None:
    """Writes atomically: a temporary folder renamed into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        save_safetensors(to_peft_state(weights), tmp / "adapter_model.safetensors")
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
                  "target_modules": sorted(target_modules), "lora_dropout": 0.0, "bias": "none",
                  "base_model_name_or_path": base_model, "fan_in_fan_out": False, "inference_mode": True}
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_adapter(directory: str | Path, expected_shapes: dict[str, tuple[int, ...]] | None = None) -> AdapterWeights:
    """Reads a PEFT adapter folder; a corrupt or mismatched file gives one sentence naming it."""
    path = Path(directory) / "adapter_model.safetensors"
    if not path.exists():
        raise TaskfedError(f"{path}: adapter file does not exist.")
    try:
        weights = from_peft_state(load_file(str(path)), str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TaskfedError(f"{path}: corrupt adapter file ({str(exc).splitlines()[0]}).") from None
    # Without expected shapes, still only finite floating-point tensors: an integer or NaN "adapter" is not one.
    check_weights(weights, expected_shapes if expected_shapes is not None else
                  {k: tuple(v.shape) for k, v in weights.items()}, str(path))
    return weights


NON_FINITE = "holds NaN or infinite values"  # the reason an upload of a diverged training is refused


def check_weights(weights: AdapterWeights, expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Keys, shapes and finite values of an adapter: what every receiver checks before using one."""
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        name = (missing or extra)[0]
        raise TaskfedError(f"{where}: adapter {'lacks' if missing else 'has unexpected'} tensor '{name}'.")
    for key, shape in expected.items():
        t = weights[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TaskfedError(f"{where}: tensor '{key}' has dtype {kind}, expected floating point.")
        if tuple(t.shape) != tuple(shape):
            raise TaskfedError(f"{where}: tensor '{key}' has shape {tuple(t.shape)}, expected {tuple(shape)}.")
        if not torch.isfinite(t).all():
            raise TaskfedError(f"{where}: tensor '{key}' {NON_FINITE}.")


def check_upload(weights: AdapterWeights, extra: dict[str, AdapterWeights], shapes: dict[str, tuple[int, ...]],
                 job, where: str) -> None:
    """An upload as the server expects it: the factors the job sends, and each extra array adapter-shaped or,
    a gate, shaped as the job sent it (`extra_shapes`)."""
    check_weights(weights, only(shapes, job.sends), where)
    for name, value in sorted(extra.items()):
        check_weights(value, extra_shapes(shapes, shapes_of(value), job.extra.get(name)), f"{where} ('{name}')")


def shapes_of(weights: AdapterWeights) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in weights.items()}


def gate_shapes(shapes: dict[str, tuple[int, ...]], width: int) -> dict[str, tuple[int, ...]]:
    """A gate of `width` logits over an adapter of `shapes`: "<module>.gate", width x d_in per target module."""
    return {k.removesuffix(".lora_A") + f".{GATE}": (width, s[1]) for k, s in shapes.items() if k.endswith(".lora_A")}


def extra_shapes(shapes: dict[str, tuple[int, ...]], held: dict[str, tuple[int, ...]],
                 like: AdapterWeights | None = None) -> dict[str, tuple[int, ...]]:
    """The shapes an extra array (Job.extra, Result.extra) holding `held` (key -> shape) must have: the
    adapter's, or where it holds gate keys (FedLEASE's router) every module's gate, of the width of `like` (the
    gate the job sent under the same name: it comes back as it went) or, sent none, of its own first key."""
    if not any(part_of(k) == GATE for k in held):
        return shapes
    ref = shapes_of(like) if like and any(part_of(k) == GATE for k in like) else held
    first = ref[min(ref)]
    return gate_shapes(shapes, first[0] if first else 0)


def n_bytes(weights: AdapterWeights, bytes_per_value: int = 4) -> int:
    return sum(math.prod(t.shape) for t in weights.values()) * bytes_per_value
