"""A training step fit for a GPU (issue 27), checked on the CPU: no host sync inside the step, rows packed
into sequences with attention kept inside each row, the planner's passes on an H200's memory, float32
master weights under a bfloat16 base, and the token layout giving what jobs one by one give."""

import copy

import pytest
import torch
from transformers import LlamaConfig

from taskfed import packing
from taskfed.config import load_config
from taskfed.model.bank import RowMix, TokenMix
from taskfed.model.loading import load_base
from taskfed.opcount import OpCounter
from taskfed.run import Experiment
from taskfed.runtime import Runtime
from taskfed.training import PackStats, TrainSpec, _block_mask, layout_of, train_pack
from tests.conftest import ROOT, tiny_config


@pytest.fixture(scope="module")
def base():
    return load_base("tiny", seed=0)


def _runtime(base, *overrides, dtype=torch.float32):
    cfg = tiny_config("scenario.name=dual", *overrides)
    return Runtime(cfg, model=copy.deepcopy(base[0]).to(dtype), tokenizer=base[1])


def _random_adapter(rt, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) * scale for k, s in rt.bank.shapes().items()}


def _specs(rt, n=3, steps=3, lr=1e-2):
    """n jobs of different clients and batch sizes: one with a frozen detached adapter in its mix (FedDPA-T),
    one with a proximal term (FedProx)."""
    clients = list(Experiment(rt.cfg, rt=rt).clients.values())
    frozen = _random_adapter(rt, 99)
    specs = []
    for j in range(n):
        init = _random_adapter(rt, 10 + j)
        spec = TrainSpec(init=init, rows=[rt.encode(r) for r in clients[j].records], steps=steps, batch=2 + j % 3,
                         lr=lr, seed=100 + j)
        if j == 0:
            spec.frozen = [(frozen, 0.5)]
        if j == 1:
            spec.prox_mu, spec.prox_ref = 5.0, init
        specs.append(spec)
    return specs


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ----------------------------------------------------------------- no host sync inside a step
@pytest.mark.parametrize("layout", ["tokens", "rows"])
def test_a_pack_of_three_jobs_reads_nothing_back_between_its_first_and_last_step(base, layout):
    rt = _runtime(base, f"train.packing={layout}")
    stats = PackStats(counter=OpCounter())
    train_pack(rt, _specs(rt), stats)
    counter = stats.counter
    assert counter.ops > 100  # it did count the steps' ops (forward, backward, optimizer)
    assert counter.by_name["aten.mm"] + counter.by_name["aten.bmm"] + counter.by_name["aten.addmm"] > 0
    assert counter.syncs == 0, dict(counter.sync_names)


def test_the_counter_sees_the_syncs_the_old_step_had():
    """The counter is not blind: .item(), boolean-mask indexing and nonzero each count (`.tolist()` of a CPU
    tensor dispatches nothing; of a CUDA tensor it is a device-to-host copy, which counts)."""
    x = torch.arange(6.0)
    with OpCounter() as c:
        x.sum().item()
        x[x > 2].sum()
        torch.nonzero(x)
    assert c.syncs == 3 and set(c.sync_names) == {"aten._local_scalar_dense", "aten.index", "aten.nonzero"}


# ----------------------------------------------------------------- token layout
def test_tokens_layout_trains_each_job_as_it_trains_alone(base):
    rt = _runtime(base, "train.packing=tokens")
    specs = _specs(rt, n=4)
    packed = train_pack(rt, specs)
    alone = [train_pack(rt, [s])[0] for s in specs]
    for (wp, lp), (wa, la), s in zip(packed, alone, specs):
        assert _max_diff(wp, wa) <= 1e-5
        assert lp == pytest.approx(la, rel=1e-4)
        assert _max_diff(wp, s.init) > 1e-3  # the job did train


def test_tokens_layout_equals_rows_layout(base):
    rows_rt = _runtime(base, "train.packing=rows")
    tokens_rt = _runtime(base, "train.packing=tokens")
    by_rows = train_pack(rows_rt, _specs(rows_rt))
    by_tokens = train_pack(tokens_rt, _specs(tokens_rt))
    for (wr, lr_), (wt, lt) in zip(by_rows, by_tokens):
        assert _max_diff(wr, wt) <= 1e-5 and lr_ == pytest.approx(lt, rel=1e-4)


