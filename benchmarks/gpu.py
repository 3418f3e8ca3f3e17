"""One GPU lease's worth of figures (issue 27): plain transformers + peft against taskfed, in ONE process.

    python benchmarks/gpu.py --device cpu --small            # the CPU check (tiny model, < 1 min, tests run it)
    python benchmarks/gpu.py --device cuda                   # SmolLM2, bf16, configs/fedrouter-dual.toml

and on the lent H200 (../shared/device/README.md; `bash ../shared/device/prepare.sh` once here first):

    run  command: bash .devkit/bin/setup.sh
         carry:   [".devkit/whl", ".devkit/m1", ".devkit/bin", ".devkit/data"]
    run  command: bash .devkit/bin/go.sh python benchmarks/gpu.py --device cuda
         carry:   [".devkit/m2", ".devkit/bin"]

Every figure is printed the moment it exists, one JSON line `{"variant": V, "figure": F, "value": X}` (flushed,
and appended to $OUT/gpu.jsonl when OUT is set), so a lease cut short still returns what was measured. Phases
that would start after `--deadline` seconds from process start print `{"variant": V, "figure": "skipped",
"value": "deadline"}` instead (default 150 s: go.sh's one-off model conversion, ~45 s, comes before this
process, and a phase under way finishes). A fresh process costs 15-20 s on the device: nothing here starts one.

The round: configs/fedrouter-dual.toml's population (`Experiment(cfg, rt=rt).clients`: FLAN dataset1, dual
scenario, 8 clients), one job per client on all its rows, as the in-process engine resolves it (rows encoded
by `rt.encode`, the job's seed, round 0's learning rate): 8 clients x 10 steps x 16 rows (`--small`: 1 step,
so that the CPU check stays under a minute beside another test worker; the warm-up still runs 2). Every
variant draws each job's rows with `training.sample_order(len(rows), steps * batch, seed)`: all see the same
rows in the same order.
- `peft`: plain transformers + peft, the clients one after another (get_peft_model with the config's LoRA,
  AdamW, loss from `labels`, right-padded batches of the job's rows);
- `taskfed`: `taskfed run`'s round: packs from `packing.group_jobs`, `train_pack` with the device's layout
  (`training.layout_of` on CUDA; on the CPU the layout CUDA would plan on an H200's 139 GiB free, so the CPU
  runs taskfed's H200 round);
- `taskfed-rows`: the old default, `packing.Layout(False, 16, None)` (one row per sequence, 16 rows a pass:
  each job trains alone).
Per training variant: seconds_per_round, real_tokens_per_s, padded_tokens_per_s (tokens computed, padding
included), padding_share, passes_per_step, syncs_per_step and aten_ops_per_round (taskfed.opcount.OpCounter
over the warm-up round's steps after each pack's or client's first; aten_ops_per_round = ops per counted step
(also printed) x the round's optimizer steps, a pack's step counting once; on CUDA also device_syncs_per_step,
the syncs that read a GPU tensor), gpu_busy_share (torch.profiler: summed CUDA kernel time / wall time of one
more round; null on the CPU), peak_memory_mb (CUDA: max_memory_allocated after reset_peak_memory_stats, the
loaded models included; CPU: peak RSS above the RSS at the round's start, so memory an earlier phase freed but
the allocator kept is not counted again).
Warm-up, once per variant before timing: the round's first 2 steps (of the first job only where jobs train
one after another: its code and shapes are every job's). Then ratios: speedup_vs_peft, speedup_vs_rows,
aten_ops_vs_rows, aten_ops_vs_peft.

Then serving (`serve@16`: 16 concurrent mixed-adapter requests on the serving Decoder, as the batcher admits a
burst, against `serve@1`: the same requests one at a time) and generation at batch 64 and 256 (`--small`: 8
and 16): `plain-generate@B` (greedy `model.generate` of the peft model) against `taskfed-generate@B` (the
evaluation decoder, rows routed to 8 adapters): new_tokens_per_s of a steady call, and compile_seconds (first
call's time minus the steady call's). The base model is loaded once; peft trains its own deep copy (the
adapter bank wraps the Runtime's layers in place).
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the deadline counts from here, before the heavy imports (15-20 s on the device)

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLAN = ROOT.parent / "shared" / "data" / "flan-feddpa" / "dataset1"
CONFIG = ROOT / "configs" / "fedrouter-dual.toml"
H200_FREE = 139 * 2**30
N_ADAPTERS = 8  # generation and serving route rows round-robin over this many adapters
TRAIN_VARIANTS = ("peft", "taskfed", "taskfed-rows")


# ----------------------------------------------------------------- output
class Out:
    """Prints each figure as one JSON line at once (flushed) and appends it to $OUT/gpu.jsonl; keeps them."""

    def __init__(self):
        self.path = Path(os.environ["OUT"]) / "gpu.jsonl" if os.environ.get("OUT") else None
        self.figures: dict[tuple[str, str], object] = {}

    def __call__(self, variant: str, figure: str, value) -> None:
        value = _plain(value)
        self.figures[(variant, figure)] = value
        line = json.dumps({"variant": variant, "figure": figure, "value": value})
        print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(line + "\n")

    def get(self, variant: str, figure: str):
        return self.figures.get((variant, figure))


def _plain(value):
    """Floats to 4 significant digits; NaN and infinities (JSON has none) to null."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else float(f"{value:.4g}")
    return value


