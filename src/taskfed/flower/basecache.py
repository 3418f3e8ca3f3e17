"""The base model for a ClientApp, fast: a SuperNode starts a fresh ClientApp process for every message, so
a round on a node would otherwise pay `from_pretrained` each time (2-3 s for SmolLM2-135M on a CPU, most
of it casting and copying). Instead the node keeps, once, a safetensors file of the model exactly as
`load_base` returns it (dtype applied) plus its config and tokenizer; later loads build the module without
initialising weights and assign the memory-mapped tensors (about 0.3 s for SmolLM2).

The tiny test model is built from its seed in milliseconds and is not cached.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from taskfed.config import RunConfig
from taskfed.model.loading import cache_dir, load_base
from taskfed.runtime import DTYPES
from taskfed.state import save_safetensors


def _folder(cfg: RunConfig) -> Path:
    key = f"{cfg.model.name}|{cfg.model.dtype}|{cfg.seed}"
    slug = "".join(c if c.isalnum() else "-" for c in cfg.model.name)[-40:]
    return cache_dir() / "flower" / "base" / f"{slug}-{cfg.model.dtype}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _write(model, tokenizer, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".base-"))
    try:
        seen, state = set(), {}
        for k, v in model.state_dict().items():  # tied tensors (lm_head = embeddings) once
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                state[k] = v.detach().cpu().contiguous()
        save_safetensors(state, tmp / "model.safetensors")
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process on this node won the race: theirs is the same file
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read(folder: Path, cfg: RunConfig):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    dtype = DTYPES[cfg.model.dtype]
    with no_init_weights():  # every weight is assigned below: skip the random init
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False, assign=True)
    model.tie_weights()
    state = model.state_dict()
    loaded = {v.data_ptr() for k, v in state.items() if k not in missing}
    if unexpected or any(state[k].data_ptr() not in loaded for k in missing):  # missing = tied copies only
        return None  # a stale or foreign cache: rebuild it
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # The same finishing touches as load_base (padding and truncation on the left, frozen, eval mode).
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device=cfg.model.device, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def cached_base(cfg: RunConfig):
    """(model, tokenizer) as `load_base` gives them for this config, from the node's cache when it has one."""
    if cfg.model.name == "tiny":
        return load_base("tiny", dtype=DTYPES[cfg.model.dtype], device=cfg.model.device, seed=cfg.seed)
    folder = _folder(cfg)
    if (folder / "model.safetensors").exists():
        loaded = _read(folder, cfg)
        if loaded is not None:
            return loaded
        shutil.rmtree(folder, ignore_errors=True)
    model, tokenizer = load_base(cfg.model.name, dtype=DTYPES[cfg.model.dtype], device=cfg.model.device, seed=cfg.seed)
    _write(model, tokenizer, folder)
    return model, tokenizer
