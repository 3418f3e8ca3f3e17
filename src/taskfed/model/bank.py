"""The adapter bank: many LoRA adapters on ONE frozen base model, mixed per row.

Every LoRA target layer (q_proj, v_proj, ...) is wrapped by a `BankLinear` holding N adapters as stacked
tensors (A: N x r x d_in, B: N x d_out x r) and computing, for a batch with per-row mixing weights,

    y = W0 x + sum_k w[row, k] * scale * B_{idx[row, k]} A_{idx[row, k]} x

Two ways to say the mix, one per use:
- `RowMix` (generation, embedding, training rows one per sequence): sparse per row (idx, w: batch x K),
  because rows use one adapter (routing, several clients in one batch) or two (FedDPA), never all N: each
  row's cost is K small matmuls, whatever N is. Gathering A[idx] keeps autograd exact: a row's gradient
  reaches only the adapters it uses. A term can be marked `detached` (FedDPA-T's stop-gradient).
- `TokenMix` (training with several rows, of several jobs, packed into one sequence): dense weights per
  token over the first n slots, computed as ONE rank n*r LoRA (x A_cat^T, times the weights, B_cat^T): a
  handful of ops per layer whatever the number of jobs or rows, no per-row gather and no `index_put` in
  backward. A token's weight on other slots is exactly zero, so their gradient from it is exactly zero.
- `GateMix` (mixture-of-LoRA methods, FedLEASE's router and FedALT's mixer): the per-token weights are not
  given but computed in each layer from the token itself by a trained gate (no bias): p = softmax(G x) over
  the gate's W logits, optionally the top k kept and renormalised, each logit's weight added onto the bank
  slot it names (several logits may name one slot: FedLEASE's 2K-1 logits alias the client's own expert),
  then TokenMix's dense product. Gates are the bank's too (`add_gates`: n_gates x W x d_in per layer), one
  per client or cluster, chosen per token, so rows of several jobs still share one pass, packed or not.
  With one gate per row (gate: batch x 1: training one row per sequence, evaluation, generation) each row
  gathers its own gate and its W slots instead (RowMix's per-row gather): its result then does not depend
  on the rows or slots beside it, so packed jobs train to the bit as alone. Evaluation and serving hold
  gated rows as a RowMix with `gate` set (so rows are selected and joined as any row mix).
Either way one optimizer over the stacked tensors equals one optimizer per adapter (AdamW is elementwise).

The stacked tensors are float32 whatever the base model's dtype (master weights): at lr 1e-5 an AdamW
update to A is below bfloat16's resolution, so a bf16 bank would not train at all late in a run. A
forward pass casts them to the activations' dtype (one cast per layer), and gradients reach the float32
masters through the cast.

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
    # Per term k: does any row detach it. Read on the host while the mix is still there (`on`), so that a
    # forward pass never reads a device tensor back.
    terms_detached: tuple[bool, ...] | None = None
    # Gated rows (evaluation and serving of FedALT, FedLEASE): row b's weights are not `w` but computed per
    # token by bank gate `gate[b]` (batch, long), whose W logits name the slots `idx[b, :W]` (GateMix's
    # `slots`, aliases allowed; later terms weigh 0), top_k as GateMix's. A row with gate -1 is not gated and
    # keeps its `w` (a served batch mixes gated requests with plain ones). Kept per row so that selecting and
    # joining rows (batched generation) works as for any row mix.
    gate: torch.Tensor | None = None
    top_k: int | None = None
    n: int = 0

    def on(self, device) -> "RowMix":
        """The mix on `device`, its detached flags read first (on the host, where the mix is built)."""
        k = self.idx.shape[1]
        flags = self.terms_detached
        if flags is None:
            flags = (False,) * k if self.detached is None else tuple(bool(c) for c in self.detached.any(0).tolist())
        nb = torch.device(device).type == "cuda"
        move = lambda t: None if t is None else t.to(device, non_blocking=nb)  # noqa: E731
        return RowMix(move(self.idx), move(self.w), move(self.detached), flags, move(self.gate), self.top_k, self.n)

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
        gate = None if self.gate is None else self.gate[rows]
        return RowMix(self.idx[rows], self.w[rows], det, gate=gate, top_k=self.top_k, n=self.n)


@dataclass
class TokenMix:
    """Dense per-token weights over the bank's first n slots: w (batch x T x n, the LoRA scale included), and
    `frozen` (n, bool, on the device) for slots no token trains (their terms are detached); `any_frozen`
    says on the host whether there are any."""

    w: torch.Tensor
    frozen: torch.Tensor | None = None
    any_frozen: bool = False


@dataclass
class GateMix:
    """Per-token weights computed by the bank's gates: token t uses gate `gate[b, t]` (batch x T, or batch x 1
    for one per row), whose W logits name the bank slots `slots[b, t, :]` (batch x T x W or batch x 1 x W;
    repeated slots alias); `top_k` keeps the k largest probabilities, renormalised (None: all); the dense
    product covers slots 0..n-1; `frozen` / `any_frozen` as TokenMix's (the slots no token trains)."""

    gate: torch.Tensor
    slots: torch.Tensor
    n: int
    top_k: int | None = None
    frozen: torch.Tensor | None = None
    any_frozen: bool = False


