"""Experiment tracking (`[log]`, issue 31): every figure of metrics.json, read back from the TensorBoard
event files and the MLflow store the run wrote, with the config as parameters; a resumed run logs each
figure once; the run folder's manifest and the serve-time check still hold; bad settings are one sentence."""

from __future__ import annotations

import importlib.util
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from taskfed import faults
from taskfed.config import load_config
from taskfed.errors import TaskfedError
from taskfed.faults import InjectedFault
from taskfed.run import run_experiment
from taskfed.runfolder import MANIFEST, check_manifest
from taskfed.serve.run import ServedRun
from taskfed.tracking import tracking_on
from tests.conftest import tiny_config

ON = ("log.tensorboard=true", "log.mlflow=true")
# FedRouter (router accuracy, cluster makeup) with client-level DP on its updates (epsilon spent)
CONFIG = ("method.name=fedrouter", "scenario.name=dual", "privacy.updates.clip=0.5",
          "privacy.updates.noise_multiplier=1.0", *ON)


def expected(metrics: dict) -> dict[tuple[str, int], float]:
    """What the tracker must hold, by the documented naming: round/<key> at the round's number (1-based),
    everything else by its path at the last round's number."""
    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, path + [str(k)])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, path + [str(i)])
        elif type(node) in (int, float) and math.isfinite(node):
            yield "/".join(path), float(node)

    last = len(metrics["rounds"])
    want = {}
    for rec in metrics["rounds"]:
        for name, v in walk({k: v for k, v in rec.items() if k != "round"}, ["round"]):
            want[(name, rec["round"] + 1)] = v
    for name, v in walk({k: v for k, v in metrics.items() if k != "rounds"}, []):
        want[(name, last)] = v
    return want


def tensorboard_scalars(folder: Path) -> tuple[dict, Counter, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    got, count = {}, Counter()
    for tag in acc.Tags()["tensors"]:
        for e in acc.Tensors(tag):
            if tag == "config/text_summary":
                continue
            got[(tag, e.step)] = float(tensor_util.make_ndarray(e.tensor_proto))
            count[(tag, e.step)] += 1
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode() if "config/text_summary" in acc.Tags()["tensors"] else ""
    return got, count, text


def mlflow_run(folder: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(folder / 'mlflow.db').absolute()}")
    (exp,) = [e for e in client.search_experiments() if e.name.startswith("taskfed-")]
    (run,) = client.search_runs([exp.experiment_id])
    return client, run


def assert_logged(out: Path) -> dict:
    """Every numeric figure of OUT/metrics.json is in OUT's TensorBoard files and MLflow store, once, with its
    value; the resolved config is the MLflow run's parameters and TensorBoard's config text."""
    metrics = json.loads((out / "metrics.json").read_text())
    want = expected(metrics)
    assert len(want) > 50 and any(k.startswith("eval/") and "per_task" in k for k, _ in want)
    tb, counts, text = tensorboard_scalars(out / "tensorboard")
    missing = {k for k in want if k not in tb}
    assert not missing, sorted(missing)[:10]
    assert all(tb[k] == pytest.approx(v, rel=1e-12, abs=1e-12) for k, v in want.items())
    assert max(counts.values()) == 1  # no figure twice
    assert all(tb[("round/tokens_per_s", r["round"] + 1)] == pytest.approx(r["train_tokens"] / r["seconds"])
               for r in metrics["rounds"])

    client, run = mlflow_run(out)
    history = {}
    for key in {k for k, _ in want}:
        for m in client.get_metric_history(run.info.run_id, key):
            assert (key, m.step) not in history, f"{key} at step {m.step} logged twice"
            history[(key, m.step)] = m.value
    assert {k: history.get(k) for k in want} == pytest.approx(want, rel=1e-12, abs=1e-12)
    config = load_config(out / "config.toml")
    params = run.data.params
    assert params["method.name"] == metrics["method"] and params["train.rounds"] == str(config.train.rounds)
    assert params["lora.target_modules"] == json.dumps(config.lora.target_modules)
    assert "method.name = " + metrics["method"] in text
    assert run.info.status == "FINISHED" and run.data.tags["taskfed.run"]
    return metrics


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_runtime_factory):
    cfg = tiny_config(*CONFIG)
    out = tmp_path_factory.mktemp("tracked") / "run"
    run_experiment(cfg, out, rt=tiny_runtime_factory(cfg))
    return out


