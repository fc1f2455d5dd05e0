"""The peft alias in every Python process `peft-fast run` starts, children included (L4).

`peft-fast run` puts this directory first on PYTHONPATH and sets PEFT_FAST_AS_PEFT=1, so each Python
process it starts, and the processes those start (``accelerate launch``, TRL's CLI, multiprocessing
``spawn``), imports this file at start-up. It installs a finder that does nothing until something looks
for ``peft`` (an import, ``importlib.util.find_spec``, or ``importlib.metadata``): then it imports
peft_fast and calls ``install_as_peft()``, so processes that never touch peft never pay for importing
peft_fast. In a Python where peft_fast is not importable (another environment inheriting the variables)
it steps aside. The ``sitecustomize`` this file shadows, if any, still runs afterwards (other copies of
this hook on the path are skipped). Not for interpreters started with -I, -E or -S (no PYTHONPATH/site).
"""
import importlib.machinery
import importlib.util
import os
import sys

_PEFT_FAST_HOOK = True  # marks this file: other copies of the hook on the path are skipped


class _InstallOnFirstPeftLookup:
    """Removes itself and installs the peft alias the first time anything looks for ``peft``."""

    _peft_fast_hook = True

    @staticmethod
    def _install():
        if _InstallOnFirstPeftLookup in sys.meta_path:
            sys.meta_path.remove(_InstallOnFirstPeftLookup)
        try:
            import peft_fast
        except ImportError:  # another Python that inherited PEFT_FAST_AS_PEFT/PYTHONPATH: step aside
            return None
        peft_fast.install_as_peft()
        return next((f for f in sys.meta_path if type(f).__name__ == "_AliasFinder"), None)

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname == "peft" or fullname.startswith("peft."):
            finder = cls._install()
            return None if finder is None else finder.find_spec(fullname, path, target)
        return None

    @classmethod
    def find_distributions(cls, context=None):
        name = getattr(context, "name", None)
        if name is not None and name.lower().replace("_", "-") == "peft":
            finder = cls._install()
            if finder is not None:
                return finder.find_distributions(context)
        return iter(())


def _is_hook_dir(path: str) -> bool:
    try:
        with open(os.path.join(path, "sitecustomize.py"), encoding="utf-8") as f:
            return "_PEFT_FAST_HOOK = True" in f.read()
    except OSError:
        return False


def _run_shadowed_sitecustomize():
    rest = [p for p in sys.path if not _is_hook_dir(os.path.abspath(p or os.curdir))]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if os.environ.get("PEFT_FAST_AS_PEFT", "0").strip().lower() in ("1", "true", "yes", "on") and not any(
        getattr(f, "_peft_fast_hook", False) for f in sys.meta_path):
    sys.meta_path.insert(0, _InstallOnFirstPeftLookup)
_run_shadowed_sitecustomize()
