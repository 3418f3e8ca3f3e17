"""`taskfed bench SUITE --estimate`: each cell's expected time on this device, from a short measured run.

A lease on a GPU is short; a bench that does not fit it is lost. Each distinct (scenario, method) cell runs
once on the real model and data at a probe budget (at most 2 rounds of 3 steps, 4 evaluation rows per
task), and its metrics.json gives what the full budget costs:

    setup (measured as is: it embeds and clusters the full data)
    + rounds x (round overhead + steps x seconds per step)       (per step: compute seconds / probe steps)
    + per mode: evaluation seconds x full rows / probe rows      (the rows a full run evaluates, counted)

Seeds cost the same, so a cell's estimate counts once per seed. The first round of a probe carries the
warm-up (allocation, compilation), so estimates lean high, never low.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from taskfed.config import RunConfig

PROBE_ROUNDS, PROBE_STEPS, PROBE_ROWS = 2, 3, 4


@dataclass
class Estimate:
    scenario: str
    method: str
    seeds: int
    probe_seconds: float
    setup: float
    train: float
    evaluation: float

    @property
    def seconds(self) -> float:
        return self.setup + self.train + self.evaluation


def probe_config(cfg: RunConfig) -> RunConfig:
    raw = cfg.model_dump()
    raw["train"].update(rounds=min(cfg.train.rounds, PROBE_ROUNDS), steps=min(cfg.train.steps, PROBE_STEPS))
    raw["eval"].update(max_rows_per_task=PROBE_ROWS)
    return RunConfig.model_validate(raw)


def eval_rows(metrics: dict, mode: str) -> int:
    return sum(t["n"] for c in metrics["eval"][mode]["per_client"].values() for t in c["per_task"].values())


def full_rows(metrics: dict, mode: str, test_by_task: dict) -> int:
    """The rows a full run evaluates in `mode`: the probe's (client, task) pairs, each task's full test rows."""
    return sum(len(test_by_task.get(task, [])) for c in metrics["eval"][mode]["per_client"].values()
               for task in c["per_task"])


def extrapolate(cfg: RunConfig, metrics: dict, test_by_task: dict) -> tuple[float, float, float]:
    """(setup, training, evaluation) seconds of `cfg`'s full budget from a probe's metrics."""
    rounds = metrics["rounds"]
    probe_steps = min(cfg.train.steps, PROBE_STEPS)
    per_round = []
    for r in rounds:
        compute = r.get("compute_seconds") or 0.0
        per_round.append(max(0.0, r["seconds"] - compute) + compute / probe_steps * cfg.train.steps)
    train = cfg.train.rounds * (sum(per_round) / len(per_round)) if per_round else 0.0
    evaluation = 0.0
    for mode, m in metrics["eval"].items():
        probe = eval_rows(metrics, mode)
        if probe:
            evaluation += m["seconds"] * full_rows(metrics, mode, test_by_task) / probe
    return metrics.get("setup_seconds") or 0.0, train, evaluation


def estimate(grid: list, log: Callable[[str], None] = print) -> list[Estimate]:
    """One probe per distinct (scenario, method) of the grid, on one runtime per model (bench's order)."""
    import time

    from taskfed.bench.suite import runtime_key
    from taskfed.run import Experiment
    from taskfed.runtime import Runtime

    seeds: dict[tuple[str, str], int] = {}
    first: dict[tuple[str, str], object] = {}
    for cell in grid:
        key = (cell.scenario, cell.method)
        seeds[key] = seeds.get(key, 0) + 1
        first.setdefault(key, cell)
    out, rt, rt_key = [], None, None
    for n, (key, cell) in enumerate(first.items(), 1):
        if runtime_key(cell.cfg) != rt_key:
            rt, rt_key = Runtime(cell.cfg), runtime_key(cell.cfg)
        probe = probe_config(cell.cfg)
        rt.cfg = probe
        log(f"[{n}/{len(first)}] probe {cell.scenario}/{cell.method}")
        tic = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            metrics = Experiment(probe, rt=rt).run(Path(tmp) / "probe")
        took = time.perf_counter() - tic
        rt.cfg = cell.cfg
        test_by_task = Experiment(cell.cfg, rt=rt).test_by_task
        out.append(Estimate(cell.scenario, cell.method, seeds[key], took, *extrapolate(cell.cfg, metrics, test_by_task)))
    return out


def table(estimates: list[Estimate], device: str) -> str:
    lines = [f"Expected time on {device} (from probes of at most {PROBE_ROUNDS} rounds x {PROBE_STEPS} steps, "
             f"{PROBE_ROWS} rows per task):", "",
             "| scenario | method | seeds | setup s | train s | eval s | per seed s | all seeds s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for e in estimates:
        lines.append(f"| {e.scenario} | {e.method} | {e.seeds} | {e.setup:.1f} | {e.train:.1f} | {e.evaluation:.1f} "
                     f"| {e.seconds:.1f} | {e.seconds * e.seeds:.1f} |")
    total = sum(e.seconds * e.seeds for e in estimates)
    lines += ["", f"total: {total:.0f} s ({total / 60:.1f} min); probes took {sum(e.probe_seconds for e in estimates):.0f} s"]
    return "\n".join(lines)
