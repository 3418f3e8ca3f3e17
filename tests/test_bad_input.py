"""Bad input of every class in issue 18: one `error:` line naming the key, file or row, exit code 2, nothing
left behind; bugs as one line with exit code 1; SIGTERM like Ctrl-C; a seeded fuzz over configs and data."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
from typer.testing import CliRunner

import taskfed.run
from taskfed.cli import app
from taskfed.config import load_config
from taskfed.errors import TaskfedError
from tests.conftest import ROOT, write_two_task_data

runner = CliRunner()
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"), FLWR_TELEMETRY_ENABLED="0", TOKENIZERS_PARALLELISM="false")


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _one_error(result, code: int = 2) -> str:
    """The result is exit `code` with exactly one `error:` line and no traceback; returns that line."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def _no_leftovers(folder: Path) -> None:
    assert not [p for p in folder.rglob(".*.tmp-*")], list(folder.rglob(".*.tmp-*"))


def _never_run(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(taskfed.run, "run_experiment", fail)


# ----------------------------------------------------------------------------- 1. --version, demo help
def test_version_and_demo_help():
    result = _cli("--version")
    assert result.exit_code == 0 and result.output.strip() == f"taskfed {taskfed.__version__}"
    text = " ".join(_cli("demo", "--help").output.split())
    assert "Local, FedAvg and FedRouter" in text


# ----------------------------------------------------------------------------- 2. config validation
@pytest.mark.parametrize("override, message", [
    ("train.rounds=true", "'train.rounds': Input should be a valid integer, got bool True"),
    ('train.rounds="2"', "'train.rounds': Input should be a valid integer, got str '2'"),
    ("train.lr_max=inf", "'train.lr_max': inf is not a finite number"),
    ("train.lr_max=nan", "'train.lr_max': nan is not a finite number"),
    ("lora.alpha=inf", "'lora.alpha': inf is not a finite number"),
    ("scenario.alpha=-inf", "'scenario.alpha': -inf is not a finite number"),
    ("train.lr_max=100.0", "'train.lr_max': Input should be less than or equal to 10"),
    ("method.mu=inf", "'method.mu': inf is not a finite number"),
    ("train.lr_min=0.01", "train.lr_min = 0.01 is above train.lr_max = 0.0005"),
    ("eval.modes=[]", "'eval.modes': List should have at least 1 item"),
    ("train.steps=1000000", "the budget trains 1.28e+09 rows"),
    ("train.rounds=1000000", "'train.rounds': Input should be less than or equal to 100000"),
    ("seed=-1", "'seed': Input should be greater than or equal to 0"),
    (f"seed={2**63}", "'seed': Input should be less than 9223372036854775808"),
    ("model.device=gpu", "unknown device 'gpu'"),
    # A run that would silently do less than asked (issue 30, class 16): an unseen mode with nothing held out.
    ('eval.modes=["unseen"]', "eval.modes includes 'unseen' but data.unseen_tasks is empty"),
])
def test_config_values_are_strict_finite_and_consistent(override, message):
    base = ["method.name=fedprox"] if override.startswith("method.") else []
    with pytest.raises(TaskfedError) as err:
        load_config(None, base + [override])
    assert message in str(err.value) and str(err.value).startswith(f"--set {override}" if "above" not in message
                                                                     and "budget" not in message else "--set")


@pytest.mark.parametrize("table", [{"name": "fedprox", "mu": float("inf")}, {"name": "ifca", "init_std": float("inf")},
                                   {"name": "ifca", "n_clusters": True}, {"name": "feddpa-t", "a": "0.5"}])
def test_method_params_strict_and_finite_both_ways(table):
    from taskfed.methods import check_params, method_params

    key = next(k for k in table if k != "name")
    for check in (check_params, method_params):
        with pytest.raises(TaskfedError, match=f"'method.{key}'"):
            check(table, "c.toml")


def test_a_cluster_round_past_the_last_round_is_refused_and_smoke_brings_it_within(tmp_path, monkeypatch):
    """clustered FL's cluster_round >= train.rounds would never cluster (the run would be FedAvg): refused
    in the config, before torch; --smoke (2 rounds) runs the last round as cluster_round and says so."""
    from taskfed.config import smoke

    with pytest.raises(TaskfedError, match=r"--set method.cluster_round=10: bad value for 'method.cluster_round': "
                                           r"round 10 \(from 0\) is past the last round of train.rounds = 10"):
        load_config(None, ["method.name=clustered", "method.cluster_round=10"])
    cfg = load_config(None, ["method.name=clustered", "method.cluster_round=9"])
    assert cfg.method["cluster_round"] == 9 and smoke(cfg).method["cluster_round"] == 1
    _never_run(monkeypatch)
    result = _cli("run", ROOT / "configs" / "clustered.toml", "--out", tmp_path / "o", "--smoke", "--set",
                  "method.cluster_round=5")
    assert "note: --smoke runs method.cluster_round = 1, within its 2 rounds" in result.output
    assert "training started" in result.output  # the run went on (to the stand-in) after the note


def test_method_models_read_from_source_equal_the_imported_ones():
    from taskfed.methods import METHODS
    from taskfed.paramspec import param_models

    fast = param_models()
    assert set(fast) == set(METHODS)
    for name, cls in METHODS.items():
        assert fast[name].model_json_schema() == cls.Params.model_json_schema(), name


def test_validating_a_config_imports_no_torch(tmp_path):
    code = ("import sys; from taskfed.config import load_config\n"
            "try:\n    load_config(None, ['method.name=fltac', 'method.weighted=1'])\nexcept Exception as e: print(e)\n"
            "load_config(None, ['method.name=fedrouter', 'method.n_local=3'])\n"
            "print(sorted(m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "'method.weighted'" in out.stdout and out.stdout.strip().endswith("[]")


@pytest.mark.parametrize("content, message", [
    (b"", "the config file is empty (write `version = 1` to run every default)"),
    (b"# only a comment\n", "the config file is empty"),
    (b"[train]\nrounds = 2\nname = \"\xff\"\n", "not UTF-8 text (byte 0xff at offset 27)"),
    (b"a = " + b"[" * 3000 + b"]" * 3000 + b"\n", "malformed TOML (nested too deep)"),
    (b"[method]\nname = \"fedavg\"\nx = " + b"[" * 20 + b"]" * 20 + b"\n", "nested more than 16 levels deep"),
])
def test_config_files_that_cannot_be_read(tmp_path, content, message, monkeypatch):
    _never_run(monkeypatch)
    path = tmp_path / "c.toml"
    path.write_bytes(content)
    line = _one_error(_cli("run", path, "--out", tmp_path / "out"))
    assert message in line and str(path) in line
    assert not (tmp_path / "out").exists()


def test_version_alone_runs_the_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("version = 1\n")
    assert load_config(path).method_name == "fedavg"


# ----------------------------------------------------------------------------- 3. the error printer
def test_user_text_is_printed_verbatim_and_set_errors_name_set(tmp_path, monkeypatch):
    weird = tmp_path / "[/x]" / "[hub]c.toml"
    assert "[/x]/[hub]c.toml: config file does not exist" in _one_error(_cli("run", weird, "--out", tmp_path / "o"))
    cfg = ROOT / "configs" / "fedavg.toml"
    line = _one_error(_cli("run", cfg, "--out", tmp_path / "o", "--set", "train.rounds=0"))
    assert line.startswith("error: --set train.rounds=0: bad value for 'train.rounds'")
    line = _one_error(_cli("run", cfg, "--out", tmp_path / "o", "--set", "=5"))
    assert "--set =5: expected key=value with a dotted key" in line
    line = _one_error(_cli("run", cfg, "--out", tmp_path / "o", "--set", "method.mu=0.1"))
    assert line.startswith("error: --set method.mu=0.1: unknown key 'method.mu' for method 'fedavg'")
    monkeypatch.chdir(ROOT)
    line = _one_error(_cli("run", cfg, "--out", tmp_path / "o", "--smoke", "--set", "data.path=[hub]/[/x]"))
    assert "[hub]/[/x]: FedDPA data directory does not exist" in line


def test_a_bug_is_one_line_with_type_and_place_never_locals(tmp_path, monkeypatch):
    def buggy(cfg, out, log, resume=False):
        secret_rows = ["client 3's private row"]  # noqa: F841  (a local a pretty traceback would print)
        return {}["eval"]

    monkeypatch.setattr(taskfed.run, "run_experiment", buggy)
    result = _cli("run", ROOT / "configs" / "fedavg.toml", "--out", tmp_path / "o")
    line = _one_error(result, code=1)
    assert "internal error: KeyError: 'eval'" in line and "test_bad_input.py:" in line
    assert "private row" not in result.output


def test_sigterm_during_a_run_keeps_the_last_checkpoint_and_says_how_to_resume(tmp_path):
    train, test = write_two_task_data(tmp_path / "data", n_train=40, n_test=10)
    out = tmp_path / "runs" / "r"
    args = [sys.executable, "-m", "taskfed.cli", "run", str(ROOT / "configs" / "fedavg.toml"), "--out", str(out),
            "--set", "model.name=tiny", "--set", "data.source=json", "--set", f"data.train_path={train}",
            "--set", f"data.test_path={test}", "--set", "scenario.name=iid", "--set", "scenario.n_clients=2",
            "--set", "train.rounds=500", "--set", "train.steps=2", "--set", "train.batch=2"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        partial = out.parent / "r.partial"
        while not list(partial.glob("ckpt-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(partial.glob("ckpt-*")), "the run never checkpointed"
        time.sleep(0.5)  # well inside the rounds
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "error: interrupted (SIGTERM)" in err and "Traceback" not in err and "--resume" in err
    # The last lines agree: the checkpoint is kept and how to resume, never "the run folder was removed".
    assert "checkpoint is kept in" in err and "removed" not in err
    assert not out.exists() and not list(out.parent.glob(".r.tmp-*"))
    # What is left is complete checkpoints only (a half-written one never survives as one).
    kept = sorted(p.name for p in partial.iterdir() if p.name != ".lock")  # the lock file: free now, reused
    assert kept and all(name.startswith("ckpt-") for name in kept) and len(kept) <= 2, kept
    for name in kept:
        assert (partial / name / "manifest.json").exists()


# ----------------------------------------------------------------------------- 4. data files
def _data_case(tmp_path: Path, train: bytes | None, test: bytes | None, suffix: str = ".jsonl"):
    good_train, good_test = write_two_task_data(tmp_path / "good", n_train=8, n_test=2)
    tr, te = tmp_path / f"train{suffix}", tmp_path / "test.jsonl"
    tr.write_bytes(good_train.read_bytes() if train is None else train)
    te.write_bytes(good_test.read_bytes() if test is None else test)
    if suffix == ".jsonl" and train is None:
        tr.write_text("\n".join(json.dumps(r) for r in json.loads(good_train.read_text())))
    return tr, te


@pytest.mark.parametrize("train, test, message", [
    (b'{"instruction": "a", "output": "\xe9", "task": "t"}\n', None, "train.jsonl, line 1: not UTF-8 text (byte 0xe9"),
    (b"[" * 5000 + b"]" * 5000, None, "train.jsonl, line 1: malformed JSON (nested too deep)"),
    (b'{"instruction": "\\ud800 x", "output": "o", "task": "t"}\n', None,
     "train.jsonl, line 1: field 'instruction' holds an unpaired surrogate (\\ud800 at character 0)"),
    (None, b"", "test.jsonl: the test file holds no records"),
    (None, b'{"instruction": "a", "output": "b", "task": "other"}\n', "test.jsonl: no test record is of a task"),
])
def test_bad_data_files_are_one_line_naming_file_and_row(tmp_path, train, test, message, monkeypatch):
    tr, te = _data_case(tmp_path, train, test)
    result = _cli("run", ROOT / "configs" / "fedavg.toml", "--out", tmp_path / "o", "--smoke",
                  "--set", "data.source=json", "--set", f"data.train_path={tr}", "--set", f"data.test_path={te}")
    assert message in _one_error(result)
    assert not (tmp_path / "o").exists()
    _no_leftovers(tmp_path)


def test_a_data_path_that_is_a_directory(tmp_path):
    from taskfed.data.loaders import load_json

    (tmp_path / "d.json").mkdir()
    with pytest.raises(TaskfedError, match="d.json: data file is a directory"):
        load_json(tmp_path / "d.json", tmp_path / "d.json")


# ----------------------------------------------------------------------------- 5. sizes and names
def test_sizes_and_names_are_checked_against_the_model(monkeypatch, tiny_runtime_factory):
    from taskfed.model import loading
    from tests.conftest import tiny_config

    with pytest.raises(TaskfedError, match=r"'qkv' names no linear layer of tiny \(it has: down_proj, .*q_proj"):
        tiny_runtime_factory(tiny_config("lora.target_modules=['q_proj', 'qkv']"))
    # The output head is a linear layer, but not one an adapter can train (issue 30, class 9).
    with pytest.raises(TaskfedError, match=r"'lm_head' is tiny's output head, which taskfed does not adapt"):
        tiny_runtime_factory(tiny_config("lora.target_modules=['lm_head']"))
    monkeypatch.setattr(loading, "available_bytes", lambda device: 10**9)
    with pytest.raises(TaskfedError, match=r"lora.r = 100000: the adapters need about 4.5 GB .* more than the 1.0 GB"):
        tiny_runtime_factory(tiny_config("lora.r=100000"))
    tiny_runtime_factory(tiny_config("lora.r=8"))  # what fits, runs
    with pytest.raises(TaskfedError, match=r"no device 'cuda:7' on this machine \(it has: cpu"):
        loading.check_device("cuda:7")


# ----------------------------------------------------------------------------- 6. Dirichlet
def test_dirichlet_with_too_many_clients_is_one_sentence():
    from taskfed.data.records import Record
    from taskfed.data.scenarios import partition

    rows = [Record(f"i{i}", "o", f"t{i % 2}") for i in range(40)]
    with pytest.raises(TaskfedError, match="50 clients but only 40 training rows"):
        partition(rows, "dirichlet", 50, seed=0)
    with pytest.raises(TaskfedError, match="got no training rows in the 'dirichlet' scenario"):
        partition(rows, "dirichlet", 39, seed=0)  # every share under 1%: the largest kept, no 0/0
    with pytest.raises(TaskfedError, match="got no training rows"):  # a tiny alpha draws 0/0: no NaN cut points
        partition(rows, "dirichlet", 8, seed=0, alpha=1e-9)
    assert sum(map(len, partition(rows, "dirichlet", 2, seed=0, alpha=100.0))) == 40


# ----------------------------------------------------------------------------- 7. files
def test_flower_keys_and_certs_are_never_overwritten_without_force(tmp_path):
    from taskfed.flower.cli import app as flower

    run = lambda *a: runner.invoke(flower, [str(x) for x in a], catch_exceptions=False)  # noqa: E731
    assert run("node-key", tmp_path, "n1").exit_code == 0
    key = (tmp_path / "n1").read_bytes()
    assert "n1.pub: already exist; refusing to overwrite (use --force" in _one_error(run("node-key", tmp_path, "n1"))
    assert (tmp_path / "n1").read_bytes() == key
    assert run("node-key", tmp_path, "n1", "--force").exit_code == 0 and (tmp_path / "n1").read_bytes() != key
    for bad in ("../evil", "a/b", "..", ".hidden", ""):
        assert "expected a plain file name" in _one_error(run("node-key", tmp_path / "k", bad))
    assert not (tmp_path / "evil").exists() and not (tmp_path / "k").exists()
    assert run("certs", tmp_path / "tls").exit_code == 0
    assert "refusing to overwrite" in _one_error(run("certs", tmp_path / "tls"))
    assert run("certs", tmp_path / "tls", "--force").exit_code == 0


def _suite(tmp_path: Path, methods: str = '{ name = "fedavg" }') -> Path:
    path = tmp_path / "suite.toml"
    path.write_text(f'version = 1\nname = "t"\nseeds = [0]\n[base.model]\nname = "tiny"\n'
                    f'[[scenario]]\nlabel = "dual"\nmethods = [{methods}]\n')
    return path


@pytest.mark.parametrize("label", ["../..", "", "a/b", ".", ".x"])
def test_suite_method_labels_are_folder_names(tmp_path, label):
    from taskfed.bench.suite import cells, load_suite

    with pytest.raises(TaskfedError, match="method label .* is not a folder name"):
        cells(load_suite(_suite(tmp_path, f'{{ name = "fedavg", label = "{label}" }}')), "s")


def test_an_interrupted_bench_prints_its_own_resume_command(tmp_path, monkeypatch):
    """A bench resumes by rerunning the same command (no --resume): Ctrl-C in its second cell says so, with
    the count of finished cells, and the cell's own line says "rerun the same command", not "with --resume"."""
    import taskfed.run

    real, calls = taskfed.run.run_experiment, []

    def second_interrupted(cfg, folder, **kw):
        calls.append(folder)
        if len(calls) == 2:
            kw["log"]("stopped; the last checkpoint is kept in X: rerun the same command to continue from it")
            raise KeyboardInterrupt
        return real(cfg, folder, **kw)

    monkeypatch.setattr(taskfed.run, "run_experiment", second_interrupted)
    monkeypatch.setattr(sys, "argv", ["taskfed", "bench", str(tmp_path / "suite.toml"), "--out", str(tmp_path / "b"), "--smoke"])
    result = _cli("bench", _suite(tmp_path), "--out", tmp_path / "b", "--smoke")
    assert result.exit_code == 130 and "error: interrupted (Ctrl-C)." in result.output
    line = next(l for l in result.output.splitlines() if "bench stopped" in l)
    assert "1 of 2 cells finished" in line and f"rerun `taskfed bench {tmp_path / 'suite.toml'} --out {tmp_path / 'b'} --smoke`" in line


def test_bench_refuses_a_folder_of_other_files_and_stamps_only_a_valid_suite(tmp_path):
    from taskfed.bench.suite import run_bench

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "suite.toml").write_text("my own file")
    with pytest.raises(TaskfedError, match="is not a bench"):
        run_bench(_suite(tmp_path), mine, smoke=True, log=lambda s: None)
    assert [p.name for p in mine.iterdir()] == ["suite.toml"] and (mine / "suite.toml").read_text() == "my own file"
    out = tmp_path / "b"
    with pytest.raises(TaskfedError, match="unknown key 'method.mu'"):
        run_bench(_suite(tmp_path, '{ name = "fedavg", mu = 1 }'), out, smoke=True, log=lambda s: None)
    assert not out.exists()


@pytest.mark.parametrize("edit, key", [
    (lambda m: m["eval"]["local"].update(score="0.5"), "eval.local.score"),
    (lambda m: m.update(eval=[1]), "eval"),
    (lambda m: m["rounds"][0].update(seconds="long"), "rounds.0.seconds"),
    (lambda m: m["eval"]["local"]["per_client"]["0"]["per_task"]["a"].update(rouge1=None), "rouge1"),
])
def test_report_on_hand_edited_metrics_names_file_and_key(tmp_path, edit, key):
    from tests.test_bench import _fake_metrics

    metrics = _fake_metrics("fedavg", "dual", 0, 0.5, {"a": 0.5})
    edit(metrics)
    path = tmp_path / "dual" / "fedavg" / "seed-0" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(metrics))
    line = _one_error(_cli("report", tmp_path))
    assert f"{path}: bad value for '" in line and key in line


def test_report_refuses_what_is_in_its_way_and_metrics_without_per_client(tmp_path):
    """report.md that is a folder, figures that is a file: one line naming it, nothing else touched; a mode
    without `per_client` (the per-task tables read it) is refused like any other wrong edit."""
    from tests.test_bench import _fake_metrics

    path = tmp_path / "dual" / "fedavg" / "seed-0" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_fake_metrics("fedavg", "dual", 0, 0.5, {"a": 0.5})))
    (tmp_path / "report.md").mkdir()
    assert "report.md: is in the way of the report" in _one_error(_cli("report", tmp_path))
    (tmp_path / "report.md").rmdir()
    (tmp_path / "figures").write_text("mine")
    assert "figures: is in the way of the report" in _one_error(_cli("report", tmp_path))
    assert (tmp_path / "figures").read_text() == "mine" and not (tmp_path / "report.md").exists()
    (tmp_path / "figures").unlink()
    metrics = json.loads(path.read_text())
    del metrics["eval"]["local"]["per_client"]
    path.write_text(json.dumps(metrics))
    line = _one_error(_cli("report", tmp_path))
    assert f"{path}: bad value for 'eval.local.per_client'" in line, line


@pytest.mark.parametrize("index", ['[1, 2]', '{"x": 3}', '{"x": {"kind": "adapter", "file": "../outside.safetensors"}}',
                                   '{"x": {"kind": "strings", "value": 5}}'])
def test_a_corrupt_client_store_index_never_reads_outside(tmp_path, index):
    import numpy as np

    from taskfed.flower.store import load_store, save_store

    save_store({"labels": np.array([1, 2])}, tmp_path / "s")
    (tmp_path / "outside.safetensors").write_bytes(b"not read")
    (tmp_path / "s" / "store.json").write_text(index)
    with pytest.raises(TaskfedError, match="corrupt client store"):
        load_store(tmp_path / "s")


# ----------------------------------------------------------------------------- 8. --out
def test_out_that_cannot_be_a_run_folder_is_refused_before_training(tmp_path, monkeypatch):
    _never_run(monkeypatch)
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    cfg = ROOT / "configs" / "fedavg.toml"
    for out, message in [(tmp_path / "file", "exists and is not a folder"), ("/dev/null", "exists and is not a folder"),
                         (tmp_path / "link", "is a symbolic link"), (tmp_path / "dangling", "is a symbolic link"),
                         (".", "names the current or a parent folder"), (tmp_path / "file" / "run", "is not a folder")]:
        assert message in _one_error(_cli("run", cfg, "--out", out)), out
    monkeypatch.chdir(tmp_path / "empty")
    assert "names the current" in _one_error(_cli("run", cfg, "--out", tmp_path / "empty"))


def test_out_names_and_places_that_fail_later_are_refused_before_loading(tmp_path, monkeypatch):
    """A name whose `.partial` sibling is too long, a place where folders cannot be created, a file where the
    checkpoints go: refused before the model loads (training never starts), nothing left behind."""
    _never_run(monkeypatch)
    cfg = ROOT / "configs" / "fedavg.toml"
    longest = tmp_path / ("r" * 250)  # fits itself; NAME.partial and .NAME.tmp-XXXXXXXX do not
    assert "the name is too long" in _one_error(_cli("run", cfg, "--out", longest))
    assert "cannot create folders in /proc" in _one_error(_cli("run", cfg, "--out", "/proc/x"))
    assert "cannot create folders in /proc" in _one_error(_cli("run", cfg, "--out", "/proc/x/deep/run"))
    (tmp_path / "run.partial").write_text("mine")
    for extra in ([], ["--resume"]):
        line = _one_error(_cli("run", cfg, "--out", tmp_path / "run", *extra))
        assert "run.partial: exists and is not a folder" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.partial"]
    assert (tmp_path / "run.partial").read_text() == "mine"


def test_a_diverged_training_is_reported_as_divergence_not_as_missing_clients(tmp_path):
    """Every upload NaN (FedProx with mu = 1e308): the run says training diverged, on which clients, in which
    round, with the loss and what to change; it keeps the checkpoint and does not suggest --resume."""
    out = tmp_path / "run"
    result = _cli("run", ROOT / "configs" / "fedprox.toml", "--out", out, "--smoke", "--set", "method.mu=1e308")
    line = _one_error(result)
    assert line.startswith("error: round 1: training diverged on clients 0, 1") and "training loss nan" in line
    assert "train.lr_max" in line and "bring the clients back" not in result.output
    assert "--resume to continue" not in result.output
    assert [p.name for p in (tmp_path / "run.partial").iterdir() if p.name.startswith("ckpt-")] == ["ckpt-00000"]


def test_parents_created_for_a_failed_run_are_removed(tmp_path):
    from taskfed.runfolder import discard, finish_out, prepare_out

    (tmp_path / "a").mkdir()
    tmp = prepare_out(tmp_path / "a" / "b" / "c" / "run")
    assert tmp.parent == tmp_path / "a" / "b" / "c"
    discard(tmp)
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and not any((tmp_path / "a").iterdir())
    tmp = prepare_out(tmp_path / "x" / "run")
    finish_out(tmp, tmp_path / "x" / "run")
    assert (tmp_path / "x" / "run").is_dir()


def test_a_run_that_fails_midway_leaves_no_parent_folders(tmp_path, monkeypatch):
    def boom(self):
        raise TaskfedError("boom")

    monkeypatch.setattr(taskfed.run.Experiment, "train", boom)
    monkeypatch.chdir(ROOT)
    result = _cli("run", ROOT / "configs" / "fedavg.toml", "--out", tmp_path / "new" / "deep" / "run", "--smoke")
    assert _one_error(result) == "error: boom"
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 10. fuzz
BAD_VALUES = [True, False, "2", "", -1, 0, 10**30, float("inf"), float("-inf"), float("nan"), 1e-300, [], [1, "a"],
              {}, {"x": 1}, "x" * 300, "[/x]", "\u0000", 2**63, 0.5]


def _fuzz_case(rng: random.Random, base: dict, train: list[dict]) -> tuple[bytes, bytes]:
    """One mutation of the config (a value, a missing or extra key, the file's encoding or nesting) or of the
    training data (a field's type, encoding, nesting, size)."""
    cfg, rows = json.loads(json.dumps(base)), json.loads(json.dumps(train))
    kind = rng.choice(["value", "value", "value", "drop", "extra", "encoding", "nesting", "data"])
    table = rng.choice([k for k in cfg if isinstance(cfg[k], dict)])
    key = rng.choice(list(cfg[table]) or ["x"])
    cfg_bytes = None
    if kind == "value":
        cfg[table][key] = rng.choice(BAD_VALUES)
    elif kind == "drop":
        cfg[table].pop(key, None)
    elif kind == "extra":
        cfg[table][rng.choice(["extra", key + "_", "NAME"])] = rng.choice(BAD_VALUES)
    elif kind == "nesting":
        value: object = 1
        for _ in range(rng.choice([5, 20, 2000])):
            value = [value]
        cfg[table][key] = value
    try:
        text = tomli_w.dumps(cfg)
    except (TypeError, ValueError, RecursionError):
        text = "version = 1\n[train]\nrounds = [[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]\n"
    cfg_bytes = text.encode()
    if kind == "encoding":
        cfg_bytes = rng.choice([text.encode("utf-16"), text.encode("utf-8")[: rng.randrange(len(text))],
                                text.encode("utf-8").replace(b"=", b"\xff=", 1), b"\x00" + text.encode()])
    data_bytes = json.dumps(rows).encode()
    if kind == "data":
        row = rng.randrange(len(rows))
        field = rng.choice(["instruction", "output", "task", "category", "extra"])
        how = rng.choice(["type", "drop", "surrogate", "latin1", "nesting", "empty", "huge"])
        if how == "type":
            rows[row][field] = rng.choice([1, None, 2.5, [], {}, True])
        elif how == "drop":
            rows[row].pop(field, None)
        elif how == "surrogate":
            rows[row][field] = "\ud800"
        elif how == "huge":
            rows[row][field] = "w " * 5000
        data_bytes = json.dumps(rows).encode()
        if how == "latin1":
            data_bytes = data_bytes.replace(b"apple", "\u00e9pple".encode("latin-1"))
        elif how == "nesting":
            data_bytes = b"[" * 3000 + b"]" * 3000
        elif how == "empty":
            data_bytes = b"[]"
    return cfg_bytes, data_bytes


def _fuzz_setup(tmp_path: Path):
    train, test = write_two_task_data(tmp_path / "data", n_train=6, n_test=2)
    base = {"version": 1, "seed": 0, "method": {"name": "fedprox", "mu": 0.01},
            "data": {"source": "json", "train_path": str(tmp_path / "train.json"), "test_path": str(test),
                     "max_length": 64},
            "scenario": {"name": "iid", "n_clients": 2},
            "model": {"name": "tiny"}, "lora": {"r": 2, "alpha": 4.0, "target_modules": ["q_proj"]},
            "train": {"rounds": 1, "steps": 1, "batch": 2, "lr_max": 0.001, "lr_min": 0.0},
            "eval": {"modes": ["local"], "max_rows_per_task": 1, "max_new_tokens": 2}}
    return base, json.loads(train.read_text())


def _check(result_code: int, output: str, elapsed: float, folder: Path) -> None:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert result_code == 0 and not errors or result_code == 2 and len(errors) == 1, (result_code, output)
    assert elapsed < 30, elapsed  # no hang
    _no_leftovers(folder)


def test_fuzz_configs_and_data_in_process(tmp_path):
    base, train = _fuzz_setup(tmp_path)
    rng, codes = random.Random(18), []
    for i in range(100):
        cfg_bytes, data_bytes = _fuzz_case(rng, base, train)
        (tmp_path / "c.toml").write_bytes(cfg_bytes)
        (tmp_path / "train.json").write_bytes(data_bytes)
        out = tmp_path / "runs" / f"r{i}"
        tic = time.monotonic()
        result = runner.invoke(app, ["run", str(tmp_path / "c.toml"), "--out", str(out), "--smoke"])
        assert result.exception is None or isinstance(result.exception, SystemExit), (cfg_bytes, result.exception)
        _check(result.exit_code, result.output, time.monotonic() - tic, tmp_path)
        assert out.exists() == (result.exit_code == 0)
        codes.append(result.exit_code)
    assert codes.count(2) > 50 and codes.count(0) >= 3  # both kinds of outcome were exercised


def test_fuzz_a_few_real_subprocess_runs(tmp_path):
    base, train = _fuzz_setup(tmp_path)
    rng = random.Random(7)
    for i in range(2):
        cfg_bytes, data_bytes = _fuzz_case(rng, base, train) if i else (tomli_w.dumps(base).encode(), json.dumps(train).encode())
        (tmp_path / "c.toml").write_bytes(cfg_bytes)
        (tmp_path / "train.json").write_bytes(data_bytes)
        tic = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "taskfed.cli", "run", str(tmp_path / "c.toml"), "--out",
                               str(tmp_path / f"r{i}"), "--smoke"], capture_output=True, text=True, env=ENV, timeout=120)
        _check(proc.returncode, proc.stderr + proc.stdout, time.monotonic() - tic - 20, tmp_path)  # minus imports
        if i == 0:
            assert proc.returncode == 0, proc.stderr


