"""The adapter bank: per-row mixing, gradient isolation, PEFT import/export."""

import copy

import pytest
import torch

from taskfed.errors import TaskfedError
from taskfed.model.bank import AdapterBank, RowMix
from taskfed.model.loading import load_base
from taskfed.model.peft_io import load_adapter, save_adapter


@pytest.fixture(scope="module")
def base():
    return load_base("tiny", seed=0)


def _random_adapter(bank: AdapterBank, seed: int, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) * scale for k, s in bank.shapes().items()}


def _batch(tok):
    enc = tok(["hello there", "a different row!"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_one_batch_with_two_adapters_equals_each_row_alone(base):
    model, tok = copy.deepcopy(base[0]), base[1]
    bank = AdapterBank(model, 3, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    a, b = _random_adapter(bank, 1), _random_adapter(bank, 2)
    bank.load(0, a)
    bank.load(2, b)
    ids, mask = _batch(tok)
    with torch.no_grad(), bank.mixing(RowMix.one_hot([0, 2])):
        mixed = model(input_ids=ids, attention_mask=mask).logits
    for row, slot in ((0, 0), (1, 2)):
        with torch.no_grad(), bank.mixing(RowMix.one_hot([slot])):
            alone = model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
        assert torch.allclose(mixed[row], alone[0], atol=1e-5)
    with torch.no_grad(), bank.mixing(None):
        bare = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(bare, mixed, atol=1e-3)  # the adapters do change the output


def test_dense_mix_is_the_weighted_sum_of_adapters(base):
    model, tok = copy.deepcopy(base[0]), base[1]
    bank = AdapterBank(model, 2, r=4, alpha=8, target_modules=["q_proj"])
    a, b = _random_adapter(bank, 3), _random_adapter(bank, 4)
    bank.load(0, a)
    bank.load(1, b)
    # With w = (0.3, 0.7) the LoRA delta of one layer is 0.3 * delta_a + 0.7 * delta_b.
    layer = next(iter(bank.layers.values()))
    x = torch.randn(1, 5, layer.base.in_features)
    with torch.no_grad():
        with bank.mixing(RowMix.from_dense(torch.tensor([[0.3, 0.7]]))):
            mixed = layer(x) - layer.base(x)
        with bank.mixing(RowMix.one_hot([0])):
            da = layer(x) - layer.base(x)
        with bank.mixing(RowMix.one_hot([1])):
            db = layer(x) - layer.base(x)
    assert torch.allclose(mixed, 0.3 * da + 0.7 * db, atol=1e-6)


def test_a_rows_gradient_reaches_only_its_adapter(base):
    model, tok = copy.deepcopy(base[0]), base[1]
    bank = AdapterBank(model, 3, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    for s in range(3):
        bank.load(s, _random_adapter(bank, 10 + s))
    bank.set_trainable(True)
    ids, mask = _batch(tok)
    with bank.mixing(RowMix.one_hot([1, 1])):
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    for layer in bank.layers.values():
        assert layer.lora_B.grad[1].abs().sum() > 0
        assert layer.lora_B.grad[0].abs().sum() == 0 and layer.lora_B.grad[2].abs().sum() == 0
        assert layer.lora_A.grad[0].abs().sum() == 0 and layer.lora_A.grad[2].abs().sum() == 0


def test_detached_term_contributes_but_gets_no_gradient(base):
    model, tok = copy.deepcopy(base[0]), base[1]
    bank = AdapterBank(model, 2, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    bank.load(0, _random_adapter(bank, 5))
    bank.load(1, _random_adapter(bank, 6))
    bank.set_trainable(True)
    ids, mask = _batch(tok)
    mix = RowMix(torch.tensor([[0, 1], [0, 1]]), torch.tensor([[0.5, 0.5], [0.5, 0.5]]),
                 torch.tensor([[False, True], [False, True]]))
    with bank.mixing(mix):
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    for layer in bank.layers.values():
        assert layer.lora_A.grad[1].abs().sum() == 0 and layer.lora_B.grad[1].abs().sum() == 0
        assert layer.lora_B.grad[0].abs().sum() > 0


def test_exported_adapter_loads_in_peft_and_gives_the_same_logits(base, tmp_path):
    from peft import PeftModel

    model, tok = copy.deepcopy(base[0]), base[1]
    plain = copy.deepcopy(base[0])
    bank = AdapterBank(model, 2, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    weights = _random_adapter(bank, 7)
    bank.load(1, weights)
    save_adapter(weights, tmp_path / "ad", base_model="tiny", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = PeftModel.from_pretrained(plain, tmp_path / "ad")
    ids, mask = _batch(tok)
    with torch.no_grad():
        with bank.mixing(RowMix.one_hot([1, 1])):
            ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    back = load_adapter(tmp_path / "ad", bank.shapes())
    assert all(torch.equal(back[k], weights[k]) for k in weights)


def test_corrupt_or_mismatched_adapter_is_refused_with_its_path(base, tmp_path):
    model = copy.deepcopy(base[0])
    bank = AdapterBank(model, 1, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    weights = _random_adapter(bank, 8)
    save_adapter(weights, tmp_path / "ok", base_model="tiny", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    path = tmp_path / "ok" / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TaskfedError, match="corrupt adapter file"):
        load_adapter(tmp_path / "ok")
    wrong = dict(weights)
    key = next(iter(wrong))
    wrong[key] = torch.zeros(3, 3)
    save_adapter(wrong, tmp_path / "wrong", base_model="tiny", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(TaskfedError, match="has shape"):
        load_adapter(tmp_path / "wrong", bank.shapes())
    nan = dict(weights)
    nan[key] = torch.full_like(weights[key], float("nan"))
    save_adapter(nan, tmp_path / "nan", base_model="tiny", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(TaskfedError, match="NaN"):
        load_adapter(tmp_path / "nan", bank.shapes())


def test_an_adapter_file_with_integer_tensors_is_refused(tmp_path):
    import pytest
    from safetensors.torch import save_file

    from taskfed.errors import TaskfedError
    from taskfed.model.peft_io import load_adapter

    folder = tmp_path / "a"
    folder.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 3, dtype=torch.int64)},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(TaskfedError, match="expected floating point"):
        load_adapter(folder)
