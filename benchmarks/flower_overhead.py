"""Flower's Deployment Engine (a SuperLink and N SuperNodes on 127.0.0.1, TLS and SuperNode authentication
on) against the in-process engine on the same config: seconds per round and per evaluation mode, as
ratios, and the per-message fixed cost (a round's wall time less the slowest node's training) with the
long-lived worker per SuperNode and without it (node config `worker = false`: every message imports torch
and loads the model in a fresh ClientApp process). Also the node's base-model load: original format
against the node's cache.

    python benchmarks/flower_overhead.py                                   # tiny model
    python benchmarks/flower_overhead.py --model smollm2 --steps 10 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]


def deployment(cfg_path: Path, tmp: Path, clients: int, worker: bool) -> tuple[dict, float]:
    from taskfed.flower.local import LocalFederation

    name = "worker" if worker else "no-worker"
    nodes = [{"partition-id": i, "num-partitions": clients, "state-dir": str(tmp / f"state-{name}"), "worker": worker}
             for i in range(clients)]
    tic = time.perf_counter()
    with LocalFederation(tmp / f"fed-{name}", nodes, env_extra={"OMP_NUM_THREADS": "1"}) as fed:
        started = time.perf_counter() - tic
        fed.run(ROOT, {"config": str(cfg_path), "out": str(tmp / name)}, tmp / name / "metrics.json", timeout=3600)
    return json.loads((tmp / name / "metrics.json").read_text()), started


def fixed_cost(metrics: dict) -> float:
    """Per round: wall time less the slowest node's training (messaging, decoding, process start, loads)."""
    return statistics.mean(r["seconds"] - r["node_train_seconds"] for r in metrics["rounds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--eval-rows", type=int, default=3, help="test rows per task")
    ap.add_argument("--method", default="fedavg")
    args = ap.parse_args()

    import tomli_w

    from taskfed.config import load_config
    from taskfed.flower.basecache import cached_base
    from taskfed.model.loading import load_base
    from taskfed.run import Experiment
    from taskfed.runfolder import plain

    flan = (ROOT / ".." / "shared" / "data" / "flan-feddpa" / "dataset1").resolve()
    cfg = load_config(None, [f"model.name={args.model}", f"method.name={args.method}", f"scenario.n_clients={args.clients}",
                             f"train.rounds={args.rounds}", f"train.steps={args.steps}", f"train.batch={args.batch}",
                             "data.max_length=128", "data.max_train_per_task=24", f"data.path={flan}",
                             f"eval.max_rows_per_task={args.eval_rows}", "eval.max_new_tokens=16",
                             'data.tasks=["definite_pronoun_resolution","snli","cola"]'])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inproc = Experiment(cfg).run()
        if args.model != "tiny":
            tic = time.perf_counter(); load_base(cfg.model.name); original = time.perf_counter() - tic
            cached_base(cfg)  # builds the node cache once
            tic = time.perf_counter(); cached_base(cfg); cached = time.perf_counter() - tic
            print(f"base model load on a node: original format {original:.2f} s, node cache {cached:.2f} s")
        (tmp / "run.toml").write_text(tomli_w.dumps(plain(cfg.model_dump())))
        deployed, started = deployment(tmp / "run.toml", tmp, args.clients, worker=True)
        cold, _ = deployment(tmp / "run.toml", tmp, args.clients, worker=False)

    def per_round(m: dict) -> float:
        return statistics.mean(r["seconds"] for r in m["rounds"])

    def per_mode(m: dict) -> float:
        return statistics.mean(e["seconds"] for e in m["eval"].values())

    print(f"config: {args.model}, {args.method}, {args.clients} clients, {args.rounds} rounds x {args.steps} steps x "
          f"batch {args.batch}, {args.eval_rows} test rows per task; {os.cpu_count()} CPUs (in-process: torch's "
          f"default threads; each SuperNode's worker: 1 thread)")
    print(f"federation start (SuperLink + {args.clients} SuperNodes, TLS, auth): {started:.1f} s")
    for label, m in (("in-process", inproc), ("deployment, worker", deployed), ("deployment, no worker", cold)):
        rounds = ", ".join(f"{r['seconds']:.2f}" for r in m["rounds"])
        modes = ", ".join(f"{k} {e['seconds']:.2f}" for k, e in m["eval"].items())
        print(f"{label:22s} s/round {per_round(m):6.2f} ({rounds});  s/eval mode {per_mode(m):6.2f} ({modes})")
    print(f"ratio deployment (worker) / in-process: round {per_round(deployed) / per_round(inproc):.2f}x, "
          f"evaluation {per_mode(deployed) / per_mode(inproc):.2f}x")
    print(f"per-message fixed cost (round less the slowest node's training): no worker {fixed_cost(cold):.2f} s, "
          f"worker {fixed_cost(deployed):.2f} s; node model load per round (max): no worker "
          f"{max(r['node_load_seconds'] for r in cold['rounds']):.3f} s, worker "
          f"{max(r['node_load_seconds'] for r in deployed['rounds']):.3f} s")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
