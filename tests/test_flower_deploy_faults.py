"""Faults on Flower's Deployment Engine (a SuperLink and three SuperNodes on 127.0.0.1, TLS and SuperNode
authentication, as in test_flower_deploy.py), one federation, two runs of three rounds:

1. A SuperNode killed (SIGKILL, its worker too) while it works on round 2: the round completes with the
   other two and records the drop; the node, restarted with its key, rejoins in round 3 with the state it
   committed to its disk. The run's adapters and evaluation equal the in-process run in which that client's
   round-2 upload is left out.
2. The ServerApp's process killed (SIGKILL) during round 2, and the run resumed (`resume = true`) from its
   checkpoint: the same adapters and metrics as the in-process run uninterrupted.

Node 2 runs with TASKFED_FAULT=node.round-2:hang: it receives round 2's message and never answers, which
holds the server in round 2 for as long as the test needs (faults.py), so each kill lands where it is meant
to, whatever the machine's speed.

The two runs also stand for the deployment parity of FedRouter and FedDPA-T against in-process
(test_flower_deploy.py runs FedAvg and FL-TAC; the Simulation Engine's parity test runs all four).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import tomli_w
import torch

from taskfed.flower.local import LocalFederation
from taskfed.model.peft_io import load_adapter
from taskfed.runfolder import plain
from tests.conftest import untimed
from tests.test_flower import config, in_process

ROOT = Path(__file__).resolve().parents[1]
HANG = {"TASKFED_FAULT": "node.round-2:hang"}  # node 2 never answers round 2's message


def wait_for(path: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout:g} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def faults_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    nodes = [{"partition-id": i, "num-partitions": 3, "state-dir": str(tmp / "state")} for i in range(3)]
    env = {"OMP_NUM_THREADS": "1", "TASKFED_CACHE": str(tmp / "cache")}
    fed = LocalFederation(tmp / "fed", nodes, env_extra=env, node_env={2: HANG})
    cfgs = {m: config(m, "train.rounds=3") for m in ("fedrouter", "feddpa-t")}
    for m, cfg in cfgs.items():
        (tmp / f"{m}.toml").write_text(tomli_w.dumps(plain(cfg.model_dump())))
    run = lambda m, **more: {"config": str(tmp / f"{m}.toml"), "out": str(tmp / m), **more}  # noqa: E731
    seen = {}
    with fed:
        # 1. Node 2 dies in round 2 and comes back for round 3.
        run_id = fed.submit(ROOT, run("fedrouter", **{"round-timeout": 300.0, "rejoin-timeout": 180.0}))
        wait_for(tmp / "fedrouter.partial" / "ckpt-00001")  # round 1 checkpointed: node 2 now hangs in round 2
        fed.kill_node(2)
        # Offline once the SuperLink misses its heartbeats: the server drops it from round 2. Restarted with
        # its key (the same node id); its fault is for round 2, which is over for it.
        fed.restart_node(2, HANG)
        fed.wait(run_id, tmp / "fedrouter" / "metrics.json", timeout=420)
        seen["fedrouter_steps"] = sorted(p.name for p in (tmp / "state").glob("run-*/2/step-*"))

        # 2. The ServerApp dies in round 2 (node 2 hangs in it again); the run is resumed.
        run_id = fed.submit(ROOT, run("feddpa-t", **{"round-timeout": 300.0}))
        wait_for(tmp / "feddpa-t.partial" / "ckpt-00001")
        deadline = time.monotonic() + 60
        while not (apps := fed.serverapp_pids()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(apps) == 1, f"expected one ServerApp process, found {apps}"
        os.kill(apps[0], signal.SIGKILL)
        seen["partial_after_kill"] = sorted(p.name for p in (tmp / "feddpa-t.partial").glob("ckpt-*"))
        seen["complete_after_kill"] = (tmp / "feddpa-t").exists()
        fed.kill_node(2, graceful=True)  # its worker still hangs on the dead run's message
        fed.restart_node(2)  # without the fault now
        fed.run(ROOT, run("feddpa-t", resume=True, **{"round-timeout": 300.0}), tmp / "feddpa-t" / "metrics.json",
                timeout=420)
    return tmp, cfgs, seen


def reference(cfg, drop=lambda r, client: False):
    metrics, ex = in_process(cfg, drop)  # one thread, as the nodes ran (OMP_NUM_THREADS=1): the same sums
    return json.loads(json.dumps(metrics)), ex


def same_server_adapters(folder: Path, ex) -> None:
    for name, weights in ex.method.server_adapters().items():
        got = load_adapter(folder / "adapters" / "server" / name.replace("/", "_"))
        assert all(torch.equal(got[k], weights[k]) for k in weights), f"{name} differs from the in-process run"


def test_a_node_killed_in_round_2_is_dropped_and_rejoins_in_round_3_with_its_state(faults_run):
    tmp, cfgs, seen = faults_run
    metrics = json.loads((tmp / "fedrouter" / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert len(rounds) == 3 and "dropped" not in rounds[0] and "dropped" not in rounds[2]
    assert list(rounds[1]["dropped"]) == ["2"], rounds[1].get("dropped")  # the round closed with the other two
    assert "Node Unavailable" in rounds[1]["dropped"]["2"]  # the SuperLink's word: it missed its heartbeats
    # Node 2 trained round 3 from its own disk: the step committed after round 1 (labels and centroids).
    assert seen["fedrouter_steps"] == ["step-1", "step-3"]  # nothing committed for the round it missed
    want, ex = reference(cfgs["fedrouter"], drop=lambda r, client: r == 1 and client == "2")
    same_server_adapters(tmp / "fedrouter", ex)
    assert untimed(metrics["eval"]) == untimed(want["eval"])


def test_a_serverapp_killed_in_round_2_resumes_to_the_uninterrupted_result(faults_run):
    tmp, cfgs, seen = faults_run
    assert not seen["complete_after_kill"] and seen["partial_after_kill"] == ["ckpt-00000", "ckpt-00001"]
    metrics = json.loads((tmp / "feddpa-t" / "metrics.json").read_text())
    assert all("dropped" not in r for r in metrics["rounds"]) and not (tmp / "feddpa-t.partial").exists()
    want, ex = reference(cfgs["feddpa-t"])
    same_server_adapters(tmp / "feddpa-t", ex)
    assert untimed(metrics) == untimed(want)  # the local adapters too: evaluation used the nodes' own