def test_a_row_packed_with_others_sees_only_itself(base):
    """Block-diagonal attention and positions restarting per row: a row's hidden states in a packed
    sequence equal the row's alone."""
    rt = _runtime(base)
    rows = [rt.encode(r) for r in Experiment(rt.cfg, rt=rt).clients["0"].records[:3]]
    ids = torch.tensor([sum((list(r.ids[:20 + 7 * i]) for i, r in enumerate(rows)), [])])
    lengths = [20 + 7 * i for i in range(3)]
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    with torch.no_grad():
        packed = rt.decoder()(input_ids=ids, attention_mask=_block_mask(seg, False, torch.float32), position_ids=pos,
                              use_cache=False).last_hidden_state[0]
        start = 0
        for i, n in enumerate(lengths):
            alone = rt.decoder()(input_ids=ids[:, start:start + n], use_cache=False).last_hidden_state[0]
            assert torch.allclose(packed[start:start + n], alone, atol=1e-5)
            start += n


def test_token_mix_on_one_slot_equals_the_row_mix_and_frozen_slots_get_no_gradient(base):
    rt = _runtime(base)
    rt.load_slots([_random_adapter(rt, s, 0.2) for s in range(3)])
    ids = torch.randint(0, 100, (2, 9))
    w = torch.zeros(2, 9, 3)
    w[0, :, 0] = rt.bank.scale  # row 0: slot 0; row 1: slot 1 plus half of frozen slot 2
    w[1, :, 1] = rt.bank.scale
    w[1, :, 2] = 0.5 * rt.bank.scale
    rt.bank.set_trainable(True)
    try:
        with rt.bank.mixing(TokenMix(w, torch.tensor([False, False, True]), any_frozen=True)):
            dense = rt.decoder()(input_ids=ids, use_cache=False).last_hidden_state
        dense.pow(2).sum().backward()
        for layer in rt.bank.layers.values():
            assert layer.lora_A.grad[2].abs().sum() == 0 and layer.lora_B.grad[2].abs().sum() == 0
            assert layer.lora_A.grad[:2].abs().sum() > 0
        mix = RowMix(torch.tensor([[0, 0], [1, 2]]), torch.tensor([[1.0, 0.0], [1.0, 0.5]]),
                     torch.tensor([[False, True], [False, True]]))
        with torch.no_grad(), rt.bank.mixing(mix):
            rows = rt.decoder()(input_ids=ids, use_cache=False).last_hidden_state
        assert torch.allclose(dense.detach(), rows, atol=1e-5)
    finally:
        rt.bank.set_trainable(False)


def test_first_fit_decreasing_places_every_row_once_within_the_capacity():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (500,), generator=g).tolist()
    bins = packing.first_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert 1 - sum(lengths) / (512 * len(bins)) < 0.05
    # An over-long row gets a sequence of its own.
    assert packing.first_fit_decreasing([600, 10], 512) == [[0], [1]]


def test_padding_share_of_the_flan_dual_round_is_at_most_a_tenth(base):
    # The tiny model's tokenizer is byte-level: FLAN rows are ~350 tokens, 6 % of them cut at 512.
    rt = _runtime(base, "train.packing=tokens", "data.max_length=512", "data.max_train_per_task=200")
    clients = Experiment(rt.cfg, rt=rt).clients
    lengths = []
    for j, c in enumerate(clients.values()):
        rows = [rt.encode(r) for r in c.records]
        lengths += [len(rows[i].ids) for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(j))[:16]]
    plan = packing.plan_step(lengths, layout_of(rt))
    assert 1 - sum(lengths) / plan.computed_tokens() <= 0.10
    by_rows = packing.plan_step(lengths, packing.Layout(False, 16, None))
    assert plan.computed_tokens() < by_rows.computed_tokens()


# ----------------------------------------------------------------- the planner on a GPU
SMOLLM2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152)
H200_FREE = 139 * 2**30


def test_the_planner_puts_fedrouter_dual_on_an_h200_in_at_most_two_passes_per_step():
    cfg = load_config(ROOT / "configs" / "fedrouter-dual.toml")
    layout = packing.layout_for(cfg.train, "cuda", SMOLLM2, elem_bytes=2, free_bytes=H200_FREE)
    assert layout.tokens and layout.max_tokens >= cfg.data.max_length
    n_clients, rows = cfg.scenario.n_clients, cfg.train.batch
    packs = packing.group_jobs([(cfg.train.steps, 1e-4)] * n_clients, [rows] * n_clients, layout)
    assert packs == [list(range(n_clients))]  # the round's 8 jobs train together
    worst = [cfg.data.max_length] * (n_clients * rows)  # every row at the longest a row can be
    assert len(packing.plan_step(worst, layout).passes) <= 2
    # ... and a GPU with 4 GB free splits the same step into more passes, each within its budget.
    small = packing.layout_for(cfg.train, "cuda", SMOLLM2, elem_bytes=2, free_bytes=4 * 2**30)
    plan = packing.plan_step(worst, small)
    assert len(plan.passes) > 2
    assert all(len(p) * w <= small.max_tokens for p, w in zip(plan.passes, plan.widths))


