"""Evaluation per (client, task) in the modes of methods.md: local (own tasks), global (all seen tasks),
unseen (held-out tasks).

Each client asks its method for its adapters and a per-row mix (routing, or FedDPA's weights); rows are
generated in batches sorted by answer budget and prompt length, whatever adapter each row uses (the
bank mixes per row). Generations are cached by (prompt, adapter fingerprints and weights, budget), so
clients that share an adapter (FedAvg) generate each test row once.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable

import numpy as np

from taskfed.data.records import Record
from taskfed.evaluation.generate import generate, prompt_ids
from taskfed.evaluation.metrics import score
from taskfed.methods.base import Client, Method
from taskfed.model.bank import AdapterWeights
from taskfed.runtime import Runtime

MODES = ("local", "global", "unseen")


def fingerprint(weights: AdapterWeights) -> str:
    h = hashlib.sha1()
    for key in sorted(weights):
        h.update(key.encode())
        h.update(weights[key].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def tasks_for(mode: str, client: Client, seen: list[str], unseen: list[str]) -> list[str]:
    if mode == "local":
        return client.tasks
    if mode == "global":
        return list(seen)
    return list(unseen)


def evaluate_mode(rt: Runtime, method: Method, clients: dict[str, Client], mode: str,
                  test_by_task: dict[str, list[Record]], max_new: dict[str, int], seen: list[str],
                  unseen: list[str], cache: dict, log: Callable[[str], None] = lambda s: None) -> dict:
    batch_size = rt.cfg.eval.batch_size
    per_client, routed = {}, []
    gen_tokens, gen_seconds = 0, 0.0
    for cid in sorted(clients):
        client = clients[cid]
        tasks = [t for t in tasks_for(mode, client, seen, unseen) if test_by_task.get(t)]
        if not tasks:
            continue
        records = [r for t in tasks for r in test_by_task[t]]
        adapters = method.eval_adapters(client)
        names = list(adapters)
        fps = [fingerprint(adapters[n]) for n in names]
        mix = method.route(client, records, names, rt)
        routed.append((client, records, mix, names))
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
            log(f"{mode}: client {cid} generated {len(todo)} rows")
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
        per_client[cid] = {"score": float(np.mean(row_scores)), "per_task": per_task}
    result = {"score": float(np.mean([c["score"] for c in per_client.values()])) if per_client else None,
              "per_client": per_client, "generated_tokens": gen_tokens, "generate_seconds": gen_seconds}
    result.update(method.eval_report(mode, routed))
    return result

