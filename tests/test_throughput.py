"""Throughput work (issue 7), checked for exactness on the tiny model: packed training equals jobs one by
one, per-adapter optimizer state, per-row gradient isolation, the chunked response-only loss, and fast
generation giving the tokens of plain greedy `generate`."""

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import taskfed.training as training
from taskfed.evaluation import generate as gen
from taskfed.model.bank import RowMix
from taskfed.model.loading import load_base
from taskfed.run import Experiment
from taskfed.runtime import Runtime
from taskfed.training import IGNORE, TrainSpec, collate, row_losses, token_losses, train_pack
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def base():
    return load_base("tiny", seed=0)


def _runtime(base, *overrides, dtype=torch.float32):
    cfg = tiny_config("scenario.name=single", *overrides)
    model = copy.deepcopy(base[0]).to(dtype)
    return Runtime(cfg, model=model, tokenizer=copy.deepcopy(base[1]))


def _random_adapter(rt, seed, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) * scale for k, s in rt.bank.shapes().items()}


def _specs(rt, with_frozen=True):
    """Three jobs of different clients, batch sizes and extras: one with a frozen detached adapter in its
    mix (FedDPA-T), one with a proximal term (FedProx), shared frozen weights across two jobs."""
    exp = Experiment(rt.cfg, rt=rt)
    clients = list(exp.clients.values())
    frozen = _random_adapter(rt, 99)
    specs = []
    for j in range(3):
        rows = [rt.encode(r) for r in clients[j].records]
        init = _random_adapter(rt, 10 + j, scale=0.05)
        spec = TrainSpec(init=init, rows=rows, steps=3, batch=2 + j, lr=1e-2, seed=100 + j)
        if with_frozen and j != 1:
            spec.frozen = [(frozen, 0.5)]
        if j == 1:
            spec.prox_mu, spec.prox_ref = 5.0, init
        specs.append(spec)
    return specs


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ----------------------------------------------------------------- concurrent training
# Measured: packed and alone agree bit for bit in both dtypes here; the tolerances leave room for kernels
# that pick another blocking at another batch size, and stay well under what three steps move (~3e-2).
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-3)])
def test_packed_jobs_with_frozen_and_prox_terms_equal_jobs_one_by_one(base, dtype, atol):
    name = "float32" if dtype == torch.float32 else "bfloat16"
    rt = _runtime(base, f"model.dtype={name}", dtype=dtype)
    specs = _specs(rt)
    packed = train_pack(rt, specs)
    alone = [train_pack(rt, [s])[0] for s in specs]
    for (wp, lp), (wa, la), s in zip(packed, alone, specs):
        assert _max_diff(wp, wa) <= atol
        assert lp == pytest.approx(la, rel=1e-4 if dtype == torch.float32 else 2e-2)
        assert _max_diff(wp, s.init) > 10 * atol  # the job did train


class _Recording(torch.optim.AdamW):
    """AdamW that keeps a copy of the gradients it saw at its first step."""

    def step(self, closure=None):
        if not hasattr(self, "first_grads"):
            self.first_grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


@pytest.fixture
def recorded(monkeypatch):
    made = []

    def make(params, lr):
        opt = _Recording(params, lr=lr, weight_decay=0.0)
        made.append(opt)
        return opt

    monkeypatch.setattr(training, "make_optimizer", make)
    return made


def test_each_adapter_has_its_own_optimizer_state_and_gradient(base, recorded):
    rt = _runtime(base)
    specs = _specs(rt)
    train_pack(rt, specs)
    packed = recorded.pop()
    params = [p for g in packed.param_groups for p in g["params"]]
    n = len(specs)  # slots 0..n-1 trained, slot n the shared frozen adapter, the rest scratch
    for j, spec in enumerate(specs):
        train_pack(rt, [spec])
        alone = recorded.pop()
        alone_params = [p for g in alone.param_groups for p in g["params"]]
        for p, q, g0, h0 in zip(params, alone_params, packed.first_grads, alone.first_grads):
            # The packed slot's first gradient is exactly its job's gradient, and its Adam moments after
            # three steps are those of the job trained alone: nothing leaks between slots.
            assert torch.allclose(g0[j], h0[0], atol=1e-6)
            assert g0[j].abs().sum() > 0
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.allclose(packed.state[p][key][j], alone.state[q][key][0], atol=1e-6, rtol=1e-4)
    for p, g0 in zip(params, packed.first_grads):
        assert g0[n:].abs().sum() == 0  # the frozen (detached) adapter and scratch slots get no gradient
        assert packed.state[p]["exp_avg"][n:].abs().sum() == 0
        assert packed.state[p]["exp_avg_sq"][n:].abs().sum() == 0


