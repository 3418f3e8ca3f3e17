"""A taskfed run on Flower's Simulation Engine from Python: one SuperNode per client, Ray actors as workers.

Flower 1.41 marks the Python entry point (`flwr.simulation.run_simulation`) deprecated in favour of
`flwr run . local`; it is still the one way to hand over a ServerApp built in this process (a config
object, a client app wrapped by a test), so it is used here. `flwr run` works too (docs/flower.md).
"""

from __future__ import annotations

import logging

import taskfed.flower  # noqa: F401  (telemetry off before flwr is imported)

import math
import os
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from taskfed.config import RunConfig
from taskfed.errors import TaskfedError
from taskfed.flower.app import make_client_app
from taskfed.flower.server import Options, serve


def backend_config(cfg: RunConfig, workers: int | None = None, client_cpus: float | None = None,
                   client_gpus: float | None = None, n_gpus: int | None = None) -> dict[str, Any]:
    """Ray's backend config for the simulation: each virtual node's ClientApp runs in a Ray actor holding
    `client_cpus` CPUs and `client_gpus` GPUs (a fraction shares one: 0.25 puts four actors on a GPU; Ray
    sets each actor's CUDA_VISIBLE_DEVICES, so `model.device = "cuda"` is that actor's own GPU).
    Defaults: one CPU per actor, as many actors as CPUs (at most one per client); with `model.device` on
    CUDA the machine's GPUs shared evenly between the actors, else none. `n_gpus`: the GPUs Ray may use
    (default: torch's count)."""
    if n_gpus is None:
        import torch

        n_gpus = torch.cuda.device_count()
    workers = workers or max(1, min(os.cpu_count() or 1, cfg.scenario.n_clients))
    if client_cpus is None:
        client_cpus = 1.0
    if not (math.isfinite(client_cpus) and client_cpus > 0):
        raise TaskfedError(f"--client-cpus {client_cpus:g}: give a positive number of CPUs per client.")
    on_cuda = cfg.model.device.startswith("cuda")
    if client_gpus is None:
        client_gpus = min(1.0, n_gpus / workers) if on_cuda and n_gpus else 0.0
    if not (math.isfinite(client_gpus) and 0 <= client_gpus <= max(n_gpus, 0)):
        raise TaskfedError(f"--client-gpus {client_gpus:g}: give a share between 0 and this machine's "
                           f"{n_gpus} GPU{'s' if n_gpus != 1 else ''} (0.25: four clients per GPU).")
    if client_gpus > 0 and not on_cuda:
        raise TaskfedError(f"--client-gpus {client_gpus:g}: model.device is {cfg.model.device}; set model.device = "
                           f'"cuda" for the clients to use their GPU share.')
    if on_cuda and client_gpus == 0:
        raise TaskfedError(f"model.device {cfg.model.device}: the simulated clients get no GPU (--client-gpus 0"
                           f"{'; this machine has none' if not n_gpus else ''}); give them a share or run on the CPU.")
    return {"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
            "init_args": {"num_cpus": max(workers * client_cpus, client_cpus), "num_gpus": n_gpus,
                          "include_dashboard": False}}


def simulate(cfg: RunConfig, out_dir: str | Path | None = None, client_app: ClientApp | None = None,
             workers: int | None = None, round_timeout: float = 3600.0, resume: bool = False,
             client_cpus: float | None = None, client_gpus: float | None = None) -> dict[str, Any]:
    """Runs `cfg` on the Simulation Engine and returns the run's metrics (the run folder too, if asked).
    `workers`: Ray actors training in parallel (default: the CPU count, at most one per client);
    `client_cpus`, `client_gpus`: each actor's resources (`backend_config`). The actors are long-lived
    processes already: their ClientApps run `node.handle` themselves (no worker)."""
    from flwr.simulation import run_simulation

    backend = backend_config(cfg, workers, client_cpus, client_gpus)  # refused before Ray starts
    holder: dict[str, Any] = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        holder["metrics"] = serve(grid, cfg, Options(out_dir=Path(out_dir) if out_dir else None, round_timeout=round_timeout,
                                                    resume=resume))

    # flwr logs through its own console handler; a root handler that Ray installs on the way would print
    # its DEBUG lines a second time ("DEBUG:flwr:Stopping Simulation Runtime now.").
    logging.getLogger("flwr").propagate = False
    run_simulation(server_app=app, client_app=client_app or make_client_app(worker=False), num_supernodes=cfg.scenario.n_clients,
                   backend_config=backend)
    if "metrics" not in holder:
        raise TaskfedError("flower simulation: the ServerApp ended without finishing the run (see the log above).")
    return holder["metrics"]
