"""The FlowerEngine and the node protocol over a Grid of our own (no Ray, no SuperLink): every message is
answered by `node.handle`, the code a ClientApp runs, in this process. Fast, so it can check what the
simulated and deployed runs cannot cheaply: results stream into `aggregate` before a slow node has replied,
the method's client side never touches the server's object, a node that never answers its evaluation is
dropped at the timeout, and the run equals the in-process run.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from flwr.app import Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from tests.conftest import tiny_config, untimed
from taskfed.federation import Driver
from taskfed.flower import node
from taskfed.flower.engine import FlowerEngine, Options
from taskfed.run import Experiment

TASKS = '["definite_pronoun_resolution","snli","cola"]'


def in_this_process(action, content, node_id, node_config):
    """A ClientApp without a worker: `node.handle` here (the end of a run needs nothing)."""
    return None if action == "bye" else node.handle(action, content, node_config, 7)


class FakeGrid:
    """push_messages / pull_messages over three nodes answered by `handler` (default `node.handle`; None
    from the handler: an empty reply) when pulled. A node in
    `slow` answers its round messages only after `slow_pulls` pulls; one in `silent` never answers the
    message kinds listed for it."""

    def __init__(self, state_dir, slow=None, slow_pulls=3, silent=None, handler=None, nodes=None):
        self.handler = handler or in_this_process
        self.nodes = nodes or {100 + i: {"partition-id": i, "num-partitions": 3, "state-dir": str(state_dir)}
                               for i in range(3)}
        self.slow, self.slow_pulls, self.silent = slow or set(), slow_pulls, silent or {}
        self.pending: dict[str, tuple[Message, int]] = {}
        self.events: list[str] = []
        self.count = 0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.count += 1
            mid = f"m{self.count}"
            msg.metadata.__dict__["_message_id"] = mid
            self.pending[mid] = (msg, 0)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        out = []
        for mid in list(message_ids):
            if mid not in self.pending:
                continue
            msg, pulls = self.pending[mid]
            node_id, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            if kind in self.silent.get(node_id, ()):
                continue
            if node_id in self.slow and kind == "train.round" and pulls < self.slow_pulls:
                self.pending[mid] = (msg, pulls + 1)
                continue
            del self.pending[mid]
            action = {"train.hello": "hello", "train.setup": "setup", "train.round": "round",
                      "evaluate.mode": "evaluate"}.get(kind)
            if action is None:  # query.bye
                action = "bye"
            try:
                content = self.handler(action, msg.content, node_id, self.nodes[node_id])
                if content is None:
                    content = RecordDict()
                reply = Message(content, reply_to=msg)
            except Exception as exc:  # as Flower turns a ClientApp's exception into an error reply
                reply = Message(Error(code=0, reason=str(exc)), reply_to=msg)
            self.events.append(f"reply {node_id - 100} {kind}")
            out.append(reply)
        return out


@pytest.fixture
def identity(monkeypatch):
    """A ServerApp's identity (Flower's messages need a run id), as flwr sets it in a ServerApp process."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def forbid_client_side(method):
    """The server's method object must never run client-side hooks: each raises if called."""
    def boom(*args, **kwargs):
        raise AssertionError("a client-side hook ran on the server's method object")
    for hook in ("setup_client", "eval_adapters", "route", "eval_facts", "client_adapters"):
        setattr(method, hook, boom)


@pytest.mark.parametrize("method", ["fedrouter", "feddpa-t"])
def test_flower_engine_equals_in_process_and_the_server_object_runs_no_client_hook(identity, tmp_path, method):
    more = ["method.n_global=2"] if method == "fedrouter" else []
    cfg = tiny_config(f"method.name={method}", "scenario.n_clients=3", f"data.tasks={TASKS}", *more)
    ex = Experiment(cfg)
    forbid_client_side(ex.method)
    assert ex.engine.client_side is None  # built from the federation's facts at setup, never the server's
    want = ex.run(tmp_path / "inprocess")
    assert ex.engine.client_side is not ex.method
    driver = Driver(cfg, FlowerEngine(FakeGrid(tmp_path / "state"), cfg, Options(round_timeout=60)))
    forbid_client_side(driver.method)
    got = driver.run(tmp_path / "flower")
    a = json.loads((tmp_path / "flower" / "metrics.json").read_text())
    b = json.loads((tmp_path / "inprocess" / "metrics.json").read_text())
    assert untimed(a) == untimed(b) and untimed(got) == untimed(json.loads(json.dumps(want)))
    for name, w in ex.method.server_adapters().items():
        assert all(torch.equal(w[k], driver.method.server_adapters()[name][k]) for k in w)


def test_uploads_stream_into_aggregate_before_the_slowest_node_replies(identity, tmp_path):
    cfg = tiny_config("method.name=fedavg", "scenario.n_clients=3", f"data.tasks={TASKS}", "train.rounds=1",
                      "eval.max_rows_per_task=1")
    grid = FakeGrid(tmp_path / "state", slow={102}, slow_pulls=4)
    driver = Driver(cfg, FlowerEngine(grid, cfg, Options(round_timeout=60)))
    aggregate = driver.method.aggregate

    def watched(r, results):
        def seen():
            for x in results:
                grid.events.append(f"aggregate {x.job.client}")
                yield x
        aggregate(r, seen())

    driver.method.aggregate = watched
    driver.train()
    rounds = [e for e in grid.events if "round" in e or "aggregate" in e]
    assert rounds.index("aggregate 0") < rounds.index("reply 2 train.round"), rounds
    assert rounds.index("aggregate 1") < rounds.index("reply 2 train.round"), rounds
    assert rounds[-1] == "aggregate 2"  # the slow node's upload still counts, last, in plan order