def host_to_device(tensors: list[torch.Tensor], device) -> list[torch.Tensor]:
    """Many host tensors of one dtype on `device` in ONE copy: concatenated, pinned and not waited for on
    CUDA (a pageable copy blocks the host until the device has it), split back into views."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if torch.device(device).type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class BankLinear(nn.Module):
    """A frozen nn.Linear plus N LoRA adapters, mixed per row (RowMix) or per token (TokenMix) by the bank."""

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
        if isinstance(mix, TokenMix):
            return y + self._dense(x, mix).to(y.dtype)
        if isinstance(mix, GateMix):
            if mix.gate.shape[1] == 1:  # one gate per row: the row's own slots only, as RowMix computes them
                return y + self._gathered(x, mix).to(y.dtype)
            w = self.gate_weights(x, mix) * self._bank[0].scale
            return y + self._dense(x, TokenMix(w, mix.frozen, mix.any_frozen)).to(y.dtype)
        if mix.idx.shape[0] != x.shape[0]:
            raise RuntimeError(f"the bank's row mix has {mix.idx.shape[0]} rows but the batch has {x.shape[0]}")
        scale = self._bank[0].scale
        xa = x
        delta = None
        if mix.gate is not None:  # gated rows: per-token weights from each row's gate, the others their w
            p = self.gate_probs(x, GateMix(mix.gate.clamp(min=0).view(-1, 1), mix.idx.unsqueeze(1), mix.n, mix.top_k))
            gated = (mix.gate >= 0).view(-1, 1, 1)
        for k in range(mix.idx.shape[1]):
            A = self.lora_A[mix.idx[:, k]].to(x.dtype)  # batch x r x d_in (cast from the float32 masters)
            B = self.lora_B[mix.idx[:, k]].to(x.dtype)  # batch x d_out x r
            if self._bank[0].detached_terms[k]:  # flags read on the host once per mix: no device sync here
                keep = mix.detached[:, k].view(-1, 1, 1)
                A = torch.where(keep, A.detach(), A)
                B = torch.where(keep, B.detach(), B)
            h = torch.matmul(torch.matmul(xa, A.transpose(1, 2)), B.transpose(1, 2))  # batch x T x d_out
            w = mix.w[:, k].view(-1, *([1] * (h.dim() - 1)))
            if mix.gate is not None:
                w = torch.where(gated, p[..., k:k + 1] if k < p.shape[-1] else 0.0, w)
            term = h * (w.to(h.dtype) * scale)
            delta = term if delta is None else delta + term
        return y + delta.to(y.dtype)

    def gate_weights(self, x: torch.Tensor, mix: GateMix) -> torch.Tensor:
        """Each token's weights over slots 0..n-1 (... x n, summing to 1) from its gate's probabilities, each
        added onto the slot its logit names."""
        p = self.gate_probs(x, mix)
        return p.new_zeros(*x.shape[:-1], mix.n).scatter_add(-1, mix.slots.expand(*x.shape[:-1], p.shape[-1]), p)

    def _gathered(self, x: torch.Tensor, mix: GateMix) -> torch.Tensor:
        """sum_w p[token, w] * B_{slot w} A_{slot w} x with one gate per row, each row gathering its own W
        slots (a logit at a time, as RowMix's terms): a row's result does not depend on the slots or rows
        beside it (packed = one by one to the bit, like the plain bank's rows), and costs W, not n."""
        p = self.gate_probs(x, mix)
        scale = self._bank[0].scale
        delta = None
        for k in range(p.shape[-1]):
            slot = mix.slots[:, 0, k]
            A = self.lora_A[slot].to(x.dtype)  # batch x r x d_in
            B = self.lora_B[slot].to(x.dtype)
            if mix.any_frozen:
                keep = mix.frozen[slot].view(-1, 1, 1)
                A, B = torch.where(keep, A.detach(), A), torch.where(keep, B.detach(), B)
            h = torch.matmul(torch.matmul(x, A.transpose(1, 2)), B.transpose(1, 2))
            term = h * (p[..., k:k + 1].to(h.dtype) * scale)
            delta = term if delta is None else delta + term
        return delta

    def gate_probs(self, x: torch.Tensor, mix: GateMix) -> torch.Tensor:
        """Each token's probabilities over its gate's W logits (... x W, summing to 1, top-k kept). One gate
        per row: the row's gate gathered (its logits then do not depend on the other gates). Per token:
        every gate's logits in one product (gates are few), the token's own picked by index (no boolean
        mask, no host sync)."""
        g = self.gate  # n_gates x W x d_in
        lead = x.shape[:-1]
        if mix.gate.shape[1] == 1:
            logits = torch.matmul(x, g[mix.gate[:, 0]].to(x.dtype).transpose(1, 2))  # batch x T x W
        else:
            logits = torch.nn.functional.linear(x, g.to(x.dtype).reshape(-1, g.shape[-1])).unflatten(-1, g.shape[:2])
            pick = mix.gate.expand(lead)[..., None, None].expand(*lead, 1, g.shape[1])
            logits = logits.gather(-2, pick).squeeze(-2)
        p = logits.float().softmax(-1)  # ... x W, softmax in float32
        if mix.top_k is not None and mix.top_k < g.shape[1]:
            kept, where = p.topk(mix.top_k, dim=-1)
            p = torch.zeros_like(p).scatter(-1, where, kept / kept.sum(-1, keepdim=True))
        return p

    def _dense(self, x: torch.Tensor, mix: TokenMix) -> torch.Tensor:
        """sum_s w[token, s] * B_s A_s x for the first n slots, as one rank n*r product."""
        n = mix.w.shape[-1]
        r = self.lora_A.shape[1]
        A, B = self.lora_A[:n], self.lora_B[:n]
        if mix.any_frozen:
            keep = mix.frozen.view(-1, 1, 1)
            A = torch.where(keep, A.detach(), A)
            B = torch.where(keep, B.detach(), B)
        a_cat = A.to(x.dtype).reshape(n * r, -1)  # (n r) x d_in
        b_cat = B.to(x.dtype).permute(1, 0, 2).reshape(-1, n * r)  # d_out x (n r)
        xa = torch.nn.functional.linear(x, a_cat)  # ... x (n r)
        xa = (xa.unflatten(-1, (n, r)) * mix.w.to(x.dtype).unsqueeze(-1)).flatten(-2)
        return torch.nn.functional.linear(xa, b_cat)


class AdapterBank:
    """Owns the BankLinear layers injected into one base model; loads, reads and mixes adapters by slot."""

    def __init__(self, model: nn.Module, n_slots: int, r: int, alpha: float, target_modules: list[str]):
        self.model = model
        self.n_slots, self.r, self.alpha = n_slots, r, alpha
        self.scale = alpha / r
        self.dtype = torch.float32  # master weights (module docstring), whatever the model's dtype
        self.target_modules = list(target_modules)
        self.mix: RowMix | TokenMix | GateMix | None = None
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
        for p in self.parameters() + self.gate_parameters():
            p.requires_grad_(on)
            p.grad = None

    # ----------------------------------------------------------------- gates (GateMix)
    def add_gates(self, n_gates: int, width: int) -> None:
        """Room for `n_gates` gates of `width` logits in every layer, zero (a zero gate mixes uniformly)."""
        for layer in self.layers.values():
            w = layer.lora_A
            layer.gate = nn.Parameter(torch.zeros(n_gates, width, w.shape[-1], dtype=self.dtype, device=w.device))

    def ensure_gates(self, n_gates: int, width: int) -> None:
        """Room for `n_gates` gates of `width` logits at least; the gates there keep their weights (a server
        swapping runs in serves the old gates' requests while it loads the new ones). Another width starts
        over (zero gates)."""
        have = self.gate_parameters()
        if not have or have[0].shape[1] != width:
            return self.add_gates(n_gates, width)
        if n_gates <= have[0].shape[0]:
            return None
        for layer in self.layers.values():
            grown = layer.gate.new_zeros((n_gates, *layer.gate.shape[1:]))
            grown[:len(layer.gate)] = layer.gate.detach()
            layer.gate = nn.Parameter(grown, requires_grad=layer.gate.requires_grad)
        return None

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gates' stacked tensors, one per layer ([] without gates): trained beside `parameters()`."""
        return [layer.gate for layer in self.layers.values() if hasattr(layer, "gate")]

    def gate_keys(self) -> list[str]:
        """The keys of a gate's weights dict (`<module path>.gate`: W x d_in), sorted as adapters' keys are."""
        return sorted(f"{name}.gate" for name in self.layers)

    @torch.no_grad()
    def load_gate(self, i: int, weights: AdapterWeights) -> None:
        for name, layer in self.layers.items():
            layer.gate[i].copy_(weights[f"{name}.gate"])

    @torch.no_grad()
    def read_gate(self, i: int) -> AdapterWeights:
        """Gate i as float32 CPU tensors, in ONE device-to-host copy (as `read_many`)."""
        gates = [(f"{name}.gate", layer.gate[i]) for name, layer in self.layers.items()]
        flat = torch.cat([g.reshape(-1) for _, g in gates]).to("cpu", torch.float32)
        return {key: part.view(g.shape).clone() for (key, g), part in zip(gates, flat.split([g.numel() for _, g in gates]))}

    @torch.no_grad()
    def load(self, slot: int, weights: AdapterWeights) -> None:
        for name, layer in self.layers.items():
            layer.lora_A[slot].copy_(weights[f"{name}.lora_A"])
            layer.lora_B[slot].copy_(weights[f"{name}.lora_B"])

    @torch.no_grad()
    def read(self, slot: int) -> AdapterWeights:
        return self.read_many(1, first=slot)[0]

    @torch.no_grad()
    def load_many(self, adapters: list[AdapterWeights]) -> None:
        """Slots 0..len-1 from `adapters` in ONE host-to-device copy (a pinned buffer on CUDA, not waited
        for) and one multi-tensor copy into the stacked tensors, instead of a blocking copy per layer."""
        if not adapters:
            return
        n, params = len(adapters), self.stacked()
        stacked = [torch.stack([a[key] for a in adapters]).to(torch.float32) for key, _ in params]
        torch._foreach_copy_([p[:n] for _, p in params], host_to_device(stacked, params[0][1].device))

    @torch.no_grad()
    def read_many(self, n: int, first: int = 0) -> list[AdapterWeights]:
        """Slots first..first+n-1 as float32 CPU dicts, in ONE device-to-host copy."""
        params = self.stacked()
        flat = torch.cat([p[first:first + n].reshape(-1) for _, p in params]).to("cpu", torch.float32)
        parts = flat.split([n * p[0].numel() for _, p in params])
        out: list[AdapterWeights] = [{} for _ in range(n)]
        for v, (key, p) in zip(parts, params):
            for j, t in enumerate(v.view(n, *p.shape[1:]).unbind(0)):
                out[j][key] = t.clone()  # its own storage: a caller keeping one slot keeps no other
        return out

    def stacked(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{name}.{part}", getattr(layer, part)) for name, layer in self.layers.items()
                for part in ("lora_A", "lora_B")]

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
    def mixing(self, mix: RowMix | TokenMix | GateMix | None) -> Iterator[None]:
        """Within the block every forward pass uses `mix` (None: the bare base model). A RowMix is moved to
        the bank's device (already there with its flags read: nothing is copied or read back); a TokenMix is
        used as it is."""
        device = next(iter(self.layers.values())).lora_A.device
        detached: tuple[bool, ...] = ()
        if isinstance(mix, RowMix):
            if mix.terms_detached is None or mix.idx.device != device:
                mix = mix.on(device)
            detached = mix.terms_detached
        previous = self.mix, self.detached_terms
        self.mix, self.detached_terms = mix, detached
        try:
            yield
        finally:
            self.mix, self.detached_terms = previous
