"""Per-round time of Flower's Deployment Engine (a SuperLink and N SuperNodes on 127.0.0.1, TLS and
SuperNode authentication on) against the in-process engine, on the same config; printed as a ratio.
Also the node's base-model load: from the original format (`load_base`) against the node's cache.

    python benchmarks/flower_overhead.py                       # tiny model, 3 clients, 2 rounds
    python benchmarks/flower_overhead.py --model smollm2 --steps 2 --batch 4
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--method", default="fedavg")
    args = ap.parse_args()

    import tomli_w
    import torch

    from taskfed.config import load_config
    from taskfed.flower.basecache import cached_base
    from taskfed.flower.local import LocalFederation
    from taskfed.model.loading import load_base
    from taskfed.run import Experiment
from taskfed.runfolder import plain

    torch.set_num_threads(1)  # the nodes run one thread each (OMP_NUM_THREADS=1 below): like for like
    flan = (ROOT / ".." / "shared" / "data" / "flan-feddpa" / "dataset1").resolve()
    cfg = load_config(None, [f"model.name={args.model}", f"method.name={args.method}", f"scenario.n_clients={args.clients}",
                             f"train.rounds={args.rounds}", f"train.steps={args.steps}", f"train.batch={args.batch}",
                             "data.max_length=128", "data.max_train_per_task=24", f"data.path={flan}",
                             'data.tasks=["definite_pronoun_resolution","snli","cola"]'])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ex = Experiment(cfg)
        inproc = [r["seconds"] for r in ex.train()[0]]

        if args.model != "tiny":
            tic = time.perf_counter(); load_base(cfg.model.name); original = time.perf_counter() - tic
            cached_base(cfg)  # builds the node cache once
            tic = time.perf_counter(); cached_base(cfg); cached = time.perf_counter() - tic
            print(f"base model load on a node: original format {original:.2f} s, node cache {cached:.2f} s")

        (tmp / "run.toml").write_text(tomli_w.dumps(plain(cfg.model_dump())))
        nodes = [{"partition-id": i, "num-partitions": args.clients, "state-dir": str(tmp / "state")}
                 for i in range(args.clients)]
        tic = time.perf_counter()
        with LocalFederation(tmp / "fed", nodes, env_extra={"OMP_NUM_THREADS": "1"}) as fed:
            started = time.perf_counter() - tic
            fed.run(ROOT, {"config": str(tmp / "run.toml"), "out": str(tmp / "out")}, tmp / "out" / "metrics.json",
                    timeout=1800)
        metrics = json.loads((tmp / "out" / "metrics.json").read_text())
    deploy = [r["seconds"] for r in metrics["rounds"]]
    load = max(r["node_load_seconds"] for r in metrics["rounds"])
    print(f"config: {args.model}, {args.method}, {args.clients} clients, {args.rounds} rounds x {args.steps} steps x "
          f"batch {args.batch}; {os.cpu_count()} CPUs")
    print(f"federation start (SuperLink + {args.clients} SuperNodes, TLS, auth): {started:.1f} s")
    print(f"in-process s/round: {statistics.mean(inproc):.2f}  ({', '.join(f'{s:.2f}' for s in inproc)})")
    print(f"deployment s/round: {statistics.mean(deploy):.2f}  ({', '.join(f'{s:.2f}' for s in deploy)})")
    print(f"setup exchange: {metrics['setup_seconds']:.1f} s; node model load per round (max): {load:.3f} s")
    print(f"ratio deployment / in-process per round: {statistics.mean(deploy) / statistics.mean(inproc):.1f}x")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
