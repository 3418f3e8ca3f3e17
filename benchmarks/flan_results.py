"""The methods side by side on the FedDPA FLAN tasks with SmolLM2, on a budget a 2-core CPU can afford.

    python benchmarks/flan_results.py --out runs/flan            # all three settings
    python benchmarks/flan_results.py --out runs/flan --only dual

Settings (same budget and seed for every method of a setting; the base model is loaded once):
- dual (task interference, 8 clients): Local, FedAvg, FedRouter (FedRouter issue);
- single (FedDPA's setting, 8 clients, one task each): Local, FedAvg, FedDPA-F and FedDPA-T, each FedDPA
  trained once and evaluated with the three weightings (FedDPA issue): P = local mode, TTP = global mode;
- dirichlet (FL-TAC's setting, 10 clients, Dirichlet(0.5)): FedAvg, FL-TAC, per task (FL-TAC issue).
Each run folder lands in OUT/<setting>-<method>[-<weighting>]; OUT/results.md gathers the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from taskfed.config import load_config  # noqa: E402
from taskfed.run import Experiment
from taskfed.runfolder import finish_out, prepare_out  # noqa: E402
from taskfed.runtime import Runtime  # noqa: E402

BUDGET = ["model.name=smollm2", f"data.path={ROOT.parent / 'shared/data/flan-feddpa/dataset1'}",
          "data.template=plain", "data.max_length=192", "data.max_train_per_task=96", "train.rounds=2",
          "train.steps=3", "train.batch=8", "train.lr_max=1e-3", "train.lr_min=1e-4",
          "eval.max_rows_per_task=8", "eval.max_new_tokens=32", "eval.batch_size=24",
          "eval.modes=['local', 'global']"]

SETTINGS = {
    "dual": (["scenario.name=dual", "scenario.n_clients=8"],
             [{"name": "local"}, {"name": "fedavg"}, {"name": "fedrouter", "n_local": 2}]),
    # Fewer evaluation rows where every client holds its own adapters (no shared generations): 5 per task.
    "single": (["scenario.name=single", "scenario.n_clients=8", "eval.max_rows_per_task=5"],
               [{"name": "local"}, {"name": "fedavg"}, {"name": "feddpa-f"}, {"name": "feddpa-t"}]),
    "dirichlet": (["scenario.name=dirichlet", "scenario.n_clients=10", "scenario.alpha=0.5", "train.steps=2",
                   "eval.max_rows_per_task=5"],
                  [{"name": "fedavg"}, {"name": "fltac"}]),
}
WEIGHTINGS = ("local", "official", "fixed")


def overrides(table: dict) -> list[str]:
    return [f"method.{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in table.items()]


def run_setting(name: str, out: Path, rt_holder: list) -> list[dict]:
    scenario, methods = SETTINGS[name]
    rows = []
    for table in methods:
        cfg = load_config(None, BUDGET + scenario + overrides(table))
        if not rt_holder:
            rt_holder.append(Runtime(cfg))
        label = f"{name}-{table['name']}"
        print(f"== {label}", flush=True)
        weightings = WEIGHTINGS if table["name"].startswith("feddpa") else (None,)
        todo = [w for w in weightings if not (out / (label + (f"-{w}" if w else "")) / "metrics.json").exists()]
        if todo:
            exp = Experiment(cfg, rt=rt_holder[0], log=lambda s: print("  ", s, flush=True))
            rounds, setup_bytes = exp.train()
            for w in todo:
                if w:  # FedDPA: one training, evaluated under each weighting
                    exp.method.params = exp.method.params.model_copy(update={"weighting": w})
                folder = out / (label + (f"-{w}" if w else ""))
                tmp = prepare_out(folder)
                start = time.perf_counter()
                metrics = {"method": table["name"] + (f"[{w}]" if w else ""), "scenario": cfg.scenario.name,
                           "seed": cfg.seed, "rounds": rounds, "eval": exp.evaluate(),
                           "bytes_communicated": setup_bytes + sum(r["bytes_up"] + r["bytes_down"] for r in rounds)}
                metrics["eval_seconds"] = time.perf_counter() - start
                exp.write(tmp, metrics)
                finish_out(tmp, folder)
        for w in weightings:
            rows.append(json.loads((out / (label + (f"-{w}" if w else "")) / "metrics.json").read_text()))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | local (P) | global (TTP) | train s | bytes | extra |", "|---|---|---|---|---|---|"]
    for m in rows:
        ev = m["eval"]
        extra = []
        if ev.get("local", {}).get("router_accuracy") is not None:
            extra.append(f"router acc. {ev['global']['router_accuracy']:.3f}")
        if "clustering_accuracy_per_round" in ev.get("global", {}):
            extra.append("clustering acc. per round " + ", ".join(f"{a:.2f}" for a in ev["global"]["clustering_accuracy_per_round"]))
        secs = sum(r["seconds"] for r in m["rounds"])
        lines.append(f"| {m['method']} | {ev['local']['score']:.4f} | {ev['global']['score']:.4f} | {secs:.0f} | "
                     f"{m['bytes_communicated']:,} | {'; '.join(extra)} |")
    return "\n".join(lines)


def per_task(rows: list[dict], mode: str = "local") -> str:
    """Mean ROUGE-1 per task over the clients evaluated on it."""
    tasks = sorted({t for m in rows for c in m["eval"][mode]["per_client"].values() for t in c["per_task"]})
    lines = ["| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m in rows:
        cells = []
        for t in tasks:
            vals = [(c["per_task"][t]["rouge1"], c["per_task"][t]["n"]) for c in m["eval"][mode]["per_client"].values() if t in c["per_task"]]
            cells.append(f"{sum(v * n for v, n in vals) / sum(n for _, n in vals):.3f}" if vals else "")
        lines.append(f"| {m['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "flan")
    ap.add_argument("--only", choices=list(SETTINGS), action="append")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rt_holder: list = []
    report = [f"Budget: {' '.join(BUDGET[2:])}", ""]
    for name in args.only or list(SETTINGS):
        rows = run_setting(name, args.out, rt_holder)
        report += [f"## {name}", "", table(rows), "", f"Per task, {'local' if name != 'dirichlet' else 'local'} mode:", "",
                   per_task(rows), ""]
        (args.out / "results.md").write_text("\n".join(report))
        print("\n".join(report[-7:]), flush=True)


if __name__ == "__main__":
    main()
