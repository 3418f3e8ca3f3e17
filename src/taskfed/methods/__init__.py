"""The method registry: config `method.name` -> class. Each method is one file.

Two ways in. `METHODS` and `method_params` import the method files (and with them torch, transformers and
scikit-learn: about 6 s on 2 CPU cores); `check_params` validates a config's `[method]` table against the
same parameter models read from the files' source (`taskfed.paramspec`), in milliseconds, so that a config
mistake is reported before anything heavy is imported. A test keeps the two identical.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ValidationError

from taskfed.errors import TaskfedError

if TYPE_CHECKING:
    from taskfed.methods.base import Method

Where = str | Callable[[str], str]  # the source to name in an error, or key -> source (a file or a --set item)


def _discover() -> dict[str, type[Method]]:
    """Every Method subclass with a `name` in this package's modules: a new method is a new file."""
    from taskfed.methods.base import Method

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    found: dict[str, type[Method]] = {}
    stack = list(Method.__subclasses__())
    while stack:
        cls = stack.pop()
        stack += cls.__subclasses__()
        if "name" in cls.__dict__:
            found[cls.name] = cls
    return dict(sorted(found.items()))


def __getattr__(attr: str) -> Any:  # PEP 562: METHODS (and the imports it needs) on first use only
    if attr == "METHODS":
        globals()["METHODS"] = methods = _discover()
        return methods
    raise AttributeError(attr)


def _where(where: Where, key: str) -> str:
    return where(key) if callable(where) else where


def validate_params(models: dict[str, type[BaseModel]], raw: dict[str, Any], where: Where,
                    rounds: int | None = None, fit: bool = False) -> BaseModel:
    """`raw` (a [method] table) against its method's model: strict types, finite numbers, the key named.
    `rounds` (the config's train.rounds, where known) reaches a model's validators as context["rounds"]: a
    parameter naming a round can be checked against the budget (or, with `fit`, brought within it: --smoke)."""
    name = raw.get("name")
    if not isinstance(name, str) or name not in models:
        raise TaskfedError(f"{_where(where, 'method.name')}: unknown method '{name}' "
                           f"(choose one of {', '.join(sorted(models))}).")
    for key, value in raw.items():  # a method's table is flat: its values are numbers, strings, booleans
        if isinstance(value, float) and not math.isfinite(value):
            raise TaskfedError(f"{_where(where, f'method.{key}')}: bad value for 'method.{key}': {value} is not "
                               f"a finite number.")
    try:
        return models[name].model_validate(raw, strict=True, context={"rounds": rounds, "fit": fit})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = "method." + ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise TaskfedError(f"{_where(where, key)}: unknown key '{key}' for method '{name}'.") from None
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"].endswith("_type"):
            msg += f", got {type(first.get('input')).__name__} {first.get('input')!r}"[:200]
        raise TaskfedError(f"{_where(where, key)}: bad value for '{key}': {msg}.") from None


def method_params(raw: dict[str, Any], source: Where = "config") -> BaseModel:
    """The method's own Params instance (imports the method files)."""
    from taskfed.methods import METHODS

    return validate_params({name: cls.Params for name, cls in METHODS.items()}, raw, source)


def check_params(raw: dict[str, Any], source: Where = "config", rounds: int | None = None,
                 fit: bool = False) -> BaseModel:
    """The same validation as `method_params`, without importing a method file."""
    from taskfed.paramspec import param_models

    return validate_params(param_models(), raw, source, rounds, fit)


def build_method(raw: dict[str, Any], fed) -> Method:
    from taskfed.methods import METHODS

    return METHODS[raw["name"]](method_params(raw), fed)
