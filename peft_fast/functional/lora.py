"""Fused LoRA linear: base product and any number of summed adapters in one autograd node.

Forward:  y = x W^T + b + sum_i s_i * (D_i(x) A_i^T) B_i^T,  D_i = dropout with keep mask m_i.
Backward (W may be frozen), with xa_i = D_i(x) A_i^T saved from the forward:
    g_i  = s_i * dy B_i                                  [M, r_i]
    dx   = dy W + sum_i (m_i / (1 - p_i)) * (g_i A_i)     [M, K]
    dA_i = g_i^T D_i(x)                                  [r_i, K]
    dB_i = s_i * dy^T xa_i                               [N, r_i]
    dW   = dy^T x,  db = colsum(dy)                      (only when trainable)
Only x, the 1-byte masks and xa_i are kept: no dropped copy of x, no [M, N] temporaries.

Mixed precision: under `torch.autocast` the op computes in the autocast dtype, as `nn.Linear`
plus PEFT's formula does (output in that dtype; gradients in each input's own dtype, so fp32
adapter weights get fp32 gradients). The base weight's 16-bit copy is not kept for backward:
backward casts the (usually fp32) weight again, which saves N x K 16-bit values per layer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import ops
from ._common import (autocast_scope, base_param_grads, cast_grads, fold_any_tensor_scalings, needs_autograd,
                      to_dtype)


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, fan_in_fan_out, scaling, dropout_p, compute_dtype, *lora_AB):
        n = len(lora_AB) // 2
        ctx.dtypes = [None if t is None else t.dtype for t in (x, weight, bias, *lora_AB)]
        x, w, bias = to_dtype(compute_dtype, x, weight, bias)
        As, Bs = to_dtype(compute_dtype, *lora_AB[:n]), to_dtype(compute_dtype, *lora_AB[n:])
        y, xas, masks = ops.lora_fwd(x, w, bias, As, Bs, scaling, dropout_p, fan_in_fan_out)
        ctx.n, ctx.fan_in_fan_out, ctx.scaling, ctx.dropout_p = n, fan_in_fan_out, scaling, dropout_p
        ctx.compute_dtype = compute_dtype
        ctx.has_mask = [m is not None for m in masks]
        ctx.save_for_backward(x, weight, *As, *Bs, *xas, *[m for m in masks if m is not None])
        return y

    @staticmethod
    def backward(ctx, dy):
        n = ctx.n
        saved = ctx.saved_tensors
        x, (weight,) = saved[0], to_dtype(ctx.compute_dtype, saved[1])
        As, Bs, xas = list(saved[2:2 + n]), list(saved[2 + n:2 + 2 * n]), list(saved[2 + 2 * n:2 + 3 * n])
        it = iter(saved[2 + 3 * n:])
        masks = [next(it) if h else None for h in ctx.has_mask]
        with ops.no_autocast(dy.device.type):
            dy = dy.to(x.dtype).contiguous()
            dx, dAs, dBs = ops.lora_bwd(
                dy, x, weight, As, Bs, ctx.scaling, ctx.dropout_p, xas, masks, ctx.fan_in_fan_out,
                need_dx=ctx.needs_input_grad[0],
            )
            dW, db = base_param_grads(ctx, dy, x, 1, 2, ctx.fan_in_fan_out)
        dx, dW, db, *dAB = cast_grads(ctx.dtypes, dx, dW, db, *dAs, *dBs)
        dAB = [g if ctx.needs_input_grad[7 + i] else None for i, g in enumerate(dAB)]
        return (dx, dW, db, None, None, None, None, *dAB)


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
    (hot-swap preparation): it is folded into its B (fold_tensor_scaling). Under torch.autocast the
    result is in the autocast dtype (as nn.Linear's); otherwise in x's dtype (x and weight share
    it; the adapters may be another dtype, e.g. fp32 adapters on a bf16 model)."""
    lora_B, scaling = fold_any_tensor_scalings(lora_B, scaling)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    cd, scope = autocast_scope(x)
    with scope:
        if not needs_autograd(x, weight, bias, lora_A, lora_B):  # inference (decode): no node, nothing kept
            xc, w, b = to_dtype(cd, x2, weight, bias)
            y = ops.lora_fwd(xc, w, b, to_dtype(cd, *lora_A), to_dtype(cd, *lora_B), scaling, dropout_p,
                             fan_in_fan_out)[0]
        else:
            y = LoraLinearFunction.apply(
                x2, weight, bias, fan_in_fan_out, tuple(scaling), tuple(float(p) for p in dropout_p), cd,
                *lora_A, *lora_B
            )
    return y.view(*lead, y.shape[-1])
