"""Make transformers' `Trainer` treat peft_fast models as the PEFT models they are (L4).

Why this exists
---------------
`Trainer` (transformers 5.x) asks "is this a PEFT model?" in exactly two ways, and neither has an
attribute or registry hook a third-party class could answer through:

- ``transformers.trainer_utils._is_peft_model(model)``, i.e.
  ``is_peft_available() and isinstance(model, (peft.PeftModel, peft.PeftMixedModel))``. Without
  `peft` installed it is always False. Trainer uses it (directly, or through `unwrap_peft_model`)
  to: accept a quantized base that carries adapters (`validate_quantization_for_training`, else
  "You cannot perform fine-tuning on purely quantized models"); inspect the *base* model's forward
  for ``label_names``, ``can_return_loss``, ``model_accepts_loss_kwargs`` and the dataset columns
  to keep (a ``forward(*args, **kwargs)`` wrapper would otherwise yield no labels, no eval loss,
  and every dataset column dropped); pick the causal-LM label smoother; load adapters when
  resuming (`_load_from_checkpoint`) and at the end (`_load_best_model`); NEFTune; DeepSpeed's
  ``load_module_strict`` / ``exclude_frozen_parameters``; Liger kernels on the base model.
- ``Trainer._save``: ``isinstance(model, (PreTrainedModel, PeftModel) if is_peft_available() else
  (PreTrainedModel,))``. Anything else gets its *full* state dict written as ``model.safetensors``
  instead of ``save_pretrained`` (``adapter_model.safetensors`` + ``adapter_config.json``).

(``getattr(model, "is_quantized")`` and ``_hf_peft_config_loaded`` are duck-typed, but setting
``_hf_peft_config_loaded`` on PeftModel would only silence the quantization check -- including its
"this quantization method cannot be trained" refusal -- and fix none of the rest.)

Mechanism
---------
`install_trainer_integration()` rebinds these module globals, recording every original so that
`uninstall_trainer_integration()` puts them back exactly:

- ``transformers.trainer_utils._is_peft_model`` -> ``original(m) or isinstance(m, peft_fast.PeftModel)``;
  the same wrapper replaces the original in every imported ``transformers.*`` module that did
  ``from ..trainer_utils import _is_peft_model`` (``trainer``, ``integrations.neftune``); modules
  imported later bind the wrapper themselves.
- ``transformers.trainer.PeftModel`` -> ``(peft.PeftModel, peft_fast.PeftModel)``, or
  ``peft_fast.PeftModel`` where peft is not installed (isinstance accepts nested tuples).
- ``transformers.trainer.is_peft_available`` -> a function returning True. Only ``_save`` and
  ``_push_from_checkpoint`` read it there (the latter then also copies adapter files); the
  ``from peft import PeftModel`` it guards ran once at import time and is not repeated.
- ``transformers.trainer.update_fsdp_plugin_peft`` (FSDP only; it imports peft) -> for a peft_fast
  model without peft installed, a no-op, as it was before the integration; otherwise the original.

`unwrap_peft_model` and `validate_quantization_for_training` look ``_is_peft_model`` up in
``trainer_utils``' globals at call time, so they follow. For any model that is not a peft_fast
`PeftModel` every wrapper answers what transformers would, so real peft keeps working unchanged
alongside, and a quantized base model *without* adapters is still refused by transformers' own
check (it is not a PEFT model for either library).

`import peft_fast` calls `install_trainer_integration()`; it imports nothing from transformers.
Modules already imported are patched at once; for those imported later, a meta-path finder wraps
their loader so they are patched right after they execute (the finder removes itself once both
are done, and the modules' ``__loader__``/``__spec__.loader`` are set back to the real loader).
Set ``PEFT_FAST_TRAINER_INTEGRATION=0`` before importing peft_fast to skip it.

Not covered here (keyed on real peft): FSDP's auto-wrap policy for adapter layers, accelerate's
``is_peft_model``, and libraries outside transformers' Trainer (TRL, diffusers, transformers'
``add_adapter``/``load_adapter``) that import peft by name. For those, ``peft_fast.install_as_peft()``
(peft_alias.py) makes ``import peft`` give peft_fast.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import threading
from typing import Any, Callable

_TRAINER_UTILS = "transformers.trainer_utils"
_TRAINER = "transformers.trainer"
_MISSING = object()

_lock = threading.RLock()
_installed = False
_patches: list[tuple[str, str, Any, Any]] = []  # (module name, global, original or _MISSING, ours)
_original_is_peft_model: Callable | None = None
_wrapper: Callable | None = None
_finder: "_PatchAfterImport | None" = None


def _peft_fast_model_class() -> type:
    from .peft_model import PeftModel

    return PeftModel


def is_peft_fast_model(model: Any) -> bool:
    """True for a peft_fast `PeftModel` (any task class)."""
    return isinstance(model, _peft_fast_model_class())


def _make_wrapper(original: Callable) -> Callable:
    def _is_peft_model(model):
        return original(model) or is_peft_fast_model(model)

    _is_peft_model.__wrapped__ = original
    _is_peft_model.__doc__ = "transformers' `_is_peft_model`, also True for peft_fast models (peft_fast.trainer_integration)."
    _is_peft_model._peft_fast_wrapper = True
    return _is_peft_model


def _peft_importable() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def _make_fsdp_wrapper(original: Callable) -> Callable:
    def update_fsdp_plugin_peft(model, accelerator):
        if is_peft_fast_model(model) and not _peft_importable():
            return  # transformers' version starts with `from peft import ...`
        return original(model, accelerator)

    update_fsdp_plugin_peft.__wrapped__ = original
    update_fsdp_plugin_peft._peft_fast_wrapper = True
    return update_fsdp_plugin_peft


def _peft_available_for_trainer() -> bool:
    """Stands in for `is_peft_available` inside transformers.trainer: `PeftModel` there is always
    bound (to peft's and/or peft_fast's class) while the integration is installed."""
    return True


def _set_global(module, name: str, value: Any) -> None:
    original = module.__dict__.get(name, _MISSING)
    if original is value:
        return
    _patches.append((module.__name__, name, original, value))
    setattr(module, name, value)


def _patch_trainer_utils(module) -> None:
    global _original_is_peft_model, _wrapper
    current = module.__dict__.get("_is_peft_model")
    if current is None or getattr(current, "_peft_fast_wrapper", False):
        return
    _original_is_peft_model = current
    _wrapper = _make_wrapper(current)
    _set_global(module, "_is_peft_model", _wrapper)
    # modules that already did `from .trainer_utils import _is_peft_model`; later importers bind the wrapper
    for name, mod in list(sys.modules.items()):
        if name.startswith("transformers.") and mod is not None and mod is not module \
                and getattr(mod, "__dict__", {}).get("_is_peft_model") is current:
            _set_global(mod, "_is_peft_model", _wrapper)


def _patch_trainer(module) -> None:
    if "_save" not in getattr(module.__dict__.get("Trainer"), "__dict__", {}):
        return  # not the module layout this integration knows; leave it alone
    if _wrapper is not None and module.__dict__.get("_is_peft_model") is _original_is_peft_model:
        _set_global(module, "_is_peft_model", _wrapper)
    ours = _peft_fast_model_class()
    theirs = module.__dict__.get("PeftModel", _MISSING)
    if theirs is _MISSING:
        classes = ours
    elif isinstance(theirs, tuple):
        classes = theirs if ours in theirs else theirs + (ours,)
    else:
        classes = (theirs, ours)
    _set_global(module, "PeftModel", classes)
    _set_global(module, "is_peft_available", _peft_available_for_trainer)
    fsdp_update = module.__dict__.get("update_fsdp_plugin_peft")
    if callable(fsdp_update) and not getattr(fsdp_update, "_peft_fast_wrapper", False):
        _set_global(module, "update_fsdp_plugin_peft", _make_fsdp_wrapper(fsdp_update))


def _patch_module(module) -> None:
    with _lock:
        if not _installed:
            return
        if module.__name__ == _TRAINER_UTILS:
            _patch_trainer_utils(module)
        elif module.__name__ == _TRAINER:
            if _TRAINER_UTILS in sys.modules:  # always true in practice: trainer imports it
                _patch_trainer_utils(sys.modules[_TRAINER_UTILS])
            _patch_trainer(module)
        if _finder is not None:
            _finder.watched.discard(module.__name__)
            if not _finder.watched:
                _remove_finder()


class _PatchingLoader(importlib.abc.Loader):
    """Delegates to the real loader, then patches the freshly executed module."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        try:
            self._loader.exec_module(module)
        finally:
            module.__loader__ = self._loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self._loader
        _patch_module(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the watched transformers modules through the other finders and wraps their loader."""

    def __init__(self, watched: set[str]):
        self.watched = watched
        self._busy = threading.local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.watched or getattr(self._busy, "name", None) == fullname:
            return None
        self._busy.name = fullname  # the lookup below comes back through sys.meta_path
        try:
            spec = importlib.util.find_spec(fullname)
        except (ImportError, ValueError):
            return None
        finally:
            self._busy.name = None
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _PatchingLoader(spec.loader)
        return spec


def _remove_finder() -> None:
    global _finder
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    _finder = None


def install_trainer_integration() -> None:
    """Install the patches described in the module docstring (idempotent)."""
    global _installed, _finder
    with _lock:
        if _installed:
            return
        _installed = True
        if _TRAINER_UTILS in sys.modules:
            _patch_trainer_utils(sys.modules[_TRAINER_UTILS])
        if _TRAINER in sys.modules:
            _patch_trainer(sys.modules[_TRAINER])
        watched = {m for m in (_TRAINER_UTILS, _TRAINER) if m not in sys.modules}
        if watched:
            _finder = _PatchAfterImport(watched)
            sys.meta_path.insert(0, _finder)


def uninstall_trainer_integration() -> None:
    """Undo `install_trainer_integration`: every patched global gets its original back (one that
    someone else has rebound since is left alone), and the import finder is removed."""
    global _installed, _original_is_peft_model, _wrapper
    with _lock:
        _remove_finder()
        for mod_name, name, original, ours in reversed(_patches):
            module = sys.modules.get(mod_name)
            if module is None or module.__dict__.get(name, _MISSING) is not ours:
                continue
            if original is _MISSING:
                delattr(module, name)
            else:
                setattr(module, name, original)
        # modules imported after the install bound the wrapper themselves
        if _wrapper is not None:
            for name, mod in list(sys.modules.items()):
                if name.startswith("transformers.") and mod is not None \
                        and getattr(mod, "__dict__", {}).get("_is_peft_model") is _wrapper:
                    mod._is_peft_model = _original_is_peft_model
        _patches.clear()
        _original_is_peft_model = _wrapper = None
        _installed = False


def trainer_integration_installed() -> bool:
    return _installed


def _install_from_env() -> None:
    if os.environ.get("PEFT_FAST_TRAINER_INTEGRATION", "1").strip().lower() not in ("0", "false", "no", "off"):
        install_trainer_integration()
