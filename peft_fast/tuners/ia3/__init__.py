"""IA3 (PEFT's peft.tuners.ia3): config, layer and tuner classes importable from here, as in PEFT.
``Linear8bitLt``/``Linear4bit`` (bitsandbytes) are loaded on first use, where bitsandbytes is installed."""
import importlib.util as _importlib_util

from .config import IA3Config
from .layer import Conv2d, Conv3d, IA3Layer, Linear
from .model import IA3Model

__all__ = ["Conv2d", "Conv3d", "IA3Config", "IA3Layer", "IA3Model", "Linear"]


def __getattr__(name):
    if name in ("Linear8bitLt", "Linear4bit") and _importlib_util.find_spec("bitsandbytes") is not None:
        from . import bnb

        return getattr(bnb, name)
    raise AttributeError(f"module {__name__} has no attribute {name}")
