"""The long-lived worker per SuperNode (flower/worker.py): a whole FedDPA-T run whose every message goes
through each node's worker process equals the in-process run; a worker killed with SIGKILL between rounds is
replaced by the next message, which reads the client's state (the local adapter) from disk; the run's end
stops every worker; a worker whose SuperNode is gone exits by itself; a failing message is an error reply
and the worker lives on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from tests.conftest import tiny_config, untimed
from tests.test_flower_engine import TASKS, FakeGrid, identity  # noqa: F401  (a fixture)
from taskfed.federation import Driver
from taskfed.flower import worker
from taskfed.flower.engine import FlowerEngine, Options
from taskfed.run import Experiment


def _pid(node_id: int) -> int | None:
    path = worker.socket_path(node_id).with_suffix(".pid")
    return int(path.read_text()) if path.exists() else None


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker._alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def supernode():
    """A stand-in SuperNode process for the workers to watch."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_run_through_workers_survives_a_killed_worker_and_equals_in_process(identity, tmp_path, supernode, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers' torch threads, as the reference below
    base = int(time.time() * 1000) % 10**9 * 1000  # node ids of this test only
    pids: dict[int, list[int]] = {}
    kinds: list[str] = []

    def through_worker(action, content, node_id, node_config):
        nid = base + node_id
        if action == "bye":
            worker.stop(nid)
            return None
        if action == "round" and node_id == 101 and content.config_records["round"]["round"] == 2:
            os.kill(_pid(nid), signal.SIGKILL)  # the worker dies between rounds 1 and 2
            time.sleep(0.2)
        kinds.append(action)
        reply = worker.forward(action, content, node_config, 7, nid, watch_pid=supernode.pid)
        pids.setdefault(node_id, [])
        if _pid(nid) not in pids[node_id]:
            pids[node_id].append(_pid(nid))
        return reply

    cfg = tiny_config("method.name=feddpa-t", "scenario.n_clients=3", f"data.tasks={TASKS}", "train.rounds=3")
    driver = Driver(cfg, FlowerEngine(FakeGrid(tmp_path / "state", handler=through_worker), cfg, Options(round_timeout=300)))
    got = driver.run(tmp_path / "flower")
    assert len(pids[101]) == 2 and all(len(pids[n]) == 1 for n in (100, 102))  # one restart, for the killed one
    assert all(_gone(p) for ps in pids.values() for p in ps)  # the run's end stopped every worker
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = Experiment(cfg).run()
    finally:
        torch.set_num_threads(threads)
    assert untimed(got) == untimed(json.loads(json.dumps(want)))
    assert "round" in kinds and "evaluate" in kinds


def test_a_worker_exits_with_its_supernode_and_survives_a_failing_message(tmp_path, supernode):
    nid = int(time.time() * 1000) % 10**9 * 1000 + 999
    bad = RecordDict({"config": ConfigRecord({"model.name": "tiny", "train.rounds": "many"})})
    with pytest.raises(worker.WorkerError, match="TaskfedError: flower message: invalid run config"):
        worker.forward("hello", bad, {"partition-id": 0}, 7, nid, watch_pid=supernode.pid)
    pid = _pid(nid)
    assert pid and worker._alive(pid)  # the failing message did not take the worker with it
    assert oct(worker.socket_path(nid).stat().st_mode & 0o777) == "0o600"
    supernode.kill()
    supernode.wait()
    assert _gone(pid), "the worker outlived its SuperNode"
    assert not worker.socket_path(nid).exists()
