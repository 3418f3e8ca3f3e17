"""Local: each client trains its own adapter on its own data for R rounds; nothing travels."""

from __future__ import annotations

from taskfed.methods.base import Client, Job, LocalRef, Method, Result


class Local(Method):
    name = "local"

    def plan(self, round_idx: int, clients: list[str]) -> list[Job]:
        # The adapter starts from the shared v0 held by every client and stays on the client.
        return [Job(client=c, adapter="local", init=LocalRef("local", self.fed.init_adapter), keep_as="local",
                    upload=False) for c in clients]

    def aggregate(self, round_idx: int, results: list[Result]) -> None:
        pass  # nothing reaches the server

    def eval_adapters(self, client: Client, sent):
        return {"local": client.resolve(LocalRef("local", self.fed.init_adapter))}

    def client_adapters(self, client: Client, sent=None):
        return {"local": client.resolve(LocalRef("local", self.fed.init_adapter))}
