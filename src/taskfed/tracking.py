"""Experiment tracking (`[log]`): a run's figures in TensorBoard event files and/or an MLflow store.

The driver (federation.py, so every engine: in-process and the Flower ServerApp alike) hands the tracker
what metrics.json will hold, as it grows: after each round and each evaluation mode, and whole at the end.
Every numeric leaf is a scalar, named by its path with '/' (a list's items by index):

    round/<key>            per round, at step = the round's number (1-based); plus round/tokens_per_s
    eval/<mode>/<path>     each evaluation mode's figures (score, per-client and per-task ROUGE, router
                           accuracy, FedDPA's weights, ...), at step = the number of rounds
    <path>                 the rest (bytes_communicated, setup_seconds, privacy/... epsilon spent, ...), at step
                           = the rounds done so far: after each round (a series as it grows) and at the end

and the resolved config is the run's parameters (MLflow params; a TensorBoard text summary), its keys
dotted as in `--set`. Logging is idempotent by (name, step): a tracker reads what its stores already hold
and logs only the rest, so a resumed run appends where the interrupted one stopped. A round is logged
after its checkpoint; one run again on resume (its checkpoint was damaged) keeps its first figures, which
equal the rerun's but for its timings (resume equals the uninterrupted run).

Where: under the run folder, written in `RUN_DIR.partial/` while the run goes and moved into the finished
folder with it: `tensorboard/` (`tensorboard --logdir RUN_DIR/tensorboard`) and `mlflow.db`, a SQLite
store (`mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`): MLflow 3 refuses its plain-file store
('./mlruns', "maintenance mode"), and SQLite needs no server. `log.mlflow_uri` sends the figures to another
store or a tracking server instead (then nothing of MLflow is in the run folder).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

from taskfed.errors import TaskfedError

TB_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
TRACKING_FILES = (TB_DIR, MLFLOW_DB)  # what a tracker writes into a run folder (not part of its manifest)
_NAME = re.compile(r"[^\w\-. /]")  # MLflow's allowed characters in metric and param names


def tracking_on(log_cfg) -> bool:
    return bool(log_cfg.tensorboard or log_cfg.mlflow)


def check_tracking(log_cfg) -> None:
    """The packages the asked-for sinks need are installed (one sentence naming the extra, else)."""
    import importlib.util

    for on, key, module in ((log_cfg.tensorboard, "log.tensorboard", "tensorboard"), (log_cfg.mlflow, "log.mlflow", "mlflow")):
        if on and importlib.util.find_spec(module) is None:
            raise TaskfedError(f"{key} = true needs the `log` extra: pip install 'taskfed[log]'.")


def leaves(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], float]]:
    """Every numeric leaf of a JSON-like tree with its path (bools and None are not figures)."""
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from leaves(tree[key], (*path, str(key)))
    elif isinstance(tree, (list, tuple)):
        for i, item in enumerate(tree):
            yield from leaves(item, (*path, str(i)))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and math.isfinite(tree):
        yield path, float(tree)


def figures(metrics: dict) -> dict[tuple[str, int], float]:
    """metrics.json (or the part of it that exists yet) as {(name, step): value}."""
    last = len(metrics.get("rounds", []))
    out: dict[tuple[str, int], float] = {}
    for record in metrics.get("rounds", []):
        step = int(record["round"]) + 1
        for path, value in leaves({k: v for k, v in record.items() if k != "round"}):
            out[("/".join(("round", *path)), step)] = value
        if record.get("seconds"):
            out[("round/tokens_per_s", step)] = record.get("train_tokens", 0) / record["seconds"]
    for mode, block in metrics.get("eval", {}).items():
        for path, value in leaves(block):
            out[("/".join(("eval", mode, *path)), last)] = value
    for path, value in leaves({k: v for k, v in metrics.items() if k not in ("rounds", "eval")}):
        out[("/".join(path), last)] = value
    return {(_NAME.sub("_", name), step): v for (name, step), v in out.items()}


def params(config: dict) -> dict[str, str]:
    """The resolved config as flat `section.key` parameters (lists as JSON)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key in sorted(node):
                walk(node[key], f"{prefix}.{key}" if prefix else str(key))
        else:
            out[_NAME.sub("_", prefix)] = json.dumps(node) if isinstance(node, (list, tuple)) or node is None else str(node)

    walk(config, "")
    return out


