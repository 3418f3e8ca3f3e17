"""Progress from the first second of every long phase, as a non-interactive log shows it: a line when a
phase starts, lines while it runs (at most every TASKFED_PROGRESS_SECONDS), a line when it ends; and no
transformers FutureWarning on the user's terminal."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

from tests.conftest import ROOT, tiny_config
from tests.test_bigbench import _target_task, _write_archive, fake_pip
from taskfed import progress
from taskfed.data import bigbench


def test_a_run_logs_setup_each_round_and_each_evaluation_mode(tmp_path):
    env = dict(os.environ, TASKFED_PROGRESS_SECONDS="0")  # every advance prints: the log shows them all
    cfg = tmp_path / "c.toml"
    cfg.write_text('version = 1\n[method]\nname = "fedavg"\n')
    done = subprocess.run([str(Path(sys.executable).parent / "taskfed"), "run", str(cfg), "--out", str(tmp_path / "run"),
                           "--smoke", "--set", f"data.path={ROOT.parent / 'shared/data/flan-feddpa/dataset1'}",
                           "--set", "scenario.n_clients=2", "--set", 'data.tasks=["snli","cola"]'],
                          capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stderr
    assert "\r" not in log  # not a terminal: lines, not carriage-return redraws
    for phase in ("client setup", "round 1/2", "round 2/2", "eval local", "eval global"):
        assert f"{phase}: started" in log and f"{phase}: done in" in log, phase
    assert "round 1/2: 1/" in log and "steps (" in log  # a round counts its steps while it runs
    assert "eval global: " in log and " rows (" in log  # an evaluation counts its rows
    assert "FutureWarning" not in log and "past_key_values" not in log


def test_download_and_extraction_report_megabytes(tmp_path, monkeypatch):
    out = io.StringIO()
    calls: list = []
    monkeypatch.delenv(bigbench.ARCHIVE_ENV, raising=False)
    monkeypatch.setattr(bigbench.time, "sleep", lambda s: None)
    monkeypatch.setattr(bigbench.subprocess, "Popen", fake_pip(calls, data=b"x" * 4_000_000, polls=4))
    with progress.use(progress.LineReporter(out, interval=0)):
        archive = bigbench.ensure_archive(tmp_path / "cache")
        real = _write_archive(tmp_path / "real.tar.gz", {"t1": _target_task(30), "t2": _target_task(30)})
        bigbench.extract_tasks(real, ["t1", "t2"], tmp_path / "cache")
    log = out.getvalue()
    assert archive.read_bytes() == b"x" * 4_000_000
    assert "downloading bigbench-1.0.0.tar.gz (once): started (358 MB)" in log
    assert "downloading bigbench-1.0.0.tar.gz (once): 2.0/358 MB" in log  # the partial file, as it grows
    assert "downloading bigbench-1.0.0.tar.gz (once): done in" in log
    assert "extracting 2 BIG-bench tasks (once): started" in log and "extracting 2 BIG-bench tasks (once): done" in log


def test_generation_uses_the_current_cache_argument(tiny_runtime_factory):
    from taskfed.evaluation.generate import generate, prompt_ids
    from taskfed.model.bank import RowMix

    rt = tiny_runtime_factory(tiny_config())
    prompts = [prompt_ids(rt, "Say something", 4), prompt_ids(rt, "Say something else, longer", 4)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(rt, prompts, RowMix.one_hot([0, 0]), 4)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_nested_tasks_count_for_the_innermost_and_silence_is_the_default():
    out = io.StringIO()
    progress.advance(5)  # no task: nothing happens
    with progress.use(progress.LineReporter(out, interval=0)):
        with progress.task("outer", total=2, unit="rounds"):
            with progress.task("inner", total=4, unit="steps") as inner:
                progress.advance(2)
            assert inner.done == 2
            progress.advance()
    with progress.task("unseen", total=1):
        progress.advance()
    log = out.getvalue()
    assert "inner: 2/4 steps (50%)" in log and "outer: 1/2 rounds (50%)" in log and "unseen" not in log


def test_terminal_bars_end_their_clock_and_show_the_unit_counted():
    """On a terminal (rich): a finished phase's bar is complete and its clock stopped, a phase without a total
    included (they ticked on for an hour beside later phases); the unit shown is the one counted after
    `set_total` changed it ("eval local 128/128 clients" counted rows)."""
    import io

    from rich.console import Console

    reporter = progress.RichReporter(Console(file=io.StringIO(), force_terminal=True, width=120))
    with progress.use(reporter):
        with progress.task("converting the model (once)"):
            with progress.task("eval local", total=4, unit="clients"):
                progress.set_total(10, "rows")
                progress.advance(4)
                shown = reporter.progress.tasks[1]
                assert shown.fields["unit"] == "rows" and shown.total == 10 and not shown.finished
            converting, evaluating = reporter.progress.tasks
            assert evaluating.finished and evaluating.stop_time is not None
            assert not converting.finished  # still running
        assert converting.finished and converting.stop_time is not None  # no total, and still it ends
        frozen = converting.elapsed
    assert converting.elapsed == frozen
