"""The command line and the run folder: smoke runs of every config, errors, determinism."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from taskfed.cli import app
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.toml"))
runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_passes_smoke(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name data paths relative to the project root
    out = tmp_path / "run"
    result = _run("run", config, "--out", out, "--smoke")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["rounds"]) >= 2
    for mode, ev in metrics["eval"].items():
        assert ev["per_client"], mode
        for client in ev["per_client"].values():
            for task in client["per_task"].values():
                assert task["n"] > 0 and 0 <= task["rouge1"] <= 1
    assert (out / "config.toml").exists() and (out / "report.md").exists()


def test_metrics_schema_adapters_and_determinism(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert _run("run", ROOT / "configs" / "fedavg.toml", "--out", out, "--smoke").exit_code == 0
    a, b = (json.loads((o / "metrics.json").read_text()) for o in outs)
    assert {"method", "scenario", "seed", "bytes_communicated", "rounds", "eval"} <= set(a)
    assert set(a["rounds"][0]) >= {"round", "train_loss", "bytes_up", "bytes_down", "seconds"}
    assert set(a["eval"]) == {"local", "global"}
    client = next(iter(a["eval"]["global"]["per_client"].values()))
    assert set(next(iter(client["per_task"].values()))) == {"n", "rouge1", "rougeL", "exact_match"}

    def strip(m):  # everything but timings
        m = json.loads(json.dumps(m))
        for entry in [m] + m["rounds"] + list(m["eval"].values()):
            for key in [k for k in entry if k.endswith("seconds")]:
                entry.pop(key)
        return m

    assert strip(a) == strip(b)
    # The final adapter is a PEFT adapter folder.
    folder = outs[0] / "adapters" / "server" / "global"
    assert (folder / "adapter_model.safetensors").exists()
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # The resolved config runs again as it is.
    assert _run("run", outs[0] / "config.toml", "--out", tmp_path / "c", "--smoke").exit_code == 0


def test_smoke_says_which_set_items_it_replaces(tmp_path, monkeypatch):
    """--smoke swaps in the tiny model and a minimal budget: a --set of those keys is overridden, in one line
    each, never silently (issue 30, class 16)."""
    monkeypatch.chdir(ROOT)
    result = _run("run", ROOT / "configs" / "fedavg.toml", "--out", tmp_path / "s", "--smoke",
                  "--set", "model.name=smollm2", "--set", "train.rounds=5", "--set", "seed=3")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "note: --smoke replaces" in line]
    assert len(notes) == 2 and "model.name=smollm2" in notes[0] and "train.rounds=5" in notes[1]
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["seed"] == 3


@pytest.mark.parametrize("args, message", [
    (["--set", "train.rouns=3"], "unknown key 'train.rouns'"),
    (["--set", "train.rounds=-1"], "bad value for 'train.rounds'"),
    (["--set", "scenario.name=weird"], "bad value for 'scenario.name'"),
    (["--set", "method.name=nope"], "unknown method 'nope'"),
    (["--set", "method.mu=0.1"], "unknown key 'method.mu' for method 'fedavg'"),
    (["--set", "data.tasks=['nope']"], "unknown task 'nope'"),
    (["--set", "model.name=./no/such/model"], "model path does not exist"),
    (["--set", "data.path=/no/such/dir"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2_and_no_run_folder(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    smoke = [] if args[1].startswith("model.") else ["--smoke"]  # --smoke would swap in the tiny model
    result = _run("run", ROOT / "configs" / "fedavg.toml", "--out", out, *smoke, *args)
    assert result.exit_code == 2
    assert message in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]  # no temporary leftovers


def test_malformed_config_file_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nrounds = 2\n")
    result = _run("run", bad, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "bad.toml: malformed TOML" in result.output


def test_an_existing_run_folder_is_not_overwritten(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _run("run", ROOT / "configs" / "fedavg.toml", "--out", out, "--smoke")
    assert result.exit_code == 2 and "already exists" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_console_script_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-m", "taskfed.cli", "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "run" in proc.stdout and "demo" in proc.stdout


def test_demo_runs_its_methods_on_one_model_and_prints_the_table(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    # The demo's own data (BIG-bench) is a download: the same command on the FLAN files instead.
    result = _run("demo", "--out", tmp_path / "demo", "--smoke", "--set", "data.source=feddpa",
                  "--set", f"data.path={ROOT.parent / 'shared/data/flan-feddpa/dataset1'}",
                  "--set", "data.max_train_per_task=16")
    assert result.exit_code == 0, result.output
    table = (tmp_path / "demo" / "table.md").read_text()
    for name in ("local", "fedavg", "fedrouter"):
        assert f"| {name} |" in table and (tmp_path / "demo" / name / "metrics.json").exists()
    assert table.strip() in result.output
    # The demo's FedRouter routes at 4 layers on the real model (cheap routing when served); the tiny model
    # has 2, so under --smoke it embeds at full depth.
    from taskfed.demo import DEMO_METHODS
    assert next(t for t in DEMO_METHODS if t["name"] == "fedrouter")["embed_layers"] == 4
    resolved = tomllib.loads((tmp_path / "demo" / "fedrouter" / "config.toml").read_text())
    assert resolved["method"]["n_local"] == 2 and "embed_layers" not in resolved["method"]
    # What the demo says: from its first line where the runs go; the bars under each method's name; where
    # the runs are and how to serve them; its help counts the folders it writes.
    first = next(line for line in result.output.splitlines() if line.strip())
    assert "demo: local, fedavg, fedrouter on tiny" in first and f"run folders in {tmp_path / 'demo'}/" in first
    assert "demo 3/3: fedrouter: started" in result.output or "demo 3/3: fedrouter" in result.output
    assert f"taskfed serve {tmp_path / 'demo' / 'fedrouter'}" in result.output
    assert "three run folders" in _run("demo", "--help").output
    served = _run("serve", tmp_path / "demo", "--port", "0")  # the demo's folder, not one run: which to serve
    assert served.exit_code == 2 and "holds run folders (fedavg, fedrouter, local), not one run" in served.output


def test_demo_without_a_big_bench_archive_runs_on_the_flan_files_beside_the_checkout(tmp_path, monkeypatch):
    # PyPI serves only bigbench 0.0.1 (no task files): on a fresh machine pip cannot fetch 1.0.0's archive.
    import taskfed.data.bigbench as bigbench
    import taskfed.demo as demo

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("TASKFED_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TASKFED_BIGBENCH_ARCHIVE", raising=False)
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that satisfies the requirement")
    monkeypatch.setattr(bigbench, "_pip_download", lambda tmp: failed)
    result = _run("demo", "--out", tmp_path / "demo", "--smoke")
    assert result.exit_code == 0, result.output
    assert "no BIG-bench archive" in result.output and "The demo runs on the FedDPA FLAN files in" in result.output
    data = tomllib.loads((tmp_path / "demo" / "fedrouter" / "config.toml").read_text())["data"]
    assert data["source"] == "feddpa" and data["template"] == "plain"
    assert Path(data["path"]).resolve() == (ROOT.parent / "shared/data/flan-feddpa/dataset1").resolve()
    # Neither the archive nor the files: the download's error, and how to point the demo at FLAN files.
    monkeypatch.setattr(demo, "FLAN_BESIDE", Path("no/such/folder"))
    result = _run("demo", "--out", tmp_path / "demo2", "--smoke")
    assert result.exit_code != 0 and "failed (ERROR: Could not find a version" in result.output
    assert "--set data.source=feddpa --set data.path=" in result.output
    assert not (tmp_path / "demo2" / "local").exists()  # nothing half-written
