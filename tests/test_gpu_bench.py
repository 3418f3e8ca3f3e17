"""benchmarks/gpu.py on the CPU (issue 7): one process prints every figure as a JSON line as it goes, taskfed's
round (planned as on an H200) reads nothing back in a step, pads at most a tenth, and dispatches at most a fifth
of the old one-job-at-a-time layout's ops; a deadline already past skips every phase and still exits 0."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu.py"
TRAIN_VARIANTS = ("peft", "taskfed", "taskfed-rows")
TRAIN_FIGURES = ("seconds_per_round", "real_tokens_per_s", "padded_tokens_per_s", "padding_share", "syncs_per_step",
                 "aten_ops_per_round", "gpu_busy_share", "peak_memory_mb")


def _run(out_dir, *extra: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, list[dict]]:
    # One torch thread: what conftest gives every subprocess under xdist (the other worker shares the two
    # cores), and on this machine the faster setting even alone.
    env = dict(os.environ, OUT=str(out_dir), FLWR_TELEMETRY_ENABLED="0", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--small", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc, lines


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gpu-bench")
    proc, lines = _run(out_dir)
    figures = {(line["variant"], line["figure"]): line["value"] for line in lines}
    return proc, lines, figures, out_dir


def test_every_line_is_a_variant_a_figure_and_a_value(bench):
    proc, lines, _, _ = bench
    assert lines and all(set(line) == {"variant", "figure", "value"} for line in lines), proc.stdout
    assert not any(line["figure"] == "skipped" for line in lines)  # the default deadline leaves the CPU run whole


def test_each_training_variant_has_every_figure(bench):
    _, _, figures, _ = bench
    for variant in TRAIN_VARIANTS:
        missing = [f for f in TRAIN_FIGURES if (variant, f) not in figures]
        assert not missing, f"{variant} lacks {missing}"
        assert figures[(variant, "gpu_busy_share")] is None  # no GPU here
        assert figures[(variant, "seconds_per_round")] > 0 and figures[(variant, "aten_ops_per_round")] > 0


def test_taskfed_syncs_nothing_pads_little_and_dispatches_a_fifth_of_the_rows_layout(bench):
    _, _, figures, _ = bench
    assert figures[("taskfed", "syncs_per_step")] == 0
    assert figures[("taskfed", "padding_share")] <= 0.10
    assert figures[("taskfed", "aten_ops_per_round")] <= 0.2 * figures[("taskfed-rows", "aten_ops_per_round")]
    assert figures[("taskfed", "aten_ops_vs_rows")] <= 0.2


def test_decoding_figures_are_printed(bench):
    _, _, figures, _ = bench
    for variant in ("serve@16", "serve@1", "plain-generate@8", "taskfed-generate@8", "plain-generate@16",
                    "taskfed-generate@16"):
        assert figures[(variant, "new_tokens_per_s")] > 0, variant
    for variant in ("plain-generate@8", "taskfed-generate@16"):
        assert isinstance(figures[(variant, "compile_seconds")], float)
    assert figures[("serve@16", "speedup_vs_one_at_a_time")] > 0


def test_out_holds_the_same_lines(bench):
    proc, _, _, out_dir = bench
    assert (out_dir / "gpu.jsonl").read_text().splitlines() == [l for l in proc.stdout.splitlines() if l.strip()]


def test_a_deadline_already_past_skips_every_phase_and_exits_0(tmp_path):
    _, lines = _run(tmp_path, "--deadline", "0", timeout=60)
    skipped = {line["variant"] for line in lines if line["figure"] == "skipped"}
    assert all(line["value"] == "deadline" for line in lines if line["figure"] == "skipped")
    assert set(TRAIN_VARIANTS) | {"serve@16", "plain-generate@8", "taskfed-generate@16"} <= skipped
    assert not any(line["figure"] in TRAIN_FIGURES for line in lines)
