"""Batched greedy generation on the adapter bank: per-row adapter mix, rows bucketed by prompt length.

Two decoders, one per kind of device, both giving the tokens of plain greedy `model.generate`:
- CUDA: `generate` with a static KV cache, which transformers compiles (CUDA graphs) for the decoding
  steps; widths are rounded to a multiple of `CUDA_WIDTH_STEP` and the batch is padded up to a power of
  two (`batch_bucket`) so that few shapes ever get compiled, and a batch is kept whole (a GPU step costs
  the same at 16 rows or 64: splitting would only add steps).
- CPU: a plain loop on a dynamic cache that drops finished rows (their cache, their mix) at each step, so
  a step costs what the unfinished rows cost; compute-bound, the CPU has no use for the static cache or
  graphs (measured in docs/throughput.md). Rows are split into buckets of similar prompt length, which
  cuts the padding the prompt pass computes.
Generation stops at `max_new_tokens` (the caller's longest expected answer) or when every row has ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, GenerationConfig

from taskfed.model.bank import RowMix
from taskfed.runtime import Runtime

CUDA_WIDTH_STEP = 64  # prompt widths on CUDA are rounded up to this: one compiled shape per bucket
MIN_BUCKET = 8  # a CPU bucket is split off only when it keeps at least this many rows
MAX_PAD_SHARE = 0.25  # ... and when joining it would make padding more than this share of its tokens


def prompt_ids(rt: Runtime, instruction: str, max_new_tokens: int) -> list[int]:
    """The templated prompt's tokens; an over-long prompt loses its start so prompt + answer fit."""
    ids = rt.tokenizer(rt.prompt(instruction), add_special_tokens=False)["input_ids"]
    keep = max(8, rt.cfg.data.max_length - max_new_tokens)
    return ids[-keep:]


def length_buckets(lengths: list[int], min_rows: int = MIN_BUCKET, max_pad: float = MAX_PAD_SHARE) -> list[list[int]]:
    """Row indices grouped by prompt length (shortest first): a group closes when adding the next row
    would make more than `max_pad` of its padded tokens padding, if it already holds `min_rows` rows."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if len(current) >= min_rows:
            real = sum(lengths[j] for j in current) + lengths[i]
            if 1 - real / (lengths[i] * (len(current) + 1)) > max_pad:
                buckets.append(current)
                current = []
        current.append(i)
    if current:
        buckets.append(current)
    return buckets


def left_pad(prompts: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding: every row's next token sits at the same position."""
    width = width or max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def _config(rt: Runtime, max_new_tokens: int, **kw) -> GenerationConfig:
    tok = rt.tokenizer
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)


def _trim(new: torch.Tensor, eos: int) -> list[list[int]]:
    """Each row's tokens up to and including its first EOS."""
    out = []
    for row in new.tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


@torch.no_grad()
def plain_generate(rt: Runtime, prompts: list[list[int]], mix: RowMix, max_new_tokens: int, **kw) -> list[list[int]]:
    """transformers' greedy `generate` on the whole batch (the reference; `kw` go to GenerationConfig)."""
    ids, mask = left_pad(prompts, rt.tokenizer.pad_token_id)
    with rt.bank.mixing(mix):
        out = rt.model.generate(input_ids=ids.to(rt.device), attention_mask=mask.to(rt.device),
                                generation_config=_config(rt, max_new_tokens, **kw))
    return _trim(out[:, ids.shape[1]:].cpu(), rt.tokenizer.eos_token_id)


def batch_bucket(n: int, cap: int) -> int:
    """The batch size `n` rows are decoded at on the static cache: the next power of two, at most `cap` (the
    configured batch size, so a full batch is not padded); `n` itself above `cap` (more rows are never cut)."""
    if n >= cap:
        return n
    return min(1 << (n - 1).bit_length(), cap)


