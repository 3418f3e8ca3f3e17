"""Base: the untrained base model, the reference row of every bench scenario (not a method of methods.md).

No round runs and nothing travels. Every row is answered under the shared initial adapter v0, whose LoRA
B matrices are zero: its output is the frozen base model's own, on the same prompts as every method. A
method that is not clearly above this row at a budget has not learnt anything measurable at that budget.
"""

from __future__ import annotations

from taskfed.methods.base import Client, Downlink, Method


class Base(Method):
    name = "base"

    def n_rounds(self, rounds: int) -> int:
        return 0  # whatever the budget: the base model is not trained

    def plan(self, round_idx: int, clients: list[str]) -> list:
        return []

    def aggregate(self, round_idx: int, results) -> None:
        pass

    def eval_adapters(self, client: Client, sent: Downlink):
        return {"base": self.fed.init_adapter}
