"""FedDPA (Yang et al., 2403.19211): a global adapter and a local adapter per client, mixed per instance.

Two adapters on the same modules of one base model:
- the **global** adapter: trained by the clients, averaged by the server (uniform mean, as in the official
  code), the only adapter that travels;
- the **local** adapter: lives in the client's store (`feddpa_local`), never uploaded, kept across rounds.

Training, two variants:
- **FedDPA-F** (`feddpa-f`): plain FedAvg of the global adapter for the budget of R rounds; then one extra
  round in which every client copies the final global adapter into its local adapter and fine-tunes it
  alone on its data. Nothing is uploaded in that round and the server keeps its global adapter.
- **FedDPA-T** (`feddpa-t`): round 0 trains only the global adapter. From round 1 each client
  (1) trains its local adapter (fresh at round 1, then kept) with the layer output
      W0 x + a * local(x) + (1 - a) * stopgrad(global(x)),   a = 0.5,
      where `global` is the adapter the client received this round, and
  (2) resets the global adapter to the received one, trains it alone and uploads it.
  Step (2) starts from the received adapter and never sees step (1)'s result, so the two are independent
  jobs (the engine may pack them into one batch: separate bank slots, separate gradients).

Inference, instance-wise dynamic weighting (the same for both variants): for a test input x, K = 5 of the
client's training instructions x_k are drawn (seeded by the run's seed, the client and x itself, so x gets
the same references whatever batch or order it is evaluated in); h(.) = the last-token final hidden state
of the templated prompt with the local adapter active (the official script embeds the templated prompt;
`h_text = "instruction"` embeds the raw instruction instead); s(x) = mean_k cos(h(x), h(x_k)).
- weighting = "local" (default, the paper): w_local = w_max * s(x), w_global = 1 - w_local: an input unlike
  the local data leans on the global adapter;
- weighting = "official" (the official inference script): w_global = w_max * s(x), w_local = 1 - w_global;
- weighting = "fixed" ("w/o auto"): w_local = w_fixed (0.5), w_global = 1 - w_local.
s(x) is clamped into [0, 1]: a cosine can be negative, and w_max * s < 0 would *subtract* the local
adapter (and push the other weight past 1), which is no longer a mix of the two adapters; a negative
similarity means "unlike the local data", i.e. the global end of the scale. Above 1 only float rounding
can take it. (For last-token states of a causal LM negative cosines are practically absent, so this
matches the unclamped official code wherever that code produces a mix.)
The weights are per row: every row of a batch carries its own (global, local) pair on the bank (the
official batched path silently drops them; this one does not). They are recorded in the evaluation
output (`eval[mode]["feddpa_weights"]`).

Serving (`taskfed serve`, model "auto@<client>"): the weight needs h of the client's training instructions.
With `export_references = true` each client writes them after the last round beside its local adapter
(`adapters/clients/<id>/references.safetensors`: the unit-norm h of every training instruction, in the
client's row order, no text), and the server draws x's references from them with the same seeded draw
(`draw_references`) and weighs with the same `mean_cosine` and `local_weight`. Off by default: hidden states of private
training text are the client's to give away or not.
"""

from __future__ import annotations

import zlib
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from taskfed.data.records import Record
from taskfed.methods.base import Client, Downlink, Job, LocalRef, Method, RunningMean
from taskfed.model.bank import AdapterWeights, RowMix
from taskfed.routing import RouterState

LOCAL = "feddpa_local"  # the client's store key of its local adapter


class FedDPAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weighting: Literal["local", "official", "fixed"] = Field(
        default="local", description="local: w_local = w_max*s(x) (paper); official: w_global = w_max*s(x); "
                                     "fixed: w_local = w_fixed")
    w_max: float = Field(default=0.5, ge=0, le=1)
    w_fixed: float = Field(default=0.5, ge=0, le=1, description="the local adapter's weight under 'fixed'")
    k: int = Field(default=5, ge=1, description="training instructions drawn per test input for s(x)")
    references: Literal["per_input", "per_client"] = Field(
        default="per_input", description="per_input: K references drawn for each test input (paper, official "
                                         "script); per_client: one seeded draw of K per client, shared by its inputs")
    h_text: Literal["prompt", "instruction"] = Field(
        default="prompt", description="what h(.) embeds: the templated prompt (official script) or the raw instruction")
    mean: Literal["uniform", "samples"] = Field(
        default="uniform", description="server mean of the global adapters: uniform (official code) or by sample count")
    export_references: bool = Field(
        default=False, description="each client writes h of its training instructions beside its local adapter, so "
                                   "`taskfed serve` can weigh auto@<client> per input (hidden states of private text)")


def draw_references(seed: int, client: str, instruction: str, n: int, k: int) -> np.ndarray:
    """Indices of the K training instructions x is compared with, out of the client's n: drawn without
    replacement (as random.sample in the official script), seeded by run seed, client and x, so a row's weight
    does not depend on its batch, nor on whether the run's evaluation or the server computes it."""
    rng = np.random.default_rng(zlib.crc32(f"{seed}/{client}/{instruction}".encode()))
    return rng.choice(n, min(k, n), replace=False)