def test_one_rows_loss_reaches_only_its_own_slot(base):
    rt = _runtime(base)
    for s in range(3):
        rt.bank.load(s, _random_adapter(rt, s))
    exp = Experiment(rt.cfg, rt=rt)
    rows = [rt.encode(r) for r in exp.clients["0"].records[:3]]
    ids, mask, labels = collate(rows, rt.tokenizer.pad_token_id, rt.device)
    rt.bank.set_trainable(True)
    try:
        for row in range(3):
            for p in rt.bank.parameters():
                p.grad = None
            with rt.bank.mixing(RowMix.one_hot([0, 1, 2])):
                sums, _ = row_losses(rt, ids, mask, labels)
            sums[row].backward()
            for layer in rt.bank.layers.values():
                for t in (layer.lora_A, layer.lora_B):
                    assert t.grad[row].abs().sum() > 0
                    others = [s for s in range(t.shape[0]) if s != row]
                    assert t.grad[others].abs().sum() == 0
    finally:
        rt.bank.set_trainable(False)


# ----------------------------------------------------------------- loss without full logits
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_chunked_token_losses_equal_plain_cross_entropy(dtype, tol):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True).to(dtype).requires_grad_(False)
    hidden = torch.randn(23, 16, dtype=dtype, requires_grad=True)
    target = torch.randint(0, 50, (23,))
    upstream = torch.rand(23)
    plain = F.cross_entropy(head(hidden).float(), target, reduction="none")
    (plain * upstream).sum().backward()
    want = hidden.grad.clone()
    hidden.grad = None
    ours = token_losses(hidden, head, target, chunk_elems=200)  # chunks of 4 positions, the last one short
    (ours * upstream).sum().backward()
    assert torch.allclose(ours, plain, atol=tol, rtol=tol)
    assert torch.allclose(hidden.grad.float(), want.float(), atol=tol, rtol=tol)


def test_row_losses_equal_full_logits_loss_and_gradients(base):
    rt = _runtime(base)
    for s in range(2):
        rt.bank.load(s, _random_adapter(rt, s))
    exp = Experiment(rt.cfg, rt=rt)
    rows = [rt.encode(r) for r in exp.clients["0"].records[:4]]
    ids, mask, labels = collate(rows, rt.tokenizer.pad_token_id, rt.device)
    mix = RowMix.one_hot([0, 1, 0, 1])

    def grads():
        out = [p.grad.clone() for p in rt.bank.parameters()]
        for p in rt.bank.parameters():
            p.grad = None
        return out

    rt.bank.set_trainable(True)
    try:
        with rt.bank.mixing(mix):
            logits = rt.model(input_ids=ids, attention_mask=mask).logits.float()  # every position, fp32
        full = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none")
        full_sums = full.sum(1)
        full_sums.sum().backward()
        want = grads()
        with rt.bank.mixing(mix):
            sums, counts = row_losses(rt, ids, mask, labels)
        sums.sum().backward()
        got = grads()
    finally:
        rt.bank.set_trainable(False)
    assert torch.allclose(sums, full_sums, rtol=1e-5)
    assert counts.tolist() == (labels[:, 1:] != IGNORE).sum(1).tolist()
    # fp32 sums in another order: equal to ~1e-6 of each gradient's scale (measured), checked at 1e-5.
    assert all(float((g - w).abs().max()) <= 1e-5 * float(w.abs().max()) for g, w in zip(got, want))


