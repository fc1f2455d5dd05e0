"""Fused (IA)^3 linear.

Output-feature layers:  y = (x W^T + b) * l
    dx = dy diag(l) W,   dl = colsum(dy * (x W^T + b))
Feed-forward layers:    y = (x * l) W^T + b = x (W diag(l))^T + b
    t = dy W,  dx = t * l,   dl = colsum(t * x)
Under torch.autocast, x, W and b are cast to the autocast dtype (PEFT's base layer runs under
autocast); l keeps its dtype and its gradient comes back in it. W's 16-bit copy is not saved.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ._common import autocast_scope, base_param_grads, cast_grads, needs_autograd, to_dtype


class IA3LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, ia3_l, is_feedforward, fan_in_fan_out, compute_dtype=None):
        ctx.dtypes = [None if t is None else t.dtype for t in (x, weight, bias)]
        ctx.compute_dtype = compute_dtype
        x, w, bias = to_dtype(compute_dtype, x, weight, bias)
        y, base = ops.ia3_fwd(x, w, bias, ia3_l, is_feedforward, fan_in_fan_out, keep_base=not is_feedforward)
        ctx.is_feedforward, ctx.fan_in_fan_out = is_feedforward, fan_in_fan_out
        ctx.save_for_backward(x, weight, ia3_l, base)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, l, base = ctx.saved_tensors
        (weight,) = to_dtype(ctx.compute_dtype, weight)
        with ops.no_autocast(dy.device.type):
            dy = dy.to(x.dtype).contiguous()
            dx, dl = ops.ia3_bwd(dy, x, weight, l, ctx.is_feedforward, base, ctx.fan_in_fan_out,
                                 need_dx=ctx.needs_input_grad[0])
            ff = ctx.is_feedforward
            # dW/db: y depends on W through x*l (ff) or on W, b through (xW^T + b)*l
            dys = dy if ff else dy * l.to(dy.dtype)
            dW, db = base_param_grads(ctx, dys, x, 1, 2, ctx.fan_in_fan_out, x_scale=l.to(x.dtype) if ff else None)
        dx, dW, db = cast_grads(ctx.dtypes, dx, dW, db)
        return dx, dW, db, dl.to(l.dtype) if ctx.needs_input_grad[3] else None, None, None, None


def ia3_linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K] ([K, N] if fan_in_fan_out)
    bias: Optional[torch.Tensor],  # [N]
    ia3_l: torch.Tensor,  # [K] if is_feedforward else [N]
    is_feedforward: bool,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    cd, scope = autocast_scope(x)
    with scope:
        if not needs_autograd(x, ia3_l, weight, bias):
            xc, w, b = to_dtype(cd, x2, weight, bias)
            y, _ = ops.ia3_fwd(xc, w, b, ia3_l, is_feedforward, fan_in_fan_out, keep_base=False)
        else:
            y = IA3LinearFunction.apply(x2, weight, bias, ia3_l, is_feedforward, fan_in_fan_out, cd)
    return y.view(*lead, y.shape[-1])
