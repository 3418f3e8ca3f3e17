"""One experiment, end to end: config -> data -> scenario -> clients -> rounds -> evaluation -> run folder.

The run folder is written under a temporary name and renamed into place at the end, so a failed run
leaves nothing half-written behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tomli_w
import torch

from taskfed.config import RunConfig
from taskfed.data.loaders import load_feddpa, load_hf, load_json
from taskfed.data.records import Record, tasks_of
from taskfed.data.scenarios import partition
from taskfed.engine.inprocess import InProcessEngine
from taskfed.errors import TaskfedError
from taskfed.evaluation.evaluate import evaluate_mode
from taskfed.methods import build_method
from taskfed.methods.base import Client, Federation
from taskfed.model.peft_io import save_adapter
from taskfed.runtime import Runtime
from taskfed.runfolder import finish_out, plain, prepare_out  # noqa: F401  (re-exported)


# ----------------------------------------------------------------------------- data
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
    if d.max_train_per_task:
        counts: dict[str, int] = {}
        kept = []
        for r in train:
            counts[r.task] = counts.get(r.task, 0) + 1
            if counts[r.task] <= d.max_train_per_task:
                kept.append(r)
        train = kept
    return train, test


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


def sample_clients(ids: list[str], k: int | None, seed: int, round_idx: int) -> list[str]:
    if k is None or k >= len(ids):
        return list(ids)
    rng = np.random.default_rng([seed, round_idx, 7])
    return sorted(ids[i] for i in rng.choice(len(ids), k, replace=False))


# ----------------------------------------------------------------------------- run folder
def write_server_side(folder: Path, cfg: RunConfig, method, metrics: dict) -> dict:
    """What the server side of any engine writes into a run folder: the resolved config, metrics.json and
    the server's adapters (PEFT format). Returns the adapters' LoRA description for client adapters."""
    (folder / "config.toml").write_text(tomli_w.dumps(plain(cfg.model_dump())))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    lora = dict(base_model=cfg.model.name, r=cfg.lora.r, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules)
    for name, weights in method.server_adapters().items():
        save_adapter(weights, folder / "adapters" / "server" / name.replace("/", "_"), **lora)
    return lora


# ----------------------------------------------------------------------------- the experiment
class Experiment:
    """Builds everything a run needs; `run()` does the rounds and the evaluation."""

    def __init__(self, cfg: RunConfig, rt: Runtime | None = None, log: Callable[[str], None] = lambda s: None,
                 gen_cache: dict | None = None):
        # gen_cache: generations keyed by (prompt, adapter fingerprints and weights, budget); a bench passes
        # one dict to every run on the same runtime so that identical (adapter, input) pairs generate once.
        self.cfg, self.log = cfg, log
        self.gen_cache = {} if gen_cache is None else gen_cache
        torch.manual_seed(cfg.seed)
        train, test = load_records(cfg)
        self.unseen = list(cfg.data.unseen_tasks)
        seen_train = [r for r in train if r.task not in self.unseen]
        self.seen = tasks_of(seen_train)
        parts = partition(seen_train, cfg.scenario.name, cfg.scenario.n_clients, cfg.seed, cfg.scenario.alpha)
        width = len(str(len(parts) - 1))
        self.clients = {f"{i:0{width}d}": Client(f"{i:0{width}d}", rows) for i, rows in enumerate(parts)}
        self.test_by_task = test_sets(cfg, test, self.seen + self.unseen)
        for task in self.seen + self.unseen:
            if not self.test_by_task[task] and any(m in cfg.eval.modes for m in ("local", "global", "unseen")):
                log(f"warning: task '{task}' has no test rows")
        self.rt = rt or Runtime(cfg)
        # Answer budget per task: the longest training answer of the task, capped.
        self.max_new = {}
        for task in self.seen + self.unseen:
            outputs = [r.output for r in train if r.task == task] or [r.output for r in self.test_by_task[task]]
            self.max_new[task] = min(cfg.eval.max_new_tokens, max(self.rt.n_answer_tokens(o) for o in outputs))
        fed = Federation(clients=list(self.clients), rounds=cfg.train.rounds, seed=cfg.seed,
                         init_adapter=self.rt.init_adapter(), tasks=self.seen, lr_max=cfg.train.lr_max,
                         lr_min=cfg.train.lr_min)
        self.method = build_method(cfg.method, fed)
        self.engine = InProcessEngine(self.rt, self.clients, cfg)

    def train(self) -> tuple[list[dict], int]:
        cfg = self.cfg
        tic = time.perf_counter()
        setup_bytes = self.engine.setup(self.method)
        self.setup_seconds = time.perf_counter() - tic  # client setup (e.g. FedRouter's embedding + KMeans)
        rounds = []
        total = self.method.n_rounds(cfg.train.rounds)
        for r in range(total):
            start = time.perf_counter()
            selected = sample_clients(list(self.clients), cfg.scenario.clients_per_round, cfg.seed, r)
            jobs = self.method.plan(r, selected)
            results, stats = self.engine.stream(r, jobs)
            # The server receives uploads only (a job that keeps its adapter on the client sends nothing),
            # one at a time as packs finish: a streaming aggregation never holds the whole round.
            self.method.aggregate(r, (x for x in results if x.weights is not None))
            for _ in results:  # what the aggregation did not pull (e.g. Local's client-kept jobs) still trains
                pass
            rounds.append({"round": r, "train_loss": stats.loss, "bytes_up": stats.bytes_up,
                           "bytes_down": stats.bytes_down, "seconds": time.perf_counter() - start,
                           "compute_seconds": stats.compute_seconds, "train_tokens": stats.tokens,
                           **({"dropped": stats.dropped} if stats.dropped else {}),
                           **self.method.round_report(r, self.clients)})
            for who, why in stats.dropped.items():
                self.log(f"round {r + 1}: dropped the upload {who}: {why}")
            self.log(f"round {r + 1}/{total}: loss {stats.loss:.4f}, {len(jobs)} jobs, "
                     f"{rounds[-1]['seconds']:.1f}s")
        return rounds, setup_bytes

    def evaluate(self) -> dict:
        cache = self.gen_cache
        out = {}
        for mode in self.cfg.eval.modes:  # one generation cache for all modes: local rows recur in global
            if mode == "unseen" and not self.unseen:
                self.log("eval mode 'unseen' skipped: no data.unseen_tasks")
                continue
            start = time.perf_counter()
            out[mode] = evaluate_mode(self.rt, self.method, self.clients, mode, self.test_by_task, self.max_new,
                                      self.seen, self.unseen, cache, self.log)
            out[mode]["seconds"] = time.perf_counter() - start
            self.log(f"eval {mode}: score {out[mode]['score']:.4f}")
        return out

    def run(self, out_dir: str | Path | None = None) -> dict:
        out_dir = Path(out_dir) if out_dir is not None else None
        tmp = prepare_out(out_dir) if out_dir is not None else None
        try:
            rounds, setup_bytes = self.train()
            evaluation = self.evaluate()
            metrics = {
                "method": self.cfg.method_name, "scenario": self.cfg.scenario.name, "seed": self.cfg.seed,
                "bytes_communicated": setup_bytes + sum(r["bytes_up"] + r["bytes_down"] for r in rounds),
                "rounds": rounds, "eval": evaluation, "setup_seconds": self.setup_seconds,
                "clients": {cid: {"n_train": len(c.records), "tasks": c.tasks} for cid, c in self.clients.items()},
            }
            if tmp is not None:
                self.write(tmp, metrics)
                finish_out(tmp, out_dir)
            return metrics
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def write(self, folder: Path, metrics: dict) -> None:
        lora = write_server_side(folder, self.cfg, self.method, metrics)
        for cid, client in self.clients.items():
            for name, weights in self.method.client_adapters(client).items():
                save_adapter(weights, folder / "adapters" / "clients" / cid / name.replace("/", "_"), **lora)
        from taskfed.report import run_report

        (folder / "report.md").write_text(run_report(metrics))


def run_experiment(cfg: RunConfig, out_dir: str | Path | None = None, rt: Runtime | None = None,
                   log: Callable[[str], None] = lambda s: None, gen_cache: dict | None = None) -> dict:
    return Experiment(cfg, rt=rt, log=log, gen_cache=gen_cache).run(out_dir)
