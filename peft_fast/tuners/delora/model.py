"""`peft.tuners.delora.model`'s default-target table (the same object as
peft_fast.utils.constants'). DeLoRA itself is not implemented in peft_fast."""
from ...utils.constants import TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING

__all__ = ["TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING"]