def test_the_cpu_keeps_one_row_per_sequence_and_sixteen_rows_per_pass_unless_told():
    cfg = load_config(ROOT / "configs" / "fedrouter-dual.toml")
    assert packing.layout_for(cfg.train, "cpu") == packing.Layout(False, 16, None)
    told = load_config(ROOT / "configs" / "fedrouter-dual.toml", ["train.max_rows_per_batch=64", "train.packing=tokens"])
    layout = packing.layout_for(told.train, "cpu")
    assert layout.tokens and layout.max_rows == 64


# ----------------------------------------------------------------- float32 masters
def test_a_bfloat16_run_moves_a_as_the_float32_reference_update_does(base, monkeypatch):
    """At lr 1e-5 an AdamW update to A (|A| ~ 0.1) is below bfloat16's resolution: a bf16 bank would not move
    at all. The bank keeps float32 masters: the step moves A by exactly what AdamW in float32 computes from
    the step's gradients."""
    import taskfed.training as training

    rt = _runtime(base, "model.dtype=bfloat16", dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in rt.bank.parameters())
    spec = _specs(rt, n=1, steps=1, lr=1e-5)[0]
    seen = {}

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            seen["grads"] = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
            seen["before"] = [p.detach().clone() for g in self.param_groups for p in g["params"]]
            return super().step(closure)

    monkeypatch.setattr(training, "make_optimizer", lambda params, lr: Recording(params, lr=lr, weight_decay=0.0))
    (weights, _), = train_pack(rt, [spec])
    reference = [b.clone().requires_grad_(True) for b in seen["before"]]
    for p, g in zip(reference, seen["grads"]):
        p.grad = g
    torch.optim.AdamW(reference, lr=1e-5, weight_decay=0.0).step()
    names = [f"{n}.{part}" for n, _ in rt.bank.layers.items() for part in ("lora_A", "lora_B")]
    for name, ref, before in zip(names, reference, seen["before"]):
        if name.endswith("lora_A"):
            want = (ref - before)[0].detach()
            got = weights[name] - spec.init[name]
            assert want.abs().max() > 5e-6  # the step does move A (about lr per element)
            assert (got - want).norm() <= 1e-3 * want.norm()
            # ... by far less than bf16 can hold at A's magnitude: a bf16 bank would not have moved
            assert (spec.init[name].to(torch.bfloat16) + want.to(torch.bfloat16) == spec.init[name].to(torch.bfloat16)).float().mean() > 0.5


# ----------------------------------------------------------------- bench --estimate
def test_the_estimate_scales_steps_rounds_and_evaluation_rows_from_the_probe():
    from taskfed.bench.estimate import extrapolate, probe_config

    cfg = load_config(ROOT / "configs" / "fedrouter-dual.toml")  # 10 rounds x 10 steps
    probe = probe_config(cfg)
    assert (probe.train.rounds, probe.train.steps, probe.eval.max_rows_per_task) == (2, 3, 4)
    metrics = {"setup_seconds": 7.0,
               "rounds": [{"seconds": 4.0, "compute_seconds": 3.0}, {"seconds": 2.0, "compute_seconds": 1.5}],
               "eval": {"local": {"seconds": 8.0, "per_client": {
                   "0": {"per_task": {"a": {"n": 4}, "b": {"n": 4}}}, "1": {"per_task": {"b": {"n": 4}}}}}}}
    setup, train, evaluation = extrapolate(cfg, metrics, {"a": [0] * 50, "b": [0] * 20})
    assert setup == 7.0
    # per round: overhead (1.0, 0.5) + compute per step (1.0, 0.5) x 10 steps; mean 8.25, x 10 rounds
    assert train == pytest.approx(82.5)
    assert evaluation == pytest.approx(8.0 * (50 + 20 + 20) / 12)


def test_bench_estimate_prints_a_line_per_cell(tmp_path):
    from typer.testing import CliRunner

    from taskfed.cli import app

    suite = tmp_path / "s.toml"
    suite.write_text(f'version = 1\nname = "s"\nbaselines = []\n[base.data]\npath = "{ROOT.parent / "shared" / "data" / "flan-feddpa" / "dataset1"}"\n'
                     '[[scenario]]\nlabel = "iid"\nconfig = {scenario = {name = "iid", n_clients = 2}}\nmethods = [{name = "fedavg"}]\n')
    result = CliRunner().invoke(app, ["bench", str(suite), "--estimate", "--smoke"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| iid |")]
    assert [r.split("|")[2].strip() for r in rows] == ["fedavg", "base"]
    assert "total:" in result.output
