"""The HTTP API (FastAPI): OpenAI's completions and chat completions, models, health, reload, the page.

Request and response bodies follow OpenAI's schema; what taskfed adds travels under `taskfed`: in a request,
`{"mix": {adapter: weight, ...}, "raw": bool}` (raw: the prompt is sent to the model as it is, without the
run's prompt template); in every answer, the routing decision (run.py's Decision). Decoding is greedy
at `temperature` 0 or absent (absent means 0 here, not OpenAI's 1: the runs are evaluated greedily), else
sampled (`temperature` up to 2, `top_p`, `seed`: the same seed draws the same answer; choice i draws with
seed + i). A list of prompts and `n` > 1 are one ticket per choice in the batcher, so they decode together;
the answer's choices are in OpenAI's order (index = prompt * n + k), each with its own routing decision.

Chat: the model was fine-tuned on single instructions with the run's template, so a conversation is served
as one instruction: the messages' contents (a string, or a list of text parts) joined by blank lines, in
order; the router embeds the user's messages only (a system prompt says nothing about the task). Without
`max_tokens` (or `max_completion_tokens`) a chat answer may take the rest of the context, up to the
server's --max-tokens; a completion's default is 16 tokens, as OpenAI's. `echo` puts a completion's prompt
(as sent) before its text.

OpenAI parameters this server does not implement (`logprobs`, `tools`, `response_format`, the penalties, ...)
are accepted only at their do-nothing value, else refused with a 400 naming them: no answer pretends to
honour them; a parameter OpenAI does not have is refused too. Every error is OpenAI's error object,
`{"error": {"message", "type", "param", "code"}}`, naming the field where there is one: a bad body (even
one nested thousands deep, or with text that is not Unicode) is a 400, an unknown model or path a 404, a
body over --max-body a 413; a request still running when the server shuts down gets a 503 (or its stream
an error event). Nothing a client sends can take the batcher down (it runs apart, batcher.py).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import math
import queue
import re
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from taskfed.errors import TaskfedError
from taskfed.evaluation.generate import GREEDY, Sampling
from taskfed.serve.batcher import Batcher, Emit, Ticket
from taskfed.serve.run import BadRequest, ServedRun


@dataclass
class Limits:
    api_key: str | None = None
    max_tokens: int = 256  # the cap on a request's max_tokens, and a chat's default (a completion's: 16, as OpenAI)
    max_body: int = 1 << 20  # bytes
    timeout: float = 120.0  # seconds per request, queueing included
    max_stop: int = 4
    max_choices: int = 32  # prompts x n in one request


MAX_DEPTH = 32  # nesting of a request body; OpenAI's deepest field (messages.N.content.N.text) is at 5
COMPLETION_DEFAULT = 16  # OpenAI's completions default for max_tokens (its chat has none)

# OpenAI parameters this server does not implement, with the values that ask for nothing (what a client
# sends by default): any other value is refused, naming the parameter.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "best_of": (None, 1), "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "web_search_options": (None,), "reasoning_effort": (None,), "verbosity": (None,),
}
# OpenAI parameters that change no answer: bookkeeping, or about tools (which are refused above).
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                     "parallel_tool_calls"})


class TaskfedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mix: dict[str, Any] | None = None
    raw: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # the extras are checked against NEUTRAL and IGNORED (`unsupported`)
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
    echo: StrictBool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, refusal, ...: only null (`unsupported`)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None  # OpenAI's participant name: not shown to the model

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name for a chat's max_tokens


def error_json(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> str:
    # json.dumps escapes what is not ASCII: a lone surrogate a client sent (in a name or path it echoes) cannot
    # fail the encoding of the error that names it.
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> Response:
    return Response(error_json(message, param, code, kind), status_code=status, media_type="application/json",
                    headers=headers)


class Refusal(BadRequest):
    """A bad request answered with another status than 400: 404 (an unknown model), 413 (a body too large)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param, code)
        self.status = status


def refused(exc: BadRequest) -> Response:
    return error(getattr(exc, "status", 400), str(exc), exc.param, exc.code)


