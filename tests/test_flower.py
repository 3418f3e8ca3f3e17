"""The Flower layer: payload checks, the node's store, and runs on Flower's Simulation Engine that must give
the in-process engine's adapters bit for bit (FedAvg, FedRouter), and a round where nodes send NaN or
mis-shaped weights: they are dropped with a reason and the others aggregate.

The three simulated runs share one Simulation Engine start (Ray takes most of a run's time here): one
ServerApp runs them one after the other over the same three SuperNodes, each a complete `serve`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from tests.conftest import tiny_config, untimed
from taskfed.errors import TaskfedError
from taskfed.evaluation.rows import read_scores
from taskfed.flower import node
from taskfed.flower.codec import (check_results, decode_adapter, decode_config, decode_jobs, encode_adapter,
                                  encode_arrays, encode_config, encode_jobs)
from taskfed.flower.server import Options, serve
from taskfed.flower.store import load_store, save_store
from taskfed.methods.base import Job, LocalRef, label_rows, task_rows
from taskfed.routing import read_router
from taskfed.model.peft_io import load_adapter
from taskfed.run import Experiment

TASKS = '["definite_pronoun_resolution","snli","cola"]'
SHAPES = {"m.lora_A": (2, 3), "m.lora_B": (3, 2)}
NAN_SEED = 5  # the run in which the wrapped client app corrupts uploads


def adapter(value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full(s, float(value)) for k, s in SHAPES.items()}


def config(method: str, *extra: str):
    more = ["method.n_global=2"] if method == "fedrouter" else []
    return tiny_config(f"method.name={method}", "scenario.n_clients=3", f"data.tasks={TASKS}", *more, *extra)


# ----------------------------------------------------------------------------- payloads
def test_adapter_round_trip_and_refusals():
    w = adapter(0.5)
    back = decode_adapter(encode_adapter(w), SHAPES, "test")
    assert all(torch.equal(back[k], w[k]) for k in w)
    bf16 = {k: v.to(torch.bfloat16) for k, v in w.items()}  # cast up to float32 for the wire
    assert decode_adapter(encode_adapter(bf16), SHAPES, "test")["m.lora_A"].dtype == torch.float32
    bad = dict(w, **{"m.lora_A": torch.full((2, 3), float("nan"))})
    with pytest.raises(TaskfedError, match="NaN"):
        decode_adapter(encode_adapter(bad), SHAPES, "upload of client 1")
    with pytest.raises(TaskfedError, match="shape"):
        decode_adapter(encode_adapter(dict(w, **{"m.lora_B": torch.zeros(2, 3)})), SHAPES, "x")
    with pytest.raises(TaskfedError, match="lacks"):
        decode_adapter(encode_adapter({"m.lora_A": w["m.lora_A"]}), SHAPES, "x")
    f64 = ArrayRecord({k: Array(v.double().numpy()) for k, v in w.items()})
    with pytest.raises(TaskfedError, match="float64, expected float32"):
        decode_adapter(f64, SHAPES, "x")
    with pytest.raises(TaskfedError, match="array record"):
        decode_adapter(None, SHAPES, "x")
    # A header that says float32 over bytes that hold float64: refused on what the array holds.
    import io
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 3), dtype=np.float64), allow_pickle=False)
    forged = ArrayRecord({"m.lora_A": Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=buf.getvalue()),
                          "m.lora_B": Array(np.zeros((3, 2), dtype=np.float32))})
    with pytest.raises(TaskfedError, match="holds float64 data"):
        decode_adapter(forged, SHAPES, "x")
    with pytest.raises(TaskfedError, match="unexpected tensor"):
        decode_adapter(encode_adapter(dict(w, extra=torch.zeros(1))), SHAPES, "x")


def test_config_and_jobs_round_trip():
    cfg = config("fedrouter", "train.steps=3")
    assert decode_config(encode_config(cfg)) == cfg
    a, b = adapter(1.0), adapter(2.0)
    jobs = [Job(client="1", adapter="global", init=a, rows=task_rows("snli"), prox_mu=0.1),
            Job(client="1", adapter="local", init=LocalRef("feddpa_local", a), scale=0.5, frozen=[(b, 0.5)],
                keep_as="feddpa_local", upload=False, steps=4, lr=1e-3),
            Job(client="1", adapter="cluster/1/local/0", init=a, rows=label_rows("labels", 1), candidates=[a, b])]
    content = encode_jobs(jobs, 3, cfg)
    assert len(content.array_records) == 2  # each distinct adapter once
    r, back = decode_jobs(content, SHAPES)
    assert r == 3
    for got, want in zip(back, jobs):
        for name in ("client", "adapter", "rows", "steps", "batch", "lr", "prox_mu", "scale", "keep_as", "upload"):
            assert getattr(got, name) == getattr(want, name), name
    assert isinstance(back[1].init, LocalRef) and back[1].init.name == "feddpa_local"
    assert torch.equal(back[1].frozen[0][0]["m.lora_A"], b["m.lora_A"]) and back[1].frozen[0][1] == 0.5
    assert [torch.equal(c["m.lora_B"], w["m.lora_B"]) for c, w in zip(back[2].candidates, [a, b])] == [True, True]


def test_malformed_jobs_are_refused_on_the_node():
    cfg = config("fedavg")
    content = encode_jobs([Job(client="1", adapter="global", init=adapter(1.0), steps=2)], 0, cfg)
    for key, value, message in [("steps", "many", "'steps'"), ("steps", 0, "'steps'"), ("lr", float("inf"), "'lr'"),
                                ("rows", ["sideways"], "row selector"), ("client", 3, "'client'")]:
        bad = encode_jobs([Job(client="1", adapter="global", init=adapter(1.0), steps=2)], 0, cfg)
        bad.config_records["job.0"][key] = value
        with pytest.raises(TaskfedError, match=message):
            decode_jobs(bad, SHAPES)
    del content.config_records["job.0"]["init"]
    with pytest.raises(TaskfedError, match="malformed job"):
        decode_jobs(content, SHAPES)
    content.config_records["round"]["n_jobs"] = -1
    with pytest.raises(TaskfedError, match="counts"):
        decode_jobs(content, SHAPES)


def test_results_checks():
    jobs = [Job(client="1", adapter="global", init=adapter(0))]
    good = {"job": [0], "n_rows": [5], "n_client": [9], "loss": [1.5], "chosen": [-1], "uploaded": [True]}
    assert check_results(ConfigRecord(good), jobs, "x")[0]["n_rows"] == 5
    for change, message in [({"job": [3]}, "unknown or repeated"), ({"n_rows": [0]}, "rows"),
                            ({"uploaded": [False]}, "against its plan"), ({"loss": ["1"]}, "not a list of float"),
                            ({"n_client": [9, 9]}, "entries")]:
        with pytest.raises(TaskfedError, match=message):
            check_results(ConfigRecord({**good, **change}), jobs, "x")


def test_store_on_disk(tmp_path):
    store = {"feddpa_local": adapter(0.25), "labels": np.array([0, 1, 1]), "centroids": np.eye(2),
             "fltac_tasks": ["snli", "cola"]}
    save_store(store, tmp_path / "s")
    save_store(store, tmp_path / "s")  # replaces the previous one whole
    back = load_store(tmp_path / "s")
    assert torch.equal(back["feddpa_local"]["m.lora_A"], store["feddpa_local"]["m.lora_A"])
    assert np.array_equal(back["labels"], store["labels"]) and back["centroids"].dtype == np.float64
    assert back["fltac_tasks"] == ["snli", "cola"]
    assert load_store(tmp_path / "none") == {}
    with pytest.raises(TaskfedError, match="cannot be kept on disk"):
        save_store({"x": object()}, tmp_path / "t")


# ----------------------------------------------------------------------------- Simulation Engine
# The new baselines each exercise one mechanism over the wire: a server step (fedadam, fedavgm), a second
# payload each way (scaffold), a partial upload with a client-owned part (fedsa-lora), a frozen factor
# (ffa-lora).
PARITY = ["fedavg", "fedrouter", "feddpa-f", "fltac", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold",
          "fedsa-lora", "ffa-lora"]


def corrupting_client_app() -> ClientApp:
    """taskfed's ClientApp, except in the NAN_SEED run: client 1 uploads NaN every round, client 2 a
    transposed tensor in round 1 (index 1), and in evaluation client 2 claims a task it was not asked
    about (local mode) and a NaN score (global mode)."""
    app = ClientApp()

    def handler(kind):
        def run(msg: Message, context: Context) -> Message:
            reply = node.handle(kind, msg.content, dict(context.node_config), context.run_id)
            cfg = decode_config(msg.content.config_records["config"])
            pid = context.node_config["partition-id"]
            if cfg.seed == NAN_SEED and kind == "round":
                r = int(msg.content.config_records["round"]["round"])
                for name, record in reply.array_records.items():
                    key = sorted(record)[0]
                    value = record[key].numpy()
                    if pid == 1:
                        record[key] = Array(np.full_like(value, np.nan))
                    elif pid == 2 and r == 1:
                        record[key] = Array(np.ascontiguousarray(value.T))
            if cfg.seed == NAN_SEED and kind == "evaluate" and pid == 2:
                ev = reply.config_records["eval"]
                if msg.content.config_records["ask"]["mode"] == "local":
                    ev["tasks"] = ["a task nobody asked about"] + list(ev["tasks"][1:])
                else:
                    ev["score"] = float("nan")
            return Message(reply, reply_to=msg)
        return run

    for kind in ("hello", "setup", "round"):
        app.train(kind)(handler(kind))
    app.evaluate("mode")(handler("evaluate"))
    return app


def in_process(cfg, drop=lambda r, client: False, out=None):
    """The in-process run (training and evaluation): its metrics and the experiment; `drop` leaves uploads
    out of aggregation (the reference for the bad-node run: what the others alone aggregate to)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the simulation's workers run one thread each: same float sums
    try:
        ex = Experiment(cfg)
        aggregate = ex.method.aggregate
        ex.method.aggregate = lambda r, results: aggregate(r, [x for x in results if not drop(r, x.job.client)])
        metrics = ex.run(out)
        return metrics, ex
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    root = tmp_path_factory.mktemp("flower-sim")
    runs = {m: config(m) for m in PARITY} | {"bad": config("fedavg", f"seed={NAN_SEED}")}
    return root, runs, simulate(root, runs)


