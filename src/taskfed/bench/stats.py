"""Aggregation over seeds: mean and 95% confidence interval (Student t), relative gains over the best
baseline, and the papers' claims set against what a bench measured."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass
class Summary:
    n: int
    mean: float
    half_width: float | None  # the 95% CI is mean +- half_width; None with a single seed

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width


def mean_ci(values: list[float], level: float = 0.95) -> Summary:
    """Mean and the two-sided `level` confidence interval of the mean: t_{(1+level)/2, n-1} * s / sqrt(n)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if x.size == 0:
        return Summary(0, float("nan"), None)
    if x.size == 1:
        return Summary(1, float(x[0]), None)
    sem = x.std(ddof=1) / math.sqrt(x.size)
    return Summary(int(x.size), float(x.mean()), float(stats.t.ppf((1 + level) / 2, x.size - 1) * sem))


def relative_gain(value: float, reference: float) -> float | None:
    """(value - reference) / reference; None when the reference is zero or missing."""
    if reference is None or value is None or reference == 0 or math.isnan(reference) or math.isnan(value):
        return None
    return (value - reference) / abs(reference)


def best_baseline(means: dict[str, float], baselines: list[str], method_names: dict[str, str]) -> tuple[str, float] | None:
    """The baseline with the highest mean among `means` (label -> mean); labels map to method names."""
    pool = [(m, v) for m, v in means.items() if method_names.get(m) in baselines and not math.isnan(v)]
    return max(pool, key=lambda mv: (mv[1], mv[0])) if pool else None


@dataclass(frozen=True)
class Claim:
    method: str  # a method name (every label running that method is checked)
    scenario: str  # the scenario *name* of the run config (dual, single, dirichlet, iid)
    mode: str  # eval mode
    versus: str  # "best-baseline" or a method name ("fedavg" is FedIT)
    kind: str  # "gain": compare the relative gain with `value`; "above": above `versus`; "per-task": above on each task
    value: float | None
    text: str


# What the papers report (methods.md, "Published figures"). FedRouter's gains are "up to" figures.
CLAIMS = [
    Claim("fedrouter", "dual", "global", "best-baseline", "gain", 0.061,
          "FedRouter: up to +6.1% relative over the best baseline under task interference"),
    Claim("fedrouter", "dual", "unseen", "best-baseline", "gain", 1.36,
          "FedRouter: up to +136% relative over the best baseline on unseen tasks (generalization)"),
    Claim("feddpa-f", "single", "local", "fedavg", "above", None, "FedDPA-F: above FedIT on P (local)"),
    Claim("feddpa-f", "single", "global", "fedavg", "above", None, "FedDPA-F: above FedIT on TTP (global)"),
    Claim("feddpa-t", "single", "local", "fedavg", "above", None, "FedDPA-T: above FedIT on P (local)"),
    Claim("feddpa-t", "single", "global", "fedavg", "above", None, "FedDPA-T: above FedIT on TTP (global)"),
    Claim("fltac", "dirichlet", "local", "fedavg", "per-task", None, "FL-TAC: above FedIT on every task"),
]