def _ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


# ----------------------------------------------------------------- measuring
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class Peak:
    """Peak memory of a block: CUDA max_memory_allocated (reset first); CPU peak RSS above the RSS at the start
    (the kernel's peak mark reset through /proc/self/clear_refs; without it, ru_maxrss's growth)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self) -> "Peak":
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.rss0 = _rss_mb("VmRSS")
        self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20
        elif self.reset:
            self.mb = max(0.0, _rss_mb("VmHWM") - self.rss0)
        else:
            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.maxrss0


def timed(device, fn):
    """(fn's result, its wall seconds), the device's queue drained before and after."""
    sync(device)
    tic = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - tic


def busy_share(device, fn) -> float | None:
    """Summed CUDA kernel time over the wall time of fn(), under torch.profiler (CUDA activity only: no CPU
    op events, which would slow the host side down); None on the CPU."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _, wall = timed(device, fn)
    kernel_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return kernel_us / 1e6 / wall


# ----------------------------------------------------------------- the workload (loaded once)
@dataclasses.dataclass
class Round:
    """What a round (or a warm-up) did: real tokens, tokens computed (padding included), optimizer steps (a
    pack's step counts once), and how many of those steps ran first in their pack or client (uncounted)."""

    tokens: int = 0
    computed: int = 0
    steps: int = 0
    passes: int = 0
    firsts: int = 0
    weights: list = dataclasses.field(default_factory=list)


class Bench:
    """The config, the base model (loaded once), the Runtime on it, peft's own copy, the round's specs."""

    def __init__(self, args, out: Out):
        import torch

        from taskfed.config import load_config
        from taskfed.model.loading import load_base
        from taskfed.run import Experiment
        from taskfed.runtime import DTYPES, Runtime

        tic = time.perf_counter()
        self.args = args
        self.cfg = cfg = load_config(CONFIG, overrides(args))
        base, tok = load_base(cfg.model.name, dtype=DTYPES[cfg.model.dtype], device=cfg.model.device, seed=cfg.seed)
        peft_base = copy.deepcopy(base)  # the bank wraps the Runtime's layers in place: peft needs its own copy
        self.rt = Runtime(cfg, model=base, tokenizer=tok)
        self.device = self.rt.device
        self.exp = Experiment(cfg, rt=self.rt)
        self.specs = round_specs(self.exp)
        self.peft = PeftClients(peft_base, cfg, tok)
        self.adapters: list | None = None  # the taskfed round's trained adapters, once trained
        # Planned once, before anything trains: what the first round of `taskfed run` sees (the engine plans
        # each round from the free memory before it; a later plan here would see peft's cached blocks).
        self.taskfed_layout = self._layout()
        out("setup", "device", torch.cuda.get_device_name() if self.device.type == "cuda"
            else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
        out("setup", "model", f"{cfg.model.name} {cfg.model.dtype}")
        out("setup", "round", f"{len(self.specs)} clients x {cfg.train.steps} step(s) x {cfg.train.batch} rows, "
                              f"data.max_length {cfg.data.max_length}")
        out("setup", "taskfed_layout", dataclasses.asdict(self.taskfed_layout))
        out("setup", "load_seconds", time.perf_counter() - tic)

    def _layout(self):
        """taskfed's layout: the device's own on CUDA; on the CPU the one CUDA plans on an H200's free memory."""
        from taskfed import packing, training

        if self.device.type == "cuda":
            return training.layout_of(self.rt)
        elem = next(self.rt.model.parameters()).element_size()
        return packing.layout_for(self.cfg.train, "cuda", self.rt.model.config, elem, free_bytes=H200_FREE)

    def rows_layout(self):
        from taskfed import packing

        return packing.Layout(False, 16, None)  # the old default: one row per sequence, 16 rows a pass


def overrides(args) -> list[str]:
    """fedrouter-dual.toml as it is, on --device; --small: the tiny random model; --steps: fewer steps."""
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    out = [f"model.device={args.device}", f"model.dtype={dtype}", f"data.path={FLAN}"]
    if args.small:
        out += ["model.name=tiny", "model.dtype=float32", "data.max_length=256"]
    if args.steps:
        out.append(f"train.steps={args.steps}")
    return out


def round_specs(exp) -> list:
    """Round 0's jobs, one per client on all its rows, resolved by the in-process engine's own `_spec` (rows
    encoded by rt.encode, the job's seed, the round's learning rate): the TrainSpecs `taskfed run` trains."""
    from taskfed.methods.base import Job

    jobs = [Job(client=c, adapter="global", init=exp.init_adapter) for c in sorted(exp.clients)]
    return [exp.engine._spec(job, 0)[0] for job in jobs]


def warmup_specs(specs: list, jobs: int | None) -> list:
    """The round's first 2 steps (the same rows: sample_order's prefix), of the first `jobs` jobs (None: all)."""
    return [dataclasses.replace(s, steps=2) for s in specs[:jobs]]


# ----------------------------------------------------------------- the variants' rounds
class PeftClients:
    """Plain transformers + peft: one LoRA (the config's r, alpha, target modules), clients one after another,
    each from the same initial adapter with a fresh AdamW, loss from `labels` on right-padded batches."""

    def __init__(self, base, cfg, tok):
        import torch
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=list(cfg.lora.target_modules),
                          lora_dropout=0.0, task_type="CAUSAL_LM")
        self.model = get_peft_model(base, lora)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.init = [p.detach().clone() for p in self.params]
        self.pad_id, self.device = tok.pad_token_id, next(base.parameters()).device
        self.torch = torch

    def round(self, specs: list, counter=None) -> Round:
        out = Round()
        for spec in specs:
            self.client(spec, out, counter)
        return out

    def client(self, spec, out: Round, counter) -> None:
        from taskfed.training import collate, sample_order

        torch = self.torch
        with torch.no_grad():
            for p, p0 in zip(self.params, self.init):
                p.copy_(p0)
        opt = torch.optim.AdamW(self.params, lr=spec.lr, weight_decay=0.0)
        order = sample_order(len(spec.rows), spec.steps * spec.batch, spec.seed)
        batches = [[spec.rows[i] for i in order[s * spec.batch:(s + 1) * spec.batch]] for s in range(spec.steps)]
        # Collated on the host before the steps, as a data loader would: the counted ops are the step's own.
        collated = [collate(rows, self.pad_id, "cpu") for rows in batches]
        counting = False
        self.model.train()
        try:
            for step, (ids, mask, labels) in enumerate(collated):
                if step == 1 and counter is not None:  # the first step allocates: not counted (as train_pack)
                    counter.__enter__()
                    counting = True
                ids, mask, labels = (t.to(self.device) for t in (ids, mask, labels))
                self.model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        finally:
            if counting:
                counter.__exit__(None, None, None)
            self.model.eval()
        out.tokens += sum(len(r.ids) for rows in batches for r in rows)
        out.computed += sum(len(rows) * max(len(r.ids) for r in rows) for rows in batches)
        out.steps += spec.steps
        out.passes += spec.steps
        out.firsts += 1


def taskfed_round(rt, specs: list, layout, counter=None) -> Round:
    """The in-process engine's round: packs from group_jobs, each trained by train_pack on `layout`."""
    from taskfed import packing
    from taskfed.training import PackStats, train_pack

    stats = PackStats(counter=counter)
    packs = packing.group_jobs([(s.steps, s.lr) for s in specs], [s.batch for s in specs], layout)
    weights = []
    for pack in packs:
        weights += [w for w, _ in train_pack(rt, [specs[i] for i in pack], stats, layout)]
    return Round(stats.tokens, stats.computed, stats.steps, stats.passes, len(packs), weights)


def runner(b: Bench, variant: str):
    """variant -> fn(specs, counter) -> Round."""
    if variant == "peft":
        return b.peft.round
    layout = b.taskfed_layout if variant == "taskfed" else b.rows_layout()
    return lambda specs, counter=None: taskfed_round(b.rt, specs, layout, counter)


def device_sync_counter():
    """An OpCounter that also counts which of its syncs read a tensor off the GPU (`device_syncs`): on CUDA,
    `.item()` of a CPU tensor (torch's non-fused AdamW reads its CPU step counts so) counts as a sync but waits
    for nothing."""
    import torch

    from taskfed.opcount import OpCounter

    class DeviceSyncCounter(OpCounter):
        def __init__(self):
            super().__init__()
            self.device_syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = self.syncs
            result = super().__torch_dispatch__(func, types, args, kwargs)
            if self.syncs > before and any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in _flat(args)):
                self.device_syncs += 1
            return result

    return DeviceSyncCounter()


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


