"""Paired comparisons of two methods scored on the same test rows and seeds.

Every method of a scenario is evaluated on the same rows with the same seeds, so the question "is A above
B" is one about the per-row differences d = score_A - score_B paired on the unit the caller gives (the bench
report pairs a test row of a seed, its scores averaged over the clients that answered it):
their mean, a 95% interval from a paired bootstrap over those pairs (scipy.stats.bootstrap, seeded), and a
two-sided sign-flip permutation p-value (scipy.stats.permutation_test, permutation_type="samples": under
"no difference" each pair's two scores are exchangeable). The verdict follows from the interval alone:
supported (it lies above zero), refuted (below zero), inconclusive at this budget (it holds zero).
`pairs_for` says how many pairs an interval of a wanted half width would take at the spread measured (the
normal approximation, z * sd / sqrt(n)): how a bench is sized from a pilot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
RESAMPLES = 4999
TARGET = 0.03  # the half width a claim's interval should have (issue 17): the report's "pairs for +-0.03"
SEED = 0  # the bootstrap's and the permutation test's generator: a report is the same every time it is built


@dataclass(frozen=True)
class Paired:
    n: int  # pairs
    diff: float  # mean of score_a - score_b
    low: float
    high: float
    p: float  # two-sided permutation p-value
    sd: float = 0.0  # the differences' standard deviation (ddof 1)

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def pairs_for(self, half_width: float = TARGET, level: float = LEVEL) -> int:
        """Pairs an interval of +-half_width needs at this spread: (z * sd / half_width)^2, at least 2."""
        z = stats.norm.ppf(0.5 + level / 2)
        return max(2, int(np.ceil((z * self.sd / half_width) ** 2)))


def verdict(low: float, high: float) -> str:
    """What an interval of a difference says about "A is above B"."""
    if low > 0:
        return "supported"
    if high < 0:
        return "refuted"
    return "inconclusive at this budget"


def _mean_diff(x, y, axis=-1):
    return np.mean(x - y, axis=axis)


def paired(a: dict, b: dict, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> Paired | None:
    """A's scores against B's on the keys both have (None when there are fewer than two pairs)."""
    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        return None
    x = np.array([a[k] for k in keys], dtype=np.float64)
    y = np.array([b[k] for k in keys], dtype=np.float64)
    d = x - y
    if np.all(d == d[0]):  # no spread: every resample is the same difference, and no flip is informative
        return Paired(len(keys), float(d[0]), float(d[0]), float(d[0]), 1.0 if d[0] == 0 else 2.0 ** (1 - len(d)))
    ci = stats.bootstrap((x, y), _mean_diff, paired=True, vectorized=True, confidence_level=level,
                         n_resamples=resamples, method="percentile", random_state=np.random.default_rng(seed))
    perm = stats.permutation_test((x, y), _mean_diff, permutation_type="samples", vectorized=True,
                                  n_resamples=resamples, alternative="two-sided",
                                  random_state=np.random.default_rng(seed))
    return Paired(len(keys), float(d.mean()), float(ci.confidence_interval.low), float(ci.confidence_interval.high),
                  float(perm.pvalue), float(d.std(ddof=1)))
