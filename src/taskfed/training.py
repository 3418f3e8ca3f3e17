"""Local training (methods.md, "Common local training step"), for one job or several packed in one batch.

A `TrainSpec` is a job as the client resolved it: starting weights, its encoded rows, the budget, and
extra loss terms. `train_pack` trains several specs at once on the adapter bank: every row carries a
one-hot mix onto its own spec's slot (plus any frozen, detached terms), the loss is the sum of each
spec's own token-mean loss, so each slot's gradient is exactly its spec's gradient; AdamW is elementwise
and untouched slots get zero gradient and zero state, so packing equals running specs one by one.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from taskfed import packing, progress
from taskfed.model.bank import AdapterWeights, GateMix, RowMix, TokenMix, host_to_device
from taskfed.model.parts import PARTS, part_of
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
    trains: tuple[str, ...] = PARTS  # the factors the optimizer updates (FFA-LoRA: B only)
    correction: object | None = None  # a methods.base.Correction applied at every step (SCAFFOLD), or its gate

    @property
    def gating(self):
        """The job's trained gate (a methods.base.Gating), or None."""
        return getattr(self.correction, "gating", None)


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
    elements (gradient-norm clipping, weight decay on untouched slots, Adafactor) would break that.
    Fused: one kernel per step for all tensors, and its step counts stay on the device (the foreach
    version reads each one back to the host, a sync per tensor and step)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)


@dataclass
class PackStats:
    """What a round's packs did: seconds in forward + backward + optimizer steps, real tokens and tokens
    computed (padding included), forward passes and steps. `counter` (an OpCounter), when given, counts
    the ops of every step after the first (the first one warms caches up and allocates)."""

    compute: float = 0.0
    tokens: int = 0
    computed: int = 0
    passes: int = 0
    steps: int = 0
    counter: object | None = None

    @property
    def padding_share(self) -> float:
        return 1.0 - self.tokens / self.computed if self.computed else 0.0


@dataclass
class _Pass:
    """One forward pass, on the device: ids, positions and segment ids (sequences x width), the loss
    positions (flat indices into sequences x width), their targets and jobs, and the bank's mix."""

    ids: torch.Tensor
    pos: torch.Tensor
    seg: torch.Tensor
    sel: torch.Tensor
    target: torch.Tensor
    owner: torch.Tensor
    mix: object


def _block_mask(seg: torch.Tensor, eager: bool, dtype: torch.dtype) -> torch.Tensor:
    """Causal attention inside each row of a packed sequence (equal segment ids), as transformers takes a
    ready 4D mask (used as it is: no check that reads it back). Padding has its own segment, so every query
    attends to at least itself (no all-masked row, no NaN)."""
    width = seg.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=seg.device).tril()
    mask = ((seg.unsqueeze(2) == seg.unsqueeze(1)) & causal).unsqueeze(1)
    if eager:  # eager attention adds its mask to the scores
        return torch.zeros(mask.shape, dtype=dtype, device=seg.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask


def _host_pass(items: list, seqs: list[list[int]], width: int, pad_id: int, n_jobs: int) -> dict[str, torch.Tensor]:
    """One pass's tensors on the host: ids, positions (restarting per row) and segment ids (sequences x
    width), each token's job (`n_jobs` on padding), and the loss positions as flat indices into sequences
    x width, with their targets and jobs. `items` are (job, Encoded) rows; `seqs` their layout."""
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(seqs), width), dtype=torch.long)
    seg = torch.full((len(seqs), width), -1, dtype=torch.long)
    job = torch.full((len(seqs), width), n_jobs, dtype=torch.long)
    sel, target, owner = [], [], []
    for p, seq in enumerate(seqs):
        offset = 0
        for k, item in enumerate(seq):
            j, row = items[item]
            n = len(row.ids)
            ids[p, offset:offset + n] = torch.tensor(row.ids)
            pos[p, offset:offset + n] = torch.arange(n)
            seg[p, offset:offset + n] = k
            job[p, offset:offset + n] = j
            # hidden[t] predicts ids[t + 1]: the loss positions are the response's, shifted by one (a row's
            # first token has no position before it, as in a plain shifted loss)
            start = max(row.n_prompt, 1)
            first = p * width + offset + start - 1
            sel.append(torch.arange(first, first + n - start))
            target.append(torch.tensor(row.ids[start:]))
            owner.append(torch.full((n - start,), j))
            offset += n
    return {"ids": ids, "pos": pos, "seg": seg, "job": job, "sel": torch.cat(sel), "target": torch.cat(target),
            "owner": torch.cat(owner)}


