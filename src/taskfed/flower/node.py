"""The node's side: which client this node is, its cached runtime, and the handlers for the server's messages.

A node is one taskfed client. It finds its rows from its node config, either
- `partition-id` / `num-partitions`: the node builds the run's population (`population.population`, the very
  function the in-process run uses) and keeps its partition, so a node's client `03` holds the rows (and
  evaluates on the test rows) the in-process client `03` does; `data-path` then overrides `data.path` (the
  FedDPA folder) when the node keeps the data elsewhere; or
- `train-json` (a JSON file of the node's own training rows) with `client-id`, and optionally `test-json`
  (its own test rows; without it the node is not evaluated): nothing else is read.
`state-dir` names where the client's store lives (default: the taskfed cache, per run and client).

Every message's work runs through `InProcessEngine` on a one-client population (row selection, seeds,
packing, training, the node-side upload check, evaluation), with the method's client side built fresh
from the config and the federation's facts the message carries: nothing of the server's method object.

    hello     -> who this node is: client id, training rows, its tasks, the run's seen and unseen tasks
    setup     -> the method's client setup (e.g. FedRouter's local clustering): arrays up, the store on disk
    round     -> one round's jobs: results up, the store on disk (client adapters written after the last)
    evaluate  -> one mode on the client's test rows under what the server sent: scores, never texts

`handle(kind, content, node_config, run_id)` is the whole protocol, content in and content out, so the
ClientApp (one process per message) and the long-lived worker (flower/worker.py) run the same code.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from taskfed import faults
from taskfed.config import RunConfig
from taskfed.data.loaders import load_json
from taskfed.engine.inprocess import InProcessEngine
from taskfed.errors import TaskfedError
from taskfed.flower.basecache import cached_base
from taskfed.flower.codec import (decode_config, decode_eval_request, decode_fed, decode_jobs, encode_adapter,
                                  encode_arrays, encode_eval_reply)
from taskfed.flower.store import load_store, save_store
from taskfed.methods.base import Client, Downlink, Federation
from taskfed.model.loading import cache_dir
from taskfed.population import Population, cap_per_task, client_ids, data_digest, population, test_sets
from taskfed.runtime import Runtime


KEEP_STEPS = 3  # the server resumes at most two steps behind a node (its newest checkpoint may be damaged)


@dataclass
class Node:
    pop: Population  # this node's client only, with the run's tasks and the test rows
    client_id: str
    root: Path  # the state dir: the client's state per run under it
    flower_run: str  # the Flower run and config digest, for runs whose server sends no run id
    scratch: dict[str, Any] = field(default_factory=dict)  # the client's recomputable caches (never saved)

    @property
    def client(self) -> Client:
        return self.pop.clients[self.client_id]

    def state_dir(self, fed: Federation) -> Path:
        """Keyed by the taskfed run's id (kept across a server's resume, unlike Flower's run id)."""
        return self.root / (f"run-{fed.run}" if fed.run else self.flower_run) / self.client_id

    def _held(self, fed: Federation) -> dict[int, Path]:
        """The step folders this node holds for the run, by step."""
        return {int(p.name[5:]): p for p in self.state_dir(fed).glob("step-*") if p.name[5:].isdigit()}

    def load_step(self, fed: Federation, step: int, what: str) -> dict[str, Any]:
        """The client's store as committed at `step` (0: after setup, r: after round r - 1)."""
        # A client not sampled in a round commits nothing for it: its state is that of the newest step at or
        # before the one asked for (a later step belongs to a timeline the server abandoned on resume).
        held = sorted(n for n, p in self._held(fed).items() if (p / "store.json").exists())
        usable = [n for n in held if n <= step]
        if not usable:
            raise TaskfedError(f"client {self.client_id}: the server asks for {what}, which needs the client state "
                               f"committed at step {step}, but {self.state_dir(fed)} holds steps {held or 'none'}: "
                               f"the server and this node disagree; resume the server from a checkpoint this node "
                               f"has, or give the node its state dir back.")
        return load_store(self.state_dir(fed) / f"step-{usable[-1]}")

    def commit_step(self, fed: Federation, step: int, store: dict[str, Any]) -> None:
        """The store of `step`, on disk before the reply leaves: a step counts as done here only then."""
        save_store(store, self.state_dir(fed) / f"step-{step}")
        for n, old in self._held(fed).items():
            if n <= step - KEEP_STEPS or n > step:  # too old, or a later step of an abandoned timeline
                shutil.rmtree(old, ignore_errors=True)


# One runtime per process and config, shared by the nodes a process serves (a Simulation Engine actor
# serves several, a long-lived worker one), as the in-process engine shares one runtime by all its clients.
_RUNTIMES: dict[str, Runtime] = {}
_NODES: dict[tuple, Node] = {}


