"""Fused LoRA linear: base product and any number of summed adapters in one autograd node.

Forward:  y = x W^T + b + sum_i s_i * (D_i(x) A_i^T) B_i^T,  D_i = dropout with keep mask m_i.
Backward (W may be frozen), with xa_i = D_i(x) A_i^T saved from the forward:
    g_i  = s_i * dy B_i                                  [M, r_i]
    dx   = dy W + sum_i (m_i / (1 - p_i)) * (g_i A_i)     [M, K]
    dA_i = g_i^T D_i(x)                                  [r_i, K]
    dB_i = s_i * dy^T xa_i                               [N, r_i]
    dW   = dy^T x,  db = colsum(dy)                      (only when trainable)
Only x, the 1-byte masks and xa_i are kept: no dropped copy of x, no [M, N] temporaries.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import ops
from ._common import base_param_grads, fold_any_tensor_scalings, needs_autograd


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, fan_in_fan_out, scaling, dropout_p, *lora_AB):
        n = len(lora_AB) // 2
        As, Bs = list(lora_AB[:n]), list(lora_AB[n:])
        y, xas, masks = ops.lora_fwd(x, weight, bias, As, Bs, scaling, dropout_p, fan_in_fan_out)
        ctx.n, ctx.fan_in_fan_out, ctx.scaling, ctx.dropout_p = n, fan_in_fan_out, scaling, dropout_p
        ctx.has_mask = [m is not None for m in masks]
        ctx.save_for_backward(x, weight, *As, *Bs, *xas, *[m for m in masks if m is not None])
        return y

    @staticmethod
    def backward(ctx, dy):
        n = ctx.n
        saved = ctx.saved_tensors
        x, weight = saved[0], saved[1]
        As, Bs, xas = list(saved[2:2 + n]), list(saved[2 + n:2 + 2 * n]), list(saved[2 + 2 * n:2 + 3 * n])
        it = iter(saved[2 + 3 * n:])
        masks = [next(it) if h else None for h in ctx.has_mask]
        dy = dy.contiguous()
        dx, dAs, dBs = ops.lora_bwd(
            dy, x, weight, As, Bs, ctx.scaling, ctx.dropout_p, xas, masks, ctx.fan_in_fan_out,
            need_dx=ctx.needs_input_grad[0],
        )
        dW, db = base_param_grads(ctx, dy, x, 1, 2, ctx.fan_in_fan_out)
        dAs = [g if ctx.needs_input_grad[6 + i] else None for i, g in enumerate(dAs)]
        dBs = [g if ctx.needs_input_grad[6 + n + i] else None for i, g in enumerate(dBs)]
        return (dx, dW, db, None, None, None, *dAs, *dBs)


def lora_linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K] ([K, N] if fan_in_fan_out)
    bias: Optional[torch.Tensor],  # [N]
    lora_A: Sequence[torch.Tensor],  # each [r_i, K]
    lora_B: Sequence[torch.Tensor],  # each [N, r_i]
    scaling: Sequence[float],  # floats, or 0-dim tensors
    dropout_p: Sequence[float],
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """[..., K] -> [..., N]; dropout_p must be 0 outside training. A scaling may be a 0-dim tensor
    (hot-swap preparation): it is folded into its B (fold_tensor_scaling)."""
    lora_B, scaling = fold_any_tensor_scalings(lora_B, scaling)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not needs_autograd(x, weight, bias, lora_A, lora_B):  # inference (decode): no node, nothing kept
        y = ops.lora_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out)[0]
    else:
        y = LoraLinearFunction.apply(
            x2, weight, bias, fan_in_fan_out, tuple(scaling), tuple(float(p) for p in dropout_p), *lora_A, *lora_B
        )
    return y.view(*lead, y.shape[-1])
