"""Fused DoRA linear (one adapter, no dropout on its input).

Forward, with the row norm n = ||W + s B A|| detached as in the paper (Sec. 4.3) and PEFT:
    ypre = x W^T + s (x A^T) B^T,   c = m / n,   y = c * ypre + b
Backward (n constant):
    dyc = dy * c
    dx  = dyc W + s (dyc B) A
    dA  = s (dyc B)^T x,   dB = s dyc^T (x A^T),   dm = colsum(dy * ypre) / n
The norm comes from the factored form (ops.dora_weight_norm), never from W + sBA.
Under torch.autocast, x, W, b, A and B are cast to the autocast dtype (as nn.Linear's and PEFT's
matmuls are) while m and n stay fp32 (PEFT's elementwise DoRA scale is not autocast); gradients
come back in each input's dtype. As in functional/lora.py, W's 16-bit copy is not saved.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ._common import autocast_scope, base_param_grads, cast_grads, fold_tensor_scaling, needs_autograd, to_dtype


class DoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, fan_in_fan_out,
                compute_dtype=None):
        ctx.dtypes = [None if t is None else t.dtype for t in (x, weight, bias, lora_A, lora_B)]
        ctx.compute_dtype = compute_dtype
        x, w, bias, lora_A, lora_B = to_dtype(compute_dtype, x, weight, bias, lora_A, lora_B)
        y, xa, ypre = ops.dora_fwd(
            x, w, bias, lora_A, lora_B, scaling, magnitude, weight_norm, fan_in_fan_out, keep_pre=True
        )
        ctx.scaling, ctx.fan_in_fan_out = scaling, fan_in_fan_out
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, weight_norm, xa, ypre)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, A, B, m, n, xa, ypre = ctx.saved_tensors
        (weight,) = to_dtype(ctx.compute_dtype, weight)
        with ops.no_autocast(dy.device.type):
            dy = dy.to(x.dtype).contiguous()
            dx, dA, dB, dm = ops.dora_bwd(
                dy, x, weight, A, B, ctx.scaling, m, n, xa, ypre, ctx.fan_in_fan_out, need_dx=ctx.needs_input_grad[0]
            )
            dW, db = base_param_grads(ctx, dy, x, 1, 2, ctx.fan_in_fan_out)
            if dW is not None:  # W also scales by c: dW_n = c_n * (dy^T x)_n (norm still detached)
                c = (m / n).to(dW.dtype)
                dW = dW * (c[None, :] if ctx.fan_in_fan_out else c[:, None])
        dx, dW, db, dA, dB = cast_grads(ctx.dtypes, dx, dW, db, dA, dB)
        return dx, dW, db, dA, dB, dm.to(m.dtype), None, None, None, None


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
    cd, scope = autocast_scope(x)
    with scope:
        if not needs_autograd(x, lora_A, lora_B, magnitude, weight, bias):
            # inference: scale in place, keep nothing for backward
            xc, w, b, A, B = to_dtype(cd, x2, weight, bias, lora_A, lora_B)
            y, _, _ = ops.dora_fwd(xc, w, b, A, B, scaling, magnitude, weight_norm, fan_in_fan_out, keep_pre=False)
        else:
            y = DoraLinearFunction.apply(x2, weight, bias, lora_A, lora_B, magnitude, weight_norm.detach(), scaling,
                                         fan_in_fan_out, cd)
    return y.view(*lead, y.shape[-1])
