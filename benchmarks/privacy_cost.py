"""What private centroids cost (privacy.centroids): router accuracy and mean ROUGE-1 against epsilon.

    python benchmarks/privacy_cost.py [--epsilons 1,4,8] [--rows 64 --eval-rows 3 --rounds 2 --steps 2]
                                      [--clip 30] [--out docs/privacy_cost]

FLAN dual (benchmarks/fedrouter_embedding.py's setting: the 8 FedDPA dataset1 tasks, 8 clients, plain
template), SmolLM2-135M on the CPU, seed 0, delta 1e-5, for FedRouter (`embed_layers = 4`, global router)
and FL-TAC (`known_tasks = "router"`, so every test input goes through its router): per epsilon and without
privacy ("off") one small run (`--rounds` x `--steps` x batch 4, global mode, `--eval-rows` test rows per
task). Router accuracy is each method's own eval_report figure. Only the centroids are private here
(`privacy.updates` off): the cost measured is that of the noisy centroid release. `--clip` is the radius
the embeddings are clipped to: it must be chosen without looking at private data; the default is a round
number above the typical norm of SmolLM2's final-normed states (the script prints the quantiles it saw on
the training rows, for the record). Writes OUT.json and OUT.png (figures.privacy_cost) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from taskfed.bench import figures  # noqa: E402
from taskfed.config import load_config  # noqa: E402
from taskfed.run import Experiment  # noqa: E402


def score(point: dict) -> str:
    return "-" if point["score"] is None else f"{point['score']:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epsilons", default="1,4,8")
    ap.add_argument("--rows", type=int, default=64, help="training rows per task")
    ap.add_argument("--eval-rows", type=int, default=3, help="test rows per task")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--clip", type=float, default=30.0)
    ap.add_argument("--methods", default="fedrouter,fltac")
    ap.add_argument("--out", default=str(ROOT / "docs" / "privacy_cost"))
    ap.add_argument("--no-generate", action="store_true", help="router accuracy only: train, route the global-mode "
                    "test inputs on the client side, no generation (no ROUGE)")
    args = ap.parse_args()
    epsilons = [float(e) for e in args.epsilons.split(",")]
    base = ["model.name=smollm2", "scenario.name=dual", "scenario.n_clients=8",
            f"data.path={ROOT.parent / 'shared/data/flan-feddpa/dataset1'}", "data.template=plain",
            "data.max_length=160", f"data.max_train_per_task={args.rows}", f"eval.max_rows_per_task={args.eval_rows}",
            "eval.modes=['global']", "eval.max_new_tokens=12", "eval.batch_size=32", f"train.rounds={args.rounds}",
            f"train.steps={args.steps}", "train.batch=4", "train.lr_max=1e-3", "train.lr_min=1e-4", "seed=0"]
    methods = {"fedrouter": ["method.name=fedrouter", "method.embed_layers=4"],
               "fltac": ["method.name=fltac", "method.known_tasks=router"]}
    rt, results = None, {}
    for name in args.methods.split(","):
        results[name] = []
        for eps in [None] + epsilons:
            extra = [] if eps is None else [f"privacy.centroids.clip={args.clip}", f"privacy.centroids.epsilon={eps}",
                                            "privacy.centroids.delta=1e-5"]
            cfg = load_config(None, base + methods[name] + extra)
            if rt is not None:
                rt.cfg = cfg  # the client side reads the run's config (privacy) from the runtime, as a bench does
            tic = time.perf_counter()
            exp = Experiment(cfg, rt=rt)
            rt = exp.rt
            if eps is None:  # the norms the clip is compared with (not used to choose it)
                layers = 4 if name == "fedrouter" else None
                texts = [r.instruction for c in exp.clients.values() for r in c.records]
                norms = np.linalg.norm(rt.embed(texts, layers=layers).double().numpy(), axis=1)
                print(f"{name}: embedding norms p5/p50/p95/max {np.percentile(norms, 5):.1f} / "
                      f"{np.median(norms):.1f} / {np.percentile(norms, 95):.1f} / {norms.max():.1f}", flush=True)
            if args.no_generate:
                exp.train()
                from benchmarks.fedrouter_embedding import routed

                ev = exp.method.eval_report("global", routed(exp, "global")) | {"score": None}
                m = exp.metrics([], 0, {})
            else:
                m = exp.run()
                ev = m["eval"]["global"]
            point = {"epsilon": eps, "router_accuracy": ev.get("router_accuracy"), "score": ev["score"],
                     "noise_multiplier": m.get("privacy", {}).get("centroids", {}).get("noise_multiplier"),
                     "epsilon_spent": m.get("privacy", {}).get("centroids", {}).get("epsilon"),
                     "seconds": time.perf_counter() - tic}
            results[name].append(point)
            print(f"{name} epsilon {'off' if eps is None else f'{eps:g}'}: router accuracy {point['router_accuracy']:.3f}, "
                  f"ROUGE-1 {score(point)} ({point['seconds']:.0f} s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    figures.privacy_cost(out.with_suffix(".png"), "FLAN dual, SmolLM2: private centroids (delta 1e-5)",
                         {n: [(float("inf") if p["epsilon"] is None else p["epsilon"], p["router_accuracy"], p["score"])
                              for p in pts] for n, pts in results.items()})
    print("\n| method | epsilon | noise multiplier | router accuracy | mean ROUGE-1 (global) |\n|---|---|---|---|---|")
    for n, pts in results.items():
        off = pts[0]["router_accuracy"]
        for p in pts:
            e = "off" if p["epsilon"] is None else f"{p['epsilon']:g}"
            z = "-" if p["noise_multiplier"] is None else f"{p['noise_multiplier']:.3f}"
            print(f"| {n} | {e} | {z} | {p['router_accuracy']:.3f} | {score(p)} |")
        ok = [p["epsilon"] for p in pts[1:] if p["router_accuracy"] >= off - 0.05]
        print(f"{n}: smallest epsilon with router accuracy within 5 points of off: {min(ok) if ok else 'none'}")


if __name__ == "__main__":
    main()
