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
    ({"model": "nope", "prompt": "x"}, 400, "model"),
    ({"model": "auto", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "auto", "prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ({"model": "auto", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "auto", "prompt": "x", "n": 2}, 400, "n"),
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