class _TensorBoard:
    def __init__(self, folder: Path):
        try:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TaskfedError("log.tensorboard = true needs the `log` extra: pip install 'taskfed[log]'.") from None
        self.folder = folder
        self.logged: set[tuple[str, int]] = set()
        if folder.is_dir():  # a resumed run: what the interrupted one logged
            acc = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0})
            acc.Reload()
            for tag in acc.Tags().get("tensors", []):
                self.logged.update((tag, e.step) for e in acc.Tensors(tag))
        self.writer = SummaryWriter(str(folder))

    def log(self, values: dict[tuple[str, int], float], config: dict[str, str] | None) -> None:
        for (name, step), value in sorted(values.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            if (name, step) not in self.logged:
                # double precision and the tensor form: byte counts above 2^24 stay exact
                self.writer.add_scalar(name, value, step, new_style=True, double_precision=True)
                self.logged.add((name, step))
        if config is not None and ("config", 0) not in self.logged:
            self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in config.items()), 0)
            self.logged.add(("config", 0))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TaskfedError("log.mlflow = true needs the `log` extra: pip install 'taskfed[log]'.") from None
        for name in ("mlflow", "alembic"):  # their start-up chatter ("Creating initial MLflow database tables")
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            exp = found.experiment_id if found else self.client.create_experiment(experiment)
            runs = self.client.search_runs([exp], filter_string=f"tags.`taskfed.run` = '{run_id}'", max_results=1)
        except Exception as exc:  # noqa: BLE001 - a store MLflow cannot open is a config error, said once
            raise TaskfedError(f"log.mlflow: cannot open the MLflow store {uri} ({type(exc).__name__}: {exc}).") from None
        if runs:  # a resumed run continues its MLflow run
            self.run = runs[0].info.run_id
            # Every step of every key (not only the latest): the figures that grow with the rounds
            # (bytes_communicated, epsilon spent, ...) were logged at each round's step, and need the later ones.
            self.logged = {(k, m.step) for k in runs[0].data.metrics
                           for m in self.client.get_metric_history(self.run, k)}
            self.has_params = bool(runs[0].data.params)
        else:
            self.run = self.client.create_run(exp, run_name=run_name, tags={"taskfed.run": run_id}).info.run_id
            self.logged, self.has_params = set(), False

    def log(self, values: dict[tuple[str, int], float], config: dict[str, str] | None) -> None:
        from mlflow.entities import Metric, Param

        new = [(name, step, v) for (name, step), v in sorted(values.items()) if (name, step) not in self.logged]
        now = int(time.time() * 1000)  # wall time for the UI's time axis (0 would read as 1970)
        metrics = [Metric(name, v, now, step) for name, step, v in new]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run, metrics=metrics[i:i + 1000])
        self.logged.update((name, step) for name, step, _ in new)
        if config is not None and not self.has_params:
            items = [Param(k, v[:6000]) for k, v in config.items()]  # MLflow's limit on a param's value
            for i in range(0, len(items), 100):  # and on params a batch
                self.client.log_batch(self.run, params=items[i:i + 100])
            self.has_params = True

    def close(self) -> None:
        self.client.set_terminated(self.run)


class Tracker:
    """The sinks `[log]` asks for, logging into `folder` (the run's `.partial` folder while it runs)."""

    def __init__(self, log_cfg, folder: Path, config: dict, name: str, run_id: str):
        self.folder = Path(folder)
        self.config = params(config)
        self.sinks: list = []
        if log_cfg.tensorboard:
            self.sinks.append(_TensorBoard(self.folder / TB_DIR))
        if log_cfg.mlflow:
            uri = log_cfg.mlflow_uri or f"sqlite:///{(self.folder / MLFLOW_DB).absolute()}"
            self.sinks.append(_MLflow(uri, f"taskfed-{name}", f"{name}-{run_id}", run_id))

    def log(self, metrics: dict, final: bool = False) -> None:
        """Whatever of `metrics` is not logged yet; `final` adds the config (once, with the last figures)."""
        values = figures(metrics)
        for sink in self.sinks:
            sink.log(values, self.config if final else None)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def move_into(self, run_folder: Path) -> None:
        """The closed tracker's files into the finished run folder (they were written in the partial one)."""
        for name in TRACKING_FILES:
            if (self.folder / name).exists():
                os.replace(self.folder / name, Path(run_folder) / name)
