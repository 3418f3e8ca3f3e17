"""Paired comparisons (bench/paired.py) on synthetic grids with a known difference, and the per-row scores
file (evaluation/rows.py) written and read back, refused when damaged."""

from __future__ import annotations

import numpy as np
import pytest

from taskfed.bench.paired import paired, verdict
from taskfed.errors import TaskfedError
from taskfed.evaluation.rows import COLUMNS, read_scores, rows_of, write_scores


def grid(effect: float, noise: float = 0.15, n_seeds: int = 3, n_rows: int = 60, seed: int = 1):
    """Scores of B on a grid of (seed, mode, client, task, row) keys, and A = B + effect + paired noise."""
    rng = np.random.default_rng(seed)
    keys = [(s, "global", str(c), t, r) for s in range(n_seeds) for c in range(2) for t in ("qa", "nli")
            for r in range(n_rows // 4)]
    b = {k: float(rng.uniform(0.2, 0.6)) for k in keys}
    a = {k: float(np.clip(b[k] + effect + rng.normal(0, noise), 0, 1)) for k in keys}
    return a, b


def test_a_large_effect_is_recovered_and_supported():
    a, b = grid(0.2)
    got = paired(a, b)
    true = np.mean([a[k] - b[k] for k in a])
    assert got.n == len(a) and got.diff == pytest.approx(true)
    assert got.low < true < got.high and got.low > 0  # covers it, excludes zero
    assert got.p < 0.01 and got.verdict == "supported"
    back = paired(b, a)  # the other way round: the mirror image, refuted
    assert back.diff == pytest.approx(-true) and back.high < 0 and back.verdict == "refuted"


def test_no_effect_gives_an_interval_around_zero_and_inconclusive():
    hits = 0
    for seed in range(10):
        a, b = grid(0.0, seed=seed)
        got = paired(a, b)
        hits += got.low <= 0 <= got.high
        assert abs(got.diff) < 0.05
    assert hits >= 8  # a 95% interval holds the true zero nearly every time
    a, b = grid(0.0, seed=3)
    assert paired(a, b).verdict == verdict(paired(a, b).low, paired(a, b).high)


def test_the_interval_narrows_with_more_rows_and_pairs_only_shared_keys():
    small = paired(*grid(0.05, n_rows=20))
    large = paired(*grid(0.05, n_rows=400))
    assert large.half_width < small.half_width / 2
    a, b = grid(0.1)
    extra = {**a, (9, "global", "0", "qa", 0): 1.0}  # a key B lacks is not a pair
    assert paired(extra, b).n == len(b)
    assert paired({1: 0.5}, {1: 0.4}) is None


def test_pairs_for_sizes_a_bench_from_a_pilot():
    """A pilot of 100 pairs with differences of sd 0.2: (1.96 * 0.2 / 0.03)^2 ~ 171 pairs for +-0.03, and a
    bench of that size does get an interval of about +-0.03 (the bootstrap's percentile interval, not the
    normal formula, so within 15%)."""
    rng = np.random.default_rng(4)
    def pairs(n):
        b = rng.uniform(0.2, 0.6, n)
        return dict(enumerate(b + rng.normal(0.05, 0.2, n))), dict(enumerate(b))
    pilot = paired(*pairs(100))
    assert pilot.sd == pytest.approx(0.2, rel=0.15)
    need = pilot.pairs_for(0.03)
    assert need == int(np.ceil((1.959964 * pilot.sd / 0.03) ** 2)) and 120 < need < 240
    assert pilot.half_width > 0.03  # the pilot is too small, and the sizing says by how much
    sized = paired(*pairs(need))
    assert sized.half_width == pytest.approx(0.03, rel=0.15)
    assert paired(*pairs(4 * need)).half_width == pytest.approx(0.015, rel=0.15)  # 1 / sqrt(n)


def test_identical_differences_need_no_resampling():
    a = {i: 0.5 for i in range(8)}
    same = paired(a, dict(a))
    assert (same.diff, same.low, same.high, same.p, same.verdict) == (0.0, 0.0, 0.0, 1.0, "inconclusive at this budget")
    up = paired({i: 0.6 for i in range(8)}, a)
    assert up.verdict == "supported" and up.p == pytest.approx(2 ** -7)


def test_verdict_words_follow_the_interval():
    assert verdict(0.01, 0.05) == "supported"
    assert verdict(-0.05, -0.01) == "refuted"
    assert verdict(-0.01, 0.02) == verdict(0.0, 0.1) == "inconclusive at this budget"


def test_scores_file_round_trip(tmp_path):
    idx, w = np.array([[0, 1], [1, 0], [0, 0]]), np.array([[0.7, 0.3], [1.0, 0.0], [1.0, 0.0]])
    scores = {"rouge1": [0.5, 1.0, 0.0], "rougeL": [0.4, 1.0, 0.0], "exact_match": [0.0, 1.0, 0.0]}
    rows = rows_of("global", "3", ["qa", "nli", "qa"], ["cluster/0", "cluster/1"], idx, w, scores)
    assert [(r["task"], r["row"]) for r in rows] == [("qa", 0), ("nli", 0), ("qa", 1)]  # index within its task
    assert rows[0]["adapters"] == ["cluster/0", "cluster/1"] and rows[0]["weights"] == [0.7, 0.3]
    assert rows[1]["adapters"] == ["cluster/1"] and rows[1]["weights"] == [1.0]  # zero weights are no terms
    path = tmp_path / "scores.csv"
    write_scores(path, rows)
    assert read_scores(path) == rows
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.replace("mode,", "mood,", 1), "line 1 must be the header"),
    (lambda t: t + "global,1,qa\n", "line 3: expected 9 fields"),
    (lambda t: t.replace("0.5", "1.5", 1), "line 2: a row index below 0 or a score outside"),
    (lambda t: t.replace("0.5", "x", 1), "line 2: malformed field"),
    (lambda t: t + t.splitlines()[1] + "\n", r"line 3: row \('global', '3', 'qa', 0\) appears twice"),
])
def test_a_damaged_scores_file_is_one_sentence(tmp_path, damage, message):
    rows = rows_of("global", "3", ["qa"], ["global"], np.array([[0]]), np.array([[1.0]]),
                   {"rouge1": [0.5], "rougeL": [0.5], "exact_match": [0.0]})
    path = tmp_path / "scores.csv"
    write_scores(path, rows)
    path.write_text(damage(path.read_text()))
    with pytest.raises(TaskfedError, match=message):
        read_scores(path)
