"""The HTTP API (FastAPI): OpenAI's completions and chat completions, models, health, reload, the page.

Request and response bodies follow OpenAI's schema; what taskfed adds travels under `taskfed`: in a request,
`{"mix": {adapter: weight, ...}, "raw": bool}` (raw: the prompt is sent to the model as it is, without the
run's prompt template); in every answer, the routing decision (run.py's Decision). Decoding is greedy
at `temperature` 0 or absent (absent means 0 here, not OpenAI's 1: the runs are evaluated greedily), else
sampled (`temperature` up to 2, `top_p`, `seed`: the same seed draws the same answer); `n` must be 1.

Chat: the model was fine-tuned on single instructions with the run's template, so a conversation is served
as one instruction: the messages' contents joined by blank lines, in order.

Every bad request gets a 4xx with OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`,
naming the field; nothing a client sends can take the batcher down (it runs apart, batcher.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import queue
import secrets
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from taskfed.errors import TaskfedError
from taskfed.evaluation.generate import GREEDY, Sampling
from taskfed.serve.batcher import Batcher, Ticket
from taskfed.serve.run import BadRequest, ServedRun


@dataclass
class Limits:
    api_key: str | None = None
    max_tokens: int = 256  # the cap on a request's max_tokens (and its default when absent: 16, as OpenAI)
    max_body: int = 1 << 20  # bytes
    timeout: float = 120.0  # seconds per request, queueing included
    max_stop: int = 4


class TaskfedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mix: dict[str, Any] | None = None
    raw: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore (user, top_p, ...)
    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    seed: StrictInt | None = None
    n: StrictInt = 1
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    taskfed: TaskfedOptions | None = None


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictStr]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class Served:
    """What the app serves: the batcher (with the model) and the current run, swapped by reload."""

    def __init__(self, batcher: Batcher, run: ServedRun, limits: Limits):
        self.batcher, self.run, self.limits = batcher, run, limits
        self.tokenizer = batcher.rt.tokenizer
        self.context = int(getattr(batcher.rt.model.config, "max_position_embeddings", 2048))
        self.reloading = asyncio.Lock()


def build_app(served: Served) -> FastAPI:
    app = FastAPI(title="taskfed serve", docs_url=None, redoc_url=None, openapi_url=None)
    lim = served.limits

    @app.middleware("http")
    async def guard(request: Request, call_next):
        open_paths = ("/", "/health")
        if lim.api_key and request.url.path not in open_paths:
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), lim.api_key.encode()):
                return error(401, "missing or wrong API key (send Authorization: Bearer <key>).", code="invalid_api_key",
                             kind="authentication_error")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > lim.max_body):
            return error(413, f"request body larger than {lim.max_body} bytes.")
        return await call_next(request)

    async def body_of(request: Request) -> Any:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > lim.max_body:
                raise BadRequest(f"request body larger than {lim.max_body} bytes.", None, "body_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not valid JSON ({exc}).") from None

    def parse(model: type[BaseModel], raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise BadRequest("the body must be a JSON object.")
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            raise BadRequest(f"{where}: {first['msg']}" if where else first["msg"], where) from None

    def check(req: _Common) -> tuple[int, list[str], Sampling]:
        if req.n != 1:
            raise BadRequest("n: only 1 choice per request is served.", "n")
        temperature = 0.0 if req.temperature is None else float(req.temperature)
        if not (math.isfinite(temperature) and 0 <= temperature <= 2):
            raise BadRequest("temperature: must be between 0 (greedy) and 2.", "temperature")
        top_p = 1.0 if req.top_p is None else float(req.top_p)
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise BadRequest("top_p: must be in (0, 1].", "top_p")
        if req.seed is not None and not 0 <= req.seed < 2 ** 63:
            raise BadRequest("seed: must be between 0 and 2**63 - 1.", "seed")
        # Without a seed, a fresh one per sampled request (OpenAI's behaviour): answers differ run to run.
        sampling = GREEDY if temperature == 0 else Sampling(
            temperature, top_p, req.seed if req.seed is not None else secrets.randbits(63))
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if not 1 <= max_tokens <= lim.max_tokens:
            raise BadRequest(f"max_tokens: must be between 1 and {lim.max_tokens}.", "max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > lim.max_stop or any(not s for s in stop):
            raise BadRequest(f"stop: at most {lim.max_stop} non-empty strings.", "stop")
        return max_tokens, stop, sampling

    async def answer(request: Request, chat: bool) -> Response:
        try:
            req = parse(ChatRequest if chat else CompletionRequest, await body_of(request))
            max_tokens, stop, sampling = check(req)
            if chat:
                instruction = "\n\n".join(m.content for m in req.messages)
            else:
                prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
                if len(prompts) != 1:
                    raise BadRequest("prompt: one prompt per request (send several requests: they are batched).", "prompt")
                instruction = prompts[0]
            run = served.run
            opts = req.taskfed or TaskfedOptions()
            ask = run.ask(req.model, opts.mix)
            text = instruction if opts.raw else run.prompt(instruction)
            ids = served.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise BadRequest("prompt: empty.", "messages" if chat else "prompt")
            if len(ids) + max_tokens > served.context:
                raise BadRequest(f"{'messages' if chat else 'prompt'}: {len(ids)} prompt tokens + max_tokens {max_tokens} "
                                 f"exceed the model's context of {served.context} tokens.",
                                 "messages" if chat else "prompt", "context_length_exceeded")
        except BadRequest as exc:
            return error(400, str(exc), exc.param, exc.code)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        ticket = Ticket(run=run, ask=ask, instruction=instruction, prompt=ids, max_tokens=max_tokens, sampling=sampling,
                        emit=lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)))
        try:
            served.batcher.submit(ticket)
        except queue.Full:
            return error(429, "the server's queue is full; retry shortly.", code="queue_full", kind="rate_limit_exceeded")
        reply = Reply(served, run, req, chat, ticket, events, stop, len(ids), time.monotonic() + lim.timeout)
        if req.stream:
            return StreamingResponse(reply.sse(request), media_type="text/event-stream")
        return await reply.whole()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await answer(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict:
        run = served.run
        parent = run.doc["base_model"]
        now = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": now, "owned_by": "taskfed",
                                            "parent": None if name == "base" else parent, "root": parent}
                                           for name in run.model_names()]}

    @app.get("/health")
    async def health() -> dict:
        run = served.run
        return {"status": "ok", "run": run.id, "round": run.rounds, "method": run.method, "folder": str(run.folder),
                **served.batcher.snapshot()}

    @app.post("/v1/reload")
    async def reload(request: Request) -> Response:
        try:
            raw = await body_of(request)
            folder = raw.get("run_dir") if isinstance(raw, dict) else None
            if not isinstance(folder, str) or not folder:
                raise BadRequest("run_dir: the run folder to serve, as a string.", "run_dir")
        except BadRequest as exc:
            return error(400, str(exc), exc.param, exc.code)
        async with served.reloading:
            old = served.run
            try:
                new = await asyncio.to_thread(ServedRun, Path(folder), old.shapes, old.max_distance, old.fallback, old.hidden)
            except TaskfedError as exc:
                return error(400, str(exc), "run_dir")
            if not new.same_base(old):
                return error(400, f"run_dir: {folder} was trained on another base model or LoRA shape than the served "
                                  f"run; start a new server for it.", "run_dir")
            await asyncio.to_thread(served.batcher.install, new)
            served.run = new  # requests already queued or running keep the run they started on
        return JSONResponse({"reloaded": str(new.folder), "run": new.id, "round": new.rounds,
                             "models": new.model_names()})

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("taskfed.serve").joinpath("page.html").read_text())

    return app


class Reply:
    """One request's answer, from the batcher's events: collected whole, or streamed as server-sent events."""

    def __init__(self, served: Served, run: ServedRun, req: _Common, chat: bool, ticket: Ticket,
                 events: asyncio.Queue, stop: list[str], n_prompt: int, deadline: float):
        self.served, self.run, self.req, self.chat, self.ticket = served, run, req, chat, ticket
        self.events, self.stop, self.n_prompt, self.deadline = events, stop, n_prompt, deadline
        self.tokens: list[int] = []
        self.decision = None
        self.finish: str | None = None
        self.text = ""
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    async def next_event(self) -> tuple[str, Any]:
        left = self.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(self.events.get(), max(left, 0.001))
        except asyncio.TimeoutError:
            self.ticket.cancelled.set()
            return "timeout", None

    async def advance(self) -> str | None:
        """Takes one event; returns None, or what ended the request ('stop', 'length', 'timeout', 'error: ...')."""
        kind, value = await self.next_event()
        if kind == "decision":
            self.decision = value
        elif kind == "token":
            self.tokens.append(value)
            self.text = self.served.tokenizer.decode(self.tokens, skip_special_tokens=True)
            cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:  # a stop string: the text ends before it, the row leaves the batch
                self.text = self.text[:cut]
                self.ticket.cancelled.set()
                return "stop"
        elif kind == "done":
            return value
        elif kind == "timeout":
            return "timeout"
        elif kind == "error":
            return f"error: {value}"
        return None

    def extras(self) -> dict:
        return self.decision.public(self.run) if self.decision is not None else {"run": self.run.id, "round": self.run.rounds}

    def usage(self) -> dict:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": len(self.tokens),
                "total_tokens": self.n_prompt + len(self.tokens)}

    async def whole(self) -> Response:
        end = None
        while end is None:
            end = await self.advance()
        if end == "timeout":
            return error(504, f"the request did not finish within {self.served.limits.timeout:g} s.", code="timeout",
                         kind="timeout_error")
        if end.startswith("error"):
            return error(500, end, kind="server_error")
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text}, "finish_reason": end,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": self.text, "finish_reason": end, "logprobs": None}
        return JSONResponse({"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                             "created": self.created, "model": self.req.model, "choices": [choice],
                             "usage": self.usage(), "taskfed": self.extras()})

    def chunk(self, delta: str, finish: str | None, first: bool = False) -> str:
        if self.chat:  # OpenAI's shape: the role first, then content deltas, then an empty delta with the reason
            d = {"role": "assistant", "content": ""} if first else {} if finish is not None else {"content": delta}
            choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.req.model, "choices": [choice]}
        if first or finish is not None:
            body["taskfed"] = self.extras()
        return f"data: {json.dumps(body)}\n\n"

    def held_back(self) -> int:
        """How many trailing characters of the text could still turn out to be the start of a stop string, or
        part of a character not fully decoded yet (a byte-level tokenizer's U+FFFD), so they wait."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        tail = len(self.text) - len(self.text.rstrip("\ufffd"))
        return max(hold, tail)

    async def sse(self, request: Request) -> AsyncIterator[str]:
        sent = 0
        first = True
        try:
            while True:
                end = await self.advance()
                if self.decision is not None and first:
                    yield self.chunk("", None, first=True)
                    first = False
                if end is not None:
                    break
                ready = len(self.text) - self.held_back()
                if ready > sent:
                    yield self.chunk(self.text[sent:ready], None)
                    sent = ready
                if await request.is_disconnected():
                    self.ticket.cancelled.set()
                    return
            if end == "timeout" or end.startswith("error"):
                message = f"the request did not finish within {self.served.limits.timeout:g} s." if end == "timeout" else end
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
            else:
                if len(self.text) > sent:
                    yield self.chunk(self.text[sent:], None)
                yield self.chunk("", end)
                if (self.req.stream_options or {}).get("include_usage"):
                    body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                            "created": self.created, "model": self.req.model, "choices": [], "usage": self.usage()}
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.ticket.cancelled.set()  # a client that went away mid-stream frees its row


