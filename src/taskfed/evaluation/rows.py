"""Per-row scores of a run: `scores.csv` in the run folder, one line per evaluated test row and mode.

    mode, client, task, row, adapters, weights, rouge1, rougeL, exact_match

`row` is the row's index among its task's test rows (the same rows for every method and seed of a
scenario, so two runs pair up on (mode, client, task, row)); `adapters` and `weights` are the row's mix as
JSON lists (one adapter with weight 1 for a routed row; a gated row of FedALT or FedLEASE lists the adapters its
gate mixes, with placeholder weights: the real ones are per token). No texts: the prompt and the answer stay where
the data is. The bench's paired comparisons (bench/paired.py) read these files.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from taskfed.errors import TaskfedError

FILE = "scores.csv"
COLUMNS = ("mode", "client", "task", "row", "adapters", "weights", "rouge1", "rougeL", "exact_match")
METRICS = ("rouge1", "rougeL", "exact_match")


def rows_of(mode: str, client: str, tasks: list[str], names: list[str], idx, w, scores: dict) -> list[dict[str, Any]]:
    """One client's rows in one mode, in evaluation order: `tasks` the true task of each row, `idx`/`w` its
    mix over `names`, `scores` the per-row metrics."""
    seen: Counter = Counter()
    out = []
    for i, task in enumerate(tasks):
        terms = [(names[int(j)], float(x)) for j, x in zip(idx[i], w[i]) if float(x) != 0.0]
        out.append({"mode": mode, "client": client, "task": task, "row": seen[task],
                    "adapters": [n for n, _ in terms], "weights": [x for _, x in terms],
                    **{m: float(scores[m][i]) for m in METRICS}})
        seen[task] += 1
    return out


def write_scores(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(COLUMNS)
        for r in rows:
            out.writerow([r["mode"], r["client"], r["task"], r["row"], json.dumps(r["adapters"]),
                          json.dumps(r["weights"]), *(repr(float(r[m])) for m in METRICS)])


def read_scores(path: Path) -> list[dict[str, Any]]:
    """The rows of a scores.csv, each checked: one sentence naming the file and line otherwise."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except OSError as exc:
        raise TaskfedError(f"{path}: cannot read the per-row scores ({exc.strerror}).") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TaskfedError(f"{path}: not a per-row scores file ({exc}).") from None
    if not lines or tuple(lines[0]) != COLUMNS:
        raise TaskfedError(f"{path}: line 1 must be the header {','.join(COLUMNS)}.")
    rows, keys = [], set()
    for n, line in enumerate(lines[1:], start=2):
        where = f"{path}, line {n}"
        if len(line) != len(COLUMNS):
            raise TaskfedError(f"{where}: expected {len(COLUMNS)} fields, got {len(line)}.")
        r = dict(zip(COLUMNS, line))
        try:
            r["row"] = int(r["row"])
            r["adapters"], r["weights"] = json.loads(r["adapters"]), json.loads(r["weights"])
            for m in METRICS:
                r[m] = float(r[m])
        except ValueError as exc:
            raise TaskfedError(f"{where}: malformed field ({exc}).") from None
        if r["row"] < 0 or not all(math.isfinite(r[m]) and 0.0 <= r[m] <= 1.0 for m in METRICS):
            raise TaskfedError(f"{where}: a row index below 0 or a score outside [0, 1].")
        if not (isinstance(r["adapters"], list) and isinstance(r["weights"], list)
                and len(r["adapters"]) == len(r["weights"])):
            raise TaskfedError(f"{where}: adapters and weights must be JSON lists of one length.")
        key = (r["mode"], r["client"], r["task"], r["row"])
        if key in keys:
            raise TaskfedError(f"{where}: row {key} appears twice.")
        keys.add(key)
        rows.append(r)
    return rows
