"""What FedDPA's instance-wise weighting adds to an evaluation (FedDPA issue: < 25%).

    python benchmarks/feddpa_overhead.py [--model smollm2] [--eval-rows 5]

FedDPA-F is trained once on the FLAN single scenario (8 clients, one task each; a small budget: the
weights' cost does not depend on how well the adapters are trained). Then the same trained state is
evaluated (modes local and global, P and TTP) under each weighting setting, each from empty caches:
- fixed: 0.5 / 0.5, no similarity to compute (the reference point);
- local, references per_input (the paper and the official script: K = 5 references drawn per input);
- local, references per_client (one seeded draw of K per client, shared by its inputs).
Printed: evaluation seconds, the time spent computing the weights, and the overhead against fixed (the mean
of a fixed evaluation before and one after the others).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from taskfed.config import load_config  # noqa: E402
from taskfed.run import Experiment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--eval-rows", type=int, default=5, help="test rows per task")
    ap.add_argument("--rows", type=int, default=300, help="training rows per task (300: all of FLAN dataset1)")
    ap.add_argument("--tasks", type=int, default=8, help="the first N FLAN tasks, one client each")
    args = ap.parse_args()
    tasks = ["snli", "trec", "fix_punct", "web_nlg_en", "cola", "glue_qqp", "wic", "definite_pronoun_resolution"]
    cfg = load_config(None, [
        "method.name=feddpa-f", f"model.name={args.model}", "scenario.name=single", f"scenario.n_clients={args.tasks}",
        f"data.tasks={tasks[:args.tasks]!r}",
        f"data.path={ROOT.parent / 'shared/data/flan-feddpa/dataset1'}", "data.template=plain",
        "data.max_length=192", f"data.max_train_per_task={args.rows}", "train.rounds=1", "train.steps=2",
        "train.batch=8", f"eval.max_rows_per_task={args.eval_rows}", "eval.max_new_tokens=32",
        "eval.batch_size=24", "eval.modes=['local', 'global']"])
    exp = Experiment(cfg)
    tic = time.perf_counter()
    exp.train()
    print(f"trained FedDPA-F ({len(exp.clients)} clients) in {time.perf_counter() - tic:.0f} s")
    method = exp.engine.client_side  # the weighting runs on the clients' side of the method
    settings = [("fixed", {"weighting": "fixed"}),
                ("local, per_input references", {"weighting": "local", "references": "per_input"}),
                ("local, per_client references", {"weighting": "local", "references": "per_client"}),
                # fixed once more at the end: its mean with the first is the reference, so that a drift in
                # the machine's load during the run does not count as overhead
                ("fixed (again)", {"weighting": "fixed"})]
    weighting_s: list[float] = []
    real = method.local_weights

    def timed(client, records, rt):  # noqa: ANN001
        tic = time.perf_counter()
        out = real(client, records, rt)
        weighting_s.append(time.perf_counter() - tic)
        return out

    method.local_weights = timed
    results = []
    for label, change in settings:
        method.params = method.params.model_copy(update=change)
        for client in exp.clients.values():
            client.scratch.clear()
        exp.engine.gen_cache.clear()
        weighting_s.clear()
        tic = time.perf_counter()
        ev = exp.evaluate()
        total = time.perf_counter() - tic
        results.append((label, total, sum(weighting_s), {m: e["score"] for m, e in ev.items()}))
    base = (results[0][1] + results[-1][1]) / 2
    n_rows = sum(len(v) for v in exp.test_by_task.values())
    print(f"evaluation of {len(exp.clients)} clients, local + global modes, {n_rows} test rows "
          f"({args.eval_rows} per task), model {args.model}")
    print("| weighting | eval seconds | computing the weights | overhead vs fixed | P (local) | TTP (global) |")
    print("|---|---|---|---|---|---|")
    for label, total, w, scores in results:
        print(f"| {label} | {total:.1f} | {w:.1f} | {total / base - 1:+.1%} | {scores['local']:.4f} | "
              f"{scores['global']:.4f} |")


if __name__ == "__main__":
    main()
