"""Fused DoRA linear (one adapter, no dropout on its input).

Forward, with the row norm n = ||W + s B A|| detached as in the paper (Sec. 4.3) and PEFT:
    ypre = x W^T + s (x A^T) B^T,   c = m / n,   y = c * ypre + b
Backward (n constant):
    dyc = dy * c
    dx  = dyc W + s (dyc B) A
    dA  = s (dyc B)^T x,   dB = s dyc^T (x A^T),   dm = colsum(dy * ypre) / n
The norm comes from the factored form (ops.dora_weight_norm), never from W + sBA.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ._common import base_param_grads, fold_tensor_scaling, needs_autograd


class DoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, fan_in_fan_out):
        y, xa, ypre = ops.dora_fwd(
            x, weight, bias, lora_A, lora_B, scaling, magnitude, weight_norm, fan_in_fan_out, keep_pre=True
        )
        ctx.scaling, ctx.fan_in_fan_out = scaling, fan_in_fan_out
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, weight_norm, xa, ypre)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, A, B, m, n, xa, ypre = ctx.saved_tensors
        dy = dy.contiguous()
        dx, dA, dB, dm = ops.dora_bwd(
            dy, x, weight, A, B, ctx.scaling, m, n, xa, ypre, ctx.fan_in_fan_out, need_dx=ctx.needs_input_grad[0]
        )
        dW, db = base_param_grads(ctx, dy, x, 1, 2, ctx.fan_in_fan_out)
        if dW is not None:  # W also scales by c: dW_n = c_n * (dy^T x)_n (norm still detached)
            c = (m / n).to(dW.dtype)
            dW = dW * (c[None, :] if ctx.fan_in_fan_out else c[:, None])
        return dx, dW, db, dA, dB, dm, None, None, None


def dora_linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K] ([K, N] if fan_in_fan_out)
    bias: Optional[torch.Tensor],  # [N]
    lora_A: torch.Tensor,  # [r, K]
    lora_B: torch.Tensor,  # [N, r]
    magnitude: torch.Tensor,  # [N]
    weight_norm: torch.Tensor,  # [N], detached
    scaling: float,  # or a 0-dim tensor
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    lora_B, scaling = fold_tensor_scaling(lora_B, scaling)  # a 0-dim tensor scaling (hot-swap) goes into B
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not needs_autograd(x, lora_A, lora_B, magnitude, weight, bias):
        # inference: scale in place, keep nothing for backward
        y, _, _ = ops.dora_fwd(x2, weight, bias, lora_A, lora_B, scaling, magnitude, weight_norm, fan_in_fan_out, keep_pre=False)
    else:
        y = DoraLinearFunction.apply(x2, weight, bias, lora_A, lora_B, magnitude, weight_norm.detach(), scaling, fan_in_fan_out)
    return y.view(*lead, y.shape[-1])
