"""Evaluation per (client, task) in the modes of methods.md: local (own tasks), global (all seen tasks),
unseen (held-out tasks).

The client side (`evaluate_client`, on whatever engine holds the client) asks its method for its adapters
and a per-row mix (routing, or FedDPA's weights) from what the server sent it; rows are
generated in batches sorted by answer budget and prompt length, whatever adapter each row uses (the
bank mixes per row). Generations are cached by (prompt, adapter fingerprints and weights, budget), so
clients that share an adapter (FedAvg) generate each test row once. The server side (`mode_metrics`)
assembles a mode's metrics from the clients' `ClientEval`s.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np

from taskfed import progress
from taskfed.data.records import Record
from taskfed.evaluation.generate import generate, prompt_ids
from taskfed.evaluation.metrics import score
from taskfed.methods.base import Client, Downlink, Method, Routed
from taskfed.model.bank import AdapterWeights
from taskfed.runtime import Runtime

MODES = ("local", "global", "unseen")


def fingerprint(weights: AdapterWeights) -> str:
    h = hashlib.sha1()
    for key in sorted(weights):
        h.update(key.encode())
        h.update(weights[key].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class ClientEval:
    """One client's evaluation in one mode, as the server receives it from any engine (never the texts)."""

    score: float  # mean ROUGE-1 F over the client's rows
    per_task: dict[str, dict[str, float]]  # task -> n, rouge1, rougeL, exact_match
    generated_tokens: int
    generate_seconds: float
    routed: Routed


def evaluate_client(rt: Runtime, method: Method, client: Client, records: list[Record], sent: Downlink,
                    max_new: dict[str, int], cache: dict) -> ClientEval:
    """The client side of evaluation: the method's adapters and route for these rows (what it was sent, and
    its own store), greedy generation in batches sorted by budget and prompt length, each row under its own
    mix (rows found in `cache` are not generated again), scores per task."""
    batch_size = rt.cfg.eval.batch_size
    gen_tokens, gen_seconds = 0, 0.0
    adapters = method.eval_adapters(client, sent)
    names = list(adapters)
    fps = [fingerprint(adapters[n]) for n in names]
    mix = method.route(client, records, names, rt, sent)
    keys = []
    for row, r in enumerate(records):
        terms = tuple((fps[int(i)], round(float(w), 6)) for i, w in zip(mix.idx[row], mix.w[row]) if float(w) != 0.0)
        keys.append((r.instruction, terms, max_new[r.task]))
    todo: dict[tuple, int] = {}
    for row, key in enumerate(keys):
        if key not in cache and key not in todo:
            todo[key] = row
    if todo:
        rt.load_slots([adapters[n] for n in names])
        prompts = {row: prompt_ids(rt, records[row].instruction, keys[row][2]) for row in todo.values()}
        order = sorted(todo.values(), key=lambda row: (keys[row][2], len(prompts[row])))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            budget = max(keys[row][2] for row in chunk)
            tic = time.perf_counter()
            outs, n_new = generate(rt, [prompts[row] for row in chunk], mix.select(np.array(chunk)), budget)
            gen_seconds += time.perf_counter() - tic
            gen_tokens += n_new
            for row, text in zip(chunk, outs):
                cache[keys[row]] = text
            progress.advance(len(chunk))
    progress.advance(len(records) - len(todo))  # rows whose generation was cached
    per_task: dict[str, dict] = {}
    row_scores = []
    for r, key in zip(records, keys):
        s = score(cache[key], r.output)
        row_scores.append(s["rouge1"])
        entry = per_task.setdefault(r.task, {"n": 0, "rouge1": 0.0, "rougeL": 0.0, "exact_match": 0.0})
        entry["n"] += 1
        for m in ("rouge1", "rougeL", "exact_match"):
            entry[m] += s[m]
    for entry in per_task.values():
        for m in ("rouge1", "rougeL", "exact_match"):
            entry[m] /= entry["n"]
    routed = Routed(client.id, [r.task for r in records], names, mix, method.eval_facts(client))
    return ClientEval(float(np.mean(row_scores)), per_task, gen_tokens, gen_seconds, routed)


def mode_metrics(method: Method, mode: str, evals: dict[str, ClientEval]) -> dict:
    """A mode's block of metrics.json from the clients' evaluations (sorted by client), whatever engine ran
    them: the mean over clients of their scores, the generation totals and the method's extras."""
    per_client = {cid: {"score": e.score, "per_task": e.per_task} for cid, e in sorted(evals.items())}
    result = {"score": float(np.mean([c["score"] for c in per_client.values()])) if per_client else None,
              "per_client": per_client,
              "generated_tokens": int(sum(e.generated_tokens for e in evals.values())),
              "generate_seconds": float(sum(e.generate_seconds for e in evals.values()))}
    result.update(method.eval_report(mode, [evals[cid].routed for cid in sorted(evals)]))
    return result
