"""Validated run configuration: TOML in, pydantic models, one clear sentence out on a typo or bad value.

Validation imports neither torch nor a method's code (`taskfed.methods.check_params` reads the methods'
parameter models from their source), so a config mistake is reported in well under 2 s
(`benchmarks/startup.py`). What is checked: types strictly (`rounds = true` or `rounds = "2"` is refused,
an int is accepted where a float is meant), every number finite and in range, cross-field contradictions,
and a budget cap (`MAX_TRAIN_ROWS`); model-dependent sizes (LoRA memory, layer and device names) are checked
once the model's dimensions are known, before training (`taskfed.model.loading.check_fit`).
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator, StrictBool

from taskfed.errors import TaskfedError

CONFIG_VERSION = 1
# rounds x clients per round x steps x batch: 1e9 rows is ~1e5 times the demo and far beyond any budget
# this harness is meant for; a larger product is a typo (an extra digit or three) caught before it costs days.
MAX_TRAIN_ROWS = 10**9
MAX_DEPTH = 16  # tables and lists inside each other; a config needs 3
CENTROID_METHODS = ("fedrouter", "fedrouter-oracle", "fltac")  # the methods that upload data centroids


class _Strict(BaseModel):
    # strict: no coercion of true/"2" into ints; allow_inf_nan=False: a float field refuses inf and nan.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


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
    max_length: int = Field(default=256, ge=16, le=32768)


class ScenarioConfig(_Strict):
    name: Literal["single", "dual", "iid", "dirichlet"] = "dual"
    n_clients: int = Field(default=8, ge=1, le=100_000)
    clients_per_round: int | None = Field(default=None, ge=1, description="sampled per round; default all")
    alpha: float = Field(default=0.5, gt=0, le=1e6)


class ModelConfig(_Strict):
    name: str = "smollm2"  # tiny | smollm2 | a hub id or local folder
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Which of these exist is checked against the machine when the model loads (loading.check_device).
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|mps|cuda(:[0-9]+)?", v):
            raise ValueError(f"unknown device '{v}' (expected cpu, cuda, cuda:N or mps)")
        return v


class LoraConfig(_Strict):
    r: int = Field(default=8, ge=1)  # its memory is checked against the model's dimensions (loading.check_fit)
    alpha: float = Field(default=16, gt=0, le=1e6)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class TrainConfig(_Strict):
    rounds: int = Field(default=10, ge=1, le=100_000)
    steps: int = Field(default=10, ge=1, le=1_000_000)
    batch: int = Field(default=16, ge=1, le=65_536)
    lr_max: float = Field(default=5e-4, gt=0, le=10)
    lr_min: float = Field(default=1e-5, ge=0, le=10)
    concurrent: bool = Field(default=True, description="pack several jobs into one batch on the bank")
    # How rows become forward passes (taskfed/packing.py). "auto": on CUDA every job of a round packed into
    # sequences of several rows and as few passes as the free memory allows (the host's dispatching, not
    # arithmetic, bounds a GPU step); elsewhere one row per sequence, 16 rows per pass (a CPU step is
    # compute-bound and activation memory grows with the rows: 64 x 256 tokens of SmolLM2 take about 20 GB).
    packing: Literal["auto", "rows", "tokens"] = Field(default="auto", description="rows per sequence: one or several")
    max_rows_per_batch: int | None = Field(default=None, ge=1, le=65_536,
                                           description="rows per forward pass (default: 16 in the rows layout, "
                                                       "the memory budget in the tokens layout)")
    max_tokens_per_pass: int | None = Field(default=None, ge=1, le=1 << 24,
                                            description="tokens per forward pass (default: from free memory)")
    # A round in which fewer clients' uploads arrive (nodes died or timed out) never counts: it is retried
    # from the last checkpoint `round_retries` times, then the run stops with the checkpoint kept.
    min_replies: int = Field(default=1, ge=1, le=1_000_000, description="clients whose uploads a round needs")
    round_retries: int = Field(default=1, ge=0, le=100, description="retries of a round short of min_replies")


class EvalConfig(_Strict):
    modes: list[Literal["local", "global", "unseen"]] = Field(default_factory=lambda: ["local", "global"], min_length=1)
    max_rows_per_task: int | None = Field(default=50, ge=1)
    batch_size: int = Field(default=16, ge=1, le=65_536)
    max_new_tokens: int = Field(default=64, ge=1, le=32768, description="cap on the per-task budget")


class MechanismConfig(_Strict):
    """A DP mechanism (taskfed/privacy.py): a clip bound and either a target epsilon or a noise multiplier."""

    clip: float | None = Field(default=None, gt=0, le=1e9, description="L2 bound of one contribution (required)")
    epsilon: float | None = Field(default=None, gt=0, le=1e6, description="target: taskfed finds the noise")
    noise_multiplier: float | None = Field(default=None, gt=0, le=1e6, description="given: taskfed reports epsilon")
    delta: float = Field(default=1e-5, gt=0, lt=1)


class CentroidPrivacy(MechanismConfig):
    min_count: float | None = Field(default=None, ge=0, le=1e12, description="a noisy count below it is an empty "
                                    "cluster; default 2 x the count's noise std, at least 1")


class PrivacyConfig(_Strict):
    centroids: CentroidPrivacy | None = None  # off unless given
    updates: MechanismConfig | None = None


class LogConfig(_Strict):
    """Experiment tracking (tracking.py), off by default: the run's figures as TensorBoard event files and/or
    in an MLflow store, under the run folder unless `mlflow_uri` names another store or a tracking server."""

    tensorboard: StrictBool = False
    mlflow: StrictBool = False
    mlflow_uri: str | None = None  # default: sqlite:///RUN_DIR/mlflow.db

    @model_validator(mode="after")
    def _uri_needs_mlflow(self) -> "LogConfig":
        if self.mlflow_uri is not None and not self.mlflow:
            raise ValueError("log.mlflow_uri is set but log.mlflow is false: set log.mlflow = true to use it")
        return self


class RunConfig(_Strict):
    version: int = CONFIG_VERSION
    seed: int = Field(default=0, ge=0, lt=2**63)  # numpy's seeding range
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "fedavg"})
    data: DataConfig = DataConfig()
    scenario: ScenarioConfig = ScenarioConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    log: LogConfig = LogConfig()  # tracking only: not part of what a resume compares

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.version != CONFIG_VERSION:
            raise ValueError(f"unsupported config version {self.version} (this taskfed reads {CONFIG_VERSION})")
        if "name" not in self.method:
            raise ValueError("method.name is required")
        t, s = self.train, self.scenario
        if t.lr_min > t.lr_max:
            raise ValueError(f"train.lr_min = {t.lr_min} is above train.lr_max = {t.lr_max} (the cosine schedule "
                             f"runs from lr_max down to lr_min)")
        if len(set(self.eval.modes)) != len(self.eval.modes):
            raise ValueError(f"eval.modes lists a mode twice: {self.eval.modes}")
        if "unseen" in self.eval.modes and not self.data.unseen_tasks:  # it would evaluate nothing
            raise ValueError("eval.modes includes 'unseen' but data.unseen_tasks is empty: name the tasks to hold "
                             "out of training, or drop the mode")
        if s.clients_per_round is not None and s.clients_per_round > s.n_clients:
            raise ValueError(f"scenario.clients_per_round = {s.clients_per_round} is above scenario.n_clients = "
                             f"{s.n_clients}")
        rows = t.rounds * (s.clients_per_round or s.n_clients) * t.steps * t.batch
        if rows > MAX_TRAIN_ROWS:
            raise ValueError(f"the budget trains {rows:.3g} rows (train.rounds x clients per round x train.steps x "
                             f"train.batch), above the cap of {MAX_TRAIN_ROWS:.0e}: check for a typo")
        self._check_privacy()
        return self

    def _check_privacy(self) -> None:
        name = self.method_name
        for key in ("centroids", "updates"):
            p = getattr(self.privacy, key)
            if p is None:
                continue
            if name == "local":
                raise ValueError(f"privacy.{key}: method 'local' shares nothing, so there is nothing to protect")
            if p.clip is None:
                raise ValueError(f"privacy.{key}.clip is required (the L2 bound the noise is calibrated to)")
            if (p.epsilon is None) == (p.noise_multiplier is None):
                raise ValueError(f"privacy.{key}: give exactly one of privacy.{key}.epsilon (taskfed finds the noise) "
                                 f"and privacy.{key}.noise_multiplier (taskfed reports the epsilon)")
        if self.privacy.updates is not None and name == "scaffold":
            raise ValueError("privacy.updates: method 'scaffold' also uploads its control-variate changes dc_i, "
                             "which are neither clipped nor noised")
        if self.privacy.updates is not None and name == "fedalt":
            raise ValueError("privacy.updates: method 'fedalt' sends each client the exact mean of the others' "
                             "uploads (its rest-of-world LoRA), which is not noised")
        if self.privacy.updates is not None and name == "fedlease":
            raise ValueError("privacy.updates: method 'fedlease' also uploads each client's router and, for the "
                             "clustering, its warm-up LoRA, which are neither clipped nor noised")
        if self.privacy.centroids is not None:
            if name not in CENTROID_METHODS:
                raise ValueError(f"privacy.centroids: method '{name}' shares no centroids (only "
                                 f"{', '.join(CENTROID_METHODS)} do)")
            if self.method.get("router") == "oracle":
                raise ValueError("privacy.centroids: method.router = 'oracle' uploads exact task counts per cluster")

    @property
    def method_name(self) -> str:
        return str(self.method["name"])


def describe_error(err: ValidationError, source: str, sources: dict[str, str] | None = None) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    source = blame(key, source, sources)
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'."
    msg = first["msg"].removeprefix("Value error, ")
    if key == "config":  # a model-level check: its message names the keys itself (and so the --set items)
        named = [item for set_key, item in (sources or {}).items() if set_key in msg]
        return f"{'--set ' + ', --set '.join(named) if named else source}: {msg}."
    if first["type"] in ("int_type", "float_type", "string_type", "bool_type", "list_type", "model_type", "dict_type"):
        msg += f", got {_kind(first.get('input'))}"
    return f"{source}: bad value for '{key}': {msg}."


def _kind(value: Any) -> str:
    """A short description of a wrong value: its type and, when short, the value."""
    text = repr(value)
    return f"{type(value).__name__} {text}" if len(text) <= 40 else type(value).__name__


def blame(key: str, source: str, sources: dict[str, str] | None) -> str:
    """The --set item that set `key` (or a table above it) when one did, else `source` (the file)."""
    for set_key, item in (sources or {}).items():
        if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
            return f"--set {item}"
    return source


def check_values(raw: Any, source: str, sources: dict[str, str] | None = None, prefix: str = "") -> None:
    """Every number finite and the nesting shallow, in any table (the method's too), with the key named.

    Iterative, so a structure nested thousands deep is refused instead of overflowing the stack."""
    stack: list[tuple[str, Any, int]] = [(prefix, raw, 0)]
    while stack:
        key, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            shown = key if len(key) < 60 else key[:key.index("[")] + "[0]..." if "[" in key else key[:60] + "..."
            raise TaskfedError(f"{blame(key, source, sources)}: '{shown}' is nested more than {MAX_DEPTH} levels deep.")
        if isinstance(value, float) and not math.isfinite(value):
            raise TaskfedError(f"{blame(key, source, sources)}: bad value for '{key}': {value} is not a finite number.")
        if isinstance(value, dict):
            stack += [(f"{key}.{k}" if key else str(k), v, depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(f"{key}[{i}]", v, depth + 1) for i, v in enumerate(value)]


def _parse_value(text: str) -> Any:
    """A --set value is read as a TOML value when it parses (numbers, booleans, lists), else as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str], sources: dict[str, str] | None = None) -> dict[str, Any]:
    """`key=value` items into `raw`; `sources` (when given) records which item set which key, for errors."""
    for item in overrides:
        if "=" not in item:
            raise TaskfedError(f"--set {item}: expected key=value.")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts):
            raise TaskfedError(f"--set {item}: expected key=value with a dotted key such as train.rounds=3.")
        node = raw
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TaskfedError(f"--set {item}: '{'.'.join(parts[:i + 1])}' is not a table.")
        node[parts[-1]] = _parse_value(value.strip())
        if sources is not None:
            sources[".".join(parts)] = item
    return raw


