"""Make this process look like one where real peft is not installed: ``import peft`` raises
ModuleNotFoundError and ``importlib.metadata`` finds no ``peft`` distribution. For subprocess tests:

    python -c "import tests.no_peft; tests.no_peft.hide_real_peft(); ..."   (cwd: the repository root)

Call it before importing peft_fast/transformers/trl/diffusers, as on a machine without peft.
"""
import importlib.machinery
import sys


def _is_peft(name) -> bool:
    return name == "peft" or (isinstance(name, str) and name.startswith("peft."))


class _HidePeft(importlib.machinery.PathFinder):
    """PathFinder without peft: no module spec, no distribution."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if _is_peft(fullname):
            return None
        return super().find_spec(fullname, path, target)

    @classmethod
    def find_distributions(cls, context=None):
        if context is None:
            from importlib.metadata import DistributionFinder

            context = DistributionFinder.Context()
        for dist in super().find_distributions(context):
            if (dist.metadata["Name"] or "").lower() != "peft":
                yield dist


def hide_real_peft() -> None:
    assert "peft" not in sys.modules or sys.modules["peft"] is None, "real peft was imported already"
    sys.modules.pop("peft", None)
    sys.meta_path[:] = [_HidePeft if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
