"""Local training (methods.md, "Common local training step"), for one job or several packed in one batch.

A `TrainSpec` is a job as the client resolved it: starting weights, its encoded rows, the budget, and
extra loss terms. `train_pack` trains several specs at once on the adapter bank: every row carries a
one-hot mix onto its own spec's slot (plus any frozen, detached terms), the loss is the sum of each
spec's own token-mean loss, so each slot's gradient is exactly its spec's gradient; AdamW is elementwise
and untouched slots get zero gradient and zero state, so packing equals running specs one by one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from taskfed import progress
from taskfed.model.bank import AdapterWeights, RowMix
from taskfed.runtime import Encoded, Runtime

IGNORE = -100


def cosine_lr(round_idx: int, rounds: int, lr_max: float, lr_min: float) -> float:
    """Cosine from lr_max (round 0) to lr_min (last round), constant inside a round."""
    if rounds <= 1:
        return lr_max
    round_idx = min(round_idx, rounds - 1)  # rounds a method adds past the budget run at lr_min
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * round_idx / (rounds - 1)))


def sample_order(n_rows: int, n_needed: int, seed: int) -> np.ndarray:
    """Seeded row indices: whole permutations of the rows, concatenated, cut to n_needed."""
    rng = np.random.default_rng(seed)
    reps = -(-n_needed // n_rows)
    return np.concatenate([rng.permutation(n_rows) for _ in range(reps)])[:n_needed]


@dataclass
class TrainSpec:
    init: AdapterWeights
    rows: list[Encoded]
    steps: int
    batch: int
    lr: float
    seed: int
    prox_mu: float = 0.0
    prox_ref: AdapterWeights | None = None
    scale: float = 1.0  # weight of the trained adapter in the layer output
    frozen: list[tuple[AdapterWeights, float]] = field(default_factory=list)  # detached terms (weights, coef)


def collate(rows: list[Encoded], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (IGNORE on the prompt and padding)."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        mask[i, : len(r.ids)] = 1
        labels[i, r.n_prompt: len(r.ids)] = torch.tensor(r.ids[r.n_prompt:])
    return ids.to(device), mask.to(device), labels.to(device)


class _VocabCE(torch.autograd.Function):
    """Per-token cross-entropy of hidden states projected onto the vocabulary, a chunk of positions at a
    time. Forward works out each chunk's d loss / d hidden (softmax - one-hot, times the projection) and
    drops its logits, so the graph keeps an N x d tensor, never N x V logits (vocabularies are 50-250 k
    wide: at 128 x 512 rows the fp32 logits alone are tens of GB). Backward scales the kept gradient by
    each token's upstream weight, which is exact because a token's loss depends only on its own hidden."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk: int, need_grad: bool):
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
        for s in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[s:s + chunk], weight, bias).float()  # same casts as lm_head(h).float()
            t = target[s:s + chunk]
            lse = torch.logsumexp(logits, dim=-1)
            losses[s:s + chunk] = lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)
            if need_grad:
                probs = logits.sub_(lse.unsqueeze(1)).exp_()  # in place: one N x V buffer per chunk
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad[s:s + chunk] = probs.to(weight.dtype) @ weight
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return losses

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return (upstream.unsqueeze(1) * grad).to(ctx.hidden_dtype), None, None, None, None, None


