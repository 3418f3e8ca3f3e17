"""Throughput (issue 7): plain transformers + peft against taskfed, same model, data, LoRA and budget.

    python benchmarks/throughput.py --device cuda                  # the issue's sizes, bf16
    python benchmarks/throughput.py --device cpu --small           # CPU: scaled down (printed as such)

Baseline: one peft LoRA (get_peft_model, r=8 on q/v, no dropout), clients trained one after another
(adapter reset, fresh AdamW, loss from `labels`, i.e. fp32 logits at every position), generation with
transformers' greedy `generate` on the whole batch. taskfed: the clients' jobs packed in one batch on
the adapter bank (`train_pack`, response-only chunked loss), and `evaluation.generate` on rows routed to
8 different adapters. Both sides use the same encoded rows, the same per-client row order, the same
generation budget (the longest expected answer of the batch, capped).

Every measurement runs in its own process (peak memory is per process), after a short warm-up; on a
shared CPU the timings move with the load, so each is the best of --repeats runs, sides interleaved.
Printed: training tokens/s, seconds per federated round, generation new tokens/s per batch size, peak
memory (CUDA: max allocated; CPU: peak RSS above the loaded model), each with taskfed / peft as a ratio.
A round's peak memory differs by design (taskfed puts every client's rows in one batch), so memory is
also compared at one equal batch: a single step on all clients' rows at once, peft against taskfed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAN = ROOT.parent / "shared" / "data" / "flan-feddpa" / "dataset1"
LR = 5e-4


def _config(args):
    from taskfed.config import load_config

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    return load_config(None, [f"model.name={args.model}", f"model.device={args.device}", f"model.dtype={dtype}",
                              f"data.path={FLAN}", f"data.max_length={args.seq}", "lora.r=8", "lora.alpha=16",
                              "lora.target_modules=['q_proj', 'v_proj']"])


# ----------------------------------------------------------------- workload (encoded once, in the parent)
def build_workload(args, path: Path) -> None:
    """Per client (one FLAN task each) its encoded training rows; test prompts routed by task; budgets."""
    from taskfed.data.loaders import load_feddpa
    from taskfed.evaluation.generate import prompt_ids
    from taskfed.model.loading import load_base
    from taskfed.runtime import Runtime

    cfg = _config(args)
    model, tok = load_base(args.model)
    rt = Runtime(cfg, model=model, tokenizer=tok)
    train, test = load_feddpa(FLAN)
    tasks = sorted({r.task for r in train})[: args.clients]
    clients = []
    for t in tasks:
        rows = [rt.encode(r) for r in train if r.task == t]
        clients.append([[list(e.ids), e.n_prompt] for e in rows])
    by_task = {t: [r for r in test if r.task == t] for t in tasks}
    prompts, slots, budgets = [], [], []
    for i in range(max(args.gen_batches)):  # round-robin over tasks: neighbours use different adapters
        t = tasks[i % len(tasks)]
        r = by_task[t][(i // len(tasks)) % len(by_task[t])]
        budgets.append(min(args.max_new, rt.n_answer_tokens(r.output)))
        prompts.append(prompt_ids(rt, r.instruction, budgets[-1]))
        slots.append(i % len(tasks))
    path.write_text(json.dumps({"clients": clients, "prompts": prompts, "slots": slots, "budgets": budgets}))


# ----------------------------------------------------------------- one measured phase (in a child process)
class Meter:
    """Wall time (CUDA-synchronised) and peak memory from `start()` on."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_mb = torch.cuda.memory_allocated() / 2**20
        else:
            self.base_mb = _rss_mb("VmRSS")
            try:  # resets the kernel's peak-RSS mark (VmHWM), so the peak is this phase's own
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        self.tic = time.perf_counter()

    def stop(self) -> dict:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = _rss_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"seconds": time.perf_counter() - self.tic, "peak_mb": peak, "peak_above_model_mb": peak - self.base_mb}


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _peft_model(args):
    import torch
    from peft import LoraConfig, get_peft_model

    from taskfed.model.loading import load_base

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, tok = load_base(args.model, dtype=dtype, device=args.device)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tok


def _batches(rows, steps, batch, seed):
    from taskfed.runtime import Encoded
    from taskfed.training import sample_order

    order = sample_order(len(rows), steps * batch, seed)
    enc = [Encoded(tuple(ids), n) for ids, n in rows]
    return [[enc[i] for i in order[s * batch:(s + 1) * batch]] for s in range(steps)]


