"""LoRA (PEFT's peft.tuners.lora): the sub-configs of its variants are importable from here, as in PEFT."""
from . import variants  # noqa: F401  first: the variant files import LoraVariant from it
from .bdlora import BdLoraConfig
from .config import KasaConfig, MontecloraConfig
from .velora import VeloraConfig
