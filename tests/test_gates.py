"""Gates in the adapter bank (issue 29, step 1): per-token mixing weights computed in each layer by a
trained gate (GateMix), for mixture-of-LoRA methods (FedLEASE's router, FedALT's mixer)."""

import copy

import pytest
import torch

from taskfed.model.bank import AdapterBank, GateMix, RowMix, TokenMix
from taskfed.model.loading import load_base


@pytest.fixture(scope="module")
def base():
    return load_base("tiny", seed=0)


def _bank(base, n_slots=3, n_gates=2, width=3, seed=0):
    model, tok = copy.deepcopy(base[0]), base[1]
    bank = AdapterBank(model, n_slots, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(seed)
    for slot in range(n_slots):
        bank.load(slot, {k: torch.randn(*s, generator=g) * 0.3 for k, s in bank.shapes().items()})
    bank.add_gates(n_gates, width)
    for i in range(n_gates):
        bank.load_gate(i, {k: torch.randn(width, bank.layers[k[:-5]].base.in_features, generator=g)
                           for k in bank.gate_keys()})
    return model, tok, bank


def _ids(tok):
    enc = tok(["hello there", "a different row!"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def per_row(gates, slots):
    """One gate per row: gate (rows x 1), slots (rows x 1 x W)."""
    return torch.tensor(gates).view(-1, 1), torch.tensor(slots).view(len(gates), 1, -1)


def test_a_gate_whose_logits_all_name_one_slot_equals_that_adapter_alone(base):
    """All W logits aliasing slot 1: its weight is exactly 1 whatever the gate says, so the model's output
    is slot 1's alone (the RowMix one-hot path); the same with top-1 of logits naming slots 1, 1, 1."""
    model, tok, bank = _bank(base)
    ids, mask = _ids(tok)
    with torch.no_grad(), bank.mixing(RowMix.one_hot([1, 1])):
        alone = model(input_ids=ids, attention_mask=mask).logits
    for top_k in (None, 1):
        gate, slots = per_row([0, 1], [[1, 1, 1], [1, 1, 1]])
        with torch.no_grad(), bank.mixing(GateMix(gate, slots, n=3, top_k=top_k)):
            gated = model(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(gated, alone, atol=1e-5)
    with torch.no_grad(), bank.mixing(None):
        bare = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(bare, alone, atol=1e-3)


def test_per_token_weights_sum_to_one_and_follow_the_gate(base):
    model, tok, bank = _bank(base)
    layer = next(iter(bank.layers.values()))
    x = torch.randn(2, 7, layer.base.in_features, generator=torch.Generator().manual_seed(2))
    gate, slots = per_row([0, 1], [[0, 1, 2], [2, 0, 1]])
    w = layer.gate_weights(x, GateMix(gate, slots, n=3))
    assert w.shape == (2, 7, 3) and torch.allclose(w.sum(-1), torch.ones(2, 7), atol=1e-6)
    want = torch.softmax(x[1] @ layer.gate[1].T, -1)  # row 1: logits 0, 1, 2 name slots 2, 0, 1
    assert torch.allclose(w[1][:, [2, 0, 1]], want, atol=1e-6)
    # and the layer's delta is TokenMix's with those weights (the one dense product)
    mix = GateMix(gate, slots, n=3)
    with torch.no_grad():
        with bank.mixing(mix):
            gated = layer(x)
        with bank.mixing(TokenMix(w * bank.scale)):
            dense = layer(x)
    assert torch.allclose(gated, dense, atol=1e-6)


def test_top_k_keeps_k_logits_and_always_the_own_expert(base):
    """FedLEASE with K = 3 experts: 2K-1 = 5 logits, slots 0..2 then the own expert (1) twice; keeping the top
    K = 3 of 5 keeps at least one of the own expert's three logits (pigeonhole), renormalised to sum 1."""
    model, tok, bank = _bank(base, n_slots=3, n_gates=1, width=5)
    layer = next(iter(bank.layers.values()))
    x = torch.randn(4, 50, layer.base.in_features, generator=torch.Generator().manual_seed(1))
    gate, slots = per_row([0] * 4, [[0, 1, 2, 1, 1]] * 4)
    w = layer.gate_weights(x, GateMix(gate, slots, n=3, top_k=3))
    assert torch.allclose(w.sum(-1), torch.ones(4, 50), atol=1e-6)
    logits = x @ layer.gate[0].T  # the kept logits are the 3 largest, renormalised
    kept_at = logits.topk(3, -1).indices
    own_kept = (kept_at == 1) | (kept_at == 3) | (kept_at == 4)
    assert bool(own_kept.any(-1).all())  # the own expert in every token (its weight may underflow, its logit is kept)
    active = (w > 0).sum(-1)
    assert int(active.min()) >= 1 and int(active.max()) <= 3 and int(active.max()) > 1
    p = torch.softmax(logits, -1)
    kept = p.topk(3, -1)
    again = torch.zeros_like(p).scatter(-1, kept.indices, kept.values / kept.values.sum(-1, keepdim=True))
    assert torch.allclose(w, torch.stack([again[..., 0], again[..., [1, 3, 4]].sum(-1), again[..., 2]], -1), atol=1e-6)


def test_gradients_reach_the_gate_and_the_trained_slot_not_the_frozen_ones(base):
    model, tok, bank = _bank(base, n_slots=2, n_gates=1, width=2)
    bank.set_trainable(True)
    ids, mask = _ids(tok)
    gate, slots = per_row([0, 0], [[0, 1], [0, 1]])
    frozen = torch.tensor([True, False])  # FedALT: slot 0 the frozen rest-of-world LoRA, slot 1 the own one
    with bank.mixing(GateMix(gate, slots, n=2, frozen=frozen, any_frozen=True)):
        model(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
    for layer in bank.layers.values():
        assert layer.gate.grad is not None and layer.gate.grad.abs().sum() > 0
        assert layer.lora_A.grad[1].abs().sum() > 0 and layer.lora_B.grad[1].abs().sum() > 0
        assert layer.lora_A.grad[0].abs().sum() == 0 and layer.lora_B.grad[0].abs().sum() == 0


def test_packed_tokens_and_rows_equal_each_job_alone(base):
    """Two jobs with their own gates and slots: one sequence holding both (per-token gate and slots, as the
    tokens layout packs them), a batch of both (one row each), and each alone give the same outputs and the
    same gradients on gates and slots (a gated layer acts per token)."""
    model, tok, bank = _bank(base, n_slots=4, n_gates=2, width=2)
    layer = next(iter(bank.layers.values()))
    d = layer.base.in_features
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(1, 5, d, generator=g), torch.randn(1, 5, d, generator=g)
    jobs = [(x1, 0, [0, 1]), (x2, 1, [2, 3])]

    def grads():
        out = [p.grad.clone() for p in (layer.gate, layer.lora_A, layer.lora_B)]
        for p in (layer.gate, layer.lora_A, layer.lora_B):
            p.grad = None
        return out

    bank.set_trainable(True)
    alone = []
    for x, g, s in jobs:
        gate, slots = per_row([g], [s])
        with bank.mixing(GateMix(gate, slots, n=4)):
            y = layer(x)
        y.square().sum().backward()
        alone.append(y.detach())
    want = grads()
    # packed: one sequence of 10 tokens, gate and slots per token
    gate = torch.tensor([[0] * 5 + [1] * 5])
    slots = torch.tensor([[[0, 1]] * 5 + [[2, 3]] * 5])
    with bank.mixing(GateMix(gate, slots, n=4)):
        y = layer(torch.cat([x1, x2], 1))
    y.square().sum().backward()
    assert torch.allclose(y.detach(), torch.cat(alone, 1), atol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(grads(), want))
    # rows: a batch of the two jobs
    gate, slots = per_row([0, 1], [[0, 1], [2, 3]])
    with bank.mixing(GateMix(gate, slots, n=4)):
        y = layer(torch.cat([x1, x2], 0))
    y.square().sum().backward()
    assert torch.allclose(y.detach(), torch.cat(alone, 0), atol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(grads(), want))


def test_gates_load_and_read_back_and_leave_the_other_mixes_alone(base):
    model, tok, bank = _bank(base, n_gates=2, width=3, seed=5)
    ids, mask = _ids(tok)
    g = bank.read_gate(1)
    assert sorted(g) == bank.gate_keys() and all(v.dtype == torch.float32 for v in g.values())
    bank.load_gate(0, g)
    assert all(torch.equal(bank.read_gate(0)[k], g[k]) for k in g)
    plain = copy.deepcopy(base[0])
    other = AdapterBank(plain, 3, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    for slot in range(3):
        other.load(slot, bank.read(slot))
    with torch.no_grad(), bank.mixing(RowMix.one_hot([2, 0])), other.mixing(RowMix.one_hot([2, 0])):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain(input_ids=ids, attention_mask=mask).logits)
    assert len(bank.parameters()) == len(other.parameters())  # gates are not among the adapters' tensors
    assert len(bank.gate_parameters()) == len(bank.layers) and other.gate_parameters() == []


def test_a_gated_training_step_reads_nothing_back_to_the_host(base):
    """No .item(), .tolist(), nonzero or boolean-mask indexing in a gated forward and backward (counted as
    a GPU would see them: taskfed/opcount.py)."""
    from taskfed.opcount import OpCounter

    model, tok, bank = _bank(base, n_slots=3, n_gates=1, width=5)
    bank.set_trainable(True)
    ids, mask = _ids(tok)
    gate, slots = per_row([0, 0], [[0, 1, 2, 1, 1]] * 2)
    mix = GateMix(gate, slots, n=3, top_k=3, frozen=torch.tensor([True, False, True]), any_frozen=True)
    # no padding mask: transformers' check of one reads it back (2 syncs with any mix, RowMix's too); the
    # training step's passes hand the model positions and a block mask instead
    with OpCounter() as count, bank.mixing(mix):
        model(input_ids=ids).logits.square().mean().backward()
    assert count.syncs == 0, count.sync_names


# ----------------------------------------------------------------------------- gated jobs in local training
def _gated_specs(rt, clients, n=2):
    """n FedALT-like specs: own adapter trained, its own frozen adapter (B != 0) as logit 0, a zero gate."""
    from taskfed.methods.base import Correction, Gating
    from taskfed.methods.fedalt import zero_gate
    from taskfed.training import TrainSpec

    g = torch.Generator().manual_seed(4)
    rand = lambda: {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in rt.init_adapter().items()}  # noqa: E731
    specs = []
    for j in range(n):
        init = rand()
        specs.append(TrainSpec(init=init, rows=[rt.encode(r) for r in clients[j].records], steps=2, batch=4, lr=1e-2,
                               seed=j, frozen=[(rand(), 1.0)],
                               correction=Correction(gating=Gating(zero_gate(init, 2), (1, 0)))))
    return specs


@pytest.mark.parametrize("tokens", [False, True])
def test_gated_jobs_packed_train_as_one_by_one_and_return_their_gates(tiny_runtime_factory, tokens):
    """Rows layout (one gate per row, each row's own slots): packed = alone to the bit. Tokens layout (the
    dense per-token product over the pack's slots): equal up to float sums. The trained gate comes back
    under its own keys, moved from zero; the frozen adapter never comes back."""
    from taskfed import packing
    from taskfed.model.parts import split_gate
    from taskfed.run import Experiment
    from taskfed.training import train_pack
    from tests.conftest import tiny_config

    cfg = tiny_config("scenario.name=single")
    rt = tiny_runtime_factory(cfg)
    specs = _gated_specs(rt, list(Experiment(cfg, rt=rt).clients.values()))
    layout = packing.Layout(tokens, 16, None)
    packed = train_pack(rt, specs, layout=layout)
    alone = [train_pack(rt, [s], layout=layout)[0] for s in specs]
    for (wp, lp), (wa, la), s in zip(packed, alone, specs):
        adapter, gate = split_gate(wp)
        assert set(adapter) == set(s.init) and set(gate) == set(s.gating.gate)
        assert any(float(v.abs().max()) > 0 for v in gate.values())
        if tokens:
            assert all(torch.allclose(wp[k], wa[k], atol=1e-5) for k in wp) and abs(lp - la) < 1e-5
        else:
            assert all(torch.equal(wp[k], wa[k]) for k in wp) and lp == la


def test_a_gated_row_mix_is_the_gate_mix_it_stands_for_and_selects_its_gates(base):
    """Evaluation and serving hold gated rows as a RowMix (rows are selected and joined there)."""
    model, tok, bank = _bank(base, n_slots=3, n_gates=2, width=2)
    ids, mask = _ids(tok)
    rows = RowMix(torch.tensor([[2, 0], [1, 2]]), torch.full((2, 2), 0.5), gate=torch.tensor([1, 0]), n=3)
    gate, slots = per_row([1, 0], [[2, 0], [1, 2]])
    with torch.no_grad():
        with bank.mixing(rows):
            a = model(input_ids=ids, attention_mask=mask).logits
        with bank.mixing(GateMix(gate, slots, n=3)):
            b = model(input_ids=ids, attention_mask=mask).logits
        with bank.mixing(rows.select(torch.tensor([1]))):
            c = model(input_ids=ids[1:], attention_mask=mask[1:]).logits
    assert torch.equal(a, b) and torch.allclose(c, a[1:], atol=1e-5)
