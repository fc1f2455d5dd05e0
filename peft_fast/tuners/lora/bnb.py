"""LoRA / DoRA on bitsandbytes' quantized linear layers (PEFT: peft.tuners.lora.bnb).

`Linear4bit` (QLoRA, Dettmers et al., 2023, arXiv:2305.14314): plain LoRA on an NF4 weight
runs the fused QLoRA op (4-bit weight decoded in the GEMM for small batches, dequantized into
a reused buffer otherwise, never kept for backward); DoRA, FP4 weights, hooks or dtype
mismatches take PEFT's formula around bitsandbytes' own matmul. CPU inference uses
bitsandbytes' kernels where they handle the shape and the fused op elsewhere. `Linear8bitLt`:
PEFT's formula (reference path). Merging dequantizes, adds the delta and quantizes again, as
PEFT. Every read of the frozen weight goes through `quant.bnb_state` (one accessor for 4-bit
weights in either layout and 8-bit weights before or after their first forward); a 4-bit weight
bitsandbytes repacked for its CPU kernel goes back to the canonical layout before a training
forward (that kernel has no backward).
bitsandbytes is imported only when one of these layers is built.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ... import ops
from ...functional import qlora_linear
from ...quant.bnb_state import (bnb_4bit_operand, cpu_forward_problem, dequantize_bnb_weight, is_cpu_packed,
                                needs_canonical_layout, restore_canonical_layout)
from ...triton_kernels.nf4 import NF4Operand  # noqa: F401  (type of nf4_operand())
from .layer import Linear


def is_bnb_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def is_bnb_8bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear8bitLt" and type(module).__module__.startswith("bitsandbytes")


def _param_kwargs(weight, cls) -> dict:
    """Constructor kwargs of a bnb parameter class taken from an existing parameter."""
    import inspect

    names = set(inspect.signature(cls.__new__).parameters) | set(inspect.signature(cls.__init__).parameters)
    kw = {k: v for k, v in weight.__dict__.items() if k in names and not k.startswith("_") and k != "data"}
    if "bnb_quantized" in names:
        kw["bnb_quantized"] = False
    kw["requires_grad"] = False
    return kw


class _QuantizedLinear(Linear):
    """Shared by the bitsandbytes layers: never fan_in_fan_out; merging goes through a dense
    copy of the weight (`_dense_weight`) and quantizes the result again."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        kwargs.pop("fan_in_fan_out", None)
        kwargs.pop("is_target_conv_1d_layer", None)
        super().__init__(base_layer, adapter_name, fan_in_fan_out=False, **kwargs)

    def update_layer(self, adapter_name: str, *args: Any, config=None, **kwargs: Any) -> None:
        # PEFT's bitsandbytes layers refuse VeLoRA and take BD-LoRA configs as plain LoRA
        if config is not None and getattr(config, "velora_config", None) is not None:
            raise ValueError(f"{self.__class__.__name__} does not support VeLoRA.")
        if config is not None and getattr(config, "use_bdlora", None) is not None:
            config = copy.copy(config)
            config.use_bdlora = None
        super().update_layer(adapter_name, *args, config=config, **kwargs)

    def _base_weight_data(self) -> torch.Tensor:
        return self._dense_weight()

    def _forget_base_weight(self) -> None:
        """Drop what was computed from the replaced base weight: the caches are keyed by data
        pointer, and a new quantized weight can land at the address of a freed one."""
        for key in ("nf4_operand", "weight_sqnorm"):
            self._caches.pop(key, None)


