"""The benchmark harness: seed aggregation against hand-computed values, resume after an interruption,
the report's figures, and the suite's error messages."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from typer.testing import CliRunner

import taskfed.run
from taskfed import faults
from taskfed.bench import report as bench_report
from taskfed.bench.report import WALL_TIME_HEADING, build_report
from taskfed.bench.stats import CLAIMS, best_baseline, mean_ci, relative_gain
from taskfed.bench.suite import cells, load_suite, run_bench
from taskfed.cli import app
from taskfed.errors import TaskfedError
from taskfed.evaluation.rows import write_scores

from .conftest import FLAN


# ----------------------------------------------------------------------------- statistics
def test_mean_ci_against_hand_computed_values():
    # [1, 2, 3]: mean 2, s = 1, sem = 1/sqrt(3), t_{0.975, 2} = 4.302653 -> half width 2.484138.
    s = mean_ci([1.0, 2.0, 3.0])
    assert s.n == 3 and s.mean == pytest.approx(2.0)
    assert s.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert (s.low, s.high) == pytest.approx((2.0 - 2.484138, 2.0 + 2.484138), rel=1e-6)
    # [0.2, 0.4]: mean 0.3, s = 0.141421, sem = 0.1, t_{0.975, 1} = 12.706205 -> 1.2706205.
    assert mean_ci([0.2, 0.4]).half_width == pytest.approx(1.2706205, rel=1e-6)
    one = mean_ci([0.7])
    assert one.n == 1 and one.mean == 0.7 and one.half_width is None
    assert mean_ci([None, float("nan"), 0.5]).n == 1  # missing scores do not count as seeds


def test_relative_gain_and_best_baseline():
    assert relative_gain(0.53, 0.5) == pytest.approx(0.06)
    assert relative_gain(0.4, 0.5) == pytest.approx(-0.2)
    assert relative_gain(0.4, 0.0) is None
    names = {"local": "local", "fedavg": "fedavg", "fedrouter": "fedrouter", "prox": "fedprox"}
    means = {"local": 0.30, "fedavg": 0.35, "fedrouter": 0.50, "prox": 0.34}
    # FedRouter has the highest mean but is not a baseline.
    assert best_baseline(means, ["local", "fedavg", "fedprox"], names) == ("fedavg", 0.35)
    assert best_baseline({"fedrouter": 0.5}, ["fedavg"], {"fedrouter": "fedrouter"}) is None


def _fake_metrics(method: str, scenario: str, seed: int, score: float, per_task: dict[str, float]) -> dict:
    per_client = {"0": {"score": score, "per_task": {t: {"n": 2, "rouge1": v, "rougeL": v, "exact_match": 0.0}
                                                     for t, v in per_task.items()}}}
    return {"method": method, "scenario": scenario, "seed": seed, "bytes_communicated": 1000 * (method != "local"),
            "rounds": [{"round": 0, "train_loss": 2.0 - seed * 0.1, "bytes_up": 0, "bytes_down": 0, "seconds": 1.0,
                        "train_tokens": 100}],
            "eval": {"local": {"score": score, "per_client": per_client, "seconds": 1.0}}, "setup_seconds": 0.0}


def test_report_aggregates_seeds_and_checks_claims(tmp_path: Path):
    # FedDPA-F against FedIT in the single scenario: scores over three seeds chosen by hand.
    scores = {"fedavg": [0.30, 0.32, 0.34], "feddpa-f": [0.40, 0.41, 0.42], "local": [0.2, 0.2, 0.2]}
    for method, vals in scores.items():
        for seed, v in enumerate(vals):
            folder = tmp_path / "single" / method / f"seed-{seed}"
            folder.mkdir(parents=True)
            (folder / "metrics.json").write_text(json.dumps(_fake_metrics(method, "single", seed, v, {"a": v})))
    text = build_report(tmp_path)
    # fedavg: mean 0.32, s = 0.02, half width 4.302653 * 0.02 / sqrt(3) = 0.049683.
    assert "| fedavg | 3 | 0.3200 ± 0.0497 |" in text
    assert "| feddpa-f | 3 | 0.4100 ± 0.0248 |" in text
    assert "| local | 3 | 0.2000 ± 0.0000 |" in text
    # Relative to the best baseline (fedavg, 0.32): (0.41 - 0.32) / 0.32 = +28.1%.
    assert "+28.1% (vs fedavg)" in text
    # The P claim holds here: the gap 0.09 exceeds 0.0497 + 0.0248.
    claim = next(line for line in text.splitlines() if line.startswith("| FedDPA-F: above FedIT on P"))
    assert "0.4100 vs fedavg 0.3200" in claim and "| yes |" in claim
    assert claim.endswith("| n/a (no per-row scores) | | n/a | n/a |")  # these runs have no scores.csv to pair


def _scores_csv(folder: Path, values: list[float]) -> None:
    # Two clients answer the same test rows (as in the global mode): one unit per test row, not per client.
    rows = [{"mode": "local", "client": c, "task": "a", "row": i, "adapters": ["global"], "weights": [1.0],
             "rouge1": v, "rougeL": v, "exact_match": 0.0} for c in ("0", "1") for i, v in enumerate(values)]
    write_scores(folder / "scores.csv", rows)


def test_report_pairs_methods_on_their_rows_and_against_the_base_model(tmp_path: Path):
    """Same rows, same seeds: FedDPA-F is 0.1 above FedIT on every row (supported, however close the seed
    means); FedIT is level with the untrained base (inconclusive), FedDPA-F clearly above it."""
    rng = np.random.default_rng(0)
    for seed in range(2):
        base = rng.uniform(0.2, 0.6, 40)
        for method, rows in {"fedavg": base, "feddpa-f": base + 0.1, "base": base}.items():
            folder = tmp_path / "single" / method / f"seed-{seed}"
            folder.mkdir(parents=True)
            (folder / "metrics.json").write_text(json.dumps(_fake_metrics(method, "single", seed, float(rows.mean()),
                                                                          {"a": float(rows.mean())})))
            _scores_csv(folder, list(rows))
    text = build_report(tmp_path)
    claim = next(line for line in text.splitlines() if line.startswith("| FedDPA-F: above FedIT on P"))
    assert "+0.1000 [+0.1000, +0.1000] (n = 80) vs fedavg" in claim
    assert claim.endswith("| supported | 2 (met) |")  # no spread: any two pairs give a +-0.03 interval
    lines = text.splitlines()
    assert any(line.startswith("| feddpa-f | local | +0.1000") and line.endswith("| supported |") for line in lines)
    assert any(line.startswith("| fedavg | local | +0.0000") and line.endswith("| inconclusive at this budget |")
               for line in lines)
    assert (tmp_path / "figures" / "scores_single.png").stat().st_size > 1000


def test_report_pairs_fedrouter_with_each_rival_on_the_same_rows(tmp_path: Path):
    """Issue 29: FedRouter against FedALT and FedLEASE, row by row: 0.05 above FedALT on every row (supported),
    0.05 below FedLEASE (refuted); no rival table without FedRouter."""
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.6, 30)
    for method, rows in {"fedrouter": base, "fedalt": base - 0.05, "fedlease": base + 0.05}.items():
        folder = tmp_path / "dual" / method / "seed-0"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(_fake_metrics(method, "dual", 0, float(rows.mean()),
                                                                      {"a": float(rows.mean())})))
        _scores_csv(folder, list(rows))
    lines = build_report(tmp_path).splitlines()
    alt = next(line for line in lines if line.startswith("| fedrouter | fedalt | local |"))
    assert "+0.0500 [+0.0500, +0.0500] (n = 30)" in alt and alt.endswith("| supported |")
    lease = next(line for line in lines if line.startswith("| fedrouter | fedlease | local |"))
    assert "-0.0500" in lease and lease.endswith("| refuted |")
    import shutil

    shutil.rmtree(tmp_path / "dual" / "fedrouter")
    assert not any(line.startswith("| fedrouter | fed") for line in build_report(tmp_path).splitlines())


# ----------------------------------------------------------------------------- the suite
SUITE = f"""
version = 1
name = "test"
seeds = [0, 1]

