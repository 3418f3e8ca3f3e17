"""The command line: `taskfed run`, `taskfed demo`, `taskfed bench`, `taskfed report`, `taskfed serve`."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer

from taskfed import __version__
from taskfed.guard import guarded, say
from taskfed.errors import TaskfedError

# Only typer, rich and pydantic are imported before a command runs: a config is validated before torch,
# transformers or a method file is imported (benchmarks/startup.py). No pretty exceptions: they print
# local variables (clients' training rows); guard.guarded prints one line instead.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Task-centric personalized federated fine-tuning.")


def _version(value: bool) -> None:
    if value:
        print(f"taskfed {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Task-centric personalized federated fine-tuning."""


def _log(message: str) -> None:
    say(time.strftime("%H:%M:%S"), "dim", message)


@app.command()
def run(
    config: Path = typer.Argument(..., help="Run configuration (TOML)."),
    out: Path = typer.Option(..., "--out", help="Run folder to create."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key: key=value (repeatable)."),
    smoke: bool = typer.Option(False, "--smoke", help="Same config on the tiny model with a minimal budget."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint "
                                                        "(OUT.partial/), to the same result."),
) -> None:
    """Run one experiment and write its run folder (checkpointed after every round into OUT.partial/)."""
    from taskfed.config import load_config, smoke as smoke_config, smoke_fitted, smoke_overridden
    from taskfed.runfolder import check_out

    with guarded(sigterm=True):
        cfg = load_config(config, set_ or [])
        if smoke:
            cfg, asked = smoke_config(cfg), cfg
            for item in smoke_overridden(set_ or []):
                _log(f"note: --smoke replaces --set {item} (the tiny model, a minimal budget)")
            for item in smoke_fitted(asked, cfg):
                _log(f"note: --smoke runs {item}, within its {cfg.train.rounds} rounds")
        check_out(out, resume, _log)
        from taskfed.run import run_experiment  # torch and the methods: only once the config is valid

        metrics = run_experiment(cfg, out, log=_log, resume=resume)
    scores = ", ".join(f"{m} {e['score']:.4f}" for m, e in metrics["eval"].items() if e["score"] is not None)
    say("done", "green", f"{metrics['method']}: {scores}; run folder {out}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the three run folders (local, fedavg, "
                                                                 "fedrouter) and table.md."),
    config: Path = typer.Option(None, "--config", help="Demo config (default: the packaged one)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key (repeatable)."),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny model, minimal budget."),
) -> None:
    """Local, FedAvg and FedRouter on BIG-bench tasks in the dual scenario with SmolLM2; prints a score table."""
    from taskfed.demo import run_demo

    with guarded(sigterm=True):
        table = run_demo(out, config, set_ or [], smoke, log=_log)
    print(table)


@app.command()
def bench(
    suite: Path = typer.Argument(..., help="Suite file (TOML): methods x scenarios x seeds."),
    out: Optional[Path] = typer.Option(None, "--out", help="Bench folder: one run folder per cell, report.md."),
    smoke: bool = typer.Option(False, "--smoke", help="Every cell on the tiny model with the minimal budget."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda[:n] (bf16 on cuda); default: the suite's."),
    estimate: bool = typer.Option(False, "--estimate", help="Print each cell's expected time on the device from a "
                                  "short measured run (no --out; nothing is kept)."),
) -> None:
    """Run every unfinished cell of a suite (an interrupted bench resumes), then write DIR/report.md."""
    from taskfed.bench.suite import run_bench

    if estimate:
        with guarded():
            from taskfed.bench.estimate import estimate as probe, table
            from taskfed.bench.suite import cells, load_suite

            grid = cells(load_suite(suite), str(suite), smoke, device)
            print(table(probe(grid, log=_log), device or grid[0].cfg.model.device))
        return
    if out is None:
        with guarded():
            raise TaskfedError("taskfed bench: give --out DIR (where the cells' run folders go), or --estimate.")
    with guarded(sigterm=True):
        grid = run_bench(suite, out, smoke=smoke, device=device, log=_log, command=" ".join(["taskfed"] + sys.argv[1:]))
    say("done", "green", f"{len(grid)} cells; report {out / 'report.md'}")


@app.command()
def report(folder: Path = typer.Argument(..., help="A bench folder.")) -> None:
    """Rebuild DIR/report.md and its figures from the run folders alone."""
    from taskfed.bench.report import write_report

    with guarded():
        path = write_report(folder)
    say("done", "green", str(path))


@app.command()
def serve(
    run_dir: Path = typer.Argument(..., help="A run folder (taskfed run's --out)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback unless told otherwise)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TASKFED_API_KEY",
                                          help="Require Authorization: Bearer KEY (or set TASKFED_API_KEY)."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Rows decoded together at most (1: no batching)."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="Requests waiting at most; more get 429."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="The cap on a request's max_tokens."),
    max_body: int = typer.Option(1 << 20, "--max-body", min=1, help="Request body limit in bytes."),
    timeout: float = typer.Option(120.0, "--timeout", min=0.001, help="Seconds a request may take, queueing included."),
    max_distance: Optional[float] = typer.Option(None, "--max-distance", min=0.0,
                                                 help="Abstain: an input farther than this (Euclidean, in the "
                                                      "router's embedding space) from its nearest centroid goes to "
                                                      "--fallback. At start, serve prints the centroids' spacing as a "
                                                      "scale; each answer reports its distances."),
    fallback: str = typer.Option("base", "--fallback", help="What answers an abstained input: base or an adapter (global)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda[:n]; default: the run's."),
    ssl_certfile: Optional[str] = typer.Option(None, "--ssl-certfile", help="TLS certificate (PEM)."),
    ssl_keyfile: Optional[str] = typer.Option(None, "--ssl-keyfile", help="TLS private key (PEM)."),
) -> None:
    """Serve a trained run: its adapters and router behind an OpenAI-compatible API, batched (docs in README)."""
    with guarded():
        if bool(ssl_certfile) != bool(ssl_keyfile):
            from taskfed.errors import TaskfedError

            raise TaskfedError("--ssl-certfile and --ssl-keyfile go together: give both for TLS, or neither.")
        from taskfed.serve.api import Limits, serve as serve_run

        serve_run(run_dir, host=host, port=port, limits=Limits(api_key=api_key or None, max_tokens=max_tokens,
                                                                 max_body=max_body, timeout=timeout),
                  max_batch=max_batch, max_queue=max_queue, max_distance=max_distance, fallback=fallback, device=device,
                  ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, log=_log)


from taskfed.flower.cli import app as flower_app  # noqa: E402  (imports flwr only when a command runs)

app.add_typer(flower_app, name="flower", help="Run a method on Flower (simulation or SuperLink + SuperNodes).")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
