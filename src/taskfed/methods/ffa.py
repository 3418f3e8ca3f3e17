"""FFA-LoRA (Sun, Li, Li & Ding, ICLR 2024; methods.md, "More methods"): A frozen at a shared A0, only B
trained and averaged.

Init: A0 random (the run's seeded LoRA init, PEFT's default), B = 0. Every client derives A0 from the
  run's seed (`a0 = "seed"`, 0 bytes), or the server sends it with a client's first job (`a0 = "sent"`,
  P_A once per client).
Client: starts from (A0, B_global), trains B only (A gets no update), uploads B.
Server: B <- sum n_i B_i / sum n_i. A0 is shared, so mean_i(B_i A0) = (mean_i B_i) A0: the aggregate is
  the exact mean of the clients' updates, unlike FedAvg on A and B. Travel: P_B down, P_B up.
Scaling: delta_W = (alpha/r) B A0 with the run's lora.alpha; `alpha_scale` multiplies it (FFA-LoRA's
  alpha, the paper's claim that it needs no tuning), in training and in the adapter evaluated and saved.
Evaluation: the one global adapter (A0, B) in every mode. Privacy: under privacy.updates the uploaded B's
  change is clipped and the sum noised as for every method; with A fixed, delta_W is linear in B, so the
  noise stays additive (the paper's motivation). Its per-example DP-SGD (`dp`) is not built here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from taskfed.methods.base import Job, LocalRef, Method, RunningMean, merged, only

OWN = "ffa_own"  # the client's last trained adapter: its A is A0


class FFAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    a0: Literal["seed", "sent"] = "seed"  # how A0 reaches a client: from the run's seed, or once from the server
    alpha_scale: float = Field(default=1.0, gt=0)  # FFA-LoRA's alpha = alpha_scale x lora.alpha


class FFALoRA(Method):
    name = "ffa-lora"
    Params = FFAParams

    def __init__(self, params, fed):
        super().__init__(params, fed)
        self.a0 = only(fed.init_adapter, ("A",))
        self.b_global = only(fed.init_adapter, ("B",))
        self.has_a0: set[str] = set()  # a0 = "sent": the clients the server has sent A0

    def plan(self, round_idx: int, clients: list[str]) -> list[Job]:
        jobs = []
        for cid in clients:
            if self.params.a0 == "sent" and cid not in self.has_a0:
                start = dict(init=merged(self.a0, self.b_global))  # A0 travels with B, until a result shows it kept
            else:  # the client completes B with its own A0 (derived from the seed, or kept from the first job)
                fill = LocalRef(OWN, self.fed.init_adapter if self.params.a0 == "seed" else None)
                start = dict(init=self.b_global, fill=fill)
            jobs.append(Job(client=cid, adapter="global", keep_as=OWN, trains=("B",), sends=("B",),
                            scale=self.params.alpha_scale, **start))
        return jobs

    def aggregate(self, round_idx: int, results) -> None:
        mean = RunningMean("B")
        for r in results:
            mean.add(r.weights, r.n_client)
            self.has_a0.add(r.job.client)  # it trained, so it keeps (A0, B_i): A0 is not sent again
        if mean:
            self.b_global = mean.mean()

    def server_adapters(self):
        # The served adapter folds alpha_scale into B: (alpha/r) (s B) A0 = (s alpha / r) B A0.
        s = self.params.alpha_scale
        return {"global": merged(self.a0, {k: v * s for k, v in self.b_global.items()})}
