"""Helpers shared by the layers above (file I/O, key formats, enums, constants)."""

from .constants import (
    CONFIG_NAME,
    INCLUDE_LINEAR_LAYERS_SHORTHAND,
    SAFETENSORS_WEIGHTS_NAME,
    TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    WEIGHTS_NAME,
)
from .error import NoMatchingPeftModuleError, PeftError
from .other import (
    AuxiliaryTrainingWrapper,
    ModulesToSaveWrapper,
    _get_submodules,
    _set_adapter,
    infer_device,
    prepare_model_for_kbit_training,
    transpose,
)
from .peft_types import PeftType, TaskType
from .warning import PeftWarning
from .save_and_load import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from .trainable_tokens import TrainableTokensWrapper

__all__ = ["CONFIG_NAME", "INCLUDE_LINEAR_LAYERS_SHORTHAND", "SAFETENSORS_WEIGHTS_NAME",
           "TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING", "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING",
           "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING", "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
           "WEIGHTS_NAME", "NoMatchingPeftModuleError", "PeftError", "PeftType", "PeftWarning", "TaskType", "_set_adapter",
           "transpose", "AuxiliaryTrainingWrapper", "ModulesToSaveWrapper", "TrainableTokensWrapper", "_get_submodules", "get_base_model_state_dict", "get_peft_model_state_dict", "infer_device",
           "load_peft_weights", "prepare_model_for_kbit_training", "set_base_model_state_dict",
           "set_peft_model_state_dict"]
