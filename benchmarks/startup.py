"""Startup: the wall time of `taskfed --help` and of `taskfed run BAD.toml` (a config error), median of N.

    python benchmarks/startup.py [--repeat 7]

Both must stay under 2 s (issue 18): the CLI imports typer, rich and pydantic only, and a config is
validated (method parameters included, read from the method files' source) before torch, transformers or
a method file is imported. Each run is a fresh process, as a user's is.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wall(args: list[str], env: dict[str, str], expect: int) -> float:
    tic = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - tic
    if proc.returncode != expect:
        raise SystemExit(f"{' '.join(args)}: exit {proc.returncode}, expected {expect}\n{proc.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), FLWR_TELEMETRY_ENABLED="0")
    cli = [sys.executable, "-m", "taskfed.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "bad.toml"
        # Valid up to a method key: every table is validated, the method's parameters last.
        bad.write_text((ROOT / "configs" / "fedprox.toml").read_text().replace("[method]", "[method]\nmuu = 1", 1))
        cases = {"taskfed --help": (cli + ["--help"], 0),
                 "taskfed run BAD.toml (config error)": (cli + ["run", str(bad), "--out", str(Path(tmp) / "x")], 2)}
        for name, (command, code) in cases.items():
            times = [wall(command, env, code) for _ in range(args.repeat)]
            print(f"{name}: median {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f}, "
                  f"n={args.repeat})")


if __name__ == "__main__":
    main()
