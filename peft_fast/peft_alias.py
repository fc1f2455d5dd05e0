"""``install_as_peft()``: make ``import peft`` give peft_fast, for libraries that import PEFT by name (L4).

TRL, transformers' adapter integration, diffusers' adapter loaders and accelerate all reach PEFT through
``import peft`` / ``from peft... import ...`` and ``isinstance(x, peft.PeftModel)``; none has a hook a
third-party package could register with. So the switch is an import alias, installed by a call:

    import peft_fast
    peft_fast.install_as_peft()      # before or after importing trl / transformers / diffusers
    from trl import SFTTrainer       # now builds and trains peft_fast's layers

Why an alias and not per-library patches: every check those libraries make (``isinstance`` against PEFT's
classes, ``BaseTunerLayer`` scans, version checks, ``from peft.utils import ...``) then sees peft_fast's
objects, including the checks of library versions not written yet, and a model is never half peft,
half peft_fast. ``PEFT_FAST_AS_PEFT=1`` in the environment makes ``import peft_fast`` call it.

What it does, all undone by `uninstall_as_peft()`:

- A meta-path finder answers ``peft`` with a module that forwards to `peft_fast` (``peft.__version__`` is
  the PEFT version peft_fast follows, `PEFT_VERSION`) and ``peft.<x>`` with ``peft_fast.<x>``, the same
  module object, so classes are identical under both names. Real peft's modules already imported are
  set aside and put back on uninstall.
- Where real peft is not installed, the same finder reports a ``peft`` distribution with `PEFT_VERSION`,
  so ``importlib.metadata.version("peft")`` and the libraries' availability probes answer as with peft.
  transformers' and diffusers' cached probes are refreshed.
- Modules of transformers, trl, diffusers and accelerate imported *before* the call keep what their
  top-level ``from peft import ...`` bound (real peft's classes), or never bound it (no peft installed);
  those names are rebound to peft_fast's (`_alias_rebind`). On uninstall the other way round: what
  modules imported under the alias bound is rebound to real peft's objects, where peft is installed.
- A name or module PEFT has and peft_fast does not (e.g. ``peft.VeraConfig``, ``peft.tuners.loha``) is a
  placeholder (`_alias_missing`): importing it works, so a library that imports it at the top still
  loads; using it raises NotImplementedError naming it. Anything PEFT does not have either raises the
  usual ImportError/AttributeError.

Errors: nothing at install; `uninstall_as_peft()` without an install is a no-op.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import sys
import threading
import types
from typing import Any

from ._alias_missing import _MissingModule, missing_module, missing_name
from ._alias_probes import refresh_probes
from ._peft_manifest import PEFT_ALL, PEFT_MODULE_NAMES, PEFT_MODULES, PEFT_VERSION

__all__ = ["PEFT_VERSION", "as_peft", "install_as_peft", "is_installed_as_peft", "uninstall_as_peft"]

_lock = threading.RLock()
_state: "_Installed | None" = None
_blocks = 0  # open `as_peft()` blocks
_installing = False  # guards against re-entry from finders asked during the install
_PEFT_MODULES = frozenset(PEFT_MODULES)
_PEFT_ALL = frozenset(PEFT_ALL)


def _is_peft_name(fullname: str) -> bool:
    return fullname == "peft" or fullname.startswith("peft.")


class _PeftModule(types.ModuleType):
    """The module ``import peft`` gives under the alias: peft_fast's attributes, PEFT's version."""

    def __getattr__(self, name: str) -> Any:
        import peft_fast

        try:
            return getattr(peft_fast, name)
        except AttributeError:
            pass
        if name in _PEFT_ALL:
            return missing_name(f"peft.{name}", real_peft_installed=_real_peft_installed())
        raise AttributeError(f"module 'peft' (peft_fast, following PEFT {PEFT_VERSION}) has no attribute {name!r}")

    def __dir__(self):
        import peft_fast

        return sorted(set(super().__dir__()) | set(dir(peft_fast)) | _PEFT_ALL)


def _real_peft_installed() -> bool:
    return bool(_state and _state.real_installed)


class _PeftDistribution(importlib.metadata.Distribution):
    """``peft``'s metadata where real peft is not installed: name and `PEFT_VERSION` only."""

    def read_text(self, filename):
        if filename == "METADATA":
            return f"Metadata-Version: 2.1\nName: peft\nVersion: {PEFT_VERSION}\nSummary: peft_fast (alias)\n"
        if filename == "top_level.txt":
            return "peft\n"
        return None

    def locate_file(self, path):
        import peft_fast

        return os.path.join(os.path.dirname(peft_fast.__file__), str(path))


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``peft`` and ``peft.*`` as peft_fast's modules; loads them without re-executing anything."""

    def __init__(self):
        # fullname -> (the peft_fast module's own __spec__, whether it had __path__), put back after load
        self._own: dict[str, tuple[Any, bool]] = {}

    # -- finder -------------------------------------------------------------------------------------------
    def find_spec(self, fullname, path=None, target=None):
        if not _is_peft_name(fullname):
            return None
        if fullname != "peft" and fullname not in _PEFT_MODULES:
            try:
                if importlib.util.find_spec("peft_fast" + fullname[len("peft"):]) is None:
                    return None  # neither peft_fast nor PEFT has it: the usual ModuleNotFoundError
            except ImportError:
                return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        # while installed, ``peft``'s metadata is the PEFT version peft_fast follows, also where another
        # peft version is installed (found first: importlib.metadata.version("peft") answers this one)
        if _state is None:
            return iter(())
        name = getattr(context, "name", None)
        if name is None or name.lower().replace("_", "-") == "peft":
            return iter((_PeftDistribution(),))
        return iter(())

    # -- loader -------------------------------------------------------------------------------------------
    def create_module(self, spec):
        fullname = spec.name
        if fullname == "peft":
            return _state.proxy
        target = "peft_fast" + fullname[len("peft"):]
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name != target and not target.startswith(f"{e.name}."):
                raise  # something peft_fast's module itself imports is missing
            if fullname in _PEFT_MODULES:
                return missing_module(fullname, real_peft_installed=_real_peft_installed())
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname) from None
        self._own[fullname] = (getattr(module, "__spec__", None), hasattr(module, "__path__"))
        return module

    def exec_module(self, module):
        # importlib set the alias spec (and an empty __path__) on it: a peft_fast module keeps its own
        fullname = module.__spec__.name
        own = self._own.pop(fullname, None)
        if own is not None:
            module.__spec__ = own[0]
            if not own[1]:
                with contextlib.suppress(AttributeError):
                    del module.__path__
            _answer_missing_names(module, fullname)


