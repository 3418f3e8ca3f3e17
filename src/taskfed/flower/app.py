"""The Flower app: `server_app` and `client_app`, named in pyproject.toml's [tool.flwr.app.components].

The ServerApp reads its run config (`flwr run . <connection> --run-config "..."`):
    config         path of a taskfed TOML config, as the SuperLink's machine sees it (required)
    set            overrides as in `taskfed run --set`, separated by ";" (e.g. "train.rounds=2; seed=1")
    smoke          true: the same config on the tiny model with a minimal budget
    out            the run folder to write (default: runs/flower-<method>-<run id>)
    round-timeout  seconds a round waits for replies (default 3600)
The nodes need no copy of the config: the server sends the validated config with every message.
"""

from __future__ import annotations

import taskfed.flower  # noqa: F401  (sets FLWR_TELEMETRY_ENABLED=0 before flwr is imported)

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from taskfed.config import RunConfig, load_config, smoke
from taskfed.flower import node
from taskfed.flower.server import Options, serve


def config_from_run_config(run_config: dict) -> tuple[RunConfig, Options]:
    if "config" not in run_config:
        raise ValueError("flower run config: 'config' (the path of a taskfed TOML config) is required.")
    overrides = [s.strip() for s in str(run_config.get("set", "")).split(";") if s.strip()]
    cfg = load_config(str(run_config["config"]), overrides)
    if run_config.get("smoke", False):
        cfg = smoke(cfg)
    return cfg, Options(out_dir=Path(str(run_config["out"])) if run_config.get("out") else None,
                        round_timeout=float(run_config.get("round-timeout", 3600.0)))


def make_server_app(cfg: RunConfig | None = None, opts: Options | None = None) -> ServerApp:
    """A ServerApp for `cfg`, or (None) for the config named in the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg, run_opts = (cfg, opts or Options()) if cfg is not None else config_from_run_config(dict(context.run_config))
        if run_opts.out_dir is None:
            run_opts.out_dir = Path("runs") / f"flower-{run_cfg.method_name}-{context.run_id}"
        serve(grid, run_cfg, run_opts)

    return app


def make_client_app() -> ClientApp:
    """Each message goes to `node.handle` (through the node's long-lived worker where one runs)."""
    app = ClientApp()

    def handler(kind: str):
        def run(msg: Message, context: Context) -> Message:
            content = node.handle(kind, msg.content, dict(context.node_config), context.run_id)
            return Message(content, reply_to=msg)
        return run

    for kind in ("hello", "setup", "round"):
        app.train(kind)(handler(kind))
    app.evaluate("mode")(handler("evaluate"))
    return app


server_app = make_server_app()
client_app = make_client_app()
