"""FedALT (Bian, Wang, Zhang & Xu, AAAI 2026; methods.md, "FedALT"; code jmbian/FedALT).

Per client: an individual LoRA L_i (client-owned, trained every round, never reset), a Rest-of-World LoRA R_i
  (frozen on the client, replaced by the server each round) and a mixer G_i (2 x d_in per target module, no
  bias; client-owned, trained, never leaves). Each layer, per token x: g = softmax(G_i x),
  y = W0 x + (alpha/r) (g_0 B0 A0 x + g_1 B1 A1 x): the bank's gate over two slots, soft (no top-k).
Job: train L_i and G_i with R_i frozen, from the end of the client's previous round (fresh optimizer);
  upload L_i (P). Round 0: R_i is a fresh LoRA (the run's init, B0 = 0: only L_i acts), which nothing sends.
Server: R_i <- the uniform mean over j != i of L_j, tensor by tensor, kept as S = sum_j L_j and formed as
  (S - L_i) / (n - 1). S is folded in upload by upload as the engine streams them (never the round's
  list); subtracting L_i needs the client's latest upload, so the server keeps each client's latest L_j
  (M x P, the default of methods.md under sampling: R_i averages every other client's latest L_j);
  `alt_rest = "round"` averages only this round's participants (what the code's full participation gives).
  The mixer is not aggregated. Travel: P down (R_i; nothing in round 0), P up.
Init: `alt_init = "shared"` (default): every L_i starts from the run's one init, as FedAvg's;
  `"independent"` (the code, which seeds nothing): each client's own seeded draw, so R_i averages unaligned A's.
Evaluation: client i's (L_i, R_i, G_i) mixed per token in every mode (local = own tasks, the paper's protocol;
  global and unseen = the same model on all seen / held-out tasks). The server's S / n (a client-free model,
  an extension) is what the run folder keeps as its server adapter.
"""

from __future__ import annotations

import math
import zlib
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from taskfed.methods.base import Client, Correction, Downlink, Gating, Job, JobRun, LocalRef, Method, Result
from taskfed.model.bank import AdapterWeights, RowMix
from taskfed.model.parts import split_gate
from taskfed.routing import RouterState

OWN = "fedalt_own"  # L_i, in the client's store
MIXER = "fedalt_mixer"  # G_i, in the client's store
REST0 = "fedalt_rest0"  # never stored: round 0's R_i is the LocalRef's default, the run's init (0 bytes down)
# The mixer's logits, in the code's order: logit 0 weighs R_i (the job's first frozen term), logit 1 L_i.
TERMS = (1, 0)


class FedALTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    alt_rest: Literal["latest", "round"] = "latest"  # R_i over every other client's latest L_j, or this round's
    alt_init: Literal["shared", "independent"] = "shared"


def zero_gate(adapter: AdapterWeights, width: int) -> AdapterWeights:
    """A gate of `width` logits for every target module of `adapter`, zero (it mixes uniformly)."""
    return {k.removesuffix(".lora_A") + ".gate": torch.zeros(width, a.shape[1])
            for k, a in adapter.items() if k.endswith(".lora_A")}


def independent_init(like: AdapterWeights, seed: int) -> AdapterWeights:
    """A fresh LoRA shaped as `like`, A drawn as PEFT draws it (kaiming-uniform, a = sqrt(5)), B zero, seeded."""
    gen = torch.Generator().manual_seed(seed)
    return {k: ((torch.rand(v.shape, generator=gen) * 2 - 1) / math.sqrt(v.shape[1]) if k.endswith("lora_A")
                else torch.zeros_like(v)) for k, v in sorted(like.items())}