def test_training_graph_keeps_no_vocabulary_wide_tensor(base):
    rt = _runtime(base)
    exp = Experiment(rt.cfg, rt=rt)
    rows = [rt.encode(r) for r in exp.clients["0"].records[:4]]
    ids, mask, labels = collate(rows, rt.tokenizer.pad_token_id, rt.device)
    vocab = rt.model.get_output_embeddings().weight.shape[0]
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    rt.bank.set_trainable(True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), rt.bank.mixing(RowMix.one_hot([0] * 4)):
            row_losses(rt, ids, mask, labels)
    finally:
        rt.bank.set_trainable(False)
    assert shapes  # the hook did see the graph
    assert not [s for s in shapes if s and s[-1] == vocab]  # no logits (N x vocab) kept for backward


# ----------------------------------------------------------------- fast generation
def _eos_often(rt, prompts, mix):
    """Makes a token that the random model emits at varied steps the EOS, so that rows end at different
    times and the decoder's row dropping is exercised."""
    out = gen.plain_generate(rt, prompts, mix, 12)
    firsts = Counter(t for row in out for t in set(row[2:8]) if row.index(t) >= 2)
    eos = firsts.most_common(1)[0][0]
    rt.tokenizer.eos_token = rt.tokenizer.convert_ids_to_tokens(eos)
    assert rt.tokenizer.eos_token_id == eos


@pytest.fixture
def routed(base):
    rt = _runtime(base)
    rt.load_slots([_random_adapter(rt, s, scale=0.4) for s in range(3)])
    words = ["apple", "river", "a much longer prompt about stones and rivers", "x", "tiger piano",
             "lemon chair ocean maple", "the cat sat on the mat and then some more words", "ok?", "cloud",
             "one two three four five six seven eight nine ten eleven twelve"]
    prompts = [list(rt.tokenizer(f"Say something about {w}:", add_special_tokens=False)["input_ids"]) for w in words]
    # Mixed per row: routed one-hot rows and FedDPA-style two-adapter rows in the same batch.
    dense = torch.zeros(len(prompts), 3)
    for i in range(len(prompts)):
        dense[i, i % 3] = 1.0 if i % 2 else 0.6
        if not i % 2:
            dense[i, (i + 1) % 3] = 0.4
    mix = RowMix.from_dense(dense)
    _eos_often(rt, prompts, mix)
    return rt, prompts, mix


def test_fast_generation_gives_the_tokens_of_plain_generate(routed, monkeypatch):
    rt, prompts, mix = routed
    plain = gen.plain_generate(rt, prompts, mix, 12)
    lengths = [len(r) for r in plain]
    assert min(lengths) < 12 and max(lengths) == 12  # rows do end at different steps
    widths = []
    forward = rt.model.forward
    monkeypatch.setattr(rt.model, "forward", lambda *a, **kw: (widths.append(kw["input_ids"].shape[0]), forward(*a, **kw))[1])
    fast = gen.fast_generate(rt, prompts, mix, 12)
    assert fast == plain
    assert min(widths) < max(widths)  # finished rows did leave the batch
    texts, n_new = gen.generate(rt, prompts, mix, 12)
    assert n_new == sum(lengths)
    assert texts == [t.strip() for t in rt.tokenizer.batch_decode(plain, skip_special_tokens=True)]


def test_static_cache_generation_gives_the_tokens_of_plain_generate(routed):
    # The CUDA decoder (static cache, padded to a width bucket) run on the CPU, where nothing compiles.
    rt, prompts, mix = routed
    assert gen.static_generate(rt, prompts, mix, 12) == gen.plain_generate(rt, prompts, mix, 12)


def test_batch_buckets_are_powers_of_two_up_to_the_batch_size():
    assert [gen.batch_bucket(n, 16) for n in range(1, 18)] == [1, 2, 4, 4] + [8] * 4 + [16] * 8 + [17]
    assert [gen.batch_bucket(n, 12) for n in (5, 8, 9, 12, 13)] == [8, 8, 12, 12, 13]  # a cap off the powers