@torch.no_grad()
def static_generate(rt: Runtime, prompts: list[list[int]], mix: RowMix, max_new_tokens: int) -> list[list[int]]:
    """The CUDA decoder: static KV cache (compiled decoding steps on CUDA), width and batch rounded to a
    bucket, so one graph per (batch bucket, width bucket) rather than one per batch size (an evaluation's
    short last batch would compile its own). Extra left padding changes no token: padded positions are
    masked and position ids start at each row's first real token."""
    n = len(prompts)
    # Pad rows repeat row 0, prompt and mix: they end when it does (no extra decoding step, which a blank
    # row that never emits EOS would cost) and attend only to themselves; their outputs are dropped.
    fill = list(range(n)) + [0] * (batch_bucket(n, rt.cfg.eval.batch_size) - n)
    if len(fill) > n:
        prompts, mix = [prompts[i] for i in fill], mix.select(torch.tensor(fill))
    step = CUDA_WIDTH_STEP
    width = -(-max(len(p) for p in prompts) // step) * step
    ids, mask = left_pad(prompts, rt.tokenizer.pad_token_id, width)
    # One cache length for every call of a run (prompt + answer never exceed data.max_length): each new
    # cache then has the shapes the compiled step was built for, whatever the batch's budget.
    cache_len = -(-max(rt.cfg.data.max_length, width + max_new_tokens) // step) * step + step
    config = _config(rt, max_new_tokens, cache_implementation="static", max_cache_len=cache_len)
    with rt.bank.mixing(mix):
        out = rt.model.generate(input_ids=ids.to(rt.device), attention_mask=mask.to(rt.device),
                                generation_config=config)
    return _trim(out[:n, width:].cpu(), rt.tokenizer.eos_token_id)


@dataclass
class Sampling:
    """How one row picks its next token: temperature 0 is greedy (argmax, what evaluation uses); above 0, a
    draw from softmax(logits / temperature) cut to the smallest set of tokens whose probability reaches
    `top_p` (nucleus), from the row's own generator, seeded: the same request with the same seed draws the
    same tokens, whatever else shares its batch (up to the last bits of batched float sums)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from one row's logits (vocabulary,)."""
        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.double() / self.temperature, dim=-1).cpu()
        if self.top_p < 1:
            p, order = probs.sort(descending=True)
            keep = p.cumsum(0) - p < self.top_p  # every token before the mass reaches top_p, and the one that does
            probs = torch.zeros_like(probs).scatter(0, order[keep], p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))


GREEDY = Sampling()


def pick(logits: torch.Tensor, sampling: list[Sampling]) -> torch.Tensor:
    """Every row's next token (batch x vocabulary logits): one argmax for all greedy rows, a draw for the others."""
    nxt = logits.argmax(-1)
    for i, s in enumerate(sampling):
        if s.temperature != 0:
            nxt[i] = s.pick(logits[i])
    return nxt


