"""The loaded base model, its tokenizer and adapter bank: loaded once per run, shared by every client.

Everything a method or engine needs from the model goes through here: encoding rows with the prompt
template, embeddings, and the slots of the bank.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from taskfed.config import RunConfig
from taskfed.data.prompts import render
from taskfed.data.records import Record
from taskfed.memory import tune_heap
from taskfed.model.bank import AdapterBank, AdapterWeights, RowMix
from taskfed.model.loading import check_fit, load_base

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Encoded:
    """A training row: prompt + response + EOS; the loss covers tokens from `n_prompt` on."""

    ids: tuple[int, ...]
    n_prompt: int


def fingerprint(model, tokenizer) -> str:
    """A cheap identity of the base model as loaded: every tensor's name, shape and dtype and a strided sample
    of its values, and the tokenizer's vocabulary size. A checkpoint records it, so a resume on another (or
    re-converted) model is refused instead of continuing to a result that matches neither run."""
    h = hashlib.sha256(f"{type(model).__name__}|{len(tokenizer)}".encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)].to("cpu", torch.float64)
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


class Runtime:
    def __init__(self, cfg: RunConfig, model=None, tokenizer=None):
        self.cfg = cfg
        tune_heap()  # before the model and the first training step allocate (taskfed/memory.py)
        if model is None:
            model, tokenizer = load_base(cfg.model.name, dtype=DTYPES[cfg.model.dtype], device=cfg.model.device,
                                         seed=cfg.seed)
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.fingerprint = fingerprint(model, tokenizer)  # of the frozen base, before the bank attaches
        check_fit(model, cfg)  # layer names and LoRA memory, before the bank allocates
        self.bank = AdapterBank(model, n_slots=4, r=cfg.lora.r, alpha=cfg.lora.alpha,
                                target_modules=cfg.lora.target_modules)
        self._encoded: dict[tuple[str, str], Encoded] = {}
        # Keyed by (depth, text): depth None is methods.md's embed(x) (all layers), an int the first
        # `depth` decoder layers (FedRouter's `embed_layers`), so two depths never mix.
        self._embedded: dict[tuple[int | None, str], torch.Tensor] = {}

    # ----------------------------------------------------------------- text
    def prompt(self, instruction: str) -> str:
        return render(self.cfg.data.template, instruction)

    def encode(self, record: Record) -> Encoded:
        """Cached per (instruction, output). Over-long rows lose the start of the prompt, never the answer."""
        key = (record.instruction, record.output)
        hit = self._encoded.get(key)
        if hit is not None:
            return hit
        tok = self.tokenizer
        prompt = tok(self.prompt(record.instruction), add_special_tokens=False)["input_ids"]
        answer = tok(record.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        max_len = self.cfg.data.max_length
        answer = answer[: max_len - 8]
        prompt = prompt[max(0, len(prompt) - (max_len - len(answer))):]
        enc = Encoded(tuple(prompt + answer), len(prompt))
        self._encoded[key] = enc
        return enc

    def n_answer_tokens(self, output: str) -> int:
        return len(self.tokenizer(output, add_special_tokens=False)["input_ids"]) + 1

    # ----------------------------------------------------------------- slots
    def ensure_slots(self, n: int) -> None:
        """Grows the bank to `n` slots at least; the slots it had keep their adapters (a server swapping runs
        in serves the old slots' requests while it loads the new ones), new slots are zero (no adapter)."""
        if n <= self.bank.n_slots:
            return
        old = self.bank.n_slots
        self.bank.n_slots = n
        for layer in self.bank.layers.values():
            for key in ("lora_A", "lora_B"):
                grown = getattr(layer, key).new_zeros((n, *getattr(layer, key).shape[1:]))
                grown[:old] = getattr(layer, key).detach()
                setattr(layer, key, torch.nn.Parameter(grown, requires_grad=getattr(layer, key).requires_grad))

    def load_slots(self, adapters: list[AdapterWeights]) -> None:
        self.ensure_slots(len(adapters))
        self.bank.load_many(adapters)

    def init_adapter(self) -> AdapterWeights:
        return self.bank.init_adapter(self.cfg.seed)

    # ----------------------------------------------------------------- features
    def decoder(self):
        return getattr(self.model, self.model.base_model_prefix)

    @property
    def n_layers(self) -> int:
        """The number of decoder layers of the base model."""
        return len(self.decoder().layers)

    @contextmanager
    def first_layers(self, layers: int | None):
        """Within the block the decoder runs only its first `layers` decoder layers (None: all of them).

        The decoder's `layers` ModuleList is swapped for a slice of itself and put back in `finally`, so the
        model is whole again after the block, also after an exception. The rest of the forward is untouched:
        token embeddings, rotary positions, the causal mask, and the final norm after the last layer that
        ran (transformers' Llama-style decoders loop over `self.layers[:num_hidden_layers]`, then apply
        `self.norm`). Not thread-safe: a Runtime is used by one thread at a time (Flower's ClientApps are
        processes with their own model)."""
        if layers is None:
            yield
            return
        decoder = self.decoder()
        full = decoder.layers
        if not 1 <= layers <= len(full):
            raise ValueError(f"layers = {layers}: the decoder has {len(full)} layers (1..{len(full)})")
        decoder.layers = full[:layers]  # a new ModuleList holding the same layer modules
        try:
            yield
        finally:
            decoder.layers = full

    @torch.no_grad()
    def hidden_states(self, texts: list[str], mix: RowMix | None, pool: str, batch_size: int = 32,
                      layers: int | None = None) -> torch.Tensor:
        """Final hidden states of raw texts (no template), pooled by `mean` over non-pad tokens or `last` token.
        Row i of `mix` belongs to text i. Texts are batched by length (less padding), results in input order.
        `layers`: run only the first `layers` decoder layers (then the final norm); None: the whole model."""
        tok = self.tokenizer
        if not texts:
            return torch.zeros(0, self.model.config.hidden_size)
        lengths = [len(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        out = torch.empty(len(texts), self.model.config.hidden_size)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            enc = tok([texts[i] for i in rows], return_tensors="pt", padding=True, truncation=True,
                      max_length=self.cfg.data.max_length, add_special_tokens=False).to(self.device)
            sub = None if mix is None else mix.select(torch.tensor(rows))
            with self.bank.mixing(sub), self.first_layers(layers):
                hidden = self.decoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                        use_cache=False).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if pool == "mean":
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            else:  # left padding: the last position is every row's last real token
                pooled = hidden[:, -1] if tok.padding_side == "left" else hidden[torch.arange(len(rows)), mask.squeeze(-1).sum(1).long() - 1]
            out[torch.tensor(rows)] = pooled.float().cpu()
        return out

    def embed(self, texts: list[str], layers: int | None = None) -> torch.Tensor:
        """methods.md's embed(x): mean of the last hidden layer over non-pad tokens, no adapter active.
        `layers` (FedRouter's `embed_layers`): the mean of the hidden state after the first `layers` decoder
        layers, with the final norm applied, computed by running only those layers; None (default) or the
        model's layer count: the whole model, the same values and cache entries as methods.md's embed(x).
        Cached per (depth, text) for the run: a sample is embedded once per depth, however often it is routed."""
        if layers is not None and layers == self.n_layers:
            layers = None  # all layers: exactly the default forward
        missing = list(dict.fromkeys(t for t in texts if (layers, t) not in self._embedded))
        if missing:
            for text, vec in zip(missing, self.hidden_states(missing, None, "mean", layers=layers)):
                self._embedded[(layers, text)] = vec
        if not texts:
            return torch.zeros(0, self.model.config.hidden_size)
        return torch.stack([self._embedded[(layers, t)] for t in texts])