[base.data]
source = "feddpa"
path = "{FLAN.as_posix()}"
tasks = ["snli", "trec"]

[base.eval]
modes = ["local", "global"]

[[scenario]]
label = "dual"
methods = [{{ name = "fedavg" }}, {{ name = "fedrouter", n_local = 2, n_global = 2 }}]
[scenario.config.scenario]
name = "dual"
n_clients = 2
"""


def _png(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def _stable(report: str) -> str:
    return report.split(WALL_TIME_HEADING)[0]


@pytest.fixture
def suite_file(tmp_path: Path) -> Path:
    path = tmp_path / "suite.toml"
    path.write_text(SUITE)
    return path


@pytest.fixture
def one_thread():
    """One torch thread: on a loaded machine a multi-threaded matmul may split its sums differently from
    one run to the next (the pool shrinks), and a flipped greedy token would fail an equality that is about
    resuming, not about thread scheduling."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_interrupted_bench_resumes_to_the_same_report(suite_file: Path, tmp_path: Path, monkeypatch, one_thread):
    whole = tmp_path / "whole"
    run_bench(suite_file, whole, smoke=True, log=lambda s: None)
    expected = (whole / "report.md").read_text()

    # Interrupt the second cell after its round 1: the first cell's folder is complete, the second has only
    # its checkpoints (folder.partial/), from which the rerun resumes it instead of restarting it.
    real = taskfed.run.run_experiment
    calls = []

    def interrupted(cfg, out_dir, **kw):
        calls.append(out_dir)
        if len(calls) == 2:
            monkeypatch.setenv("TASKFED_FAULT", "checkpoint.after_rename@2:raise")
            faults.reset()
        return real(cfg, out_dir, **kw)

    monkeypatch.setattr(taskfed.run, "run_experiment", interrupted)
    part = tmp_path / "part"
    with pytest.raises(faults.InjectedFault):
        run_bench(suite_file, part, smoke=True, log=lambda s: None)
    monkeypatch.delenv("TASKFED_FAULT")
    finished = sorted(p.parent.relative_to(part).as_posix() for p in part.glob("*/*/seed-*/metrics.json"))
    assert finished == ["dual/fedavg/seed-0"] and not (part / "report.md").exists()
    assert sorted(p.name for p in Path(f"{calls[1]}.partial").glob("ckpt-*")) == ["ckpt-00000", "ckpt-00001"]
    monkeypatch.setattr(taskfed.run, "run_experiment", real)

    ran = []
    run_bench(suite_file, part, smoke=True, log=ran.append)
    assert "6 cells, 1 finished earlier, 5 to run" in ran[0]  # fedavg, fedrouter and the base reference
    assert any(line.startswith("resumed from") and "(round 1 of 2)" in line for line in ran), ran
    resumed = (part / "report.md").read_text()
    assert _stable(resumed) == _stable(expected)
    assert "| fedrouter | 2 |" in resumed and "router accuracy" in resumed
    assert "| base | 2 |" in resumed and "paired gain over the base model" in resumed
    assert all((part / "dual" / m / "seed-0" / "scores.csv").exists() for m in ("fedavg", "fedrouter", "base"))
    names = {p.name for p in (part / "figures").iterdir()}
    assert {"scores_dual.png", "heatmap_dual.png", "loss_dual.png", "bytes_dual.png",
            "router_dual_fedrouter.png"} <= names
    assert all(_png(part / "figures" / n) for n in names)
    # `taskfed report` rebuilds the same report from the run folders alone.
    (part / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", str(part)])
    assert result.exit_code == 0, result.output
    assert _stable((part / "report.md").read_text()) == _stable(expected)


def test_a_changed_suite_does_not_mix_into_an_old_bench(suite_file: Path, tmp_path: Path):
    out = tmp_path / "b"
    (out / "dual" / "fedavg" / "seed-0").mkdir(parents=True)
    (out / "dual" / "fedavg" / "seed-0" / "metrics.json").write_text("{}")  # a finished cell of the other suite
    (out / "suite.json").write_text(json.dumps({"suite": {"name": "other"}, "smoke": True, "device": None}))
    with pytest.raises(TaskfedError, match="different suite"):
        run_bench(suite_file, out, smoke=True, log=lambda s: None)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace('name = "test"', 'name = "test"\nsedes = [1]'), "unknown key 'sedes'"),
    (lambda s: s.replace("n_global = 2", "n_globl = 2"), "scenario 'dual', method 'fedrouter': unknown key 'method.n_globl'"),
    (lambda s: s.replace('tasks = ["snli", "trec"]', 'tasks = ["snli", "trec"]\nmax_lenght = 9'), "unknown key 'data.max_lenght'"),
    (lambda s: s.replace('{ name = "fedavg" }', '{ name = "fedavg" }, { name = "fedavg" }'), "lists method 'fedavg' twice"),
    # Validated as strictly as a run config (issue 30, class 15): seeds are ints as written and distinct, and a
    # scenario label is never one of the bench's own files.
    (lambda s: s.replace("seeds = [0, 1]", 'seeds = ["1"]'), "bad value for 'seeds.0': Input should be a valid integer"),
    (lambda s: s.replace("seeds = [0, 1]", "seeds = [true]"), "bad value for 'seeds.0'"),
    (lambda s: s.replace("seeds = [0, 1]", "seeds = [1.0]"), "bad value for 'seeds.0'"),
    (lambda s: s.replace("seeds = [0, 1]", "seeds = [0, 0]"), "seed 0 is listed twice"),
    (lambda s: s.replace('label = "dual"', 'label = "runs.json"'), "label 'runs.json' is a name the bench writes itself"),
])
def test_suite_errors_name_the_file_and_key(suite_file: Path, edit, message):
    suite_file.write_text(edit(SUITE))
    with pytest.raises(TaskfedError, match=message.replace("(", r"\(")) as err:
        cells(load_suite(suite_file), str(suite_file))
    assert str(suite_file) in str(err.value)


