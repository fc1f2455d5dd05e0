"""Placeholders for what PEFT has and peft_fast does not, under the ``peft`` alias (L4; see peft_alias.py).

A library that imports, say, ``PrefixTuningConfig`` at its top must still load; a user who reaches for it
must get an error that names it. So a missing class is a real class that nothing is an instance of
(``isinstance`` answers False) and that raises NotImplementedError when instantiated; any of its class
attributes raises AttributeError with the same message (``hasattr`` answers False), except an adapter
layer's static ``adapter_layer_names``/``other_param_names``, which are PEFT's (diffusers reads them). A missing function
raises NotImplementedError when called. A missing module answers every public name with such a
placeholder. Placeholders are cached: the same name gives the same object.
"""
from __future__ import annotations

import types
from typing import Any

_cache: dict[str, Any] = {}


def _message(qualname: str, real_peft_installed: bool) -> str:
    from ._peft_manifest import PEFT_VERSION

    real = "real peft" if real_peft_installed else "real peft (pip install peft)"
    return (f"peft_fast does not provide `{qualname}` (PEFT {PEFT_VERSION} has it). `import peft` gives "
            f"peft_fast while the peft alias is installed (peft_fast.install_as_peft(), peft_fast.as_peft(), "
            f"PEFT_FAST_AS_PEFT=1 or `peft-fast run`); to use it, run without the alias, with {real}.")


class _MissingClassMeta(type):
    def __call__(cls, *args, **kwargs):
        raise NotImplementedError(cls._peft_fast_missing)

    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{cls._peft_fast_missing} (attribute {name!r})")


def missing_name(qualname: str, *, real_peft_installed: bool) -> Any:
    """The placeholder for ``qualname`` (e.g. ``"peft.VeraConfig"``): a class for CamelCase names, a
    function otherwise. Raises AttributeError for ALL_CAPS and private names (constants, internals)."""
    if qualname in _cache:
        return _cache[qualname]
    module, _, name = qualname.rpartition(".")
    if name.startswith("_") or name.isupper():
        raise AttributeError(f"module {module!r} has no attribute {name!r} "
                             f"({_message(qualname, real_peft_installed)})")
    message = _message(qualname, real_peft_installed)
    if name[:1].isupper():
        from ._peft_manifest import PEFT_LAYER_ATTRIBUTES

        attrs = {"_peft_fast_missing": message, "__module__": module, "__qualname__": name, "__doc__": message}
        if qualname in PEFT_LAYER_ATTRIBUTES:  # static names libraries read off layer classes (e.g. diffusers)
            attrs["adapter_layer_names"], attrs["other_param_names"] = PEFT_LAYER_ATTRIBUTES[qualname]
        obj = _MissingClassMeta(name, (), attrs)
    else:
        def obj(*args, _message=message, **kwargs):
            raise NotImplementedError(_message)

        obj.__name__ = obj.__qualname__ = name
        obj.__module__ = module
        obj.__doc__ = message
        obj._peft_fast_missing = message
    _cache[qualname] = obj
    return obj


class _MissingModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return missing_name(f"{self.__name__}.{name}", real_peft_installed=self._peft_fast_real_installed)


def missing_module(fullname: str, *, real_peft_installed: bool) -> types.ModuleType:
    """A module standing for PEFT's ``fullname``, which peft_fast does not have."""
    module = _MissingModule(fullname, _message(fullname, real_peft_installed))
    module._peft_fast_real_installed = real_peft_installed
    module.__path__ = []
    from ._peft_manifest import PEFT_MODULE_NAMES

    module.__all__ = list(PEFT_MODULE_NAMES.get(fullname, ()))  # `from peft.tuners.loha import *`
    return module
