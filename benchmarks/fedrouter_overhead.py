"""What FedRouter's embedding and routing add to a round and to an evaluation (FedRouter issue: < 10%).

    python benchmarks/fedrouter_overhead.py [--model smollm2] [--steps 10 --batch 16 --rounds 25] [--embed-layers L]

On the FLAN dual scenario, for one client:
- training side: embedding all its training instructions (once per run: `Runtime.embed` caches them)
  against one round of its local training at the given budget; printed per round of the run
  (embedding / rounds) and as a share of the first round;
- evaluation side: routing its global-mode inputs (embedding them, nearest global centroid) against
  generating their answers.
`--embed-layers L` sets `method.embed_layers` (embed(x) from the first L decoder layers only); default: all
layers, methods.md's embed(x).
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
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--rows", type=int, default=300, help="training rows per task")
    ap.add_argument("--eval-rows", type=int, default=8, help="test rows per task")
    ap.add_argument("--embed-layers", type=int, default=None,
                    help="method.embed_layers: embed with the first L decoder layers (default: all)")
    args = ap.parse_args()
    depth = [] if args.embed_layers is None else [f"method.embed_layers={args.embed_layers}"]
    cfg = load_config(None, [
        "method.name=fedrouter", f"model.name={args.model}", "scenario.name=dual", "scenario.n_clients=8",
        f"data.path={ROOT.parent / 'shared/data/flan-feddpa/dataset1'}", "data.template=plain",
        "data.max_length=192", f"data.max_train_per_task={args.rows}", f"train.rounds={args.rounds}",
        f"train.steps={args.steps}", f"train.batch={args.batch}", f"eval.max_rows_per_task={args.eval_rows}",
        "eval.max_new_tokens=32", "eval.batch_size=24", "eval.modes=['global']", *depth])
    exp = Experiment(cfg)
    rt, method = exp.rt, exp.method
    only = {"0": exp.clients["0"]}
    exp.engine.clients = only  # one client: its setup (embedding + local KMeans) and its first round

    tic = time.perf_counter()
    upload = method.setup_client(only["0"], rt)
    setup = time.perf_counter() - tic
    # The server's global clustering needs every client's centroids: the others' come from the same cache.
    uploads = {cid: method.setup_client(c, rt) for cid, c in exp.clients.items() if cid != "0"}
    uploads["0"] = upload
    method.setup_server(uploads)
    tic = time.perf_counter()
    exp.engine.run(0, method.plan(0, ["0"]))
    round_s = time.perf_counter() - tic
    n = len(only["0"].records)
    layers = rt.n_layers if args.embed_layers is None else args.embed_layers
    print(f"embedding depth: {layers} of {rt.n_layers} decoder layers"
          f"{' (default: methods.md embed(x))' if args.embed_layers is None else ' (method.embed_layers)'}")
    print(f"training: client 0 embeds and clusters its {n} rows in {setup:.1f} s once; one round "
          f"({args.steps} x {args.batch}) takes {round_s:.1f} s")
    print(f"  share of one round: {setup / round_s:.1%}; per round over {args.rounds} rounds: "
          f"{setup / args.rounds / round_s:.1%} (target < 10%)")

    from taskfed.evaluation.evaluate import evaluate_mode

    rt._embedded.clear()  # the test inputs are embedded from scratch, as at a real evaluation
    client = exp.clients["0"]
    records = [r for t in exp.seen for r in exp.test_by_task[t]]
    tic = time.perf_counter()
    method.route(client, records, list(method.eval_adapters(client)), rt)
    route_s = time.perf_counter() - tic
    rt._embedded.clear()
    out = evaluate_mode(rt, method, {"0": client}, "global", exp.test_by_task, exp.max_new, exp.seen, [], {})
    print(f"evaluation: routing {len(records)} inputs {route_s:.1f} s; generating them "
          f"{out['generate_seconds']:.1f} s ({out['generated_tokens']} tokens); the whole evaluation "
          f"{out['generate_seconds'] + route_s:.1f} s")
    print(f"  routing / generation: {route_s / out['generate_seconds']:.1%} (target < 10%)")


if __name__ == "__main__":
    main()
