"""Flower's Deployment Engine on 127.0.0.1: a SuperLink and three SuperNodes with TLS (a throwaway CA made
here) and SuperNode authentication (each node's public key registered through the Control API before it
connects), `flwr run` for two FedAvg rounds on the tiny model; the final adapter must equal the in-process
one bit for bit. Every process is started and stopped by the test, by PID, SIGKILL after a timeout.

Slow by nature (about 1.5-3 minutes on 2 CPUs): a SuperNode starts a fresh ClientApp process, which imports
torch and transformers, for every message.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import tomli_w
import torch

from tests.conftest import tiny_config
from taskfed.flower.local import LocalFederation, _alive, _descendants
from taskfed.model.peft_io import load_adapter
from taskfed.run import Experiment
from taskfed.runfolder import plain

ROOT = Path(__file__).resolve().parents[1]


def test_superlink_and_three_supernodes_with_tls_and_auth(tmp_path):
    cfg = tiny_config("method.name=fedavg", "scenario.n_clients=3",
                      'data.tasks=["definite_pronoun_resolution","snli","cola"]')
    (tmp_path / "run.toml").write_text(tomli_w.dumps(plain(cfg.model_dump())))
    nodes = [{"partition-id": i, "num-partitions": 3, "state-dir": str(tmp_path / "state")} for i in range(3)]
    fed = LocalFederation(tmp_path / "fed", nodes,
                          env_extra={"OMP_NUM_THREADS": "1", "TASKFED_CACHE": str(tmp_path / "cache")})
    tic = time.monotonic()
    with fed:
        assert "--enable-supernode-auth" in fed.superlink.args and "--insecure" not in fed.superlink.args
        fed.run(ROOT, {"config": str(tmp_path / "run.toml"), "out": str(tmp_path / "out")},
                tmp_path / "out" / "metrics.json", timeout=420)
        pids = [p.pid for p in fed.procs]
        pids += [d for pid in pids for d in _descendants(pid)]  # flwr's own children (superexec, apps)
    assert len(pids) > len(fed.procs)  # the SuperLink runs a superexec of its own
    assert all(p.poll() is not None for p in fed.procs)  # every process we started is gone
    assert all(not _alive(pid) for pid in pids), "a Flower process outlived the federation"
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["engine"] == "flower" and sorted(metrics["clients"]) == ["0", "1", "2"]
    assert [r["round"] for r in metrics["rounds"]] == [0, 1] and all("dropped" not in r for r in metrics["rounds"])
    assert all(r["node_load_seconds"] < 1.0 for r in metrics["rounds"])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the nodes ran with OMP_NUM_THREADS=1: the same float sums
    try:
        ex = Experiment(cfg)
        ex.train()
    finally:
        torch.set_num_threads(threads)
    want = ex.method.server_adapters()["global"]
    got = load_adapter(tmp_path / "out" / "adapters" / "server" / "global")
    assert all(torch.equal(got[k], want[k]) for k in want), "deployment adapter differs from in-process"
    print(f"deployment test: {time.monotonic() - tic:.0f} s")

