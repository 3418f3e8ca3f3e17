"""`taskfed flower ...`: a Typer sub-app (mounted by the main CLI with `app.add_typer(flower_app, name="flower")`).
Its commands:

    taskfed flower simulate CONFIG --out DIR [--set key=value ...] [--smoke] [--workers N]
                            [--client-cpus C] [--client-gpus G]
    taskfed flower certs DIR            throwaway CA + server certificate for 127.0.0.1/localhost
    taskfed flower node-key DIR NAME    a SuperNode's EC key pair (OpenSSH format) for authentication
"""

from __future__ import annotations

import taskfed.flower  # noqa: F401  (telemetry off before flwr is imported)

from pathlib import Path
from typing import Optional

import typer

from taskfed.guard import guarded

app = typer.Typer(help="Run taskfed methods on Flower (docs/flower.md).", no_args_is_help=True,
                  pretty_exceptions_enable=False)


@app.command()
def simulate(config: Path, out: Path = typer.Option(..., help="run folder to write"),
             set_: Optional[list[str]] = typer.Option(None, "--set", help="key=value overrides"),
             smoke_run: bool = typer.Option(False, "--smoke", help="tiny model, minimal budget"),
             workers: Optional[int] = typer.Option(None, help="Ray workers (default: CPUs, at most one per client)"),
             resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from OUT.partial/"),
             client_cpus: Optional[float] = typer.Option(None, "--client-cpus", help="CPUs per simulated client "
                                                         "(Ray actor; default 1)"),
             client_gpus: Optional[float] = typer.Option(None, "--client-gpus", help="GPU share per simulated client, "
                                                         "e.g. 0.25: four per GPU (default: with model.device cuda, "
                                                         "the GPUs shared evenly; else 0)")):
    """Run CONFIG on Flower's Simulation Engine, one SuperNode per client."""
    from taskfed.config import load_config, smoke
    from taskfed.runfolder import check_out

    with guarded(sigterm=True):
        cfg = load_config(config, set_ or [])
        check_out(out, resume)
        from taskfed.flower.simulation import simulate as run  # flwr, torch: only once the config is valid

        cfg = smoke(cfg) if smoke_run else cfg
        metrics = run(cfg, out, workers=workers, resume=resume, client_cpus=client_cpus, client_gpus=client_gpus)
    last = metrics["rounds"][-1]
    scores = "".join(f", {m} {e['score']:.4f}" for m, e in metrics["eval"].items() if e["score"] is not None)
    typer.echo(f"{len(metrics['rounds'])} rounds on Flower, last loss {last['train_loss']:.4f}{scores}; run folder {out}")


@app.command()
def certs(folder: Path, force: bool = typer.Option(False, "--force", help="replace existing files")):
    """Write a throwaway CA and a server certificate for 127.0.0.1/localhost (ca.crt, server.pem, server.key)."""
    from taskfed.flower.local import make_tls

    with guarded():
        paths = make_tls(folder, force=force)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


@app.command("node-key")
def node_key(folder: Path, name: str, force: bool = typer.Option(False, "--force", help="replace an existing key")):
    """Write a SuperNode key pair: NAME (private, for --auth-supernode-private-key) and NAME.pub (to register)."""
    from taskfed.flower.local import make_node_key

    with guarded():
        private, public = make_node_key(folder, name, force=force)
    typer.echo(f"private: {private}\npublic: {public}")
