"""LoRA (PEFT's peft.tuners.lora): the sub-configs of its variants are importable from here, as in PEFT."""
from .bdlora import BdLoraConfig
from .velora import VeloraConfig
