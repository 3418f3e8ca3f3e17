"""`taskfed serve`: a real uvicorn server on 127.0.0.1 (a free port) over smoke run folders of FedRouter, FL-TAC
and FedDPA-F (tiny model), spoken to with the `openai` package and raw HTTP.

Served answers are checked against taskfed's offline pieces: the routed adapter against the run's own
scores.csv for the same test rows, the tokens against `evaluation.generate` on the bank under that adapter
(or mix), alone versus inside a batch of 16 concurrent mixed-adapter requests, streamed versus whole."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from taskfed.evaluation import generate as gen
from taskfed.evaluation.rows import read_scores
from taskfed.model.bank import RowMix
from taskfed.population import population
from taskfed.run import run_experiment
from taskfed.serve import batcher as batcher_mod
from taskfed.serve.api import Limits, build_server
from taskfed.serve.run import BadRequest, ServedRun
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
PLAIN = ["data.template=plain", "data.max_length=512", "eval.max_new_tokens=8"]  # no offline prompt truncation


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_runtime_factory):
    tmp = tmp_path_factory.mktemp("serve")
    cfgs = {
        "fedrouter": tiny_config("method.name=fedrouter", "scenario.name=dual", *PLAIN),
        "fedrouter-b": tiny_config("method.name=fedrouter", "scenario.name=dual", "seed=1", *PLAIN),
        "fltac": tiny_config("method.name=fltac", "scenario.name=dual", *PLAIN),
        "feddpa-f": tiny_config("method.name=feddpa-f", "method.weighting=fixed", "method.w_fixed=0.3", *PLAIN),
        "feddpa-f-auto": tiny_config("method.name=feddpa-f", "method.export_references=true", *PLAIN),
        "fedalt": tiny_config("method.name=fedalt", *PLAIN),
        "fedlease": tiny_config("method.name=fedlease", "method.warmup=1", *PLAIN),
    }
    for name, cfg in cfgs.items():
        run_experiment(cfg, tmp / name, rt=tiny_runtime_factory(cfg))
    return tmp, cfgs


class Running:
    """A served run in a thread of this process: uvicorn on a free loopback port."""

    def __init__(self, folder: Path, rt, **kw):
        self.rt = rt
        run = ServedRun(folder, None, kw.pop("max_distance", None), kw.pop("fallback", "base"))
        self.server, self.batcher = build_server(run, rt, host="127.0.0.1", port=0, **kw)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"{'https' if kw.get('ssl_certfile') else 'http'}://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.batcher.close()
        assert not self.thread.is_alive() and not self.batcher.thread.is_alive()


@pytest.fixture(scope="module")
def fedrouter(runs, tiny_runtime_factory):
    tmp, cfgs = runs
    srv = Running(tmp / "fedrouter", tiny_runtime_factory(cfgs["fedrouter"]), max_batch=32)
    yield srv
    srv.close()


def offline(srv: Running, instruction: str, mix: dict[str, float], max_tokens: int) -> str:
    """taskfed's offline generation of `instruction` under `mix` on the served bank's own slots (run template)."""
    run = srv.batcher.current
    ids = gen.prompt_ids(srv.rt, instruction, max_tokens)
    assert ids == srv.rt.tokenizer(run.prompt(instruction), add_special_tokens=False)["input_ids"]  # not truncated
    names = list(mix)
    row = RowMix(torch.tensor([[run.slots[n] for n in names]]), torch.tensor([[mix[n] for n in names]]))
    with srv.batcher.paused():
        texts, _ = gen.generate(srv.rt, [ids], row, max_tokens)
    return texts[0]


def complete(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60, **kw)


def test_router_state_is_in_the_run_folder(runs):
    tmp, _ = runs
    run = ServedRun(tmp / "fedrouter")
    assert run.router.kind == "nearest" and run.router.adapters == [f"cluster/{g}" for g in range(len(run.router.adapters))]
    metrics = json.loads((tmp / "fedrouter" / "metrics.json").read_text())
    assert run.rounds == len(metrics["rounds"]) and run.router.centroids.shape[0] == len(run.router.adapters)
    assert ServedRun(tmp / "fltac").router.kind == "nearest"
    dpa = ServedRun(tmp / "feddpa-f")
    assert dpa.router.kind == "mix" and dpa.router.params["w_fixed"] == 0.3
    assert sorted(dpa.adapters) == ["global", *sorted(f"local@{c}" for c in metrics_clients(tmp / "feddpa-f"))]


def metrics_clients(folder: Path) -> list[str]:
    return list(json.loads((folder / "metrics.json").read_text())["clients"])


@pytest.mark.parametrize("name", ["fedrouter", "fltac"])
def test_auto_routes_each_test_row_where_the_run_did_and_answers_as_offline(runs, tiny_runtime_factory, fedrouter, name):
    tmp, cfgs = runs
    srv = fedrouter if name == "fedrouter" else Running(tmp / name, tiny_runtime_factory(cfgs[name]))
    try:
        pop = population(cfgs[name])
        scores = {(r["task"], r["row"]): r["adapters"] for r in read_scores(tmp / name / "scores.csv")
                  if r["mode"] == "global" and r["client"] == "0"}
        # FL-TAC routes only rows of tasks the client does not hold (its own go to its task adapters).
        routed = {k: v for k, v in scores.items() if v[0].startswith("cluster/")}
        assert len(routed) >= 3
        routed = dict(sorted(routed.items())[::max(1, len(routed) // 6)])  # about 6 rows, over the tasks
        picked = set()
        for (task, row), adapters in sorted(routed.items()):
            instruction = pop.test_by_task[task][row].instruction
            got = complete(srv.url, {"model": "auto", "prompt": instruction, "max_tokens": 8, "temperature": 0}).json()
            assert got["taskfed"]["adapters"] == adapters, (task, row)
            d = got["taskfed"]["distances"]
            assert got["taskfed"]["distance"] == min(d.values()) == d[adapters[0]]
            assert got["choices"][0]["text"].strip() == offline(srv, instruction, {adapters[0]: 1.0}, 8)
            picked.add(adapters[0])
        assert name == "fltac" or len(picked) > 1  # the router does send rows to different adapters
    finally:
        if srv is not fedrouter:
            srv.close()


def test_openai_client_names_mix_stream_and_models(fedrouter):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{fedrouter.url}/v1", api_key="unused", max_retries=0)
    ids = [m.id for m in client.models.list().data]
    run = fedrouter.batcher.current
    assert ids[:2] == ["auto", "base"] and sorted(ids[2:]) == sorted(run.adapters)
    assert all(m.parent == "tiny" for m in client.models.list().data if m.id != "base")
    prompt = "Name the capital of France."
    named = client.completions.create(model="cluster/1", prompt=prompt, max_tokens=10, temperature=0)
    assert named.choices[0].text.strip() == offline(fedrouter, prompt, {"cluster/1": 1.0}, 10)
    assert named.model_extra["taskfed"]["adapters"] == ["cluster/1"]
    assert 1 <= named.usage.completion_tokens <= 10
    mix = {"cluster/0": 0.7, "cluster/2": 0.3}
    mixed = client.completions.create(model="auto", prompt=prompt, max_tokens=10, temperature=0, extra_body={"taskfed": {"mix": mix}})
    assert mixed.choices[0].text.strip() == offline(fedrouter, prompt, mix, 10)
    assert mixed.model_extra["taskfed"]["weights"] == [0.7, 0.3]
    base = client.completions.create(model="base", prompt=prompt, max_tokens=10)
    with fedrouter.batcher.paused():
        tokens = gen.plain_generate(fedrouter.rt, [gen.prompt_ids(fedrouter.rt, prompt, 10)], None, 10)[0]  # no adapter
    assert base.choices[0].text.strip() == fedrouter.rt.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    chat = client.chat.completions.create(model="cluster/1", messages=[{"role": "user", "content": prompt}], max_tokens=10)
    assert chat.choices[0].message.content == named.choices[0].text and chat.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model="cluster/1", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=10, stream=True, stream_options={"include_usage": True})
    parts, usage, finish = [], None, None
    for chunk in streamed:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == chat.choices[0].message.content and finish == chat.choices[0].finish_reason
    assert usage.completion_tokens == chat.usage.completion_tokens
    raw = list(client.completions.create(model="cluster/1", prompt=prompt, max_tokens=10, stream=True))
    assert "".join(c.choices[0].text for c in raw if c.choices) == named.choices[0].text


def test_sampling_draws_by_temperature_and_top_p_from_a_seeded_generator():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2, 1e-12]))
    draws = lambda s, n=4000: torch.bincount(torch.tensor([s.pick(logits) for _ in range(n)]), minlength=4)  # noqa: E731
    counts = draws(gen.Sampling(1.0, 1.0, seed=3))
    want = torch.tensor([0.5, 0.3, 0.2, 0.0]) * 4000
    assert torch.all((counts - want).abs() <= 4 * torch.sqrt(want * (1 - want / 4000)) + 1), counts  # 4 sigma
    nucleus = draws(gen.Sampling(1.0, 0.6, seed=3))  # 0.5 < 0.6: the second token completes the nucleus
    assert nucleus[2] == nucleus[3] == 0 and abs(nucleus[0] / 4000 - 0.5 / 0.8) < 0.03
    assert draws(gen.Sampling(1.0, 1e-9, seed=3), 50).tolist() == [50, 0, 0, 0]  # the nucleus is the top token
    cold = draws(gen.Sampling(0.05, 1.0, seed=3), 200)  # low temperature: nearly greedy
    assert cold[0] >= 199
    a, b = gen.Sampling(1.0, 1.0, seed=11), gen.Sampling(1.0, 1.0, seed=11)
    assert [a.pick(logits) for _ in range(30)] == [b.pick(logits) for _ in range(30)]  # seeded
    batch = torch.stack([logits, logits.flip(0)])  # a greedy row beside a sampled one keeps its argmax
    assert gen.pick(batch.clone(), [gen.GREEDY, gen.Sampling(1.0, 1.0, 5)])[0] == 0


def test_sampled_answers_repeat_with_their_seed_and_vary_without(fedrouter):
    body = {"model": "cluster/0", "prompt": "Write a word", "max_tokens": 8, "temperature": 1.5}
    same = {complete(fedrouter.url, {**body, "seed": 7}).json()["choices"][0]["text"] for _ in range(2)}
    assert len(same) == 1
    texts = {complete(fedrouter.url, {**body, "seed": s}).json()["choices"][0]["text"] for s in range(6)}
    assert len(texts) > 1  # the tiny random model's distribution is wide: different seeds, different draws
    greedy = complete(fedrouter.url, {**body, "temperature": 0}).json()["choices"][0]["text"]
    assert greedy.strip() == offline(fedrouter, "Write a word", {"cluster/0": 1.0}, 8)


def test_stop_strings_end_the_text_before_them_streamed_or_not(fedrouter):
    prompt = "Count: one two three"
    full = complete(fedrouter.url, {"model": "cluster/0", "prompt": prompt, "max_tokens": 12}).json()["choices"][0]["text"]
    assert len(full) >= 4
    stop = full[2:4]
    cut = full[:full.find(stop)]
    body = {"model": "cluster/0", "prompt": prompt, "max_tokens": 12, "stop": [stop, "zzzz"]}
    got = complete(fedrouter.url, body).json()["choices"][0]
    assert got["text"] == cut and got["finish_reason"] == "stop"
    with httpx.stream("POST", f"{fedrouter.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == cut
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_row_answers_the_same_alone_and_in_a_batch_of_16_mixed_adapter_requests(fedrouter):
    prompts = [f"Task {i}: say something about {w}" for i, w in enumerate("abcdefghijklmnop")]
    models = ["auto", "cluster/0", "cluster/1", "base"]
    bodies = [{"model": models[i % 4], "prompt": p, "max_tokens": 12,
               **({"taskfed": {"mix": {"cluster/0": 0.5, "cluster/3": 0.5}}} if i % 5 == 4 else {})}
              for i, p in enumerate(prompts)]
    alone = [complete(fedrouter.url, b).json() for b in bodies]
    before = fedrouter.batcher.stats["max_rows"]
    fedrouter.batcher.stats["max_rows"] = 0
    with ThreadPoolExecutor(16) as pool:
        with fedrouter.batcher.paused():  # all 16 queue up, then join the decode together
            futures = [pool.submit(complete, fedrouter.url, b) for b in bodies]
            deadline = time.monotonic() + 30
            while fedrouter.batcher.waiting.qsize() < 16 and time.monotonic() < deadline:
                time.sleep(0.02)
        together = [f.result().json() for f in futures]
    assert fedrouter.batcher.stats["max_rows"] == 16  # they did decode in one batch
    fedrouter.batcher.stats["max_rows"] = max(before, 16)
    for a, t in zip(alone, together):
        assert t["choices"][0]["text"] == a["choices"][0]["text"]
        assert t["taskfed"]["adapters"] == a["taskfed"]["adapters"] and t["usage"] == a["usage"]


def test_reload_swaps_adapters_while_a_request_in_flight_finishes_on_the_old_ones(runs, tiny_runtime_factory, monkeypatch):
    tmp, cfgs = runs
    srv = Running(tmp / "fedrouter", tiny_runtime_factory(cfgs["fedrouter"]))
    try:
        old = srv.batcher.current
        prompt = next(p for p in (f"Write a long story number {i}" for i in range(60))
                      if len(srv.rt.tokenizer(offline(srv, p, {"cluster/2": 1.0}, 120))["input_ids"]) >= 100)
        want_old = offline(srv, prompt, {"cluster/2": 1.0}, 120)
        step = batcher_mod.Decoder.step
        monkeypatch.setattr(batcher_mod.Decoder, "step", lambda self: (time.sleep(0.01), step(self))[1])  # >= 1.2 s
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(complete, srv.url, {"model": "cluster/2", "prompt": prompt, "max_tokens": 120})
            while srv.batcher.stats["tokens"] < 5:
                time.sleep(0.01)
            r = httpx.post(f"{srv.url}/v1/reload", json={"run_dir": str(tmp / "fedrouter-b")}, timeout=60)
            assert r.status_code == 200, r.text
            assert not long.done() and srv.batcher.live  # the long request is still decoding ...
            monkeypatch.setattr(batcher_mod.Decoder, "step", step)
            new = srv.batcher.current
            assert new is not old and new.id != old.id
            after = complete(srv.url, {"model": "cluster/2", "prompt": prompt, "max_tokens": 12}).json()
            got = long.result().json()
        assert got["taskfed"]["run"] == old.id and got["choices"][0]["text"].strip() == want_old  # ... on the old ones
        assert after["taskfed"]["run"] == new.id and after["choices"][0]["text"].strip() == offline(srv, prompt, {"cluster/2": 1.0}, 12)
        assert not torch.equal(new.adapters["cluster/2"][next(iter(new.adapters["cluster/2"]))],
                               old.adapters["cluster/2"][next(iter(old.adapters["cluster/2"]))])
        # The old run's slots are reused by the next reload once nothing runs on them.
        r = httpx.post(f"{srv.url}/v1/reload", json={"run_dir": str(tmp / "fedrouter")}, timeout=60)
        assert r.status_code == 200 and set(srv.batcher.current.slots.values()) == set(old.slots.values())
        bad = httpx.post(f"{srv.url}/v1/reload", json={"run_dir": str(tmp / "nowhere")}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "run_dir"
    finally:
        srv.close()


def test_feddpa_auto_at_client_mixes_global_and_that_clients_local_adapter(runs, tiny_runtime_factory):
    tmp, cfgs = runs
    srv = Running(tmp / "feddpa-f", tiny_runtime_factory(cfgs["feddpa-f"]))
    try:
        prompt = "Classify the sentiment: a fine film"
        got = complete(srv.url, {"model": "auto@1", "prompt": prompt, "max_tokens": 8}).json()
        assert got["taskfed"]["adapters"] == ["global", "local@1"] and got["taskfed"]["weights"] == [0.7, 0.3]
        assert got["choices"][0]["text"].strip() == offline(srv, prompt, {"global": 0.7, "local@1": 0.3}, 8)
        no_client = complete(srv.url, {"model": "auto", "prompt": prompt})
        assert no_client.status_code == 400 and "auto@" in no_client.json()["error"]["message"]
    finally:
        srv.close()


def test_feddpa_auto_at_client_weighs_each_input_as_the_run_did_from_the_exported_references(runs, tiny_runtime_factory):
    tmp, cfgs = runs
    folder = tmp / "feddpa-f-auto"
    pop = population(cfgs["feddpa-f-auto"])
    run = ServedRun(folder)
    hidden = tiny_runtime_factory(cfgs["feddpa-f-auto"]).model.config.hidden_size
    # h of every training instruction, per client, in its row order; no text leaves with them.
    assert {c: tuple(h.shape) for c, h in run.references.items()} == {
        c: (len(client.records), hidden) for c, client in pop.clients.items()}
    assert all(torch.allclose(h.norm(dim=1), torch.ones(len(h), dtype=torch.float64)) for h in run.references.values())
    assert not ServedRun(tmp / "feddpa-f").references  # export_references is off by default
    srv = Running(folder, tiny_runtime_factory(cfgs["feddpa-f-auto"]))
    try:
        rows = [r for r in read_scores(folder / "scores.csv") if r["mode"] == "global" and r["client"] == "1"]
        rows = rows[::max(1, len(rows) // 5)]  # about 5 rows, over the tasks
        weights = set()
        for r in rows:
            instruction = pop.test_by_task[r["task"]][r["row"]].instruction
            got = complete(srv.url, {"model": "auto@1", "prompt": instruction, "max_tokens": 8}).json()
            assert got["taskfed"]["adapters"] == ["global", "local@1"]
            assert got["taskfed"]["weights"] == pytest.approx(r["weights"], abs=2e-6), (r["task"], r["row"])
            mix = dict(zip(["global", "local@1"], r["weights"]))
            assert got["choices"][0]["text"].strip() == offline(srv, instruction, mix, 8)
            weights.add(round(r["weights"][1], 4))
        assert len(weights) > 1  # the weight does vary per input
    finally:
        srv.close()
    run.references.pop("1")  # a client that did not give its reference states
    with pytest.raises(BadRequest, match="export_references"):
        run.ask("auto@1", None)


def test_abstain_sends_far_inputs_to_the_fallback(runs, tiny_runtime_factory):
    tmp, cfgs = runs
    srv = Running(tmp / "fedrouter", tiny_runtime_factory(cfgs["fedrouter"]), max_distance=0.0, fallback="cluster/0")
    try:
        got = complete(srv.url, {"model": "auto", "prompt": "anything at all", "max_tokens": 4}).json()
        assert got["taskfed"]["abstained"] is True and got["taskfed"]["adapters"] == ["cluster/0"]
        assert got["taskfed"]["distance"] > 0
    finally:
        srv.close()


BAD = [  # (body or raw bytes, status, param)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": 3, "prompt": "x"}, 400, "model"),
    ({"model": "auto"}, 400, "prompt"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "auto", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "auto", "prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ({"model": "auto", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "auto", "prompt": "x", "n": 0}, 400, "n"),
    ({"model": "auto", "prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"model": "auto", "prompt": "x", "temperature": 1, "top_p": 0}, 400, "top_p"),
    ({"model": "auto", "prompt": "x", "taskfed": {"mix": {"cluster/0": -1}}}, 400, "taskfed.mix.cluster/0"),
    (b'{"model": "auto", "prompt": "x", "taskfed": {"mix": {"cluster/0": NaN}}}', 400, "taskfed.mix.cluster/0"),
    ({"model": "auto", "prompt": "x", "taskfed": {"mix": {"cluster/99": 1}}}, 400, "taskfed.mix.cluster/99"),
    ({"model": "auto", "prompt": "x", "taskfed": {"mixx": {}}}, 400, "taskfed.mixx"),
    ({"model": "auto", "prompt": "y" * 2100}, 400, "prompt"),
    ({"model": "auto", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "auto", "prompt": "z" * 70_000}, 413, None),
]


def test_a_burst_of_bad_requests_mixed_with_good_ones_gets_4xx_each_and_the_server_stays_up(runs, tiny_runtime_factory):
    tmp, cfgs = runs
    srv = Running(tmp / "fedrouter", tiny_runtime_factory(cfgs["fedrouter"]), limits=Limits(max_body=65_536, max_tokens=64))
    good = {"model": "auto", "prompt": "A good request", "max_tokens": 6}
    try:
        want = complete(srv.url, good).json()["choices"][0]["text"]
        work = [(b, s, p) for _ in range(3) for b, s, p in BAD] + [(good, 200, None)] * 20  # 74 requests, bounded

        def send(item):
            body, status, param = item
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = httpx.post(f"{srv.url}/v1/completions", content=raw, headers={"Content-Type": "application/json"}, timeout=60)
            return item, r

        tic = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            for (body, status, param), r in pool.map(send, work):
                assert r.status_code == status, (body if isinstance(body, bytes) else str(body)[:80], r.text[:200])
                if status == 200:
                    assert r.json()["choices"][0]["text"] == want
                else:
                    err = r.json()["error"]
                    assert err["message"] and err["type"] and err["param"] == param, (str(body)[:80], err)
        assert time.monotonic() - tic < 120
        assert httpx.get(f"{srv.url}/health").json()["status"] == "ok" and srv.batcher.thread.is_alive()
        chat_bad = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "auto", "messages": []}, timeout=30)
        assert chat_bad.status_code == 400 and chat_bad.json()["error"]["param"] == "messages"
    finally:
        srv.close()


def test_full_queue_429_timeout_504_and_api_key_over_tls(runs, tiny_runtime_factory, tmp_path):
    from taskfed.flower.local import make_tls

    tmp, cfgs = runs
    tls = make_tls(tmp_path / "tls")
    srv = Running(tmp / "fedrouter", tiny_runtime_factory(cfgs["fedrouter"]), max_queue=2, max_batch=1,
                  limits=Limits(api_key="s3cret", timeout=1.0), ssl_certfile=str(tls["cert"]), ssl_keyfile=str(tls["key"]))
    key = {"Authorization": "Bearer s3cret"}
    try:
        assert srv.url.startswith("https://")
        with httpx.Client(verify=str(tls["ca"]), timeout=30) as c:
            assert c.post(f"{srv.url}/v1/completions", json={"model": "base", "prompt": "x"}).status_code == 401
            assert c.post(f"{srv.url}/v1/completions", json={"model": "base", "prompt": "x"},
                          headers={"Authorization": "Bearer s3creT"}).status_code == 401
            assert c.get(f"{srv.url}/v1/models").status_code == 401 and c.get(f"{srv.url}/health").status_code == 200
            ok = c.post(f"{srv.url}/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 3}, headers=key)
            assert ok.status_code == 200
            with ThreadPoolExecutor(2) as pool:
                with srv.batcher.paused():  # nothing decodes: the queue (2) fills, the third finds no room
                    first = [pool.submit(c.post, f"{srv.url}/v1/completions", json={"model": "base", "prompt": "x"}, headers=key)
                             for _ in range(2)]
                    while srv.batcher.waiting.qsize() < 2:
                        time.sleep(0.01)
                    full = c.post(f"{srv.url}/v1/completions", json={"model": "base", "prompt": "x"}, headers=key)
                    assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
                    timed_out = [f.result() for f in first]  # the 1 s timeout passes while paused
            assert [r.status_code for r in timed_out] == [504, 504]
            assert c.post(f"{srv.url}/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 3},
                          headers=key).json()["choices"][0]["text"] == ok.json()["choices"][0]["text"]
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="s3cret", max_retries=0,
                               http_client=httpx.Client(verify=str(tls["ca"])))
        assert client.completions.create(model="base", prompt="x", max_tokens=3).choices[0].text == ok.json()["choices"][0]["text"]
    finally:
        srv.close()


def test_serve_refuses_a_corrupt_run_folder_with_one_error_line(runs, tmp_path):
    tmp, _ = runs
    bad = tmp_path / "bad"
    shutil.copytree(tmp / "fedrouter", bad)
    (bad / "adapters" / "server" / "cluster_1" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    nonrouter = tmp_path / "noroute"
    shutil.copytree(tmp / "fedrouter", nonrouter)
    (nonrouter / "router.safetensors").write_bytes(b"\x00\x01")
    for folder, needle in ((bad, "cluster_1"), (nonrouter, "router.safetensors"), (tmp_path / "missing", "does not exist")):
        p = subprocess.run([sys.executable, "-m", "taskfed.cli", "serve", str(folder), "--port", "0"], capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
        lines = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], p.stdout + p.stderr


def test_page_is_served_and_names_the_routing_decision(fedrouter):
    page = httpx.get(f"{fedrouter.url}/").text
    assert "<title>taskfed serve</title>" in page and "/v1/completions" in page and 'id="distances"' not in page
    assert "chosen" in page and "distances" in page  # the DOM ids the headless check reads (scripts/page_check.py)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no headless Chromium on this machine (scripts/page_check.py takes the screenshot where one is)")
    from scripts.page_check import check_page

    dom = check_page(chromium, fedrouter.url, "Is this review positive? great acting", None)
    assert 'id="chosen"' in dom and "adapter: cluster/" in dom and 'id="distances"' in dom and 'id="answer"' in dom


def openai_error(r: httpx.Response) -> dict:
    """The OpenAI error object of a 4xx/5xx answer (asserting its shape)."""
    assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.text[:200])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"], err
    return err


def post_raw(url: str, path: str, raw: bytes) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=raw, headers={"Content-Type": "application/json"}, timeout=60)


BODIES_THAT_REACHED_500 = [  # (endpoint, raw body, param): each was a 500 (or a batcher failure) before
    ("/v1/completions", b'{"model": "auto", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/chat/completions", b'{"model": "auto", "messages": [{"role": "user", "content": "x\\udfffy"}]}',
     "messages.0.content"),
    ("/v1/completions", b'{"model": "auto", "prompt": "x", "taskfed": ' + b"[" * 5000 + b"]" * 5000 + b"}", "taskfed"),
    ("/v1/completions", b'{"model": "auto", "prompt": "x", "stop": ' + b"[" * 200 + b"]" * 200 + b"}", "stop"),
    ("/v1/completions", b'{"model": "auto", "prompt": ""}', "prompt"),
    ("/v1/chat/completions", b'{"model": "auto", "messages": [{"role": "system", "content": "Be brief."}, '
                             b'{"role": "user", "content": ""}]}', "messages"),
    ("/v1/completions", b'{"model": "auto", "prompt": "x", "temperature": 1' + b"0" * 400 + b"}", "temperature"),
    ("/v1/completions", b'{"model": "auto", "prompt": "x", "taskfed": {"mix": {"cluster/0": 1' + b"0" * 400 + b"}}}",
     "taskfed.mix.cluster/0"),
    ("/v1/completions", b'{"model": "auto", "prompt": "x", "seed": 1' + b"0" * 5000 + b"}", None),
]


def test_bodies_that_reached_a_500_are_400s_naming_the_field(fedrouter):
    good = {"model": "auto", "prompt": "A good request", "max_tokens": 4}
    want = complete(fedrouter.url, good).json()["choices"][0]["text"]
    for path, raw, param in BODIES_THAT_REACHED_500:
        r = post_raw(fedrouter.url, path, raw)
        assert r.status_code == 400, (raw[:80], r.text[:200])
        assert openai_error(r)["param"] == param, (raw[:80], r.text[:200])
    assert complete(fedrouter.url, good).json()["choices"][0]["text"] == want and fedrouter.batcher.thread.is_alive()


def test_routing_that_fails_for_one_request_fails_it_alone(fedrouter, monkeypatch):
    """The batcher's class fix: a request its router cannot handle gets its error; the others joining the
    same turn are answered (they all failed with it before)."""
    decide = ServedRun.decide

    def picky(self, enc, asks, instructions):
        if any("poison" in t for t in instructions):
            raise RuntimeError("this router cannot embed poison")
        return decide(self, enc, asks, instructions)

    monkeypatch.setattr(ServedRun, "decide", picky)
    bodies = [{"model": "auto", "prompt": p, "max_tokens": 3} for p in ("one", "poison", "three")]
    with ThreadPoolExecutor(3) as pool:
        with fedrouter.batcher.paused():  # the three join in one turn
            futures = [pool.submit(complete, fedrouter.url, b) for b in bodies]
            while fedrouter.batcher.waiting.qsize() < 3:
                time.sleep(0.01)
        got = [f.result() for f in futures]
    assert [r.status_code for r in got] == [200, 500, 200]
    assert "routing failed" in openai_error(got[1])["message"]


def test_every_error_is_openai_shaped_with_its_documented_code(fedrouter):
    r = httpx.get(f"{fedrouter.url}/v1/nope")
    assert r.status_code == 404 and openai_error(r)["code"] == "not_found"
    r = httpx.get(f"{fedrouter.url}/v1/completions")
    assert r.status_code == 405 and openai_error(r)["code"] == "method_not_allowed" and r.headers["allow"] == "POST"

    def chunked():  # no Content-Length: the guard cannot see the size before the body comes
        yield b'{"model": "auto", "prompt": "'
        for _ in range(17):
            yield b"x" * 65_536
        yield b'"}'

    r = httpx.post(f"{fedrouter.url}/v1/completions", content=chunked(), headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and openai_error(r)["code"] == "body_too_large"  # as the README says (was 400)


def test_a_request_uvicorn_cannot_parse_gets_an_openai_error_not_plain_text(fedrouter):
    """Needs build_server to pass uvicorn.Config(http=http_protocol()): uvicorn answers these itself."""
    import socket

    host, port = fedrouter.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # uvicorn's parser refuses it, not the app
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 12abc\r\n\r\n{}")
        answer = b""
        while chunk := s.recv(65_536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), answer
    assert json.loads(body)["error"]["code"] == "invalid_http_request"


def test_shutdown_with_requests_in_flight_answers_them_without_tracebacks(runs, tiny_runtime_factory, monkeypatch):
    import logging

    tmp, cfgs = runs
    srv = Running(tmp / "fedrouter", tiny_runtime_factory(cfgs["fedrouter"]))
    srv.server.config.timeout_graceful_shutdown = 0.3  # read at shutdown: the requests below outlast it
    logged, crashed = [], []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record)
    logging.getLogger("uvicorn").addHandler(handler)
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args))
    step = batcher_mod.Decoder.step
    monkeypatch.setattr(batcher_mod.Decoder, "step", lambda self: (time.sleep(0.02), step(self))[1])  # >= 4 s each
    body = {"model": "cluster/0", "prompt": "Write a long story", "max_tokens": 200}
    got: dict = {}

    def whole():
        got["whole"] = complete(srv.url, body)

    def streamed():
        with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            got["stream"] = [line for line in r.iter_lines() if line]

    try:
        clients = [threading.Thread(target=f) for f in (whole, streamed)]
        for c in clients:
            c.start()
        while srv.batcher.stats["tokens"] < 10:
            time.sleep(0.01)
    finally:
        srv.close()  # the server stops with both requests decoding; then the batcher (its rows cancelled)
        logging.getLogger("uvicorn").removeHandler(handler)
    for c in clients:
        c.join(timeout=30)
    assert got["whole"].status_code == 503 and openai_error(got["whole"])["code"] == "server_shutting_down"
    assert got["stream"][-1] == "data: [DONE]" and json.loads(got["stream"][-2][6:])["error"]["code"] == "server_shutting_down"
    text = "\n".join(r.getMessage() + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "") for r in logged)
    for needle in ("Traceback", "CancelledError", "Exception in ASGI application", "Event loop is closed"):
        assert needle not in text, text
    assert not crashed, [a.exc_value for a in crashed]


def test_openai_parameters_are_served_or_refused_by_name(fedrouter):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{fedrouter.url}/v1", api_key="unused", max_retries=0)
    prompt = "Name the capital of France."
    refused = [("logprobs", {"logprobs": 1}), ("best_of", {"best_of": 2}), ("suffix", {"suffix": "!"}),
               ("presence_penalty", {"presence_penalty": 0.5}), ("frobnicate", {"extra_body": {"frobnicate": 1}})]
    for param, kw in refused:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="cluster/1", prompt=prompt, max_tokens=4, **kw)
        assert e.value.body["param"] == param
    user = [{"role": "user", "content": prompt}]
    for param, kw in [("logprobs", {"logprobs": True}), ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
                      ("response_format", {"response_format": {"type": "json_object"}}),
                      ("messages.0.tool_calls", {"messages": [{**user[0], "tool_calls": [{"id": "1"}]}]})]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="cluster/1", **{"messages": user, "max_tokens": 4, **kw})
        assert e.value.body["param"] == param
    # The do-nothing values pass, as clients send them.
    plain = client.completions.create(model="cluster/1", prompt=prompt, max_tokens=6, logprobs=None, presence_penalty=0,
                                      user="someone")
    echoed = client.completions.create(model="cluster/1", prompt=prompt, max_tokens=6, echo=True)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    streamed = client.completions.create(model="cluster/1", prompt=prompt, max_tokens=6, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echoed.choices[0].text
    # Chat content as text parts is the same instruction as the string.
    said = client.chat.completions.create(model="cluster/1", messages=user, max_tokens=6)
    parts = client.chat.completions.create(model="cluster/1", max_tokens=6, messages=[
        {"role": "user", "content": [{"type": "text", "text": prompt}]}])
    assert parts.choices[0].message.content == said.choices[0].message.content == plain.choices[0].text
    # max_completion_tokens is chat's max tokens; without either, a chat may use the server's limit, not 16.
    short = client.chat.completions.create(model="cluster/1", messages=user, max_completion_tokens=3)
    assert short.usage.completion_tokens <= 3 and short.choices[0].message.content == said.choices[0].message.content[:len(short.choices[0].message.content)]
    # Models: retrieve by name; an unknown one is the client's NotFoundError, in a request too.
    assert client.models.retrieve("auto").id == "auto" and client.models.retrieve("cluster/2").parent == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt=prompt, max_tokens=4)
    assert e.value.body["code"] == "model_not_found"


def test_a_chat_without_max_tokens_may_take_the_servers_limit_not_16(runs, tiny_runtime_factory):
    tmp, cfgs = runs
    srv = Running(tmp / "fedrouter", tiny_runtime_factory(cfgs["fedrouter"]), limits=Limits(max_tokens=24))
    try:
        chat = {"model": "cluster/1", "messages": [{"role": "user", "content": "Write a long story"}]}
        got = httpx.post(f"{srv.url}/v1/chat/completions", json=chat, timeout=60).json()
        assert got["choices"][0]["finish_reason"] == "stop" or got["usage"]["completion_tokens"] == 24
        assert got["usage"]["completion_tokens"] > 16 or got["choices"][0]["finish_reason"] == "stop"
        over = httpx.post(f"{srv.url}/v1/chat/completions", json={**chat, "max_completion_tokens": 25}, timeout=60)
        assert over.status_code == 400 and openai_error(over)["param"] == "max_completion_tokens"
        assert complete(srv.url, {"model": "cluster/1", "prompt": "x"}).json()["usage"]["completion_tokens"] <= 16
    finally:
        srv.close()


def test_a_list_of_prompts_and_n_are_served_as_choices_decoded_together(fedrouter):
    prompts = ["Is this review positive? great acting", "Translate to French: the cat"]
    body = {"model": "auto", "prompt": prompts, "n": 2, "max_tokens": 6, "temperature": 1.2, "seed": 40}
    got = complete(fedrouter.url, body).json()
    assert [c["index"] for c in got["choices"]] == [0, 1, 2, 3]
    tokens = 0
    for c in got["choices"]:  # choice k of prompt p: the single request with seed + (2p + k)
        alone = complete(fedrouter.url, {**body, "prompt": prompts[c["index"] // 2], "n": 1, "seed": 40 + c["index"]}).json()
        assert c["text"] == alone["choices"][0]["text"] and c["taskfed"]["adapters"] == alone["taskfed"]["adapters"]
        tokens += alone["usage"]["completion_tokens"]
    assert got["usage"]["completion_tokens"] == tokens
    with httpx.stream("POST", f"{fedrouter.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    texts = ["", "", "", ""]
    for e in events:
        texts[e["choices"][0]["index"]] += e["choices"][0]["text"]
    assert texts == [c["text"] for c in got["choices"]]


def test_the_router_embeds_the_users_messages_not_the_system_prompt(fedrouter):
    question = "Is this review positive? great acting"
    alone = complete(fedrouter.url, {"model": "auto", "prompt": question, "max_tokens": 2}).json()["taskfed"]
    chat = httpx.post(f"{fedrouter.url}/v1/chat/completions", timeout=60, json={"model": "auto", "max_tokens": 2, "messages": [
        {"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": question}]}).json()
    assert chat["taskfed"]["distances"] == pytest.approx(alone["distances"]) and chat["taskfed"]["adapters"] == alone["adapters"]


def fuzzed_bodies(seed: int, count: int) -> list[tuple[str, bytes]]:
    """`count` seeded mutations of good completion and chat bodies: types swapped, fields deleted or unknown,
    nesting thousands deep, huge and non-finite numbers, lone surrogates, lists where strings go, broken JSON.
    Bodies stay small to answer (max_tokens at most 4 where it is a valid count)."""
    import random

    rng = random.Random(seed)
    values = [None, True, 0, -1, 2, 7.5, 1e308, -1e308, 10**400, float("nan"), "", "x", "a\ud800b", "\udfff", [], ["x"],
              [["x"]], [1, 2], {}, {"type": "text"}, {"a": 1}, "auto", "cluster/0", "base", "auto@9", 2**63, "@@DEEP@@",
              "@@HUGEINT@@", [{"type": "text", "text": "hi"}], [{"type": "image_url"}], ["a\ud800"], {"\ud800": 1}]
    fields = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n",
              "stop", "stream", "stream_options", "taskfed", "echo", "logprobs", "tools", "response_format", "best_of",
              "user", "frobnicate"]
    out = []
    for i in range(count):
        chat = i % 2 == 1
        body: dict = ({"model": "auto", "messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": f"question {i}"}], "max_tokens": 2}
                      if chat else {"model": "auto", "prompt": f"prompt {i}", "max_tokens": 2})
        for _ in range(rng.randint(1, 3)):
            kind, field = rng.random(), rng.choice(fields)
            if kind < 0.15:
                body.pop(field, None)
            elif kind < 0.3 and chat:  # inside a message
                m = rng.choice(body.get("messages") or [{}]) if isinstance(body.get("messages"), list) else {}
                if isinstance(m, dict):
                    m[rng.choice(["role", "content", "name", "tool_calls", "extra"])] = rng.choice(values)
            elif kind < 0.4:
                body["taskfed"] = {"mix": {rng.choice(["cluster/0", "cluster/1", "nope"]): rng.choice(values)},
                                   **({"raw": rng.choice(values)} if rng.random() < 0.5 else {})}
            else:
                body[field] = rng.choice(values)
        for key in ("max_tokens", "max_completion_tokens"):
            if type(body.get(key)) is int and 4 < body[key] <= 256:
                body[key] = 4
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = 2  # absent, a chat's default is the server's limit (256 tokens here)
        raw = json.dumps(body)
        depth = rng.choice([40, 900, 5000])
        raw = raw.replace('"@@DEEP@@"', "[" * depth + "]" * depth)
        raw = raw.replace('"@@HUGEINT@@"', "1" + "0" * 5000)
        data = raw.encode()
        if rng.random() < 0.08:  # broken JSON or bytes that are not UTF-8
            cut = rng.randrange(len(data))
            data = data[:cut] if rng.random() < 0.5 else data[:cut] + b"\xff\xfe" + data[cut:]
        out.append(("/v1/chat/completions" if chat else "/v1/completions", data))
    return out


def test_a_seeded_fuzz_of_request_bodies_gets_200_or_an_openai_shaped_4xx_never_a_500(fedrouter):
    good = {"model": "auto", "prompt": "A good request", "max_tokens": 4}
    want = complete(fedrouter.url, good).json()["choices"][0]["text"]
    bodies = fuzzed_bodies(seed=30, count=150)

    def send(item):
        path, raw = item
        return item, post_raw(fedrouter.url, path, raw)

    tic, statuses = time.monotonic(), []
    with ThreadPoolExecutor(4) as pool:
        for (path, raw), r in pool.map(send, bodies):
            statuses.append(r.status_code)
            shown = (path, raw[:160], r.text[:300])
            assert r.status_code == 200 or 400 <= r.status_code < 500, shown
            if r.status_code != 200:
                openai_error(r)
            elif r.headers["content-type"].startswith("text/event-stream"):
                assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, shown
            else:
                assert r.json()["choices"], shown
    assert time.monotonic() - tic < 60
    assert statuses.count(200) >= 5 and statuses.count(400) >= 50  # the fuzz reaches the model, and the refusals
    assert complete(fedrouter.url, good).json()["choices"][0]["text"] == want and fedrouter.batcher.thread.is_alive()


def test_models_say_what_each_cluster_serves_and_the_router_gives_a_distance_scale(runs, fedrouter):
    """`/v1/models` (and the page's list) carries each cluster adapter's makeup from the run's metrics.json
    (so `cluster/1` says which tasks it was built from); the router's centroid spacing is the scale printed
    for --max-distance, and every routed answer's distances are on it."""
    tmp, _ = runs
    metrics = json.loads((tmp / "fedrouter" / "metrics.json").read_text())
    makeup = next(m["cluster_makeup"] for m in metrics["eval"].values() if "cluster_makeup" in m)
    cards = {c["id"]: c for c in httpx.get(f"{fedrouter.url}/v1/models").json()["data"]}
    for g, tasks in makeup.items():
        assert cards[f"cluster/{g}"]["taskfed"]["serves"] == {t: n for t, n in tasks.items() if n}
    assert "taskfed" not in cards["base"] and "taskfed" not in cards["auto"]
    one = httpx.get(f"{fedrouter.url}/v1/models/cluster/0").json()
    assert one["taskfed"]["serves"] == cards["cluster/0"]["taskfed"]["serves"]
    run = ServedRun(tmp / "fedrouter")
    scale = run.distance_scale()
    assert scale.startswith("nearest pair ") and "median pair" in scale
    assert ServedRun(tmp / "feddpa-f").distance_scale() is None  # no centroids: no scale


def offline_gated(srv: Running, instruction: str, client: str, max_tokens: int) -> str:
    """taskfed's offline generation of `instruction` under client `client`'s gated model, on the served bank's
    slots and gates."""
    run = srv.batcher.current
    model = run.router.params["models"][client]
    slots = [[run.slots[model["adapters"][i]] for i in model["logits"]]]
    row = RowMix(torch.tensor(slots), torch.zeros(1, len(slots[0])), gate=torch.tensor([run.gate_slots[client]]),
                 top_k=run.router.params["top_k"], n=srv.rt.bank.n_slots)
    with srv.batcher.paused():
        texts, _ = gen.generate(srv.rt, [gen.prompt_ids(srv.rt, instruction, max_tokens)], row, max_tokens)
    return texts[0]


@pytest.mark.parametrize("name", ["fedalt", "fedlease"])
def test_a_gated_run_serves_each_clients_model_per_token_as_its_evaluation_scored_it(runs, tiny_runtime_factory, name):
    """FedALT / FedLEASE: `auto@<client>` is that client's adapters mixed per token by its gate; the served
    tokens equal the offline decoder's under the same gate, and score as the run's own evaluation scored
    the row (scores.csv); mixed in one batch with plain requests, each answers as alone."""
    from taskfed.evaluation.metrics import score
    from taskfed.population import answer_budgets

    tmp, cfgs = runs
    folder = tmp / name
    run = ServedRun(folder)
    clients = metrics_clients(folder)
    assert run.router.kind == "gate" and sorted(run.gates) == sorted(clients)
    assert [f"auto@{c}" for c in sorted(clients)] == [m for m in run.model_names() if m.startswith("auto@")]
    rt = tiny_runtime_factory(cfgs[name])
    srv = Running(folder, rt)
    try:
        pop = population(cfgs[name])
        budgets = answer_budgets(pop, rt.n_answer_tokens, cfgs[name].eval.max_new_tokens)
        client = sorted(clients)[0]
        rows = [r for r in read_scores(folder / "scores.csv") if r["mode"] == "local" and r["client"] == client]
        rows = rows[::max(1, len(rows) // 4)]  # about 4 rows, over the client's tasks
        want = {}
        for r in rows:
            record = pop.test_by_task[r["task"]][r["row"]]
            budget = budgets[r["task"]]
            got = complete(srv.url, {"model": f"auto@{client}", "prompt": record.instruction, "max_tokens": budget}).json()
            model = run.router.params["models"][client]
            assert got["taskfed"]["adapters"] == model["adapters"] and got["taskfed"]["gate"]["client"] == client
            text = got["choices"][0]["text"]
            assert text.strip() == offline_gated(srv, record.instruction, client, budget).strip()
            assert score(text, record.output)["rouge1"] == pytest.approx(r["rouge1"], abs=1e-9), (r["task"], r["row"])
            want[record.instruction] = text
        # in one batch with plain (one-adapter) requests of the same run
        plain = next(a for a in run.adapters if a.startswith(("local@", "expert/")))
        bodies = [{"model": f"auto@{client}", "prompt": p, "max_tokens": 8} for p in list(want)[:3]] + \
                 [{"model": plain, "prompt": p, "max_tokens": 8} for p in list(want)[:3]]
        with ThreadPoolExecutor(len(bodies)) as pool:
            with srv.batcher.paused():  # all queue up, then join the decode together
                futures = [pool.submit(complete, srv.url, b) for b in bodies]
                deadline = time.monotonic() + 30
                while srv.batcher.waiting.qsize() < len(bodies) and time.monotonic() < deadline:
                    time.sleep(0.02)
            together = [f.result().json()["choices"][0]["text"] for f in futures]
        assert srv.batcher.stats["max_rows"] == len(bodies)  # they did decode in one batch
        for b, text in zip(bodies, together):
            if b["model"].startswith("auto@"):
                assert text.strip() == offline_gated(srv, b["prompt"], client, 8).strip()
            else:
                assert text.strip() == offline(srv, b["prompt"], {plain: 1.0}, 8)
        no_client = complete(srv.url, {"model": "auto", "prompt": "x"})
        assert no_client.status_code == 400 and f"auto@{sorted(clients)[0]}" in no_client.json()["error"]["message"]
    finally:
        srv.close()
