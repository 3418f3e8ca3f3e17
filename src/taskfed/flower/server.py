"""The ServerApp's side: a taskfed method driven over a Flower Grid, round for round as `Experiment.train`.

    setup  (train.setup)   each node says which client it is and runs the method's client setup; the
                           federation's tasks are agreed, arrays come up, `setup_server`
    rounds (train.round)   seeded client choice, `plan`, each client's jobs to its node, checked results,
                           `aggregate` (results in plan order, so the method's sorted sums see what they
                           would see in-process); after the last round nodes write their own adapters
    then the run folder: config.toml, metrics.json (the rounds), the server's adapters in PEFT format.

A node whose reply is an error, late, or fails a check (keys, shapes, dtype, finite values, counts) is
dropped from that round with its reason logged and recorded in the round's `dropped`; the round goes on.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from taskfed.config import RunConfig
from taskfed.errors import TaskfedError
from taskfed.flower.basecache import cached_base
from taskfed.flower.codec import check_results, decode_adapter, decode_arrays, encode_config, encode_jobs
from taskfed.methods import build_method
from taskfed.engine.inprocess import downlink_bytes
from taskfed.methods.base import Federation, Job, Method, Result
from taskfed.model.peft_io import n_bytes
from taskfed.run import finish_out, prepare_out, sample_clients, write_server_side
from taskfed.runtime import Runtime

LOG = logging.getLogger("taskfed.flower")


@dataclass
class Options:
    out_dir: Path | None = None
    round_timeout: float = 3600.0  # seconds a round waits for replies before dropping the silent nodes
    connect_timeout: float = 300.0  # seconds to wait for scenario.n_clients nodes to connect


@dataclass
class Federated:
    """The server's view: node id of each client, and what it learnt at hello."""

    node_of: dict[str, int] = field(default_factory=dict)
    n_train: dict[str, int] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)


def _exchange(grid: Grid, messages: dict[int, Message], timeout: float, what: str) -> tuple[dict[int, Message], dict[int, str]]:
    """Replies by node id, and why each node that gave none usable is out."""
    replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(list(messages.values()), timeout=timeout)}
    failed = {}
    for node_id in messages:
        reply = replies.get(node_id)
        if reply is None:
            failed[node_id] = f"no {what} reply within {timeout:g} s"
        elif reply.has_error():
            failed[node_id] = f"{what} failed on the node ({reply.error.reason})"
    return {k: v for k, v in replies.items() if k not in failed}, failed


def _wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise TaskfedError(f"flower: {len(nodes)} of scenario.n_clients = {n} nodes connected within {timeout:g} s.")
        time.sleep(0.2)


def _setup(grid: Grid, cfg: RunConfig, nodes: list[int], opts: Options) -> tuple[Federated, dict[str, dict[str, np.ndarray]]]:
    """One exchange: each node says which client it is and runs the method's client setup. A node that
    fails it is out for the run (membership is fixed here); two nodes claiming one client stop the run."""
    msgs = {n: Message(RecordDict({"config": encode_config(cfg)}), dst_node_id=n, message_type="train.setup") for n in nodes}
    replies, failed = _exchange(grid, msgs, opts.round_timeout, "setup")
    fed, views, uploads = Federated(), set(), {}
    for node_id, reply in sorted(replies.items()):
        try:
            info = reply.content.config_records["hello"]
            cid = str(info["client"])
            if cid in fed.node_of:
                raise TaskfedError(f"flower: nodes {fed.node_of[cid]} and {node_id} both claim to be client '{cid}'.")
            if info["has_setup"]:
                uploads[cid] = decode_arrays(reply.content.array_records.get("setup"), f"setup upload of client {cid}")
            fed.node_of[cid], fed.n_train[cid] = node_id, int(info["n_train"])
            views.add(tuple(info["fed_tasks"]))
        except KeyError as exc:
            failed[node_id] = f"setup reply lacks {exc}"
        except TaskfedError as exc:
            if "both claim" in str(exc):
                raise
            failed[node_id] = str(exc)
    for node_id, why in failed.items():
        LOG.warning("node %s left out of the federation: %s", node_id, why)
    if not fed.node_of:
        raise TaskfedError("flower: no node completed the setup.")
    if len(views) > 1:
        raise TaskfedError("flower: the nodes disagree on the run's tasks: give them the same data and config.")
    fed.tasks = list(views.pop())  # partition mode: the whole data's order, as in-process; else data.tasks
    return fed, uploads


