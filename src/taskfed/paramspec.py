"""The methods' parameter models, read from the method files' source without importing them.

Every method file imports torch (and some scikit-learn and transformers) at its top: about 6 s on 2 CPU
cores before a single key of a config can be checked. A parameter model, though, is a plain pydantic class
in that file (`class FedProxParams(BaseModel)`, named by the method class's `Params = ...`). This module
parses each file (`ast`), executes only its pydantic and typing imports, its literal module constants and
its parameter classes, and resolves each method name to its model through the class hierarchy, across
files (`FedProx(FedAvg)` inherits FedAvg's, which inherits `Method.Params`).

When a file's parameter class needs anything more (a helper function, a torch type), executing it fails
and that one file is imported for real: slower, never wrong. A test checks that every model here has the
same JSON schema as the imported method's `Params`.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
import types
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from pydantic import BaseModel

import taskfed.methods as methods_pkg

LIGHT = {"__future__", "typing", "typing_extensions", "pydantic", "enum", "re", "math"}
PACKAGE = methods_pkg.__name__


@dataclass
class _File:
    module: str  # the method file's module name (taskfed.methods.fedprox)
    classes: dict[str, ast.ClassDef] = field(default_factory=dict)
    imported: dict[str, tuple[str, str]] = field(default_factory=dict)  # local name -> (module, name)
    models: dict[str, type[BaseModel]] = field(default_factory=dict)  # its parameter classes


def _light(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level == 0 and (node.module or "").split(".")[0] in LIGHT
    if isinstance(node, ast.Import):
        return all(alias.name.split(".")[0] in LIGHT for alias in node.names)
    if isinstance(node, ast.Assign):  # NAME = 1e-4: a constant a Field may use
        try:
            ast.literal_eval(node.value)
        except ValueError:
            return False
        return True
    return False


def _bases(node: ast.ClassDef) -> list[str]:
    return [b.id for b in node.bases if isinstance(b, ast.Name)]


def _attr(node: ast.ClassDef, name: str) -> ast.expr | None:
    for stmt in node.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
            return stmt.value
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
            return stmt.value
    return None


class _Reader:
    def __init__(self) -> None:
        self.files: dict[str, _File] = {}
        for info in pkgutil.iter_modules(methods_pkg.__path__):
            module = f"{PACKAGE}.{info.name}"
            self.files[module] = self._parse(module, Path(methods_pkg.__path__[0]) / f"{info.name}.py")

    def _parse(self, module: str, path: Path) -> _File:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        f = _File(module)
        keep: list[ast.stmt] = []
        params: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(PACKAGE):
                for alias in node.names:
                    f.imported[alias.asname or alias.name] = (node.module, alias.name)
            elif isinstance(node, ast.ClassDef):
                f.classes[node.name] = node
                # A parameter class: a pydantic model, directly or through another one of this file.
                if any(b == "BaseModel" or b in params for b in _bases(node)):
                    params.add(node.name)
                    keep.append(node)
            elif _light(node):
                keep.append(node)
        if not params:
            return f
        name = f"taskfed._paramspec.{module.rsplit('.', 1)[1]}"
        mod = types.ModuleType(name)
        sys.modules[name] = mod  # pydantic resolves string annotations in the class's module
        try:
            exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), mod.__dict__)
            f.models = {p: mod.__dict__[p] for p in params}
        except Exception:  # the class needs more than its file's light part: import the file itself
            real = importlib.import_module(module)
            f.models = {p: getattr(real, p) for p in params}
        return f

    def _find(self, module: str, name: str) -> tuple[str, str] | None:
        """Where class `name`, as seen from `module`, is defined."""
        f = self.files.get(module)
        if f is None:
            return None
        if name in f.classes:
            return module, name
        if name in f.imported:
            return self._find(*f.imported[name])
        return None

    def _params(self, module: str, cls: str) -> type[BaseModel] | None:
        """The class's `Params`: its own, else the first base's that has one (Python's lookup, single-base)."""
        f = self.files[module]
        node = f.classes[cls]
        value = _attr(node, "Params")
        if isinstance(value, ast.Name):
            where = self._find(module, value.id)
            if where is not None:
                return self.files[where[0]].models.get(where[1])
        for base in _bases(node):
            where = self._find(module, base)
            if where is not None:
                found = self._params(*where)
                if found is not None:
                    return found
        return None

    def _is_method(self, module: str, cls: str) -> bool:
        if cls == "Method" and module == f"{PACKAGE}.base":
            return True
        return any(where is not None and self._is_method(*where)
                   for where in (self._find(module, b) for b in _bases(self.files[module].classes[cls])))

    def models(self) -> dict[str, type[BaseModel]]:
        out = {}
        for module, f in self.files.items():
            for cls, node in f.classes.items():
                name = _attr(node, "name")
                if isinstance(name, ast.Constant) and isinstance(name.value, str) and self._is_method(module, cls):
                    model = self._params(module, cls)
                    if model is not None:
                        out[name.value] = model
        return dict(sorted(out.items()))


@cache
def param_models() -> dict[str, type[BaseModel]]:
    """Method name -> its parameter model, as the method's `Params` defines it."""
    return _Reader().models()