def _answer_missing_names(module: types.ModuleType, fullname: str) -> None:
    """Give the peft_fast module standing for PEFT's `fullname` a module ``__getattr__`` (PEP 562) that
    answers the names PEFT has there and peft_fast lacks with placeholders; removed on uninstall."""
    names = frozenset(PEFT_MODULE_NAMES.get(fullname, ()))
    if _state is None or not (names or any(m.startswith(fullname + ".") for m in _PEFT_MODULES)):
        return
    own = module.__dict__.get("__getattr__")  # a module's own lazy attributes come first

    def __getattr__(name: str, _module=module.__name__, _peft=fullname, _names=names, _own=own):
        if _own is not None:
            try:
                return _own(name)
            except AttributeError:
                pass
        if name in _names:
            return missing_name(f"{_peft}.{name}", real_peft_installed=_real_peft_installed())
        if f"{_peft}.{name}" in _PEFT_MODULES and _state is not None:  # a PEFT subpackage, e.g. peft.tuners.loha
            return importlib.import_module(f"{_peft}.{name}")
        raise AttributeError(f"module {_module!r} has no attribute {name!r}")

    module.__getattr__ = __getattr__

    def undo():
        if module.__dict__.get("__getattr__") is __getattr__:
            if own is None:
                del module.__getattr__
            else:
                module.__getattr__ = own

    _state.undo.append(undo)


class _Installed:
    def __init__(self):
        self.finder = _AliasFinder()
        self.proxy = _PeftModule("peft", "peft_fast under PEFT's name (peft_fast.install_as_peft())")
        self.real_installed = False
        self.saved_modules: dict[str, types.ModuleType | None] = {}
        self.undo: list = []  # callables run in reverse order on uninstall


def _make_proxy(proxy: _PeftModule, finder: _AliasFinder) -> None:
    import peft_fast

    proxy.__version__ = PEFT_VERSION
    proxy.__file__ = peft_fast.__file__
    proxy.__path__ = []  # submodules come from the finder only, never from a second copy of the files
    # `from peft import *`: PEFT's names, less the constants peft_fast lacks (those have no placeholder)
    proxy.__all__ = [n for n in PEFT_ALL if hasattr(peft_fast, n) or not (n.isupper() or n.startswith("_"))]
    proxy.__spec__ = importlib.machinery.ModuleSpec("peft", finder, is_package=True)
    proxy.__loader__ = finder
    proxy.__package__ = "peft"


