"""FedSA-LoRA (Guo et al., ICLR 2025; methods.md, "More methods"): A is shared, B stays on the client.

Init: the run's one LoRA init (A0 random, B = 0), the same on every client; client i keeps its own B_i
  (with the A it last trained) in its store for the whole run.
Client: starts from (A_global, B_i), trains both (the common local step), uploads A_i only, with n_i.
Server: A_global <- sum n_i A_i / sum n_i over the round's participants (`mean = "uniform"`: the plain
  mean, FederatedScope's ignore_weight). B never reaches the server. Travel: P_A down, P_A up.
Evaluation: each client's personal model (A_global, B_i) in every mode: local on its tasks, global on every
  seen task (no shared B exists: "global" measures how far a personal model carries), unseen on held-out
  tasks.

Not built, and why: `fedsa_shared_b` (FederatedScope's share_local_model yaml, where each client starts from
the B the client before it left) makes a round's jobs a chain, which no engine here runs (a round's jobs
train together); `fedsa_eval = mean_b` (an extension off in the paper) needs a final upload of every B.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from taskfed.methods.base import Client, Downlink, Job, LocalRef, Method, RunningMean, merged, only
from taskfed.model.bank import AdapterWeights

OWN = "fedsa_own"  # the client's last trained adapter: its own B_i (and the A it trained, replaced each round)


class FedSAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    mean: Literal["samples", "uniform"] = "samples"  # A's average: by sample count (FederatedScope) or plain


class FedSALoRA(Method):
    name = "fedsa-lora"
    Params = FedSAParams

    def __init__(self, params, fed):
        super().__init__(params, fed)
        self.a_global = only(fed.init_adapter, ("A",))

    # ---- server side
    def plan(self, round_idx: int, clients: list[str]) -> list[Job]:
        return [Job(client=cid, adapter="personal", init=self.a_global, fill=self._own(), keep_as=OWN,
                    sends=("A",)) for cid in clients]

    def aggregate(self, round_idx: int, results) -> None:
        mean = RunningMean("A")
        for r in results:
            mean.add(r.weights, r.n_client if self.params.mean == "samples" else 1.0)
        if mean:
            self.a_global = mean.mean()

    def downlink(self, client_id: str) -> Downlink:
        return Downlink(adapters={"A": self.a_global})  # P_A: the client has its own B

    # ---- client side
    def _own(self) -> LocalRef:
        return LocalRef(OWN, self.fed.init_adapter)  # before its first job: the shared init (B = 0)

    def _personal(self, client: Client, a: AdapterWeights) -> AdapterWeights:
        return merged(client.resolve(self._own()), a)

    def eval_adapters(self, client: Client, sent: Downlink) -> dict[str, AdapterWeights]:
        return {"personal": self._personal(client, sent.adapters["A"])}

    def client_adapters(self, client: Client, sent: Downlink | None = None) -> dict[str, AdapterWeights]:
        # The personal model as evaluated; where no downlink is at hand, the client's last trained adapter.
        if sent is None:
            return {"personal": client.resolve(self._own())}
        return {"personal": self._personal(client, sent.adapters["A"])}
