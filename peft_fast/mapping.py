"""`get_peft_model`, `inject_adapter_in_model` and the type -> class tables (L4)."""
from __future__ import annotations

import enum
import warnings
from typing import Optional

from torch import nn

from .config import PeftConfig
from .tuners.ia3.config import IA3Config
from .tuners.ia3.model import IA3Model
from .tuners.lora.config import LoraConfig
from .tuners.lora.model import LoraModel
from .tuners.tuners_utils import BaseTunerLayer
from .utils.constants import PEFT_TYPE_TO_PREFIX_MAPPING
from .utils.peft_types import PeftType

PEFT_TYPE_TO_CONFIG_MAPPING: dict[str, type[PeftConfig]] = {"LORA": LoraConfig, "IA3": IA3Config}
PEFT_TYPE_TO_TUNER_MAPPING = {"LORA": LoraModel, "IA3": IA3Model}
# PEFT's table of the types PeftMixedModel can combine; peft_fast has no PeftMixedModel (get_peft_model(mixed=True)
# raises), so it is empty.
PEFT_TYPE_TO_MIXED_MODEL_MAPPING: dict = {}


def _type_key(enum_or_str) -> str:
    """'LORA' for PeftType.LORA or 'LORA' (str() of a str-Enum is not its value on 3.11+)."""
    return enum_or_str.value if isinstance(enum_or_str, enum.Enum) else str(enum_or_str)


def tuner_class_for(config: PeftConfig):
    key = _type_key(config.peft_type)
    if key not in PEFT_TYPE_TO_TUNER_MAPPING:
        raise ValueError(f"peft_type {key!r} is not supported by peft_fast (supported: {sorted(PEFT_TYPE_TO_TUNER_MAPPING)})")
    return PEFT_TYPE_TO_TUNER_MAPPING[key]


def get_peft_config(config_dict: dict) -> PeftConfig:
    return PEFT_TYPE_TO_CONFIG_MAPPING[_type_key(config_dict["peft_type"])](**config_dict)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   mixed: bool = False, autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False):
    """Wrap `model` in the PeftModel class of the config's task type (PEFT's signature)."""
    from .peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel

    if mixed:
        raise NotImplementedError("PeftMixedModel is not supported by peft_fast")
    old_name, new_name = peft_config.base_model_name_or_path, base_model_name_or_path(model)
    peft_config.base_model_name_or_path = new_name
    # PEFT's warnings, same texts
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        warnings.warn("You are trying to modify a model with PEFT for a second time. If you want to reload the model "
                      "with a different config, make sure to call `.unload()` before.")
    if old_name is not None and old_name != new_name:
        warnings.warn(f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}'. "
                      "Please ensure that the correct base model is loaded when loading this checkpoint.")
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(f"peft config has already set base model revision to {peft_config.revision}, overwriting "
                          f"with revision {revision}")
        peft_config.revision = revision
    warn_if_adapter_name_in_prefix(adapter_name, peft_config)
    task = _type_key(peft_config.task_type) if peft_config.task_type is not None else None
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task, PeftModel)
    return cls(model, peft_config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)


def warn_if_adapter_name_in_prefix(adapter_name: str, peft_config: PeftConfig) -> None:
    """An adapter named like a piece of the method's prefix ('lora' in 'lora_') can be confused with
    the prefix when a state dict is loaded: PEFT's warning."""
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(_type_key(peft_config.peft_type))
    if prefix and adapter_name in prefix:
        warnings.warn(f"Adapter name '{adapter_name}' should not be contained in the prefix '{prefix}'. "
                      "This may lead to reinitialization of the adapter weights during loading.")


def base_model_name_or_path(model: nn.Module) -> Optional[str]:
    """The base model's name_or_path (from a transformers config or the module itself), or None."""
    cfg = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(cfg, "_name_or_path", None)
    return name or None


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> nn.Module:
    """Create peft_fast's adapter layers and inject them into `model` in place (no PeftModel wrapper);
    returns the same, mutated model. PEFT's signature and errors; this is what diffusers' `add_adapter` /
    `load_lora_adapter` and transformers' adapter integration call.

    low_cpu_mem_usage: create the adapter weights on the meta device (then load them with
    ``set_peft_model_state_dict(..., low_cpu_mem_usage=True)``).
    state_dict: when given, the modules to adapt are read from its keys (its values are not used), for
    checkpoints without ``target_modules``.

    Errors: ValueError for prompt-learning / adaption-prompt configs and for a type peft_fast has no
    tuner for (PEFT's texts, naming the type)."""
    if getattr(peft_config, "is_prompt_learning", False) or getattr(peft_config, "is_adaption_prompt", False) \
            or type(peft_config).__name__ == "ShadowConfig":
        raise ValueError("`create_and_replace` does not support prompt learning, adaption prompt and shadow yet.")
    key = _type_key(peft_config.peft_type)
    if key not in PEFT_TYPE_TO_TUNER_MAPPING:
        raise ValueError(f"`inject_adapter_in_model` does not support {key} yet. Please use `get_peft_model`. "
                         f"(peft_fast has tuners for: {sorted(PEFT_TYPE_TO_TUNER_MAPPING)})")
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[key]
    if getattr(tuner_cls, "uses_shared_state", False):
        raise ValueError(f"`inject_adapter_in_model` does not support {key} because it uses shared state "
                         "stored on the tuner. Please use `get_peft_model` instead.")
    tuner = tuner_cls(model, peft_config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                      state_dict=state_dict)
    return tuner.model