def test_shipped_suites_validate_and_cover_the_three_papers():
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "suites"
    for name in ("quick", "paper"):
        grid = cells(load_suite(root / f"{name}.toml"), name)
        methods = {c.cfg.method_name for c in grid}
        assert {"feddpa-f", "feddpa-t", "fedrouter", "fltac", "fedavg"} <= methods
        assert {c.seed for c in grid} == {0, 1, 2}
        assert {c.cfg.scenario.name for c in grid} >= {"single", "dual", "dirichlet"}
    # FedRouter's two claims at the full test split: every test row of the 4 training and 4 held-out tasks.
    grid = cells(load_suite(root / "evidence-interference.toml"), "evidence-interference")
    assert {c.method for c in grid} == {"fedavg", "fedrouter", "base"}
    for c in grid:
        assert c.cfg.eval.max_rows_per_task == 200 and c.cfg.eval.modes == ["global", "unseen"]
        assert len(c.cfg.data.unseen_tasks) == 4 and not set(c.cfg.data.unseen_tasks) & set(c.cfg.data.tasks)
    # The rivals suite: FedRouter beside FedALT and FedLEASE in both settings, on the baselines suite's rows
    # (same data, model, budget and evaluation), so its cells pair with that suite's.
    grid = cells(load_suite(root / "rivals.toml"), "rivals")
    base = {c.method: c.cfg for c in cells(load_suite(root / "baselines.toml"), "baselines") if c.scenario == "dual"}
    for scenario in ("single", "dual"):
        assert {c.method for c in grid if c.scenario == scenario} == {"local", "fedavg", "fedalt", "fedlease",
                                                                         "fedrouter", "base"}
    for c in grid:
        assert (c.cfg.data, c.cfg.model, c.cfg.train, c.cfg.eval) == (base["fedavg"].data, base["fedavg"].model,
                                                                      base["fedavg"].train, base["fedavg"].eval)
        if c.scenario == "dual" and c.method in base:
            assert c.cfg == base[c.method]