def _round(grid: Grid, cfg: RunConfig, r: int, jobs: list[Job], fed: Federated, shapes, opts: Options) -> tuple[list[Result], dict[str, Any]]:
    by_client: dict[str, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        by_client[job.client].append(i)
    stats: dict[str, Any] = {"bytes_up": 0, "bytes_down": 0, "compute_seconds": 0.0, "train_tokens": 0,
                             "node_load_seconds": 0.0, "node_train_seconds": 0.0, "dropped": {}}
    msgs = {}
    for cid, idx in by_client.items():
        mine = [jobs[i] for i in idx]
        msgs[fed.node_of[cid]] = Message(encode_jobs(mine, r, cfg), dst_node_id=fed.node_of[cid],
                                         message_type="train.round", group_id=str(r))
        stats["bytes_down"] += downlink_bytes(mine)
    replies, failed = _exchange(grid, msgs, opts.round_timeout, "round")
    client_of = {n: c for c, n in fed.node_of.items()}
    placed: dict[int, Result] = {}
    for node_id, reply in replies.items():
        cid = client_of[node_id]
        mine = [jobs[i] for i in by_client[cid]]
        try:
            got = _results(reply, mine, shapes, f"round {r + 1} upload of client {cid}")
        except TaskfedError as exc:
            failed[node_id] = str(exc)
            continue
        for local_i, res in got:
            placed[by_client[cid][local_i]] = res
            if res.weights is not None:
                stats["bytes_up"] += n_bytes(res.weights)
        s = reply.content.config_records.get("stats", {})
        stats["compute_seconds"] += float(s.get("compute_seconds", 0.0))
        stats["train_tokens"] += int(s.get("tokens", 0))
        stats["node_load_seconds"] = max(stats["node_load_seconds"], float(s.get("load_seconds", 0.0)))
        stats["node_train_seconds"] = max(stats["node_train_seconds"], float(s.get("train_seconds", 0.0)))
        for line in s.get("dropped", []):  # uploads the node's own check refused before sending
            key, _, why = line.partition(": ")
            stats["dropped"][key] = why
    for node_id, why in failed.items():
        stats["dropped"][client_of[node_id]] = why
        LOG.warning("round %d: dropped client %s: %s", r + 1, client_of[node_id], why)
    return [placed[i] for i in sorted(placed)], stats


def _results(reply: Message, jobs: list[Job], shapes, where: str) -> list[tuple[int, Result]]:
    rows = check_results(reply.content.config_records.get("results"), jobs, where)
    out = []
    for i, row in enumerate(rows):
        job = jobs[row["job"]]
        weights = decode_adapter(reply.content.array_records.get(f"r.{i}"), shapes, where) if row["uploaded"] else None
        out.append((row["job"], Result(job=job, weights=weights, n_rows=row["n_rows"], n_client=row["n_client"],
                                       loss=row["loss"], chosen=None if job.candidates is None else row["chosen"])))
    return out


def serve(grid: Grid, cfg: RunConfig, opts: Options | None = None) -> dict[str, Any]:
    """Runs the method's rounds over the grid's nodes; returns metrics (and writes the run folder if asked)."""
    opts = opts or Options()
    tmp = prepare_out(opts.out_dir) if opts.out_dir is not None else None
    try:
        torch.manual_seed(cfg.seed)
        nodes = _wait_for_nodes(grid, cfg.scenario.n_clients, opts.connect_timeout)
        model, tokenizer = cached_base(cfg)  # the server needs the adapters' shapes and the initial adapter
        rt = Runtime(cfg, model=model, tokenizer=tokenizer)
        tic = time.perf_counter()
        fed, uploads = _setup(grid, cfg, nodes, opts)
        clients = sorted(fed.node_of)
        method = build_method(cfg.method, Federation(
            clients=clients, rounds=cfg.train.rounds, seed=cfg.seed, init_adapter=rt.init_adapter(), tasks=fed.tasks,
            lr_max=cfg.train.lr_max, lr_min=cfg.train.lr_min))
        if uploads:
            method.setup_server(uploads)
        setup_seconds = time.perf_counter() - tic
        rounds = [_run_round(grid, cfg, method, r, clients, fed, rt.bank.shapes(), opts)
                  for r in range(method.n_rounds(cfg.train.rounds))]
        metrics = {"method": cfg.method_name, "scenario": cfg.scenario.name, "seed": cfg.seed, "engine": "flower",
                   "bytes_communicated": sum(r["bytes_up"] + r["bytes_down"] for r in rounds) + sum(
                       sum(np.asarray(v).nbytes for v in u.values()) for u in uploads.values()),
                   "rounds": rounds, "setup_seconds": setup_seconds,
                   "clients": {c: {"n_train": fed.n_train[c]} for c in clients}}
        if tmp is not None:
            write_server_side(tmp, cfg, method, metrics)
            finish_out(tmp, opts.out_dir)
        return metrics
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _run_round(grid, cfg, method: Method, r: int, clients: list[str], fed: Federated, shapes, opts) -> dict[str, Any]:
    start = time.perf_counter()
    selected = sample_clients(clients, cfg.scenario.clients_per_round, cfg.seed, r)
    jobs = method.plan(r, selected)
    results, stats = _round(grid, cfg, r, jobs, fed, shapes, opts)
    method.aggregate(r, [x for x in results if x.weights is not None])
    record = {"round": r, "train_loss": float(np.mean([x.loss for x in results])) if results else float("nan"),
              "seconds": time.perf_counter() - start, **stats}
    if not record["dropped"]:
        del record["dropped"]
    LOG.info("round %d: loss %.4f, %d jobs, %.1fs", r + 1, record["train_loss"], len(jobs), record["seconds"])
    return record