def _all_to_device(records: list[dict[str, torch.Tensor]], device) -> list[dict[str, torch.Tensor]]:
    """The same records with every tensor on `device`, in one copy per dtype (`host_to_device`)."""
    slots = [(i, key) for i, rec in enumerate(records) for key in rec]
    moved = [dict(rec) for rec in records]
    for dtype in {rec[key].dtype for rec in records for key in rec}:
        mine = [(i, key) for i, key in slots if records[i][key].dtype == dtype]
        for (i, key), t in zip(mine, host_to_device([records[i][key] for i, key in mine], device)):
            moved[i][key] = t
    return moved


class _PackPlan:
    """Every step's passes of a pack, built on the host once and moved to the device in one copy per dtype
    (pinned, not waited for), so that a step reads nothing back and copies nothing from the host."""

    def __init__(self, rt: Runtime, specs: list["TrainSpec"], frozen_slots: dict[int, int], layout: packing.Layout):
        n_jobs = len(specs)
        n_slots = n_jobs + len(frozen_slots)
        orders = [sample_order(len(s.rows), s.steps * s.batch, s.seed) for s in specs]
        # Each job's mix terms: its own slot (trained), then its frozen adapters' slots (detached).
        terms = [[(j, s.scale, False)] + [(frozen_slots[id(fw)], coef, True) for fw, coef in s.frozen]
                 for j, s in enumerate(specs)]
        # Token mix (tokens layout): a job's row of weights over the pack's slots; row n_jobs, padding, is zero.
        table = torch.zeros(n_jobs + 1, n_slots)
        for j, job_terms in enumerate(terms):
            for slot, coef, _ in job_terms:
                table[j, slot] += coef * rt.bank.scale
        # Gated jobs (GateMix): per job, the bank slot each of its gate's logits names; row n_jobs, padding,
        # uses gate 0 onto slot 0 (padding is in no loss and attended by no token: zero gradient).
        gated = specs[0].gating is not None
        if gated:
            gate_slots = torch.tensor([[terms[j][t][0] for t in s.gating.terms] for j, s in enumerate(specs)]
                                      + [[0] * len(specs[0].gating.terms)])
        counts = torch.zeros(specs[0].steps, n_jobs)
        records, shape = [], []  # every pass's host tensors; passes per step
        self.tokens, self.computed, self.n_passes = 0, 0, 0
        for step in range(specs[0].steps):
            items = [(j, s.rows[i]) for j, s in enumerate(specs)
                     for i in orders[j][step * s.batch:(step + 1) * s.batch]]
            plan = packing.plan_step([len(r.ids) for _, r in items], layout)
            self.computed += plan.computed_tokens()
            self.tokens += sum(len(r.ids) for _, r in items)
            for j, row in items:
                counts[step, j] += len(row.ids) - max(row.n_prompt, 1)
            for seqs, width in zip(plan.passes, plan.widths):
                rec = _host_pass(items, seqs, width, rt.tokenizer.pad_token_id, n_jobs)
                if gated:  # per token (packed) or per row: the job's gate and its slots
                    job = rec["job"] if layout.tokens else torch.tensor([[items[seq[0]][0]] for seq in seqs])
                    rec["gate"] = job.clamp(max=n_jobs - 1)
                    rec["gate_slots"] = gate_slots[job]
                elif not layout.tokens:  # one row per sequence: the row's terms, padded to K with zero weight on its own slot
                    rows_terms = [terms[items[seq[0]][0]] for seq in seqs]
                    k = max(map(len, rows_terms))
                    rows_terms = [t + [(t[0][0], 0.0, True)] * (k - len(t)) for t in rows_terms]
                    rec["idx"] = torch.tensor([[t[0] for t in r] for r in rows_terms])
                    rec["w"] = torch.tensor([[t[1] for t in r] for r in rows_terms], dtype=torch.float32)
                    rec["detached"] = torch.tensor([[t[2] for t in r] for r in rows_terms])
                records.append(rec)
            shape.append(len(plan.passes))
            self.n_passes += len(plan.passes)
        shared = {"counts": counts.clamp(min=1), "table": table, "frozen": torch.arange(n_slots) >= n_jobs}
        *records, shared = _all_to_device(records + [shared], rt.device)
        self.counts = shared["counts"]
        self.eager = rt.model.config._attn_implementation == "eager"
        self.dtype = next(rt.model.parameters()).dtype
        passes = iter(records)
        top_k = specs[0].gating.top_k if gated else None
        self.steps: list[list[_Pass]] = [[self._pass(next(passes), shared, layout.tokens, bool(frozen_slots), top_k)
                                          for _ in range(n)] for n in shape]

    @staticmethod
    def _pass(rec: dict, shared: dict, tokens: bool, any_frozen: bool, top_k: int | None = None) -> _Pass:
        if "gate" in rec:
            n_slots = shared["frozen"].shape[0]
            mix = GateMix(rec["gate"], rec["gate_slots"], n_slots, top_k, shared["frozen"], any_frozen)
        elif tokens:
            w = shared["table"].index_select(0, rec["job"].reshape(-1)).view(*rec["job"].shape, -1)
            mix = TokenMix(w, shared["frozen"], any_frozen=any_frozen)
        else:  # term 0 is each row's own slot (trained); every later term is frozen or zero padding
            k = rec["idx"].shape[1]
            mix = RowMix(rec["idx"], rec["w"], rec["detached"], terms_detached=(False,) + (True,) * (k - 1))
        return _Pass(rec["ids"], rec["pos"], rec["seg"], rec["sel"], rec["target"], rec["owner"], mix)


