"""Shared fixtures: the tiny random model (no download), small configs, synthetic and FLAN data."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from taskfed.config import RunConfig, load_config
from taskfed.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
FLAN = (ROOT / ".." / "shared" / "data" / "flan-feddpa" / "dataset1").resolve()


def pytest_configure(config) -> None:
    """Under pytest-xdist (pyproject's addopts: two workers, one test file per worker at a time): each worker
    gets a temporary folder of its own, so the Flower workers' socket folder (worker.home(), which tests
    count processes in) is not shared, and one torch thread, so two workers do not fight over two cores."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        tmp = Path(tempfile.gettempdir()) / f"taskfed-tests-{os.getuid()}-{worker}"
        tmp.mkdir(mode=0o700, exist_ok=True)
        os.environ["TMPDIR"] = str(tmp)  # subprocesses (nodes, workers, CLI runs) inherit it
        tempfile.tempdir = None
        # One thread here and in every subprocess: a test comparing a subprocess's floats with this
        # process's needs the same thread count on both sides.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# The longest file (minutes of waiting on a SuperLink's heartbeats) goes first, so the other worker fills
# those waits with the rest instead of being left alone with it at the end; only one, as two deployments at
# once (this and test_flower_deploy.py) slowed each other down more than they overlapped.
SLOW_FIRST = ["test_flower_deploy_faults.py"]


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: the rest keep their order


def tiny_config(*overrides: str, **kw) -> RunConfig:
    """A config on the tiny model with a minimal budget; overrides as in `--set`."""
    base = ["model.name=tiny", "train.rounds=2", "train.steps=2", "train.batch=4", "data.max_length=128",
            "data.max_train_per_task=24", "eval.max_rows_per_task=3", "eval.max_new_tokens=6",
            f"data.path={FLAN}"]
    return load_config(None, base + list(overrides))


@pytest.fixture(scope="session")
def flan_path() -> Path:
    return FLAN


@pytest.fixture(scope="session")
def tiny_runtime_factory():
    """Runtime(cfg) reusing one tiny base model per process (the bank is rebuilt on a fresh copy)."""
    import copy

    from taskfed.model.loading import load_base

    base = load_base("tiny", seed=0)

    def make(cfg: RunConfig) -> Runtime:
        model, tok = copy.deepcopy(base[0]), base[1]
        return Runtime(cfg, model=model, tokenizer=tok)

    return make


def write_two_task_data(folder: Path, n_train: int = 40, n_test: int = 10) -> tuple[Path, Path]:
    """Two clearly separable synthetic tasks: upper-casing words and counting letters."""
    import random

    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "chair", "ocean", "maple"]

    def rows(n: int):
        out = []
        for _ in range(n):
            w = rng.choice(words)
            out.append({"instruction": f"Write the word in capitals: {w}", "output": w.upper(),
                        "task": "upper", "category": "generation"})
            w = rng.choice(words)
            out.append({"instruction": f"How many letters has the word '{w}'? Give the number. ###",
                        "output": str(len(w)), "task": "count", "category": "classification"})
        return out

    folder.mkdir(parents=True, exist_ok=True)
    train, test = folder / "train.json", folder / "test.jsonl"
    train.write_text(json.dumps(rows(n_train)))
    test.write_text("\n".join(json.dumps(r) for r in rows(n_test)))
    return train, test


# Fields of metrics.json that may differ between two runs that did the same work: which engine ran, and how
# many tokens it generated (in-process clients share one generation cache, so a row FedAvg's clients all
# evaluate is generated once; Flower nodes, or a resumed evaluation, start with an empty cache).
COST = ("engine", "generated_tokens")


def untimed(obj, ignore=COST):
    """metrics.json without timing fields and the `ignore`d cost fields: what must equal across runs."""
    if isinstance(obj, dict):
        return {k: untimed(v, ignore) for k, v in obj.items() if "seconds" not in k and k not in ignore}
    if isinstance(obj, list):
        return [untimed(v, ignore) for v in obj]
    return obj
