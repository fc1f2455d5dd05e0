"""DoRA linear forward/backward with a frozen base weight.

DoRA: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024 (arXiv:2402.09353).

    n = ||W + s B A||_row   (detached, Sec. 4.3 of the paper)
    y = (m / n) * (x W^T + s (x A^T) B^T) + b

The row norm uses the factored form, never W + sBA nor an identity matrix:
    n^2 = ||W||^2_row + 2 s rowdot(W A^T, B) + s^2 rowdot(B (A A^T), B)
Pure-torch references (`*_ref`): test oracle and CPU path.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._workspace import colsum_mul, scratch

Tensor = torch.Tensor


def dora_weight_norm_ref(
    weight: Tensor,  # [N, K] ([K, N] if fan_in_fan_out)
    lora_A: Tensor,  # [r, K]
    lora_B: Tensor,  # [N, r]
    scaling: float,
    fan_in_fan_out: bool = False,
    weight_sqnorm: Optional[Tensor] = None,  # [N] cached ||W||^2_row, fp32
) -> Tensor:
    """||W + s B A|| per output row, [N], computed and returned in fp32 (it divides the
    magnitude, so rounding it to a 16-bit base dtype would cost accuracy)."""
    w = weight.t() if fan_in_fan_out else weight
    A = lora_A.detach().float()
    B = lora_B.detach().float()
    if weight_sqnorm is None:
        weight_sqnorm = w.float().pow(2).sum(1)
    wa = w.float() @ A.t() if w.dtype != torch.float32 else w @ A.t()  # [N, r]
    bta = B @ (A @ A.t())  # [N, r]
    sq = weight_sqnorm + (2.0 * scaling) * (wa * B).sum(1) + (scaling * scaling) * (bta * B).sum(1)
    return sq.clamp_min_(0.0).sqrt_()


def dora_fwd_ref(
    x: Tensor,  # [M, K]
    weight: Tensor,  # [N, K] ([K, N] if fan_in_fan_out)
    bias: Optional[Tensor],  # [N]
    lora_A: Tensor,  # [r, K]
    lora_B: Tensor,  # [N, r]
    scaling: float,
    magnitude: Tensor,  # [N]
    weight_norm: Tensor,  # [N], detached
    fan_in_fan_out: bool = False,
    keep_pre: bool = True,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Returns y [M, N], xa = x A^T [M, r] and, if keep_pre, the unscaled output
    ypre = x W^T + s xa B^T [M, N] that the magnitude gradient needs."""
    w = weight.t() if fan_in_fan_out else weight
    xl = x if x.dtype == lora_A.dtype else x.to(lora_A.dtype)
    xa = xl @ lora_A.t()
    ypre = x @ w.t()
    if lora_B.dtype == ypre.dtype:
        ypre.addmm_(xa, lora_B.t(), alpha=scaling)
    else:
        ypre.add_((xa @ lora_B.t()).to(ypre.dtype), alpha=scaling)
    c = magnitude.float() / weight_norm.float()
    if c.dtype != ypre.dtype:  # 16-bit base: scale in fp32, round once (as PEFT's fp32 adapter path)
        y = ypre.float().mul_(c)
        if bias is not None:
            y.add_(bias)
        return y.to(ypre.dtype), xa, (ypre if keep_pre else None)
    if keep_pre:
        y = torch.addcmul(bias, ypre, c) if bias is not None else ypre * c
    else:
        y = ypre.mul_(c)
        if bias is not None:
            y.add_(bias)
        ypre = None
    return y, xa, ypre