# The keys `smoke` replaces (a `--set` of one of them is overridden, and the CLI says so).
SMOKE_KEYS = ("model.name", "model.dtype", "model.device", "train.rounds", "train.steps", "train.batch",
              "data.max_length", "data.max_train_per_task", "eval.max_rows_per_task", "eval.max_new_tokens")


def smoke_overridden(sets: list[str]) -> list[str]:
    """The `--set` items whose key `smoke` replaces."""
    return [item for item in sets if item.partition("=")[0].strip() in SMOKE_KEYS]


def smoke(cfg: RunConfig) -> RunConfig:
    """The same config on the tiny model with a minimal budget: a check that it runs end to end."""
    raw = cfg.model_dump()
    raw["model"].update(name="tiny", dtype="float32", device="cpu")
    raw["train"].update(rounds=2, steps=2, batch=4)
    raw["data"].update(max_length=min(cfg.data.max_length, 160), max_train_per_task=min(cfg.data.max_train_per_task or 40, 40))
    raw["eval"].update(max_rows_per_task=3, max_new_tokens=8)
    # A method parameter naming a round past the smoke's last one is brought within it (smoke_fitted says so).
    from taskfed.methods import check_params

    asked = check_params(cfg.method, "--smoke").model_dump()
    fitted = check_params(cfg.method, "--smoke", raw["train"]["rounds"], fit=True).model_dump()
    raw["method"].update({k: v for k, v in fitted.items() if asked[k] != v})
    return RunConfig.model_validate(raw)