def train_phase(b: Bench, out: Out, variant: str) -> None:
    run = runner(b, variant)
    counter = device_sync_counter()
    warm = run(warmup_specs(b.specs, None if variant == "taskfed" else 1), counter)
    counted = warm.steps - warm.firsts
    with Peak(b.device) as peak:
        rnd, seconds = timed(b.device, lambda: run(b.specs))
    out(variant, "seconds_per_round", seconds)
    out(variant, "real_tokens_per_s", rnd.tokens / seconds)
    out(variant, "padded_tokens_per_s", rnd.computed / seconds)
    out(variant, "padding_share", 1 - rnd.tokens / rnd.computed)
    out(variant, "passes_per_step", rnd.passes / rnd.steps)
    out(variant, "syncs_per_step", counter.syncs / counted)
    if b.device.type == "cuda":
        out(variant, "device_syncs_per_step", counter.device_syncs / counted)
    out(variant, "aten_ops_per_step", counter.ops / counted)
    out(variant, "aten_ops_per_round", round(counter.ops / counted * rnd.steps))
    out(variant, "peak_memory_mb", peak.mb)
    if counter.syncs:
        out(variant, "sync_ops", dict(counter.sync_names))
    try:
        out(variant, "gpu_busy_share", busy_share(b.device, lambda: run(b.specs)))
    except Exception as exc:  # a profiler failure loses this figure only
        out(variant, "gpu_busy_share", None)
        out(variant, "error", f"gpu_busy_share: {type(exc).__name__}: {exc}")
    if variant == "taskfed":
        b.adapters = rnd.weights[:N_ADAPTERS]