def _job_sums(rt: Runtime, p: _Pass, n_jobs: int, eager: bool, dtype: torch.dtype) -> torch.Tensor:
    """Each job's summed token loss over one pass (n_jobs, on the device): only the loss positions are
    projected onto the vocabulary (`token_losses`), picked by index, never by a boolean mask."""
    mask = _block_mask(p.seg, eager, dtype)
    with rt.bank.mixing(p.mix):
        hidden = rt.decoder()(input_ids=p.ids, attention_mask=mask, position_ids=p.pos,
                              use_cache=False).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, p.sel)
    losses = token_losses(flat, rt.model.get_output_embeddings(), p.target)
    return torch.zeros(n_jobs, device=losses.device, dtype=losses.dtype).index_add(0, p.owner, losses)


def train_pack(rt: Runtime, specs: list[TrainSpec], stats: PackStats | None = None,
               layout: packing.Layout | None = None) -> list[tuple[AdapterWeights, float]]:
    """Trains every spec (same steps and lr) together; returns (weights, mean train loss) each.

    A step is one or more forward passes (the layout's plan; gradients add up over them) and one AdamW
    step. Each job's loss is its own token mean over the step's rows, whichever passes they fell in, and
    the pack's loss is their sum, so every slot's gradient is its job's. Nothing in a step reads a device
    value back: the losses stay on the device until the pack ends."""
    if len({(s.steps, s.lr) for s in specs}) != 1:
        raise ValueError("a pack needs one step count and one learning rate")
    steps, lr = specs[0].steps, specs[0].lr
    layout = layout or layout_of(rt)
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
    gated = _load_gates(bank, specs)
    bank.set_trainable(True)
    optimizer = make_optimizer(bank.parameters() + (bank.gate_parameters() if gated else []), lr)
    plan = _PackPlan(rt, specs, frozen_slots, layout)
    like = bank.parameters()[0]  # proximal references moved to the device once, not at every step
    prox_refs = {j: {k: v.to(like.device, like.dtype) for k, v in s.prox_ref.items()}
                 for j, s in enumerate(specs) if s.prox_mu > 0 and s.prox_ref is not None}
    masks = _part_masks(bank, specs)
    shifts, shift_at = _corrections(bank, specs)
    stats = stats if stats is not None else PackStats()
    step_losses = []
    try:
        rt.model.train()
        with contextlib.ExitStack() as counting:
            for step, passes in enumerate(plan.steps):
                if step == 1 and stats.counter is not None:
                    counting.enter_context(stats.counter)  # from the second step to the last
                tic = time.perf_counter()
                optimizer.zero_grad(set_to_none=False)
                sums = None
                for i, p in enumerate(passes):
                    job_sums = _job_sums(rt, p, len(specs), plan.eager, plan.dtype)
                    total = (job_sums / plan.counts[step]).sum()
                    if i == len(passes) - 1:
                        for j, ref in prox_refs.items():
                            total = total + 0.5 * specs[j].prox_mu * _prox(rt, j, ref)
                    total.backward()
                    sums = job_sums.detach() if sums is None else sums + job_sums.detach()
                grads = [p.grad for p in bank.parameters()]
                if masks is not None:  # a factor a job does not train gets no gradient, so AdamW leaves it
                    torch._foreach_mul_(grads, masks)
                if shifts is not None and shift_at == "grad":
                    torch._foreach_add_(grads, shifts)
                optimizer.step()
                if shifts is not None and shift_at == "weights":
                    with torch.no_grad():
                        torch._foreach_add_(bank.parameters(), shifts, alpha=-lr)
                step_losses.append(sums / plan.counts[step])
                stats.compute += time.perf_counter() - tic
                progress.advance()  # one step of the pack (the round's progress counts steps)
    finally:
        rt.model.eval()
        bank.set_trainable(False)
    stats.tokens += plan.tokens
    stats.computed += plan.computed
    stats.passes += plan.n_passes
    stats.steps += steps
    per_step = torch.stack(step_losses).tolist()  # the pack's one read-back of losses
    trained = bank.read_many(len(specs))
    if gated:  # each job's trained gate comes back under its own keys (parts.split_gate)
        trained = [{**w, **bank.read_gate(j)} for j, w in enumerate(trained)]
    return [(w, float(np.mean([row[j] for row in per_step]))) for j, w in enumerate(trained)]