def smoke_fitted(before: RunConfig, after: RunConfig) -> list[str]:
    """The method keys `smoke` brought within its budget, as `method.KEY = VALUE`."""
    return [f"method.{k} = {v}" for k, v in sorted(after.method.items()) if before.method.get(k) != v]


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file's table; a missing file, bytes that are not UTF-8, malformed or absurdly nested TOML is
    one sentence naming the file."""
    path = Path(path)
    if path.is_dir():
        raise TaskfedError(f"{path}: {what} file is a directory.")
    if not path.is_file():
        raise TaskfedError(f"{path}: {what} file does not exist.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskfedError(f"{path}: {what} file is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                           f"offset {exc.start}).") from None
    except OSError as exc:
        raise TaskfedError(f"{path}: cannot read the {what} file ({exc.strerror}).") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TaskfedError(f"{path}: malformed TOML ({exc}).") from None
    except RecursionError:
        raise TaskfedError(f"{path}: malformed TOML (nested too deep).") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """A validated config from a file (or None: the defaults) and --set items. An empty file is refused: it
    would run every default (FedAvg on SmolLM2, 10 rounds), which a user who meant anything else would
    only notice after the run; `version = 1` alone says "the defaults" on purpose."""
    raw: dict[str, Any] = {}
    source = "--set"
    if path is not None:
        path = Path(path)
        source = str(path)
        raw = read_toml(path, "config")
        if not raw:
            raise TaskfedError(f"{path}: the config file is empty (write `version = 1` to run every default).")
    sources: dict[str, str] = {}
    return validate_config(apply_overrides(raw, overrides or [], sources), source, sources)


def validate_config(raw: dict[str, Any], source: str, sources: dict[str, str] | None = None) -> RunConfig:
    """A run config from a raw dict; errors name `source` (a file, or a file and the place inside it), or
    the --set item (`sources`: key -> item) that set the bad key."""
    check_values(raw, source, sources)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise TaskfedError(describe_error(exc, source, sources)) from None
    # Method-specific keys are validated by the method's own parameter model, read without importing torch.
    from taskfed.methods import check_params

    check_params(cfg.method, lambda key: blame(key, source, sources), cfg.train.rounds)
    if cfg.privacy.centroids is not None or cfg.privacy.updates is not None:
        from taskfed.privacy import check as check_privacy  # the accountant: only when privacy is asked for

        why = check_privacy(cfg)
        if why:
            key = why.split(":", 1)[0]
            raise TaskfedError(f"{blame(key, source, sources)}: {why}.")
    return cfg