def test_baselines_suite_runs_every_baseline_beside_the_seeds_methods_and_ranks_over_all(tmp_path: Path):
    """benchmarks/suites/baselines.toml: every baseline (BASELINES, old and new), FedRouter, FedDPA-F, FL-TAC and
    the base model in `single` and `dual`. The report's "best baseline" ranges over the new baselines too:
    on a smoke bench of its dual scenario cut to FedAvg, FedAvgM, FFA-LoRA and FedRouter, the best named is
    the highest mean of the three baselines."""
    import tomllib

    from taskfed.bench.suite import BASELINES

    suite = Path(__file__).resolve().parents[1] / "benchmarks" / "suites" / "baselines.toml"
    grid = cells(load_suite(suite), "baselines")
    want = set(BASELINES) | {"fedrouter", "feddpa-f", "fltac", "base"}
    assert {"fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fedsa-lora", "ffa-lora"} <= set(BASELINES)
    for scenario in ("single", "dual"):
        assert {c.method for c in grid if c.scenario == scenario} == want
    raw = tomllib.loads(suite.read_text())
    dual = next(s for s in raw["scenario"] if s["label"] == "dual")
    dual["methods"] = [m for m in dual["methods"] if m["name"] in ("fedavg", "fedavgm", "ffa-lora", "fedrouter")]
    raw["scenario"], raw["reference"] = [dual], False
    small = tmp_path / "small.toml"
    small.write_text(tomli_w.dumps(raw))
    out = tmp_path / "bl"
    result = CliRunner().invoke(app, ["bench", str(small), "--out", str(out), "--smoke"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "Baselines: " + ", ".join(BASELINES) + "." in report
    means = {m: json.loads((out / "dual" / m / "seed-0" / "metrics.json").read_text())["eval"]["global"]["score"]
             for m in ("fedavg", "fedavgm", "ffa-lora")}
    best = max(means, key=lambda m: (means[m], m))
    line = next(line for line in report.splitlines() if line.startswith("| fedrouter |") and "(vs " in line)
    assert line.rsplit("(vs ", 1)[1].startswith(best)


def test_bench_cli_smoke_and_device_flag(suite_file: Path, tmp_path: Path):
    grid = cells(load_suite(suite_file), "s", smoke=True, device="cuda:0")
    assert {(c.cfg.model.name, c.cfg.model.device, c.cfg.model.dtype) for c in grid} == {("tiny", "cuda:0", "bfloat16")}
    with pytest.raises(TaskfedError, match=r"--device tpu: unknown device 'tpu'"):
        cells(load_suite(suite_file), "s", device="tpu")
    # A device this machine lacks: one error line before anything is written (no stamp left behind).
    result = CliRunner().invoke(app, ["bench", str(suite_file), "--out", str(tmp_path / "g"), "--device", "cuda:7"])
    assert result.exit_code == 2 and "no device 'cuda:7'" in result.output and not (tmp_path / "g").exists()
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "suite file does not exist" in result.output
    assert not (tmp_path / "o").exists()


def test_report_of_an_empty_folder_is_one_clear_error(tmp_path: Path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no finished runs" in result.output
    assert bench_report.collect(tmp_path) == []


def test_evidence_suite_smoke_covers_every_claim_with_paired_rows(tmp_path: Path):
    """`taskfed bench benchmarks/suites/evidence.toml --smoke`: every cell runs (the base reference in each
    scenario), per-row scores are kept, the unseen mode is evaluated on the held-out tasks only, and the
    claims table has a paired row for each claim, the unseen-task one included."""
    suite = Path(__file__).resolve().parents[1] / "benchmarks" / "suites" / "evidence.toml"
    out = tmp_path / "ev"
    result = CliRunner().invoke(app, ["bench", str(suite), "--out", str(out), "--smoke"])
    assert result.exit_code == 0, result.output
    grid = cells(load_suite(suite), str(suite), smoke=True)
    assert {(c.scenario, c.method) for c in grid} == {
        *(("single", m) for m in ("fedavg", "feddpa-f", "feddpa-t", "base")),
        *(("dual", m) for m in ("local", "fedavg", "fedrouter", "fltac", "feddpa-f", "base")),
        *(("dirichlet", m) for m in ("fedavg", "fltac", "base"))}
    for c in grid:
        assert (out / c.path / "scores.csv").exists(), c.path
    metrics = json.loads((out / "dual" / "fedrouter" / "seed-0" / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"local", "global", "unseen"}
    assert all(set(c["per_task"]) == {"glue_qqp", "cola"} for c in metrics["eval"]["unseen"]["per_client"].values())
    assert all(set(c["per_task"]) == {"snli", "trec", "fix_punct", "web_nlg_en"}
               for c in metrics["eval"]["global"]["per_client"].values())
    report = (out / "report.md").read_text()
    for claim in CLAIMS:
        rows = [line for line in report.splitlines() if line.startswith(f"| {claim.text} |")]
        assert rows, claim.text
        assert all(any(w in row for w in ("supported", "refuted", "inconclusive")) for row in rows), rows