def runtime(cfg: RunConfig) -> tuple[Runtime, float]:
    key = cfg.model_dump_json()
    tic = time.perf_counter()
    if key not in _RUNTIMES:
        model, tokenizer = cached_base(cfg)
        _RUNTIMES.clear()  # another config: free the old model first
        _RUNTIMES[key] = Runtime(cfg, model=model, tokenizer=tokenizer)
    return _RUNTIMES[key], time.perf_counter() - tic


def _partition(cfg: RunConfig, node_config: dict[str, Any]) -> Population:
    pid, n = node_config["partition-id"], node_config.get("num-partitions", cfg.scenario.n_clients)
    if not isinstance(pid, int) or not isinstance(n, int) or not 0 <= pid < n:
        raise TaskfedError(f"node config: partition-id {pid!r} is not an integer in [0, num-partitions = {n!r}).")
    if n != cfg.scenario.n_clients:
        raise TaskfedError(f"node config: num-partitions = {n} but the run's scenario.n_clients = {cfg.scenario.n_clients}.")
    if "data-path" in node_config:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(node_config["data-path"])})})
    pop = population(cfg)
    cid = client_ids(n)[pid]
    return Population({cid: pop.clients[cid]}, pop.seen, pop.unseen, pop.test_by_task, pop.answers)


def _own_rows(cfg: RunConfig, node_config: dict[str, Any]) -> Population:
    cid = node_config.get("client-id")
    if not isinstance(cid, str) or not cid:
        raise TaskfedError("node config: train-json needs a client-id (a non-empty string).")
    unseen = list(cfg.data.unseen_tasks)
    seen = [t for t in cfg.data.tasks if t not in unseen]
    if not seen:
        raise TaskfedError("node config: with train-json, the run config must list data.tasks.")
    path = str(node_config["train-json"])
    rows, _ = load_json(path, path)
    rows = cap_per_task([r for r in rows if r.task in set(seen)], cfg.data.max_train_per_task)
    if not rows:
        raise TaskfedError(f"{path}: no training rows for this run's tasks.")
    test = []
    if "test-json" in node_config:
        test, _ = load_json(str(node_config["test-json"]), str(node_config["test-json"]))
    tests = test_sets(cfg, test, seen + unseen)
    answers = {t: [r.output for r in rows if r.task == t] or [r.output for r in tests[t]] for t in seen + unseen}
    return Population({cid: Client(cid, rows)}, seen, unseen, tests, answers)


def node(cfg: RunConfig, node_config: dict[str, Any], run_id: int) -> Node:
    key = (cfg.model_dump_json(), tuple(sorted((k, str(v)) for k, v in node_config.items())), run_id)
    if key not in _NODES:
        if "train-json" in node_config:
            pop = _own_rows(cfg, node_config)
        elif "partition-id" in node_config:
            pop = _partition(cfg, node_config)
        else:
            raise TaskfedError("node config: give partition-id and num-partitions, or train-json and client-id.")
        cid = next(iter(pop.clients))
        root = Path(str(node_config["state-dir"])) if "state-dir" in node_config else cache_dir() / "flower" / "state"
        # Per Flower run and taskfed config: one Flower run may serve several taskfed runs.
        digest = hashlib.sha256(key[0].encode()).hexdigest()[:10]
        _NODES[key] = Node(pop, cid, root, f"run-{run_id}-{digest}")
    return _NODES[key]


def _engine(cfg: RunConfig, rt: Runtime, me: Node, content: RecordDict, kind: str) -> tuple[InProcessEngine, Client]:
    """The in-process engine over this node's client, its store read from disk as committed at the step the
    message starts from (a round r from step r, an evaluation from the last), the method's client side built
    from the federation's facts in the message."""
    fed = decode_fed(content.config_records.get("fed"), cfg, rt.init_adapter())
    client = Client(me.client_id, me.client.records, {}, me.scratch)
    pop = Population({client.id: client}, me.pop.seen, me.pop.unseen, me.pop.test_by_task, me.pop.answers)
    engine = InProcessEngine(rt, pop, cfg)
    engine.attach(fed)
    if kind == "round":
        head = content.config_records.get("round")
        round_idx = head.get("round") if head is not None else None
        if not isinstance(round_idx, int):
            raise TaskfedError("flower message: a round message without its round index.")
        faults.hit(f"node.round-{round_idx + 1}")
        client.store.update(me.load_step(fed, round_idx, f"round {round_idx + 1}"))
    elif kind == "evaluate":
        last = engine.client_side.n_rounds(cfg.train.rounds)
        client.store.update(me.load_step(fed, last, "the evaluation"))
    return engine, client