class Linear4bit(_QuantizedLinear):
    """LoRA on `bitsandbytes.nn.Linear4bit` (same attributes and state-dict keys as PEFT)."""

    # -- the 4-bit weight ------------------------------------------------------------------------
    def nf4_operand(self) -> Optional[NF4Operand]:
        """The NF4 weight as kernel operand, or None for FP4 or an unquantized weight. Shares the
        packed storage, except after bitsandbytes repacked the weight for its CPU kernel (then a
        canonical copy, see quant.bnb_state). Cached until the parameter or its state changes."""
        w = self.get_base_layer().weight
        qs = getattr(w, "quant_state", None)
        if qs is None or getattr(qs, "quant_type", None) != "nf4" or not getattr(w, "bnb_quantized", True):
            return None
        key = (w.data_ptr(), id(qs), is_cpu_packed(qs))
        hit = self._caches.get("nf4_operand")
        if hit is None or hit[0] != key:
            hit = (key, bnb_4bit_operand(w)[0])
            self._caches["nf4_operand"] = hit
        return hit[1]

    def _dense_weight(self) -> torch.Tensor:
        return dequantize_bnb_weight(self.get_base_layer())

    def _set_base_weight_data(self, new_w: torch.Tensor) -> None:
        import bitsandbytes as bnb

        warnings.warn("Merging LoRA into a 4-bit linear layer may change generations slightly (rounding).")
        base = self.get_base_layer()
        w = base.weight
        base.weight = bnb.nn.Params4bit(new_w.to("cpu"), **_param_kwargs(w, bnb.nn.Params4bit)).to(w.device)
        self._forget_base_weight()

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if is_bnb_4bit(base) and needs_canonical_layout(base, x):
            # training after an eval forward repacked the weight (avx512_bf16 CPUs): bitsandbytes'
            # kernel for that layout has no backward
            restore_canonical_layout(base)
            self._forget_base_weight()
        return super().forward(x, *args, **kwargs)

    def _fusable(self, x: torch.Tensor, args, kwargs) -> bool:
        base = self.base_layer
        if (not self.training and ops.backend_for(x) == "torch" and is_bnb_4bit(base)
                and cpu_forward_problem(base, x) is None):
            return False  # CPU inference: bitsandbytes' own 4-bit kernels beat dequantize + matmul
        op = self.nf4_operand() if is_bnb_4bit(base) else None
        compute = getattr(base, "compute_dtype", None)
        return (
            op is not None and not args and not kwargs
            and not base._forward_hooks and not base._forward_pre_hooks
            and ((x.dtype == op.dtype and (compute is None or compute == x.dtype))
                 # under autocast the op casts x to the compute dtype and back, as Linear4bit does
                 or (x.is_floating_point() and ops.autocast_dtype(x) is not None))
            and x.shape[-1] == self.in_features
        )

    def _fused_forward(self, x: torch.Tensor, active: list[str]) -> Optional[torch.Tensor]:
        if any(a in self.lora_magnitude_vector or self.lora_bias[a] for a in active):
            return None
        return qlora_linear(
            x, self.nf4_operand(), self.base_layer.bias, [self.lora_A[a].weight for a in active],
            [self.lora_B[a].weight for a in active], [self.scaling[a] for a in active],
            [self._dropout_p(a) for a in active], getattr(self.base_layer, "compute_dtype", None),
        )

    def __repr__(self) -> str:
        return "lora." + super().__repr__().removeprefix("lora.")


class Linear8bitLt(_QuantizedLinear):
    """LoRA on `bitsandbytes.nn.Linear8bitLt`: PEFT's formula around bitsandbytes' int8 matmul."""

    def _dense_weight(self) -> torch.Tensor:
        return dequantize_bnb_weight(self.get_base_layer())

    def _set_base_weight_data(self, new_w: torch.Tensor) -> None:
        import bitsandbytes as bnb

        warnings.warn("Merging LoRA into an 8-bit linear layer may change generations slightly (rounding).")
        base = self.get_base_layer()
        w = base.weight
        base.weight = bnb.nn.Int8Params(new_w.to("cpu"), requires_grad=False,
                                        has_fp16_weights=getattr(w, "has_fp16_weights", False)).to(w.device)
        if getattr(base, "state", None) is not None and hasattr(base.state, "reset_grads"):
            base.state.reset_grads()
        self._forget_base_weight()

    def _fusable(self, x, args, kwargs) -> bool:
        return False
