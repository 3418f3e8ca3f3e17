"""The in-process engine: every client on one machine, one loaded base model, jobs run one by one or
packed several per batch on the adapter bank. It knows nothing of a particular method (engine/__init__.py).

The method's client side runs on an instance of the engine's own, built from the federation's public facts
in `attach` (never the server's object). A Flower node runs its client through this same class, holding a
one-client population, so a node trains and evaluates exactly what this engine would for that client.

What crosses the client/server line is counted in bytes: adapters sent down with a job (once per client
and round, however many of its jobs share them), adapters uploaded, and arrays returned by client setup.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from taskfed import progress
from taskfed.config import RunConfig
from taskfed.engine import ClientFiles, ClientInfo, Roster, RoundStats
from taskfed.errors import TaskfedError
from taskfed.evaluation.evaluate import ClientEval, evaluate_client
from taskfed.memory import release_memory
from taskfed.methods import build_method
from taskfed.methods.base import Client, Downlink, Federation, Job, JobRun, LocalRef, Method, Result, merged, only
from taskfed.model.peft_io import check_upload, check_weights, extra_shapes, n_bytes, save_adapter, shapes_of
from taskfed.population import Population, data_digest
from taskfed.privacy import clip_update, updates_on
from taskfed.runtime import Runtime
from taskfed.packing import group_jobs
from taskfed.state import save_safetensors
from taskfed.training import PackStats, TrainSpec, adapter_losses, cosine_lr, layout_of, sample_order, train_pack


def job_seed(seed: int, round_idx: int, client: str, adapter: str) -> int:
    """A stable per-job seed for row sampling (independent of job order and of Python's hash salt)."""
    return zlib.crc32(f"{seed}/{round_idx}/{client}/{adapter}".encode())


def downlink_bytes(jobs: list[Job]) -> int:
    """Bytes the server sends for these jobs: each distinct server-held adapter once per client, however
    many of the client's jobs share it (client-held adapters, LocalRef, never travel)."""
    sent: set[tuple[str, int]] = set()
    total = 0
    for job in jobs:
        for w in (job.candidates or [job.init]) + [fw for fw, _ in job.frozen] + list(job.extra.values()):
            if not isinstance(w, LocalRef) and (job.client, id(w)) not in sent:
                sent.add((job.client, id(w)))
                total += n_bytes(w)
    return total


class InProcessEngine:
    name = "inprocess"

    def __init__(self, rt: Runtime, pop: Population | dict[str, Client], cfg: RunConfig,
                 gen_cache: dict | None = None):
        if isinstance(pop, dict):  # clients only (to run jobs): no tasks, no test rows
            pop = Population(pop, [], [], {}, {})
        # gen_cache: generations keyed by (prompt, adapter fingerprints and weights, budget); a bench passes
        # one dict to every run on the same runtime so that identical (adapter, input) pairs generate once.
        self.rt, self.pop, self.cfg = rt, pop, cfg
        self.clients: dict[str, Client] = pop.clients
        self.gen_cache = {} if gen_cache is None else gen_cache
        self.client_side: Method | None = None  # the method's client hooks, from `attach`
        self._budgets: dict[str, int] | None = None

    # ----------------------------------------------------------------- the federation
    def connect(self) -> Roster:
        return Roster({cid: ClientInfo(len(c.records), c.tasks, data_digest(self.pop, cid), self.rt.fingerprint)
                       for cid, c in sorted(self.clients.items())},
                      list(self.pop.seen), list(self.pop.unseen))

    def init_adapter(self):
        return self.rt.init_adapter()

    def attach(self, fed: Federation) -> Method:
        """The method's client side: a fresh instance from the federation's public facts and the config."""
        self.client_side = build_method(self.cfg.method, fed)
        return self.client_side

    def close(self) -> None:
        pass

    # ----------------------------------------------------------------- checkpoints
    def client_state(self) -> dict:
        """Every client's store, for the driver's checkpoint (the clients live here, so their state does)."""
        return {cid: dict(c.store) for cid, c in sorted(self.clients.items())}

    def restore_clients(self, state: dict | None, where) -> None:
        missing = sorted(set(self.client_side.fed.clients) - set(state or {}))
        if missing:
            raise TaskfedError(f"{where}: holds no state of client {missing[0]} (client.{missing[0]}.json); the "
                               f"checkpoint is incomplete: remove it to resume from the one before, or start over.")
        for cid, store in state.items():
            if cid in self.clients:
                self.clients[cid].store = dict(store)

    # ----------------------------------------------------------------- client side of a job
    def _spec(self, job: Job, round_idx: int) -> tuple[TrainSpec, int, int | None]:
        client = self.clients[job.client]
        records = client.select(job.rows)
        if not records:
            raise ValueError(f"job {job.adapter} on client {job.client} selects no rows")
        tc = self.cfg.train
        rows = [self.rt.encode(r) for r in records]
        seed = job_seed(self.cfg.seed, round_idx, job.client, job.adapter)
        batch = job.batch or tc.batch
        chosen = None
        if job.candidates:
            probe = [rows[i] for i in sample_order(len(rows), batch, seed + 1)]
            chosen = int(np.argmin(adapter_losses(self.rt, job.candidates, probe)))
            init = job.candidates[chosen]
        else:
            init = client.resolve(job.init)
        if job.fill is not None:  # a partial start: the keys the server did not send are the client's own
            init = merged(client.resolve(job.fill), init)
        check_weights(init, self.rt.bank.shapes(), f"the start of job {job.adapter} on client {job.client}")
        for name, w in sorted(job.extra.items()):  # what the method's client hooks read, whole
            check_weights(w, extra_shapes(self.rt.bank.shapes(), shapes_of(w)),
                          f"'{name}' of job {job.adapter} on client {job.client}")
        spec = TrainSpec(
            init=init, rows=rows, steps=job.steps or tc.steps, batch=batch,
            lr=job.lr if job.lr is not None else cosine_lr(round_idx, tc.rounds, tc.lr_max, tc.lr_min), seed=seed, prox_mu=job.prox_mu,
            prox_ref=init if job.prox_mu > 0 else None, scale=job.scale,
            frozen=[(client.resolve(w), coef) for w, coef in job.frozen], trains=tuple(job.trains),
            correction=side.job_correction(client, job) if (side := self.client_side) else None)
        return spec, len(records), chosen

    # ----------------------------------------------------------------- a round
    def run(self, round_idx: int, jobs: list[Job]) -> tuple[list[Result], RoundStats]:
        """The round's results in plan order, all at once (a Flower node answers with the whole list)."""
        results, stats = self.stream(round_idx, jobs)
        return list(results), stats

    def stream(self, round_idx: int, jobs: list[Job]) -> tuple[Iterator[Result], RoundStats]:
        """The round's results in plan order, lazily: iterating trains pack after pack and yields each job's
        result as soon as it and every job planned before it are done, and keeps no reference to it after, so
        a streaming aggregation holds one running sum instead of every upload (64 clients' SmolLM2 adapters
        are 118 MB). `stats` is complete once the iterator is exhausted."""
        stats = RoundStats()
        stats.bytes_down = downlink_bytes(jobs)
        return self._results(round_idx, jobs, stats), stats

    def _results(self, round_idx: int, jobs: list[Job], stats: RoundStats) -> Iterator[Result]:
        resolved = [self._spec(job, round_idx) for job in jobs]
        specs = [s for s, _, _ in resolved]
        # What each job started from (a reference, no copy): under privacy.updates an upload's change from it
        # is clipped on the client.
        meta = [(n_rows, chosen, s.init, s.steps, s.lr) for s, n_rows, chosen in resolved]
        del resolved
        trained: dict[int, tuple] = {}
        times = PackStats()
        layout = layout_of(self.rt)  # once per round: the token budget from the free memory before it
        packs = group_jobs([(s.steps, s.lr) for s in specs], [s.batch for s in specs], layout, self.cfg.train.concurrent)
        progress.set_total(sum(specs[p[0]].steps for p in packs), "steps")  # advanced by train_pack, per step
        shapes = self.rt.bank.shapes()
        losses, ready = [], 0
        for pack in packs:
            for i, out in zip(pack, train_pack(self.rt, [specs[i] for i in pack], times, layout)):
                trained[i] = out
                specs[i] = None  # the spec's rows and starting weights are no longer needed
            stats.compute_seconds, stats.tokens = times.compute, times.tokens
            release_memory()
            while ready in trained:
                weights, loss = trained.pop(ready)
                result = self._result(jobs[ready], *meta[ready], weights, loss, shapes, stats)
                ready += 1
                if result is not None:  # the round's loss is over the results the server accepts
                    losses.append(loss)
                    yield result
                del weights, result  # not held by this frame while the next pack trains
        if losses:
            stats.loss = float(np.mean(losses))

    def _result(self, job: Job, n_rows: int, chosen: int | None, init, steps: int, lr: float, weights,
                loss: float, shapes, stats: RoundStats) -> Result | None:
        """A trained job as the server sees it: kept on the client and/or uploaded (the parts it sends, and
        what the method's `job_done` adds), the upload checked. Under privacy.updates the upload's change
        from the job's starting weights is clipped here, on the client (a Flower node runs this same code),
        before anything leaves it; what the client keeps is unclipped."""
        client = self.clients[job.client]
        # (an engine not attached to a method, e.g. a test running bare jobs, has no client hooks)
        extra = self.client_side.job_done(client, job, JobRun(init, weights, steps, lr)) if self.client_side else {}
        if job.keep_as:
            client.store[job.keep_as] = weights
        if job.upload:
            weights = only(weights, tuple(job.sends))
            if updates_on(self.cfg):
                weights = clip_update(weights, init, self.cfg.privacy.updates.clip)
            stats.bytes_up += n_bytes(weights) + sum(n_bytes(x) for x in extra.values())
            # The server checks every upload (keys, shapes, finite values); a bad one is left out of
            # the round with its reason, and the round goes on with the others.
            try:
                check_upload(weights, extra, shapes, job, f"upload of client {job.client}")
            except TaskfedError as exc:  # the loss says whether the training itself diverged
                stats.dropped[f"{job.client}/{job.adapter}"] = f"{str(exc).rstrip('.')} (training loss {loss:.4g})."
                return None
        return Result(job=job, weights=weights if job.upload else None, n_rows=n_rows,
                      n_client=len(client.records), loss=loss, chosen=chosen, extra=extra if job.upload else {})

    def setup(self, fed: Federation) -> tuple[dict[str, dict[str, np.ndarray]], int, dict[str, str]]:
        """Runs the method's client setup on every client: the arrays each returns (for the server), their
        bytes, and (never, here: an exception stops the run) the clients whose setup failed."""
        method = self.attach(fed)
        uploads, up = {}, 0
        for cid in sorted(self.clients):
            out = method.setup_client(self.clients[cid], self.rt)
            if out is not None:
                uploads[cid] = out
                up += sum(np.asarray(v).nbytes for v in out.values())
            progress.advance()
        return uploads, up, {}

    # ----------------------------------------------------------------- evaluation
    def budgets(self) -> dict[str, int]:
        """The answer budget (new tokens) per task, computed once."""
        if self._budgets is None:
            from taskfed.population import answer_budgets

            self._budgets = answer_budgets(self.pop, self.rt.n_answer_tokens, self.cfg.eval.max_new_tokens)
        return self._budgets

    def evaluate(self, mode: str, asks: dict[str, list[str]],
                 downlink: Callable[[str], Downlink]) -> tuple[dict[str, ClientEval], dict[str, str]]:
        """Each asked client evaluates its rows of the asked tasks (tasks without test rows are skipped; a
        client with none is not evaluated) under what the server sends it. Nothing is dropped here."""
        out = {}
        rows = {cid: [r for t in asks[cid] for r in self.pop.test_by_task.get(t, [])] for cid in sorted(asks)}
        progress.set_total(sum(map(len, rows.values())), "rows")  # advanced per generated batch and cached row
        for cid, records in rows.items():
            if records:
                out[cid] = evaluate_client(self.rt, self.client_side, self.clients[cid], records, downlink(cid),
                                           self.budgets(), self.gen_cache)
        return out, {}

    def save_client_files(self, folder: Path, lora: dict,
                          downlink: Callable[[str], Downlink] | None = None) -> ClientFiles:
        """Client-owned adapters and arrays (never sent to the server) under adapters/clients/<id>/ in the run
        folder; returns where each went, relative to `folder`. `downlink` (the server's, where the driver
        gives it) is what each client would be sent for evaluation: a personal model may combine the two."""
        files = ClientFiles()
        for cid, client in sorted(self.clients.items()):
            sent = downlink(cid) if downlink is not None else None
            for name, weights in self.client_side.client_adapters(client, sent).items():
                rel = f"adapters/clients/{cid}/{name.replace('/', '_')}"
                save_adapter(weights, Path(folder) / rel, **lora)
                files.adapters[(cid, name)] = rel
            for name, tensors in self.client_side.client_arrays(client, self.rt, sent).items():
                rel = f"adapters/clients/{cid}/{name}.safetensors"
                (Path(folder) / rel).parent.mkdir(parents=True, exist_ok=True)
                save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, Path(folder) / rel)
                files.arrays[(cid, name)] = rel
        return files
