"""`taskfed demo`: the main job. Several methods on one config, the base model loaded once, a score table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from taskfed.config import load_config, smoke as smoke_config

DEMO_CONFIG = Path(__file__).with_name("demo.toml")
# Each entry is a [method] table applied to the demo config.
DEMO_METHODS = ({"name": "local"}, {"name": "fedavg"}, {"name": "fedrouter", "n_local": 2})


def run_demo(out: Path, config: Path | None, overrides: list[str], smoke: bool,
             log: Callable[[str], None] = print, methods: tuple[dict, ...] = DEMO_METHODS) -> str:
    base = load_config(config or DEMO_CONFIG, overrides)
    if smoke:
        base = smoke_config(base)
    # torch, transformers and the methods: only once the config is valid (a mistake prints in under 2 s)
    from taskfed.methods import method_params
    from taskfed.report import compare_table
    from taskfed.run import run_experiment
    from taskfed.runtime import Runtime

    rt = None
    rows = []
    for table in methods:
        name = table["name"]
        cfg = base.model_copy(update={"method": dict(table)})
        method_params(cfg.method, "demo")
        if rt is None:
            rt = Runtime(cfg)
        log(f"demo: {name} ({cfg.scenario.name} scenario, {cfg.scenario.n_clients} clients, model {cfg.model.name})")
        folder = out / name
        if (folder / "metrics.json").exists():  # finished earlier: reuse
            rows.append(json.loads((folder / "metrics.json").read_text()))
            continue
        rows.append(run_experiment(cfg, folder, rt=rt, log=log))
    table = compare_table(rows, [m for m in base.eval.modes])
    (out / "table.md").write_text(table + "\n")
    return table