def dora_bwd_ref(
    dy: Tensor,  # [M, N]
    x: Tensor,  # [M, K]
    weight: Tensor,  # [N, K] ([K, N] if fan_in_fan_out)
    lora_A: Tensor,  # [r, K]
    lora_B: Tensor,  # [N, r]
    scaling: float,
    magnitude: Tensor,  # [N]
    weight_norm: Tensor,  # [N]
    xa: Tensor,  # [M, r]
    ypre: Tensor,  # [M, N]
    fan_in_fan_out: bool = False,
    need_dx: bool = True,
) -> tuple[Optional[Tensor], Tensor, Tensor, Tensor]:
    """With c = m/n (n detached): dyc = dy*c; dx = dyc W + s (dyc B) A; dA = s (dyc B)^T x;
    dB = s dyc^T xa; dm = colsum(dy * ypre) / n. Returns (dx, dA, dB, dm)."""
    w = weight.t() if fan_in_fan_out else weight
    c = (magnitude / weight_norm).to(dy.dtype)
    dm = (colsum_mul(dy, ypre, "dora_prod") / weight_norm).to(magnitude.dtype)
    dyc = torch.mul(dy, c, out=scratch("dora_prod", dy.shape, dy.dtype, dy.device))
    dx = dyc @ w if need_dx else None
    dyl = dyc if dyc.dtype == lora_B.dtype else dyc.to(lora_B.dtype)
    g = (dyl @ lora_B).mul_(scaling)  # [M, r]
    dB = (dyl.t() @ xa).mul_(scaling)
    xl = x if x.dtype == lora_A.dtype else x.to(lora_A.dtype)
    dA = g.t() @ xl
    if dx is not None:
        if lora_A.dtype == dx.dtype:
            dx.addmm_(g, lora_A)
        else:
            dx.add_((g @ lora_A).to(dx.dtype))
    return dx, dA, dB, dm


# ----------------------------------------------------------------------------------------------
# Triton: the factored row norm in one pass over W (read in its own dtype, fp32 accumulation,
# no fp32 copy of W): acc_wa = W A^T and ||W||^2 per row, then the two row dots in the epilogue.
# ----------------------------------------------------------------------------------------------
from ._triton import HAS_TRITON, interpreting, next_pow2, target_pruner, tl, triton  # noqa: E402
from .lora import table_configs  # noqa: E402


# Launch configs, as lora.py's tables: (BN, BK, num_warps, num_stages, largest BR, shared memory in
# KB up to that BR with a 16-bit W, with an fp32 W), per dot kind ("16": W and A in one 16-bit
# dtype, tensor-core dot; "32": the exact fp32 dot). Measured for sm_80/86/89/90/120 with ptxas
# (triton 3.9, and 3.6 for sm_80/86/90/120): no spills within each row's BR. The [BN, BR] fp32 accumulator and the [BK, BR]
# A tile grow with the rank, so BR = 128..256 keeps to BN * BK <= 512 (the previous (64, 64) and
# (32, 128) tiles spilled 14-88 KB per thread at r = 256).
_NORM_TABLE = {
    "16": [(16, 32, 4, 3, 256, 34, 34), (16, 64, 4, 3, 256, 68, 68), (32, 32, 4, 3, 128, 20, 20),
           (32, 64, 4, 3, 128, 40, 40), (64, 32, 8, 3, 128, 32, 32), (64, 128, 8, 3, 64, 80, 80)],
    "32": [(16, 32, 8, 3, 256, 68, 68), (32, 16, 8, 3, 256, 36, 36), (32, 32, 8, 3, 256, 72, 72),
           (16, 16, 4, 3, 256, 34, 34), (16, 32, 4, 3, 128, 36, 36), (64, 32, 8, 3, 128, 48, 48),
           (16, 64, 4, 3, 64, 40, 40), (32, 32, 4, 3, 64, 24, 24)],
}


def get_dora_norm_configs(cc=None, args=None):
    """Configs of _dora_norm_kernel (see _triton.py: per-target launch configs)."""
    if interpreting():
        return [triton.Config({"BN": 16, "BK": 32}, num_warps=4)]
    return table_configs(_NORM_TABLE, ("BN", "BK"), cc, args, lambda a: "16" if a.get("DOT16") else "32", "w_ptr")


