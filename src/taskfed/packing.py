"""How a round's training rows become forward passes: the plan that decides a round's speed on a GPU.

Two layouts, one per device kind by default (`train.packing = "auto"`):
- **rows** (CPU): one row per sequence, right-padded to the longest row of the pass, at most
  `train.max_rows_per_batch` rows (16) per pass. A CPU step is compute-bound, so filling it buys nothing,
  and one row per sequence keeps every row's arithmetic independent of what else is in the batch (so a
  Flower node, which trains one client, gives bit for bit what the in-process engine gives).
- **tokens** (CUDA): rows of every job of the round packed first-fit-decreasing into sequences a few
  mean rows long (`sequence_length`), positions restarting at each row and attention kept inside it (a
  block-diagonal causal mask), and as many sequences per pass as the device's free memory allows
  (`tokens_per_pass`). A GPU step is bound by the host's dispatching, not by arithmetic: fewer, fuller
  passes are what make it fast. Padding is only what is left at a sequence's end.

Everything here is host arithmetic on row lengths: nothing touches a device.
"""

from __future__ import annotations

from dataclasses import dataclass

# Sequence length of the tokens layout, from the step's rows: at least ROWS_PER_SEQ mean rows (then
# first-fit leaves little at each sequence's end: measured on FLAN, under 7 % padding), and no longer
# (the block-diagonal attention's wasted L^2 stays small next to the linear layers' work), rounded up to
# SEQ_ROUND so that a run sees few shapes (a compiler or CUDA graph compiles once per shape).
ROWS_PER_SEQ = 4
SEQ_ROUND = 256
# The dense token mix is one rank (jobs x r) LoRA per layer: past this many jobs a pack is split.
MAX_JOBS_PER_PACK = 32
# Share of the free device memory the planner gives to one pass's activations.
MEMORY_SHARE = 0.5
ROWS_PER_PASS_CPU = 16


@dataclass(frozen=True)
class Layout:
    tokens: bool  # several rows per sequence (True) or one row per sequence
    max_rows: int | None  # rows per pass (None: no limit but the token budget)
    max_tokens: int | None  # computed tokens (real + padding) per pass (None: no limit but the rows)
    seq_len: int | None = None  # tokens layout: sequence length (None: from the rows, `sequence_length`)
    max_jobs: int = MAX_JOBS_PER_PACK


def sequence_length(lengths: list[int]) -> int:
    """The tokens layout's sequence length for rows of these lengths (module constants say why)."""
    want = max(max(lengths), ROWS_PER_SEQ * sum(lengths) / len(lengths))
    return int(-(-want // SEQ_ROUND) * SEQ_ROUND)


def bytes_per_token(model_config, elem_bytes: int, seq_len: int) -> int:
    """Activation memory one computed token keeps for backward, generously: per decoder layer the hidden
    state six times over (norms, q/k/v, attention output, residual) and the MLP's intermediate four times
    (gate, up, activation, down's input), twice for the autograd copies and kernels' scratch; plus a
    row of the block mask (a bool and a float per key)."""
    hidden = model_config.hidden_size
    inter = getattr(model_config, "intermediate_size", 4 * hidden)
    layers = model_config.num_hidden_layers
    return 2 * layers * (6 * hidden + 4 * inter) * elem_bytes + 5 * seq_len


def tokens_per_pass(model_config, elem_bytes: int, free_bytes: int, seq_len: int = 2048) -> int:
    """Computed tokens one pass may hold in `free_bytes` (sequences up to `seq_len` long), a multiple of
    SEQ_ROUND. A pass always takes one sequence, whatever this says."""
    per = bytes_per_token(model_config, elem_bytes, seq_len)
    return max(SEQ_ROUND, int(free_bytes * MEMORY_SHARE) // per // SEQ_ROUND * SEQ_ROUND)


def layout_for(train_cfg, device_type: str, model_config=None, elem_bytes: int = 4,
               free_bytes: int | None = None) -> Layout:
    """The layout `train` asks for on `device_type`: `packing` "auto" is tokens on CUDA, rows elsewhere;
    `max_rows_per_batch` and `max_tokens_per_pass`, when set, override what the device would choose."""
    mode = train_cfg.packing
    tokens = device_type == "cuda" if mode == "auto" else mode == "tokens"
    max_rows = train_cfg.max_rows_per_batch
    max_tokens = train_cfg.max_tokens_per_pass
    if not tokens:
        return Layout(False, max_rows or ROWS_PER_PASS_CPU, max_tokens)
    if max_tokens is None and free_bytes is not None and model_config is not None:
        max_tokens = tokens_per_pass(model_config, elem_bytes, free_bytes)
    return Layout(True, max_rows, max_tokens)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in bins of at most `capacity` (an item longer than it gets a bin of its own):
    longest first, each into the first bin it fits. Deterministic (ties keep input order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@dataclass
class StepPlan:
    """One optimizer step: passes, each a list of sequences, each a list of item indices (rows in the
    order they are laid out), and the width every sequence of the pass is padded to."""

    passes: list[list[list[int]]]
    widths: list[int]

    def computed_tokens(self) -> int:
        return sum(len(p) * w for p, w in zip(self.passes, self.widths))


def plan_step(lengths: list[int], layout: Layout) -> StepPlan:
    """Passes for one step's rows (their token lengths), in the layout's way. Rows layout: rows in their
    given order, each its own sequence, a pass padded to its longest row. Tokens layout: sequences of one
    width (`sequence_length`, rounded: few shapes per run for a compiler or CUDA graph)."""
    if not lengths:
        return StepPlan([], [])
    if layout.tokens:
        cap = max(layout.seq_len or sequence_length(lengths), max(lengths))
        seqs = first_fit_decreasing(lengths, cap)
        width = lambda pass_seqs: cap  # noqa: E731
    else:
        seqs = [[i] for i in range(len(lengths))]
        width = lambda pass_seqs: max(lengths[s[0]] for s in pass_seqs)  # noqa: E731
    passes: list[list[list[int]]] = [[]]
    for seq in seqs:
        trial = passes[-1] + [seq]
        too_many = layout.max_rows is not None and sum(map(len, trial)) > layout.max_rows
        too_big = layout.max_tokens is not None and len(trial) * width(trial) > layout.max_tokens
        if passes[-1] and (too_many or too_big):
            passes.append([seq])
        else:
            passes[-1] = trial
    return StepPlan(passes, [width(p) for p in passes])


def group_jobs(keys: list[tuple], batches: list[int], layout: Layout, concurrent: bool = True) -> list[list[int]]:
    """Packs of job indices trained together (one optimizer, one row mix per step): jobs of one (steps, lr)
    key; rows layout: at most `max_rows` rows per step (one pass per step, as the engine always did);
    tokens layout: up to `max_jobs` jobs (their passes come from the token budget)."""
    if not concurrent:
        return [[i] for i in range(len(keys))]
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    packs = []
    for members in groups.values():
        current, rows = [], 0
        for i in members:
            full = (len(current) >= layout.max_jobs if layout.tokens
                    else rows + batches[i] > (layout.max_rows or ROWS_PER_PASS_CPU))
            if current and full:
                packs.append(current)
                current, rows = [], 0
            current.append(i)
            rows += batches[i]
        packs.append(current)
    return sorted(packs)
