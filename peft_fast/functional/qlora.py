"""Fused QLoRA linear: LoRA on a frozen 4-bit NF4 base weight (Dettmers et al., 2023,
arXiv:2305.14314), any number of summed adapters in one autograd node.

Forward:  y = x dequant(W)^T + b + sum_i s_i * (D_i(x) A_i^T) B_i^T
Backward: as LoRA (functional/lora.py) with W frozen; dequant(W) is rebuilt for dx, never saved:
    g_i = s_i dy B_i,  dx = dy dequant(W) + sum_i (m_i / (1 - p_i)) (g_i A_i),
    dA_i = g_i^T D_i(x),  dB_i = s_i dy^T xa_i,  db = colsum(dy) (when the bias trains).
Saved: x, A_i, B_i, xa_i and the dropout state (1-byte masks on CPU, a seed on GPU).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import ops
from ..triton_kernels.nf4 import NF4Operand
from ._common import fold_any_tensor_scalings, needs_autograd


class QLoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, nf4, bias, scaling, dropout_p, *lora_AB):
        n = len(lora_AB) // 2
        As, Bs = list(lora_AB[:n]), list(lora_AB[n:])
        y, xas, masks = ops.qlora_fwd(x, nf4, bias, As, Bs, scaling, dropout_p)
        ctx.n, ctx.nf4, ctx.scaling, ctx.dropout_p = n, nf4, scaling, dropout_p
        ctx.has_mask = [m is not None for m in masks]
        ctx.save_for_backward(x, *As, *Bs, *xas, *[m for m in masks if m is not None])
        return y

    @staticmethod
    def backward(ctx, dy):
        n = ctx.n
        saved = ctx.saved_tensors
        x = saved[0]
        As, Bs, xas = list(saved[1:1 + n]), list(saved[1 + n:1 + 2 * n]), list(saved[1 + 2 * n:1 + 3 * n])
        it = iter(saved[1 + 3 * n:])
        masks = [next(it) if h else None for h in ctx.has_mask]
        dy = dy.contiguous()
        dx, dAs, dBs = ops.qlora_bwd(dy, x, ctx.nf4, As, Bs, ctx.scaling, ctx.dropout_p, xas, masks,
                                     need_dx=ctx.needs_input_grad[0])
        db = dy.sum(0) if ctx.needs_input_grad[2] else None
        dAs = [g if ctx.needs_input_grad[5 + i] else None for i, g in enumerate(dAs)]
        dBs = [g if ctx.needs_input_grad[5 + n + i] else None for i, g in enumerate(dBs)]
        return (dx, None, db, None, None, *dAs, *dBs)


def qlora_linear(
    x: torch.Tensor,  # [..., K], dtype nf4.dtype
    nf4: NF4Operand,  # W [N, K] in 4 bits
    bias: Optional[torch.Tensor],  # [N]
    lora_A: Sequence[torch.Tensor],  # each [r_i, K]
    lora_B: Sequence[torch.Tensor],  # each [N, r_i]
    scaling: Sequence[float],
    dropout_p: Sequence[float],
) -> torch.Tensor:
    """[..., K] -> [..., N]; dropout_p must be 0 outside training; 0-dim tensor scalings are folded
    into their B (fold_tensor_scaling)."""
    lora_B, scaling = fold_any_tensor_scalings(lora_B, scaling)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not needs_autograd(x, bias, lora_A, lora_B):
        y = ops.qlora_fwd(x2, nf4, bias, lora_A, lora_B, scaling, dropout_p)[0]
    else:
        y = QLoraLinearFunction.apply(x2, nf4, bias, tuple(scaling), tuple(float(p) for p in dropout_p),
                                      *lora_A, *lora_B)
    return y.view(*lead, y.shape[-1])