if HAS_TRITON:

    @triton.autotune(configs=get_dora_norm_configs(), key=["N", "K", "BR", "DOT16"],
                     prune_configs_by={"early_config_prune": target_pruner(get_dora_norm_configs)})
    @triton.jit
    def _dora_norm_kernel(
        # pointers: W [N, K] (strided), A [r, K], B [N, r], BAA = B (A A^T) [N, r] fp32, sqnorm [N] fp32, out [N]
        w_ptr, a_ptr, b_ptr, baa_ptr, sq_ptr, out_ptr,
        # sizes
        N, K, R,
        # strides
        swn, swk, sar, sak, sbn, sbr, scn, scr,
        scaling,
        # meta
        HAS_SQ: tl.constexpr, DOT16: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rr = tl.arange(0, BR)
        n_ok, r_ok = rn < N, rr < R
        # 64-bit offsets into W: N x swn (K x swk when fan_in_fan_out) can pass 2^31 elements
        rn64 = rn.to(tl.int64)
        w_rows = w_ptr + rn64[:, None] * swn
        acc_wa = tl.zeros((BN, BR), dtype=tl.float32)
        acc_sq = tl.zeros((BN,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            wt = tl.load(w_rows + rk.to(tl.int64)[None, :] * swk, mask=n_ok[:, None] & (rk[None, :] < K), other=0.0)
            at = tl.load(a_ptr + rk[:, None] * sak + rr[None, :] * sar, mask=(rk[:, None] < K) & r_ok[None, :],
                         other=0.0)
            if DOT16:
                # W and A in the same 16-bit dtype: their products are exact in fp32 and the tensor
                # core accumulates in fp32, so the 16-bit mma is as accurate as an fp32 dot
                acc_wa = tl.dot(wt, at, acc=acc_wa)
            else:
                # fp32 (or mixed-dtype) W, A: an exact fp32 dot by design, never TF32 whatever
                # torch's TF32 switch says: the norm divides the magnitude m / ||W + sBA||, so its
                # error goes straight into every output, and the dot is a small part of one pass
                # over W (which is what this kernel spends its time on)
                acc_wa = tl.dot(wt.to(tl.float32), at.to(tl.float32), acc=acc_wa, input_precision="ieee")
            if not HAS_SQ:
                wf = wt.to(tl.float32)
                acc_sq += tl.sum(wf * wf, axis=1)
        if HAS_SQ:
            acc_sq = tl.load(sq_ptr + rn, mask=n_ok, other=0.0)
        bt = tl.load(b_ptr + rn64[:, None] * sbn + rr[None, :] * sbr, mask=n_ok[:, None] & r_ok[None, :],
                     other=0.0).to(tl.float32)
        ct = tl.load(baa_ptr + rn64[:, None] * scn + rr[None, :] * scr, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        sq = acc_sq + 2.0 * scaling * tl.sum(acc_wa * bt, axis=1) + scaling * scaling * tl.sum(ct * bt, axis=1)
        tl.store(out_ptr + rn, tl.sqrt(tl.maximum(sq, 0.0)), mask=n_ok)


def dora_weight_norm(
    weight: Tensor,  # [N, K] ([K, N] if fan_in_fan_out)
    lora_A: Tensor,  # [r, K]
    lora_B: Tensor,  # [N, r]
    scaling: float,
    fan_in_fan_out: bool = False,
    weight_sqnorm: Optional[Tensor] = None,  # [N] fp32
) -> Tensor:
    """Triton launcher with the signature of `dora_weight_norm_ref` (fp32 [N])."""
    if not HAS_TRITON:
        raise RuntimeError("dora_weight_norm needs triton; install it or set PEFT_FAST_BACKEND=torch")
    w = weight.t() if fan_in_fan_out else weight
    N, K = w.shape
    A = lora_A.detach()
    B = lora_B.detach()
    R = A.shape[0]
    if A.shape[1] != K or B.shape != (N, R):
        raise ValueError(f"dora_weight_norm: W {tuple(w.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)} do not fit")
    if R > 256:
        return dora_weight_norm_ref(weight, lora_A, lora_B, scaling, fan_in_fan_out, weight_sqnorm)
    Af = A.float()
    baa = B.float() @ (Af @ Af.t())  # [N, r], tiny
    out = torch.empty((N,), dtype=torch.float32, device=w.device)
    grid = lambda meta: (triton.cdiv(N, meta["BN"]),)  # noqa: E731
    _dora_norm_kernel[grid](
        w, A, B, baa, weight_sqnorm if weight_sqnorm is not None else out, out, N, K, R,
        w.stride(0), w.stride(1), A.stride(0), A.stride(1), B.stride(0), B.stride(1), baa.stride(0), baa.stride(1),
        float(scaling), HAS_SQ=weight_sqnorm is not None,
        # 16-bit mma when W and A share a 16-bit dtype (the interpreter's 16-bit dots are fp32 anyway)
        DOT16=not interpreting() and w.dtype == A.dtype and A.dtype in (torch.float16, torch.bfloat16),
        BR=next_pow2(R),
    )
    return out