def test_static_cache_generation_pads_the_batch_to_a_bucket(routed, monkeypatch):
    # Batches of 1..9 rows call `generate` at powers of two only (3 rows at 4, 5 at 8: the pad rows' outputs
    # dropped), at widths of the width step, and the real rows get plain generate's tokens.
    rt, prompts, mix = routed
    assert rt.cfg.eval.batch_size == 16
    shapes = []
    generate = rt.model.generate

    def recording(*a, **kw):
        if kw["generation_config"].cache_implementation == "static":
            shapes.append(tuple(kw["input_ids"].shape))
        return generate(*a, **kw)

    monkeypatch.setattr(rt.model, "generate", recording)
    for n in range(1, 10):
        some, some_mix = prompts[:n], mix.select(torch.arange(n))
        assert gen.static_generate(rt, some, some_mix, 8) == gen.plain_generate(rt, some, some_mix, 8)
    assert [b for b, _ in shapes] == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert all(w % gen.CUDA_WIDTH_STEP == 0 for _, w in shapes)


def test_generation_is_independent_of_the_bucketing(routed, monkeypatch):
    rt, prompts, mix = routed
    whole = gen.fast_generate(rt, prompts, mix, 10)
    monkeypatch.setattr(gen, "MIN_BUCKET", 1)
    monkeypatch.setattr(gen, "MAX_PAD_SHARE", 0.0)
    assert gen.fast_generate(rt, prompts, mix, 10) == whole


def test_length_buckets_cover_every_row_once_with_bounded_padding():
    lengths = [5, 50, 6, 48, 7, 49, 5, 51, 6, 47, 8, 52, 100, 5, 6, 7, 8, 9, 50, 51]
    buckets = gen.length_buckets(lengths, min_rows=4, max_pad=0.25)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert len(buckets) >= 2
    for b in buckets[:-1]:
        assert len(b) >= 4
    for b in buckets:
        ls = [lengths[i] for i in b]
        assert ls == sorted(ls)
        # Padding bound holds for every bucket but possibly a short last one kept whole.
        if len(b) > 4:
            assert 1 - sum(ls) / (max(ls) * len(ls)) <= 0.25 or b is buckets[-1]
    assert gen.length_buckets([3, 3, 3], min_rows=8) == [[0, 1, 2]]


def test_rows_joining_a_running_decode_get_the_tokens_they_get_alone(routed):
    # Continuous batching (taskfed serve): rows admitted while others decode, on other adapters and mixes of
    # another width (one-hot rows join two-term rows), leave when done; each row's tokens are plain generate's.
    rt, prompts, mix = routed
    assert len(prompts) == 10
    alone = gen.plain_generate(rt, prompts, mix, 10)
    eos = rt.tokenizer.eos_token_id
    dec = gen.Decoder(rt)
    waves = [[0, 2], [1, 3, 4, 5], [], [6, 7], [8], [9]]  # rows admitted at step s
    out: dict[int, list[int]] = {}
    live: list[int] = []
    widths = []
    for s in range(40):
        tokens = dec.step() if live else []
        new = waves[s] if s < len(waves) else []
        if new:
            one_hot = RowMix(mix.idx[new][:, :1], torch.ones(len(new), 1)) if s == 1 else mix.select(torch.tensor(new))
            if s == 1:  # these rows decode on their first adapter alone: compare with that
                for i, t in zip(new, gen.plain_generate(rt, [prompts[i] for i in new], one_hot, 10)):
                    alone[i] = t
            tokens = tokens + dec.admit([prompts[i] for i in new], one_hot)
            live = live + new
        for row, t in zip(live, tokens):
            out.setdefault(row, []).append(t)
        keep = [j for j, row in enumerate(live) if out[row][-1] != eos and len(out[row]) < 10]
        dec.keep(keep)
        live = [live[j] for j in keep]
        widths.append(0 if dec.mask is None else dec.mask.shape[1])
        if not live and s >= len(waves):
            break
    assert out == {i: alone[i] for i in range(len(prompts))}
    assert len(dec) == 0 and max(widths) <= max(len(p) for p in prompts) + 10  # the width stays bounded
