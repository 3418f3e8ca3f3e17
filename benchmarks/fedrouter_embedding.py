"""FedRouter's embedding depth (`method.embed_layers`): cost and router accuracy, without training.

    python benchmarks/fedrouter_embedding.py [--model smollm2] [--layers all,4,8] [--rows 96 --eval-rows 8]

Router accuracy depends only on the embeddings and the two KMeans (local per client, global at the
server), not on the adapters: so per depth this builds the Experiment of the FLAN dual setting of
benchmarks/flan_results.py (8 clients, the 8 FedDPA dataset1 tasks, plain template, 192 tokens, `--rows`
training rows and `--eval-rows` test rows per task, seed 0), runs the method's setup (local clustering on
every client, global clustering at the server) and routes every client's global-mode inputs, with no
training and no generation. Printed per depth: seconds to embed all training rows (empty cache), seconds
to route the test inputs (embedding them from an empty cache + nearest global centroid; every client routes
the same inputs in global mode, so only the first embeds them), the local clustering's agreement with the
true tasks on the training rows (Hungarian matching, mean over clients: a training-side diagnostic), and
router accuracy as FedRouter's eval_report computes it (share of test inputs sent to the global cluster
holding most training rows of their true task) in global mode (with the global router every client sends
an input to the same cluster, and in the dual scenario every task is held by two clients, so local mode
gives the same share). The README's figure at full depth for this setting was 0.859.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from taskfed.clustering import clustering_accuracy  # noqa: E402
from taskfed.config import load_config  # noqa: E402
from taskfed.methods.fedrouter import LABELS  # noqa: E402
from taskfed.methods.base import Routed  # noqa: E402
from taskfed.run import Experiment  # noqa: E402


def routed(exp, mode: str) -> list[Routed]:
    """Every client's routing of its test rows, by the method's client side on what the server sends."""
    out = []
    side = exp.engine.client_side
    for cid in sorted(exp.clients):
        client = exp.clients[cid]
        tasks = client.tasks if mode == "local" else exp.seen
        records = [r for t in tasks for r in exp.test_by_task.get(t, [])]
        sent = exp.method.downlink(cid)
        names = list(side.eval_adapters(client, sent))
        out.append(Routed(cid, [r.task for r in records], names, side.route(client, records, names, exp.rt, sent),
                          side.eval_facts(client)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layers", default="all,4,8", help="comma-separated depths; 'all' = the default embed(x)")
    ap.add_argument("--rows", type=int, default=96, help="training rows per task")
    ap.add_argument("--eval-rows", type=int, default=8, help="test rows per task")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    depths = [None if d.strip() == "all" else int(d) for d in args.layers.split(",")]
    base = ["method.name=fedrouter", "method.n_local=2", f"model.name={args.model}", "scenario.name=dual",
            "scenario.n_clients=8", f"data.path={ROOT.parent / 'shared/data/flan-feddpa/dataset1'}",
            "data.template=plain", "data.max_length=192", f"data.max_train_per_task={args.rows}",
            f"eval.max_rows_per_task={args.eval_rows}", f"seed={args.seed}"]
    rt = None
    rows = []
    for depth in depths:
        extra = [] if depth is None else [f"method.embed_layers={depth}"]
        exp = Experiment(load_config(None, base + extra), rt=rt)
        rt, method = exp.rt, exp.method
        rt._embedded.clear()  # every depth from an empty cache
        train_texts = [r.instruction for cid in sorted(exp.clients) for r in exp.clients[cid].records]
        tic = time.perf_counter()
        method.embed(rt, train_texts)
        embed_s = time.perf_counter() - tic
        tic = time.perf_counter()
        exp.setup()  # local KMeans per client + global KMeans (embeddings from the cache)
        cluster_s = time.perf_counter() - tic
        local_acc = float(np.mean([clustering_accuracy(c.store[LABELS], [r.task for r in c.records]) for c in exp.clients.values()]))
        tic = time.perf_counter()
        glob = routed(exp, "global")
        route_s = time.perf_counter() - tic
        n_test = sum(len(rep.tasks) for rep in glob)
        acc = method.eval_report("global", glob)["router_accuracy"]
        label = f"{rt.n_layers} (all)" if depth is None else str(depth)
        rows.append((label, len(train_texts), embed_s, n_test, route_s, local_acc, acc))
        print(f"layers {label}: embed {len(train_texts)} train rows {embed_s:.1f} s, KMeans {cluster_s:.1f} s, "
              f"route {n_test} test inputs {route_s:.1f} s, local clustering agreement {local_acc:.3f}, "
              f"router accuracy {acc:.3f}", flush=True)
    print()
    print("| layers | embed train rows (s) | route test rows (s) | local clustering agreement (train) | router accuracy |")
    print("|---|---|---|---|---|")
    for label, n_train, embed_s, n_test, route_s, local_acc, acc in rows:
        print(f"| {label} | {embed_s:.1f} ({n_train} rows) | {route_s:.1f} ({n_test} inputs) | {local_acc:.3f} | {acc:.3f} |")


if __name__ == "__main__":
    main()
