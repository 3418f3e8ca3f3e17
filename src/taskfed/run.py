"""One experiment on this machine: config -> population -> Runtime (the base model, loaded once) ->
InProcessEngine -> the federation driver (taskfed/federation.py) -> run folder.

`Experiment` is the driver over the in-process engine; it adds nothing to the round loop, which lives in
the driver only (the Flower ServerApp runs the same driver over a FlowerEngine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from taskfed.config import RunConfig
from taskfed.engine.inprocess import InProcessEngine
from taskfed.federation import Driver
from taskfed.population import load_records, population, sample_clients, test_sets  # noqa: F401  (re-exported)
from taskfed.runfolder import finish_out, plain, prepare_out  # noqa: F401  (re-exported)
from taskfed.runtime import Runtime


class Experiment(Driver):
    """The federation driver over an InProcessEngine holding every client of `cfg`'s population."""

    def __init__(self, cfg: RunConfig, rt: Runtime | None = None, log: Callable[[str], None] = lambda s: None,
                 gen_cache: dict | None = None):
        pop = population(cfg)
        for task in pop.seen + pop.unseen:
            if not pop.test_by_task[task] and any(m in cfg.eval.modes for m in ("local", "global", "unseen")):
                log(f"warning: task '{task}' has no test rows")
        if pop.untrained_tests:  # said once: these rows are in the test file but no mode evaluates them
            tasks = ", ".join(f"'{t}' ({n})" for t, n in pop.untrained_tests.items())
            log(f"note: test rows of tasks no client trains on are not evaluated: {tasks}; name a task in "
                f"data.unseen_tasks to evaluate it as an unseen task")
        self.rt = rt or Runtime(cfg)
        self.clients = pop.clients
        self.test_by_task, self.seen, self.unseen = pop.test_by_task, pop.seen, pop.unseen
        super().__init__(cfg, InProcessEngine(self.rt, pop, cfg, gen_cache=gen_cache), log=log)


def run_experiment(cfg: RunConfig, out_dir: str | Path | None = None, rt: Runtime | None = None,
                   log: Callable[[str], None] = lambda s: None, gen_cache: dict | None = None,
                   resume: bool = False) -> dict:
    return Experiment(cfg, rt=rt, log=log, gen_cache=gen_cache).run(out_dir, resume=resume)
