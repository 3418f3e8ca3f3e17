"""SCAFFOLD, as OpenFedLLM implements it for LoRA (methods.md, "More methods"; Karimireddy et al. 2020).

State: the server's control variate c and each client's c_i, adapter-shaped (every A and B key), zeros at
the start; c_i lives in the client's store across rounds and never leaves it.
Client: gets the global x and c; corr = c - c_i, fixed for the round; the common local step, and after
  every optimizer step w <- w - lr_t corr (`correction = "weights"`, OpenFedLLM's callback; "grad" adds
  corr to the gradient before AdamW instead; "off" trains exactly as FedAvg). Then
  c_i+ = (x - y_i) / (K lr_t) - corr, uploads y_i and dc_i = c_i+ - c_i, keeps c_i+.
Server: x <- sum_S (n_i / n_S) y_i (or, `server = "paper"`, x + eta_g mean_S (y_i - x));
  c <- c + (1/M) sum_S dc_i, M = every client of the run.
Travel: 2P each way (x and c down, y_i and dc_i up). Evaluation: the global adapter in every mode.

With AdamW, (x - y)/(K lr) is not an average gradient (Adam moves about lr per coordinate per step), so
c_i's entries are O(1): the round's record logs ||c|| and the clients' ||dc_i||, as methods.md asks.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from taskfed.methods.base import Client, Correction, Job, JobRun, LocalRef, RunningMean
from taskfed.methods.fedavg import FedAvg
from taskfed.model.bank import AdapterWeights

C_I = "scaffold_c"  # the client's control variate, in its store


class ScaffoldParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    # Where corr = c - c_i enters local training: after each optimizer step on the weights (OpenFedLLM), on
    # the gradient before AdamW, or nowhere (then the adapters are FedAvg's; c and c_i are still kept).
    correction: Literal["weights", "grad", "off"] = "weights"
    server: Literal["samples", "paper"] = "samples"  # x's update: OpenFedLLM's weighted mean, or the paper's
    eta_g: float = Field(default=1.0, gt=0)  # the paper's global step (server = "paper" only)


def _norm(w: AdapterWeights) -> float:
    return float(sum(t.double().pow(2).sum() for t in w.values()) ** 0.5)


class Scaffold(FedAvg):
    name = "scaffold"
    Params = ScaffoldParams

    def __init__(self, params, fed):
        super().__init__(params, fed)
        self.c = {k: torch.zeros_like(v) for k, v in fed.init_adapter.items()}
        self.dc_norms: list[float] = []  # this round's ||dc_i||, for the round's record

    # ---- server side
    def plan(self, round_idx: int, clients: list[str]) -> list[Job]:
        return [Job(client=cid, adapter="global", init=self.global_adapter, extra={"c": self.c}) for cid in clients]

    def aggregate(self, round_idx: int, results) -> None:
        mean, dc_sum, self.dc_norms = RunningMean(), None, []
        x = self.global_adapter
        for r in results:
            mean.add(r.weights, r.n_client if self.params.server == "samples" else 1.0)
            dc = r.extra.get("dc")
            if dc is None:  # an upload without its control-variate change moves x, not c
                continue
            self.dc_norms.append(_norm(dc))
            dc_sum = ({k: v.double().clone() for k, v in dc.items()} if dc_sum is None
                      else {k: dc_sum[k].add_(v.double()) for k, v in dc.items()})
        if not mean:  # every upload refused: x and c stay
            return
        y = mean.mean()
        if self.params.server == "samples":
            self.global_adapter = y
        else:
            self.global_adapter = {k: (x[k].double() + self.params.eta_g * (y[k].double() - x[k].double())).float()
                                   for k in x}
        if dc_sum is not None:
            m = len(self.fed.clients)
            self.c = {k: (self.c[k].double() + dc_sum[k] / m).float() for k in self.c}

    def round_report(self, round_idx: int) -> dict:
        n = self.dc_norms
        return {"scaffold_c_norm": _norm(self.c), "scaffold_dc_norm_mean": sum(n) / len(n) if n else 0.0,
                "scaffold_dc_norm_max": max(n, default=0.0)}

    # ---- client side
    @staticmethod
    def _c_i(client: Client, job: Job) -> AdapterWeights:
        """The client's control variate (zeros before its first job)."""
        return client.resolve(LocalRef(C_I, _zeros(job.extra["c"])))

    def _corr(self, client: Client, job: Job) -> AdapterWeights:
        c_i = self._c_i(client, job)
        return {k: job.extra["c"][k] - c_i[k] for k in c_i}

    def job_correction(self, client: Client, job: Job) -> Correction | None:
        if self.params.correction == "off":
            return None
        return Correction(self._corr(client, job), at=self.params.correction)

    def job_done(self, client: Client, job: Job, run: JobRun) -> dict[str, AdapterWeights]:
        c_i, corr = self._c_i(client, job), self._corr(client, job)
        scale = 1.0 / (run.steps * run.lr)
        c_new = {k: ((run.start[k].double() - run.trained[k].double()) * scale - corr[k].double()).float()
                 for k in c_i}
        client.store[C_I] = c_new
        return {"dc": {k: c_new[k] - c_i[k] for k in c_i}}


def _zeros(like: AdapterWeights) -> AdapterWeights:
    return {k: torch.zeros_like(v) for k, v in like.items()}
