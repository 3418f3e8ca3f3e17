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
METRICS = ("rouge1", "rougeL", "exact_match")


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
    rows: dict[str, np.ndarray]  # rouge1, rougeL, exact_match of each row, in `routed.tasks` order


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
    gates = method.eval_gates(client, sent)
    gate_fps = [fingerprint(g) for g in gates]
    keys = []
    for row, r in enumerate(records):
        terms = tuple((fps[int(i)], round(float(w), 6)) for i, w in zip(mix.idx[row], mix.w[row]) if float(w) != 0.0)
        if mix.gate is not None:  # a gated row's output is its gate's too
            terms += (gate_fps[int(mix.gate[row])], mix.top_k)
        keys.append((r.instruction, terms, max_new[r.task]))
    todo: dict[tuple, int] = {}
    for row, key in enumerate(keys):
        if key not in cache and key not in todo:
            todo[key] = row
    if todo:
        rt.load_slots([adapters[n] for n in names])
        load_gates(rt.bank, gates)
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
    scores = [score(cache[key], r.output) for r, key in zip(records, keys)]
    rows = {m: np.array([s[m] for s in scores], dtype=np.float64) for m in METRICS}
    tasks = [r.task for r in records]
    routed = Routed(client.id, tasks, names, mix, method.eval_facts(client))
    return ClientEval(float(np.mean(rows["rouge1"])), per_task_means(tasks, rows), gen_tokens, gen_seconds, routed, rows)


def load_gates(bank, gates: list[AdapterWeights]) -> None:
    """Bank gates 0..len-1 from `gates` (a gated route's, all of one width); nothing without gates."""
    if gates:
        bank.add_gates(len(gates), next(iter(gates[0].values())).shape[0])
        for i, g in enumerate(gates):
            bank.load_gate(i, g)


def per_task_means(tasks: list[str], rows: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """task -> n and the mean of each metric over its rows (the server recomputes it from a node's rows)."""
    out = {}
    for t in dict.fromkeys(tasks):
        mask = np.array([x == t for x in tasks])
        out[t] = {"n": int(mask.sum()), **{m: float(rows[m][mask].mean()) for m in METRICS}}
    return out


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
