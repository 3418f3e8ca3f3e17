"""FlowerEngine: the engine protocol (engine/__init__.py) over a Flower Grid, one SuperNode per client.

    connect   `train.hello` to every node: which client it is, its rows and tasks, the run's tasks
    setup     `train.setup`: the method's client setup on each node, arrays up
    stream    `train.round`: each client's jobs to its node, pushed at once; replies are pulled as they
              arrive and each node's results handed on in plan order as soon as every job planned before
              them is in (or its node is out), as the in-process engine streams its packs
    evaluate  `evaluate.mode`: the method's downlink to each node, which evaluates its own test rows and
              returns scores per task and the routing it used (never the texts)

Every reply is checked before it is used (codec.py); a node whose reply is an error, late, or fails a check
is dropped from that round or evaluation with its reason (`dropped` in metrics.json), and the run goes on.
The server needs the model only for the adapters' shapes and the initial adapter.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from taskfed import progress
from taskfed.config import RunConfig
from taskfed.engine import ClientFiles, ClientInfo, Roster, RoundStats
from taskfed.engine.inprocess import downlink_bytes
from taskfed.errors import TaskfedError
from taskfed.evaluation.evaluate import ClientEval
from taskfed.flower.basecache import cached_base
from taskfed.flower.codec import (check_extras, check_results, check_stats, decode_adapter, decode_arrays, decode_eval_reply,
                                  decode_extra, encode_config, encode_eval_request, encode_fed, encode_jobs)
from taskfed.methods.base import Downlink, Federation, Job, Result
from taskfed.model.parts import only
from taskfed.model.peft_io import n_bytes
from taskfed.runtime import Runtime

LOG = logging.getLogger("taskfed.flower")
POLL_SECONDS = 0.05  # between pulls while replies are outstanding (flwr's send_and_receive sleeps 3 s)


@dataclass
class Options:
    out_dir: Path | None = None
    round_timeout: float = 3600.0  # seconds a round (or an evaluation) waits for replies before dropping nodes
    connect_timeout: float = 300.0  # seconds to wait for scenario.n_clients nodes to connect
    resume: bool = False  # continue the run in out_dir.partial/ from its last checkpoint
    rejoin_timeout: float = 0.0  # seconds a round waits, before it starts, for a client's node to come back


class FlowerEngine:
    name = "flower"

    def __init__(self, grid: Grid, cfg: RunConfig, opts: Options | None = None):
        self.grid, self.cfg, self.opts = grid, cfg, opts or Options()
        model, tokenizer = cached_base(cfg)
        self.rt = Runtime(cfg, model=model, tokenizer=tokenizer)
        self.shapes = self.rt.bank.shapes()
        self.node_of: dict[str, int] = {}
        self.n_train: dict[str, int] = {}
        self.fed: Federation | None = None

    # ----------------------------------------------------------------- messaging
    def _message(self, node_id: int, kind: str, content: RecordDict, group: str = "") -> Message:
        return Message(content, dst_node_id=node_id, message_type=kind, group_id=group)

    def _push(self, messages: dict[Any, Message]) -> dict[str, Any]:
        """Message id -> the key (node id or client) it was sent for."""
        keys = list(messages)
        ids = list(self.grid.push_messages([messages[k] for k in keys]))
        return dict(zip(ids, keys))

    def _pull(self, pending: dict[str, Any], deadline: float) -> Iterator[tuple[Any, Message | None]]:
        """(key, reply) as replies arrive; (key, None) for each still missing at the deadline."""
        pending = dict(pending)
        while pending:
            replies = list(self.grid.pull_messages(list(pending)))
            for reply in replies:
                key = pending.pop(reply.metadata.reply_to_message_id, None)
                if key is not None:
                    yield key, reply
            if not replies:
                if time.monotonic() > deadline:
                    for key in pending.values():
                        yield key, None
                    return
                time.sleep(POLL_SECONDS)

    def _exchange(self, messages: dict[Any, Message], what: str,
                  timeout: float | None = None) -> tuple[dict[Any, Message], dict[Any, str]]:
        """Replies by key, and why each key that gave none usable is out."""
        replies, failed = {}, {}
        timeout = self.opts.round_timeout if timeout is None else timeout
        for key, reply in self._pull(self._push(messages), time.monotonic() + timeout):
            progress.advance()  # one node answered (or timed out)
            if reply is None:
                failed[key] = f"no {what} reply within {timeout:g} s"
            elif reply.has_error():
                failed[key] = f"{what} failed on the node ({reply.error.reason})"
            else:
                replies[key] = reply
        return replies, failed

    def _base(self) -> RecordDict:
        return RecordDict({"config": encode_config(self.cfg), "fed": encode_fed(self.fed)})

    # ----------------------------------------------------------------- the federation
    def connect(self) -> Roster:
        """Every connected node says which client it is. Membership is fixed here: a node that does not
        answer is out of the run; two nodes claiming one client, or nodes disagreeing on the run's tasks,
        stop it."""
        nodes = self._wait_for_nodes()
        msgs = {n: self._message(n, "train.hello", RecordDict({"config": encode_config(self.cfg)})) for n in nodes}
        replies, failed = self._exchange(msgs, "hello")
        clients, views = {}, set()
        for node_id, reply in sorted(replies.items()):
            try:
                info = reply.content.config_records["hello"]
                cid, n_train = info["client"], info["n_train"]
                tasks, seen, unseen = info["tasks"], info["seen"], info["unseen"]
                data, base = info["data"], info["base"]
                if not (isinstance(cid, str) and cid and isinstance(n_train, int) and n_train >= 1
                        and all(isinstance(x, list) and all(isinstance(t, str) for t in x) for x in (tasks, seen, unseen))
                        and isinstance(data, str) and isinstance(base, str)):
                    raise TaskfedError("malformed hello")
            except (KeyError, TaskfedError) as exc:
                failed[node_id] = f"hello reply unusable ({exc})"
                continue
            if cid in self.node_of:
                raise TaskfedError(f"flower: nodes {self.node_of[cid]} and {node_id} both claim to be client '{cid}'.")
            self.node_of[cid], self.n_train[cid] = node_id, n_train
            clients[cid] = ClientInfo(n_train, list(tasks), data, base)
            views.add((tuple(seen), tuple(unseen)))
        for node_id, why in failed.items():
            LOG.warning("node %s left out of the federation: %s", node_id, why)
        if not clients:
            why = "; ".join(f"node {n}: {w}" for n, w in sorted(failed.items()))
            raise TaskfedError(f"flower: no node answered the hello ({why}).")
        if len(views) > 1:
            raise TaskfedError("flower: the nodes disagree on the run's tasks: give them the same data and config.")
        seen, unseen = views.pop()
        return Roster(dict(sorted(clients.items())), list(seen), list(unseen))

    def _wait_for_nodes(self) -> list[int]:
        n, deadline = self.cfg.scenario.n_clients, time.monotonic() + self.opts.connect_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= n:
                return nodes
            if time.monotonic() > deadline:
                raise TaskfedError(f"flower: {len(nodes)} of scenario.n_clients = {n} nodes connected within "
                                   f"{self.opts.connect_timeout:g} s.")
            time.sleep(0.2)

    def init_adapter(self):
        return self.rt.init_adapter()

    def setup(self, fed: Federation) -> tuple[dict[str, dict[str, np.ndarray]], int, dict[str, str]]:
        """The method's client setup on every node. A node that fails it is out of the run (the driver
        leaves it out)."""
        self.attach(fed)
        msgs = {cid: self._message(self.node_of[cid], "train.setup", self._base()) for cid in fed.clients}
        replies, failed = self._exchange(msgs, "setup")
        uploads, up = {}, 0
        for cid, reply in sorted(replies.items()):
            try:
                if reply.content.config_records["setup_info"]["has_setup"]:
                    uploads[cid] = decode_arrays(reply.content.array_records.get("setup"), f"setup upload of client {cid}")
                    up += sum(v.nbytes for v in uploads[cid].values())
            except (KeyError, TaskfedError) as exc:
                failed[cid] = f"setup reply unusable ({exc})"
        return {c: u for c, u in uploads.items() if c not in failed}, up, failed

    def attach(self, fed: Federation) -> None:
        """The federation's facts every later message carries (the nodes build the client side from them)."""
        self.fed = fed

    def close(self) -> None:
        """The run is over: each node's worker is told to exit (best effort, a few seconds at most)."""
        if not self.node_of:
            return
        msgs = {n: self._message(n, "query.bye", RecordDict()) for n in sorted(self.node_of.values())}
        for _ in self._pull(self._push(msgs), time.monotonic() + 10.0):
            pass

    def client_state(self) -> None:
        """The clients' stores stay on the nodes: each commits its own per step (node.py) under the run's id,
        which the driver's checkpoint keeps, so a resumed server finds them."""
        return None

    def restore_clients(self, state: None, where) -> None:
        """Nothing to send: each node loads the step a message starts from, or refuses when it lacks it."""

    def save_client_files(self, folder: Path, lora: dict, downlink=None) -> ClientFiles:
        """Client-owned adapters and arrays stay on the nodes (each writes its own beside its store after the
        last round, in the run folder's layout): nothing of them reaches the server."""
        return ClientFiles()

    # ----------------------------------------------------------------- a round
    def rejoin(self) -> None:
        """A client whose node is gone (killed, restarted) comes back: under its old node id (a SuperNode
        restarted with its key, once the SuperLink has marked the old one offline) or as a new node that
        claims it, which takes its messages from now on. Either way it reloads its state from its own disk
        (node.py). Only a client whose old node has left the grid is taken over: a live node is never
        displaced. With `rejoin_timeout`, the round waits that long for every gone client to come back."""
        deadline = time.monotonic() + self.opts.rejoin_timeout
        asked: set[int] = set()  # new nodes already asked who they are
        while True:
            live = set(self.grid.get_node_ids())
            new = sorted(live - set(self.node_of.values()) - asked)
            if new:
                asked.update(new)
                self._claim(new, live)
            gone = sorted(c for c, n in self.node_of.items() if n not in live)
            if not gone or time.monotonic() > deadline:
                return
            time.sleep(0.5)

    def _claim(self, nodes: list[int], live: set[int]) -> None:
        msgs = {n: self._message(n, "train.hello", RecordDict({"config": encode_config(self.cfg)})) for n in nodes}
        replies, _ = self._exchange(msgs, "hello", timeout=min(self.opts.round_timeout, 60.0))
        for node_id, reply in sorted(replies.items()):
            try:
                cid = reply.content.config_records["hello"]["client"]
            except KeyError:
                continue
            if isinstance(cid, str) and cid in self.node_of and self.node_of[cid] not in live:
                LOG.warning("client %s rejoined as node %s (was node %s)", cid, node_id, self.node_of[cid])
                self.node_of[cid] = node_id

    def stream(self, round_idx: int, jobs: list[Job]) -> tuple[Iterator[Result], RoundStats]:
        self.rejoin()
        stats = RoundStats(extra={"node_load_seconds": 0.0, "node_train_seconds": 0.0})
        by_client: dict[str, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            by_client[job.client].append(i)
        msgs = {}
        for cid, idx in by_client.items():
            mine = [jobs[i] for i in idx]
            content = encode_jobs(mine, round_idx, self.cfg, self.fed.init_adapter)
            content["fed"] = encode_fed(self.fed)
            msgs[cid] = self._message(self.node_of[cid], "train.round", content, group=str(round_idx))
            stats.bytes_down += downlink_bytes(mine)
        return self._results(round_idx, jobs, by_client, self._push(msgs), stats), stats

    def _results(self, r: int, jobs: list[Job], by_client: dict[str, list[int]], pending: dict[str, str],
                 stats: RoundStats) -> Iterator[Result]:
        """Results in plan order, each as soon as every job before it is answered or its node is out."""
        placed: dict[int, Result | None] = {}
        losses, ready = [], 0
        arrivals = self._pull(pending, time.monotonic() + self.opts.round_timeout)
        while ready < len(jobs):
            while ready in placed:
                result = placed.pop(ready)
                ready += 1
                if result is not None:
                    losses.append(result.loss)
                    yield result
            if ready >= len(jobs):
                break
            cid, reply = next(arrivals)
            got: dict[int, Result] = {}
            try:
                if reply is None:
                    raise TaskfedError(f"no round reply within {self.opts.round_timeout:g} s")
                if reply.has_error():
                    raise TaskfedError(f"round failed on the node ({reply.error.reason})")
                got = self._decode_round(reply, [jobs[i] for i in by_client[cid]], cid, r, stats)
            except TaskfedError as exc:
                stats.dropped[cid] = str(exc)
                LOG.warning("round %d: dropped client %s: %s", r + 1, cid, exc)
            for local_i, i in enumerate(by_client[cid]):
                placed[i] = got.get(local_i)
            progress.advance(len(by_client[cid]))  # that node's jobs are in (or out)
        if losses:
            stats.loss = float(np.mean(losses))

    def _decode_round(self, reply: Message, mine: list[Job], cid: str, r: int, stats: RoundStats) -> dict[int, Result]:
        where = f"round {r + 1} reply of client {cid}"
        content = reply.content
        rows = check_results(content.config_records.get("results"), mine, where, self.n_train[cid])
        s = check_stats(content.config_records.get("stats"), where)
        extras = check_extras(content.config_records["results"], rows, where)
        out = {}
        for i, row in enumerate(rows):
            job = mine[row["job"]]
            weights = (decode_adapter(content.array_records.get(f"r.{i}"), only(self.shapes, job.sends), where)
                       if row["uploaded"] else None)
            extra = {name: decode_extra(content.array_records.get(f"x.{i}.{k}"), self.shapes, f"{where} ('{name}')",
                                        job.extra.get(name)) for k, name in enumerate(extras.get(i, []))}
            out[row["job"]] = Result(job=job, weights=weights, n_rows=row["n_rows"], n_client=row["n_client"],
                                     loss=row["loss"], chosen=None if job.candidates is None else row["chosen"],
                                     extra=extra)
        # Counted only once the whole reply is accepted: a refused reply contributes nothing.
        stats.bytes_up += sum(n_bytes(x.weights) + sum(n_bytes(e) for e in x.extra.values())
                              for x in out.values() if x.weights is not None)
        stats.compute_seconds += s["compute_seconds"]
        stats.tokens += s["tokens"]
        stats.extra["node_load_seconds"] = max(stats.extra["node_load_seconds"], s["load_seconds"])
        stats.extra["node_train_seconds"] = max(stats.extra["node_train_seconds"], s["train_seconds"])
        for line in s["dropped"]:  # uploads the node's own check refused before sending
            key, _, why = line.partition(": ")
            stats.dropped[key] = why
        return out

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, mode: str, asks: dict[str, list[str]],
                 downlink: Callable[[str], Downlink]) -> tuple[dict[str, ClientEval], dict[str, str]]:
        msgs = {}
        for cid in sorted(asks):
            content = encode_eval_request(self.cfg, self.fed, mode, asks[cid], downlink(cid))
            msgs[cid] = self._message(self.node_of[cid], "evaluate.mode", content, group=f"eval-{mode}")
        replies, failed = self._exchange(msgs, f"evaluation ({mode})")
        evals = {}
        for cid, reply in sorted(replies.items()):
            if "skipped" in reply.content.config_records:
                continue  # no test rows for the asked tasks on that node (as in-process)
            try:
                evals[cid] = decode_eval_reply(reply.content, cid, asks[cid], f"{mode} evaluation of client {cid}")
            except TaskfedError as exc:
                failed[cid] = str(exc)
        return evals, failed

