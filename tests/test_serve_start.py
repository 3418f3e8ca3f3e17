"""`taskfed serve` at start: a corrupt run folder (router.json's keys, a file changed after the run wrote it,
its manifest) and a start-up problem (busy port, unresolvable host, TLS files) are one `error:` line and
exit 2, found before the model loads wherever they can be; mix weights are bounded (issue 30, serving 2-4).

One tiny FedRouter and one FedDPA-F run folder are trained once; each test corrupts a copy."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import taskfed.runtime
import taskfed.serve.api as api
from taskfed.cli import app
from taskfed.errors import TaskfedError
from taskfed.run import run_experiment
from taskfed.runfolder import write_manifest
from taskfed.serve.run import BadRequest, ServedRun
from tests.conftest import tiny_config

runner = CliRunner()
SMALL = ["train.rounds=1", "eval.max_rows_per_task=1", "eval.max_new_tokens=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_runtime_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve-start")
    cfgs = {"fedrouter": tiny_config("method.name=fedrouter", "scenario.name=dual", *SMALL),
            "feddpa": tiny_config("method.name=feddpa-f", "method.weighting=fixed", *SMALL),
            "fedalt": tiny_config("method.name=fedalt", *SMALL)}
    for name, cfg in cfgs.items():
        run_experiment(cfg, tmp / name, rt=tiny_runtime_factory(cfg))
    return tmp


@pytest.fixture
def copy(runs, tmp_path):
    made: list[Path] = []

    def make(name: str = "fedrouter") -> Path:
        made.append(Path(shutil.copytree(runs / name, tmp_path / f"{name}-{len(made)}")))
        return made[-1]

    return make


@pytest.fixture
def no_model(monkeypatch):
    """The base model must not load: constructing a Runtime fails the test (exit 1, not the expected 2)."""
    def fail(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(taskfed.runtime, "Runtime", fail)


@pytest.fixture
def never_serves(monkeypatch):
    """A check that should have stopped the start fails the test instead of serving forever."""
    def fail(self, *a, **k):
        raise AssertionError("the server started")

    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", fail)


def serve_cli(folder: Path, *args) -> str:
    """`taskfed serve FOLDER ARGS`: exit 2 with exactly one `error:` line and no traceback; returns that line."""
    result = runner.invoke(app, ["serve", str(folder), "--port", "0", *map(str, args)], catch_exceptions=False)
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def edit_router(folder: Path, key: str, value, drop: bool = False) -> None:
    """Sets (or drops) router.json's dotted `key`, and stamps the manifest again: the file is as a buggy or
    hand-editing writer left it, not damaged at rest (the manifest check has its own tests)."""
    path = folder / "router.json"
    doc = json.loads(path.read_text())
    *parents, last = key.split(".")
    inner = doc
    for part in parents:
        inner = inner[part]
    if drop:
        inner.pop(last)
    else:
        inner[last] = value
    path.write_text(json.dumps(doc))
    write_manifest(folder)


# ----------------------------------------------------------------- the manifest
def test_the_run_folder_lists_every_file_with_its_sha256(runs):
    import hashlib

    folder = runs / "fedrouter"
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(listed) == [f for f in files if f != "manifest.json"]
    assert {"config.toml", "metrics.json", "report.md", "router.json", "router.safetensors", "scores.csv",
            "adapters/server/cluster_1/adapter_model.safetensors"} <= set(listed)
    assert all(listed[f] == hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in listed)
    ServedRun(folder)  # verifies


def test_a_flipped_bit_or_a_missing_file_stops_serve(copy, no_model):
    folder = copy()
    tensor = folder / "adapters" / "server" / "cluster_1" / "adapter_model.safetensors"
    data = bytearray(tensor.read_bytes())
    data[-1] ^= 1  # in the tensor data: the file still parses, the adapter is just different
    tensor.write_bytes(bytes(data))
    line = serve_cli(folder)
    assert "cluster_1/adapter_model.safetensors" in line and "checksum" in line
    folder = copy("feddpa")
    (folder / "report.md").unlink()
    with pytest.raises(TaskfedError, match=r"report\.md: listed in manifest\.json but missing"):
        ServedRun(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(TaskfedError, match=r"manifest\.json: unreadable"):
        ServedRun(folder)


def test_a_run_folder_without_a_manifest_serves_with_one_warning(copy):
    folder = copy()
    (folder / "manifest.json").unlink()
    said: list[str] = []
    run = ServedRun(folder, log=said.append)
    assert run.router.kind == "nearest"
    assert len(said) == 1 and said[0].startswith("warning:") and "manifest.json" in said[0]


# ----------------------------------------------------------------- router.json, key by key
BAD_KEYS = [  # (key, value, what the message names)
    ("router.embed_layers", "abc", "router.embed_layers"),
    ("router.embed_layers", -3, "router.embed_layers"),
    ("router.embed_layers", 0, "router.embed_layers"),
    ("router.embed_layers", True, "router.embed_layers"),
    ("router.clip", "x", "router.clip"),
    ("router.clip", -1.0, "router.clip"),
    ("template", "nope", "template"),
    ("clients", [1, 2], "clients.0"),
    ("router.clients", [1, 2], "router.clients"),
    ("router.clients", {"0": [0, "1"]}, "router.clients.0.1"),
    ("router.params", 3, "router.params"),
    ("router.adapters", [], "router.adapters"),
    ("rounds", "2", "rounds"),
    ("run", 7, "run"),
    ("lora", {"r": 8}, "lora.alpha"),
    ("adapters", {"cluster/0": 3}, "adapters.cluster/0"),
    ("client_arrays", {"references": ["a"]}, "client_arrays.references"),
]


@pytest.mark.parametrize("key,value,named", BAD_KEYS, ids=[f"{k}={v!r}" for k, v, _ in BAD_KEYS])
def test_a_bad_router_json_key_is_one_error_naming_file_and_key(copy, key, value, named):
    folder = copy()
    edit_router(folder, key, value)
    with pytest.raises(TaskfedError) as err:
        ServedRun(folder)
    message = str(err.value)
    assert message.startswith(str(folder / "router.json")) and f"'{named}'" in message, message
    assert "\n" not in message


@pytest.mark.parametrize("key,value,named", [
    ("router.params.k", 0, "router.params.k"),
    ("router.params.weighting", "sometimes", "router.params.weighting"),
    ("router.params.w_fixed", 1.5, "router.params.w_fixed"),
    ("router.params.seed", "0", "router.params.seed"),
    ("router.params.w_max", None, "router.params.w_max"),
    ("router.params.extra", 1, "router.params.extra"),
])
def test_feddpa_mix_parameters_are_checked_with_the_methods_bounds(copy, key, value, named):
    folder = copy("feddpa")
    edit_router(folder, key, value, drop=value is None)
    with pytest.raises(TaskfedError, match=f"router.json.*'{named}'"):
        ServedRun(folder)


def test_a_feddpa_router_must_mix_its_global_adapter(copy):
    folder = copy("feddpa")
    edit_router(folder, "router.adapters", [])  # the fixed weighting's mix would then name no slot: a 500 per request
    with pytest.raises(TaskfedError, match=r"router\.json: key 'router\.adapters' must be \['global'\]"):
        ServedRun(folder)


@pytest.mark.parametrize("key,value,named", [
    ("router.params.top_k", 3, "router.params.top_k"),
    ("router.params.top_k", 0, "router.params.top_k"),
    ("router.params.gate", "", "router.params.gate"),
    ("router.params.gate", "nope", "client_arrays.nope.0"),
    ("router.params.models.0.logits", [0, 2], "router.params.models.0.logits"),
    ("router.params.models.0.logits", [0, 1, 1], "router.params.models"),
    ("router.params.models.0.adapters", ["rest@0", "local@9"], "router.params.models.0.adapters"),
    ("router.params.models", {}, "router.params.models"),
    ("router.params.extra", 1, "router.params.extra"),
])
def test_a_gate_router_is_checked_key_by_key(copy, key, value, named):
    folder = copy("fedalt")
    edit_router(folder, key, value)
    with pytest.raises(TaskfedError, match=f"router.json.*'{named}'"):
        ServedRun(folder)


def test_a_gate_file_of_the_wrong_shape_or_not_finite_is_refused(copy):
    folder = copy("fedalt")
    path = folder / json.loads((folder / "router.json").read_text())["client_arrays"]["mixer"]["0"]
    gate = load_file(str(path))
    key = sorted(gate)[0]
    for bad, named in [({**gate, key: gate[key][:1]}, "shape"), ({**gate, key: gate[key] * float("nan")}, "finite"),
                       ({k: v for k, v in gate.items() if k != key}, "missing")]:
        save_file(bad, str(path))
        write_manifest(folder)
        with pytest.raises(TaskfedError, match=named) as err:
            ServedRun(folder)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_a_bad_router_json_stops_the_cli_before_the_model_loads(copy, no_model):
    folder = copy()
    edit_router(folder, "router.clients", [1, 2])  # was an internal error
    assert "router.json" in serve_cli(folder)


def test_embed_layers_and_centroid_width_are_checked_against_the_base_model_before_serving(copy, never_serves):
    folder = copy()
    edit_router(folder, "router.embed_layers", 1000)  # the tiny model has 2 decoder layers
    line = serve_cli(folder)
    assert "'router.embed_layers'" in line and "1000" in line and "2 decoder layers" in line, line
    folder = copy()
    edit_router(folder, "router.embed_layers", 2)  # all layers: fine
    rows = len(json.loads((folder / "router.json").read_text())["router"]["adapters"])
    centroids = torch.zeros(rows, 5, dtype=torch.float64)  # one per adapter, but 5 wide: the model's hidden size is 64
    save_file({"centroids": centroids}, str(folder / "router.safetensors"))
    write_manifest(folder)
    line = serve_cli(folder)
    assert "router.safetensors" in line and "width 5" in line and "64" in line, line


# ----------------------------------------------------------------- listening: checked before the model loads
@pytest.fixture
def busy_port():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> dict[str, Path]:
    """A server certificate and key, and (`other_key`) the key of another certificate."""
    from taskfed.flower.local import make_tls

    tmp = tmp_path_factory.mktemp("tls")
    return {**make_tls(tmp / "a"), "other_key": make_tls(tmp / "b")["key"]}


def test_a_busy_port_is_one_error_before_the_model_loads(runs, no_model, busy_port):
    result = runner.invoke(app, ["serve", str(runs / "fedrouter"), "--port", str(busy_port)], catch_exceptions=False)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "loading" not in result.output, result.output
    assert f"--port {busy_port}" in errors[0] and "already in use" in errors[0]


@pytest.mark.parametrize("case", ["host", "idna-host", "certfile", "keyfile", "not-pem", "key-mismatch"])
def test_host_and_tls_problems_are_one_error_before_the_model_loads(runs, no_model, tls, tmp_path, case):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    args, needle = {
        "host": (["--host", "no-such-host.invalid"], "--host no-such-host.invalid"),
        "idna-host": (["--host", "a..b"], "--host a..b"),
        "certfile": (["--ssl-certfile", tmp_path / "none.pem", "--ssl-keyfile", tls["key"]], "--ssl-certfile"),
        "keyfile": (["--ssl-certfile", tls["cert"], "--ssl-keyfile", tmp_path / "none.key"], "--ssl-keyfile"),
        "not-pem": (["--ssl-certfile", garbage, "--ssl-keyfile", tls["key"]], "garbage.pem"),
        "key-mismatch": (["--ssl-certfile", tls["cert"], "--ssl-keyfile", tls["other_key"]], "server.key"),
    }[case]
    result = runner.invoke(app, ["serve", str(runs / "fedrouter"), "--port", "0", *map(str, args)], catch_exceptions=False)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "loading" not in result.output, result.output
    assert needle in errors[0], errors[0]


def test_serve_listens_on_the_sockets_it_checked_over_tls(runs, tls, monkeypatch, tiny_runtime_factory):
    """The sockets bound before the model loads are the ones uvicorn serves on (no second bind to lose)."""
    from taskfed.config import load_config

    servers = []
    real_build = api.build_server

    def build(*a, **k):
        servers.append(real_build(*a, **k))
        return servers[-1]

    monkeypatch.setattr(api, "build_server", build)
    monkeypatch.setattr(taskfed.runtime, "Runtime", lambda cfg: tiny_runtime_factory(cfg))
    said: list[str] = []
    thread = threading.Thread(target=api.serve, args=(runs / "fedrouter",), daemon=True,
                              kwargs=dict(port=0, ssl_certfile=str(tls["cert"]), ssl_keyfile=str(tls["key"]), log=said.append))
    thread.start()
    deadline = time.monotonic() + 60
    while not (servers and servers[0][0].started):
        assert time.monotonic() < deadline and thread.is_alive(), said
        time.sleep(0.02)
    server = servers[0][0]
    try:
        port = server.servers[0].sockets[0].getsockname()[1]
        assert port != 0 and said[-1].endswith(f"https://127.0.0.1:{port}"), said
        health = httpx.get(f"https://127.0.0.1:{port}/health", verify=str(tls["ca"]), timeout=30).json()
        assert health["status"] == "ok" and health["method"] == load_config(runs / "fedrouter" / "config.toml").method_name
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()


# ----------------------------------------------------------------- mix weights
def test_mix_weights_are_shares_in_0_1_summing_to_at_most_1_applied_as_given(runs):
    run = ServedRun(runs / "fedrouter")
    for mix, param in [({"cluster/0": 1e308, "cluster/1": 1e308}, "taskfed.mix.cluster/0"),
                       ({"cluster/0": 1.5}, "taskfed.mix.cluster/0"),
                       ({"cluster/0": 10**400}, "taskfed.mix.cluster/0"),
                       ({"cluster/0": float("nan")}, "taskfed.mix.cluster/0"),
                       ({"cluster/0": 0.7, "cluster/1": 0.7}, "taskfed.mix")]:
        with pytest.raises(BadRequest) as err:
            run.ask("auto", mix)
        assert err.value.param == param and "at most 1" in str(err.value), mix
    assert run.ask("auto", {"cluster/0": 0.7, "cluster/2": 0.3}).weights == [0.7, 0.3]  # not normalised
    assert run.ask("auto", {"cluster/0": 0.5}).weights == [0.5]
    assert run.ask("auto", {"cluster/0": 0.1, "cluster/1": 0.2, "cluster/2": 0.7}).weights == [0.1, 0.2, 0.7]
