"""Flower's Deployment Engine on 127.0.0.1: a SuperLink and three SuperNodes with TLS (a throwaway CA made
here) and SuperNode authentication (each node's public key registered through the Control API before it
connects); `flwr run` for FedAvg and FL-TAC on the tiny model, one after the other on the same federation,
FL-TAC with both privacy mechanisms on (noisy centroids from the nodes, clipped uploads, the server's noise).
Each run's metrics.json (training and evaluation on the nodes) must equal the in-process run's apart from
timings, and its adapters bit for bit. FedRouter and FedDPA-T are compared with in-process on a SuperLink
in test_flower_deploy_faults.py, all four methods on the Simulation Engine in test_flower.py (each
deployment run costs about a minute of the suite). Every process is started and stopped by the test, by
PID, SIGKILL after a timeout; none may outlive the federation, the nodes' workers included.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import tomli_w
import torch

from taskfed.flower import worker
from taskfed.flower.local import LocalFederation, _alive, _descendants
from taskfed.model.peft_io import load_adapter
from taskfed.run import Experiment
from taskfed.runfolder import plain
from tests.conftest import untimed
from tests.test_flower import config

ROOT = Path(__file__).resolve().parents[1]
DEPLOYED = ["fedavg", "fltac"]
PRIVATE = {"fltac": ["privacy.centroids.clip=4", "privacy.centroids.epsilon=8", "privacy.updates.clip=1e-4",
                     "privacy.updates.noise_multiplier=1.0"]}  # the clip binds: AdamW moves more than 1e-4


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    nodes = [{"partition-id": i, "num-partitions": 3, "state-dir": str(tmp / "state")} for i in range(3)]
    fed = LocalFederation(tmp / "fed", nodes, env_extra={"OMP_NUM_THREADS": "1", "TASKFED_CACHE": str(tmp / "cache")})
    before = set(worker.home().glob("*.pid"))
    seconds = {}
    with fed:
        assert "--enable-supernode-auth" in fed.superlink.args and "--insecure" not in fed.superlink.args
        for method in DEPLOYED:
            (tmp / f"{method}.toml").write_text(tomli_w.dumps(plain(config(method, *PRIVATE.get(method, [])).model_dump())))
            tic = time.monotonic()
            fed.run(ROOT, {"config": str(tmp / f"{method}.toml"), "out": str(tmp / method)},
                    tmp / method / "metrics.json", timeout=420)
            seconds[method] = time.monotonic() - tic
        pids = [p.pid for p in fed.procs]
        pids += [d for pid in pids for d in _descendants(pid)]  # flwr's own children (superexec, apps)
        workers = [int(p.read_text()) for p in set(worker.home().glob("*.pid")) - before if p.exists()]
    print("deployment runs:", {m: f"{s:.0f} s" for m, s in seconds.items()})
    return tmp, fed, pids, workers


def test_no_process_outlives_the_federation(deployed):
    tmp, fed, pids, workers = deployed
    assert len(pids) > len(fed.procs)  # the SuperLink runs a superexec of its own
    assert all(p.poll() is not None for p in fed.procs)  # every process we started is gone
    assert all(not _alive(pid) for pid in pids), "a Flower process outlived the federation"
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "a taskfed worker outlived its SuperNode"


@pytest.mark.parametrize("method", DEPLOYED)
def test_deployment_equals_in_process(deployed, method):
    tmp = deployed[0]
    metrics = json.loads((tmp / method / "metrics.json").read_text())
    assert metrics["engine"] == "flower" and sorted(metrics["clients"]) == ["0", "1", "2"]
    assert [r["round"] for r in metrics["rounds"]] == list(range(len(metrics["rounds"])))
    assert all("dropped" not in r for r in metrics["rounds"]) and set(metrics["eval"]) == {"local", "global"}
    assert all(r["node_load_seconds"] < 1.0 for r in metrics["rounds"])  # the worker kept the model loaded
    assert ("privacy" in metrics) == (method in PRIVATE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the nodes ran with OMP_NUM_THREADS=1: the same float sums
    try:
        ex = Experiment(config(method, *PRIVATE.get(method, [])))
        want = ex.run()
    finally:
        torch.set_num_threads(threads)
    assert untimed(metrics) == untimed(json.loads(json.dumps(want))), f"{method}: deployment metrics differ"
    for name, weights in ex.method.server_adapters().items():
        got = load_adapter(tmp / method / "adapters" / "server" / name.replace("/", "_"))
        assert all(torch.equal(got[k], weights[k]) for k in weights), f"{method} {name} differs from in-process"
