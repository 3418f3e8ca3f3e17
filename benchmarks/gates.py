"""What a trained gate (GateMix, issue 29) costs against the plain bank, per training step and per generated token.

    python benchmarks/gates.py [--model tiny|smollm2] [--rows 8] [--tokens 96] [--slots 3] [--repeat 5]

On one base model and bank (r 8 on q_proj and v_proj, `--slots` adapters), the same batch of `--rows` rows
x `--tokens` tokens, three mixes:
- row: RowMix, one adapter per row (FedAvg's and FedRouter's training; the plain bank's per-row gather),
- dense: TokenMix, fixed weights over the slots per token (packed training; FedDPA-like mixing),
- gate: GateMix, the weights computed per token and per layer by a gate over the same slots (FedALT: 2
  logits over 2 slots; FedLEASE: 2K-1 logits over K experts, top K; here `--slots` experts, 2K-1 logits, top K),
  one gate per row (training one row per sequence, evaluation, generation): each row gathers its W slots,
- gate/token: the same gate given per token (packed training's form): the dense product over the slots.
Per mix: a training step (forward + backward of the summed logits' squares; the optimizer is the same for
all and left out) and a decode step (one new token per row, no grad, as generation does it after the
prompt). Printed: median milliseconds of `--repeat` runs after one warm-up, and each ratio to `row`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from taskfed.model.bank import AdapterBank, GateMix, RowMix, TokenMix  # noqa: E402
from taskfed.model.loading import load_base  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        times.append((time.perf_counter() - tic) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--slots", type=int, default=3, help="experts K (the gate has 2K-1 logits, top K)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, _ = load_base(args.model)
    k = args.slots
    bank = AdapterBank(model, k, r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    for slot in range(k):
        bank.load(slot, {key: torch.randn(*s) * 0.02 for key, s in bank.shapes().items()})
    bank.add_gates(1, 2 * k - 1)
    bank.load_gate(0, {key: torch.randn(2 * k - 1, bank.layers[key[:-5]].base.in_features) * 0.02
                       for key in bank.gate_keys()})
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.rows, args.tokens))
    one = torch.randint(0, vocab, (args.rows, 1))
    own = 0
    mixes = {
        "row": lambda n_tokens: RowMix.one_hot([r % k for r in range(args.rows)]),
        "dense": lambda n_tokens: TokenMix(torch.full((args.rows, n_tokens, k), bank.scale / k)),
        "gate": lambda n_tokens: GateMix(torch.zeros(args.rows, 1, dtype=torch.long),
                                         torch.tensor(list(range(k)) + [own] * (k - 1)).view(1, 1, -1).expand(args.rows, 1, -1),
                                         n=k, top_k=k),
        # the same gate given per token (packed training's form): the dense product over the k slots
        "gate/token": lambda n_tokens: GateMix(torch.zeros(args.rows, n_tokens, dtype=torch.long),
                                               torch.tensor(list(range(k)) + [own] * (k - 1)).view(1, 1, -1)
                                               .expand(args.rows, n_tokens, -1), n=k, top_k=k),
    }
    bank.set_trainable(True)
    for p in bank.gate_parameters():
        p.requires_grad_(True)

    def train_step(make):
        with bank.mixing(make(args.tokens)):
            model(input_ids=ids).logits.float().square().mean().backward()
        for p in bank.parameters() + bank.gate_parameters():
            p.grad = None

    def decode_step(make):
        with torch.no_grad(), bank.mixing(make(1)):
            model(input_ids=one)

    results = {}
    for name, make in mixes.items():
        results[name] = (median_ms(lambda: train_step(make), args.repeat), median_ms(lambda: decode_step(make), args.repeat))
        print(f"{name:>10}: training step {results[name][0]:8.2f} ms   decode step {results[name][1]:7.2f} ms", flush=True)
    row = results["row"]
    for name in ("dense", "gate", "gate/token"):
        t, d = results[name]
        print(f"{name} / row: training step {t / row[0]:.2f}x, decode step {d / row[1]:.2f}x")
    t, d = results["gate"]
    print(f"gate / dense: training step {t / results['dense'][0]:.2f}x, decode step {d / results['dense'][1]:.2f}x")


if __name__ == "__main__":
    main()