def _real_peft_distribution_exists() -> bool:
    ctx = importlib.metadata.DistributionFinder.Context(name="peft")
    for finder in sys.meta_path:
        find = getattr(finder, "find_distributions", None)
        if find is None or isinstance(finder, _AliasFinder) or getattr(finder, "_peft_fast_hook", False):
            continue  # ours, or the start-up hook (asking it would install the alias from inside this install)
        if next(iter(find(ctx)), None) is not None:
            return True
    return False


def install_as_peft() -> None:
    """Make ``import peft`` (and ``peft.<submodule>``) give peft_fast until `uninstall_as_peft()`.

    Idempotent; calls are serialised by a lock (do not call it while other threads are importing
    peft). Works with or without real peft installed; modules of transformers, trl, diffusers,
    accelerate and ``__main__`` imported before the call are rebound. See the module docstring.
    """
    global _state, _installing
    with _lock:
        if _state is not None or _installing:
            return
        _installing = True
        try:
            _install()
        finally:
            _installing = False


def _install() -> None:
    global _state
    from ._alias_rebind import rebind_imported_modules

    state = _Installed()
    state.real_installed = _real_peft_distribution_exists()
    _make_proxy(state.proxy, state.finder)
    for name in [n for n in list(sys.modules) if _is_peft_name(n)]:
        state.saved_modules[name] = sys.modules.pop(name)
    # the start-up hook of `peft-fast run` children has done its job once the alias is in (else it would
    # install it again after an uninstall)
    for hook in [f for f in sys.meta_path if getattr(f, "_peft_fast_hook", False)]:
        sys.meta_path.remove(hook)
    sys.meta_path.insert(0, state.finder)
    sys.modules["peft"] = state.proxy
    _state = state
    try:
        importlib.invalidate_caches()
        refresh_probes()
        state.undo.append(rebind_imported_modules())
    except BaseException:
        uninstall_as_peft()
        raise


def uninstall_as_peft() -> None:
    """Undo `install_as_peft()`: real peft (if installed) answers ``import peft`` again, the modules of
    real peft set aside are back, and rebound names get their old values. Objects already built with
    peft_fast stay peft_fast's. A no-op when the alias is not installed."""
    global _state, _blocks
    with _lock:
        state = _state
        if state is None:
            return
        _state, _blocks = None, 0
        errors = []
        try:
            for undo in reversed(state.undo):
                try:
                    undo()
                except Exception as e:  # noqa: BLE001 - the other steps still run; the first error is raised
                    errors.append(e)
        finally:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(state.finder)
            for name in [n for n in list(sys.modules) if _is_peft_name(n)]:
                module = sys.modules.pop(name, None)
                parent = sys.modules.get("peft_fast" + name[len("peft"):].rpartition(".")[0])
                leaf = name.rpartition(".")[2]
                if isinstance(module, _MissingModule) and parent is not None and parent.__dict__.get(leaf) is module:
                    delattr(parent, leaf)  # the import system hung the placeholder on its peft_fast parent
            sys.modules.update(state.saved_modules)
            importlib.invalidate_caches()
            refresh_probes()
        # modules imported under the alias bound peft_fast's objects: real peft's again, where installed
        from ._alias_rebind import from_alias, rebind_imported_modules

        rebind_imported_modules(stale=from_alias)
        if errors:
            raise errors[0]


def is_installed_as_peft() -> bool:
    """True while `install_as_peft()` is in effect."""
    return _state is not None


@contextlib.contextmanager
def as_peft():
    """``with peft_fast.as_peft(): ...``: the alias for the block only. Blocks nest and overlap across
    threads: the alias is removed when the last open block exits, unless `install_as_peft()` installed it
    before (then it stays). Build *and use* the libraries' objects inside the block: TRL and friends
    check ``isinstance(model, peft.PeftModel)`` again while training, and after the block their ``peft``
    names are real peft's again."""
    global _blocks
    with _lock:
        outer = is_installed_as_peft() and _blocks == 0
        install_as_peft()
        _blocks += 1
    try:
        yield
    finally:
        with _lock:
            _blocks = max(_blocks - 1, 0)
            if _blocks == 0 and not outer:
                uninstall_as_peft()


def _install_from_env() -> None:
    if os.environ.get("PEFT_FAST_AS_PEFT", "0").strip().lower() in ("1", "true", "yes", "on"):
        install_as_peft()
