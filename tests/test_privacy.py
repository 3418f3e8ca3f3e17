"""Differential privacy (taskfed/privacy.py): off changes nothing, the noise has its calibrated std, clipping
bounds every contribution, the accountant is dp-accounting's, bad options are one error line, and the Flower
engine with privacy on equals the in-process run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import tomli_w

from taskfed import privacy
from taskfed.methods.base import RunningMean
from tests.conftest import FLAN, tiny_config, untimed
from tests.test_bad_input import _cli, _one_error
from tests.test_flower_engine import TASKS, FakeGrid, identity  # noqa: F401 (fixture)

ON = ["privacy.centroids.clip=4", "privacy.centroids.epsilon=8", "privacy.updates.clip=1e-4",  # binds: AdamW moves more
      "privacy.updates.noise_multiplier=1.0"]


def _adapters_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])


# ----------------------------------------------------------------------------- off = unchanged
def test_privacy_off_runs_none_of_the_mechanics_and_reports_nothing(monkeypatch, tmp_path):
    from taskfed.run import Experiment

    def never(*args, **kwargs):
        raise AssertionError("a privacy mechanism ran with privacy off")

    monkeypatch.setattr(privacy, "release_centroids", never)
    monkeypatch.setattr(privacy, "clip_update", never)
    monkeypatch.setattr(privacy, "clip_rows", never)
    sums = {"w": torch.ones(3, dtype=torch.float64)}
    assert privacy.noised(sums, "global") is sums and privacy.contributor_weight(7) == 7.0
    cfg = tiny_config("method.name=fedrouter", "method.n_global=2", "scenario.n_clients=3", f"data.tasks={TASKS}")
    ex = Experiment(cfg)
    got = ex.run(tmp_path / "run")
    assert "privacy" not in got and "privacy" not in json.loads((tmp_path / "run" / "metrics.json").read_text())
    # Same code path as before the privacy module: a second run gives the same bits.
    again = Experiment(cfg)
    assert untimed(again.run()) == untimed(json.loads(json.dumps(got)))
    assert _adapters_equal(ex.method.server_adapters(), again.method.server_adapters())


# ----------------------------------------------------------------------------- statistics of the mechanisms
def test_centroid_sum_and_count_noise_have_the_calibrated_std():
    cfg = tiny_config("method.name=fedrouter", "privacy.centroids.clip=2", "privacy.centroids.noise_multiplier=1.5")
    std = privacy.centroid_std(cfg)
    assert std == pytest.approx(1.5 * math.sqrt(2) * 2)
    emb, labels = np.zeros((10, 32)), np.array([0] * 4 + [1] * 6)
    sums, counts = [], []
    for i in range(400):  # one seeded generator per (run seed, client, what)
        up = privacy.release_centroids(emb, labels, 2, cfg, f"c{i}", "fedrouter")
        sums.append(up["centroid_sums"].ravel())
        counts.append(up["centroid_counts"] - [4, 6])
    sums, counts = np.concatenate(sums), np.concatenate(counts)
    # The sample std of n normal draws has relative standard error 1 / sqrt(2n): 5 of them as the bound.
    assert abs(sums.std() / std - 1) < 5 / math.sqrt(2 * len(sums))
    assert abs(counts.std() / (std / 2) - 1) < 5 / math.sqrt(2 * len(counts))
    assert abs(sums.mean()) < 5 * std / math.sqrt(len(sums))
    again = privacy.release_centroids(emb, labels, 2, cfg, "c0", "fedrouter")
    first = privacy.release_centroids(emb, labels, 2, cfg, "c0", "fedrouter")
    assert np.array_equal(again["centroid_sums"], first["centroid_sums"])  # reproducible


def test_clipping_bounds_every_embedding_and_every_update():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (200, 16))
    clipped = privacy.clip_rows(x, 2.0)
    norms = np.linalg.norm(x, axis=1)
    assert (np.linalg.norm(clipped, axis=1) <= 2.0 + 1e-9).all()
    assert np.array_equal(clipped[norms <= 2.0], x[norms <= 2.0])  # inside the ball: unchanged
    gen = torch.Generator().manual_seed(0)
    init = {"a": torch.randn(8, 4, generator=gen), "b": torch.zeros(4, 8)}
    for scale in (1e-3, 1.0, 100.0):
        w = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in init.items()}
        out = privacy.clip_update(w, init, 0.5)
        norm = math.sqrt(sum(float((out[k].double() - init[k].double()).pow(2).sum()) for k in out))
        assert norm <= 0.5 * (1 + 1e-5)
        if scale == 1e-3:
            assert out is w  # within the bound: the upload is untouched


def test_one_client_beyond_the_clip_moves_an_aggregate_by_at_most_the_bound_before_noise():
    cfg = tiny_config("method.name=fedavg", "privacy.updates.clip=0.5", "privacy.updates.noise_multiplier=2")
    gen = torch.Generator().manual_seed(1)
    init = {"a": torch.randn(6, 3, generator=gen)}
    honest = [privacy.clip_update({"a": init["a"] + 0.1 * torch.randn(6, 3, generator=gen)}, init, 0.5) for _ in range(4)]
    outlier = privacy.clip_update({"a": init["a"] + 1e4 * torch.randn(6, 3, generator=gen)}, init, 0.5)

    def sums(uploads):
        acc = RunningMean()
        with privacy.aggregation(cfg, 0):
            for i, u in enumerate(uploads):
                acc.add(u, weight=1000.0 * (i + 1))  # sample-count weights: uniform under DP
            assert acc.total == acc.count == len(uploads)
            return acc.sums["a"]

    base = sums(honest)
    assert float((sums(honest + [outlier]) - base - init["a"].double()).norm()) <= 0.5 * (1 + 1e-5)  # added
    replaced = sums(honest[:-1] + [outlier])
    assert float((replaced - base).norm()) <= 2 * 0.5 * (1 + 1e-5)  # one client replaced


def test_server_noise_on_the_sum_has_std_z_times_clip_and_is_seeded():
    cfg = tiny_config("method.name=fedavg", "privacy.updates.clip=0.5", "privacy.updates.noise_multiplier=2")
    zero = {"a": torch.zeros(64, 64)}

    def noisy_mean(round_idx, name="global", n=4):
        acc = RunningMean(name)
        with privacy.aggregation(cfg, round_idx):
            for _ in range(n):
                acc.add(zero, 3.0)
            return acc.mean()["a"].double() * n  # the noise on the sum

    noise = torch.cat([noisy_mean(r).ravel() for r in range(10)])
    assert abs(float(noise.std()) / 1.0 - 1) < 5 / math.sqrt(2 * noise.numel())  # z x clip = 1.0
    assert torch.equal(noisy_mean(3), noisy_mean(3)) and not torch.equal(noisy_mean(3), noisy_mean(3, "cluster/1"))
    outside = RunningMean()
    outside.add(zero, 3.0)
    assert torch.equal(outside.mean()["a"], zero["a"])  # no aggregation context (privacy off): no noise


# ----------------------------------------------------------------------------- the accountant
def test_accountant_equals_dp_accounting_and_the_search_meets_the_target():
    import dp_accounting
    from dp_accounting import rdp

    z, q, rounds, delta = 1.1, 0.25, 30, 1e-5
    acc = rdp.RdpAccountant(list(privacy.ORDERS))
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    assert privacy.epsilon(delta, (), ((z, q),) * rounds) == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
    single = rdp.RdpAccountant(list(privacy.ORDERS))
    single.compose(dp_accounting.GaussianDpEvent(2.0))
    assert privacy.epsilon(delta, (2.0,)) == pytest.approx(single.get_epsilon(delta), rel=1e-12)
    for target in (1.0, 4.0, 8.0):
        found = privacy.noise_for(target, delta, (q,) * rounds)
        assert privacy.epsilon(delta, (), ((found, q),) * rounds) <= target
        assert privacy.epsilon(delta, (), ((found * 0.999, q),) * rounds) > target  # and it is the least noise
    assert privacy.noise_for(1e-9, delta, None) is None


def test_the_run_reports_what_it_spent(tmp_path):
    from taskfed.run import Experiment

    cfg = tiny_config("method.name=fltac", "scenario.n_clients=3", "scenario.clients_per_round=2",
                      f"data.tasks={TASKS}", "privacy.centroids.clip=4", "privacy.centroids.epsilon=8",
                      "privacy.updates.clip=0.5", "privacy.updates.epsilon=20")
    p = Experiment(cfg).run(tmp_path / "run")["privacy"]
    assert p["centroids"]["epsilon"] <= 8 and p["updates"]["epsilon"] <= 20
    assert p["updates"]["sampling_rates"] == [2 / 3, 2 / 3] and p["updates"]["rounds"] == 2
    zu, zc = p["updates"]["noise_multiplier"], p["centroids"]["noise_multiplier"]
    assert p["updates"]["epsilon"] == pytest.approx(privacy.epsilon(1e-5, (), ((zu, 2 / 3),) * 2))
    total = privacy.epsilon(2e-5, (zc,), ((zu / 2, 2 / 3),) * 2)
    assert sorted(p["per_client"]) == ["0", "1", "2"] and p["total"]["epsilon"] == pytest.approx(total)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("sets, key", [
    (["privacy.updates.epsilon=0", "privacy.updates.clip=1"], "privacy.updates.epsilon"),
    (["privacy.updates.epsilon=-2", "privacy.updates.clip=1"], "privacy.updates.epsilon"),
    (["privacy.centroids.epsilon=1", "privacy.centroids.clip=1", "privacy.centroids.delta=1"], "privacy.centroids.delta"),
    (["privacy.centroids.epsilon=1", "privacy.centroids.clip=1", "privacy.centroids.delta=0"], "privacy.centroids.delta"),
    (["privacy.updates.epsilon=1"], "privacy.updates.clip"),
    (["privacy.updates.clip=1"], "privacy.updates.epsilon"),
    (["privacy.updates.clip=1", "privacy.updates.epsilon=1e-9"], "privacy.updates.epsilon"),
    (["privacy.centroids.clip=1", "privacy.centroids.epsilon=1", "method.name=local"], "local"),
    (["privacy.centroids.clip=1", "privacy.centroids.epsilon=1"], "shares no centroids"),
])
def test_bad_privacy_options_are_one_error_line_and_exit_2(tmp_path, sets, key):
    out = tmp_path / "out"
    args = ["run", Path(__file__).parents[1] / "configs" / "fedavg.toml", "--out", out, "--smoke"]
    for s in sets:
        args += ["--set", s]
    line = _one_error(_cli(*args))
    assert key in line, line
    assert not out.exists()


# ----------------------------------------------------------------------------- Flower
def test_flower_with_privacy_on_equals_in_process(identity, tmp_path, monkeypatch):  # noqa: F811
    import taskfed.engine.inprocess as inprocess
    from taskfed.federation import Driver
    from taskfed.flower.engine import FlowerEngine, Options
    from taskfed.run import Experiment

    clipped = []

    def counting(weights, init, clip):
        out = privacy.clip_update(weights, init, clip)
        clipped.append(out is not weights)
        return out

    monkeypatch.setattr(inprocess, "clip_update", counting)  # the code a Flower node runs too

    cfg = tiny_config("method.name=fedrouter", "method.n_global=2", "scenario.n_clients=3",
                      "scenario.clients_per_round=2", f"data.tasks={TASKS}", *ON)
    ex = Experiment(cfg)
    want = ex.run(tmp_path / "inprocess")
    driver = Driver(cfg, FlowerEngine(FakeGrid(tmp_path / "state"), cfg, Options(round_timeout=60)))
    n_in_process = len(clipped)
    got = driver.run(tmp_path / "flower")
    assert n_in_process and len(clipped) == 2 * n_in_process and all(clipped)  # clipped on the nodes too
    assert "privacy" in got and untimed(got) == untimed(json.loads(json.dumps(want)))
    assert _adapters_equal(ex.method.server_adapters(), driver.method.server_adapters())
    plain = Experiment(tiny_config("method.name=fedrouter", "method.n_global=2", "scenario.n_clients=3",
                                   "scenario.clients_per_round=2", f"data.tasks={TASKS}"))
    plain.train()
    assert not _adapters_equal(plain.method.server_adapters(), ex.method.server_adapters())  # noise was added


# ----------------------------------------------------------------------------- bench
def test_bench_sweeps_epsilon_and_reports_the_cost(tmp_path):
    from taskfed.bench.suite import run_bench

    suite = {"version": 1, "name": "dp", "seeds": [0], "baselines": ["fedavg"],
             "base": {"data": {"path": str(FLAN), "tasks": json.loads(TASKS), "max_train_per_task": 24},
                      "scenario": {"n_clients": 3}, "eval": {"modes": ["global"]}},
             "scenario": [{"label": "dual", "methods": [{"name": "fedrouter", "n_global": 2}],
                           "epsilon_sweep": {"mechanism": "centroids", "epsilons": [1, 8], "clip": 4.0}}]}
    path = tmp_path / "suite.toml"
    path.write_text(tomli_w.dumps(suite))
    grid = run_bench(path, tmp_path / "bench", smoke=True, log=lambda s: None)
    # The base model's reference cell shares nothing: it is never swept.
    assert [c.method for c in grid] == ["fedrouter", "fedrouter-eps1", "fedrouter-eps8", "base"]
    m = json.loads((tmp_path / "bench" / "dual" / "fedrouter-eps1" / "seed-0" / "metrics.json").read_text())
    assert m["privacy"]["centroids"]["target_epsilon"] == 1.0 and m["privacy"]["centroids"]["epsilon"] <= 1.0
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "## Privacy: accuracy against epsilon" in report and "| fedrouter | off |" in report
    assert (tmp_path / "bench" / "figures" / "privacy_dual.png").is_file()