def token_losses(hidden: torch.Tensor, head: torch.nn.Module, target: torch.Tensor, chunk_elems: int = 1 << 26) -> torch.Tensor:
    """F.cross_entropy(head(hidden).float(), target, reduction="none") for an N x d hidden, in chunks of at
    most `chunk_elems` logits. A trainable head (its weight needs a gradient) takes the plain path."""
    weight, bias = head.weight, getattr(head, "bias", None)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return F.cross_entropy(head(hidden).float(), target, reduction="none")
    chunk = max(1, chunk_elems // weight.shape[0])
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _VocabCE.apply(hidden, weight, bias, target, chunk, need_grad)


def row_losses(rt: Runtime, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of token losses and token counts. Only response positions are projected onto the
    vocabulary (prompts are most of the tokens), and those in chunks (see `_VocabCE`)."""
    hidden = rt.decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    sel = target != IGNORE
    token_loss = token_losses(hidden[:, :-1][sel], rt.model.get_output_embeddings(), target[sel])
    row_of = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(target)[sel]
    sums = torch.zeros(ids.shape[0], device=ids.device, dtype=token_loss.dtype).index_add(0, row_of, token_loss)
    counts = sel.sum(1)
    return sums, counts


def _prox(rt: Runtime, slot: int, ref: AdapterWeights) -> torch.Tensor:
    total = 0.0
    for name, layer in rt.bank.layers.items():
        total = total + (layer.lora_A[slot] - ref[f"{name}.lora_A"].to(layer.lora_A)).pow(2).sum()
        total = total + (layer.lora_B[slot] - ref[f"{name}.lora_B"].to(layer.lora_B)).pow(2).sum()
    return total


def make_optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW over the bank's stacked tensors. Elementwise, so each slot's moments and update depend on
    that slot's gradient alone: one optimizer here is one optimizer per adapter. Anything that couples
    elements (gradient-norm clipping, weight decay on untouched slots, Adafactor) would break that."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


@dataclass
class PackTimes:
    """Where a pack's time went: forward + backward + optimizer step, against everything around them."""

    compute: float = 0.0
    tokens: int = 0


def train_pack(rt: Runtime, specs: list[TrainSpec], times: PackTimes | None = None) -> list[tuple[AdapterWeights, float]]:
    """Trains every spec (same steps and lr) in one batch per step; returns (weights, mean train loss) each."""
    if len({(s.steps, s.lr) for s in specs}) != 1:
        raise ValueError("a pack needs one step count and one learning rate")
    steps, lr = specs[0].steps, specs[0].lr
    # Slots: one per trained spec, then one per distinct frozen adapter.
    frozen_slots: dict[int, int] = {}
    frozen_list: list[AdapterWeights] = []
    for s in specs:
        for weights, _ in s.frozen:
            if id(weights) not in frozen_slots:
                frozen_slots[id(weights)] = len(specs) + len(frozen_list)
                frozen_list.append(weights)
    rt.load_slots([s.init for s in specs] + frozen_list)
    bank = rt.bank
    bank.set_trainable(True)
    optimizer = make_optimizer(bank.parameters(), lr)
    orders = [sample_order(len(s.rows), s.steps * s.batch, s.seed) for s in specs]
    losses = [[] for _ in specs]
    pad_id = rt.tokenizer.pad_token_id
    like = bank.parameters()[0]  # proximal references moved to the device once, not at every step
    prox_refs = {j: {k: v.to(like.device, like.dtype) for k, v in s.prox_ref.items()}
                 for j, s in enumerate(specs) if s.prox_mu > 0 and s.prox_ref is not None}
    try:
        rt.model.train()
        for step in range(steps):
            rows, idx, w, det, owner = [], [], [], [], []
            for j, s in enumerate(specs):
                picked = orders[j][step * s.batch:(step + 1) * s.batch]
                terms = [(j, s.scale, False)] + [(frozen_slots[id(fw)], coef, True) for fw, coef in s.frozen]
                for i in picked:
                    rows.append(s.rows[i])
                    idx.append([t[0] for t in terms])
                    w.append([t[1] for t in terms])
                    det.append([t[2] for t in terms])
                    owner.append(j)
            k = max(len(r) for r in idx)  # pad terms to K with zero-weight entries on the row's own slot
            for r_idx, r_w, r_d in zip(idx, w, det):
                while len(r_idx) < k:
                    r_idx.append(r_idx[0]); r_w.append(0.0); r_d.append(True)
            mix = RowMix(torch.tensor(idx), torch.tensor(w, dtype=torch.float32), torch.tensor(det))
            ids, mask, labels = collate(rows, pad_id, rt.device)
            tic = time.perf_counter()
            with bank.mixing(mix):
                sums, counts = row_losses(rt, ids, mask, labels)
            owner_t = torch.tensor(owner, device=sums.device)
            total, step_losses = 0.0, []
            for j, s in enumerate(specs):
                sel = owner_t == j
                job_loss = sums[sel].sum() / counts[sel].sum().clamp(min=1)
                step_losses.append(job_loss.detach())
                total = total + job_loss
                if j in prox_refs:
                    total = total + 0.5 * s.prox_mu * _prox(rt, j, prox_refs[j])
            optimizer.zero_grad(set_to_none=False)
            total.backward()
            optimizer.step()
            for j, value in enumerate(torch.stack(step_losses).tolist()):  # one device sync per step, not per job
                losses[j].append(value)
            if times is not None:
                times.compute += time.perf_counter() - tic
                times.tokens += int(mask.sum())
            progress.advance()  # one step of the pack (the round's progress counts steps)
    finally:
        rt.model.eval()
        bank.set_trainable(False)
    return [(bank.read(j), float(np.mean(losses[j]))) for j in range(len(specs))]


@torch.no_grad()
def adapter_losses(rt: Runtime, adapters: list[AdapterWeights], rows: list[Encoded]) -> list[float]:
    """Mean token loss of each adapter on the same rows (IFCA's choice of cluster)."""
    rt.load_slots(adapters)
    ids, mask, labels = collate(rows, rt.tokenizer.pad_token_id, rt.device)
    out = []
    for slot in range(len(adapters)):
        with rt.bank.mixing(RowMix.one_hot([slot] * len(rows))):
            sums, counts = row_losses(rt, ids, mask, labels)
        out.append(float(sums.sum() / counts.sum().clamp(min=1)))
    return out
