"""Serving throughput (issue 15): `taskfed serve` (routed, continuously batched) against the same server one
request at a time (`--max-batch 1`) and against a plain FastAPI + peft server that swaps the named adapter
per request (what a user would write without taskfed).

    python benchmarks/serve.py                       # SmolLM2; builds a 1-round FedRouter run (8 cluster adapters) first
    python benchmarks/serve.py --run runs/fedrouter  # an existing run folder
    python benchmarks/serve.py --small               # tiny model, smoke run: checks the script, no figure to quote
    python benchmarks/serve.py --device cuda         # every server on the GPU (a run built here: bfloat16)

Each server runs alone in its own process (started, warmed up, measured at every concurrency, stopped), on
127.0.0.1, its model on `--device` in the run's dtype (the run this script builds: bfloat16 for cuda, float32
for the cpu). The load: N clients (httpx, async) each sending its next request as soon as the last one is
answered, `--requests` requests per level at most (default max(8, 2N)), no new request after `--budget-s`.
Requests are FLAN test instructions of the run's tasks, round-robin, greedy, `max_tokens` = `--max-tokens`.
taskfed is asked `model = "auto"` (its router picks the adapter: the embedding is part of the cost); the plain
server is told the adapter taskfed's router chose for that input (found in a warm-up pass), so both answer
with the same adapter. Printed per server and level: requests/s, new tokens/s (from `usage`), p50 and p95
latency; then taskfed's tokens/s as a ratio to one-at-a-time and to plain peft. The issue's targets at 16
concurrent clients: >= 3x both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
FLAN = ROOT.parent / "shared" / "data" / "flan-feddpa" / "dataset1"
CLI = [sys.executable, "-c", "from taskfed.cli import app; app()"]


# ----------------------------------------------------------------- the plain server (its own process)
class PlainRequest(BaseModel):
    model: str
    prompt: str
    max_tokens: int = 16


def plain_server(run: Path, port: int, device: str) -> None:
    """FastAPI + transformers + peft: one PeftModel holding every adapter of the run, `set_adapter` per request
    and `generate` under a lock (peft's active adapter is model-wide state), one request at a time; the base
    model on `device` in the run's dtype, as `taskfed serve` loads it."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from peft import PeftModel

    from taskfed.config import load_config
    from taskfed.data.prompts import render
    from taskfed.model.loading import load_base
    from taskfed.runtime import DTYPES

    doc = json.loads((run / "router.json").read_text())
    template = doc["template"]
    dtype = DTYPES[load_config(run / "config.toml").model.dtype]
    model, tok = load_base(doc["base_model"], dtype=dtype, device=device)
    peft_names = {name: name.replace("/", "_").replace("@", "_") for name in doc["adapters"]}
    first, *rest = sorted(doc["adapters"])
    model = PeftModel.from_pretrained(model, run / doc["adapters"][first], adapter_name=peft_names[first])
    for name in rest:
        model.load_adapter(run / doc["adapters"][name], adapter_name=peft_names[name])
    model.eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    def completions(req: PlainRequest) -> dict:  # a plain def: FastAPI runs it in its thread pool
        ids = tok(render(template, req.prompt), add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        with lock, torch.inference_mode():
            model.set_adapter(peft_names[req.model])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=req.max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        return {"choices": [{"index": 0, "text": tok.decode(new, skip_special_tokens=True), "finish_reason": "stop"}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": len(new)}}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ----------------------------------------------------------------- servers as subprocesses
def child_env() -> dict[str, str]:
    """The caller's environment with src/ first on PYTHONPATH. The caller's entries stay (packages may be
    found only through them), made absolute: a child may run in another folder."""
    given = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths = dict.fromkeys(os.path.abspath(p) for p in [str(ROOT / "src"), *given])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "FLWR_TELEMETRY_ENABLED": "0"}


class Server:
    def __init__(self, label: str, command: list[str], port: int):
        self.label, self.url = label, f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(command, env=child_env(), stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600.0) -> None:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"{self.label} server exited:\n{self.log.read().decode()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.label} server did not come up within {timeout:.0f} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ----------------------------------------------------------------- load
async def level(url: str, n: int, prompts: list[tuple[str, str]], n_requests: int, max_tokens: int,
                budget_s: float, named: bool) -> dict:
    """N closed-loop clients; returns requests/s, new tokens/s, latency percentiles."""
    import httpx
    import numpy as np

    todo = iter(range(n_requests))
    latencies: list[float] = []
    tokens = 0
    start = time.perf_counter()

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in todo:
            if time.perf_counter() - start > budget_s:
                return
            instruction, adapter = prompts[i % len(prompts)]
            body = {"model": adapter if named else "auto", "prompt": instruction, "max_tokens": max_tokens,
                    "temperature": 0}
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/completions", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=n + 4)) as http:
        await asyncio.gather(*(client(http) for _ in range(n)))
    wall = time.perf_counter() - start
    lat = np.asarray(latencies)
    return {"clients": n, "requests": len(latencies), "seconds": wall, "tokens": tokens,
            "req_s": len(latencies) / wall, "tok_s": tokens / wall,
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95))}


def routed_adapters(url: str, instructions: list[str]) -> list[str]:
    """The adapter taskfed's router picks for each input (max_tokens 1: also warms the server up)."""
    import httpx

    out = []
    for text in instructions:
        r = httpx.post(url + "/v1/completions", json={"model": "auto", "prompt": text, "max_tokens": 1}, timeout=600)
        r.raise_for_status()
        out.append(r.json()["taskfed"]["adapters"][0])
    return out


# ----------------------------------------------------------------- workload and run folder
def build_run(args) -> Path:
    run = Path(args.run)
    if (run / "router.json").exists():
        return run
    # FedRouter under task interference: 8 clients x 2 FLAN tasks, 8 global clusters (one adapter each, all
    # trained: schedule "all"), the router at embed_layers 4. Throughput does not depend on how well trained
    # the adapters are, so one short round. Built on --device; on cuda in bfloat16, the dtype every server
    # then loads the model in (taskfed serve takes the run's).
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    print(f"building the run folder {run} (FedRouter dual, 8 FLAN tasks, {'--smoke' if args.small else '1 round'}, "
          f"{args.device}, {dtype})", flush=True)
    budget = ["--smoke"] if args.small else ["--set", "train.rounds=1", "--set", "train.steps=1", "--set", "train.batch=4",
                                             "--set", "eval.max_rows_per_task=1", "--set", "eval.modes=['local']"]
    subprocess.run([*CLI, "run", str(ROOT / "configs" / "fedrouter-dual.toml"), "--out", str(run),
                    "--set", f"data.path={FLAN}", "--set", "method.schedule=all",
                    "--set", f"method.embed_layers={1 if args.small else 4}",  # the tiny model has 2 layers
                    "--set", f"model.device={args.device}", "--set", f"model.dtype={dtype}",
                    *budget], check=True, env=child_env(), cwd=ROOT)
    return run


def instructions(run: Path, n: int, max_prompt_tokens: int) -> list[str]:
    """FLAN test instructions, round-robin over the tasks, whose rendered prompt fits `max_prompt_tokens`."""
    from taskfed.config import load_config
    from taskfed.data.loaders import load_feddpa
    from taskfed.data.prompts import render
    from taskfed.model.loading import load_base

    cfg = load_config(run / "config.toml")
    tok = load_base(cfg.model.name)[1]
    _, test = load_feddpa(FLAN)
    by_task: dict[str, list[str]] = {}
    for r in test:
        if len(tok(render(cfg.data.template, r.instruction), add_special_tokens=False)["input_ids"]) <= max_prompt_tokens:
            by_task.setdefault(r.task, []).append(r.instruction)
    tasks = sorted(by_task)
    return [by_task[tasks[i % len(tasks)]][i // len(tasks) % len(by_task[tasks[i % len(tasks)]])] for i in range(n)]


def device(value: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"{value!r}: expected cpu, cuda or cuda:N")
    return value


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="run folder to serve (default: runs/serve-bench/fedrouter[-small][-bf16], built if missing)")
    ap.add_argument("--small", action="store_true", help="tiny model and a smoke run: a check of the script")
    ap.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N: where every server puts the model")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, help="requests per level (default max(8, 2 x clients))")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-prompt-tokens", type=int, default=192)
    ap.add_argument("--max-batch", type=int, default=64, help="taskfed serve --max-batch for the batched server")
    ap.add_argument("--budget-s", type=float, default=300.0, help="no new request after this many seconds of a level")
    ap.add_argument("--servers", nargs="+", default=["batched", "one-at-a-time", "plain-peft"],
                    choices=["batched", "one-at-a-time", "plain-peft"])
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--plain-server", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # A run folder per dtype: one built for the cpu (float32) is not reused for cuda (bfloat16).
    name = "fedrouter" + ("-small" if args.small else "") + ("-bf16" if args.device.startswith("cuda") else "")
    args.run = args.run or str(ROOT / "runs" / "serve-bench" / name)
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.plain_server:
        return plain_server(Path(args.plain_server), args.port, args.device)
    import torch

    from taskfed.config import load_config
    from taskfed.flower.local import free_port

    run = build_run(args)
    doc = json.loads((run / "router.json").read_text())
    texts = instructions(run, max(args.concurrency) * 2, args.max_prompt_tokens)
    cpu = f"{os.cpu_count()} cores (torch threads {torch.get_num_threads()})"
    where = f"{args.device} ({torch.cuda.get_device_name(args.device)}), {cpu}" if args.device != "cpu" else f"CPU, {cpu}"
    print(f"serving {run} ({doc['method']}, {doc['base_model']}, {len(doc['adapters'])} adapters, "
          f"{load_config(run / 'config.toml').model.dtype}) on {where}; {len(texts)} distinct prompts, "
          f"max_tokens {args.max_tokens}, greedy", flush=True)
    serve = [*CLI, "serve", str(run), "--max-queue", "4096", "--timeout", "3600",
             "--max-tokens", str(max(args.max_tokens, 16)), "--device", args.device]
    commands = {"batched": serve + ["--max-batch", str(args.max_batch)], "one-at-a-time": serve + ["--max-batch", "1"],
                "plain-peft": [sys.executable, __file__, "--plain-server", str(run), "--device", args.device]}
    results: dict[str, list[dict]] = {}
    prompts: list[tuple[str, str]] | None = None
    order = sorted(args.servers, key=lambda s: s == "plain-peft")  # a taskfed server first: it names the adapters
    for label in order:
        port = free_port()
        server = Server(label, commands[label] + ["--port", str(port)], port)
        try:
            server.wait_ready()
            if prompts is None:
                if label == "plain-peft":
                    raise SystemExit("plain-peft needs a taskfed server in --servers to learn the routed adapters")
                prompts = list(zip(texts, routed_adapters(server.url, texts)))
            elif label != "plain-peft":
                routed_adapters(server.url, texts[:2])  # warm-up, outside the measurement
            else:
                asyncio.run(level(server.url, 1, prompts[:2], 2, 2, args.budget_s, named=True))
            results[label] = []
            for n in args.concurrency:
                n_req = args.requests or max(8, 2 * n)
                r = asyncio.run(level(server.url, n, prompts, n_req, args.max_tokens, args.budget_s,
                                      named=label == "plain-peft"))
                results[label].append(r)
                print(f"{label:14} {n:3d} clients: {r['requests']:4d} requests in {r['seconds']:7.1f} s  "
                      f"{r['req_s']:7.2f} req/s  {r['tok_s']:8.1f} tok/s  p50 {r['p50_s']:6.2f} s  "
                      f"p95 {r['p95_s']:6.2f} s", flush=True)
        finally:
            server.stop()
    if "batched" in results:
        print(f"\n{'clients':>8} " + " ".join(f"{'batched/' + o:>26}" for o in order if o != "batched"))
        for i, n in enumerate(args.concurrency):
            cells = []
            for other in (o for o in order if o != "batched"):
                ratio = results["batched"][i]["tok_s"] / results[other][i]["tok_s"]
                cells.append(f"{ratio:25.2f}x")
            print(f"{n:8d} " + " ".join(cells))
        if 16 in args.concurrency:
            i = args.concurrency.index(16)
            for other in (o for o in order if o != "batched"):
                ratio = results["batched"][i]["tok_s"] / results[other][i]["tok_s"]
                print(f"target at 16 clients, >= 3x the tokens/s of {other}: {ratio:.2f}x, "
                      f"{'met' if ratio >= 3 else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run), "results": results}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
