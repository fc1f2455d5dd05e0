"""The peft alias in every Python process `peft-fast run` starts, children included (L4).

`peft-fast run` puts this directory first on PYTHONPATH and sets PEFT_FAST_AS_PEFT=1, so each Python
process it starts, and the processes those start (``accelerate launch``, TRL's CLI, multiprocessing
``spawn``), imports this file at start-up. It installs a finder that does nothing until something looks
for ``peft`` (an import, ``importlib.util.find_spec``, or ``importlib.metadata``): then it imports
peft_fast and calls ``install_as_peft()``, so processes that never touch peft never pay for importing
peft_fast. The ``sitecustomize`` this file shadows, if any, still runs afterwards.
"""
import importlib.machinery
import importlib.util
import os
import sys


class _InstallOnFirstPeftLookup:
    """Removes itself and installs the peft alias the first time anything looks for ``peft``."""

    @staticmethod
    def _install():
        if _InstallOnFirstPeftLookup in sys.meta_path:
            sys.meta_path.remove(_InstallOnFirstPeftLookup)
        import peft_fast

        peft_fast.install_as_peft()
        return next(f for f in sys.meta_path if type(f).__name__ == "_AliasFinder")

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname == "peft" or fullname.startswith("peft."):
            return cls._install().find_spec(fullname, path, target)
        return None

    @classmethod
    def find_distributions(cls, context=None):
        name = getattr(context, "name", None)
        if name is not None and name.lower().replace("_", "-") == "peft":
            return cls._install().find_distributions(context)
        return iter(())


def _run_shadowed_sitecustomize():
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if os.environ.get("PEFT_FAST_AS_PEFT", "0").strip().lower() in ("1", "true", "yes", "on"):
    sys.meta_path.insert(0, _InstallOnFirstPeftLookup)
_run_shadowed_sitecustomize()
