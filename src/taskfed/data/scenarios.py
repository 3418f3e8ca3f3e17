"""Scenarios: how the training rows of the seen tasks are spread over clients (methods.md, "Scenarios").

- single: one task per client (n_clients a multiple of the number of tasks; a task's rows split between
  its clients);
- dual (task interference): client i holds the first half of task t = i mod T and the second half of task
  t + 1, so pairs of clients share no rows (FedRouter's rule);
- iid: every client holds every task (each task's shuffled rows dealt round-robin);
- dirichlet: each task's rows spread over clients by Dirichlet(alpha), shares under 1% dropped (FL-TAC).
Held-out `unseen` tasks are removed before partitioning and only evaluated.
"""

from __future__ import annotations

import numpy as np

from taskfed.data.records import Record, tasks_of
from taskfed.errors import TaskfedError

SCENARIOS = ("single", "dual", "iid", "dirichlet")


def _by_task(records: list[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {t: [] for t in tasks_of(records)}
    for r in records:
        out[r.task].append(r)
    return out


def _split(rows: list[Record], parts: int) -> list[list[Record]]:
    """`parts` contiguous chunks of near-equal size, in order."""
    return [rows[idx[0]:idx[-1] + 1] if len(idx) else [] for idx in np.array_split(np.arange(len(rows)), parts)]


def partition(records: list[Record], scenario: str, n_clients: int, seed: int, alpha: float = 0.5,
              min_share: float = 0.01) -> list[list[Record]]:
    """Client partitions (a list of records per client), deterministic in `seed`."""
    if scenario not in SCENARIOS:
        raise TaskfedError(f"scenario.name: unknown scenario '{scenario}' (choose one of {', '.join(SCENARIOS)}).")
    by_task = _by_task(records)
    tasks = list(by_task)
    n_tasks = len(tasks)
    if n_tasks == 0:
        raise TaskfedError("data: no training rows left after removing the unseen tasks.")
    if n_clients > len(records):  # every scenario gives each client at least one row
        raise TaskfedError(f"scenario.n_clients: {n_clients} clients but only {len(records)} training rows "
                           f"(every client needs rows of its own).")
    rng = np.random.default_rng(seed)
    clients: list[list[Record]] = [[] for _ in range(n_clients)]

    if scenario in ("single", "dual"):
        if n_clients % n_tasks:
            raise TaskfedError(f"scenario.n_clients: the '{scenario}' scenario needs a multiple of the "
                               f"{n_tasks} tasks, got {n_clients}.")
        per_task = n_clients // n_tasks  # client i is the (i // n_tasks)-th of the clients of task i mod T
        for i in range(n_clients):
            t, k = i % n_tasks, i // n_tasks
            rows = by_task[tasks[t]]
            if scenario == "single":
                clients[i] = _split(rows, per_task)[k]
            else:  # first half of task t, second half of task t + 1
                nxt = by_task[tasks[(t + 1) % n_tasks]]
                clients[i] = _split(rows[: len(rows) // 2], per_task)[k] + _split(nxt[len(nxt) // 2:], per_task)[k]
    elif scenario == "iid":
        for task in tasks:
            rows = by_task[task]
            order = rng.permutation(len(rows))
            for j, i in enumerate(order):
                clients[j % n_clients].append(rows[i])
    else:  # dirichlet
        for task in tasks:
            rows = by_task[task]
            shares = np.nan_to_num(rng.dirichlet([alpha] * n_clients))  # a tiny alpha can draw 0/0
            # Drop shares under min_share, but never all of them (with many clients every share is small):
            # 0/0 would make the cut points NaN.
            kept = np.where(shares >= min_share, shares, 0.0)
            shares = kept if kept.sum() > 0 else np.eye(n_clients)[int(np.argmax(shares))]
            shares = shares / shares.sum()
            order = rng.permutation(len(rows))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).round().astype(int)
            for c, chunk in enumerate(np.split(order, cuts)):
                clients[c] += [rows[i] for i in sorted(chunk)]

    for c, rows in enumerate(clients):
        if not rows:
            raise TaskfedError(f"scenario: client {c} got no training rows in the '{scenario}' scenario "
                               f"(use fewer clients or a larger dirichlet alpha).")
    return clients
