"""LoRA (PEFT's peft.tuners.lora): the layer, config and tuner classes and the sub-configs of its
variants are importable from here, as in PEFT. ``Linear8bitLt``/``Linear4bit`` (bitsandbytes) are
loaded on first use, where bitsandbytes is installed (PEFT's behaviour)."""
import importlib.util as _importlib_util

from . import variants  # noqa: F401  first: the variant files import LoraVariant from it
from .bdlora import BdLoraConfig
from .config import KasaConfig, LoraConfig, LoraRuntimeConfig, MontecloraConfig
from .layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer
from .model import LoraModel
from .param_wrapper import ParamWrapper
from .velora import VeloraConfig

__all__ = [
    "BdLoraConfig", "Conv1d", "Conv2d", "Conv3d", "Embedding", "KasaConfig", "Linear", "LoraConfig", "LoraLayer",
    "LoraModel", "LoraRuntimeConfig", "MontecloraConfig", "ParamWrapper", "VeloraConfig",
]


def __getattr__(name):
    if name in ("Linear8bitLt", "Linear4bit") and _importlib_util.find_spec("bitsandbytes") is not None:
        from . import bnb

        return getattr(bnb, name)
    raise AttributeError(f"module {__name__} has no attribute {name}")