SUITE = {"version": 1, "name": "fuzz", "seeds": [0, 1], "reference": True,
         "base": {"model": {"name": "tiny"}, "train": {"rounds": 2}, "eval": {"modes": ["local", "global"]}},
         "scenario": [{"label": "dual", "config": {"scenario": {"name": "dual"}},
                       "methods": [{"name": "fedrouter"}, {"name": "clustered", "cluster_round": 1, "label": "cfl", "sweep": False}],
                       "epsilon_sweep": {"mechanism": "centroids", "epsilons": [1.0, 8.0], "clip": 1.0}},
                      {"label": "iid", "methods": [{"name": "fedprox", "mu": 0.01}]}]}


def _suite_case(rng: random.Random) -> bytes:
    """One mutation of a valid suite: a value anywhere in its tree, a key dropped or added, deep nesting."""
    suite = json.loads(json.dumps(SUITE))
    node, places = suite, []
    while isinstance(node, (dict, list)) and node and (not places or rng.random() < 0.7):
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        places.append((node, key))
        node = node[key]
    parent, key = places[-1]
    kind = rng.choice(["value", "value", "value", "drop", "extra", "nesting"])
    if kind == "value":
        parent[key] = rng.choice(BAD_VALUES + [[0, 0], ["1"], [1.0], "runs.json", "report.md", "cuda"])
    elif kind == "drop" and isinstance(parent, dict):
        del parent[key]
    elif kind == "extra" and isinstance(parent, dict):
        parent[rng.choice(["extra", f"{key}_", "seed", "method"])] = rng.choice(BAD_VALUES)
    else:
        value: object = 1
        for _ in range(rng.choice([5, 2000])):
            value = [value]
        parent[key] = value
    try:
        return tomli_w.dumps(suite).encode()
    except (TypeError, ValueError, RecursionError):
        return b"version = 1\nname = 'x'\nseeds = " + b"[" * 3000 + b"]" * 3000 + b"\n"


def test_fuzz_suite_files(tmp_path, monkeypatch):
    """Mutated suites through `taskfed bench --smoke`: each is one `error:` line naming the suite file (or its
    --device), exit 2, the bench folder never stamped; a suite that validates reaches the model loading (a
    stand-in here) with its folder stamped. Never a traceback."""
    import taskfed.runtime

    class Valid(TaskfedError):
        pass

    def loaded(cfg):
        raise Valid("VALID")

    monkeypatch.setattr(taskfed.runtime, "Runtime", loaded)
    rng, valid, path = random.Random(30), 0, tmp_path / "suite.toml"
    for i in range(120):
        path.write_bytes(_suite_case(rng))
        out = tmp_path / "benches" / f"b{i}"
        result = runner.invoke(app, ["bench", str(path), "--out", str(out), "--smoke"])
        assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, (path.read_text(), result.output)
        line = _one_error(result)
        if line == "error: VALID":
            valid += 1
            assert (out / "suite.json").exists()
        else:
            assert str(path) in line, (path.read_text(), line)
            assert not out.exists(), line
    assert 10 <= valid <= 100, valid  # both outcomes exercised
