"""Rebind the top-level ``from peft import ...`` of modules imported before the ``peft`` alias (L4).

The modules of transformers, trl, diffusers, accelerate and the user's script (``__main__``) are read.
``trl.trainer.sft_trainer`` runs ``if is_peft_available(): from peft import PeftConfig, PeftModel, ...``
once, at its import. Imported before `install_as_peft()`, it holds real peft's classes (so a peft_fast
model fails its ``isinstance`` checks), or, without peft installed, never bound the names at all. This
reads such a module's source (`ast`, top-level statements only, through ``if``/``try``/``with`` blocks)
and binds each name to what the alias gives now, where the current value is absent or comes from real
peft; a name the module's own code set to something else is left alone. Every change is recorded and
undone by the callable returned.
"""
from __future__ import annotations

import ast
import importlib
import os
import sys
import types
from typing import Any, Callable, Iterator

PACKAGES = ("transformers", "trl", "diffusers", "accelerate", "__main__")
_ABSENT = object()


def _origin(value: Any) -> str:
    name = getattr(value, "__name__" if isinstance(value, types.ModuleType) else "__module__", None)
    return name if isinstance(name, str) else ""


def _is_alias_object(value: Any) -> bool:
    """Something the alias handed out: peft_fast's, the ``peft`` module standing for it, or a placeholder."""
    origin = _origin(value)
    return (origin == "peft_fast" or origin.startswith("peft_fast.") or hasattr(value, "_peft_fast_missing")
            or (isinstance(value, types.ModuleType) and type(value).__module__.startswith("peft_fast.")))


def from_real_peft(value: Any) -> bool:
    origin = _origin(value)
    return (origin == "peft" or origin.startswith("peft.")) and not _is_alias_object(value)


def from_alias(value: Any) -> bool:
    return _is_alias_object(value)


def _top_level_peft_imports(body: list[ast.stmt]) -> Iterator[tuple[str, str, str | None]]:
    """(binding name, module, attribute or None for a module) for each top-level peft import."""
    for node in body:
        if isinstance(node, ast.ImportFrom) and not node.level and node.module and (
                node.module == "peft" or node.module.startswith("peft.")):
            for alias in node.names:
                if alias.name != "*":
                    yield alias.asname or alias.name, node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "peft" or alias.name.startswith("peft."):
                    if alias.asname:
                        yield alias.asname, alias.name, None
                    else:
                        yield "peft", "peft", None
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody"):
                yield from _top_level_peft_imports(getattr(node, field, []) or [])
            for handler in getattr(node, "handlers", []):
                yield from _top_level_peft_imports(handler.body)


_parsed: dict[tuple[str, int, int], tuple] = {}  # (path, mtime_ns, size) -> the module's top-level peft imports


def _peft_imports_of(module: types.ModuleType) -> tuple:
    """The top-level peft imports of `module`'s source file (parsed once per file version)."""
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None) or getattr(module, "__file__", None)
    if not origin or not str(origin).endswith(".py"):
        return ()
    try:
        st = os.stat(origin)
        key = (str(origin), st.st_mtime_ns, st.st_size)
        if key not in _parsed:
            with open(origin, encoding="utf-8") as f:
                source = f.read()
            _parsed[key] = tuple(_top_level_peft_imports(ast.parse(source).body)) if "peft" in source else ()
        return _parsed[key]
    except (OSError, SyntaxError, ValueError):
        return ()


def _resolve(module_name: str, attr: str | None) -> Any:
    mod = importlib.import_module(module_name)
    return mod if attr is None else getattr(mod, attr)


def rebind_imported_modules(packages: tuple[str, ...] = PACKAGES,
                            stale: Callable[[Any], bool] = from_real_peft) -> Callable[[], None]:
    """Rebind the top-level peft imports of every imported module of `packages` whose value is absent or
    `stale` to what ``import peft`` gives now; returns the undo. At install `stale` is `from_real_peft`;
    at uninstall `from_alias` (modules imported under the alias get real peft back, where installed)."""
    changes: list[tuple[types.ModuleType, str, Any, Any]] = []
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".", 1)[0] not in packages:
            continue
        for binding, mod_name, attr in _peft_imports_of(module):
            current = module.__dict__.get(binding, _ABSENT)
            if current is not _ABSENT and not stale(current):
                continue
            try:
                new = _resolve(mod_name, attr)
            except Exception:  # noqa: BLE001 - not importable now (no real peft, a broken install): left as is
                continue
            module.__dict__[binding] = new
            changes.append((module, binding, current, new))

    def undo() -> None:
        for module, binding, old, new in reversed(changes):
            if module.__dict__.get(binding, _ABSENT) is not new:
                continue  # changed since: leave the newer value
            if old is _ABSENT:
                del module.__dict__[binding]
            else:
                module.__dict__[binding] = old

    return undo
