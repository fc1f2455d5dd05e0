"""Refresh the "is peft installed, which version" answers libraries computed once (L4; see peft_alias.py).

- transformers caches ``is_peft_available`` / ``is_peft_greater_or_equal`` (``lru_cache``): cleared.
- diffusers computes ``_peft_available``/``_peft_version`` once at import, and ``USE_PEFT_BACKEND`` (peft and
  transformers recent enough) once in ``diffusers.utils.constants``, copied into every module that imported
  it: recomputed from what ``import peft`` / ``importlib.metadata`` answer now and set wherever it was
  copied. Run after install and after uninstall, so the answers follow the alias both ways.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys


def _peft_now() -> tuple[bool, str]:
    try:
        available = importlib.util.find_spec("peft") is not None
    except (ImportError, ValueError):
        available = False
    if not available:
        return False, "N/A"
    try:
        return True, importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return False, "N/A"


def refresh_probes() -> None:
    tiu = sys.modules.get("transformers.utils.import_utils")
    if tiu is not None:
        for fn in ("is_peft_available", "is_peft_greater_or_equal"):
            clear = getattr(getattr(tiu, fn, None), "cache_clear", None)
            if clear is not None:
                clear()
    diu = sys.modules.get("diffusers.utils.import_utils")
    if diu is None or not hasattr(diu, "_peft_available"):
        return
    available, version = _peft_now()
    diu._peft_available, diu._peft_version = available, version
    constants = sys.modules.get("diffusers.utils.constants")
    if constants is None or not hasattr(constants, "USE_PEFT_BACKEND"):
        return
    from packaging import version as v

    old = constants.USE_PEFT_BACKEND
    ok_peft = available and v.parse(v.parse(version).base_version) >= v.parse(constants.MIN_PEFT_VERSION)
    new = bool(ok_peft and getattr(constants, "_required_transformers_version", True))
    if new == old:
        return
    constants._required_peft_version = ok_peft
    for name, module in list(sys.modules.items()):
        if module is not None and name.startswith("diffusers") and module.__dict__.get("USE_PEFT_BACKEND") is old:
            module.USE_PEFT_BACKEND = new