# ----------------------------------------------------------------------------- handlers
def handle(kind: str, content: RecordDict, node_config: dict[str, Any], run_id: int) -> RecordDict:
    cfg = decode_config(content.config_records.get("config"))
    rt, load_seconds = runtime(cfg)
    me = node(cfg, node_config, run_id)
    if kind == "hello":
        info = {"client": me.client_id, "n_train": len(me.client.records), "tasks": me.client.tasks,
                "seen": list(me.pop.seen), "unseen": list(me.pop.unseen),
                "data": data_digest(me.pop, me.client_id), "base": rt.fingerprint}  # resume compares them
        return RecordDict({"hello": ConfigRecord(info)})
    engine, client = _engine(cfg, rt, me, content, kind)
    if kind == "setup":
        uploads, _, _ = engine.setup(engine.client_side.fed)
        me.commit_step(engine.client_side.fed, 0, client.store)
        reply = RecordDict({"setup_info": ConfigRecord({"has_setup": client.id in uploads})})
        if client.id in uploads:
            reply["setup"] = encode_arrays(uploads[client.id])
        return reply
    if kind == "round":
        return _round(cfg, rt, me, engine, client, content, load_seconds)
    if kind == "evaluate":
        mode, tasks, sent = decode_eval_request(content, rt.bank.shapes())
        evals, _ = engine.evaluate(mode, {client.id: tasks}, lambda _: sent)
        if mode == "local":  # the client's files again, now with what the server sent (a personal model
            write_client_adapters(cfg, engine, me, sent)  # may combine both: FedSA-LoRA's A with its own B)
        if client.id not in evals:  # no test rows for these tasks here
            return RecordDict({"skipped": ConfigRecord({"reason": "no test rows for the asked tasks"})})
        return encode_eval_reply(evals[client.id])
    raise TaskfedError(f"flower message: unknown message kind '{kind}'.")


def _round(cfg: RunConfig, rt: Runtime, me: Node, engine: InProcessEngine, client: Client, content: RecordDict,
           load_seconds: float) -> RecordDict:
    """One round's jobs for this node's client, run by the in-process engine's own code."""
    round_idx, jobs = decode_jobs(content, rt.bank.shapes(), engine.client_side.fed.init_adapter)
    strangers = sorted({j.client for j in jobs} - {client.id})
    if strangers:
        raise TaskfedError(f"node {client.id} was sent jobs of client {strangers[0]}.")
    tic = time.perf_counter()
    results, stats = engine.run(round_idx, jobs)
    train_seconds = time.perf_counter() - tic
    me.commit_step(engine.client_side.fed, round_idx + 1, client.store)
    if round_idx == engine.client_side.n_rounds(cfg.train.rounds) - 1:
        write_client_adapters(cfg, engine, me)
    index = {id(job): i for i, job in enumerate(jobs)}
    reply = RecordDict()
    extra_job, extra_name = [], []
    for i, r in enumerate(results):
        if r.weights is not None:
            reply[f"r.{i}"] = encode_adapter(r.weights)
        for k, name in enumerate(sorted(r.extra)):
            reply[f"x.{i}.{k}"] = encode_adapter(r.extra[name])
            extra_job.append(i)
            extra_name.append(name)
    reply["results"] = ConfigRecord({
        "extra_job": extra_job, "extra_name": extra_name,
        "job": [index[id(r.job)] for r in results], "n_rows": [r.n_rows for r in results],
        "n_client": [r.n_client for r in results], "loss": [float(r.loss) for r in results],
        "chosen": [-1 if r.chosen is None else int(r.chosen) for r in results],
        "uploaded": [r.weights is not None for r in results]})
    reply["stats"] = ConfigRecord({
        "load_seconds": load_seconds, "train_seconds": train_seconds, "compute_seconds": stats.compute_seconds,
        "tokens": stats.tokens, "dropped": [f"{k}: {v}" for k, v in sorted(stats.dropped.items())]})
    return reply


def write_client_adapters(cfg: RunConfig, engine: InProcessEngine, me: Node, sent: Downlink | None = None) -> None:
    """The client's own adapters (never sent), as PEFT folders beside its store (adapters/clients/<id>/, the
    run folder's layout), and its arrays (FedDPA's references where allowed), after the last round and on
    the local evaluation (with its downlink, as the in-process driver writes them)."""
    from taskfed.federation import lora_description

    engine.save_client_files(me.state_dir(engine.client_side.fed).parent, lora_description(cfg),  # adapters/clients/<id>/...
                             None if sent is None else (lambda _: sent))