def mean_cosine(h_x: torch.Tensor, h_refs: torch.Tensor) -> torch.Tensor:
    """s(x) before the clamp: the mean cosine of unit-norm h(x) (d,) to its references' (K, d)."""
    return h_refs.matmul(h_x).mean()


def local_weight(weighting: str, w_max: float, w_fixed: float, s: torch.Tensor | None, n: int) -> torch.Tensor:
    """w_local per row (w_global = 1 - w_local) from the rows' similarities `s` (unused under "fixed"),
    clamped into [0, 1] first (module doc)."""
    if weighting == "fixed":
        return torch.full((n,), float(w_fixed))
    s = s.clamp(0.0, 1.0).float()
    if weighting == "local":
        return w_max * s
    return 1.0 - w_max * s  # official: the similarity weights the global adapter


def global_local(w_local: torch.Tensor) -> torch.Tensor:
    """Per row the pair (w_global, w_local), float32, in the order the bank mixes (global, local): how the
    evaluation and the server both turn `local_weight` into a row's mix weights."""
    return torch.stack([1.0 - w_local, w_local], dim=1).float()


class FedDPATParams(FedDPAParams):
    # a = 0 would give the local adapter no gradient at all: it would never be trained.
    a: float = Field(default=0.5, gt=0, le=1, description="weight of the local adapter in FedDPA-T's local step")


class _FedDPA(Method):
    """What both variants share: the global adapter on the server, the local one on the client, inference."""

    Params = FedDPAParams

    def __init__(self, params, fed):
        super().__init__(params, fed)
        self.global_adapter: AdapterWeights = fed.init_adapter

    # ------------------------------------------------------------------ server side
    def _global_job(self, client: str) -> Job:
        # Trained alone from the adapter the server sends; uploaded.
        return Job(client=client, adapter="global", init=self.global_adapter)

    def aggregate(self, round_idx: int, results) -> None:
        # Only uploaded weights count (local jobs come back without weights), folded in as they arrive, in
        # plan order (sorted by client).
        uniform = self.params.mean == "uniform"
        mean = RunningMean()
        for r in results:
            if r.weights is not None:
                mean.add(r.weights, 1.0 if uniform else r.n_client)
        if mean:  # else FedDPA-F's fine-tuning round: nothing reached the server
            self.global_adapter = mean.mean()

    def server_adapters(self) -> dict[str, AdapterWeights]:
        return {"global": self.global_adapter}

    def router_state(self) -> RouterState:
        """The instance-wise mix as served: global + the named client's local adapter, with the weighting's
        parameters; s(x) needs the client's reference states (exported only where the client allows)."""
        p = self.params
        return RouterState("mix", adapters=["global"], params={
            "weighting": p.weighting, "w_max": p.w_max, "w_fixed": p.w_fixed, "k": p.k, "references": p.references,
            "h_text": p.h_text, "seed": self.fed.seed})

    # ------------------------------------------------------------------ client side
    def _local(self, client: Client) -> AdapterWeights:
        # Before the client trained one (FedDPA-T with a single round), the shared v0: its B is zero, so it
        # adds nothing to the layer output.
        return client.resolve(LocalRef(LOCAL, self.fed.init_adapter))

    def eval_adapters(self, client: Client, sent: Downlink) -> dict[str, AdapterWeights]:
        return {"global": sent.adapters["global"], "local": self._local(client)}

    def client_adapters(self, client: Client, sent=None) -> dict[str, AdapterWeights]:
        return {"local": client.store[LOCAL]} if LOCAL in client.store else {}

    def client_arrays(self, client: Client, rt, sent=None) -> dict[str, dict[str, torch.Tensor]]:
        """With export_references: h of every training instruction (client row order) for the server's s(x)."""
        if not self.params.export_references:
            return {}
        pool = [r.instruction for r in client.records]
        h = self._h(client, pool, rt)
        dim = rt.model.config.hidden_size
        return {"references": {"h": torch.stack([h[t] for t in pool]) if pool else torch.zeros(0, dim, dtype=torch.float64)}}

    def references(self, client: Client, instruction: str) -> list[str]:
        """The K training instructions x is compared with (`draw_references`)."""
        pool = [r.instruction for r in client.records]
        return [pool[i] for i in draw_references(self.fed.seed, client.id, instruction, len(pool), self.params.k)]

    def client_references(self, client: Client) -> list[str]:
        """references = "per_client": one seeded draw of K training instructions, shared by all the client's inputs."""
        return self.references(client, "")

    def _h(self, client: Client, texts: list[str], rt) -> dict[str, torch.Tensor]:
        """Unit-norm h(t) per text with the client's current local adapter; computed once per (adapter, text)
        and kept in the client's scratch (references recur across inputs, and local rows recur in global)."""
        from taskfed.evaluation.evaluate import fingerprint

        local = self._local(client)
        cache = client.scratch.setdefault("feddpa_h", {})
        fp = (fingerprint(local), self.params.h_text, rt.cfg.data.template)
        # Each missing text once, sorted so that the batches do not depend on the order of the rows.
        missing = sorted({t for t in texts if (fp, t) not in cache})
        if missing:
            shown = [rt.prompt(t) for t in missing] if self.params.h_text == "prompt" else missing
            rt.load_slots([local])
            h = rt.hidden_states(shown, RowMix.one_hot([0] * len(shown)), pool="last")  # cut from the left
            for t, row in zip(missing, F.normalize(h.double(), dim=1)):
                cache[(fp, t)] = row
        return {t: cache[(fp, t)] for t in texts}

    def similarity(self, client: Client, records: list[Record], rt) -> torch.Tensor:
        """s(x) per row, before the clamp: mean cosine of h(x) to h of x's K references."""
        if not records or not client.records:
            return torch.zeros(len(records))
        if self.params.references == "per_client":
            shared = self.client_references(client)
            refs = [shared] * len(records)
        else:
            refs = [self.references(client, r.instruction) for r in records]
        h = self._h(client, [t for r, ref in zip(records, refs) for t in (r.instruction, *ref)], rt)
        return torch.stack([mean_cosine(h[r.instruction], torch.stack([h[t] for t in ref]))
                            for r, ref in zip(records, refs)])

    def local_weights(self, client: Client, records: list[Record], rt) -> torch.Tensor:
        """w_local per row under the configured weighting (w_global = 1 - w_local)."""
        p = self.params
        s = None if p.weighting == "fixed" else self.similarity(client, records, rt)
        return local_weight(p.weighting, p.w_max, p.w_fixed, s, len(records))

    def route(self, client: Client, records: list[Record], names: list[str], rt, sent: Downlink) -> RowMix:
        """Two terms per row, (global, local), with that row's own weights."""
        g, l = names.index("global"), names.index("local")
        w_local = self.local_weights(client, records, rt)
        idx = torch.tensor([[g, l]], dtype=torch.long).repeat(len(records), 1)
        return RowMix(idx, global_local(w_local))

    def eval_report(self, mode: str, routed) -> dict[str, Any]:
        """Per client: w_local's mean / min / max, its mean per task, and the per-row list (row order of the
        evaluation: the client's tasks in turn); w_global = 1 - w_local."""
        per_client = {}
        for rep in routed:
            w_local = (rep.mix.w * (rep.mix.idx == rep.names.index("local"))).sum(dim=1).tolist()
            by_task: dict[str, list[float]] = {}
            for task, w in zip(rep.tasks, w_local):
                by_task.setdefault(task, []).append(w)
            per_client[rep.client] = {
                "w_local_mean": float(np.mean(w_local)) if w_local else None,
                "w_local_min": float(np.min(w_local)) if w_local else None,
                "w_local_max": float(np.max(w_local)) if w_local else None,
                "w_local_by_task": {t: float(np.mean(ws)) for t, ws in by_task.items()},
                "w_local": [round(w, 6) for w in w_local],
            }
        p = self.params
        return {"feddpa_weights": {"weighting": p.weighting, "w_max": p.w_max, "k": p.k, "references": p.references,
                                   "per_client": per_client}}


