"""(IA)^3 on bitsandbytes' quantized linear layers (PEFT: peft.tuners.ia3.bnb): PEFT's formula
around bitsandbytes' own matmul (x upcast to fp32 outside autocast, the scale on the input of
feed-forward layers or on the output otherwise). Merging into quantized weights is refused,
as in PEFT. A 4-bit weight that bitsandbytes repacked for its CPU kernel (an eval forward on an
avx512_bf16 CPU) is put back in the canonical layout before a training forward (see
quant.bnb_state.restore_canonical_layout): that kernel has no backward."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ...quant.bnb_state import needs_canonical_layout, restore_canonical_layout
from ..lora.bnb import is_bnb_4bit
from .layer import Linear


class _QuantizedIA3(Linear):
    def __init__(self, base_layer, adapter_name: str, **kwargs: Any) -> None:
        kwargs.pop("fan_in_fan_out", None)
        kwargs.pop("is_target_conv_1d_layer", None)
        super().__init__(base_layer, adapter_name, fan_in_fan_out=False, **kwargs)
        self.get_base_layer().weight.requires_grad = False

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(f"Cannot merge ia3 layers into a {type(self.get_base_layer()).__name__} (quantized) layer")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if is_bnb_4bit(base) and needs_canonical_layout(base, x):
            restore_canonical_layout(base)
        if self.disable_adapters:
            return self.base_layer(x)
        scale = 1
        for a in self.active_adapters:
            if a in self.ia3_l:
                scale = scale * self.ia3_l[a].flatten()
        convert = not torch.is_autocast_enabled() and x.dtype != torch.float32
        if convert:
            x = x.float()
        if self.is_feedforward:
            result = self.base_layer(x * scale)
            expected = result.dtype
        else:
            result = self.base_layer(x)
            expected = result.dtype
            result = result * scale
        result = result.clone()
        return result.to(expected) if convert else result


class Linear4bit(_QuantizedIA3):
    """(IA)^3 on `bitsandbytes.nn.Linear4bit`."""


class Linear8bitLt(_QuantizedIA3):
    """(IA)^3 on `bitsandbytes.nn.Linear8bitLt`."""
