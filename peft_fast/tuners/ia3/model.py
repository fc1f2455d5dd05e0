"""`IA3Model`: injects (IA)^3 layers (L3)."""
from __future__ import annotations

import re
import warnings

from torch import nn

from ...utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)
from ...utils.other import is_conv1d
from ..lora.bnb import is_bnb_4bit, is_bnb_8bit
from ..tuners_utils import BaseTuner, BaseTunerLayer
from .bnb import Linear4bit, Linear8bitLt
from .config import IA3Config
from .layer import Conv2d, Conv3d, IA3Layer, Linear


class IA3Model(BaseTuner):
    """Creates an (IA)^3 model from a pretrained model (same API as ``peft.IA3Model``)."""

    prefix = "ia3_"
    tuner_layer_cls = IA3Layer
    target_module_mapping = TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: IA3Config, model_config: dict) -> IA3Config:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        if peft_config.feedforward_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING:
                raise ValueError(
                    f"Please specify `feedforward_modules` in `peft_config`: no default for model_type {model_type!r}"
                )
            peft_config.feedforward_modules = set(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type])
        return peft_config

    @staticmethod
    def _check_target_module_feedforward(config: IA3Config, key: str) -> bool:
        if isinstance(config.feedforward_modules, str):
            return bool(re.fullmatch(config.feedforward_modules, key))
        return any(key.endswith(t) for t in config.feedforward_modules)

    def _check_merge_allowed(self) -> None:
        for bits in (8, 4):  # as PEFT: quantized weights cannot absorb the IA3 vectors
            if getattr(self.model, f"is_loaded_in_{bits}bit", False):
                raise ValueError(f"Cannot merge ia3 layers when the model is loaded in {bits}-bit mode")

    def _create_and_replace(self, ia3_config, adapter_name, target, target_name, parent, current_key):
        is_ff = self._check_target_module_feedforward(ia3_config, current_key)
        if isinstance(target, IA3Layer):
            target.update_layer(adapter_name, ia3_config.init_ia3_weights, ia3_config.inference_mode)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        kw = dict(is_feedforward=is_ff, init_ia3_weights=ia3_config.init_ia3_weights,
                  inference_mode=ia3_config.inference_mode)
        if is_bnb_4bit(base):  # before nn.Linear: bitsandbytes' layers subclass it
            new = Linear4bit(target, adapter_name, **kw)
        elif is_bnb_8bit(base):
            new = Linear8bitLt(target, adapter_name, **kw)
        elif isinstance(base, nn.Conv2d):
            new = Conv2d(target, adapter_name, **kw)
        elif isinstance(base, nn.Conv3d):
            new = Conv3d(target, adapter_name, **kw)
        elif isinstance(base, nn.Linear):
            if ia3_config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False.")
                ia3_config.fan_in_fan_out = False
            new = Linear(target, adapter_name, fan_in_fan_out=False, **kw)
        elif is_conv1d(base):
            if not ia3_config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.")
                ia3_config.fan_in_fan_out = True
            new = Linear(target, adapter_name, fan_in_fan_out=True, is_target_conv_1d_layer=True, **kw)
        else:
            raise ValueError(
                f"Target module {target} is not supported. "
                "Currently, only `torch.nn.Linear`, `torch.nn.Conv2d`, and `Conv1D` are supported."
            )
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)
