"""`taskfed demo`: the main job. Several methods on one config, the base model loaded once, a score table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from taskfed.config import load_config, smoke as smoke_config
from taskfed.errors import TaskfedError

DEMO_CONFIG = Path(__file__).with_name("demo.toml")
# Where the FedDPA FLAN files lie beside a checkout (the project's CI and dev machines), from the working
# folder or from the project root of an editable install.
FLAN_BESIDE = Path("..") / "shared" / "data" / "flan-feddpa" / "dataset1"
FLAN_DATA = {"source": "feddpa", "template": "plain"}
# Each entry is a [method] table applied to the demo config. FedRouter routes on the mean hidden state of the
# first 4 decoder layers, not all 30: a second full forward per request made the served demo run slower than
# plain peft at one client (docs/serving.md); router accuracy at 4 layers is no lower (docs/benchmarks.md).
DEMO_METHODS = ({"name": "local"}, {"name": "fedavg"}, {"name": "fedrouter", "n_local": 2, "embed_layers": 4})


def run_demo(out: Path, config: Path | None, overrides: list[str], smoke: bool,
             log: Callable[[str], None] = print, methods: tuple[dict, ...] = DEMO_METHODS) -> str:
    base = load_config(config or DEMO_CONFIG, overrides)
    if smoke:
        base = smoke_config(base)
    names = [t["name"] for t in methods]
    # The first second says what is coming: importing torch and the methods takes several seconds.
    log(f"demo: {', '.join(names)} on {base.model.name}, {base.scenario.name} scenario, {base.scenario.n_clients} "
        f"clients; run folders in {out}/")
    if config is None and base.data.source == "bigbench" and not any(o.startswith("data.") for o in overrides):
        base = _demo_data(base, log)
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
        if smoke:  # the tiny model has 2 decoder layers: its router embeds at full depth
            table = {k: v for k, v in table.items() if k != "embed_layers"}
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


def _demo_data(cfg, log: Callable[[str], None]):
    """The demo's own data: BIG-bench when its archive can be had (cached, $TASKFED_BIGBENCH_ARCHIVE, or pip);
    else the FedDPA FLAN files where they lie beside the checkout, said in one line. PyPI has served only
    bigbench 0.0.1 (no task files) since December 2026, so a fresh machine cannot download 1.0.0's archive."""
    from taskfed.data.bigbench import DEFAULT_SUITE, ensure_tasks
    from taskfed.model.loading import cache_dir

    try:
        ensure_tasks((cfg.data.tasks + cfg.data.unseen_tasks) or DEFAULT_SUITE, cache_dir())
        return cfg
    except TaskfedError as err:
        # The folder only: its layout is load_feddpa's to check, with its own error naming the file.
        found = next((p for p in (FLAN_BESIDE, Path(__file__).resolve().parents[2] / FLAN_BESIDE) if p.is_dir()), None)
        if found is None:
            raise TaskfedError(f"{err} Or run the demo on the FedDPA FLAN files: taskfed demo --set "
                               f"data.source=feddpa --set data.path=<their folder>.") from None
        log(f"demo: no BIG-bench archive: {err} The demo runs on the FedDPA FLAN files in {found} instead.")
        data = cfg.data.model_dump(exclude_unset=True) | FLAN_DATA | {"path": str(found)}
        return cfg.model_copy(update={"data": type(cfg.data).model_validate(data)})