def test_every_figure_of_metrics_json_is_in_tensorboard_and_mlflow(tracked):
    metrics = assert_logged(tracked)
    names = {k for k, _ in expected(metrics)}
    for figure in ("round/train_loss", "round/bytes_up", "round/bytes_down", "round/seconds", "eval/global/score",
                   "eval/global/router_accuracy", "bytes_communicated", "privacy/updates/epsilon"):
        assert any(n == figure or n.startswith(figure) for n in names), figure


def test_the_run_folder_keeps_its_logs_outside_its_manifest(tracked):
    """The logs moved from RUN.partial/ into the run folder; the manifest lists the run's files but not the
    logs (TensorBoard and `mlflow ui` may touch them), so `taskfed serve`'s check still passes."""
    assert not tracked.with_name(tracked.name + ".partial").exists()
    listed = json.loads((tracked / MANIFEST).read_text())["files"]
    assert "metrics.json" in listed and not any(k.startswith(("tensorboard", "mlflow")) for k in listed)
    assert list((tracked / "tensorboard").glob("events.out.tfevents.*"))
    check_manifest(tracked)
    ServedRun(tracked)  # what `taskfed serve` opens first: the manifest check and the config.toml with its [log]


def test_a_resumed_run_logs_each_figure_once(tmp_path, monkeypatch, tiny_runtime_factory):
    """Stopped in round 2 (round 1 and the figures that grow with the rounds, bytes_communicated, ..., logged at
    step 1), resumed: every figure once, those at step 2 too, and the MLflow run is the same one, continued."""
    cfg = tiny_config("method.name=fedavg", "train.steps=1", "eval.modes=[\"global\"]", *ON)  # small: resume is the point
    out = tmp_path / "run"
    monkeypatch.setenv("TASKFED_FAULT", "round-2.aggregate:raise")
    faults.reset()
    with pytest.raises(InjectedFault):
        run_experiment(cfg, out, rt=tiny_runtime_factory(cfg))
    monkeypatch.delenv("TASKFED_FAULT")
    partial = tmp_path / "run.partial"
    before, _, _ = tensorboard_scalars(partial / "tensorboard")
    assert ("round/train_loss", 1) in before and ("bytes_communicated", 1) in before
    assert ("round/train_loss", 2) not in before and not any(k.startswith("eval/") for k, _ in before)
    run_experiment(cfg, out, rt=tiny_runtime_factory(cfg), resume=True)
    assert_logged(out)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # appended, not rewritten


def test_tracking_settings_are_checked_before_a_run(tmp_path, monkeypatch, tiny_runtime_factory):
    with pytest.raises(TaskfedError, match="log.tensorbord"):
        tiny_config("log.tensorbord=true")
    with pytest.raises(TaskfedError, match="log.mlflow_uri is set but log.mlflow is false"):
        tiny_config("log.mlflow_uri=sqlite:////tmp/x.db")
    cfg = tiny_config(*ON)
    with pytest.raises(TaskfedError, match=r"need a run folder \(--out\)"):
        run_experiment(cfg, None, rt=tiny_runtime_factory(cfg))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(TaskfedError, match=r"log.mlflow = true needs the `log` extra: pip install 'taskfed\[log\]'"):
        run_experiment(cfg, tmp_path / "run", rt=tiny_runtime_factory(cfg))
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_off_by_default():
    """Off unless asked. That an untracked run writes no log files is checked, without a run of its own here, by
    the exact run folder listings of tests/test_flower.py::test_simulation_equals_in_process and of
    tests/test_serve_start.py's manifest test (which would find unlisted files)."""
    cfg = tiny_config()
    assert not cfg.log.tensorboard and not cfg.log.mlflow and cfg.log.mlflow_uri is None
    assert not tracking_on(cfg.log)