class FedDPAT(_FedDPA):
    """FedDPA-T: the local adapter trained every round against a frozen copy of the received global one."""

    name = "feddpa-t"
    Params = FedDPATParams

    def plan(self, round_idx: int, clients: list[str]) -> list[Job]:
        a = self.params.a
        jobs = []
        for c in clients:
            if round_idx > 0:  # round 0 trains only the global adapter
                # Fresh (the shared v0) the first time, then the client's own; the received global adapter
                # enters with weight 1 - a as a detached term (stop-gradient): the bank gives it no gradient.
                jobs.append(Job(client=c, adapter="local", init=LocalRef(LOCAL, self.fed.init_adapter), scale=a,
                                frozen=[(self.global_adapter, 1.0 - a)] if a < 1 else [],
                                keep_as=LOCAL, upload=False))
            jobs.append(self._global_job(c))
        return jobs


class FedDPAF(_FedDPA):
    """FedDPA-F: FedAvg for R rounds, then one round of local fine-tuning of a copy of the final global adapter."""

    name = "feddpa-f"

    def n_rounds(self, rounds: int) -> int:
        return rounds + 1

    def plan(self, round_idx: int, clients: list[str]) -> list[Job]:
        if round_idx < self.fed.rounds:
            return [self._global_job(c) for c in clients]
        # The fine-tuning round: every client (not only a round's sample: each one needs its local adapter)
        # starts from the final global adapter, keeps the result, sends nothing. It trains at lr_max: the
        # cosine schedule has reached lr_min by now, which would leave the copy nearly untouched.
        return [Job(client=c, adapter="local", init=self.global_adapter, keep_as=LOCAL, upload=False,
                    lr=self.fed.lr_max) for c in self.fed.clients]
