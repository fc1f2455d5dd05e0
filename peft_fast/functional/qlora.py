"""Fused QLoRA linear: LoRA on a frozen 4-bit NF4 base weight (Dettmers et al., 2023,
arXiv:2305.14314), any number of summed adapters in one autograd node.

Forward:  y = x dequant(W)^T + b + sum_i s_i * (D_i(x) A_i^T) B_i^T
Backward: as LoRA (functional/lora.py) with W frozen; dequant(W) is rebuilt for dx, never saved:
    g_i = s_i dy B_i,  dx = dy dequant(W) + sum_i (m_i / (1 - p_i)) (g_i A_i),
    dA_i = g_i^T D_i(x),  dB_i = s_i dy^T xa_i,  db = colsum(dy) (when the bias trains).
Saved: x, A_i, B_i, xa_i and the dropout state (1-byte masks on CPU, a seed on GPU).
Precision follows bitsandbytes' Linear4bit under PEFT: x is cast to the layer's compute dtype,
the 4-bit GEMM runs in it (W decoded straight into it) and the result comes back in x's dtype
(`matmul_4bit(x.to(compute_dtype), ...).to(inp_dtype)`). torch.autocast does not lower it:
bitsandbytes >= 0.46 runs the 4-bit matmul as a custom op that autocast passes through. The
adapters compute in their own dtype (fp32 adapters: fp32 terms and gradients) on the same cast x
(one read of x serves both; PEFT's adapters see x under autocast instead: the same values unless
the compute dtype is coarser than the autocast dtype, e.g. bf16 compute under fp16 autocast).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import ops
from ..triton_kernels.nf4 import NF4Operand
from ._common import autocast_scope, cast_grads, fold_any_tensor_scalings, needs_autograd, to_dtype


class QLoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, nf4, bias, scaling, dropout_p, compute_dtype, *lora_AB):
        n = len(lora_AB) // 2
        ctx.dtypes = [None if t is None else t.dtype for t in (x, bias, *lora_AB)]
        x, bias = to_dtype(compute_dtype, x, bias)
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
        with ops.no_autocast(dy.device.type):
            dy = dy.to(x.dtype).contiguous()
            dx, dAs, dBs = ops.qlora_bwd(dy, x, ctx.nf4, As, Bs, ctx.scaling, ctx.dropout_p, xas, masks,
                                         need_dx=ctx.needs_input_grad[0])
            db = dy.sum(0) if ctx.needs_input_grad[2] else None
        dx, db, *dAB = cast_grads(ctx.dtypes, dx, db, *dAs, *dBs)
        dAB = [g if ctx.needs_input_grad[6 + i] else None for i, g in enumerate(dAB)]
        return (dx, None, db, None, None, None, *dAB)


def qlora_linear(
    x: torch.Tensor,  # [..., K], any floating dtype
    nf4: NF4Operand,  # W [N, K] in 4 bits
    bias: Optional[torch.Tensor],  # [N]
    lora_A: Sequence[torch.Tensor],  # each [r_i, K]
    lora_B: Sequence[torch.Tensor],  # each [N, r_i]
    scaling: Sequence[float],
    dropout_p: Sequence[float],
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """[..., K] -> [..., N] in x's dtype; the base GEMM runs in `compute_dtype` (bitsandbytes'
    `Linear4bit.compute_dtype`; default nf4.dtype), also under torch.autocast (see the module
    docstring). dropout_p must be 0 outside training; 0-dim tensor scalings are folded into their B
    (fold_tensor_scaling)."""
    lora_B, scaling = fold_any_tensor_scalings(lora_B, scaling)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    cd = nf4.dtype if compute_dtype is None else compute_dtype
    if nf4.dtype != cd:
        nf4 = nf4._replace(dtype=cd)  # decode W straight into the compute dtype
    cast = cd if x.dtype != cd or (bias is not None and bias.dtype != cd) else None
    _, scope = autocast_scope(x)
    with scope:
        if not needs_autograd(x, bias, lora_A, lora_B):
            xc, b = to_dtype(cast, x2, bias)
            y = ops.qlora_fwd(xc, nf4, b, lora_A, lora_B, scaling, dropout_p)[0]
        else:
            y = QLoraLinearFunction.apply(x2, nf4, bias, tuple(scaling), tuple(float(p) for p in dropout_p), cast,
                                          *lora_A, *lora_B)
    return y.view(*lead, y.shape[-1]).to(x.dtype)
