"""What checkpointing costs: the seconds each checkpoint takes (the method's server state, every client's
store, the driver's bookkeeping, fsynced and renamed) against the round it follows, and the checkpoint's
size. FedRouter, dual scenario, 8 clients, on the configs/fedrouter-dual.toml settings but a short budget.

    python benchmarks/checkpoint_cost.py                         # SmolLM2-135M (the target: under 3%)
    python benchmarks/checkpoint_cost.py --model tiny            # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--method", default="fedrouter")
    args = ap.parse_args()

    from taskfed.config import load_config
    from taskfed.run import Experiment

    cfg = load_config(ROOT / "configs" / "fedrouter-dual.toml",
                      [f"model.name={args.model}", f"method.name={args.method}", f"train.rounds={args.rounds}",
                       f"train.steps={args.steps}", f"train.batch={args.batch}", "data.max_length=128",
                       "data.max_train_per_task=24", "eval.max_rows_per_task=1", "eval.max_new_tokens=4",
                       "eval.modes=[\"local\"]"] + (["method.n_global=8"] if args.method == "fedrouter" else []))
    with tempfile.TemporaryDirectory() as tmp:
        ex = Experiment(cfg)
        times: list[float] = []
        write = ex.checkpoint

        def timed(step, label):  # each checkpoint's own time, and its size on disk
            tic = time.perf_counter()
            write(step, label)
            times.append(time.perf_counter() - tic)
            last = ex.ckpts.steps()[-1]
            sizes.append(sum(p.stat().st_size for p in last.iterdir()))

        sizes: list[int] = []
        ex.checkpoint = timed
        metrics = ex.run(Path(tmp) / "run")
    rounds = [r["seconds"] for r in metrics["rounds"]]
    per_round = times[1:1 + len(rounds)]  # step 0 is setup's, the last ones the evaluation's
    ratio = statistics.mean(c / r for c, r in zip(per_round, rounds))
    print(f"config: {args.model}, {args.method}, dual, {cfg.scenario.n_clients} clients, {args.rounds} rounds x "
          f"{args.steps} steps x batch {args.batch}; {os.cpu_count()} CPUs")
    print(f"round seconds: {', '.join(f'{r:.2f}' for r in rounds)}")
    print(f"checkpoint seconds after each round: {', '.join(f'{c:.3f}' for c in per_round)} "
          f"(setup's {times[0]:.3f}); size {statistics.mean(sizes[1:1 + len(rounds)]) / 1e6:.1f} MB")
    print(f"checkpoint / round: {100 * ratio:.2f}% (target under 3%)")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
