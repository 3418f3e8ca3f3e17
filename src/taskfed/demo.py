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
    names = [t["name"] for t in methods]
    # The first second says what is coming: importing torch and the methods takes several seconds.
    log(f"demo: {', '.join(names)} on {base.model.name}, {base.scenario.name} scenario, {base.scenario.n_clients} "
        f"clients; run folders in {out}/")
    from taskfed import progress

    with progress.task("demo: loading torch, transformers and the methods"):
        from taskfed.methods import method_params
        from taskfed.report import compare_table
        from taskfed.run import run_experiment
        from taskfed.runtime import Runtime

    rt = None
    rows = []
    for i, table in enumerate(methods, 1):
        name = table["name"]
        cfg = base.model_copy(update={"method": dict(table)})
        method_params(cfg.method, "demo")
        if rt is None:
            rt = Runtime(cfg)
        folder = out / name
        log(f"demo {i}/{len(methods)}: {name} into {folder}")
        if (folder / "metrics.json").exists():  # finished earlier: reuse
            rows.append(json.loads((folder / "metrics.json").read_text()))
            continue
        with progress.task(f"demo {i}/{len(methods)}: {name}"):  # the method's bars nest under its name
            rows.append(run_experiment(cfg, folder, rt=rt, log=log))
    table = compare_table(rows, [m for m in base.eval.modes])
    (out / "table.md").write_text(table + "\n")
    served = "fedrouter" if "fedrouter" in names else names[-1]  # the routed one, when the demo has it
    return (f"{table}\n\nrun folders: {', '.join(str(out / n) for n in names)} (table.md beside them)\n"
            f"serve one (OpenAI-compatible, each request routed to its task's adapter): taskfed serve {out / served}")
