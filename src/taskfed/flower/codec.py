"""What travels between the ServerApp and a ClientApp, and how it is checked on receipt.

Everything is an array (ArrayRecord) or a scalar/list (ConfigRecord): no pickle, no text parsed as code.
Adapters travel as float32 numpy arrays (numpy has no bfloat16, so a bf16 tensor is cast to float32 before
it is wrapped, as Flower's Array requires); the receiver checks keys, shapes, dtype and finite values
before it uses anything (`decode_adapter`, built on `peft_io.check_weights`).

A round's message to a node holds its jobs, each a ConfigRecord `job.<i>`, and the distinct adapters they
start from (or carry, `Job.extra`), each an ArrayRecord `w.<k>` sent once however many jobs share it; the
run's initial adapter, which every node builds from the seed, is named, never sent. An adapter may be
partial (the factors a job's server sends: FedSA-LoRA's A, FFA-LoRA's B). A reply holds one ConfigRecord
`results` (lists aligned by result), one ArrayRecord `r.<i>` per uploaded result (the factors the job
sends) and one `x.<i>.<k>` per extra array of it (SCAFFOLD's dc_i), named in `results`' `extra_*` lists.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from taskfed.config import RunConfig
from taskfed.errors import TaskfedError
from taskfed.evaluation.evaluate import METRICS, ClientEval, per_task_means
from taskfed.methods.base import ALL_ROWS, PARTS, Downlink, Federation, Job, LocalRef, Routed, only, part_of
from taskfed.model.bank import AdapterWeights, RowMix
from taskfed.model.peft_io import NON_FINITE, check_weights, extra_shapes

Shapes = dict[str, tuple[int, ...]]


# ----------------------------------------------------------------------------- adapters and arrays
def encode_adapter(weights: AdapterWeights) -> ArrayRecord:
    """Sorted keys, float32 on the CPU (bf16 cast up: Flower's Array goes through numpy)."""
    return ArrayRecord({k: Array(weights[k].detach().to("cpu", torch.float32).contiguous().numpy())
                        for k in sorted(weights)})


def decode_adapter(record: Any, shapes: Shapes, where: str, partial: bool = False) -> AdapterWeights:
    """An ArrayRecord back to an adapter, refused with one sentence unless every tensor is float32 with the
    expected key and shape and finite values. `partial`: whole factors may be absent (every A or every B),
    never some keys of a factor."""
    if not isinstance(record, ArrayRecord):
        raise TaskfedError(f"{where}: expected an array record.")
    if partial:
        held = {part_of(k) for k in record.keys()} & set(PARTS)
        shapes = only(shapes, tuple(held) or PARTS)
    out: AdapterWeights = {}
    missing = sorted(set(shapes) - set(record.keys()))
    if missing:
        raise TaskfedError(f"{where}: adapter lacks tensor '{missing[0]}'.")
    for key, arr in record.items():
        # The header first: a mis-shaped or mistyped array is refused before it is materialised.
        if key not in shapes:
            raise TaskfedError(f"{where}: adapter has unexpected tensor '{key}'.")
        if arr.dtype != "float32":
            raise TaskfedError(f"{where}: tensor '{key}' has dtype {arr.dtype}, expected float32.")
        if tuple(arr.shape) != tuple(shapes[key]):
            raise TaskfedError(f"{where}: tensor '{key}' has shape {tuple(arr.shape)}, expected {tuple(shapes[key])}.")
        value = _numpy(arr, where)
        if value.dtype != np.float32:  # what the bytes hold, not what the header declares
            raise TaskfedError(f"{where}: tensor '{key}' holds {value.dtype} data, expected float32.")
        out[key] = torch.from_numpy(value.copy())
    check_weights(out, shapes, where)
    return out


def decode_extra(record: Any, shapes: Shapes, where: str, like: AdapterWeights | None = None,
                 partial: bool = False) -> AdapterWeights:
    """An extra array of a job or a result: adapter-shaped (`partial` as decode_adapter's), or a gate of the
    width `like` (what the job sent under its name) or, without one, its own first key has (`extra_shapes`)."""
    held = {k: tuple(a.shape) for k, a in record.items()} if isinstance(record, ArrayRecord) else {}
    expected = extra_shapes(shapes, held, like)
    return decode_adapter(record, expected, where, partial=partial and expected is shapes)


def encode_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(np.asarray(v))) for k, v in sorted(arrays.items())})


