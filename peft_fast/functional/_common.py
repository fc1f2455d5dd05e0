"""Shared pieces of the autograd Functions: base-weight and bias gradients."""
from __future__ import annotations

from typing import Optional

import torch


def base_param_grads(ctx, dy: torch.Tensor, x: torch.Tensor, weight_idx: int, bias_idx: int,
                     fan_in_fan_out: bool, x_scale: Optional[torch.Tensor] = None):
    """dW = dy^T x (transposed for Conv1D's [K, N] storage), db = colsum(dy); None when
    the parameter is frozen (the usual case: only the adapter trains)."""
    dW = db = None
    if ctx.needs_input_grad[weight_idx]:
        xs = x if x_scale is None else x * x_scale
        dW = dy.t() @ xs
        if fan_in_fan_out:
            dW = dW.t()
    if ctx.needs_input_grad[bias_idx]:
        db = dy.sum(0)
    return dW, db
