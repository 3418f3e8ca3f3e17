"""Checkpoint and resume on the Flower engine (the driver's own checkpoints; each node commits its client's
state per step on its own disk), over the in-process FakeGrid: a ServerApp stopped after round 1 and
resumed gives the in-process run's adapters; a node restarted under a new node id rejoins with its state;
a node missing its state is refused, never mixed; a round short of `train.min_replies` is retried from the
last checkpoint, then stops with the checkpoint kept.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from taskfed import faults
from taskfed.checkpoint import Checkpoints
from taskfed.errors import TaskfedError
from taskfed.federation import Driver
from taskfed.flower.engine import FlowerEngine, Options
from taskfed.run import Experiment
from tests.conftest import tiny_config, untimed
from tests.test_flower_engine import TASKS, FakeGrid, identity  # noqa: F401  (the fixture)


def config(method: str, *extra: str):
    more = ["method.n_global=2"] if method == "fedrouter" else []
    return tiny_config(f"method.name={method}", "scenario.n_clients=3", f"data.tasks={TASKS}", "train.rounds=3", *more, *extra)


def flower(cfg, state, **grid):
    return Driver(cfg, FlowerEngine(FakeGrid(state, **grid), cfg, Options(round_timeout=30)))


def stop_at(monkeypatch, point: str) -> None:
    monkeypatch.setenv("TASKFED_FAULT", f"{point}:raise")
    faults.reset()


def same_adapters(a: Driver, b: Driver) -> bool:
    wa, wb = a.method.server_adapters(), b.method.server_adapters()
    return wa.keys() == wb.keys() and all(torch.equal(wa[n][k], wb[n][k]) for n in wa for k in wa[n])


@pytest.mark.parametrize("method", ["fedrouter", "feddpa-t"])
def test_a_stopped_server_resumes_on_flower_to_the_in_process_result(identity, tmp_path, monkeypatch, method):
    cfg = config(method)
    want = Experiment(cfg)
    want.run(tmp_path / "inprocess")
    stop_at(monkeypatch, "checkpoint.after_rename@2")  # the ServerApp dies right after round 1's checkpoint
    with pytest.raises(faults.InjectedFault):
        flower(cfg, tmp_path / "state").run(tmp_path / "flower")
    monkeypatch.delenv("TASKFED_FAULT")
    again = flower(cfg, tmp_path / "state")  # a new ServerApp process: new engine, same nodes' disks
    got = again.run(tmp_path / "flower", resume=True)
    assert same_adapters(want, again)
    a = json.loads((tmp_path / "flower" / "metrics.json").read_text())
    b = json.loads((tmp_path / "inprocess" / "metrics.json").read_text())
    assert untimed(a) == untimed(b) and got["engine"] == "flower"


def test_a_restarted_node_rejoins_under_a_new_id_with_its_state(identity, tmp_path):
    cfg = config("fedrouter")
    want = Experiment(cfg)
    want.run()
    driver = flower(cfg, tmp_path / "state")
    grid = driver.engine.grid
    driver.setup()
    driver.round(0)
    grid.nodes[201] = grid.nodes.pop(101)  # node 101's SuperNode restarted: the SuperLink gives it a new id
    for r in (1, 2):
        record = driver.round(r)
        assert "dropped" not in record
    assert driver.engine.node_of["1"] == 201
    assert same_adapters(want, driver)


def test_a_node_without_the_state_the_server_expects_is_refused(identity, tmp_path, monkeypatch):
    cfg = config("fedrouter")
    stop_at(monkeypatch, "checkpoint.after_rename@2")
    with pytest.raises(faults.InjectedFault):
        flower(cfg, tmp_path / "state").run(tmp_path / "run")
    monkeypatch.delenv("TASKFED_FAULT")
    lost = sorted((tmp_path / "state").glob("run-*/2/step-*"))
    assert [p.name for p in lost] == ["step-0", "step-1"]
    for p in lost:
        shutil.rmtree(p)  # node 2's disk lost its client state
    again = flower(cfg.model_copy(update={"train": cfg.train.model_copy(update={"round_retries": 0})}), tmp_path / "state")
    # A config that differs only in round_retries is another config: resume with the one it started with.
    with pytest.raises(TaskfedError, match="train.round_retries"):
        again.run(tmp_path / "run", resume=True)
    again = flower(cfg, tmp_path / "state")
    metrics = again.run(tmp_path / "run", resume=True)
    why = metrics["rounds"][1]["dropped"]["2"]
    assert "holds steps" in why and "the server and this node disagree" in why
    assert "disagree" in metrics["rounds"][2]["dropped"]["2"]  # refused every round, never mixed


def test_a_round_short_of_min_replies_is_retried_then_stops_with_the_checkpoint_kept(identity, tmp_path):
    cfg = config("fedavg", "train.min_replies=3", "train.round_retries=1")
    driver = Driver(cfg, FlowerEngine(FakeGrid(tmp_path / "state", silent={102: {"train.round"}}), cfg,
                                      Options(round_timeout=0.5)))
    logs = []
    driver.log = logs.append
    with pytest.raises(TaskfedError, match=r"round 1: uploads of 2 clients arrived, train.min_replies needs 3; "
                                           r"stopped \(the last checkpoint is kept"):
        driver.run(tmp_path / "run")
    assert any("retrying it from the last checkpoint (1/1)" in line for line in logs)
    assert [p.name for p in Checkpoints(tmp_path / "run", {}).steps()] == ["ckpt-00000"]
    assert not (tmp_path / "run").exists()
