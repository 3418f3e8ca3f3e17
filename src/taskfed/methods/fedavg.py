"""FedAvg / FedIT: one global adapter; sampled clients train it; the server averages by sample count."""

from __future__ import annotations

from taskfed.methods.base import Job, Method, RunningMean


class FedAvg(Method):
    name = "fedavg"
    prox_mu = 0.0  # FedProx overrides

    def __init__(self, params, fed):
        super().__init__(params, fed)
        self.global_adapter = fed.init_adapter

    def plan(self, round_idx: int, clients: list[str]) -> list[Job]:
        return [Job(client=c, adapter="global", init=self.global_adapter, prox_mu=self.prox_mu) for c in clients]

    def aggregate(self, round_idx: int, results) -> None:
        # Streaming: each upload is folded into a running sum as it arrives, in plan order (sorted by client).
        mean = RunningMean()
        for r in results:
            mean.add(r.weights, r.n_client)
        if mean:  # else every upload was refused: the global adapter stays
            self.global_adapter = mean.mean()

    def server_adapters(self):
        return {"global": self.global_adapter}
