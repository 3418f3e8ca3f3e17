"""Engine benchmark (foundation issue): memory against client count, engine overhead, tokens per second.

    python benchmarks/engine.py --model tiny
    python benchmarks/engine.py --model smollm2

Prints:
- peak resident memory of a FedAvg run with 4 and with 64 clients (each in its own process), and the ratio
  (the base model is loaded once per run, so the ratio should stay within 1.10);
- engine overhead: the share of a round's wall time outside forward, backward and optimizer steps;
- training tokens per second, and evaluation (generation) new tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(model: str, n_clients: int, steps: int, batch: int, rounds: int, eval_rows: int,
            pack_rows: int = 64, max_length: int = 192) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from taskfed.config import load_config
    from taskfed.run import run_experiment

    cfg = load_config(None, [
        "method.name=fedavg", f"model.name={model}", "scenario.name=iid", f"scenario.n_clients={n_clients}",
        f"data.path={ROOT.parent / 'shared/data/flan-feddpa/dataset1'}", "data.template=plain", f"data.max_length={max_length}",
        f"train.rounds={rounds}", f"train.steps={steps}", f"train.batch={batch}", "eval.modes=['global']",
        f"train.max_rows_per_batch={pack_rows}",
        f"eval.max_rows_per_task={eval_rows}", "eval.max_new_tokens=16", "eval.batch_size=16"])
    m = run_experiment(cfg)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rounds_ = m["rounds"]
    ev = m["eval"]["global"]
    return {
        "peak_mb": peak_kb / 1024,
        "round_seconds": sum(r["seconds"] for r in rounds_),
        "compute_seconds": sum(r["compute_seconds"] for r in rounds_),
        "train_tokens": sum(r["train_tokens"] for r in rounds_),
        "generated_tokens": ev["generated_tokens"], "generate_seconds": ev["generate_seconds"],
        "eval_seconds": ev["seconds"],
    }


def in_subprocess(mmap_threshold: int = 0, **kw) -> dict:
    """One run in a fresh process; mmap_threshold > 0 sets TASKFED_MMAP_THRESHOLD (taskfed/memory.py)."""
    code = f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.engine import one_run; " \
           f"print('RESULT', json.dumps(one_run(**{kw!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, TOKENIZERS_PARALLELISM="false",
                                  TASKFED_MMAP_THRESHOLD=str(mmap_threshold)))
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--memory-only", action="store_true", help="only the 4 against 64 clients peak memory")
    args = ap.parse_args()
    print(f"model {args.model}, FedAvg, iid scenario, {args.steps} steps x {args.batch} rows per client and round")
    # Rows per forward pass are bounded by train.max_rows_per_batch (here: 4 clients' batches), so what
    # could grow with the client count is per-client state: model copies, optimizer state, data caches.
    # Rows are cut to 64 tokens so that every pack has the same width: otherwise the peak is set by the
    # longest rows a run happens to sample (more clients, more packs, a longer worst pack), not by state.
    # Two rounds, so that 4 clients train more than one pack too: with glibc's own heap the first pack of a
    # process is served by fresh mappings and peaks about 250 MB below every later one (its frees raise the
    # mmap threshold, and later packs fragment the brk heap), so one round of 4 clients (one pack) against
    # 64 (sixteen) would compare a cold heap with a warm one, not per-client state.
    # Each setting of the heap (taskfed/memory.py): glibc's own (the default), and a fixed 1 MiB mmap
    # threshold, which takes allocator fragmentation out of the peak and leaves what grows with clients.
    for threshold, label in ((0, "glibc heap (default)"), (1 << 20, "TASKFED_MMAP_THRESHOLD=1048576")):
        runs = {n: in_subprocess(mmap_threshold=threshold, model=args.model, n_clients=n, steps=args.steps,
                                 batch=args.batch, rounds=2, eval_rows=2, pack_rows=4 * args.batch, max_length=64)
                for n in (4, 64)}
        print(f"  {label}: peak RSS {runs[4]['peak_mb']:.0f} MB with 4 clients, {runs[64]['peak_mb']:.0f} MB with 64; "
              f"ratio {runs[64]['peak_mb'] / runs[4]['peak_mb']:.3f} (target <= 1.10)")
    if args.memory_only:
        return
    for threshold, label in ((0, "glibc heap (default)"), (1 << 20, "TASKFED_MMAP_THRESHOLD=1048576")):
        r = in_subprocess(mmap_threshold=threshold, model=args.model, n_clients=8, steps=args.steps,
                          batch=args.batch, rounds=2, eval_rows=8)
        print(f"  {label}, 8 clients x 2 rounds, packs of up to 64 rows x 192 tokens: peak RSS {r['peak_mb']:.0f} MB")
        report(r)


def report(r: dict) -> None:
    overhead = 1 - r["compute_seconds"] / r["round_seconds"]
    print(f"    {r['round_seconds']:.1f} s in rounds, {r['compute_seconds']:.1f} s forward/backward/step")
    print(f"    engine overhead: {overhead:.1%} of round time (target < 5%)")
    print(f"    training: {r['train_tokens'] / r['compute_seconds']:.0f} tokens/s (forward+backward+step), "
          f"{r['train_tokens'] / r['round_seconds']:.0f} tokens/s per round wall time")
    print(f"    evaluation: {r['generated_tokens'] / r['generate_seconds']:.1f} new tokens/s in generation, "
          f"{r['generated_tokens']} tokens in {r['eval_seconds']:.1f} s of evaluation")


if __name__ == "__main__":
    main()