class Decoder:
    """Decoding of a changing set of rows (greedy, or sampled per row: `Sampling`) on one dynamic KV cache:
    `admit` prefills new rows (which then decode with the rest: continuous batching), `step` gives every live
    row its next token, `keep`
    lets finished rows leave (their cache, mask and mix with them). The CPU decoder below admits once and
    drains; `taskfed serve` admits new requests between steps. Row order: admission order, as `keep` left it.

    Rows of different widths share the cache by left padding: a joining batch and the running one are padded
    on the left to the wider of the two (masked, so no row attends to another's padding), and the columns
    that no live row attends to any more are cut off when rows leave, so the width never grows past the
    longest live row."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.cache: DynamicCache | None = None
        self.mask = self.last = self.nxt = None  # batch x width; batch x 1 positions; batch next tokens
        self.mix: RowMix | None = None
        self.sampling: list[Sampling] = []

    def __len__(self) -> int:
        return 0 if self.nxt is None else len(self.nxt)

    @torch.no_grad()
    def admit(self, prompts: list[list[int]], mix: RowMix, sampling: list[Sampling] | None = None) -> list[int]:
        """Prefills `prompts` (row i under mix row i, picking tokens by sampling[i]: greedy by default) and
        returns each one's first new token."""
        sampling = list(sampling) if sampling is not None else [GREEDY] * len(prompts)
        model, dev = self.rt.model, self.rt.device
        ids, mask = left_pad(prompts, self.rt.tokenizer.pad_token_id)
        ids, mask = ids.to(dev), mask.to(dev)
        # Position ids as transformers' generate makes them: counted from each row's first real token.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=model.config)
        with self.rt.bank.mixing(mix):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                           use_cache=True, logits_to_keep=1).logits
        nxt = pick(logits[:, -1].float(), sampling)
        self.sampling += sampling
        if self.cache is None:
            self.cache, self.mask, self.last, self.nxt, self.mix = cache, mask, positions[:, -1:], nxt, mix
        else:
            self._join(cache, mask, positions[:, -1:], nxt, mix)
        return nxt.tolist()

    @torch.no_grad()
    def step(self) -> list[int]:
        """The next token of every live row, from the token it produced last."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        self.last = self.last + 1
        with self.rt.bank.mixing(self.mix):
            logits = self.rt.model(input_ids=self.nxt.unsqueeze(1), attention_mask=self.mask, position_ids=self.last,
                                   cache=self.cache, use_cache=True).logits
        self.nxt = pick(logits[:, -1].float(), self.sampling)
        return self.nxt.tolist()

    def keep(self, rows: list[int]) -> None:
        """Only `rows` (positions in the live order) stay."""
        if len(rows) == len(self):
            return
        self.sampling = [self.sampling[i] for i in rows]
        if not rows:
            self.cache = self.mask = self.last = self.nxt = self.mix = None
            return
        sel = torch.tensor(rows, device=self.rt.device)
        self.cache.batch_select_indices(sel)
        self.mask, self.last, self.nxt = self.mask[sel], self.last[sel], self.nxt[sel]
        self.mix = self.mix.select(torch.tensor(rows))
        cut = int((self.mask.sum(0) > 0).nonzero()[0])  # leading columns nobody attends to any more
        if cut:
            self.mask = self.mask[:, cut:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]

    def _join(self, cache: DynamicCache, mask: torch.Tensor, last: torch.Tensor, nxt: torch.Tensor, mix: RowMix) -> None:
        width = max(self.mask.shape[1], mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:  # zeros on the left of dimension `dim`, to `width`
            short = width - t.shape[dim]
            if not short:
                return t
            shape = list(t.shape)
            shape[dim] = short
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)])
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)])
        self.mask = torch.cat([pad(self.mask, 1), pad(mask, 1)])
        self.last, self.nxt = torch.cat([self.last, last]), torch.cat([self.nxt, nxt])
        self.mix = join_mixes(self.mix, mix)


def join_mixes(a: RowMix, b: RowMix) -> RowMix:
    """The rows of `a` then those of `b`; the one with fewer terms gets weight-0 terms on slot 0, which add
    an exact zero to every layer's output. Gated rows (FedALT, FedLEASE) join plain ones, which get gate -1
    (not gated); gated rows of both must share the top-k (the bank's gates share one width)."""
    if a.gate is not None and b.gate is not None and a.top_k != b.top_k:
        raise ValueError(f"gated rows of top-k {a.top_k} and {b.top_k} cannot share a batch")
    k = max(a.idx.shape[1], b.idx.shape[1])

    def widen(m: RowMix) -> RowMix:
        extra = k - m.idx.shape[1]
        if not extra:
            return m
        det = None if m.detached is None else torch.cat([m.detached, m.detached.new_zeros(len(m.idx), extra)], 1)
        return RowMix(torch.cat([m.idx, m.idx.new_zeros(len(m.idx), extra)], 1),
                      torch.cat([m.w, m.w.new_zeros(len(m.w), extra)], 1), det, gate=m.gate, top_k=m.top_k, n=m.n)

    a, b = widen(a), widen(b)
    det = None
    if a.detached is not None or b.detached is not None:
        det = torch.cat([torch.zeros_like(m.idx, dtype=torch.bool) if m.detached is None else m.detached for m in (a, b)])
    gate, top_k, n = None, None, 0
    if a.gate is not None or b.gate is not None:
        gate = torch.cat([m.gate if m.gate is not None else torch.full((len(m.idx),), -1, dtype=torch.long,
                                                                        device=m.idx.device) for m in (a, b)])
        top_k, n = (a.top_k, a.n) if a.gate is not None else (b.top_k, b.n)
    return RowMix(torch.cat([a.idx, b.idx]), torch.cat([a.w, b.w]), det, gate=gate, top_k=top_k, n=n)


def shrinking_generate(rt: Runtime, prompts: list[list[int]], mix: RowMix, max_new_tokens: int) -> list[list[int]]:
    """The CPU decoder: greedy steps on a dynamic cache; a row that emits EOS leaves the batch."""
    eos = rt.tokenizer.eos_token_id
    dec = Decoder(rt)
    out: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    tokens = dec.admit(prompts, mix)
    for step in range(max_new_tokens):
        for row, t in zip(live, tokens):
            out[row].append(t)
        if step == max_new_tokens - 1:
            break
        keep = [i for i, t in enumerate(tokens) if t != eos]
        if not keep:
            break
        dec.keep(keep)
        live = [live[i] for i in keep]
        tokens = dec.step()
    return out


def fast_generate(rt: Runtime, prompts: list[list[int]], mix: RowMix, max_new_tokens: int) -> list[list[int]]:
    """Each row's new tokens (through its EOS), in input order, by the decoder that suits the device."""
    if rt.device.type == "cuda":
        return static_generate(rt, prompts, mix, max_new_tokens)
    out: list[list[int]] = [[] for _ in prompts]
    for rows in length_buckets([len(p) for p in prompts]):
        for row, tokens in zip(rows, shrinking_generate(rt, [prompts[i] for i in rows], mix.select(torch.tensor(rows)),
                                                         max_new_tokens)):
            out[row] = tokens
    return out


def generate(rt: Runtime, prompts: list[list[int]], mix: RowMix, max_new_tokens: int) -> tuple[list[str], int]:
    """Greedy continuations of tokenised prompts, row i under mix row i (adapters already in their slots).
    Returns the texts and the number of tokens generated (up to and including each row's EOS)."""
    new = fast_generate(rt, prompts, mix, max_new_tokens)
    texts = rt.tokenizer.batch_decode(new, skip_special_tokens=True)
    return [t.strip() for t in texts], sum(len(t) for t in new)
