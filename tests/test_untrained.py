"""Method `base`, the bench's reference row: the untrained base model on the same prompts as every method."""

from __future__ import annotations

import json

from taskfed.evaluation.rows import read_scores
from taskfed.run import Experiment
from tests.conftest import tiny_config


def test_base_trains_nothing_and_answers_with_the_frozen_model(tmp_path):
    common = ("scenario.n_clients=2", 'data.tasks=["snli","trec"]')
    cfg = tiny_config("method.name=base", *common)
    ex = Experiment(cfg)
    metrics = ex.run(tmp_path / "run")
    assert metrics["rounds"] == [] and metrics["bytes_communicated"] == 0 and set(metrics["eval"]) == {"local", "global"}
    # v0's LoRA B matrices are zero, so B @ A adds nothing: every answer is the frozen base model's own.
    v0 = ex.method.fed.init_adapter
    assert any("lora_B" in k for k in v0) and all(not v.any() for k, v in v0.items() if "lora_B" in k)
    rows = read_scores(tmp_path / "run" / "scores.csv")
    assert rows and all(r["adapters"] == ["base"] and r["weights"] == [1.0] for r in rows)
    # The same test rows as a trained method's run: the bench pairs them on (mode, client, task, row).
    Experiment(tiny_config("method.name=fedavg", *common)).run(tmp_path / "fedavg")
    keys = lambda rs: sorted((r["mode"], r["client"], r["task"], r["row"]) for r in rs)  # noqa: E731
    assert keys(read_scores(tmp_path / "fedavg" / "scores.csv")) == keys(rows)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["method"] == "base"
