"""LoRA linear forward/backward with a frozen base weight.

LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021 (arXiv:2106.09685).

    y = x W^T + b + sum_i s_i * (drop_i(x) A_i^T) B_i^T

This file holds the pure-torch references (`*_ref`), which are both the test oracle and
the CPU path. The Triton kernels land beside them (DESIGN.md kernel-file convention).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

Tensor = torch.Tensor


def _w(weight: Tensor, fan_in_fan_out: bool) -> Tensor:
    # [N, K] view of the base weight (GPT-2's Conv1D stores [K, N])
    return weight.t() if fan_in_fan_out else weight


def lora_fwd_ref(
    x: Tensor,  # [M, K]
    weight: Tensor,  # [N, K] ([K, N] if fan_in_fan_out)
    bias: Optional[Tensor],  # [N]
    lora_A: Sequence[Tensor],  # each [r_i, K]
    lora_B: Sequence[Tensor],  # each [N, r_i]
    scaling: Sequence[float],
    dropout_p: Sequence[float],
    fan_in_fan_out: bool = False,
) -> tuple[Tensor, list[Tensor], list[Optional[Tensor]]]:
    """Returns y [M, N], xa_i = drop_i(x) A_i^T [M, r_i] and the keep masks (bool [M, K] or None).

    The dropped copy of x is never kept: backward rebuilds it from x and the 1-byte mask.
    The low-rank expand is accumulated into y in place (one pass, no temporaries of [M, N]).
    """
    w = _w(weight, fan_in_fan_out)
    y = torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()
    xas, masks = [], []
    for A, B, s, p in zip(lora_A, lora_B, scaling, dropout_p):
        xl = x if x.dtype == A.dtype else x.to(A.dtype)
        mask = None
        if p > 0.0:
            xl, mask = torch.native_dropout(xl, p, True)
        xa = xl @ A.t()
        if B.dtype == y.dtype:
            y.addmm_(xa, B.t(), alpha=s)
        else:
            y.add_((xa @ B.t()).to(y.dtype), alpha=s)
        xas.append(xa)
        masks.append(mask)
    return y, xas, masks


def lora_bwd_ref(
    dy: Tensor,  # [M, N]
    x: Tensor,  # [M, K]
    weight: Tensor,  # [N, K] ([K, N] if fan_in_fan_out)
    lora_A: Sequence[Tensor],  # each [r_i, K]
    lora_B: Sequence[Tensor],  # each [N, r_i]
    scaling: Sequence[float],
    dropout_p: Sequence[float],
    xas: Sequence[Tensor],  # each [M, r_i]
    masks: Sequence[Optional[Tensor]],  # each bool [M, K] or None
    fan_in_fan_out: bool = False,
    need_dx: bool = True,
) -> tuple[Optional[Tensor], list[Tensor], list[Tensor]]:
    """Gradients with W frozen: g_i = s_i dy B_i; dx = dy W + sum_i mask_i/(1-p_i) * (g_i A_i);
    dA_i = g_i^T drop_i(x); dB_i = s_i dy^T xa_i. Returns (dx [M, K], [dA_i], [dB_i])."""
    w = _w(weight, fan_in_fan_out)
    dx = dy @ w if need_dx else None
    dAs, dBs = [], []
    for A, B, s, p, xa, mask in zip(lora_A, lora_B, scaling, dropout_p, xas, masks):
        dyl = dy if dy.dtype == B.dtype else dy.to(B.dtype)
        g = (dyl @ B).mul_(s)  # [M, r]
        dBs.append((dyl.t() @ xa).mul_(s))
        xl = x if x.dtype == A.dtype else x.to(A.dtype)
        if mask is None:
            dAs.append(g.t() @ xl)
            if dx is not None:
                if A.dtype == dx.dtype:
                    dx.addmm_(g, A)
                else:
                    dx.add_((g @ A).to(dx.dtype))
        else:
            keep = 1.0 / (1.0 - p)
            dAs.append((g.t() @ (xl * mask)).mul_(keep))
            if dx is not None:
                t = (g @ A).mul_(mask)
                dx.add_(t.to(dx.dtype), alpha=keep)
    return dx, dAs, dBs
