"""Layer L1: the one place that picks a backend for each fused op.

CUDA tensors go to the Triton kernels (once present), CPU tensors to the pure-torch
references; `TRITON_INTERPRET=1` sends CPU tensors through Triton (tests), and
`PEFT_FAST_BACKEND=torch` forces the references everywhere (debugging, A/B).
Layers above never import Triton: they call these functions.
"""
from __future__ import annotations

import os

import torch

from .triton_kernels import dora as _dora
from .triton_kernels import ia3 as _ia3
from .triton_kernels import lora as _lora

_VALID = ("auto", "torch", "triton")


def backend_for(t: torch.Tensor) -> str:
    """'torch' or 'triton' for the tensors of one call."""
    forced = os.environ.get("PEFT_FAST_BACKEND", "auto").lower()
    if forced not in _VALID:
        raise ValueError(f"PEFT_FAST_BACKEND={forced!r} is not one of {_VALID}")
    if forced != "auto":
        return forced
    # No Triton kernel has landed yet: every device takes the reference path.
    return "torch"


def lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out=False):
    return _lora.lora_fwd_ref(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out)


def lora_bwd(dy, x, weight, lora_A, lora_B, scaling, dropout_p, xas, masks, fan_in_fan_out=False, need_dx=True):
    return _lora.lora_bwd_ref(dy, x, weight, lora_A, lora_B, scaling, dropout_p, xas, masks, fan_in_fan_out, need_dx)


def dora_weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out=False, weight_sqnorm=None):
    return _dora.dora_weight_norm_ref(weight, lora_A, lora_B, scaling, fan_in_fan_out, weight_sqnorm)


def dora_fwd(x, weight, bias, lora_A, lora_B, scaling, magnitude, weight_norm, fan_in_fan_out=False, keep_pre=True):
    return _dora.dora_fwd_ref(x, weight, bias, lora_A, lora_B, scaling, magnitude, weight_norm, fan_in_fan_out, keep_pre)


def dora_bwd(dy, x, weight, lora_A, lora_B, scaling, magnitude, weight_norm, xa, ypre, fan_in_fan_out=False, need_dx=True):
    return _dora.dora_bwd_ref(
        dy, x, weight, lora_A, lora_B, scaling, magnitude, weight_norm, xa, ypre, fan_in_fan_out, need_dx
    )


def ia3_fwd(x, weight, bias, ia3_l, is_feedforward, fan_in_fan_out=False, keep_base=True):
    return _ia3.ia3_fwd_ref(x, weight, bias, ia3_l, is_feedforward, fan_in_fan_out, keep_base)


def ia3_bwd(dy, x, weight, ia3_l, is_feedforward, base, fan_in_fan_out=False, need_dx=True):
    return _ia3.ia3_bwd_ref(dy, x, weight, ia3_l, is_feedforward, base, fan_in_fan_out, need_dx)