def train_peft(args, work, one_batch: bool = False) -> dict:
    import torch

    from taskfed.training import collate

    model, tok = _peft_model(args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    init = [p.detach().clone() for p in params]

    def client(rows, steps, seed, batch_rows=args.rows):
        with torch.no_grad():
            for p, p0 in zip(params, init):
                p.copy_(p0)
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        tokens = 0
        for batch in _batches(rows, steps, batch_rows, seed):
            ids, mask, labels = collate(batch, tok.pad_token_id, args.device)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(mask.sum())
        return [p.detach().to("cpu", copy=True) for p in params], tokens

    client(work["clients"][0], 1, 0)  # warm-up
    meter = Meter(args.device)
    meter.start()
    if one_batch:  # memory at the packed batch size: one step on all clients' rows at once
        tokens = client(sum(work["clients"], []), 1, 0, args.rows * len(work["clients"]))[1]
    else:
        tokens = sum(client(rows, args.steps, j)[1] for j, rows in enumerate(work["clients"]))
    return {**meter.stop(), "tokens": tokens}


def train_taskfed(args, work, one_batch: bool = False) -> dict:
    from taskfed.runtime import Encoded, Runtime
    from taskfed.training import PackStats, TrainSpec, train_pack

    rt = Runtime(_config(args))
    init = rt.init_adapter()

    def spec(rows, steps, seed):
        return TrainSpec(init=init, rows=[Encoded(tuple(i), n) for i, n in rows], steps=steps, batch=args.rows,
                         lr=LR, seed=seed)

    train_pack(rt, [spec(work["clients"][0], 1, 0)])  # warm-up
    meter = Meter(args.device)
    times = PackStats()
    meter.start()
    if one_batch:  # memory at the packed batch size, one job holding every client's rows
        one = spec(sum(work["clients"], []), 1, 0)
        one.batch = args.rows * len(work["clients"])
        train_pack(rt, [one], times)
    else:
        train_pack(rt, [spec(rows, args.steps, j) for j, rows in enumerate(work["clients"])], times)
    return {**meter.stop(), "tokens": times.tokens}


def gen_peft(args, work, batch: int) -> dict:
    import torch

    from taskfed.evaluation.generate import _trim, left_pad

    model, tok = _peft_model(args)
    with torch.no_grad():  # a non-zero adapter, as after training
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    model.eval()

    def run(prompts, budget):
        ids, mask = left_pad(prompts, tok.pad_token_id)
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(args.device), attention_mask=mask.to(args.device), do_sample=False,
                                 num_beams=1, max_new_tokens=budget, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        return sum(len(r) for r in _trim(out[:, ids.shape[1]:].cpu(), tok.eos_token_id))

    budget = max(work["budgets"][:batch])
    warm = batch if args.device == "cuda" else 4  # CUDA: compile / capture at the measured shapes first
    run(work["prompts"][:warm], budget)
    meter = Meter(args.device)
    meter.start()
    tokens = run(work["prompts"][:batch], budget)
    return {**meter.stop(), "tokens": tokens}


def gen_taskfed(args, work, batch: int, decoder: str = "fast") -> dict:
    import torch

    from taskfed.evaluation import generate as gen
    from taskfed.model.bank import RowMix
    from taskfed.runtime import Runtime

    rt = Runtime(_config(args))
    g = torch.Generator().manual_seed(0)
    adapters = []
    for _ in range(len(work["clients"])):
        w = rt.init_adapter()
        adapters.append({k: v if k.endswith("lora_A") else torch.randn(v.shape, generator=g) * 0.01 for k, v in w.items()})
    rt.load_slots(adapters)
    decode = {"fast": gen.fast_generate, "static": gen.static_generate}[decoder]

    def run(prompts, slots, budget):
        return sum(len(r) for r in decode(rt, prompts, RowMix.one_hot(slots), budget))

    budget = max(work["budgets"][:batch])
    warm = batch if args.device == "cuda" else 4  # CUDA: compile / capture at the measured shapes first
    run(work["prompts"][:warm], work["slots"][:warm], budget)
    meter = Meter(args.device)
    meter.start()
    tokens = run(work["prompts"][:batch], work["slots"][:batch], budget)
    return {**meter.stop(), "tokens": tokens}


def child(args) -> None:
    work = json.loads(Path(args.workload).read_text())
    kind, _, rest = args.phase.partition(":")
    if kind in ("train-peft", "step-peft"):
        out = train_peft(args, work, one_batch=kind == "step-peft")
    elif kind in ("train-taskfed", "step-taskfed"):
        out = train_taskfed(args, work, one_batch=kind == "step-taskfed")
    elif kind == "gen-peft":
        out = gen_peft(args, work, int(rest))
    else:  # gen-taskfed:<batch>[:static]
        batch, _, decoder = rest.partition(":")
        out = gen_taskfed(args, work, int(batch), decoder or "fast")
    print("RESULT", json.dumps(out))


# ----------------------------------------------------------------- parent: run phases, print ratios
def run_child(args, phase: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--workload", args.workload] + args.passthrough
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if out.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{out.stderr[-3000:]}")
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def best(args, phases: list[str]) -> dict[str, dict]:
    """Best (shortest) of --repeats runs per phase, the phases interleaved so that load shifts hit all."""
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        for p in phases:
            r = run_child(args, p)
            if p not in results or r["seconds"] < results[p]["seconds"]:
                results[p] = r
    return results


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--small", action="store_true", help="CPU scale: 8 clients x 2 steps x 2 rows x 96 tokens, "
                                                         "generation at batch 8 and 32, answers cut to 16 tokens")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--rows", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--gen-batches", type=int, nargs="+")
    ap.add_argument("--max-new", type=int)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--compare-decoders", action="store_true", help="also time the static-cache (CUDA) decoder")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    small = dict(steps=2, rows=2, seq=96, gen_batches=[8, 32], max_new=16)
    full = dict(steps=10, rows=16, seq=256, gen_batches=[64, 256], max_new=32)
    for k, v in (small if args.small else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.passthrough = ["--device", args.device, "--model", args.model, "--clients", str(args.clients),
                        "--steps", str(args.steps), "--rows", str(args.rows), "--seq", str(args.seq),
                        "--max-new", str(args.max_new), "--gen-batches", *map(str, args.gen_batches)]
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.phase:
        return child(args)
    import torch

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores " \
        f"(torch threads {torch.get_num_threads()})"
    scale = "SCALED DOWN for CPU (--small)" if args.small else "the issue's sizes"
    print(f"model {args.model} on {where}, {'bf16' if args.device == 'cuda' else 'fp32'}; {scale}")
    print(f"round: {args.clients} clients x {args.steps} steps x {args.rows} rows x {args.seq} tokens; "
          f"generation at batch {', '.join(map(str, args.gen_batches))}, answers up to {args.max_new} tokens; "
          f"best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        args.workload = str(Path(tmp) / "work.json")
        build_workload(args, Path(args.workload))
        phases = ["train-peft", "train-taskfed", "step-peft", "step-taskfed"]
        for b in args.gen_batches:
            phases += [f"gen-peft:{b}", f"gen-taskfed:{b}"] + ([f"gen-taskfed:{b}:static"] if args.compare_decoders else [])
        res = best(args, phases)
    mem = "max allocated" if args.device == "cuda" else "peak RSS above the loaded model"
    rows = []
    p, t = res["train-peft"], res["train-taskfed"]
    rows.append(("training tokens/s", p["tokens"] / p["seconds"], t["tokens"] / t["seconds"], True))
    rows.append(("seconds per federated round", p["seconds"], t["seconds"], False))
    rows.append((f"round peak memory MB ({mem})", p["peak_above_model_mb"], t["peak_above_model_mb"], False))
    p, t = res["step-peft"], res["step-taskfed"]
    rows.append((f"one step of {args.clients * args.rows} x {args.seq} rows: peak memory MB", p["peak_above_model_mb"],
                 t["peak_above_model_mb"], False))
    for b in args.gen_batches:
        p, t = res[f"gen-peft:{b}"], res[f"gen-taskfed:{b}"]
        rows.append((f"generation new tokens/s, batch {b}", p["tokens"] / p["seconds"], t["tokens"] / t["seconds"], True))
        rows.append((f"generation peak memory MB, batch {b}", p["peak_above_model_mb"], t["peak_above_model_mb"], False))
        if args.compare_decoders:
            s = res[f"gen-taskfed:{b}:static"]
            rows.append((f"  static-cache decoder, new tokens/s, batch {b}", p["tokens"] / p["seconds"],
                         s["tokens"] / s["seconds"], True))
    print(f"{'':58} {'peft':>10} {'taskfed':>10} {'taskfed/peft':>13}")
    for name, a, b, higher_better in rows:
        ratio = b / a if a else float("nan")
        print(f"{name:58} {a:10.1f} {b:10.1f} {ratio:12.2f}x" + ("" if higher_better else "  (lower is better)"))
    print("RAW", json.dumps(res))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
