"""Checkpoint and resume: a run killed anywhere (kill -9 at a named point, or by PID from outside) and resumed
gives the uninterrupted run's metrics.json (apart from timings) and its adapters bit for bit; damaged
checkpoints fall back or stop with one line; the state codec keeps types, identity and values.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from taskfed import faults
from taskfed.checkpoint import FORMAT, MANIFEST, Checkpoints
from taskfed.cli import app
from taskfed.errors import TaskfedError
from taskfed.state import load_tree, pack, save_tree, unpack
from tests import conftest
from tests.conftest import ROOT

ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"), FLWR_TELEMETRY_ENABLED="0", TOKENIZERS_PARALLELISM="false")
runner = CliRunner()
KILL_POINTS = ["checkpoint.after_rename@2", "round-2.aggregate", "eval.global"]  # after round 1, in round 2, in eval


def untimed(obj):
    """Same work, same metrics: the engine must match too; a resumed evaluation starts with an empty
    generation cache, so it generates more tokens."""
    return conftest.untimed(obj, ignore=("generated_tokens",))


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def config(method: str) -> Path:
    return ROOT / "configs" / f"{method}.toml"


def assert_same_run(a: Path, b: Path) -> None:
    assert untimed(json.loads((a / "metrics.json").read_text())) == untimed(json.loads((b / "metrics.json").read_text()))
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    for f in files:
        x, y = load_file(str(a / f)), load_file(str(b / f))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{f} differs"
    assert (a / "config.toml").read_text() == (b / "config.toml").read_text()


_REFERENCE: dict[str, Path] = {}


@pytest.fixture
def reference(tmp_path_factory):
    """The uninterrupted smoke run of a method (one per method per session)."""
    def get(method: str) -> Path:
        if method not in _REFERENCE:
            out = tmp_path_factory.mktemp("ref") / method
            assert cli("run", config(method), "--out", out, "--smoke").exit_code == 0
            _REFERENCE[method] = out
        return _REFERENCE[method]
    return get


def killed_at(method: str, out: Path, point: str, *extra: str) -> subprocess.CompletedProcess:
    """`taskfed run --smoke` in a fresh process that SIGKILLs itself at `point`."""
    args = [sys.executable, "-m", "taskfed.cli", "run", str(config(method)), "--out", str(out), "--smoke", *extra]
    proc = subprocess.run(args, env=dict(ENV, TASKFED_FAULT=point), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return proc


# ----------------------------------------------------------------------------- kill -9 and resume
# The new baselines' own state: server moments (fedavgm, fedadam, fedyogi, fedadagrad), control variates on both
# sides (scaffold), a client-owned B (fedsa-lora), A0 on the clients (ffa-lora).
@pytest.mark.parametrize("method", ["fedavg", "fedrouter-dual", "feddpa-t", "fltac", "fedavgm", "fedadam", "fedyogi",
                                    "fedadagrad", "scaffold", "fedsa-lora", "ffa-lora"])
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path, reference, method):
    want = reference(method)
    # Every kill point for the methods of the checkpoint's mechanics (fedavg, FedRouter's client state); the
    # dearer runs are killed mid-round only, the point where their own state (local adapters, task clusters)
    # must have been checkpointed.
    for point in KILL_POINTS if method in ("fedavg", "fedrouter-dual") else ["round-2.aggregate"]:
        out = tmp_path / point.replace("@", "-")
        killed_at(method, out, point)
        assert not out.exists() and list(Checkpoints(out, {}).steps()), f"{point}: no checkpoint kept"
        refused = cli("run", config(method), "--out", out, "--smoke")  # never silently over days of work
        assert refused.exit_code == 2 and "--resume" in refused.output
        done = cli("run", config(method), "--out", out, "--smoke", "--resume")
        assert done.exit_code == 0, done.output
        assert_same_run(want, out)
        assert not Checkpoints(out, {}).exists()  # the run folder is whole: the checkpoints are gone


@pytest.mark.parametrize("point", ["setup.done", "checkpoint.files@3", "checkpoint.before_rename@2",
                                   "checkpoint.after_rename@1", "final.before_rename"])
def test_a_crash_at_every_point_of_the_checkpoint_write_resumes_to_the_same_result(tmp_path, reference, point):
    out = tmp_path / "run"
    killed_at("fedavg", out, point)
    assert not out.exists()
    assert cli("run", config("fedavg"), "--out", out, "--smoke", "--resume").exit_code == 0
    assert_same_run(reference("fedavg"), out)


def test_kill_by_pid_from_outside_then_resume(tmp_path):
    """A real `kill -9` at whatever point the run has reached after its second checkpoint."""
    extra = ["--set", "train.rounds=30"]
    want = tmp_path / "want"
    assert cli("run", config("fedrouter-dual"), "--out", want, "--smoke", *extra).exit_code == 0
    out = tmp_path / "run"
    args = [sys.executable, "-m", "taskfed.cli", "run", str(config("fedrouter-dual")), "--out", str(out), "--smoke", *extra]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (Checkpoints(out, {}).folder / "ckpt-00002").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not out.exists()
    done = cli("run", config("fedrouter-dual"), "--out", out, "--smoke", "--resume", *extra)
    assert done.exit_code == 0 and "resumed from" in done.output, done.output
    assert_same_run(want, out)


# ----------------------------------------------------------------------------- damaged state at rest
@pytest.fixture
def stopped(tmp_path, monkeypatch):
    """A FedAvg smoke run stopped (in this process) during its evaluation: checkpoints of round 2 and of
    round 1 are kept."""
    monkeypatch.setenv("TASKFED_FAULT", "eval.local:raise")
    faults.reset()
    out = tmp_path / "run"
    result = cli("run", config("fedavg"), "--out", out, "--smoke")
    assert result.exit_code == 1 and "injected fault at eval.local" in result.output, result.output
    monkeypatch.delenv("TASKFED_FAULT")
    steps = Checkpoints(out, {}).steps()
    assert [p.name for p in steps] == ["ckpt-00001", "ckpt-00002"]
    return out, steps


def one_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def resume(out, *extra):
    return cli("run", config("fedavg"), "--out", out, "--smoke", "--resume", *extra)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_client"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(stopped, reference, damage):
    out, steps = stopped
    newest = steps[-1]
    if damage == "truncate":
        f = newest / "server.safetensors"
        f.write_bytes(f.read_bytes()[:50])
    elif damage == "flip":
        f = newest / "driver.json"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    else:
        sorted(newest.glob("client.*.safetensors"))[0].unlink()  # one client's state is gone
    result = resume(out)
    assert result.exit_code == 0, result.output
    assert "checkpoint skipped" in result.output and "ckpt-00001" in result.output
    assert_same_run(reference("fedavg"), out)


def test_damage_with_no_good_checkpoint_left_is_one_error_line(stopped):
    out, steps = stopped
    for folder in steps:
        f = folder / "server.safetensors"
        f.write_bytes(f.read_bytes()[:-3])
    line = one_error(resume(out))
    assert "server.safetensors: checksum mismatch" in line and "remove it to start over" in line
    assert all(p.exists() for p in steps)  # nothing deleted


def test_another_format_version_is_refused(stopped):
    out, steps = stopped
    for folder in steps:
        doc = json.loads((folder / MANIFEST).read_text())
        doc["body"]["format"] = 0
        import hashlib
        doc["sha256"] = hashlib.sha256(json.dumps(doc["body"], sort_keys=True).encode()).hexdigest()
        (folder / MANIFEST).write_text(json.dumps(doc))
    assert f"checkpoint format 0, this taskfed reads format {FORMAT}" in one_error(resume(out))


def test_resuming_with_another_config_names_the_keys_that_differ(stopped):
    out, _ = stopped
    line = one_error(resume(out, "--set", "train.lr_max=0.001", "--set", "seed=3"))
    assert "another config" in line and "seed" in line and "train.lr_max" in line


def test_a_full_disk_while_checkpointing_keeps_the_last_good_one(tmp_path, reference, monkeypatch):
    monkeypatch.setenv("TASKFED_FAULT", "checkpoint.before_rename@3:enospc")
    faults.reset()
    out = tmp_path / "run"
    line = one_error(cli("run", config("fedavg"), "--out", out, "--smoke"))
    assert "No space left on device" in line and "ckpt-00001" in line and "--resume" in line
    assert [p.name for p in Checkpoints(out, {}).steps()] == ["ckpt-00000", "ckpt-00001"]
    assert not list(Checkpoints(out, {}).folder.glob(".ckpt-*"))  # the half-written one is gone
    monkeypatch.delenv("TASKFED_FAULT")
    assert resume(out).exit_code == 0
    assert_same_run(reference("fedavg"), out)


def _full_disk_at(monkeypatch, name: str, nth: int = 1) -> None:
    """safetensors' own error for a full disk ("... (os error 28)", as a full tmpfs gives it) at the nth
    write of a file called `name`."""
    from safetensors import SafetensorError

    import taskfed.state

    real, seen = taskfed.state.save_file, []

    def save_file(tensors, path):
        seen.append(Path(path).name == name)
        if seen.count(True) == nth and seen[-1]:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, path)

    monkeypatch.setattr(taskfed.state, "save_file", save_file)


@pytest.mark.parametrize("name, nth", [("server.safetensors", 3), ("adapter_model.safetensors", 1)])
def test_a_full_disk_inside_a_safetensors_write_is_one_line_and_resumes(tmp_path, reference, monkeypatch, name, nth):
    """In a checkpoint's tensors or in the final run folder's adapters: one line naming the file, the last good
    checkpoint kept, nothing half-written, and the resumed run is the uninterrupted one."""
    _full_disk_at(monkeypatch, name, nth)
    out = tmp_path / "run"
    line = one_error(cli("run", config("fedavg"), "--out", out, "--smoke"))
    assert "No space left on device" in line and name in line and "--resume" in line, line
    assert Checkpoints(out, {}).steps() and not out.exists()
    assert not list(tmp_path.rglob(".*tmp-*")) and not list(tmp_path.rglob(".adapter*"))
    monkeypatch.undo()
    assert resume(out).exit_code == 0
    assert_same_run(reference("fedavg"), out)


def test_resume_of_a_complete_run_is_refused_and_without_checkpoints_starts(tmp_path, reference):
    done = reference("fedavg")
    assert "a complete run" in one_error(resume(done))
    fresh = tmp_path / "fresh"
    result = resume(fresh)
    assert result.exit_code == 0 and "starting from the beginning" in result.output
    assert_same_run(done, fresh)


def test_leftovers_of_the_final_write_window_heal_on_the_next_run(tmp_path, reference):
    """A kill before the final rename leaves `.run.tmp-*`: the resumed run completes without it. A kill between
    the rename and the checkpoints' removal leaves `run.partial` beside a complete run: the next command
    removes it and says the run is complete."""
    out = tmp_path / "run"
    killed_at("fedavg", out, "final.before_rename")
    assert list(tmp_path.glob(".run.tmp-*")) and not out.exists()
    result = resume(out)
    assert result.exit_code == 0 and "temporary run folder of a run killed" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert_same_run(reference("fedavg"), out)

    out = tmp_path / "again"
    killed_at("fedavg", out, "final.after_rename")
    assert (out / "metrics.json").exists() and Checkpoints(out, {}).exists()
    assert "a complete run: nothing to resume" in one_error(resume(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "run"]
    assert_same_run(reference("fedavg"), out)


def test_a_second_process_on_the_same_run_is_refused_at_start(tmp_path):
    """While one `taskfed run` holds OUT.partial, a second run or `--resume` into the same --out is refused
    before its model loads, naming the first's pid; the first is untouched and, once gone, the run resumes."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "taskfed.cli", "run", str(config("fedavg")), "--out", str(out), "--smoke"]
    first = subprocess.Popen(args, env=dict(ENV, TASKFED_FAULT="round-1.aggregate:hang"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not Checkpoints(out, {}).steps():  # setup checkpointed: the first holds the run
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.2)
        for extra in ([], ["--resume"]):
            line = one_error(cli("run", config("fedavg"), "--out", out, "--smoke", *extra))
            assert f"another taskfed process (pid {first.pid}) is running this run" in line
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    result = resume(out)
    assert result.exit_code == 0 and "resumed from" in result.output, result.output


def test_resume_refuses_edited_data_and_another_base_model(tmp_path, monkeypatch):
    """The checkpoint records each client's data digest and the base model's fingerprint: a training or test
    file edited between the stop and `--resume`, or another model, is refused (naming the client), where it
    used to resume to a result matching neither run. Test rows of a task nobody trains on get a note."""
    train, test = conftest.write_two_task_data(tmp_path / "data", n_train=8, n_test=2)
    with test.open("a") as f:
        f.write("\n" + json.dumps({"instruction": "x", "output": "y", "task": "nobody"}))
    args = ["--smoke", "--set", "data.source=json", "--set", f"data.train_path={train}", "--set", f"data.test_path={test}"]
    out = tmp_path / "run"
    monkeypatch.setenv("TASKFED_FAULT", "eval.local:raise")
    faults.reset()
    result = cli("run", config("fedavg"), "--out", out, *args)
    assert result.exit_code == 1 and "test rows of tasks no client trains on are not evaluated: 'nobody' (1)" in result.output
    monkeypatch.delenv("TASKFED_FAULT")
    rows = json.loads(train.read_text())
    rows[0]["output"] += "!"
    train.write_text(json.dumps(rows))
    line = one_error(cli("run", config("fedavg"), "--out", out, "--resume", *args))
    assert "the training or test rows of client 0 changed since the run was interrupted" in line, line
    rows[0]["output"] = rows[0]["output"][:-1]
    train.write_text(json.dumps(rows))
    import taskfed.runtime

    monkeypatch.setattr(taskfed.runtime, "fingerprint", lambda model, tokenizer: "another")
    assert "the base model of client 0 changed" in one_error(cli("run", config("fedavg"), "--out", out, "--resume", *args))
    monkeypatch.undo()
    result = cli("run", config("fedavg"), "--out", out, "--resume", *args)
    assert result.exit_code == 0 and "resumed from" in result.output, result.output


# ----------------------------------------------------------------------------- the state codec
def test_state_tree_keeps_types_keys_identity_and_values(tmp_path):
    shared = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    value = {
        "adapters": [shared, shared, {"w": torch.ones(2, 3, dtype=torch.bfloat16)}],
        "binding": {"03": np.array([2, 0], dtype=np.int64), "04": np.array([True, False])},
        "pairs": {("03", 1): np.float64(0.25), 7: float("nan"), None: float("-inf")},
        "groups": {1, 2}, "labels": ("a", "b"), "count": np.int64(3), "none": None,
        "centroids": np.random.default_rng(0).normal(size=(3, 4)),
    }
    save_tree(value, tmp_path, "s")
    back = load_tree(tmp_path, "s")
    assert back["adapters"][0] is back["adapters"][1] and back["adapters"][0] is not back["adapters"][2]
    assert torch.equal(back["adapters"][0]["w"], shared["w"]) and back["adapters"][2]["w"].dtype == torch.bfloat16
    assert back["binding"]["03"].dtype == np.int64 and back["binding"]["04"].dtype == np.bool_
    assert np.array_equal(back["binding"]["03"], [2, 0]) and np.array_equal(back["centroids"], value["centroids"])
    assert back["pairs"][("03", 1)] == 0.25 and isinstance(back["pairs"][("03", 1)], np.float64)
    assert np.isnan(back["pairs"][7]) and back["pairs"][None] == float("-inf")
    assert back["groups"] == {1, 2} and back["labels"] == ("a", "b") and back["count"] == 3 and back["none"] is None
    tree, tensors = pack(value)
    assert len(tensors) == 5  # the shared adapter's tensor stored once
    assert unpack(tree, tensors)["pairs"].keys() == value["pairs"].keys()


def test_state_tree_refuses_what_it_cannot_keep():
    with pytest.raises(TaskfedError, match=r"state\['x'\]: a value of type object"):
        pack({"x": object()})
    with pytest.raises(TaskfedError, match="dtype <U1"):
        pack({"x": np.array(["a"])})
