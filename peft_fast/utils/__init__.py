"""Helpers shared by the layers above (file I/O, key formats, enums, constants)."""

from .other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, _get_submodules, infer_device, prepare_model_for_kbit_training
from .save_and_load import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from .trainable_tokens import TrainableTokensWrapper

__all__ = ["AuxiliaryTrainingWrapper", "ModulesToSaveWrapper", "TrainableTokensWrapper", "_get_submodules", "get_base_model_state_dict", "get_peft_model_state_dict", "infer_device",
           "load_peft_weights", "prepare_model_for_kbit_training", "set_base_model_state_dict",
           "set_peft_model_state_dict"]
