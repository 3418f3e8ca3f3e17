"""Validated run configuration: TOML in, pydantic models, one clear sentence out on a typo or bad value."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from taskfed.errors import TaskfedError

CONFIG_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    source: Literal["feddpa", "json", "hf", "bigbench"] = "feddpa"
    path: str = "../shared/data/flan-feddpa/dataset1"  # feddpa directory
    train_path: str | None = None  # json
    test_path: str | None = None  # json
    hf_name: str | None = None  # hf
    tasks: list[str] = Field(default_factory=list, description="subset of tasks to use; empty: all")
    unseen_tasks: list[str] = Field(default_factory=list, description="held out of training, evaluated only")
    max_train_per_task: int | None = Field(default=None, ge=2)
    template: Literal["alpaca", "plain"] = "alpaca"
    max_length: int = Field(default=256, ge=16)


class ScenarioConfig(_Strict):
    name: Literal["single", "dual", "iid", "dirichlet"] = "dual"
    n_clients: int = Field(default=8, ge=1)
    clients_per_round: int | None = Field(default=None, ge=1, description="sampled per round; default all")
    alpha: float = Field(default=0.5, gt=0)


class ModelConfig(_Strict):
    name: str = "smollm2"  # tiny | smollm2 | a hub id or local folder
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"


class LoraConfig(_Strict):
    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class TrainConfig(_Strict):
    rounds: int = Field(default=10, ge=1)
    steps: int = Field(default=10, ge=1)
    batch: int = Field(default=16, ge=1)
    lr_max: float = Field(default=5e-4, gt=0)
    lr_min: float = Field(default=1e-5, ge=0)
    concurrent: bool = Field(default=True, description="pack several jobs into one batch on the bank")
    # Packing pays on a GPU (fills it); on a CPU a step is compute-bound and activation memory grows with
    # the rows of a forward pass (64 x 256 tokens of SmolLM2 take about 20 GB), so keep it small there.
    max_rows_per_batch: int = Field(default=16, ge=1, description="rows per forward pass when packing")


class EvalConfig(_Strict):
    modes: list[Literal["local", "global", "unseen"]] = Field(default_factory=lambda: ["local", "global"])
    max_rows_per_task: int | None = Field(default=50, ge=1)
    batch_size: int = Field(default=16, ge=1)
    max_new_tokens: int = Field(default=64, ge=1, description="cap on the per-task budget")


class RunConfig(_Strict):
    version: int = CONFIG_VERSION
    seed: int = 0
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "fedavg"})
    data: DataConfig = DataConfig()
    scenario: ScenarioConfig = ScenarioConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.version != CONFIG_VERSION:
            raise ValueError(f"unsupported config version {self.version} (this taskfed reads {CONFIG_VERSION})")
        if "name" not in self.method:
            raise ValueError("method.name is required")
        return self

    @property
    def method_name(self) -> str:
        return str(self.method["name"])


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'."
    return f"{source}: bad value for '{key}': {first['msg']}."


def _parse_value(text: str) -> Any:
    """A --set value is read as a TOML value when it parses (numbers, booleans, lists), else as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise TaskfedError(f"--set {item}: expected key=value.")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TaskfedError(f"--set {item}: '{part}' is not a table.")
        node[parts[-1]] = _parse_value(value.strip())
    return raw


def smoke(cfg: RunConfig) -> RunConfig:
    """The same config on the tiny model with a minimal budget: a check that it runs end to end."""
    raw = cfg.model_dump()
    raw["model"].update(name="tiny", dtype="float32", device="cpu")
    raw["train"].update(rounds=2, steps=2, batch=4)
    raw["data"].update(max_length=min(cfg.data.max_length, 160), max_train_per_task=min(cfg.data.max_train_per_task or 40, 40))
    raw["eval"].update(max_rows_per_task=3, max_new_tokens=8)
    return RunConfig.model_validate(raw)


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file's table; a missing file or malformed TOML is one sentence naming the file."""
    if not path.is_file():
        raise TaskfedError(f"{path}: {what} file does not exist.")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise TaskfedError(f"{path}: malformed TOML ({exc}).") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict[str, Any] = {}
    source = "--set"
    if path is not None:
        path = Path(path)
        source = str(path)
        raw = read_toml(path, "config")
    return validate_config(apply_overrides(raw, overrides or []), source)


def validate_config(raw: dict[str, Any], source: str) -> RunConfig:
    """A run config from a raw dict; errors name `source` (a file, or a file and the place inside it)."""
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise TaskfedError(_describe(exc, source)) from None
    # Method-specific keys are validated by the method's own parameter model.
    from taskfed.methods import method_params

    method_params(cfg.method, source)
    return cfg