def test_a_node_silent_in_evaluation_is_dropped_at_the_timeout(identity, tmp_path):
    cfg = tiny_config("method.name=fedavg", "scenario.n_clients=3", f"data.tasks={TASKS}", "train.rounds=1")
    grid = FakeGrid(tmp_path / "state", silent={101: {"evaluate.mode"}})
    driver = Driver(cfg, FlowerEngine(grid, cfg, Options(round_timeout=1.5)))
    driver.train()
    tic = time.monotonic()
    ev = driver.evaluate()
    assert time.monotonic() - tic < 30  # two modes, each closed by the 1.5 s timeout, not hung
    for mode in ("local", "global"):
        assert ev[mode]["dropped"] == {"1": "no evaluation (" + mode + ") reply within 1.5 s"}
        assert sorted(ev[mode]["per_client"]) == ["0", "2"] and ev[mode]["score"] is not None


def tampering(change):
    """A handler that runs `node.handle` and lets `change(action, node_id, reply)` alter the reply."""
    def handler(action, content, node_id, node_config):
        reply = in_this_process(action, content, node_id, node_config)
        if reply is not None:
            change(action, node_id, reply)
        return reply
    return handler


def test_a_node_whose_setup_upload_is_unusable_is_left_out_and_the_rest_run(identity, tmp_path):
    import numpy as np
    from flwr.app import Array

    def change(action, node_id, reply):
        if action == "setup" and node_id == 101:  # centroids of another width than the others'
            reply.array_records["setup"]["centroids"] = Array(np.zeros((2, 3), dtype=np.float32))

    cfg = tiny_config("method.name=fedrouter", "method.n_global=2", "scenario.n_clients=3", f"data.tasks={TASKS}",
                      "train.rounds=1", "eval.modes=['global']")
    driver = Driver(cfg, FlowerEngine(FakeGrid(tmp_path / "state", handler=tampering(change)), cfg, Options(round_timeout=60)))
    metrics = driver.run()
    assert list(metrics["left_out"]) == ["1"] and "width 3" in metrics["left_out"]["1"]
    assert sorted(metrics["clients"]) == ["0", "2"] and sorted(metrics["eval"]["global"]["per_client"]) == ["0", "2"]
    assert sorted(metrics["eval"]["global"]["binding"]) == ["0", "2"]


def test_malformed_stats_and_claimed_sizes_drop_only_that_node(identity, tmp_path):
    def change(action, node_id, reply):
        if action != "round":
            return
        if node_id == 101:  # claims a data size far above what it declared at hello
            reply.config_records["results"]["n_client"] = [2 ** 62]
        if node_id == 102:  # a string where seconds are expected
            reply.config_records["stats"]["compute_seconds"] = "soon"

    cfg = tiny_config("method.name=fedavg", "scenario.n_clients=3", f"data.tasks={TASKS}", "train.rounds=1",
                      "eval.modes=['global']")
    driver = Driver(cfg, FlowerEngine(FakeGrid(tmp_path / "state", handler=tampering(change)), cfg, Options(round_timeout=60)))
    rounds, _ = driver.train()
    assert sorted(rounds[0]["dropped"]) == ["1", "2"]
    assert "declared" in rounds[0]["dropped"]["1"] and "compute_seconds" in rounds[0]["dropped"]["2"]
    ex = Experiment(cfg)  # the reference: client 0's upload alone is the global adapter
    ex.method.aggregate = (lambda agg: lambda r, res: agg(r, [x for x in res if x.job.client == "0"]))(ex.method.aggregate)
    ex.train()
    want, got = ex.method.server_adapters()["global"], driver.method.server_adapters()["global"]
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_nodes_with_their_own_files_train_and_evaluate_on_their_own_test_rows(identity, tmp_path):
    from tests.conftest import write_two_task_data

    train, test = write_two_task_data(tmp_path / "data", n_train=12, n_test=3)
    rows = json.loads(train.read_text())
    (tmp_path / "a.json").write_text(json.dumps(rows[::2]))  # each node holds half of the rows
    (tmp_path / "b.json").write_text(json.dumps(rows[1::2]))
    state = str(tmp_path / "state")
    nodes = {100: {"train-json": str(tmp_path / "a.json"), "client-id": "site-a", "test-json": str(test), "state-dir": state},
             101: {"train-json": str(tmp_path / "b.json"), "client-id": "site-b", "state-dir": state}}  # no test file
    cfg = tiny_config("method.name=fedavg", "data.source=json", f"data.train_path={train}", f"data.test_path={test}",
                      'data.tasks=["upper","count"]', "scenario.n_clients=2", "train.rounds=1")
    metrics = Driver(cfg, FlowerEngine(FakeGrid(tmp_path, nodes=nodes), cfg, Options(round_timeout=60))).run()
    assert sorted(metrics["clients"]) == ["site-a", "site-b"] and metrics["rounds"][0]["bytes_up"] > 0
    # site-a holds only `upper` rows (the data alternates tasks): its own task locally, both globally;
    # site-b has no test file: it trains but is not evaluated.
    for mode, want in (("local", {"upper": 3}), ("global", {"upper": 3, "count": 3})):
        assert sorted(metrics["eval"][mode]["per_client"]) == ["site-a"]
        assert {t: v["n"] for t, v in metrics["eval"][mode]["per_client"]["site-a"]["per_task"].items()} == want
