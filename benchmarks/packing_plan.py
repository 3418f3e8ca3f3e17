"""The packing plan of a real round, without training: padding share and passes per step of
configs/fedrouter-dual.toml's round (SmolLM2 tokenizer, FLAN dual, 8 clients x 10 steps x 16 rows, the rows
every job would draw), planned as on an H200 (tokens layout, 139 GiB free) against the old default (rows
layout: each job alone, 16 rows a pass). Host arithmetic only: runs in seconds on any machine.

    python benchmarks/packing_plan.py
"""
from taskfed.config import load_config
from taskfed.runtime import Runtime
from taskfed.run import Experiment
from taskfed.training import sample_order
from taskfed import packing

cfg = load_config("configs/fedrouter-dual.toml")
rt = Runtime(cfg)
clients = Experiment(cfg, rt=rt).clients
tot = {"tokens": [0, 0], "rows": [0, 0]}
lay_t = packing.layout_for(cfg.train, "cuda", rt.model.config, 2, 139 * 2**30)
lay_r = packing.layout_for(cfg.train, "cpu")
passes = []
for step in range(cfg.train.steps):
    lengths = []
    for j, (cid, c) in enumerate(sorted(clients.items())):
        rows = [rt.encode(r) for r in c.records]
        order = sample_order(len(rows), cfg.train.steps * 16, j)
        lengths += [len(rows[i].ids) for i in order[step * 16:(step + 1) * 16]]
    for name, lay in (("tokens", lay_t), ("rows", lay_r)):
        p = packing.plan_step(lengths, lay) if name == "tokens" else None
        if name == "rows":  # the old default: each job alone, 16 rows a pass
            comp = sum(packing.plan_step(lengths[k:k + 16], lay).computed_tokens() for k in range(0, len(lengths), 16))
        else:
            comp = p.computed_tokens(); passes.append((len(p.passes), p.widths[0]))
        tot[name][0] += sum(lengths); tot[name][1] += comp
for name, (real, comp) in tot.items():
    print(name, "real", real, "computed", comp, "padding share %.3f" % (1 - real / comp))
print("passes, width per step:", passes, "budget", lay_t.max_tokens)
