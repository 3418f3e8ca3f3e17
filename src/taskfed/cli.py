"""The command line: `taskfed run`, `taskfed demo`, `taskfed bench`, `taskfed report`."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer
from rich.console import Console

from taskfed.errors import TaskfedError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Task-centric personalized federated fine-tuning.")
console = Console(stderr=True)


def _fail(exc: TaskfedError) -> None:
    console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _log(message: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}", highlight=False)


@app.command()
def run(
    config: Path = typer.Argument(..., help="Run configuration (TOML)."),
    out: Path = typer.Option(..., "--out", help="Run folder to create."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key: key=value (repeatable)."),
    smoke: bool = typer.Option(False, "--smoke", help="Same config on the tiny model with a minimal budget."),
) -> None:
    """Run one experiment and write its run folder."""
    from taskfed.config import load_config, smoke as smoke_config
    from taskfed.run import run_experiment

    try:
        cfg = load_config(config, set_ or [])
        if smoke:
            cfg = smoke_config(cfg)
        metrics = run_experiment(cfg, out, log=_log)
    except TaskfedError as exc:
        _fail(exc)
    scores = ", ".join(f"{m} {e['score']:.4f}" for m, e in metrics["eval"].items() if e["score"] is not None)
    console.print(f"[green]done[/green] {metrics['method']}: {scores}; run folder {out}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the two run folders."),
    config: Path = typer.Option(None, "--config", help="Demo config (default: the packaged one)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key (repeatable)."),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny model, minimal budget."),
) -> None:
    """Local and FedAvg on BIG-bench tasks in the dual scenario with SmolLM2; prints a score table."""
    from taskfed.demo import run_demo

    try:
        table = run_demo(out, config, set_ or [], smoke, log=_log)
    except TaskfedError as exc:
        _fail(exc)
    print(table)


@app.command()
def bench(
    suite: Path = typer.Argument(..., help="Suite file (TOML): methods x scenarios x seeds."),
    out: Path = typer.Option(..., "--out", help="Bench folder: one run folder per cell, report.md."),
    smoke: bool = typer.Option(False, "--smoke", help="Every cell on the tiny model with the minimal budget."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda[:n] (bf16 on cuda); default: the suite's."),
) -> None:
    """Run every unfinished cell of a suite (an interrupted bench resumes), then write DIR/report.md."""
    from taskfed.bench.suite import run_bench

    try:
        grid = run_bench(suite, out, smoke=smoke, device=device, log=_log, command=" ".join(["taskfed"] + sys.argv[1:]))
    except TaskfedError as exc:
        _fail(exc)
    console.print(f"[green]done[/green] {len(grid)} cells; report {out / 'report.md'}")


@app.command()
def report(folder: Path = typer.Argument(..., help="A bench folder.")) -> None:
    """Rebuild DIR/report.md and its figures from the run folders alone."""
    from taskfed.bench.report import write_report

    try:
        path = write_report(folder)
    except TaskfedError as exc:
        _fail(exc)
    console.print(f"[green]done[/green] {path}")


from taskfed.flower.cli import app as flower_app  # noqa: E402  (imports flwr only when a command runs)

app.add_typer(flower_app, name="flower", help="Run a method on Flower (simulation or SuperLink + SuperNodes).")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