def build_server(run: ServedRun, rt, *, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
                 max_batch: int = 32, max_queue: int = 256, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None):
    """A uvicorn server for `run` on the loaded runtime `rt` (its adapters go into rt's bank), and its batcher."""
    import uvicorn

    run.check_shapes(rt.bank.shapes(), int(rt.model.config.hidden_size))
    batcher = Batcher(rt, run, max_batch=max_batch, max_queue=max_queue)
    app = build_app(Served(batcher, run, limits or Limits()))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", ssl_certfile=ssl_certfile,
                            ssl_keyfile=ssl_keyfile, timeout_graceful_shutdown=5)
    return uvicorn.Server(config), batcher


def serve(folder: Path, *, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          max_batch: int = 32, max_queue: int = 256, max_distance: float | None = None, fallback: str = "base",
          device: str | None = None, ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
          log=lambda s: None) -> None:
    """Loads the run (base model once, every adapter into the bank) and serves it until interrupted."""
    from taskfed.runtime import Runtime

    run = ServedRun(folder, None, max_distance, fallback)  # the run folder checked before the model loads
    cfg = run.cfg if device is None else run.cfg.model_copy(update={"model": run.cfg.model.model_copy(update={"device": device})})
    log(f"loading {cfg.model.name} and {len(run.adapters)} adapters of {folder}")
    server, batcher = build_server(run, Runtime(cfg), host=host, port=port, limits=limits, max_batch=max_batch,
                                   max_queue=max_queue, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    log(f"serving {run.method} run {run.id} ({', '.join(run.model_names())}) on "
        f"{'https' if ssl_certfile else 'http'}://{host}:{port}")
    try:
        server.run()
    finally:
        batcher.close()
