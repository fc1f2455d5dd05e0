"""peft_fast: a kernel-accelerated drop-in replacement for Hugging Face PEFT.

    from peft_fast import LoraConfig, get_peft_model, PeftModel   # instead of `from peft import ...`
"""
__version__ = "0.1.0"

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import PeftConfig
from .mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    get_peft_config,
    get_peft_model,
    inject_adapter_in_model,
)
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_nb_trainable_parameters,
    print_trainable_parameters,
)
from .tuners.ia3.config import IA3Config
from .tuners.ia3.model import IA3Model
from .tuners.lora.config import KasaConfig, LoraConfig, LoraRuntimeConfig, MontecloraConfig
from .tuners.lora.model import LoraModel
from .tuners.lora.bdlora import BdLoraConfig
from .tuners.lora.velora import VeloraConfig
from .peft_alias import PEFT_VERSION, as_peft, install_as_peft, is_installed_as_peft, uninstall_as_peft
from .trainer_integration import install_trainer_integration, uninstall_trainer_integration
from .utils.error import NoMatchingPeftModuleError, PeftError
from .utils.other import prepare_model_for_kbit_training
from .utils.peft_types import PeftType, TaskType
from .utils.warning import PeftWarning
from .utils.save_and_load import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)

__all__ = [
    "BdLoraConfig", "VeloraConfig",
    "KasaConfig", "MontecloraConfig",
    "NoMatchingPeftModuleError",
    "PeftError",
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification", "IA3Config", "IA3Model", "LoraConfig", "LoraModel", "LoraRuntimeConfig",
    "PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PeftConfig", "PeftModel",
    "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
    "PeftType", "TaskType", "get_nb_trainable_parameters", "get_peft_config", "get_peft_model",
    "get_base_model_state_dict", "get_peft_model_state_dict", "inject_adapter_in_model", "install_trainer_integration", "load_peft_weights",
    "prepare_model_for_kbit_training", "print_trainable_parameters", "set_base_model_state_dict", "set_peft_model_state_dict",
    "uninstall_trainer_integration", "PEFT_VERSION", "PeftWarning", "as_peft", "install_as_peft",
    "is_installed_as_peft", "uninstall_as_peft",
]

# transformers' Trainer recognises peft_fast models as PEFT models (reversible; see trainer_integration.py).
from .trainer_integration import _install_from_env as _install_trainer_integration_from_env

_install_trainer_integration_from_env()
del _install_trainer_integration_from_env

# `PEFT_FAST_AS_PEFT=1`: `import peft` gives peft_fast (see peft_alias.py).
from .peft_alias import _install_from_env as _install_as_peft_from_env

_install_as_peft_from_env()
del _install_as_peft_from_env
