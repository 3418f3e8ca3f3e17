"""The node's side: which client this node is, its cached runtime, and the handlers the ClientApp calls.

A node is one taskfed client. It finds its rows from its node config, either
- `partition-id` / `num-partitions`: the node loads the run's data and takes its partition, exactly as
  `run.Experiment` builds clients (so a node's client `03` holds the rows the in-process client `03` holds);
  `data-path` then overrides `data.path` (the FedDPA folder) when the node keeps the data elsewhere; or
- `train-json` (a JSON file of the node's own training rows) with `client-id`: nothing else is read.
`state-dir` names where the client's store lives (default: the taskfed cache, per run and client).

A round's jobs run through `InProcessEngine.run` on a one-client federation: the very code of the
in-process engine (row selection, seeds, packing, training, the node-side upload check), so a node trains
what the in-process engine would have trained for that client.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict

from taskfed.config import RunConfig
from taskfed.data.loaders import load_json
from taskfed.data.records import Record, tasks_of
from taskfed.data.scenarios import partition
from taskfed.engine.inprocess import InProcessEngine
from taskfed.errors import TaskfedError
from taskfed.flower.basecache import cached_base
from taskfed.flower.codec import decode_config, decode_jobs, encode_adapter, encode_arrays
from taskfed.flower.store import load_store, save_store
from taskfed.methods import build_method
from taskfed.methods.base import Client, Federation, Method
from taskfed.model.loading import cache_dir
from taskfed.model.peft_io import save_adapter
from taskfed.runtime import Runtime


@dataclass
class Node:
    client: Client  # records only: the store is read from disk for every message
    fed_tasks: list[str] | None  # the whole data's seen tasks (partition mode), for the server to check
    state_dir: Path


# One runtime per process and config, shared by the nodes a process serves (a Simulation Engine actor
# serves several), as the in-process engine shares one runtime by all its clients; data per node.
_RUNTIMES: dict[str, Runtime] = {}
_NODES: dict[tuple, Node] = {}
LOAD_SECONDS: list[float] = []  # what getting the runtime cost, per message (for the overhead report)


def runtime(cfg: RunConfig) -> tuple[Runtime, float]:
    key = cfg.model_dump_json()
    tic = time.perf_counter()
    if key not in _RUNTIMES:
        model, tokenizer = cached_base(cfg)
        _RUNTIMES.clear()  # another config: free the old model first
        _RUNTIMES[key] = Runtime(cfg, model=model, tokenizer=tokenizer)
    return _RUNTIMES[key], time.perf_counter() - tic


def _partition_client(cfg: RunConfig, node_config: dict[str, Any]) -> tuple[Client, list[str]]:
    from taskfed.run import load_records  # the same loading and filtering as the in-process run

    pid, n = node_config["partition-id"], node_config.get("num-partitions", cfg.scenario.n_clients)
    if not isinstance(pid, int) or not isinstance(n, int) or not 0 <= pid < n:
        raise TaskfedError(f"node config: partition-id {pid!r} is not an integer in [0, num-partitions = {n!r}).")
    if n != cfg.scenario.n_clients:
        raise TaskfedError(f"node config: num-partitions = {n} but the run's scenario.n_clients = {cfg.scenario.n_clients}.")
    if "data-path" in node_config:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(node_config["data-path"])})})
    train, _ = load_records(cfg)
    seen = [r for r in train if r.task not in set(cfg.data.unseen_tasks)]
    parts = partition(seen, cfg.scenario.name, n, cfg.seed, cfg.scenario.alpha)
    width = len(str(len(parts) - 1))
    return Client(f"{pid:0{width}d}", parts[pid]), tasks_of(seen)


def _json_client(cfg: RunConfig, node_config: dict[str, Any]) -> Client:
    cid = node_config.get("client-id")
    if not isinstance(cid, str) or not cid:
        raise TaskfedError("node config: train-json needs a client-id (a non-empty string).")
    rows, _ = load_json(node_config["train-json"], node_config["train-json"])
    keep = set(cfg.data.tasks) if cfg.data.tasks else None
    rows = [r for r in rows if r.task not in set(cfg.data.unseen_tasks) and (keep is None or r.task in keep)]
    if cfg.data.max_train_per_task:
        counts: dict[str, int] = {}
        capped: list[Record] = []
        for r in rows:
            counts[r.task] = counts.get(r.task, 0) + 1
            if counts[r.task] <= cfg.data.max_train_per_task:
                capped.append(r)
        rows = capped
    if not rows:
        raise TaskfedError(f"{node_config['train-json']}: no training rows for this run's tasks.")
    return Client(cid, rows)


def node(cfg: RunConfig, context: Context) -> Node:
    nc = dict(context.node_config)
    key = (cfg.model_dump_json(), tuple(sorted((k, str(v)) for k, v in nc.items())))
    if key not in _NODES:
        if "train-json" in nc:
            client, fed_tasks = _json_client(cfg, nc), None
        elif "partition-id" in nc:
            client, fed_tasks = _partition_client(cfg, nc)
        else:
            raise TaskfedError("node config: give partition-id and num-partitions, or train-json and client-id.")
        root = Path(str(nc["state-dir"])) if "state-dir" in nc else cache_dir() / "flower" / "state"
        # Per Flower run and taskfed config: one Flower run may serve several taskfed runs.
        digest = hashlib.sha256(key[0].encode()).hexdigest()[:10]
        _NODES[key] = Node(client, fed_tasks, root / f"run-{context.run_id}-{digest}" / client.id)
    return _NODES[key]


def fed_tasks(cfg: RunConfig, me: Node) -> list[str]:
    """The federation's seen tasks, as the server will state them: the whole data's (partition mode), else
    the config's `data.tasks` (a node holding only its own rows cannot know the others' tasks)."""
    if me.fed_tasks is not None:
        return me.fed_tasks
    tasks = [t for t in cfg.data.tasks if t not in cfg.data.unseen_tasks]
    if not tasks:
        raise TaskfedError("node config: with train-json, the run config must list data.tasks.")
    return tasks


def _method(cfg: RunConfig, rt: Runtime, me: Node) -> Method:
    """The method's client-side hooks need its parameters and the federation's facts, nothing the server holds."""
    return build_method(cfg.method, Federation(
        clients=[me.client.id], rounds=cfg.train.rounds, seed=cfg.seed, init_adapter=rt.init_adapter(),
        tasks=fed_tasks(cfg, me), lr_max=cfg.train.lr_max, lr_min=cfg.train.lr_min))


# ----------------------------------------------------------------------------- handlers
def setup(msg: Message, context: Context) -> Message:
    """Who this node is (client id, row count, the federation's tasks as it sees them) and the method's
    client setup (e.g. FedRouter's local clustering): the store stays here, only arrays go up."""
    cfg = decode_config(msg.content.config_records.get("config"))
    rt, _ = runtime(cfg)
    me = node(cfg, context)
    client = Client(me.client.id, me.client.records, {})
    out = _method(cfg, rt, me).setup_client(client, rt)
    save_store(client.store, me.state_dir)
    info = {"client": client.id, "n_train": len(client.records), "fed_tasks": fed_tasks(cfg, me),
            "has_setup": out is not None}
    content = RecordDict({"hello": ConfigRecord(info)})
    if out is not None:
        content["setup"] = encode_arrays(out)
    return Message(content, reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """One round's jobs for this node's client, run by the in-process engine's own code."""
    cfg = decode_config(msg.content.config_records.get("config"))
    rt, load_seconds = runtime(cfg)
    LOAD_SECONDS.append(load_seconds)
    me = node(cfg, context)
    round_idx, jobs = decode_jobs(msg.content, rt.bank.shapes())
    strangers = sorted({j.client for j in jobs} - {me.client.id})
    if strangers:
        raise TaskfedError(f"node {me.client.id} was sent jobs of client {strangers[0]}.")
    client = Client(me.client.id, me.client.records, load_store(me.state_dir))
    tic = time.perf_counter()
    results, stats = InProcessEngine(rt, {client.id: client}, cfg).run(round_idx, jobs)
    train_seconds = time.perf_counter() - tic
    save_store(client.store, me.state_dir)
    method = _method(cfg, rt, me)
    if round_idx == method.n_rounds(cfg.train.rounds) - 1:
        write_client_adapters(cfg, method, client, me)
    index = {id(job): i for i, job in enumerate(jobs)}
    content = RecordDict()
    for i, r in enumerate(results):
        if r.weights is not None:
            content[f"r.{i}"] = encode_adapter(r.weights)
    content["results"] = ConfigRecord({
        "job": [index[id(r.job)] for r in results], "n_rows": [r.n_rows for r in results],
        "n_client": [r.n_client for r in results], "loss": [float(r.loss) for r in results],
        "chosen": [-1 if r.chosen is None else int(r.chosen) for r in results],
        "uploaded": [r.weights is not None for r in results]})
    content["stats"] = ConfigRecord({
        "load_seconds": load_seconds, "train_seconds": train_seconds, "compute_seconds": stats.compute_seconds,
        "tokens": stats.tokens, "dropped": [f"{k}: {v}" for k, v in sorted(stats.dropped.items())]})
    return Message(content, reply_to=msg)


def write_client_adapters(cfg: RunConfig, method: Method, client: Client, me: Node) -> None:
    """The client's own adapters (never sent), as PEFT folders beside its store, after the last round."""
    lora = dict(base_model=cfg.model.name, r=cfg.lora.r, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules)
    for name, weights in method.client_adapters(client).items():
        save_adapter(weights, me.state_dir.parent / f"{client.id}-adapters" / name.replace("/", "_"), **lora)
