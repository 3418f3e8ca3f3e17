"""The one federation driver: the whole life of a run, for any engine (engine/__init__.py).

    connect     the engine says who the clients are; the server builds the method from public facts
    setup       each client's setup (e.g. FedRouter's local clustering) -> `setup_server`
    rounds      seeded client choice -> `plan` -> the engine's results, streamed into `aggregate` in plan
                order -> the round's record (`round_report`)
    evaluation  per mode: what each client is to be evaluated on and is sent (`downlink`) -> the engine's
                per-client evaluations -> the mode's metrics (`mode_metrics`, the method's extras)
    run folder  resolved config, metrics.json, the server's adapters, the clients' (where the engine keeps
                them), report.md: written under a temporary name, renamed into place when complete
    checkpoints after setup, every round and every evaluation mode, in RUN_DIR.partial/ (checkpoint.py):
                the driver's bookkeeping, the method's server state, the clients' stores where the engine
                keeps them; `run(out, resume=True)` continues from the newest good one, to the same result

`taskfed run` (InProcessEngine) and the Flower ServerApp (FlowerEngine) both run this; the round loop exists
here only. The server side never sees a client object: what it knows of a client came through the engine.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tomli_w
import torch

from taskfed import faults, privacy, progress
from taskfed.checkpoint import Checkpoint, Checkpoints
from taskfed.config import RunConfig
from taskfed.engine import Engine, RoundStats
from taskfed.errors import TaskfedError
from taskfed.evaluation.evaluate import mode_metrics
from taskfed.evaluation.rows import FILE as SCORES, rows_of, write_scores
from taskfed.methods import build_method
from taskfed.methods.base import Federation, Method
from taskfed.model.peft_io import NON_FINITE, save_adapter
from taskfed.population import sample_clients
from taskfed.routing import write_router
from taskfed.runfolder import OutLock, check_out, discard, finish_out, plain, prepare_out
from taskfed.tracking import Tracker, check_tracking, tracking_on


class Diverged(TaskfedError):
    """A round short of min_replies because its trainings diverged (uploads with NaN or infinite values)."""


def tasks_for(mode: str, own: list[str], seen: list[str], unseen: list[str]) -> list[str]:
    """The tasks a client is evaluated on: its own (local), every seen task (global), the held-out ones."""
    return list(own) if mode == "local" else list(seen) if mode == "global" else list(unseen)


def lora_description(cfg: RunConfig) -> dict[str, Any]:
    return dict(base_model=cfg.model.name, r=cfg.lora.r, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules)


class Driver:
    """One federated run over `engine`: `train()` (setup and rounds), `evaluate()`, `run(out_dir)` (both and
    the run folder)."""

    def __init__(self, cfg: RunConfig, engine: Engine, log: Callable[[str], None] = lambda s: None):
        self.cfg, self.engine, self.log = cfg, engine, log
        torch.manual_seed(cfg.seed)
        self.roster = engine.connect()
        self.init_adapter = engine.init_adapter()
        self.build(sorted(self.roster.clients))
        self.setup_seconds = 0.0
        self.left_out: dict[str, str] = {}  # clients whose setup failed or was refused, and why
        self.released: list[str] = []  # clients whose private centroids the server received
        self.rates: list[float] = []  # privacy.updates: the sampling rate of each round that uploaded
        self.rounds: list[dict] = []  # the records of the rounds done
        self.setup_bytes: int | None = None  # None: setup not done yet
        self.evaluation: dict[str, dict] = {}  # the modes evaluated so far
        self.scores: dict[str, list[dict]] = {}  # their per-row scores (scores.csv), by mode
        self.ckpts: Checkpoints | None = None
        self.short: tuple[int, int] | None = None  # the last round's (clients that uploaded, min_replies) if short
        self.tracker: Tracker | None = None  # [log]: opened with the run folder's first checkpoint

    def build(self, clients: list[str]) -> None:
        """The federation's public facts and the method's server side, for these clients."""
        cfg = self.cfg
        run = self.fed.run if hasattr(self, "fed") else os.urandom(8).hex()  # one id for the run, kept on resume
        self.fed = Federation(clients=clients, rounds=cfg.train.rounds, seed=cfg.seed, init_adapter=self.init_adapter,
                              tasks=list(self.roster.seen), lr_max=cfg.train.lr_max, lr_min=cfg.train.lr_min, run=run)
        self.method: Method = build_method(cfg.method, self.fed)

    # ----------------------------------------------------------------- training
    def setup(self) -> int:
        """The clients' setup and the server's; bytes up."""
        tic = time.perf_counter()
        with progress.task("client setup", total=len(self.fed.clients), unit="clients"):
            uploads, up, failed = self.engine.setup(self.fed)
        # Private centroids arrive as noisy sums and counts: the server's centroids are their ratio.
        uploads, refused = privacy.receive_centroids(uploads, self.cfg)
        failed.update(refused)
        self.released = sorted(c for c in uploads if c not in failed) if privacy.centroids_on(self.cfg) else []
        failed.update(self.method.check_setup({c: u for c, u in uploads.items() if c not in failed}))
        if failed:  # membership is fixed here: the run goes on without them, from a fresh server side
            keep = [c for c in self.fed.clients if c not in failed]
            if not keep:
                raise TaskfedError(f"setup: no client completed it ({'; '.join(f'{c}: {w}' for c, w in sorted(failed.items()))}).")
            for cid, why in sorted(failed.items()):
                self.log(f"setup: client {cid} left out of the run: {why}")
            self.left_out.update(failed)
            self.roster.clients = {c: self.roster.clients[c] for c in keep}
            self.build(keep)
            self.engine.attach(self.fed)  # the clients' side from the new facts too
            uploads = {c: u for c, u in uploads.items() if c in keep}
        if uploads:
            self.method.setup_server(uploads)
        self.setup_seconds = time.perf_counter() - tic  # e.g. FedRouter's embedding + KMeans
        return up

    def round(self, r: int) -> dict[str, Any]:
        start = time.perf_counter()
        selected = sample_clients(self.fed.clients, self.cfg.scenario.clients_per_round, self.cfg.seed, r)
        jobs = self.method.plan(r, selected)
        total = self.method.n_rounds(self.cfg.train.rounds)
        senders: set[str] = set()
        with progress.task(f"round {r + 1}/{total}", total=len(jobs), unit="jobs"):
            results, stats = self.engine.stream(r, jobs)

            def uploads():
                for x in results:
                    if x.weights is not None:
                        senders.add(x.job.client)
                        yield x

            # The server receives uploads only (a job that keeps its adapter on the client sends nothing),
            # one at a time as they arrive: a streaming aggregation never holds the whole round. Under
            # privacy.updates the aggregation's means are noised (privacy.aggregation).
            with privacy.aggregation(self.cfg, r):
                self.method.aggregate(r, _faulted(uploads(), f"round-{r + 1}.aggregate"))
            for _ in uploads():  # what the aggregation did not pull (e.g. Local's client-kept jobs) still runs
                pass
        planned = {j.client for j in jobs if j.upload}
        if senders:  # the accountant's round: every client trained (q = 1) or a sample of them
            s = self.cfg.scenario
            everyone = planned - set(selected)
            self.rates.append(1.0 if everyone or s.clients_per_round is None else s.clients_per_round / s.n_clients)
        need = min(self.cfg.train.min_replies, len(planned))
        self.short = (len(senders), need) if len(senders) < need else None
        record = round_record(r, stats, time.perf_counter() - start)
        record.update(self.method.round_report(r))
        for who, why in stats.dropped.items():
            self.log(f"round {r + 1}: dropped {who}: {why}")
        return record

    def train(self) -> tuple[list[dict], int]:
        """Setup and every round not done yet (a resumed run starts after its checkpoint's)."""
        if self.setup_bytes is None:
            self.setup_bytes = self.setup()
            faults.hit("setup.done")
            self.checkpoint(0, "setup")
        total = self.method.n_rounds(self.cfg.train.rounds)
        r, retries = len(self.rounds), 0
        while r < total:
            record = self.round(r)
            if self.short:  # too few clients answered: the round never counts
                got, need = self.short
                diverged = {who: why for who, why in record.get("dropped", {}).items() if NON_FINITE in why}
                if diverged:  # deterministic: a retry would diverge again, and resuming cannot help
                    raise Diverged(self.diverged(r, diverged, got, need))
                why = f"round {r + 1}: uploads of {got} clients arrived, train.min_replies needs {need}"
                if retries < self.cfg.train.round_retries and self.ckpts is not None and self.ckpts.steps():
                    retries += 1
                    self.log(f"{why}; retrying it from the last checkpoint ({retries}/{self.cfg.train.round_retries})")
                    self.restore(self.ckpts.latest(self.log))
                    r = len(self.rounds)
                    continue
                raise TaskfedError(f"{why}; stopped" + (" (the last checkpoint is kept: bring the clients back and "
                                                        "rerun with --resume)." if self.ckpts is not None else "."))
            retries = 0
            self.rounds.append(record)
            self.log(f"round {r + 1}/{total}: loss {self.rounds[-1]['train_loss']:.4f}, {self.rounds[-1]['seconds']:.1f}s")
            self.checkpoint(r + 1, f"round {r + 1} of {total}")
            self.track()
            r += 1
        return self.rounds, self.setup_bytes

    def diverged(self, r: int, diverged: dict[str, str], got: int, need: int) -> str:
        """The sentence for a round whose trainings diverged (their uploads hold NaN or infinite values)."""
        who = sorted({key.split("/")[0] for key in diverged})  # CLIENT or CLIENT/ADAPTER (round_record)
        first = diverged[min(diverged)]
        kept = f"the last checkpoint is kept in {self.ckpts.folder}; " if self.ckpts is not None and self.ckpts.steps() else ""
        return (f"round {r + 1}: training diverged on client{'s' if len(who) > 1 else ''} {', '.join(who)}, so {got} "
                f"uploads arrived where train.min_replies needs {need} ({first.rstrip('.')}); stopped ({kept}resuming "
                f"the same config would diverge again): lower train.lr_max or the method's step sizes and "
                f"strengths (method.*), then start again with another --out (or remove the checkpoints).")

    # ----------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        out = self.evaluation
        seen, unseen = self.roster.seen, self.roster.unseen
        total = self.method.n_rounds(self.cfg.train.rounds)
        for i, mode in enumerate(self.cfg.eval.modes):
            if mode in out:  # evaluated before the run was interrupted
                continue
            if mode == "unseen" and not unseen:
                self.log("eval mode 'unseen' skipped: no data.unseen_tasks")
                continue
            start = time.perf_counter()
            asks = {cid: tasks_for(mode, info.tasks, seen, unseen) for cid, info in self.roster.clients.items()}
            with progress.task(f"eval {mode}", total=len(asks), unit="clients"):
                evals, dropped = self.engine.evaluate(mode, asks, self.method.downlink)
            faults.hit(f"eval.{mode}")
            # A client's report is checked by the method before its bookkeeping uses it (it may come from a node).
            for cid in sorted(evals):
                why = self.method.check_report(evals[cid].routed)
                if why:
                    dropped[cid] = f"evaluation report refused: {why}"
                    del evals[cid]
            out[mode] = mode_metrics(self.method, mode, evals)
            self.scores[mode] = [row for cid in sorted(evals) for row in rows_of(
                mode, cid, evals[cid].routed.tasks, evals[cid].routed.names, evals[cid].routed.mix.idx.tolist(),
                evals[cid].routed.mix.w.tolist(), evals[cid].rows)]
            if dropped:
                out[mode]["dropped"] = dict(sorted(dropped.items()))
                for cid, why in sorted(dropped.items()):
                    self.log(f"eval {mode}: dropped client {cid}: {why}")
            out[mode]["seconds"] = time.perf_counter() - start
            score = out[mode]["score"]
            self.log(f"eval {mode}: score {'-' if score is None else f'{score:.4f}'}")
            self.checkpoint(total + 1 + i, f"evaluation {mode}")
            self.track()
        return out

    # ----------------------------------------------------------------- the run
    def metrics(self, rounds: list[dict], setup_bytes: int, evaluation: dict) -> dict:
        return {
            "method": self.cfg.method_name, "scenario": self.cfg.scenario.name, "seed": self.cfg.seed,
            "engine": self.engine.name, "bytes_communicated": setup_bytes + sum(r["bytes_up"] + r["bytes_down"] for r in rounds),
            "rounds": rounds, "eval": evaluation, "setup_seconds": self.setup_seconds,
            "clients": {cid: {"n_train": c.n_train, "tasks": list(c.tasks)} for cid, c in sorted(self.roster.clients.items())},
            **({"left_out": dict(sorted(self.left_out.items()))} if self.left_out else {}),
            **({"privacy": privacy.report(self.cfg, self.rates, self.released, list(self.fed.clients))}
               if privacy.centroids_on(self.cfg) or privacy.updates_on(self.cfg) else {}),
        }

    def run(self, out_dir: str | Path | None = None, resume: bool = False) -> dict:
        """Trains, evaluates and writes the run folder `out_dir`, checkpointing into `out_dir`.partial/ on the
        way; `resume` continues from its newest good checkpoint (or starts when there is none)."""
        out_dir = Path(out_dir) if out_dir is not None else None
        tmp, lock = None, None
        try:
            if tracking_on(self.cfg.log):  # said now, not after the first round
                if out_dir is None:
                    raise TaskfedError("log.tensorboard / log.mlflow need a run folder (--out): the logs are kept in it.")
                check_tracking(self.cfg.log)
            if out_dir is not None:
                check_out(out_dir, resume, self.log)  # before any training: the run folder must be creatable
                lock = OutLock(out_dir).acquire()  # one process per run, until it ends
                self.open_checkpoints(out_dir, resume)
            rounds, setup_bytes = self.train()
            metrics = self.metrics(rounds, setup_bytes, self.evaluate())
            if out_dir is not None:
                self.track(final=True)
                tmp = prepare_out(out_dir)
                self.write(tmp, metrics)
                if self.tracker is not None:
                    self.tracker.close()
                    self.tracker.move_into(tmp)
                faults.hit("final.before_rename")
                finish_out(tmp, out_dir)
                faults.hit("final.after_rename")
                self.ckpts.remove()  # the run folder is whole: the checkpoints have done their job
            return metrics
        except BaseException as exc:
            discard(tmp)
            if self.ckpts is not None:
                if isinstance(exc, Diverged):  # its sentence says what to do; --resume would diverge again
                    pass
                elif self.ckpts.steps():  # possibly days of work: kept, never deleted silently
                    how = "rerun the same command" + ("" if resume else " with --resume")  # a bench resumes as it is
                    self.log(f"stopped; the last checkpoint is kept in {self.ckpts.folder}: {how} to continue from it")
                else:
                    self.ckpts.remove()
                    self.log("stopped before the first checkpoint: nothing was kept")
            raise
        finally:
            if self.tracker is not None:
                self.tracker.close()  # flushed: what was logged stays for the resumed run
            if lock is not None:
                lock.release()
            self.engine.close()

    # ----------------------------------------------------------------- checkpoints
    def open_checkpoints(self, out_dir: Path, resume: bool) -> None:
        config = json.loads(self.cfg.model_dump_json())
        config.pop("log")  # tracking changes no figure: a resume may turn it on or off
        ckpts = Checkpoints(out_dir, config)
        if ckpts.exists() and not resume:
            raise TaskfedError(f"{ckpts.folder}: holds an interrupted run; continue it with --resume, or remove "
                               f"the folder to start over.")
        found = ckpts.latest(self.log) if resume else None
        if resume and found is None:
            self.log(f"resume: no checkpoint in {ckpts.folder}; starting from the beginning")
        self.ckpts = ckpts
        if found is not None:
            self.restore(found)

    def track(self, final: bool = False) -> None:
        """[log]: what metrics.json holds so far to the tracker (opened at the first call: the run folder's
        `.partial` then holds a checkpoint, so its log files never make an empty partial look like a run)."""
        if self.ckpts is None or not tracking_on(self.cfg.log):
            return
        if self.tracker is None:
            self.tracker = Tracker(self.cfg.log, self.ckpts.folder, json.loads(self.cfg.model_dump_json()),
                                   self.cfg.method_name, self.fed.run)
        self.tracker.log(self.metrics(self.rounds, self.setup_bytes or 0, self.evaluation), final)

    def checkpoint(self, step: int, label: str) -> None:
        if self.ckpts is None:
            return
        driver = {"step": step, "run": self.fed.run, "rounds": self.rounds, "setup_bytes": self.setup_bytes,
                  "setup_seconds": self.setup_seconds, "left_out": self.left_out, "released": self.released,
                  "rates": self.rates, "evaluation": self.evaluation, "scores": self.scores,
                  "torch_rng": torch.get_rng_state(),
                  "clients": {c: [i.n_train, list(i.tasks), i.data, i.base] for c, i in self.roster.clients.items()}}
        parts = {"driver": driver, "server": self.method.state_dict()}
        for cid, store in (self.engine.client_state() or {}).items():  # one part per client
            parts[f"client.{cid}"] = store
        self.ckpts.write(step, label, parts)

    def restore(self, ckpt: Checkpoint) -> None:
        """The run as it was at `ckpt`: membership, the method's server state, the clients' stores (or, on
        an engine whose clients keep their own, the step they must hold), the bookkeeping, the RNG."""
        d = ckpt.part("driver")
        missing = sorted(set(d["clients"]) - set(self.roster.clients))
        if missing:
            raise TaskfedError(f"{ckpt.folder}: client {missing[0]} of the interrupted run is not connected; "
                               f"resume with the same clients.")
        for cid, (_, _, data, base) in sorted(d["clients"].items()):  # the run goes on with what it started with
            now = self.roster.clients[cid]
            what = "training or test rows" if now.data != data else "base model" if now.base != base else None
            if what:
                raise TaskfedError(f"{ckpt.folder}: the {what} of client {cid} changed since the run was interrupted "
                                   f"(the checkpoint's digest differs); resume with the data and model it was started "
                                   f"with, or start over with another --out.")
        self.roster.clients = {c: self.roster.clients[c] for c in sorted(d["clients"])}
        self.fed.run = d["run"]
        self.build(sorted(d["clients"]))
        self.method.load_state_dict(ckpt.part("server"))
        self.engine.attach(self.fed)
        stores = {c: ckpt.part(f"client.{c}") for c in self.fed.clients if (ckpt.folder / f"client.{c}.json").exists()}
        self.engine.restore_clients(stores or None, ckpt.folder)
        self.rounds, self.setup_bytes, self.setup_seconds = d["rounds"], d["setup_bytes"], d["setup_seconds"]
        self.left_out, self.released, self.rates, self.evaluation = d["left_out"], d["released"], d["rates"], d["evaluation"]
        self.scores = d["scores"]
        torch.set_rng_state(d["torch_rng"])
        self.log(f"resumed from {ckpt.folder} ({ckpt.label})")

    def write(self, folder: Path, metrics: dict) -> None:
        """The run folder: config.toml (the resolved config, runnable as it is), metrics.json, scores.csv (the
        per-row scores), the server's adapters and the clients' (PEFT format), report.md."""
        from taskfed.report import run_report

        cfg = self.cfg
        (folder / "config.toml").write_text(tomli_w.dumps(plain(cfg.model_dump())))
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        write_scores(folder / SCORES, [row for mode in self.scores for row in self.scores[mode]])
        lora = lora_description(cfg)
        adapters = {}  # every adapter's serving name -> its folder (router.json)
        for name, weights in self.method.server_adapters().items():
            adapters[name] = f"adapters/server/{name.replace('/', '_')}"
            save_adapter(weights, folder / adapters[name], **lora)
        files = self.engine.save_client_files(folder, lora, self.method.downlink)
        for (cid, name), rel in files.adapters.items():
            adapters[f"{name}@{cid}"] = rel
        arrays: dict[str, dict[str, str]] = {}  # array name -> client -> file (router.json)
        for (cid, name), rel in files.arrays.items():
            arrays.setdefault(name, {})[cid] = rel
        self.write_router(folder, adapters, arrays)
        (folder / "report.md").write_text(run_report(metrics))

    def write_router(self, folder: Path, adapters: dict[str, str], client_arrays: dict[str, dict[str, str]]) -> None:
        """router.json + router.safetensors (taskfed/routing.py): the method's router, from its server state."""
        cfg = self.cfg
        state = self.method.router_state()
        if state.kind == "nearest" and privacy.centroids_on(cfg):  # the router clips inputs as the run did
            state.clip = cfg.privacy.centroids.clip
        meta = {"method": cfg.method_name, "run": self.fed.run, "rounds": len(self.rounds), "seed": cfg.seed,
                "base_model": cfg.model.name, "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha,
                                                       "target_modules": list(cfg.lora.target_modules)},
                "template": cfg.data.template, "max_length": cfg.data.max_length, "clients": list(self.fed.clients),
                "client_arrays": client_arrays}
        write_router(folder, state, meta, adapters)


def _faulted(results, point: str):
    """The uploads as the aggregation folds them in, with the crash tests' mid-aggregation point (after the
    first upload is folded in, while later ones still train)."""
    for x in results:
        yield x
        faults.hit(point)


def round_record(r: int, stats: RoundStats, seconds: float) -> dict[str, Any]:
    """A round's entry in metrics.json (the same keys on every engine, plus the engine's own timings)."""
    return {"round": r, "train_loss": stats.loss, "bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down,
            "seconds": seconds, "compute_seconds": stats.compute_seconds, "train_tokens": stats.tokens,
            **({"dropped": dict(stats.dropped)} if stats.dropped else {}), **stats.extra}
