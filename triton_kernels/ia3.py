"""(IA)^3 linear forward/backward with a frozen base weight.

(IA)^3: Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning", NeurIPS 2022 (arXiv:2205.05638).

    output-feature layers:  y = (x W^T + b) * l        (l [N])
    feed-forward layers:    y = (x * l) W^T + b        (l [K]) = x (W diag(l))^T + b

The feed-forward form scales the [N, K] weight instead of the [M, K] activations.
Pure-torch references (`*_ref`): test oracle and CPU path.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._workspace import colsum_mul

Tensor = torch.Tensor


def ia3_fwd_ref(
    x: Tensor,  # [M, K]
    weight: Tensor,  # [N, K] ([K, N] if fan_in_fan_out)
    bias: Optional[Tensor],  # [N]
    ia3_l: Tensor,  # [K] if is_feedforward else [N]
    is_feedforward: bool,
    fan_in_fan_out: bool = False,
    keep_base: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """Returns y [M, N] and, for output-feature layers with keep_base, the unscaled
    output x W^T + b [M, N] that the gradient of l needs."""
    w = weight.t() if fan_in_fan_out else weight
    l = ia3_l.to(x.dtype)
    if is_feedforward:
        ws = w * l  # [N, K], columns scaled
        y = torch.addmm(bias, x, ws.t()) if bias is not None else x @ ws.t()
        return y, None
    base = torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()
    if keep_base:
        return base * l, base
    return base.mul_(l), None


def ia3_bwd_ref(
    dy: Tensor,  # [M, N]
    x: Tensor,  # [M, K]
    weight: Tensor,  # [N, K] ([K, N] if fan_in_fan_out)
    ia3_l: Tensor,  # [K] or [N]
    is_feedforward: bool,
    base: Optional[Tensor],  # [M, N] unscaled output (output-feature layers)
    fan_in_fan_out: bool = False,
    need_dx: bool = True,
) -> tuple[Optional[Tensor], Tensor]:
    """Output-feature: dx = dy (diag(l) W), dl = colsum(dy * base).
    Feed-forward: t = dy W, dx = t * l, dl = colsum(t * x). Returns (dx, dl)."""
    w = weight.t() if fan_in_fan_out else weight
    l = ia3_l.to(dy.dtype)
    if is_feedforward:
        t = dy @ w  # [M, K]
        dl = colsum_mul(t, x, "ia3_prod")
        dx = t.mul_(l) if need_dx else None
        return dx, dl
    dl = colsum_mul(dy, base, "ia3_prod")
    dx = dy @ (w * l[:, None]) if need_dx else None
    return dx, dl
