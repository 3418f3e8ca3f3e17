"""The run's records and clients, built by one function each for every engine: the in-process engine holds
every client of the population; a Flower node builds the same population and keeps only its own client, so
a node's client `03` holds the rows the in-process client `03` holds by construction.

    load_records(cfg)               -> (train, test) records, the config's task filter and caps applied
    population(cfg)                 -> every client's rows, the seen and unseen tasks, the test rows per task
    answer_budgets(pop, n_tokens)   -> the answer budget (new tokens) per task
    data_digest(pop, cid)           -> a digest of a client's rows and the test rows (checkpoints compare it)
    sample_clients(ids, k, seed, r) -> the seeded client choice of round r (the server's)
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from taskfed.config import RunConfig
from taskfed.data.loaders import load_feddpa, load_hf, load_json
from taskfed.data.records import Record, tasks_of
from taskfed.data.scenarios import partition
from taskfed.errors import TaskfedError
from taskfed.methods.base import Client


def load_records(cfg: RunConfig) -> tuple[list[Record], list[Record]]:
    d = cfg.data
    if d.source == "feddpa":
        train, test = load_feddpa(d.path)
    elif d.source == "json":
        if not d.train_path or not d.test_path:
            raise TaskfedError("data: source 'json' needs data.train_path and data.test_path.")
        train, test = load_json(d.train_path, d.test_path)
    elif d.source == "hf":
        if not d.hf_name:
            raise TaskfedError("data: source 'hf' needs data.hf_name.")
        train, test = load_hf(d.hf_name)
    else:
        from taskfed.data.bigbench import load_bigbench
        from taskfed.model.loading import cache_dir

        train, test = load_bigbench((d.tasks + d.unseen_tasks) or None, cache_dir(), seed=cfg.seed)
    known = tasks_of(train)
    for key, names in (("data.tasks", d.tasks), ("data.unseen_tasks", d.unseen_tasks)):
        for name in names:
            if name not in known:
                raise TaskfedError(f"{key}: unknown task '{name}' (the data has: {', '.join(known)}).")
    if d.tasks:
        keep = set(d.tasks) | set(d.unseen_tasks)
        train = [r for r in train if r.task in keep]
        test = [r for r in test if r.task in keep]
    return cap_per_task(train, d.max_train_per_task), test


def cap_per_task(rows: list[Record], cap: int | None) -> list[Record]:
    """The first `cap` rows of each task, in order (None: all)."""
    if not cap:
        return rows
    counts: dict[str, int] = {}
    kept = []
    for r in rows:
        counts[r.task] = counts.get(r.task, 0) + 1
        if counts[r.task] <= cap:
            kept.append(r)
    return kept


def test_sets(cfg: RunConfig, test: list[Record], tasks: list[str]) -> dict[str, list[Record]]:
    """Per task, a seeded subset of at most eval.max_rows_per_task rows, the same for every client."""
    out = {}
    for i, task in enumerate(tasks):
        rows = [r for r in test if r.task == task]
        n = cfg.eval.max_rows_per_task
        if n is not None and len(rows) > n:
            pick = np.sort(np.random.default_rng([cfg.seed, i]).choice(len(rows), n, replace=False))
            rows = [rows[j] for j in pick]
        out[task] = rows
    return out


def client_ids(n: int) -> list[str]:
    """Zero-padded ids ("0".."7", "00".."11"): they sort as numbers do."""
    width = len(str(n - 1))
    return [f"{i:0{width}d}" for i in range(n)]


@dataclass
class Population:
    """Every client's training rows and what evaluation needs: the same on every engine and every node."""

    clients: dict[str, Client]
    seen: list[str]  # tasks trained on (the federation's tasks)
    unseen: list[str]  # held out of training, evaluated in mode `unseen`
    test_by_task: dict[str, list[Record]]
    answers: dict[str, list[str]]  # per task, the outputs its answer budget is taken from
    untrained_tests: dict[str, int] = field(default_factory=dict)  # test rows of tasks no client trains on, per task


def population(cfg: RunConfig) -> Population:
    """The run's clients (the scenario's partition of the seen tasks' training rows) and test rows."""
    train, test = load_records(cfg)
    unseen = list(cfg.data.unseen_tasks)
    seen_train = [r for r in train if r.task not in unseen]
    seen = tasks_of(seen_train)
    parts = partition(seen_train, cfg.scenario.name, cfg.scenario.n_clients, cfg.seed, cfg.scenario.alpha)
    clients = {cid: Client(cid, rows) for cid, rows in zip(client_ids(len(parts)), parts)}
    test_by_task = test_sets(cfg, test, seen + unseen)
    # Answer budget per task: from the task's training answers (all of them, as a task's budget is public
    # knowledge of the task), else its test answers (an unseen task of a source without training rows).
    answers = {t: [r.output for r in train if r.task == t] or [r.output for r in test_by_task[t]] for t in seen + unseen}
    untrained = Counter(r.task for r in test if r.task not in test_by_task)
    return Population(clients, seen, unseen, test_by_task, answers, dict(sorted(untrained.items())))


def data_digest(pop: Population, cid: str) -> str:
    """A digest of what client `cid` trains and is evaluated on (its rows, the test rows, the answer budgets'
    outputs): a checkpoint records it, so a resume after the data files were edited is refused."""
    h = hashlib.sha256()
    for record in pop.clients[cid].records:
        h.update(json.dumps(record.to_dict(), sort_keys=True).encode())
    for task in sorted(pop.test_by_task):
        h.update(f"\0test|{task}".encode())
        for record in pop.test_by_task[task]:
            h.update(json.dumps(record.to_dict(), sort_keys=True).encode())
    h.update(json.dumps(pop.answers, sort_keys=True).encode())
    return h.hexdigest()[:16]


def answer_budgets(pop: Population, n_tokens: Callable[[str], int], cap: int) -> dict[str, int]:
    """Per task, the longest answer of its budget outputs in tokens (EOS included), at most `cap`."""
    return {t: min(cap, max((n_tokens(o) for o in outs), default=1)) for t, outs in pop.answers.items()}


def sample_clients(ids: list[str], k: int | None, seed: int, round_idx: int) -> list[str]:
    if k is None or k >= len(ids):
        return list(ids)
    rng = np.random.default_rng([seed, round_idx, 7])
    return sorted(ids[i] for i in rng.choice(len(ids), k, replace=False))