def ratios(out: Out) -> None:
    seconds = {v: out.get(v, "seconds_per_round") for v in TRAIN_VARIANTS}
    ops = {v: out.get(v, "aten_ops_per_round") for v in TRAIN_VARIANTS}
    for v, base in (("taskfed", "peft"), ("taskfed", "taskfed-rows"), ("taskfed-rows", "peft")):
        name = "peft" if base == "peft" else "rows"
        if seconds[v] is not None and seconds[base] is not None:
            out(v, f"speedup_vs_{name}", _ratio(seconds[base], seconds[v]))
        if ops[v] is not None and ops[base] is not None:
            out(v, f"aten_ops_vs_{name}", _ratio(ops[v], ops[base]))


# ----------------------------------------------------------------- decoding
def workload(b: Bench, n: int) -> tuple[list[list[int]], list[int], int]:
    """n test prompts round-robin over the seen tasks (neighbours on different adapters), their adapter slot,
    and the batch's token budget: its tasks' longest answer (engine.budgets), at most --max-new."""
    from taskfed.evaluation.generate import prompt_ids

    tasks = sorted(b.exp.seen)
    budgets = b.exp.engine.budgets()
    rows = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        test = b.exp.test_by_task[task]
        rows.append((task, test[(i // len(tasks)) % len(test)]))
    budget = min(max(budgets[t] for t, _ in rows), b.args.max_new)
    return [prompt_ids(b.rt, r.instruction, budget) for _, r in rows], [i % N_ADAPTERS for i in range(n)], budget


def load_adapters(b: Bench) -> None:
    """The taskfed round's adapters in slots 0..7 (random non-zero ones if that round did not run)."""
    import torch

    adapters = b.adapters
    if not adapters:
        g = torch.Generator().manual_seed(0)
        adapters = [{k: v if k.endswith("lora_A") else torch.randn(v.shape, generator=g) * 0.01
                     for k, v in b.rt.init_adapter().items()} for _ in range(N_ADAPTERS)]
    b.rt.load_slots(adapters)


def count_new(new, eos: int) -> int:
    """Tokens generated per row up to and including its first EOS, summed."""
    return sum(row.index(eos) + 1 if eos in row else len(row) for row in new.tolist())


def plain_generate(b: Bench, prompts: list[list[int]], budget: int) -> int:
    import torch

    from taskfed.evaluation.generate import left_pad

    tok = b.rt.tokenizer
    ids, mask = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        out = b.peft.model.generate(input_ids=ids.to(b.device), attention_mask=mask.to(b.device), do_sample=False,
                                    num_beams=1, max_new_tokens=budget, pad_token_id=tok.pad_token_id,
                                    eos_token_id=tok.eos_token_id)
    return count_new(out[:, ids.shape[1]:].cpu(), tok.eos_token_id)


def taskfed_generate(b: Bench, prompts: list[list[int]], slots: list[int], budget: int) -> int:
    from taskfed.evaluation.generate import generate
    from taskfed.model.bank import RowMix

    return generate(b.rt, prompts, RowMix.one_hot(slots), budget)[1]


def generate_phase(b: Bench, out: Out, batch: int) -> None:
    """Each decoder twice on the same batch: the first call compiles (CUDA static cache) or warms up, the
    second is the steady one."""
    prompts, slots, budget = workload(b, batch)
    load_adapters(b)
    for variant, fn in ((f"plain-generate@{batch}", lambda: plain_generate(b, prompts, budget)),
                        (f"taskfed-generate@{batch}", lambda: taskfed_generate(b, prompts, slots, budget))):
        _, first = timed(b.device, fn)
        tokens, steady = timed(b.device, fn)
        out(variant, "new_tokens_per_s", tokens / steady)
        out(variant, "compile_seconds", first - steady)
        out(variant, "new_tokens", tokens)
    out(f"taskfed-generate@{batch}", "speedup_vs_plain",
        _ratio(out.get(f"taskfed-generate@{batch}", "new_tokens_per_s"), out.get(f"plain-generate@{batch}", "new_tokens_per_s")))


def serve_mix(n: int):
    """Mixed-adapter requests: request i on adapter i % 8; every odd one blends in a second adapter (0.6/0.4)."""
    import torch

    from taskfed.model.bank import RowMix

    idx = torch.tensor([[i % N_ADAPTERS, (i + 3) % N_ADAPTERS] for i in range(n)])
    w = torch.tensor([[1.0, 0.0] if i % 2 == 0 else [0.6, 0.4] for i in range(n)])
    return RowMix(idx, w)


def serve_decode(rt, prompts: list[list[int]], mix, budget: int) -> int:
    """The batcher's turns without its thread: a burst admitted together, then a step per turn for every live
    row; a row leaves at EOS or at its budget. Returns the tokens emitted."""
    from taskfed.evaluation.generate import Decoder

    eos = rt.tokenizer.eos_token_id
    dec = Decoder(rt)
    tokens = dec.admit(prompts, mix)
    n_out = [0] * len(prompts)
    live = list(range(len(prompts)))
    total = 0
    while live:
        keep = []
        for pos, (row, tok) in enumerate(zip(live, tokens)):
            n_out[row] += 1
            total += 1
            if tok != eos and n_out[row] < budget:
                keep.append(pos)
        dec.keep(keep)
        live = [live[i] for i in keep]
        if live:
            tokens = dec.step()
    return total


def serve_phase(b: Bench, out: Out, n: int = 16) -> None:
    import torch

    prompts, _, budget = workload(b, n)
    mix = serve_mix(n)
    load_adapters(b)
    serve_decode(b.rt, prompts[:2], mix.select(torch.arange(2)), 2)  # warm-up
    together, t_together = timed(b.device, lambda: serve_decode(b.rt, prompts, mix, budget))
    alone, t_alone = timed(b.device, lambda: sum(serve_decode(b.rt, [p], mix.select(torch.tensor([i])), budget)
                                                for i, p in enumerate(prompts)))
    out(f"serve@{n}", "new_tokens_per_s", together / t_together)
    out("serve@1", "new_tokens_per_s", alone / t_alone)
    out(f"serve@{n}", "speedup_vs_one_at_a_time", _ratio(together / t_together, alone / t_alone))


# ----------------------------------------------------------------- main
def phases(args) -> list[tuple[list[str], object]]:
    """(variants it prints, fn(bench, out)), in the order they run: training first (the issue's point), its
    ratios (no variant of their own: nothing to skip, they print what exists), then serving (cheap), then
    generation (the CUDA decoder compiles per shape: the longest to wait for)."""
    out = [([v], lambda b, o, v=v: train_phase(b, o, v)) for v in TRAIN_VARIANTS]
    out.append(([], lambda b, o: ratios(o)))
    out.append(([f"serve@{args.serve}", "serve@1"], lambda b, o: serve_phase(b, o, args.serve)))
    for n in args.gen_batches:
        out.append(([f"plain-generate@{n}", f"taskfed-generate@{n}"], lambda b, o, n=n: generate_phase(b, o, n)))
    return out


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny random model, 1 step, generation at batch 8 and 16")
    ap.add_argument("--steps", type=int, help="steps per job (default: the config's 10; --small: 1)")
    ap.add_argument("--gen-batches", type=int, nargs="+", help="generation batch sizes (default 64 256; --small 8 16)")
    ap.add_argument("--max-new", type=int, help="cap on generated tokens per row (default 64; --small 16)")
    ap.add_argument("--serve", type=int, default=16, help="concurrent serving requests (default 16)")
    ap.add_argument("--deadline", type=float, default=150.0,
                    help="seconds from process start after which phases not yet started are skipped (default 150: "
                         "with the ~45 s model conversion and the process start, the lease's 240 s)")
    args = ap.parse_args(argv)
    if args.small:
        args.steps = args.steps or 1  # 2 CPU cores: the round of 8 jobs x 16 rows, one step long (< 1 min)
    args.gen_batches = args.gen_batches or ([8, 16] if args.small else [64, 256])
    args.max_new = args.max_new or (16 if args.small else 64)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    out = Out()
    bench = None
    for variants, fn in phases(args):
        if variants and time.monotonic() - T0 > args.deadline:
            for v in variants:
                out(v, "skipped", "deadline")
            continue
        if variants and bench is None:  # loaded by the first phase that runs (none runs: nothing is loaded)
            bench = Bench(args, out)
        fn(bench, out)
    out("all", "wall_seconds", time.monotonic() - T0)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
