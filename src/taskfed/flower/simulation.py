"""A taskfed run on Flower's Simulation Engine from Python: one SuperNode per client, Ray actors as workers.

Flower 1.41 marks the Python entry point (`flwr.simulation.run_simulation`) deprecated in favour of
`flwr run . local`; it is still the one way to hand over a ServerApp built in this process (a config
object, a client app wrapped by a test), so it is used here. `flwr run` works too (docs/flower.md).
"""

from __future__ import annotations

import taskfed.flower  # noqa: F401  (telemetry off before flwr is imported)

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


def simulate(cfg: RunConfig, out_dir: str | Path | None = None, client_app: ClientApp | None = None,
             workers: int | None = None, round_timeout: float = 3600.0, resume: bool = False) -> dict[str, Any]:
    """Runs `cfg` on the Simulation Engine and returns the run's metrics (the run folder too, if asked).
    `workers`: Ray actors training in parallel (default: the CPU count, at most one per client). The actors
    are long-lived processes already: their ClientApps run `node.handle` themselves (no worker)."""
    from flwr.simulation import run_simulation

    holder: dict[str, Any] = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        holder["metrics"] = serve(grid, cfg, Options(out_dir=Path(out_dir) if out_dir else None, round_timeout=round_timeout,
                                                    resume=resume))

    workers = workers or max(1, min(os.cpu_count() or 1, cfg.scenario.n_clients))
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": workers, "include_dashboard": False}}
    run_simulation(server_app=app, client_app=client_app or make_client_app(worker=False), num_supernodes=cfg.scenario.n_clients,
                   backend_config=backend)
    if "metrics" not in holder:
        raise TaskfedError("flower simulation: the ServerApp ended without finishing the run (see the log above).")
    return holder["metrics"]