# ------------------------------------------------------------------------- request bodies
def read_body(raw: bytes) -> Any:
    """A request body's JSON, refused (naming the field) where no handler could use it: not JSON, nested
    deeper than MAX_DEPTH, text that is not Unicode (a lone surrogate), a number that no float holds."""
    try:
        value = json.loads(raw)
    except RecursionError:  # deeper than Python's parser goes (about 1,000 levels)
        raise too_deep(deep_field(raw)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON ({exc}).") from None
    except ValueError:  # Python reads integers of at most sys.get_int_max_str_digits() digits
        raise BadRequest(f"the body holds an integer of more than {sys.get_int_max_str_digits()} digits.") from None
    check_values(value)
    return value


def too_deep(field: str | None) -> BadRequest:
    return BadRequest(f"{field or 'the body'}: nested more than {MAX_DEPTH} levels deep.", field)


def check_values(body: Any) -> None:
    """Every string (key or value) of `body` is Unicode the tokenizer can encode and every number is finite
    and within a float's range, so no field's own check meets what Python cannot compute with."""
    todo: list[tuple[Any, tuple]] = [(body, ())]
    while todo:  # a loop, not recursion: depth is what is being checked
        value, path = todo.pop()
        if len(path) > MAX_DEPTH:
            raise too_deep(str(path[0]))
        where = ".".join(str(p) for p in path) or None
        if isinstance(value, dict):
            for key, item in value.items():
                if lone_surrogate(key) is not None:
                    raise BadRequest(f"{where or 'the body'}: a key is not valid Unicode (a lone surrogate).", where)
                todo.append((item, (*path, key)))
        elif isinstance(value, list):
            todo.extend((item, (*path, i)) for i, item in enumerate(value))
        elif isinstance(value, str) and (at := lone_surrogate(value)) is not None:
            raise BadRequest(f"{where or 'the body'}: not valid Unicode (a lone surrogate at character {at}).", where)
        elif isinstance(value, float) and not math.isfinite(value) or (
                isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max):
            raise BadRequest(f"{where or 'the body'}: numbers must be finite, within +-{sys.float_info.max:.1e}.", where)


def lone_surrogate(text: str) -> int | None:
    """Where `text` holds a lone UTF-16 surrogate (JSON's "\\ud800" escape allows one), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"(\s*:)?|[\[\]{}]')


def deep_field(raw: bytes) -> str | None:
    """The top-level field under which a body too deep for the JSON parser nests past MAX_DEPTH (None: the
    body itself), found by counting brackets outside strings."""
    depth, field = 0, None
    for m in _JSON_TOKEN.finditer(raw):
        token = m.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                return field
        elif token in (b"]", b"}"):
            depth -= 1
        elif m.group(1) and depth == 1:
            try:
                field = json.loads(token[:token.rindex(b'"') + 1])
            except ValueError:
                field = None
    return field


_UNION_TAG = re.compile(r"str|int|float|bool|list\[.*\]|dict\[.*\]")  # pydantic's names of a union's members


def parse(model: type[BaseModel], raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise BadRequest("the body must be a JSON object.")
    try:
        req = model.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        field = errors[0]["loc"][:1]  # the first field in error; of its union's members, the one that got furthest
        first = max((e for e in errors if e["loc"][:1] == field), key=lambda e: len(e["loc"]))
        where = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and _UNION_TAG.fullmatch(p))) or None
        raise BadRequest(f"{where}: {first['msg']}" if where else first["msg"], where) from None
    unsupported(req)
    return req


def unsupported(req: _Common) -> None:
    """Refuses the fields pydantic let through as extras unless they ask for nothing (NEUTRAL) or change no
    answer (IGNORED), so that no answer pretends to honour a parameter it ignored."""
    for name, value in (req.model_extra or {}).items():
        if name in IGNORED or any(type(value) is type(v) and value == v for v in NEUTRAL.get(name, ())):
            continue
        if name in NEUTRAL:
            raise BadRequest(f"{name}: not supported by this server; leave it out.", name, "unsupported_parameter")
        raise BadRequest(f"{name}: not a parameter of this endpoint.", name, "unknown_parameter")
    for i, m in enumerate(getattr(req, "messages", [])):
        for name, value in (m.model_extra or {}).items():
            if value is not None:
                raise BadRequest(f"messages.{i}.{name}: not supported by this server; leave it out.",
                                 f"messages.{i}.{name}", "unsupported_parameter")


def inputs(req: _Common, chat: bool) -> list[tuple[str, str, str]]:
    """Per prompt: (what the model is asked, what the router embeds, what `echo` puts before the answer)."""
    if chat:
        whole = "\n\n".join(m.text() for m in req.messages)
        users = [m.text() for m in req.messages if m.role == "user"]
        return [(whole, "\n\n".join(users) if users else whole, "")]
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts:
        raise BadRequest("prompt: an empty list.", "prompt")
    return [(p, p, p if req.echo else "") for p in prompts]


def samplings(req: _Common, count: int) -> list[Sampling]:
    """One Sampling per choice (each holds its own generator): choice i with seed + i."""
    temperature = 0.0 if req.temperature is None else float(req.temperature)  # check_values: within float range
    if not 0 <= temperature <= 2:
        raise BadRequest("temperature: must be between 0 (greedy) and 2.", "temperature")
    top_p = 1.0 if req.top_p is None else float(req.top_p)
    if not 0 < top_p <= 1:
        raise BadRequest("top_p: must be in (0, 1].", "top_p")
    if req.seed is not None and not 0 <= req.seed < 2 ** 63:
        raise BadRequest("seed: must be between 0 and 2**63 - 1.", "seed")
    if temperature == 0:
        return [GREEDY] * count
    # Without a seed, a fresh one per sampled request (OpenAI's behaviour): answers differ run to run.
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    return [Sampling(temperature, top_p, (seed + i) % 2 ** 63) for i in range(count)]


def emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int, cancelled: threading.Event) -> Emit:
    """Hands choice `index`'s events from the batcher's thread to the request's queue. Once the request's
    event loop has closed (the server shut down) nobody waits for them: the row is cancelled, where calling
    into the closed loop would raise in the batcher's thread."""
    def emit(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, (index, kind, value))
        except RuntimeError:  # "Event loop is closed"
            cancelled.set()
    return emit


# ------------------------------------------------------------------------- the app
class Served:
    """What the app serves: the batcher (with the model) and the current run, swapped by reload."""

    def __init__(self, batcher: Batcher, run: ServedRun, limits: Limits):
        self.batcher, self.run, self.limits = batcher, run, limits
        self.tokenizer = batcher.rt.tokenizer
        self.context = int(getattr(batcher.rt.model.config, "max_position_embeddings", 2048))
        self.reloading = asyncio.Lock()


def model_card(run: ServedRun, name: str, created: int) -> dict:
    parent = run.doc["base_model"]
    card = {"id": name, "object": "model", "created": created, "owned_by": "taskfed",
            "parent": None if name == "base" else parent, "root": parent}
    if name in run.serves:  # a cluster adapter: the tasks (training rows) it was built from
        card["taskfed"] = {"serves": run.serves[name]}
    return card


def build_app(served: Served) -> FastAPI:
    app = FastAPI(title="taskfed serve", docs_url=None, redoc_url=None, openapi_url=None)
    lim = served.limits

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        what = f"{request.method} {request.url.path}"
        message, code = {404: (f"{what}: no such endpoint.", "not_found"),
                         405: (f"{what}: method not allowed here.", "method_not_allowed")}.get(
                             exc.status_code, (f"{what}: {exc.detail}", None))
        return error(exc.status_code, message, code=code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:  # a bug: still OpenAI's shape (and logged)
        return error(500, f"internal error ({type(exc).__name__}); the server's log has the details.",
                     kind="server_error")

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
        if length is not None and not length.isdigit():
            return error(400, "Content-Length: not a byte count.", code="invalid_content_length")
        if length is not None and int(length) > lim.max_body:
            return refused(too_large())
        return await call_next(request)

    app.add_middleware(AnswerOnShutdown)  # added last: the outermost layer, around the guard too

    def too_large() -> Refusal:
        return Refusal(413, f"request body larger than {lim.max_body} bytes.", None, "body_too_large")

    async def body_of(request: Request) -> Any:
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body has no Content-Length for the guard to check
            size += len(chunk)
            if size > lim.max_body:
                raise too_large()
            chunks.append(chunk)
        return read_body(b"".join(chunks))

    def max_tokens_of(req: _Common, chat: bool) -> int | None:
        """The max_tokens asked for (chat: or max_completion_tokens), checked; None when not given."""
        asked, field = req.max_tokens, "max_tokens"
        if chat and req.max_completion_tokens is not None:
            if asked is not None and asked != req.max_completion_tokens:
                raise BadRequest("max_completion_tokens: differs from max_tokens; send one of them.", "max_completion_tokens")
            asked, field = req.max_completion_tokens, "max_completion_tokens"
        if asked is not None and not 1 <= asked <= lim.max_tokens:
            raise BadRequest(f"{field}: must be between 1 and {lim.max_tokens}.", field)
        return asked

    def stops_of(req: _Common) -> list[str]:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > lim.max_stop or any(not s for s in stop):
            raise BadRequest(f"stop: at most {lim.max_stop} non-empty strings.", "stop")
        return stop

    def ask_of(run: ServedRun, req: _Common, opts: TaskfedOptions):
        try:
            return run.ask(req.model, opts.mix)
        except BadRequest as exc:  # a name /v1/models does not list is a 404 (the openai client's NotFoundError)
            if exc.param == "model" and opts.mix is None and req.model not in run.model_names():
                raise Refusal(404, str(exc), "model", "model_not_found") from None
            raise

    async def answer(request: Request, chat: bool) -> Response:
        field = "messages" if chat else "prompt"
        try:
            req = parse(ChatRequest if chat else CompletionRequest, await body_of(request))
            asked, stop = max_tokens_of(req, chat), stops_of(req)
            prompts = inputs(req, chat)
            if req.n < 1:
                raise BadRequest("n: must be at least 1.", "n")
            if len(prompts) * req.n > lim.max_choices:
                raise BadRequest(f"{'n' if req.n > 1 else field}: {len(prompts)} prompt(s) x n {req.n} choices; at most "
                                 f"{lim.max_choices} per request.", "n" if req.n > 1 else field)
            sampling = samplings(req, len(prompts) * req.n)
            run = served.run
            opts = req.taskfed or TaskfedOptions()
            ask = ask_of(run, req, opts)
            rows = []  # per prompt: (route text, echo text, prompt ids)
            for instruction, route, echo in prompts:
                text = instruction if opts.raw else run.prompt(instruction)
                ids = served.tokenizer(text, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise BadRequest(f"{field}: empty.", field)
                if ask.route and not served.tokenizer(route, add_special_tokens=False)["input_ids"]:
                    raise BadRequest(f"{field}: empty: the router has no text to choose an adapter by (name one as "
                                     f"`model`).", field)
                rows.append((route, echo, ids))
            longest = max(len(ids) for _, _, ids in rows)
            max_tokens = asked or (min(COMPLETION_DEFAULT, lim.max_tokens) if not chat else
                                   min(lim.max_tokens, served.context - longest))
            if longest + max(max_tokens, 1) > served.context:  # (a chat's default: no room left for a token)
                raise BadRequest(f"{field}: {longest} prompt tokens + max_tokens {max(max_tokens, 1)} exceed the model's "
                                 f"context of {served.context} tokens.", field, "context_length_exceeded")
        except BadRequest as exc:
            return refused(exc)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        tickets, prefixes = [], []
        for i, (route, echo, ids) in enumerate(r for r in rows for _ in range(req.n)):
            cancelled = threading.Event()
            tickets.append(Ticket(run=run, ask=ask, instruction=route, prompt=ids, max_tokens=max_tokens,
                                  sampling=sampling[i], cancelled=cancelled, emit=emitter(loop, events, i, cancelled)))
            prefixes.append(echo)
        try:
            for t in tickets:
                served.batcher.submit(t)
        except queue.Full:
            for t in tickets:  # none of the request's choices decodes for an answer that is not sent
                t.cancelled.set()
            return error(429, "the server's queue is full; retry shortly.", code="queue_full", kind="rate_limit_exceeded")
        reply = Reply(served, run, req, chat, tickets, prefixes, events, stop, sum(len(ids) for _, _, ids in rows),
                      time.monotonic() + lim.timeout)
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
        run, now = served.run, int(time.time())
        return {"object": "list", "data": [model_card(run, name, now) for name in run.model_names()]}

    @app.get("/v1/models/{name:path}")  # names hold slashes: cluster/2
    async def model(name: str) -> Response:
        run = served.run
        if name not in run.model_names():
            return error(404, f"model '{name}' is not served here; GET /v1/models lists what is.", "model",
                         "model_not_found")
        return JSONResponse(model_card(run, name, int(time.time())))

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
            return refused(exc)
        async with served.reloading:
            old = served.run
            try:
                new = await asyncio.to_thread(ServedRun, Path(folder), old.shapes, old.max_distance, old.fallback,
                                              old.hidden, old.layers)
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


SHUTTING_DOWN = "the server shut down before the request finished; retry."


class AnswerOnShutdown:
    """ASGI layer: uvicorn cancels the requests still running when its graceful shutdown times out, and logs
    each CancelledError as a traceback ("Exception in ASGI application") with a plain-text 500; this answers
    them instead, a 503 in OpenAI's shape or, for a stream under way, an error event and [DONE]. Their rows
    leave the batch (Reply cancels its tickets however it ends)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent: dict[str, Any] = {"start": None, "end": False}

        async def tracked(message) -> None:
            if message["type"] == "http.response.start":
                sent["start"] = message
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["end"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:  # only shutdown cancels a request's task (a client leaving does not)
            if not sent["end"]:
                await self.farewell(send, sent["start"])

    @staticmethod
    async def farewell(send, start: dict | None) -> None:
        body = error_json(SHUTTING_DOWN, None, "server_shutting_down", "server_error").encode()
        if start is None:
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        elif dict(start.get("headers", [])).get(b"content-type", b"").startswith(b"text/event-stream"):
            body = b"data: " + body + b"\n\ndata: [DONE]\n\n"
        else:  # a whole answer half sent: nothing sensible to add
            body = b""
        await send({"type": "http.response.body", "body": body, "more_body": False})


@functools.cache
def http_protocol() -> type:
    """uvicorn's HTTP protocol (httptools where installed, else h11), answering a request it cannot parse (a
    malformed Content-Length, request line or header) with OpenAI's error object instead of plain text; for
    uvicorn.Config(http=...)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class OpenAIErrorsProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def send_400_response(self, msg: str) -> None:
            body = error_json(f"{msg.rstrip('.')}: the request line or a header (such as Content-Length) is malformed.",
                              None, "invalid_http_request").encode()
            head = b"".join(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\n" + head + b"content-type: application/json\r\n"
                                 b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
            self.transport.close()

    return OpenAIErrorsProtocol


class Choice:
    """One choice of an answer (one ticket in the batcher), from its events."""

    def __init__(self, index: int, ticket: Ticket, prefix: str):
        self.index, self.ticket, self.prefix = index, ticket, prefix
        self.tokens: list[int] = []
        self.text = ""
        self.decision = None
        self.end: str | None = None  # 'stop' | 'length' | 'error: ...'
        self.sent = 0  # characters of `text` streamed
        self.opened = self.closed = False  # its first / last chunk streamed


class Reply:
    """One request's answer, from its choices' events: collected whole, or streamed as server-sent events."""

    def __init__(self, served: Served, run: ServedRun, req: _Common, chat: bool, tickets: list[Ticket],
                 prefixes: list[str], events: asyncio.Queue, stop: list[str], n_prompt: int, deadline: float):
        self.served, self.run, self.req, self.chat = served, run, req, chat
        self.choices = [Choice(i, t, p) for i, (t, p) in enumerate(zip(tickets, prefixes))]
        self.events, self.stop, self.n_prompt, self.deadline = events, stop, n_prompt, deadline
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def cancel(self) -> None:
        for c in self.choices:
            c.ticket.cancelled.set()

    def done(self) -> bool:
        return all(c.end is not None for c in self.choices)

    async def advance(self) -> Choice | None:
        """Takes one event into its choice and returns the choice; None when the request's time is up."""
        try:
            index, kind, value = await asyncio.wait_for(self.events.get(), max(self.deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            self.cancel()
            return None
        c = self.choices[index]
        if c.end is not None:  # a row cut by a stop string may still send its step's token
            return c
        if kind == "decision":
            c.decision = value
        elif kind == "token":
            c.tokens.append(value)
            c.text = self.served.tokenizer.decode(c.tokens, skip_special_tokens=True)
            cut = min((i for i in (c.text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:  # a stop string: the text ends before it, the row leaves the batch
                c.text = c.text[:cut]
                c.ticket.cancelled.set()
                c.end = "stop"
        elif kind == "done":
            c.end = value
        elif kind == "error":
            c.end = f"error: {value}"
        return c

    def timed_out(self) -> str:
        return f"the request did not finish within {self.served.limits.timeout:g} s."

    def extras(self, c: Choice) -> dict:
        return c.decision.public(self.run) if c.decision is not None else {"run": self.run.id, "round": self.run.rounds}

    def usage(self) -> dict:
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": self.n_prompt, "completion_tokens": completion, "total_tokens": self.n_prompt + completion}

    async def whole(self) -> Response:
        try:
            while not self.done():
                if await self.advance() is None:
                    return error(504, self.timed_out(), code="timeout", kind="timeout_error")
        finally:  # answered, timed out, or cancelled by a shutdown: no row decodes on for nobody
            self.cancel()
        failed = next((c.end for c in self.choices if c.end.startswith("error")), None)
        if failed:
            return error(500, failed, kind="server_error")
        return JSONResponse({"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                             "created": self.created, "model": self.req.model,
                             "choices": [self.choice(c) for c in self.choices], "usage": self.usage(),
                             "taskfed": self.extras(self.choices[0])})

    def choice(self, c: Choice) -> dict:
        text = c.prefix + c.text
        body = ({"index": c.index, "message": {"role": "assistant", "content": text}} if self.chat else
                {"index": c.index, "text": text})
        body.update(finish_reason=c.end, logprobs=None)
        if len(self.choices) > 1:  # each choice's own routing decision (the top level's is choice 0's)
            body["taskfed"] = self.extras(c)
        return body

    def chunk(self, c: Choice, delta: str, finish: str | None, first: bool = False) -> str:
        if self.chat:  # OpenAI's shape: the role first, then content deltas, then an empty delta with the reason
            d = {"role": "assistant", "content": ""} if first else {} if finish is not None else {"content": delta}
            choice = {"index": c.index, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": c.index, "text": delta, "finish_reason": finish, "logprobs": None}
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.req.model, "choices": [choice]}
        if first or finish is not None:
            body["taskfed"] = self.extras(c)
        return f"data: {json.dumps(body)}\n\n"

    def held_back(self, c: Choice) -> int:
        """How many trailing characters of the text could still turn out to be the start of a stop string, or
        part of a character not fully decoded yet (a byte-level tokenizer's U+FFFD), so they wait."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(c.text)), 0, -1):
                if c.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        tail = len(c.text) - len(c.text.rstrip("\ufffd"))
        return max(hold, tail)

    def stream_events(self, c: Choice) -> list[str]:
        """The chunks choice `c`'s latest event lets out."""
        out = []
        if c.decision is not None and not c.opened:
            c.opened = True
            out.append(self.chunk(c, c.prefix, None, first=True))  # echo: the prompt before the first token
        if c.closed:
            return out
        ready = len(c.text) - (self.held_back(c) if c.end is None else 0)
        if ready > c.sent:
            out.append(self.chunk(c, c.text[c.sent:ready], None))
            c.sent = ready
        if c.end is not None:
            c.closed = True
            out.append(self.chunk(c, "", c.end))
        return out

    async def sse(self, request: Request) -> AsyncIterator[str]:
        try:
            while not self.done():
                c = await self.advance()
                failed = self.timed_out() if c is None else c.end if c.end and c.end.startswith("error") else None
                if failed:
                    yield f"data: {error_json(failed, None, None, 'server_error')}\n\n"
                    break
                for event in self.stream_events(c):
                    yield event
                if await request.is_disconnected():
                    return
            else:
                if (self.req.stream_options or {}).get("include_usage"):
                    body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                            "created": self.created, "model": self.req.model, "choices": [], "usage": self.usage()}
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # a client that went away mid-stream frees its rows


def build_server(run: ServedRun, rt, *, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
                 max_batch: int = 32, max_queue: int = 256, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None):
    """A uvicorn server for `run` on the loaded runtime `rt` (its adapters go into rt's bank), and its batcher."""
    import uvicorn

    run.check_shapes(rt.bank.shapes(), int(rt.model.config.hidden_size), rt.n_layers)
    batcher = Batcher(rt, run, max_batch=max_batch, max_queue=max_queue)
    app = build_app(Served(batcher, run, limits or Limits()))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", ssl_certfile=ssl_certfile,
                            ssl_keyfile=ssl_keyfile, timeout_graceful_shutdown=5, http=http_protocol())
    return uvicorn.Server(config), batcher


def serve(folder: Path, *, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          max_batch: int = 32, max_queue: int = 256, max_distance: float | None = None, fallback: str = "base",
          device: str | None = None, ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
          log=lambda s: None) -> None:
    """Loads the run (base model once, every adapter into the bank) and serves it until interrupted. What can
    fail at start without the model (TLS files, the address, the run folder) is checked before it loads, and
    the sockets bound then are the ones served on: no port lost to another process while the model loads."""
    from taskfed.runtime import Runtime

    if ssl_certfile or ssl_keyfile:
        check_tls(ssl_certfile, ssl_keyfile)
    sockets = bind(host, port)
    try:
        run = ServedRun(folder, None, max_distance, fallback, log=log)
        cfg = run.cfg if device is None else run.cfg.model_copy(update={"model": run.cfg.model.model_copy(update={"device": device})})
        log(f"loading {cfg.model.name} and {len(run.adapters)} adapters of {folder}")
        server, batcher = build_server(run, Runtime(cfg), host=host, port=port, limits=limits, max_batch=max_batch,
                                       max_queue=max_queue, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    bound = sockets[0].getsockname()[1]  # --port 0: the port the system picked
    for name, tasks in run.serves.items():
        log(f"model {name}: built from {', '.join(f'{t} ({n})' for t, n in tasks.items())}")
    scale = run.distance_scale()
    if scale:
        log(f"router: centroid distances {scale} (a scale for --max-distance"
            f"{f', now {run.max_distance:g}' if run.max_distance is not None else ''})")
    # last, so the address is the line a user sees when the server is up
    log(f"serving {run.method} run {run.id} ({', '.join(run.model_names())}) on "
        f"{'https' if ssl_certfile else 'http'}://{host}:{bound}")
    try:
        server.run(sockets=sockets)
    finally:
        batcher.close()
        for sock in sockets:
            sock.close()


def check_tls(certfile: str | None, keyfile: str | None) -> None:
    """The certificate and its unencrypted private key exist and load, as uvicorn will load them (no
    password prompt: an encrypted key is refused)."""
    import ssl

    for option, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if not path:
            raise TaskfedError(f"{option}: not given (TLS needs both --ssl-certfile and --ssl-keyfile).")
        if not Path(path).is_file():
            raise TaskfedError(f"{option} {path}: no such file.")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise TaskfedError(f"--ssl-certfile {certfile} / --ssl-keyfile {keyfile}: not a PEM certificate and its "
                           f"matching unencrypted private key ({getattr(exc, 'reason', None) or exc}).") from None


def bind(host: str, port: int) -> list:
    """Sockets bound to every address `host` resolves to, as uvicorn's asyncio server would bind them
    (SO_REUSEADDR, IPv6 only on IPv6), not listening yet; an unresolvable host or a busy port is one sentence."""
    import errno
    import socket

    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise TaskfedError(f"--host {host}: cannot be resolved to an address "
                           f"({getattr(exc, 'strerror', None) or exc}).") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(found):
            sockets.append(socket.socket(family, kind, proto))
            sockets[-1].setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sockets[-1].setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sockets[-1].bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        why = {errno.EADDRINUSE: f"--port {port}: {host}:{port} is already in use (another server listens there); "
                                 f"choose another port.",
               errno.EACCES: f"--port {port}: permission denied (ports below 1024 need privileges).",
               errno.EADDRNOTAVAIL: f"--host {host}: not an address of this machine."}
        raise TaskfedError(why.get(exc.errno, f"--host {host} --port {port}: cannot listen there "
                                              f"({exc.strerror or exc}).")) from None
    return sockets