class FedALT(Method):
    name = "fedalt"
    Params = FedALTParams

    def __init__(self, params, fed):
        super().__init__(params, fed)
        self.sum: dict[str, torch.Tensor] | None = None  # S: the sum of the L_j in `latest`, float64
        self.latest: dict[str, AdapterWeights] = {}  # each client's last upload L_j

    # ---- server side
    def _start(self, cid: str) -> AdapterWeights:
        if self.params.alt_init == "shared":
            return self.fed.init_adapter
        return independent_init(self.fed.init_adapter, zlib.crc32(f"{self.fed.seed}/fedalt/{cid}".encode()))

    def rest(self, cid: str) -> AdapterWeights | LocalRef:
        """R_i = (S - L_i) / (n - 1): the mean of the other clients' L_j (S / n for a client not among them);
        before any upload, a fresh LoRA that nothing sends."""
        others = len(self.latest) - (cid in self.latest)
        if others == 0:
            return LocalRef(REST0, self.fed.init_adapter)
        own = self.latest.get(cid)
        return {k: ((s - own[k].double()) if own is not None else s).div(others).float() for k, s in self.sum.items()}

    def plan(self, round_idx: int, clients: list[str]) -> list[Job]:
        return [Job(client=cid, adapter="local", init=LocalRef(OWN, self._start(cid)), frozen=[(self.rest(cid), 1.0)])
                for cid in clients]

    def aggregate(self, round_idx: int, results) -> None:
        if self.params.alt_rest == "round":
            self.sum, self.latest = None, {}
        for r in results:  # S <- S - L_i(old) + L_i(new), upload by upload
            self._fold(r)

    def _fold(self, r: Result) -> None:
        cid, new = r.job.client, r.weights
        if self.sum is None:
            self.sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in new.items()}
        old = self.latest.get(cid)
        for k, s in self.sum.items():
            s.add_(new[k].double())
            if old is not None:
                s.sub_(old[k].double())
        self.latest[cid] = new

    def server_adapters(self) -> dict[str, AdapterWeights]:
        if self.sum is None:
            return {}
        return {"mean": {k: (s / len(self.latest)).float() for k, s in self.sum.items()}}

    def downlink(self, client_id: str) -> Downlink:
        rest = self.rest(client_id)
        return Downlink(adapters={"rest": rest.default if isinstance(rest, LocalRef) else rest})

    def router_state(self) -> RouterState:
        """As served (`auto@<client>`): client c's mixer over its R_i ("rest@c") and L_i ("local@c"), per token."""
        return RouterState("gate", params={"gate": "mixer", "top_k": None, "models": {
            cid: {"adapters": [f"rest@{cid}", f"local@{cid}"], "logits": [0, 1]} for cid in self.fed.clients}})

    def round_report(self, round_idx: int) -> dict:
        return {"fedalt_clients_in_rest": len(self.latest)}

    # ---- client side
    def job_correction(self, client: Client, job: Job) -> Correction:
        start = client.resolve(job.init)
        return Correction(gating=Gating(client.store.get(MIXER) or zero_gate(start, len(TERMS)), TERMS))

    def job_done(self, client: Client, job: Job, run: JobRun) -> dict[str, AdapterWeights]:
        client.store[OWN], client.store[MIXER] = split_gate(run.trained)
        return {}

    def _own(self, client: Client) -> AdapterWeights:
        return client.store.get(OWN) or self._start(client.id)

    def eval_adapters(self, client: Client, sent: Downlink) -> dict[str, AdapterWeights]:
        return {"rest": sent.adapters["rest"], "local": self._own(client)}

    def eval_gates(self, client: Client, sent: Downlink) -> list[AdapterWeights]:
        return [client.store.get(MIXER) or zero_gate(self._own(client), len(TERMS))]

    def route(self, client: Client, records, names: list[str], rt, sent: Downlink) -> RowMix:
        """Every row through the client's mixer: logit 0 onto R_i ("rest"), logit 1 onto L_i ("local")."""
        slots = [names.index("rest"), names.index("local")]
        n = len(records)
        return RowMix(torch.tensor([slots] * n), torch.full((n, 2), 0.5), gate=torch.zeros(n, dtype=torch.long),
                      n=len(names))

    def client_adapters(self, client: Client, sent: Downlink | None = None) -> dict[str, AdapterWeights]:
        out = {"local": self._own(client)}
        if sent is not None:
            out["rest"] = sent.adapters["rest"]
        return out

    def client_arrays(self, client: Client, rt, sent=None) -> dict[str, dict[str, torch.Tensor]]:
        return {"mixer": self.eval_gates(client, None)[0]}  # what `taskfed serve` mixes with (zero: untrained)

