"""FedSA-LoRA (Guo et al., ICLR 2025; methods.md, "More methods"): A is shared, B stays on the client.

Init: the run's one LoRA init (A0 random, B = 0), the same on every client; client i keeps its own B_i
  (with the A it last trained) in its store for the whole run.
Client: starts from (A_global, B_i), trains both (the common local step), uploads A_i only, with n_i.
Server: A_global <- sum n_i A_i / sum n_i over the round's participants (`mean = "uniform"`: the plain
  mean, FederatedScope's ignore_weight). B never reaches the server. Travel: P_A down, P_A up.
Evaluation: each client's personal model (A_global, B_i) in every mode: local on its tasks, global on every
  seen task (no shared B exists: "global" measures how far a personal model carries), unseen on held-out
  tasks.

Two switches, off by default:
- `eval = "mean_b"` (an extension, not in the paper): one last round in which every client trains nothing
  and uploads its B_i (P_B each, counted); every mode then evaluates the non-personal (A_global, mean B).
- `shared_b = true` reproduces the committed yamls (share_local_model: each client starts from the B the
  client before it left). A round becomes a chain: M rounds of one client each (client j of round t trains
  from (A_global(t), B left by client j-1) at round t's learning rate), and A_global is the mean of the M
  A's at the chain's end. Here B must travel to be passed on (P down and up per job, counted), where the
  yaml's standalone simulation passes one Python object; every mode evaluates (A_global, the last B).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from taskfed.methods.base import Client, Downlink, Job, LocalRef, Method, RunningMean, merged, only, weighted_mean
from taskfed.model.bank import AdapterWeights
from taskfed.training import cosine_lr

OWN = "fedsa_own"  # the client's last trained adapter: its own B_i (and the A it trained, replaced each round)


class FedSAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    mean: Literal["samples", "uniform"] = "samples"  # A's average: by sample count (FederatedScope) or plain
    eval: Literal["personal", "mean_b"] = "personal"
    shared_b: bool = False

    @model_validator(mode="after")
    def _one_b(self) -> "FedSAParams":
        if self.shared_b and self.eval == "mean_b":
            raise ValueError("eval = 'mean_b' averages per-client B's, which shared_b = true does not keep")
        return self


class FedSALoRA(Method):
    name = "fedsa-lora"
    Params = FedSAParams

    def __init__(self, params, fed):
        super().__init__(params, fed)
        self.a_global = only(fed.init_adapter, ("A",))
        self.b_shared = only(fed.init_adapter, ("B",))  # shared_b: the B the chain passes on; mean_b: the mean
        self.chain: list[tuple[AdapterWeights, float]] = []  # shared_b: this chain's A's and their weights

    def _weight(self, n_client: int) -> float:
        return n_client if self.params.mean == "samples" else 1.0

    def n_rounds(self, rounds: int) -> int:
        if self.params.shared_b:
            return rounds * len(self.fed.clients)
        return rounds + (self.params.eval == "mean_b")

    # ---- server side
    def plan(self, round_idx: int, clients: list[str]) -> list[Job]:
        if self.params.shared_b:
            m = len(self.fed.clients)
            client = sorted(self.fed.clients)[round_idx % m]
            lr = cosine_lr(round_idx // m, self.fed.rounds, self.fed.lr_max, self.fed.lr_min)
            return [Job(client=client, adapter="personal", init=merged(self.a_global, self.b_shared), lr=lr)]
        if round_idx >= self.fed.rounds:  # mean_b's last round: every B_i once, nothing trained
            return [Job(client=cid, adapter="personal", init=self.a_global, fill=self._own(), trains=(),
                        sends=("B",), steps=1, batch=1) for cid in sorted(self.fed.clients)]
        return [Job(client=cid, adapter="personal", init=self.a_global, fill=self._own(), keep_as=OWN,
                    sends=("A",)) for cid in clients]

    def aggregate(self, round_idx: int, results) -> None:
        if self.params.shared_b:
            for r in results:
                self.chain.append((only(r.weights, ("A",)), self._weight(r.n_client)))
                self.b_shared = only(r.weights, ("B",))
            if (round_idx + 1) % len(self.fed.clients) == 0 and self.chain:  # the chain's end
                self.a_global = weighted_mean([a for a, _ in self.chain], [w for _, w in self.chain], "A")
                self.chain = []
            return
        if round_idx >= self.fed.rounds:
            uploads = list(results)
            if uploads:
                self.b_shared = weighted_mean([r.weights for r in uploads], [r.n_client for r in uploads], "B")
            return
        mean = RunningMean("A")
        for r in results:
            mean.add(r.weights, self._weight(r.n_client))
        if mean:
            self.a_global = mean.mean()

    def _personal_models(self) -> bool:
        return not self.params.shared_b and self.params.eval == "personal"

    def server_adapters(self):
        return {} if self._personal_models() else {"global": merged(self.a_global, self.b_shared)}

    def downlink(self, client_id: str) -> Downlink:
        if self._personal_models():
            return Downlink(adapters={"A": self.a_global})  # P_A: the client has its own B
        return super().downlink(client_id)

    # ---- client side
    def _own(self) -> LocalRef:
        return LocalRef(OWN, self.fed.init_adapter)  # before its first job: the shared init (B = 0)

    def _personal(self, client: Client, a: AdapterWeights) -> AdapterWeights:
        return merged(client.resolve(self._own()), a)

    def eval_adapters(self, client: Client, sent: Downlink) -> dict[str, AdapterWeights]:
        if "A" in sent.adapters:
            return {"personal": self._personal(client, sent.adapters["A"])}
        return dict(sent.adapters)

    def client_adapters(self, client: Client, sent: Downlink | None = None) -> dict[str, AdapterWeights]:
        # The personal model as evaluated; where no downlink is at hand, the client's last trained adapter.
        if not self._personal_models():
            return {}
        if sent is None:
            return {"personal": client.resolve(self._own())}
        return {"personal": self._personal(client, sent.adapters["A"])}