def simulate(root, runs: dict) -> dict:
    """Each config of `runs` on Flower's Simulation Engine (3 supernodes, taskfed's own client app with the
    corrupting hooks above), written under root/<name>; returns each run's metrics."""
    from flwr.simulation import run_simulation

    metrics = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        for name, cfg in runs.items():
            metrics[name] = serve(grid, cfg, Options(out_dir=root / name, round_timeout=300))

    mp = pytest.MonkeyPatch()
    mp.setenv("TASKFED_CACHE", str(root / "cache"))  # the nodes' stores (Ray workers inherit the env)
    mp.setenv("OMP_NUM_THREADS", "1")  # one thread per worker, as `in_process` below
    try:
        run_simulation(server_app=app, client_app=corrupting_client_app(), num_supernodes=3,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": 1, "include_dashboard": False}})
    finally:
        mp.undo()
    assert set(metrics) == set(runs), "the ServerApp did not finish every run (see the log)"
    return metrics


def saved(folder, name):
    return load_adapter(folder / "adapters" / "server" / name.replace("/", "_"))


@pytest.mark.parametrize("method", PARITY)
def test_simulation_equals_in_process(simulated, method, tmp_path):
    root, runs, metrics = simulated
    want, ex = in_process(runs[method], out=tmp_path / "in-process")
    # The whole metrics.json but timings: rounds, every eval mode, per-task scores, router accuracy, ...
    on_disk = json.loads((root / method / "metrics.json").read_text())
    assert untimed(on_disk) == untimed(json.loads(json.dumps(want))), f"{method}: metrics differ from in-process"
    assert set(on_disk["eval"]) == {"local", "global"} and on_disk["engine"] == "flower"
    assert all(on_disk["eval"][m]["score"] is not None for m in on_disk["eval"])
    for name, weights in ex.method.server_adapters().items():
        got = saved(root / method, name)
        assert all(torch.equal(got[k], weights[k]) for k in weights), f"{method} {name} differs from in-process"
    files = ["adapters", "config.toml", "manifest.json", "metrics.json", "report.md", "router.json", "router.safetensors", "scores.csv"]
    if not ex.method.server_adapters():  # FedSA-LoRA: every adapter is client-owned, and stays on its node
        files.remove("adapters")
    assert sorted(p.name for p in (root / method).iterdir()) == files
    # The router as served (routing.py) is the in-process run's: the same state, the same server adapters
    # (client-owned adapters stay on the nodes; the run id is random per run).
    doc_f, state_f = read_router(root / method)
    doc_i, state_i = read_router(tmp_path / "in-process")
    server = lambda doc: {k: v for k, v in doc["adapters"].items() if "@" not in k}  # noqa: E731
    assert {k: v for k, v in doc_f.items() if k not in ("run", "adapters")} == {k: v for k, v in doc_i.items() if k not in ("run", "adapters")}
    assert server(doc_f) == server(doc_i) == doc_f["adapters"] and state_f.kind == state_i.kind
    assert (state_f.centroids is None and state_i.centroids is None) or np.array_equal(state_f.centroids, state_i.centroids)
    # Every row's scores and mix, as the nodes computed them: what the in-process run computed.
    assert read_scores(root / method / "scores.csv") == read_scores(tmp_path / "in-process" / "scores.csv")
    assert all("dropped" not in r for r in metrics[method]["rounds"])
    assert all(r["node_load_seconds"] < 1.0 for r in metrics[method]["rounds"])  # runtime cached per worker
    stores = (root / "cache" / "flower" / "state").glob(f"run-*/*/step-{len(metrics[method]['rounds'])}/store.json")
    if method == "fedrouter":  # FedRouter's client state stayed on the nodes' disks
        held = sorted(p.parent.parent.name for p in stores if "fedrouter_labels" in p.read_text())
        assert held == ["0", "1", "2"]
    if method in ("feddpa-f", "fedsa-lora"):  # the client-owned adapters too: on the nodes, the in-process clients'
        name = {"feddpa-f": "local", "fedsa-lora": "personal"}[method]
        for cid, client in ex.engine.clients.items():
            want_local = load_adapter(tmp_path / "in-process" / "adapters" / "clients" / cid / name)
            found = list((root / "cache" / "flower" / "state").glob(f"run-*/adapters/clients/{cid}/{name}"))
            got = [load_adapter(f) for f in found]
            assert any(all(torch.equal(g[k], want_local[k]) for k in want_local) for g in got), cid


def test_bad_nodes_are_dropped_and_the_others_aggregate(simulated):
    root, runs, metrics = simulated
    rounds = metrics["bad"]["rounds"]
    assert set(rounds[0]["dropped"]) == {"1"} and "NaN" in rounds[0]["dropped"]["1"]
    assert set(rounds[1]["dropped"]) == {"1", "2"} and "shape" in rounds[1]["dropped"]["2"]
    want = in_process(runs["bad"], drop=lambda r, c: c == "1" or (c == "2" and r == 1))[1].method.server_adapters()
    got = saved(root / "bad", "global")
    assert all(torch.equal(got[k], want["global"][k]) for k in got)
    clean = in_process(runs["bad"])[1].method.server_adapters()  # with every upload the result differs
    assert not all(torch.equal(got[k], clean["global"][k]) for k in got)
    # Evaluation: the node with a made-up task and the one with a NaN score are dropped with their reason;
    # the others are scored.
    ev = metrics["bad"]["eval"]
    assert set(ev["local"]["dropped"]) == {"2"} and "not asked" in ev["local"]["dropped"]["2"]
    assert set(ev["global"]["dropped"]) == {"2"} and "score" in ev["global"]["dropped"]["2"]
    assert sorted(ev["local"]["per_client"]) == ["0", "1"] == sorted(ev["global"]["per_client"])


def test_flower_simulate_cli_writes_the_run_folder_taskfed_run_writes(tmp_path, flan_path):
    """`taskfed flower simulate ... --smoke`: the README's command, a complete run folder with evaluation, and
    with `[log]` on the ServerApp's driver tracks every figure as `taskfed run` does (tests/test_tracking.py)."""
    from tests.test_tracking import assert_logged
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "run"
    done = subprocess.run([str(Path(sys.executable).parent / "taskfed"), "flower", "simulate", "configs/fedavg.toml",
                           "--out", str(out), "--smoke", "--workers", "1", "--set", "scenario.n_clients=2",
                           "--set", f"data.path={flan_path}", "--set", 'data.tasks=["snli","cola"]',
                           "--set", "log.tensorboard=true", "--set", "log.mlflow=true"],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
                          env={**__import__("os").environ, "TASKFED_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["adapters", "config.toml", "manifest.json", "metrics.json", "mlflow.db",
                                                     "report.md", "router.json", "router.safetensors", "scores.csv",
                                                     "tensorboard"]
    assert assert_logged(out)["engine"] == "flower"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["engine"] == "flower" and set(metrics["eval"]) == {"local", "global"}
    assert "local " in done.stdout and "run folder" in done.stdout
    assert "DEBUG:flwr" not in done.stdout + done.stderr  # flwr's DEBUG lines are not printed twice through the root logger


def test_a_nodes_per_row_scores_are_checked_against_its_per_task_figures():
    """The per-row scores (scores.csv) travel with a node's evaluation: the server takes the per-task means
    from them, and refuses a reply whose rows and per-task figures disagree, or whose rows are out of range."""
    from taskfed.evaluation.evaluate import ClientEval, per_task_means
    from taskfed.flower.codec import decode_eval_reply, encode_eval_reply
    from taskfed.methods.base import Routed
    from taskfed.model.bank import RowMix

    tasks = ["qa", "nli", "qa"]
    rows = {"rouge1": np.array([0.5, 1.0, 0.25]), "rougeL": np.array([0.5, 1.0, 0.0]), "exact_match": np.zeros(3)}
    mix = RowMix(torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1))
    ev = ClientEval(float(rows["rouge1"].mean()), per_task_means(tasks, rows), 5, 0.1,
                    Routed("1", tasks, ["global"], mix), rows)
    back = decode_eval_reply(encode_eval_reply(ev), "1", ["qa", "nli"], "test")
    assert back.per_task == ev.per_task and all(np.array_equal(back.rows[m], rows[m]) for m in rows)
    assert back.per_task["qa"]["rouge1"] == 0.375 and back.score == ev.score
    lying = encode_eval_reply(ev)
    lying["rows"] = encode_arrays({**rows, "rougeL": np.array([0.5, 1.0, 1.0])})  # rows say qa's ROUGE-L is 0.75
    with pytest.raises(TaskfedError, match="per-task scores disagree with its per-row scores"):
        decode_eval_reply(lying, "1", ["qa", "nli"], "test")
    short = encode_eval_reply(ev)
    short["rows"] = encode_arrays({m: v[:2] for m, v in rows.items()})
    with pytest.raises(TaskfedError, match="per-row scores are missing, of the wrong length"):
        decode_eval_reply(short, "1", ["qa", "nli"], "test")


def test_simulated_clients_get_the_cpus_and_gpus_asked_for(monkeypatch, tmp_path):
    """`--client-cpus` / `--client-gpus` reach Ray's backend config (what each virtual node's actor holds);
    with model.device cuda the GPUs are shared evenly by default; impossible shares are one line, before Ray."""
    import flwr.simulation
    from typer.testing import CliRunner

    from taskfed.cli import app
    from taskfed.flower.simulation import backend_config
    from tests.conftest import ROOT

    cpu, cuda = tiny_config("scenario.n_clients=8"), tiny_config("scenario.n_clients=8", "model.device=cuda")
    assert backend_config(cpu, workers=2, n_gpus=0)["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert backend_config(cuda, workers=8, n_gpus=2)["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}
    two = backend_config(cuda, workers=2, client_cpus=4, client_gpus=0.5, n_gpus=1)
    assert two["client_resources"] == {"num_cpus": 4, "num_gpus": 0.5} and two["init_args"]["num_cpus"] == 8
    for cfg, kw, message in [(cuda, {"client_gpus": 2.0}, "between 0 and this machine's 1 GPU"),
                             (cpu, {"client_gpus": 0.5}, 'set model.device = "cuda"'),
                             (cuda, {"client_gpus": 0.0}, "the simulated clients get no GPU"),
                             (cpu, {"client_cpus": 0.0}, "positive number of CPUs")]:
        with pytest.raises(TaskfedError, match=message):
            backend_config(cfg, workers=2, n_gpus=1, **kw)
    seen = {}

    def fake(**kw):
        seen.update(kw["backend_config"])

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake)
    result = CliRunner().invoke(app, ["flower", "simulate", str(ROOT / "configs" / "fedavg.toml"), "--out",
                                      str(tmp_path / "o"), "--smoke", "--client-cpus", "2", "--workers", "3"])
    assert "ServerApp ended without finishing" in result.output  # the fake ran nothing
    assert seen["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.0} and seen["init_args"]["num_cpus"] == 6
