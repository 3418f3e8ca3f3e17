"""The contract between a method and an engine (architecture.md, "The round as jobs").

A method never trains anything itself. Each round its server side states jobs; an engine (in-process,
or Flower) runs them where the client's data lives and returns results; the server side aggregates.
State that belongs to a client (a local adapter, local cluster labels) lives in that client's `store`,
which only the method's *client-side* hooks touch; the server side sees only what results carry.

Server side:  setup_server(uploads)     plan(round, clients) -> [Job]     aggregate(round, results in plan order)
              server_adapters()     downlink(client) -> Downlink (what a client is sent for evaluation)
              eval_report(mode, [Routed]) -> metrics.json extras, from what the clients reported
Client side:  setup_client(client, rt) -> arrays for the server (optional, before round 0)
              job_correction(client, job) -> a per-step correction of the job's training (SCAFFOLD)
              job_done(client, job, run) -> extra adapter-shaped arrays uploaded with the job's result
              eval_adapters(client, sent) -> {name: weights}     route(client, records, names, rt, sent) -> RowMix
              eval_facts(client) -> arrays for the evaluation's bookkeeping
              client_adapters(client, sent), client_arrays(client, rt, sent) -> what the client keeps at the end of a run

The client side of a method reads nothing but its client and what was sent to it (a Job, a Downlink, the
Federation's public facts): an engine runs it on an instance of its own (a Flower node builds a fresh one),
never on the server's object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Callable, ClassVar, Hashable, Iterable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from taskfed.data.records import Record
from taskfed.model.bank import AdapterWeights, RowMix
from taskfed.model.parts import PARTS, merged, only, part_of  # noqa: F401  (the methods' vocabulary)
from taskfed.privacy import contributor_weight, noised
from taskfed.routing import RouterState


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


@dataclass(frozen=True)
class LocalRef:
    """An adapter the client holds in its own store (never sent); `default` when the store has none yet."""

    name: str
    default: AdapterWeights | None = None


# Row selectors, resolved on the client: all rows; the rows of one task; the rows whose label in the
# client's store (an int array, one entry per row) equals a value.
ALL_ROWS: tuple = ()


def task_rows(task: str) -> tuple:
    return ("task", task)


def label_rows(key: str, value: int) -> tuple:
    return ("label", key, int(value))


@dataclass
class Job:
    client: str
    adapter: str  # what the result is for: "global", "cluster/3", "task/snli", "local", ...
    init: AdapterWeights | LocalRef
    rows: tuple = ALL_ROWS
    steps: int | None = None  # None: the config's train.steps / train.batch
    batch: int | None = None
    lr: float | None = None  # None: the round's learning rate on the cosine schedule
    prox_mu: float = 0.0  # FedProx: mu/2 ||w - init||^2
    scale: float = 1.0  # weight of the trained adapter in the layer output
    frozen: list[tuple[AdapterWeights | LocalRef, float]] = field(default_factory=list)  # detached terms
    keep_as: str | None = None  # store the trained weights in the client's store under this name
    upload: bool = True  # send the trained weights to the server
    # IFCA: start from whichever candidate has the lowest loss on one seeded batch of the job's rows
    # (then `init` is ignored and Result.chosen says which).
    candidates: list[AdapterWeights] | None = None
    # When `init` is a partial adapter (only the parts the server sends): where the client takes the other
    # keys from, e.g. its own B (FedSA-LoRA) or the run's seeded A0 (FFA-LoRA), which never travel.
    fill: LocalRef | None = None
    trains: tuple[str, ...] = PARTS  # the factors the optimizer updates; the others stay as they started
    sends: tuple[str, ...] = PARTS  # the factors uploaded (when `upload`)
    # Adapter-shaped arrays sent with the job for the method's client side (SCAFFOLD's control variate c),
    # counted in the bytes down like the adapters.
    extra: dict[str, AdapterWeights] = field(default_factory=dict)


@dataclass
class Gating:
    """A trained per-token gate over a job's terms (the bank's GateMix; FedALT's mixer, FedLEASE's router):
    `gate` ("<module path>.gate": W x d_in per target module) is trained with the job's adapter; logit w
    weighs term `terms[w]` (0: the trained adapter, k >= 1: the job's k-th frozen adapter; repeats alias);
    `top_k` keeps the k largest, renormalised (None: a soft mix over all). The trained gate comes back in
    the job's trained weights, under its own keys (`parts.split_gate`), never in what the job uploads."""

    gate: AdapterWeights
    terms: tuple[int, ...]
    top_k: int | None = None


@dataclass
class Correction:
    """How a job's training departs from the common step, decided on the client: a constant correction per
    factor key (SCAFFOLD's c - c_i; `at = "weights"` subtracts lr x delta from the weights after every
    optimizer step, `at = "grad"` adds delta to the gradient before it), and/or a trained gate (`gating`)."""

    delta: AdapterWeights = field(default_factory=dict)
    at: str = "weights"
    gating: Gating | None = None


@dataclass
class JobRun:
    """What the client knows of a finished job: where it started, what it trained to, its budget."""

    start: AdapterWeights
    trained: AdapterWeights
    steps: int
    lr: float


@dataclass
class Result:
    job: Job
    weights: AdapterWeights | None  # None when the job does not upload
    n_rows: int  # rows in the job's selection
    n_client: int  # the client's training rows in all
    loss: float
    chosen: int | None = None  # index into Job.candidates
    extra: dict[str, AdapterWeights] = field(default_factory=dict)  # `Method.job_done`'s upload (SCAFFOLD's dc_i)


@dataclass
class Client:
    """A client's private side: its rows and its store. Only client-side hooks read them."""

    id: str
    records: list[Record]
    store: dict[str, Any] = field(default_factory=dict)
    # Client-side caches (e.g. FedDPA's hidden states of the client's texts): recomputable, so never
    # persisted and never sent.
    scratch: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return sorted({r.task for r in self.records})

    def select(self, rows: tuple) -> list[Record]:
        if rows == ALL_ROWS:
            return self.records
        if rows[0] == "task":
            return [r for r in self.records if r.task == rows[1]]
        if rows[0] == "label":
            labels = np.asarray(self.store[rows[1]])
            return [r for r, lab in zip(self.records, labels) if lab == rows[2]]
        raise ValueError(f"unknown row selector {rows!r}")

    def resolve(self, ref: AdapterWeights | LocalRef) -> AdapterWeights:
        if isinstance(ref, LocalRef):
            held = self.store.get(ref.name, ref.default)
            if held is None:
                raise KeyError(f"client {self.id} holds no adapter '{ref.name}'")
            return held
        return ref


@dataclass
class Federation:
    """What the server side knows at the start: client ids, the budget and the shared initial adapter."""

    clients: list[str]
    rounds: int
    seed: int
    init_adapter: AdapterWeights
    tasks: list[str]  # the seen tasks (for methods whose server needs their count, e.g. FL-TAC's K)
    lr_max: float = 5e-4  # the schedule's ends, for methods that add rounds past the budget
    lr_min: float = 1e-5
    run: str = ""  # the run's id (random, kept across a resume): nodes keep the client's state under it


@dataclass
class Downlink:
    """What the server sends one client for evaluation: adapters by name and plain arrays (e.g. FedRouter's
    global centroids and the client's bindings)."""

    adapters: dict[str, AdapterWeights] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Routed:
    """What one client reports of its evaluation for the method's bookkeeping (never the texts): the true
    task of each evaluated row, the adapter names its mix indexes, the per-row mix, and `eval_facts`."""

    client: str
    tasks: list[str]
    names: list[str]
    mix: RowMix
    facts: dict[str, np.ndarray] = field(default_factory=dict)

    def picked(self) -> list[str]:
        """The adapter of each row's first term (the routed adapter for one-hot routing)."""
        return [self.names[int(i)] for i in self.mix.idx[:, 0].tolist()]


class Method:
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel, fed: Federation):
        self.params = params
        self.fed = fed

    # ---- server side
    def n_rounds(self, rounds: int) -> int:
        """Rounds the run executes for a budget of `rounds` (FedDPA-F adds a local fine-tuning round)."""
        return rounds

    def plan(self, round_idx: int, clients: list[str]) -> list[Job]:
        raise NotImplementedError

    def aggregate(self, round_idx: int, results: Iterable[Result]) -> None:
        """Folds in the round's uploads. `results` arrive in plan order, and an engine may deliver them
        lazily, one pack at a time while later packs still train: a method that can average as they come
        (RunningMean) holds one sum per aggregate, never the whole round; one that needs every upload at
        once (a clustering) takes `list(results)`."""
        raise NotImplementedError

    def server_adapters(self) -> dict[str, AdapterWeights]:
        """The adapters the server holds at the end (saved in the run folder)."""
        return {}

    def router_state(self) -> RouterState:
        """How the trained result routes an input (routing.py; what `taskfed serve` loads), from the server
        state only. Default: no router, every input to the first server adapter (none: the client's own)."""
        return RouterState("one", adapters=list(self.server_adapters())[:1])

    # The server side's whole state is its attributes but the two it is built from (the config's params
    # and the federation's facts): a checkpoint keeps every adapter, centroid, binding and group that a
    # later `aggregate` or `downlink` reads, with no method listing them (taskfed/state.py packs the tree).
    def state_dict(self) -> dict[str, Any]:
        # (an instance attribute that is a function, e.g. a wrapped hook, is behaviour, not state)
        return {k: v for k, v in vars(self).items() if k not in ("params", "fed") and not callable(v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not all(isinstance(k, str) and k.isidentifier() and k not in ("params", "fed") for k in state):
            raise ValueError("a method's state maps attribute names to values")
        vars(self).update(state)

    def setup_server(self, uploads: dict[str, dict[str, np.ndarray]]) -> None:
        """Receives what setup_client returned, per client (e.g. FedRouter's local centroids)."""

    def check_setup(self, uploads: dict[str, dict[str, np.ndarray]]) -> dict[str, str]:
        """Why each client's setup upload cannot be used (the client is then left out of the run); the
        uploads may come from nodes, so the server checks them before `setup_server` trusts them."""
        return {}

    def downlink(self, client_id: str) -> Downlink:
        """What the server sends `client_id` for evaluation. Default: every adapter the server holds."""
        return Downlink(adapters=self.server_adapters())

    # ---- client side
    def setup_client(self, client: Client, rt) -> dict[str, np.ndarray] | None:
        """Runs on each client before round 0; what it returns travels to the server as arrays."""
        return None

    def job_correction(self, client: Client, job: Job) -> Correction | None:
        """A per-step correction of the job's training, from what the job carries and the client's store."""
        return None

    def job_done(self, client: Client, job: Job, run: JobRun) -> dict[str, AdapterWeights]:
        """After the job trained, on the client: adapter-shaped arrays uploaded with its result (none by
        default); the hook may keep what it needs in the client's store."""
        return {}

    def eval_adapters(self, client: Client, sent: Downlink) -> dict[str, AdapterWeights]:
        """The adapters the client evaluates with: by default what it was sent."""
        return dict(sent.adapters)

    def route(self, client: Client, records: list[Record], names: list[str], rt, sent: Downlink) -> RowMix:
        """Per-row mix over `names` (indices into that list). Default: everything to the first adapter."""
        return RowMix.one_hot([0] * len(records))

    def eval_gates(self, client: Client, sent: Downlink) -> list[AdapterWeights]:
        """The gates a gated `route` names (RowMix.gate indexes this list), loaded into the bank with the
        adapters. Default: none."""
        return []

    def eval_facts(self, client: Client) -> dict[str, np.ndarray]:
        """Evaluation bookkeeping the client reports with its scores (e.g. how many rows of each task its
        local clusters hold): joined with true labels, which the method itself never uses."""
        return {}

    def client_adapters(self, client: Client, sent: Downlink | None = None) -> dict[str, AdapterWeights]:
        """The client-owned adapters worth saving at the end of a run (never sent to the server); `sent`,
        where the engine has it, is the server's evaluation downlink (a personal model may combine both)."""
        return {}

    def client_arrays(self, client: Client, rt, sent: Downlink | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Client-owned tensors saved beside its adapters at the end of a run, by file name (e.g. FedDPA's
        reference states, which serving needs): only what the method's config lets the client give away;
        `sent` as for `client_adapters` (FedLEASE saves the cluster router it was evaluated with)."""
        return {}

    def round_report(self, round_idx: int) -> dict[str, Any]:
        """Extra entries for the round's record in metrics.json, after aggregation (server state only)."""
        return {}

    def check_report(self, rep: Routed) -> str | None:
        """Why a client's evaluation report cannot be used by `eval_report` (None: it can). The report comes
        from a node: the server checks it before it trusts it, as it checks uploads."""
        return None

    def eval_report(self, mode: str, routed: list[Routed]) -> dict[str, Any]:
        """Extra entries for metrics.json's eval[mode] (e.g. router accuracy), from the clients' reports."""
        return {}


class RunningMean:
    """A weighted mean of adapters folded in one at a time (streaming aggregation): float64 sums key by key,
    so a server holds one adapter-sized sum per aggregate instead of every upload of the round. Folding the
    same adapters in the same order gives the same bits (engines deliver results in plan order).

    Under `privacy.updates` (taskfed/privacy.py) every contributor weighs 1 and the sum gets the round's
    seeded Gaussian noise before the division; `name` (the aggregate: "global", "cluster/3") seeds it."""

    def __init__(self, name: str = "global") -> None:
        self.name = name
        self.sums: dict[str, torch.Tensor] | None = None
        self.total = 0.0
        self.count = 0

    def add(self, adapter: AdapterWeights, weight: float = 1.0) -> None:
        w = contributor_weight(weight)
        if self.sums is None:
            self.sums = {key: adapter[key].double() * w for key in adapter}
        else:
            for key, acc in self.sums.items():
                acc.add_(adapter[key].double(), alpha=w)
        self.total += w
        self.count += 1

    def __bool__(self) -> bool:
        return self.count > 0

    def mean(self) -> AdapterWeights:
        if self.sums is None:
            raise ValueError("no adapters to average")
        return {key: (acc / self.total).float() for key, acc in noised(self.sums, self.name).items()}


def group_means(results: Iterable[Result], group: Callable[[Result], Hashable],
                weight: Callable[[Result], float]) -> dict[Hashable, AdapterWeights]:
    """Per group, the weighted mean of the uploads in it, folded in one by one as `results` arrive (a
    streaming aggregation); a group with no upload has no entry."""
    means: dict[Hashable, RunningMean] = {}
    for r in results:
        g = group(r)
        if g not in means:
            means[g] = RunningMean(f"group/{g}")
        means[g].add(r.weights, weight(r))
    return {g: mean.mean() for g, mean in means.items()}


def weighted_mean(adapters: Iterable[AdapterWeights], weights: Iterable[float] | None = None,
                  name: str = "global") -> AdapterWeights:
    """The weighted mean of adapters, key by key, accumulated in float64 in the given order (RunningMean)."""
    acc = RunningMean(name)
    pairs = zip(adapters, repeat(1.0)) if weights is None else zip(adapters, weights, strict=True)
    for adapter, w in pairs:
        acc.add(adapter, w)
    return acc.mean()


def check_centroids(uploads: dict[str, dict[str, np.ndarray]], most: int) -> dict[str, str]:
    """Why each client's `centroids` upload is unusable: missing, not a 2-D float array of 1..`most` rows, or
    of another width than most clients' (a width no single client can impose on the others)."""
    bad, widths = {}, {}
    for c, up in uploads.items():
        x = up.get("centroids")
        if x is None or x.ndim != 2 or x.dtype.kind != "f" or not 1 <= len(x) <= most:
            bad[c] = f"centroids must be a 2-D float array of 1 to {most} rows"
        else:
            widths[c] = x.shape[1]
    if widths:
        values = sorted(widths.values())
        common = max(set(values), key=lambda w: (values.count(w), -w))
        bad.update({c: f"centroids of width {w}, the others' are {common}" for c, w in widths.items() if w != common})
    return bad