def decode_arrays(record: Any, where: str) -> dict[str, np.ndarray]:
    """Numeric arrays with finite values (client setup uploads, e.g. FedRouter's local centroids)."""
    if not isinstance(record, ArrayRecord):
        raise TaskfedError(f"{where}: expected an array record.")
    out = {}
    for key, arr in record.items():
        value = _numpy(arr, where)
        if value.dtype.kind not in "iuf":
            raise TaskfedError(f"{where}: array '{key}' has dtype {value.dtype}, expected numbers.")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise TaskfedError(f"{where}: array '{key}' {NON_FINITE}.")
        out[key] = value
    return out


def _numpy(arr: Array, where: str) -> np.ndarray:
    try:
        value = arr.numpy()  # np.load with allow_pickle=False
    except (TypeError, ValueError, OSError) as exc:
        raise TaskfedError(f"{where}: unreadable array ({str(exc).splitlines()[0]}).") from None
    if tuple(value.shape) != tuple(arr.shape):
        raise TaskfedError(f"{where}: array shape {tuple(value.shape)} disagrees with its header {tuple(arr.shape)}.")
    return value


# ----------------------------------------------------------------------------- the run config
def encode_config(cfg: RunConfig) -> ConfigRecord:
    """The validated run config, flattened to dotted keys (None values dropped: the defaults restore them)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        elif node is not None:
            flat[prefix[:-1]] = list(node) if isinstance(node, (list, tuple)) else node

    walk("", cfg.model_dump())
    return ConfigRecord(flat)


def decode_config(record: Any) -> RunConfig:
    """Back to a RunConfig, validated like a TOML file (the method's own parameter model included)."""
    from taskfed.methods import method_params

    if not isinstance(record, ConfigRecord):
        raise TaskfedError("flower message: the run config is missing.")
    raw: dict[str, Any] = {}
    for key, value in record.items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    try:
        cfg = RunConfig.model_validate(raw)
    except Exception as exc:  # pydantic's ValidationError: one sentence is enough here
        raise TaskfedError(f"flower message: invalid run config ({str(exc).splitlines()[0]}).") from None
    method_params(cfg.method, "flower message")
    return cfg


# ----------------------------------------------------------------------------- jobs (server -> node)
def encode_jobs(jobs: list[Job], round_idx: int, cfg: RunConfig, init: AdapterWeights | None = None) -> RecordDict:
    """`init`: the run's initial adapter, which the node builds itself (a LocalRef defaulting to it names it)."""
    content = RecordDict({"config": encode_config(cfg), "round": ConfigRecord({"round": round_idx, "n_jobs": len(jobs)})})
    keys: dict[int, str] = {}  # id(adapter) -> its ArrayRecord name: each distinct adapter once

    def ref(weights: AdapterWeights) -> str:
        if id(weights) not in keys:
            keys[id(weights)] = f"w.{len(keys)}"
            content[keys[id(weights)]] = encode_adapter(weights)
        return keys[id(weights)]

    def source(w: AdapterWeights | LocalRef) -> list[str]:
        # ["arrays", key] or ["local", store name, default's key, "init" or ""]
        if isinstance(w, LocalRef):
            default = "" if w.default is None else "init" if w.default is init else ref(w.default)
            return ["local", w.name, default]
        return ["arrays", ref(w)]

    for i, job in enumerate(jobs):
        rec: dict[str, Any] = {
            "client": job.client, "adapter": job.adapter, "init": source(job.init),
            "rows": [str(x) for x in job.rows], "prox_mu": float(job.prox_mu), "scale": float(job.scale),
            "frozen_coef": [float(c) for _, c in job.frozen], "upload": bool(job.upload),
            "trains": list(job.trains), "sends": list(job.sends),
            "extra_names": sorted(job.extra), "extra": [ref(job.extra[k]) for k in sorted(job.extra)],
        }
        if job.fill is not None:
            rec["fill"] = source(job.fill)
        for j, (w, _) in enumerate(job.frozen):
            rec[f"frozen.{j}"] = source(w)
        for name in ("steps", "batch"):
            if getattr(job, name) is not None:
                rec[name] = int(getattr(job, name))
        if job.lr is not None:
            rec["lr"] = float(job.lr)
        if job.keep_as is not None:
            rec["keep_as"] = job.keep_as
        if job.candidates is not None:
            rec["candidates"] = [ref(w) for w in job.candidates]
        content[f"job.{i}"] = ConfigRecord(rec)
    return content


def decode_jobs(content: RecordDict, shapes: Shapes, init: AdapterWeights | None = None) -> tuple[int, list[Job]]:
    """The node's side: jobs with their adapters, each adapter checked like an upload (whole factors may be
    absent: a partial start is completed from the job's `fill`, checked in full before training). `init` is
    the node's own copy of the run's initial adapter."""
    head = content.config_records.get("round")
    if head is None:
        raise TaskfedError("flower message: no round header.")
    adapters: dict[str, AdapterWeights] = {}

    def arrays(key: str, decode=decode_adapter) -> AdapterWeights:
        if key not in adapters:
            if key not in content.array_records:
                raise TaskfedError(f"flower message: job refers to missing adapter '{key}'.")
            adapters[key] = decode(content.array_records[key], shapes, f"adapter {key} from the server",
                                   partial=True)
        return adapters[key]

    def source(value: list[str]) -> AdapterWeights | LocalRef:
        if value[0] == "local":
            if value[2] == "init":
                if init is None:
                    raise TaskfedError("flower message: a job refers to the run's initial adapter, which this node lacks.")
                return LocalRef(value[1], init)
            return LocalRef(value[1], arrays(value[2]) if value[2] else None)
        return arrays(value[1])

    try:
        n_jobs, round_idx = head["n_jobs"], head["round"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (n_jobs, round_idx)):
            raise TaskfedError("flower message: the round header's counts are not non-negative integers.")
        return round_idx, [_job(content.config_records[f"job.{i}"], source, arrays) for i in range(n_jobs)]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise TaskfedError(f"flower message: malformed job ({type(exc).__name__}: {exc}).") from None


def _job(rec: ConfigRecord, source, arrays) -> Job:
    """One job record, every field of its type and range (a node never trains on a malformed plan)."""
    def number(key: str, kind: type, low: float, default: Any = None, strictly: bool = False) -> Any:
        value = rec.get(key, default)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and kind is float:
            value = float(value)
        ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < low or (strictly and value == low):
            raise TaskfedError(f"flower message: job field '{key}' = {value!r} is not a {kind.__name__} "
                               f"{'>' if strictly else '>='} {low:g}.")
        return value

    rows = tuple(rec["rows"])
    if rows and rows[0] == "label":
        rows = ("label", str(rows[1]), int(rows[2]))
    elif rows and rows[0] == "task":
        rows = ("task", str(rows[1]))
    elif rows:
        raise TaskfedError(f"flower message: unknown row selector {list(rows)!r}.")
    for key in ("client", "adapter"):
        if not isinstance(rec.get(key), str):
            raise TaskfedError(f"flower message: job field '{key}' is not a string.")
    for key in ("trains", "sends"):
        if not (_is_list(rec[key], str) and set(rec[key]) <= set(PARTS)):
            raise TaskfedError(f"flower message: job field '{key}' = {rec[key]!r} is not a list of factors "
                               f"({', '.join(PARTS)}).")
    names, refs = rec["extra_names"], rec["extra"]
    if not (_is_list(names, str) and _is_list(refs, str) and len(names) == len(refs) == len(set(names))):
        raise TaskfedError("flower message: job's extra arrays are malformed.")
    return Job(client=rec["client"], adapter=rec["adapter"], init=source(list(rec["init"])), rows=rows or ALL_ROWS,
               steps=number("steps", int, 1), batch=number("batch", int, 1), lr=number("lr", float, 0.0, strictly=True),
               prox_mu=number("prox_mu", float, 0.0, 0.0), scale=number("scale", float, 0.0, 1.0),
               frozen=[(source(list(rec[f"frozen.{j}"])), number_of(c)) for j, c in enumerate(rec["frozen_coef"])],
               keep_as=rec.get("keep_as") if isinstance(rec.get("keep_as"), str) else None,
               upload=bool(rec["upload"]),
               candidates=[arrays(k) for k in rec["candidates"]] if "candidates" in rec else None,
               fill=source(list(rec["fill"])) if "fill" in rec else None,
               trains=tuple(rec["trains"]), sends=tuple(rec["sends"]),
               extra={n: arrays(k, decode_extra) for n, k in zip(names, refs)})  # a gate among them (a router)


def number_of(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TaskfedError(f"flower message: job coefficient {value!r} is not a finite number.")
    return float(value)


# ----------------------------------------------------------------------------- results (node -> server)
RESULT_LISTS = {"job": int, "n_rows": int, "n_client": int, "loss": float, "chosen": int, "uploaded": bool}


def check_results(record: Any, jobs: list[Job], where: str, n_train: int | None = None) -> list[dict[str, Any]]:
    """The `results` ConfigRecord of a reply, as one dict per result, refused unless every field has its
    type, lists agree in length, each job is answered at most once, counts are positive and (given
    `n_train`, what the node declared at setup) the client's row count is the declared one, losses are
    finite, and an uploading job's result says it uploaded."""
    if not isinstance(record, ConfigRecord):
        raise TaskfedError(f"{where}: reply has no results record.")
    n = None
    for key, kind in RESULT_LISTS.items():
        value = record.get(key)
        if not isinstance(value, list) or not all(isinstance(v, kind) and not (kind is int and isinstance(v, bool)) for v in value):
            raise TaskfedError(f"{where}: results field '{key}' is missing or not a list of {kind.__name__}.")
        if n is not None and len(value) != n:
            raise TaskfedError(f"{where}: results field '{key}' has {len(value)} entries, expected {n}.")
        n = len(value)
    rows = [{key: record[key][i] for key in RESULT_LISTS} for i in range(n or 0)]
    seen = set()
    for r in rows:
        j = r["job"]
        if not 0 <= j < len(jobs) or j in seen:
            raise TaskfedError(f"{where}: result for unknown or repeated job {j}.")
        seen.add(j)
        if r["n_rows"] < 1 or r["n_client"] < r["n_rows"] or (n_train is not None and r["n_client"] != n_train):
            raise TaskfedError(f"{where}: job {j} reports {r['n_rows']} rows of {r['n_client']}"
                               + (f" (the client declared {n_train} at setup)." if n_train is not None else "."))
        if not math.isfinite(r["loss"]):
            raise TaskfedError(f"{where}: job {j} reports a non-finite loss.")
        if r["uploaded"] != jobs[j].upload:
            raise TaskfedError(f"{where}: job {j} {'uploaded' if r['uploaded'] else 'did not upload'} weights against its plan.")
        if jobs[j].candidates is not None and not 0 <= r["chosen"] < len(jobs[j].candidates):
            raise TaskfedError(f"{where}: job {j} chose candidate {r['chosen']} of {len(jobs[j].candidates)}.")
    return rows


def check_extras(record: ConfigRecord, rows: list[dict[str, Any]], where: str) -> dict[int, list[str]]:
    """The extra arrays a reply names (`extra_job`, `extra_name`: aligned lists), per result index in the
    order they were sent, refused unless each belongs to an uploaded result and no name repeats in one."""
    jobs, names = record.get("extra_job", []), record.get("extra_name", [])
    if not (_is_list(jobs, int) and _is_list(names, str) and len(jobs) == len(names)):
        raise TaskfedError(f"{where}: results fields 'extra_job' and 'extra_name' are not aligned lists.")
    out: dict[int, list[str]] = {}
    for i, name in zip(jobs, names):
        if not 0 <= i < len(rows) or not rows[i]["uploaded"] or name in out.get(i, []):
            raise TaskfedError(f"{where}: extra array '{name}' for result {i}, which uploaded none or has it twice.")
        out.setdefault(i, []).append(name)
    return out


# ----------------------------------------------------------------------------- the federation's facts
def encode_fed(fed: Federation) -> ConfigRecord:
    """The public facts the method's client side is built from (the rest comes from the config)."""
    return ConfigRecord({"clients": list(fed.clients), "tasks": list(fed.tasks), "run": fed.run})


def decode_fed(record: Any, cfg: RunConfig, init_adapter: AdapterWeights) -> Federation:
    if not isinstance(record, ConfigRecord) or not all(
            isinstance(record.get(k), list) and all(isinstance(x, str) for x in record[k]) for k in ("clients", "tasks")):
        raise TaskfedError("flower message: the federation's facts are missing or malformed.")
    run = record.get("run", "")
    if not isinstance(run, str) or not all(ch in "0123456789abcdef" for ch in run) or len(run) > 64:
        raise TaskfedError("flower message: the run id is not a hexadecimal string.")  # it names a folder
    return Federation(clients=list(record["clients"]), rounds=cfg.train.rounds, seed=cfg.seed,
                      init_adapter=init_adapter, tasks=list(record["tasks"]), lr_max=cfg.train.lr_max,
                      lr_min=cfg.train.lr_min, run=run)


# ----------------------------------------------------------------------------- evaluation (both ways)
def encode_eval_request(cfg: RunConfig, fed: Federation, mode: str, tasks: list[str], sent: Downlink) -> RecordDict:
    """What a node needs to evaluate its client: the mode, the tasks, and the method's downlink."""
    names = list(sent.adapters)
    content = RecordDict({"config": encode_config(cfg), "fed": encode_fed(fed),
                          "ask": ConfigRecord({"mode": mode, "tasks": list(tasks), "adapters": names}),
                          "arrays": encode_arrays(sent.arrays)})
    for i, name in enumerate(names):
        content[f"d.{i}"] = encode_adapter(sent.adapters[name])
    return content


def decode_eval_request(content: RecordDict, shapes: Shapes) -> tuple[str, list[str], Downlink]:
    ask = content.config_records.get("ask")
    if not isinstance(ask, ConfigRecord) or not isinstance(ask.get("mode"), str) or not all(
            isinstance(ask.get(k), list) and all(isinstance(x, str) for x in ask[k]) for k in ("tasks", "adapters")):
        raise TaskfedError("flower message: malformed evaluation request.")
    adapters = {name: decode_adapter(content.array_records.get(f"d.{i}"), shapes, f"adapter '{name}' from the server",
                                     partial=True)
                for i, name in enumerate(ask["adapters"])}
    arrays = decode_arrays(content.array_records.get("arrays"), "arrays from the server")
    return ask["mode"], list(ask["tasks"]), Downlink(adapters, arrays)


def encode_eval_reply(ev: ClientEval) -> RecordDict:
    tasks = sorted(ev.per_task)
    rec: dict[str, Any] = {"tasks": tasks, "n": [int(ev.per_task[t]["n"]) for t in tasks], "score": float(ev.score),
                           "generated_tokens": int(ev.generated_tokens), "generate_seconds": float(ev.generate_seconds),
                           "row_tasks": list(ev.routed.tasks), "names": list(ev.routed.names)}
    for m in METRICS:
        rec[m] = [float(ev.per_task[t][m]) for t in tasks]
    mix = {"idx": ev.routed.mix.idx.numpy().astype(np.int64), "w": ev.routed.mix.w.numpy().astype(np.float32)}
    return RecordDict({"eval": ConfigRecord(rec), "mix": encode_arrays(mix), "facts": encode_arrays(ev.routed.facts),
                       "rows": encode_arrays({m: np.asarray(ev.rows[m], dtype=np.float64) for m in METRICS})})


def _is_list(value: Any, kind: type) -> bool:
    return isinstance(value, list) and all(isinstance(v, kind) and not (kind is not bool and isinstance(v, bool)) for v in value)


def decode_eval_reply(content: RecordDict, client: str, asked: list[str], where: str) -> ClientEval:
    """A node's evaluation, refused with one sentence unless every field has its type and range: only asked
    tasks, each once, positive counts, scores in [0, 1] and consistent with the per-task means, a mix that
    indexes its own adapter names, one true task per evaluated row."""
    rec = content.config_records.get("eval")
    if not isinstance(rec, ConfigRecord):
        raise TaskfedError(f"{where}: reply has no evaluation record.")
    kinds = {"tasks": str, "n": int, "row_tasks": str, "names": str, **{m: float for m in METRICS}}
    for key, kind in kinds.items():
        if not _is_list(rec.get(key), kind):
            raise TaskfedError(f"{where}: evaluation field '{key}' is missing or not a list of {kind.__name__}.")
    tasks, n = rec["tasks"], rec["n"]
    if any(len(rec[k]) != len(tasks) for k in ("n", *METRICS)):
        raise TaskfedError(f"{where}: evaluation lists disagree in length.")
    if len(set(tasks)) != len(tasks) or not set(tasks) <= set(asked):
        raise TaskfedError(f"{where}: evaluation reports a task it was not asked about or one task twice.")
    if any(k < 1 for k in n):
        raise TaskfedError(f"{where}: evaluation reports a task with fewer than one row.")
    for m in METRICS:
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in rec[m]):
            raise TaskfedError(f"{where}: evaluation field '{m}' holds a value outside [0, 1].")
    for key, kind in (("score", float), ("generated_tokens", int), ("generate_seconds", float)):
        value = rec.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise TaskfedError(f"{where}: evaluation field '{key}' is missing or not a non-negative {kind.__name__}.")
    rows = sum(n)
    if rec["score"] > 1.0 or abs(rec["score"] - sum(k * v for k, v in zip(n, rec["rouge1"])) / rows) > 1e-9:
        raise TaskfedError(f"{where}: evaluation score disagrees with its per-task ROUGE-1.")
    if sorted(rec["row_tasks"]) != sorted(t for t, k in zip(tasks, n) for _ in range(k)):
        raise TaskfedError(f"{where}: evaluation's row tasks disagree with its per-task counts.")
    mix = decode_arrays(content.array_records.get("mix"), f"{where} (mix)")
    idx, w = mix.get("idx"), mix.get("w")
    if (idx is None or w is None or idx.dtype.kind not in "iu" or idx.ndim != 2 or idx.shape != w.shape
            or len(idx) != rows or (idx < 0).any() or (idx >= len(rec["names"])).any()):
        raise TaskfedError(f"{where}: evaluation's mix does not fit its rows and adapter names.")
    facts = decode_arrays(content.array_records.get("facts"), f"{where} (facts)")
    scores = decode_arrays(content.array_records.get("rows"), f"{where} (rows)")
    if sorted(scores) != sorted(METRICS) or any(
            v.ndim != 1 or len(v) != rows or v.dtype.kind != "f" or not np.all((v >= 0) & (v <= 1)) for v in scores.values()):
        raise TaskfedError(f"{where}: evaluation's per-row scores are missing, of the wrong length, or outside [0, 1].")
    scores = {m: scores[m].astype(np.float64) for m in METRICS}
    # The per-task figures are the server's own means of the rows; the node's must agree with them.
    per_task = per_task_means(list(rec["row_tasks"]), scores)
    if any(abs(per_task[t][m] - rec[m][i]) > 1e-9 for i, t in enumerate(tasks) for m in METRICS):
        raise TaskfedError(f"{where}: evaluation's per-task scores disagree with its per-row scores.")
    routed = Routed(client, list(rec["row_tasks"]), list(rec["names"]),
                    RowMix(torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(w.astype(np.float32))), facts)
    return ClientEval(float(np.mean(scores["rouge1"])), per_task, rec["generated_tokens"], rec["generate_seconds"],
                      routed, scores)


STATS = {"load_seconds": float, "train_seconds": float, "compute_seconds": float, "tokens": int}


def check_stats(record: Any, where: str) -> dict[str, Any]:
    """A round reply's `stats` record: non-negative finite numbers, and the node's own dropped uploads as
    strings; refused whole otherwise (the node is then dropped from the round, never the run)."""
    if not isinstance(record, ConfigRecord):
        raise TaskfedError(f"{where}: reply has no stats record.")
    out: dict[str, Any] = {}
    for key, kind in STATS.items():
        value = record.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and kind is float:
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise TaskfedError(f"{where}: stats field '{key}' is missing or not a non-negative {kind.__name__}.")
        out[key] = value
    dropped = record.get("dropped", [])
    if not _is_list(dropped, str):
        raise TaskfedError(f"{where}: stats field 'dropped' is not a list of strings.")
    out["dropped"] = list(dropped)
    return out
