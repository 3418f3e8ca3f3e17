"""The adapter bank: many LoRA adapters on ONE frozen base model, mixed per row.

Every LoRA target layer (q_proj, v_proj, ...) is wrapped by a `BankLinear` holding N adapters as stacked
tensors (A: N x r x d_in, B: N x d_out x r) and computing, for a batch with per-row mixing weights,

    y = W0 x + sum_k w[row, k] * scale * B_{idx[row, k]} A_{idx[row, k]} x

The mix is stored sparsely (idx, w: batch x K) because rows use one adapter (routing, several clients in
one batch) or two (FedDPA), never all N: each row's cost is K small matmuls, whatever N is. Gathering
A[idx] keeps autograd exact: a row's gradient reaches only the adapters it uses, so one optimizer over
the stacked tensors equals one optimizer per adapter (AdamW is elementwise). A term can be marked
`detached` (FedDPA-T's stop-gradient on the global adapter).

An adapter outside the bank is a plain dict `{"<module path>.lora_A": r x d_in, ".lora_B": d_out x r}`
(`AdapterWeights`), on the CPU in float32: that is what methods average and what travels.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

AdapterWeights = dict[str, torch.Tensor]


@dataclass
class RowMix:
    """Per-row mixing over bank slots: idx (batch x K, long), w (batch x K, float), detached (batch x K, bool)."""

    idx: torch.Tensor
    w: torch.Tensor
    detached: torch.Tensor | None = None

    @staticmethod
    def one_hot(slots: list[int] | torch.Tensor) -> "RowMix":
        idx = torch.as_tensor(slots, dtype=torch.long).view(-1, 1)
        return RowMix(idx, torch.ones(idx.shape, dtype=torch.float32))

    @staticmethod
    def from_dense(weights: torch.Tensor) -> "RowMix":
        """From a batch x N weight matrix: keeps the non-zero entries, K = most non-zeros in a row."""
        weights = torch.as_tensor(weights, dtype=torch.float32)
        k = max(1, int((weights != 0).sum(dim=1).max()))
        w, idx = torch.topk(weights.abs(), k, dim=1)
        w = torch.gather(weights, 1, idx)
        return RowMix(idx, w)

    def select(self, rows: torch.Tensor) -> "RowMix":
        det = None if self.detached is None else self.detached[rows]
        return RowMix(self.idx[rows], self.w[rows], det)


class BankLinear(nn.Module):
    """A frozen nn.Linear plus N LoRA adapters, mixed per row by the bank's current RowMix."""

    def __init__(self, base: nn.Linear, bank: "AdapterBank"):
        super().__init__()
        self.base = base
        self._bank = [bank]  # a list so the bank is not registered as a submodule (no cycle)
        d_out, d_in = base.weight.shape
        n, r = bank.n_slots, bank.r
        self.lora_A = nn.Parameter(torch.zeros(n, r, d_in, dtype=bank.dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(n, d_out, r, dtype=bank.dtype, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        mix = self._bank[0].mix
        if mix is None:
            return y
        if mix.idx.shape[0] != x.shape[0]:
            raise RuntimeError(f"the bank's row mix has {mix.idx.shape[0]} rows but the batch has {x.shape[0]}")
        scale = self._bank[0].scale
        xa = x.to(self.lora_A.dtype)
        delta = None
        for k in range(mix.idx.shape[1]):
            A = self.lora_A[mix.idx[:, k]]  # batch x r x d_in
            B = self.lora_B[mix.idx[:, k]]  # batch x d_out x r
            if self._bank[0].detached_terms[k]:  # flags read on the host once per mix: no device sync here
                keep = mix.detached[:, k].view(-1, 1, 1)
                A = torch.where(keep, A.detach(), A)
                B = torch.where(keep, B.detach(), B)
            h = torch.matmul(torch.matmul(xa, A.transpose(1, 2)), B.transpose(1, 2))  # batch x T x d_out
            term = h * (mix.w[:, k].to(h.dtype) * scale).view(-1, *([1] * (h.dim() - 1)))
            delta = term if delta is None else delta + term
        return y + delta.to(y.dtype)


class AdapterBank:
    """Owns the BankLinear layers injected into one base model; loads, reads and mixes adapters by slot."""

    def __init__(self, model: nn.Module, n_slots: int, r: int, alpha: float, target_modules: list[str],
                 dtype: torch.dtype = torch.float32):
        self.model = model
        self.n_slots, self.r, self.alpha = n_slots, r, alpha
        self.scale = alpha / r
        self.dtype = dtype
        self.target_modules = list(target_modules)
        self.mix: RowMix | None = None
        self.detached_terms: tuple[bool, ...] = ()  # per term k of the mix: does any row detach it
        for p in model.parameters():
            p.requires_grad_(False)
        self.layers: dict[str, BankLinear] = {}
        targets = [(name, mod) for name, mod in model.named_modules()
                   if isinstance(mod, nn.Linear) and name.split(".")[-1] in self.target_modules]
        if not targets:
            raise ValueError(f"no nn.Linear named {self.target_modules} in the model")
        for name, mod in targets:
            parent_name, _, child = name.rpartition(".")
            layer = BankLinear(mod, self)
            setattr(model.get_submodule(parent_name), child, layer)
            self.layers[name] = layer

    # ----------------------------------------------------------------- adapters in and out of slots
    def keys(self) -> list[str]:
        """The keys of an AdapterWeights dict for this model, sorted (the flattening order)."""
        return sorted(k for name in self.layers for k in (f"{name}.lora_A", f"{name}.lora_B"))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.lora_A"] = tuple(layer.lora_A.shape[1:])
            out[f"{name}.lora_B"] = tuple(layer.lora_B.shape[1:])
        return out

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    def set_trainable(self, on: bool) -> None:
        for p in self.parameters():
            p.requires_grad_(on)
            p.grad = None

    @torch.no_grad()
    def load(self, slot: int, weights: AdapterWeights) -> None:
        for name, layer in self.layers.items():
            layer.lora_A[slot].copy_(weights[f"{name}.lora_A"])
            layer.lora_B[slot].copy_(weights[f"{name}.lora_B"])

    @torch.no_grad()
    def read(self, slot: int) -> AdapterWeights:
        out: AdapterWeights = {}
        for name, layer in self.layers.items():
            out[f"{name}.lora_A"] = layer.lora_A[slot].detach().to("cpu", torch.float32).clone()
            out[f"{name}.lora_B"] = layer.lora_B[slot].detach().to("cpu", torch.float32).clone()
        return out

    def init_adapter(self, seed: int) -> AdapterWeights:
        """A fresh LoRA adapter as PEFT initialises it: A kaiming-uniform(a=sqrt(5)), B zero. Seeded."""
        gen = torch.Generator().manual_seed(seed)
        out: AdapterWeights = {}
        for name, layer in self.layers.items():
            r, d_in = layer.lora_A.shape[1:]
            bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_ with a=sqrt(5) on an r x d_in matrix
            out[f"{name}.lora_A"] = (torch.rand(r, d_in, generator=gen) * 2 - 1) * bound
            out[f"{name}.lora_B"] = torch.zeros(layer.lora_B.shape[1:])
        return out

    # ----------------------------------------------------------------- mixing
    @contextmanager
    def mixing(self, mix: RowMix | None) -> Iterator[None]:
        """Within the block every forward pass uses `mix` (None: the bare base model)."""
        device = next(iter(self.layers.values())).lora_A.device
        detached: tuple[bool, ...] = ()
        if mix is not None:
            k = mix.idx.shape[1]
            detached = (False,) * k if mix.detached is None else tuple(bool(c) for c in mix.detached.any(0).tolist())
            mix = RowMix(mix.idx.to(device), mix.w.to(device),
                         None if mix.detached is None else mix.detached.to(device))
        previous = self.mix, self.detached_terms
        self.mix, self.detached_terms = mix, detached
        try:
            yield
        finally:
            self.mix, self.detached_terms = previous
