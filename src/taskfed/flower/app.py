"""The Flower app: `server_app` and `client_app`, named in pyproject.toml's [tool.flwr.app.components].

The ServerApp reads its run config (`flwr run . <connection> --run-config "..."`):
    config         path of a taskfed TOML config, as the SuperLink's machine sees it (required)
    set            overrides as in `taskfed run --set`, separated by ";" (e.g. "train.rounds=2; seed=1")
    smoke          true: the same config on the tiny model with a minimal budget
    out            the run folder to write (default: runs/flower-<method>-<run id>)
    round-timeout  seconds a round (or an evaluation) waits for replies (default 3600)
    rejoin-timeout seconds a round waits, before it starts, for the node of a client that left to come
                   back (default 0: a node that is back in time rejoins, the round does not wait)
    resume         true: continue the run in `out`.partial/ from its last checkpoint
The nodes need no copy of the config: the server sends the validated config with every message.

The ClientApp forwards each message to its SuperNode's long-lived taskfed worker (flower/worker.py), which
keeps the model loaded between messages; node config `worker = false` runs `node.handle` in the ClientApp
process itself instead. This module imports only flwr: a ClientApp process that forwards stays light.
"""

from __future__ import annotations

import taskfed.flower  # noqa: F401  (sets FLWR_TELEMETRY_ENABLED=0 before flwr is imported)

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp


def config_from_run_config(run_config: dict):
    from taskfed.config import load_config, smoke
    from taskfed.flower.engine import Options

    if "config" not in run_config:
        raise ValueError("flower run config: 'config' (the path of a taskfed TOML config) is required.")
    overrides = [s.strip() for s in str(run_config.get("set", "")).split(";") if s.strip()]
    cfg = load_config(str(run_config["config"]), overrides)
    if run_config.get("smoke", False):
        cfg = smoke(cfg)
    return cfg, Options(out_dir=Path(str(run_config["out"])) if run_config.get("out") else None,
                        round_timeout=float(run_config.get("round-timeout", 3600.0)),
                        rejoin_timeout=float(run_config.get("rejoin-timeout", 0.0)),
                        resume=bool(run_config.get("resume", False)))


def make_server_app(cfg=None, opts=None) -> ServerApp:
    """A ServerApp for `cfg`, or (None) for the config named in the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from taskfed.flower.engine import Options
        from taskfed.flower.server import serve

        run_cfg, run_opts = (cfg, opts or Options()) if cfg is not None else config_from_run_config(dict(context.run_config))
        if run_opts.out_dir is None:
            run_opts.out_dir = Path("runs") / f"flower-{run_cfg.method_name}-{context.run_id}"
        serve(grid, run_cfg, run_opts)

    return app


def make_client_app(worker: bool = True) -> ClientApp:
    """Each message goes to `node.handle`: through the node's long-lived worker (`worker`, unless the node
    config says `worker = false`), or in this process (the Simulation Engine's actors are long-lived)."""
    app = ClientApp()

    def handler(kind: str):
        def run(msg: Message, context: Context) -> Message:
            node_config = dict(context.node_config)
            if worker and node_config.pop("worker", True):
                from taskfed.flower.worker import forward

                content = forward(kind, msg.content, node_config, context.run_id, context.node_id)
            else:
                node_config.pop("worker", None)
                from taskfed.flower import node

                content = node.handle(kind, msg.content, node_config, context.run_id)
            return Message(content, reply_to=msg)
        return run

    for kind in ("hello", "setup", "round"):
        app.train(kind)(handler(kind))
    app.evaluate("mode")(handler("evaluate"))

    @app.query("bye")
    def bye(msg: Message, context: Context) -> Message:
        """The run is over: the node's worker (if any) exits and frees its memory."""
        if worker:
            from taskfed.flower.worker import stop

            stop(context.node_id)
        return Message(RecordDict({"bye": ConfigRecord({"ok": True})}), reply_to=msg)

    return app


server_app = make_server_app()
client_app = make_client_app()
