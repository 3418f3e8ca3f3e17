"""The ServerApp's side: the one federation driver (taskfed/federation.py) over a FlowerEngine.

Nothing of the round loop lives here: `serve` hands the driver the Flower engine instead of the in-process
one, and the driver does setup, rounds, evaluation on the nodes and the run folder exactly as `taskfed run`.
"""

from __future__ import annotations

from typing import Any, Callable

from flwr.serverapp import Grid

from taskfed.config import RunConfig
from taskfed.federation import Driver
from taskfed.flower.engine import LOG, FlowerEngine, Options

__all__ = ["Options", "serve"]


def serve(grid: Grid, cfg: RunConfig, opts: Options | None = None,
          log: Callable[[str], None] = LOG.info) -> dict[str, Any]:
    """Runs `cfg` over the grid's nodes; returns its metrics (and writes the run folder if asked)."""
    opts = opts or Options()
    driver = Driver(cfg, FlowerEngine(grid, cfg, opts), log=log)
    return driver.run(opts.out_dir, resume=opts.resume)