def _load_gates(bank, specs: list[TrainSpec]) -> bool:
    """Gate j of the bank from spec j's Gating (a gated pack holds gated specs of one width only); False
    when no spec is gated."""
    gatings = [s.gating for s in specs]
    if all(g is None for g in gatings):
        return False
    widths = {None if g is None else len(g.terms) for g in gatings}
    if len(widths) != 1 or len({None if g is None else g.top_k for g in gatings}) != 1:
        raise ValueError("a pack's jobs must all be gated alike (one gate width and top-k) or not at all")
    bank.add_gates(len(specs), widths.pop())
    for j, g in enumerate(gatings):
        bank.load_gate(j, g.gate)
    return True


def _part_masks(bank, specs: list[TrainSpec]) -> list[torch.Tensor] | None:
    """Per bank parameter, a 0/1 tensor of its shape (one value per slot, on the device): 0 where the slot's
    job does not train that factor (a frozen A); None when every job trains everything (no op in the step).
    Full-shaped, not slot x 1 x 1: a multi-tensor multiply of equal shapes stays one fused kernel."""
    if all(set(s.trains) >= set(PARTS) for s in specs):
        return None
    params = bank.parameters()
    out = []
    for name, p in bank.stacked():
        keep = torch.ones(p.shape[0], *([1] * (p.dim() - 1)))
        for j, s in enumerate(specs):
            if part_of(name) not in s.trains:
                keep[j] = 0.0
        out.append(keep.expand(p.shape).contiguous())
    return host_to_device(out, params[0].device)


def _corrections(bank, specs: list[TrainSpec]) -> tuple[list[torch.Tensor] | None, str]:
    """The specs' per-step corrections stacked per bank parameter (zero on slots without one), moved to
    the device once per pack; and where they apply ("weights" or "grad", one per pack)."""
    given = [s.correction for s in specs if s.correction is not None and s.correction.delta]
    if not given:
        return None, ""
    at = {c.at for c in given}
    if len(at) != 1:
        raise ValueError("a pack's corrections must all apply at one place")
    out = []
    for name, p in bank.stacked():
        stack = torch.zeros(p.shape, dtype=torch.float32)
        for j, s in enumerate(specs):
            if s.correction is not None and s.correction.delta:
                stack[j] = s.correction.delta[name]
        out.append(stack)
    return host_to_device(out, bank.parameters()[0].device), at.pop()


def layout_of(rt: Runtime) -> packing.Layout:
    """The packing layout of `rt`'s config on its device (the token budget from the device's free memory)."""
    from taskfed.model.loading import available_bytes

    device = rt.device
    free = available_bytes(str(device)) if device.type == "cuda" else None
    elem = next(rt.model.parameters()).element_size()
    return packing.layout_for(rt.cfg.train, device.type, rt.model.config, elem, free)


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
