"""What travels between the ServerApp and a ClientApp, and how it is checked on receipt.

Everything is an array (ArrayRecord) or a scalar/list (ConfigRecord): no pickle, no text parsed as code.
Adapters travel as float32 numpy arrays (numpy has no bfloat16, so a bf16 tensor is cast to float32 before
it is wrapped, as Flower's Array requires); the receiver checks keys, shapes, dtype and finite values
before it uses anything (`decode_adapter`, built on `peft_io.check_weights`).

A round's message to a node holds its jobs, each a ConfigRecord `job.<i>`, and the distinct adapters they
start from, each an ArrayRecord `w.<k>` sent once however many jobs share it. A reply holds one
ConfigRecord `results` (lists aligned by result) and one ArrayRecord `r.<i>` per uploaded result.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from taskfed.config import RunConfig
from taskfed.errors import TaskfedError
from taskfed.methods.base import ALL_ROWS, Job, LocalRef
from taskfed.model.bank import AdapterWeights
from taskfed.model.peft_io import check_weights

Shapes = dict[str, tuple[int, ...]]


# ----------------------------------------------------------------------------- adapters and arrays
def encode_adapter(weights: AdapterWeights) -> ArrayRecord:
    """Sorted keys, float32 on the CPU (bf16 cast up: Flower's Array goes through numpy)."""
    return ArrayRecord({k: Array(weights[k].detach().to("cpu", torch.float32).contiguous().numpy())
                        for k in sorted(weights)})


def decode_adapter(record: Any, shapes: Shapes, where: str) -> AdapterWeights:
    """An ArrayRecord back to an adapter, refused with one sentence unless every tensor is float32 with the
    expected key and shape and finite values."""
    if not isinstance(record, ArrayRecord):
        raise TaskfedError(f"{where}: expected an array record.")
    out: AdapterWeights = {}
    for key, arr in record.items():
        if arr.dtype != "float32":
            raise TaskfedError(f"{where}: tensor '{key}' has dtype {arr.dtype}, expected float32.")
        out[key] = torch.from_numpy(_numpy(arr, where).copy())
    check_weights(out, shapes, where)
    return out


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
            raise TaskfedError(f"{where}: array '{key}' holds NaN or infinite values.")
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
def encode_jobs(jobs: list[Job], round_idx: int, cfg: RunConfig) -> RecordDict:
    content = RecordDict({"config": encode_config(cfg), "round": ConfigRecord({"round": round_idx, "n_jobs": len(jobs)})})
    keys: dict[int, str] = {}  # id(adapter) -> its ArrayRecord name: each distinct adapter once

    def ref(weights: AdapterWeights) -> str:
        if id(weights) not in keys:
            keys[id(weights)] = f"w.{len(keys)}"
            content[keys[id(weights)]] = encode_adapter(weights)
        return keys[id(weights)]

    def source(w: AdapterWeights | LocalRef) -> list[str]:
        # ["arrays", key] or ["local", store name, default's key or ""]
        if isinstance(w, LocalRef):
            return ["local", w.name, ref(w.default) if w.default is not None else ""]
        return ["arrays", ref(w)]

    for i, job in enumerate(jobs):
        rec: dict[str, Any] = {
            "client": job.client, "adapter": job.adapter, "init": source(job.init),
            "rows": [str(x) for x in job.rows], "prox_mu": float(job.prox_mu), "scale": float(job.scale),
            "frozen_coef": [float(c) for _, c in job.frozen], "upload": bool(job.upload),
        }
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


def decode_jobs(content: RecordDict, shapes: Shapes) -> tuple[int, list[Job]]:
    """The node's side: jobs with their adapters, each adapter checked like an upload."""
    head = content.config_records.get("round")
    if head is None:
        raise TaskfedError("flower message: no round header.")
    adapters: dict[str, AdapterWeights] = {}

    def arrays(key: str) -> AdapterWeights:
        if key not in adapters:
            if key not in content.array_records:
                raise TaskfedError(f"flower message: job refers to missing adapter '{key}'.")
            adapters[key] = decode_adapter(content.array_records[key], shapes, f"adapter {key} from the server")
        return adapters[key]

    def source(value: list[str]) -> AdapterWeights | LocalRef:
        if value[0] == "local":
            return LocalRef(value[1], arrays(value[2]) if value[2] else None)
        return arrays(value[1])

    jobs = []
    for i in range(int(head["n_jobs"])):
        rec = content.config_records[f"job.{i}"]
        rows = tuple(rec["rows"])
        if rows and rows[0] == "label":
            rows = ("label", rows[1], int(rows[2]))
        jobs.append(Job(
            client=str(rec["client"]), adapter=str(rec["adapter"]), init=source(list(rec["init"])), rows=rows or ALL_ROWS,
            steps=rec.get("steps"), batch=rec.get("batch"), lr=rec.get("lr"), prox_mu=float(rec["prox_mu"]),
            scale=float(rec["scale"]), frozen=[(source(list(rec[f"frozen.{j}"])), float(c)) for j, c in enumerate(rec["frozen_coef"])],
            keep_as=rec.get("keep_as"), upload=bool(rec["upload"]),
            candidates=[arrays(k) for k in rec["candidates"]] if "candidates" in rec else None))
    return int(head["round"]), jobs


# ----------------------------------------------------------------------------- results (node -> server)
RESULT_LISTS = {"job": int, "n_rows": int, "n_client": int, "loss": float, "chosen": int, "uploaded": bool}


def check_results(record: Any, jobs: list[Job], where: str) -> list[dict[str, Any]]:
    """The `results` ConfigRecord of a reply, as one dict per result, refused unless every field has its
    type, lists agree in length, each job is answered at most once, counts are positive, and an uploading
    job's result says it uploaded."""
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
        if r["n_rows"] < 1 or r["n_client"] < r["n_rows"]:
            raise TaskfedError(f"{where}: job {j} reports {r['n_rows']} rows of {r['n_client']}.")
        if r["uploaded"] != jobs[j].upload:
            raise TaskfedError(f"{where}: job {j} {'uploaded' if r['uploaded'] else 'did not upload'} weights against its plan.")
        if jobs[j].candidates is not None and not 0 <= r["chosen"] < len(jobs[j].candidates):
            raise TaskfedError(f"{where}: job {j} chose candidate {r['chosen']} of {len(jobs[j].candidates)}.")
    return rows
