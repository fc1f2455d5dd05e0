"""LoRA linear forward/backward with a frozen base weight.

LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021 (arXiv:2106.09685).

    y = x W^T + b + sum_i s_i * (drop_i(x) A_i^T) B_i^T

This file holds the pure-torch references (`*_ref`), which are both the test oracle and
the CPU path. The Triton kernels land beside them (DESIGN.md kernel-file convention).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ._workspace import scratch

Tensor = torch.Tensor


def _w(weight: Tensor, fan_in_fan_out: bool) -> Tensor:
    # [N, K] view of the base weight (GPT-2's Conv1D stores [K, N])
    return weight.t() if fan_in_fan_out else weight


_LEVELS = 65536  # dropout draws 16-bit uniforms: p is quantised to 1/65536


def _drop_levels(p: float) -> int:
    # at least one level is kept, so p close to 1 keeps 1/65536 rather than dividing by zero
    return min(round(p * _LEVELS), _LEVELS - 1)


def dropout_keep_scale(p: float) -> float:
    """1 / keep-probability of `dropout_mask_ref` (exact for the quantised p, so E[out] = x)."""
    return _LEVELS / (_LEVELS - _drop_levels(p))


def dropout_mask_ref(shape, p: float, device) -> tuple[Tensor, float]:
    """Keep mask (uint8 0/1, `shape`) with P(keep) = 1 - p (p quantised to 1/65536) and 1/P(keep).

    Four 16-bit uniforms come from each 64-bit draw, so the mask costs about a third of
    torch's bernoulli dropout on CPU; the mask is 1 byte an element.
    """
    numel = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((numel + 3) // 4,), dtype=torch.int64, device=device)
    lanes = words.view(torch.int16)[:numel]
    # bool and uint8 share a layout; uint8 converts to float ~6x faster than bool does
    mask = (lanes >= _drop_levels(p) - _LEVELS // 2).view(torch.uint8).view(shape)
    return mask, dropout_keep_scale(p)


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
    """Returns y [M, N], xa_i = drop_i(x) A_i^T [M, r_i] and the keep masks (uint8 [M, K] or None).

    drop_i(x) = x * mask_i / P(keep). The dropped copy of x is never kept: backward rebuilds
    it from x and the 1-byte mask.
    The low-rank expand is accumulated into y in place (one pass, no temporaries of [M, N]).
    """
    w = _w(weight, fan_in_fan_out)
    y = torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()
    xas, masks = [], []
    for A, B, s, p in zip(lora_A, lora_B, scaling, dropout_p):
        xl = x if x.dtype == A.dtype else x.to(A.dtype)
        mask = None
        if p > 0.0:
            mask, keep_scale = dropout_mask_ref(xl.shape, p, xl.device)
            xd = scratch("lora_xd", xl.shape, xl.dtype, xl.device)
            xd.copy_(mask).mul_(xl)
            xa = xd @ A.t()
            xa.mul_(keep_scale)  # 1/(1-p) on [M, r] instead of on [M, K]
        else:
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
    masks: Sequence[Optional[Tensor]],  # each uint8 [M, K] or None
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
            g.mul_(dropout_keep_scale(p))
            mf = scratch("lora_mask", xl.shape, xl.dtype, xl.device).copy_(mask)
            if dx is not None:
                ga = torch.mm(g, A, out=scratch("lora_gA", (g.shape[0], A.shape[1]), g.dtype, g.device))
                dx.addcmul_(ga, mf) if ga.dtype == dx.dtype else dx.add_((ga * mf).to(dx.dtype))
            dAs.append(g.t() @ mf.mul_(xl))  # mf now holds x * mask
    return dx, dAs, dBs
