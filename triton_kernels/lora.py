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
    # Adapters of another dtype than y (fp32 adapters on a 16-bit model, or 16-bit adapters on an fp32
    # model; no autocast): as PEFT's ``result = result + lora_B(lora_A(x)) * s``, the term is computed and
    # scaled in the adapter's dtype, the sum is promoted (fp32 adapters on a 16-bit model: summed in fp32)
    # and rounded back to y's dtype once at the end.
    out = y
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
        if B.dtype == out.dtype and xa.dtype == out.dtype:
            out.addmm_(xa, B.t(), alpha=s)
        else:
            term = (xa if xa.dtype == B.dtype else xa.to(B.dtype)) @ B.t()
            term = term * s
            out = out.to(torch.promote_types(out.dtype, term.dtype))
            out.add_(term)
        xas.append(xa)
        masks.append(mask)
    return (out if out is y else out.to(y.dtype)), xas, masks


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


# ----------------------------------------------------------------------------------------------
# Triton path: dropout masks regenerated from a seed (Philox, see _triton.py), never stored.
#   shrink:  xa = (keep(x) x) A^T / (1 - p)                 [M, r]
#   grad_A:  dA = c * g^T (keep(x) x)                         [r, K]
# The base product and the expand live in fused_linear.py.
# ----------------------------------------------------------------------------------------------
from ._triton import HAS_TRITON, SMEM_PER_BLOCK, interpreting, keep_scale, keep_threshold, next_pow2  # noqa: E402
from ._triton import philox_keep_mask_ref, target_pruner, tl, triton  # noqa: E402


def lora_shrink_ref(
    x: Tensor,  # [M, K]
    lora_A: Tensor,  # [r, K]
    seed: Tensor,  # int64 [1]
    p: float,
) -> Tensor:
    """xa = drop(x) A^T [M, r] with the Philox keep mask of `seed`, in A's dtype."""
    xl = x.to(lora_A.dtype)
    if p > 0.0:
        keep = philox_keep_mask_ref(int(seed.reshape(-1)[0]), x.shape[0], x.shape[1], p, x.device)
        return ((xl * keep) @ lora_A.t()) * keep_scale(p)
    return xl @ lora_A.t()


def lora_grad_a_ref(
    g: Tensor,  # [M, r]
    x: Tensor,  # [M, K]
    seed: Tensor,  # int64 [1]
    p: float,
    scale: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """dA = scale * g^T drop_mask(x) [r, K] (the 1/(1-p) factor is part of `scale`)."""
    xl = x.to(g.dtype)
    if p > 0.0:
        xl = xl * philox_keep_mask_ref(int(seed.reshape(-1)[0]), x.shape[0], x.shape[1], p, x.device)
    return ((g.t() @ xl) * scale).to(out_dtype)


# Launch configs per dot kind ("16": 16-bit tensor-core dot; "tf32"; "ieee": fp32 FMA dot), one
# row per config: (BM, BK, num_warps, num_stages, largest BR it may run, shared memory in KB with a
# 16-bit x, with an fp32 x (None: not with such an x)), the shared memory being the most any
# target needs up to that BR. Measured by compiling for sm_80/86/89/90/120 with ptxas (triton 3.9,
# and 3.6 for sm_80/86/90/120; the launchers' argument types, dropout on; every row at its largest
# BR, with a 16-bit and an fp32 x): no row spills registers on any target within its BR
# (the Philox mask of the [BM, BK] x tile and the [BM, BR] fp32 accumulator share the registers,
# so large tiles are kept to small ranks); rows are dropped per target by shared memory. Every
# (kind, BR <= 64, x dtype, target) keeps at least two configs.
_SHRINK_TABLE = {
    "16": [(64, 64, 8, 3, 64, 48, 64), (32, 64, 4, 3, 64, 28, 36), (64, 64, 4, 3, 32, 36, 52),
           (128, 64, 4, 3, 32, 52, 92), (128, 64, 8, 3, 64, 72, 104), (64, 128, 8, 3, 64, 96, 120),
           (128, 128, 8, 3, 32, 120, None)],
    "tf32": [(32, 32, 4, 4, 64, 40, 40), (32, 64, 4, 3, 64, 56, 56), (64, 32, 4, 3, 32, 36, 36),
             (128, 32, 8, 3, 64, 72, 72), (64, 64, 4, 3, 32, 64, 64)],
    "ieee": [(32, 32, 4, 4, 64, 40, 40), (32, 16, 4, 4, 64, 20, 20), (32, 64, 8, 3, 64, 56, 56),
             (64, 32, 8, 3, 64, 40, 40), (64, 64, 8, 3, 64, 80, 80), (32, 64, 4, 3, 32, 40, 40),
             (64, 32, 4, 3, 32, 32, 32), (128, 32, 8, 3, 32, 56, 56)],
}
# grad_A: BM is the reduced (token) dimension, BK the output columns; the fp32 FMA dot of an
# fp32 g with a 16-bit x (fp32 adapters on a 16-bit base, TF32 off) spills at the shrink's tiles,
# hence the small-BM rows.
_GRAD_A_TABLE = {
    "16": [(64, 64, 4, 3, 64, 48, 64), (64, 32, 4, 3, 64, 36, 44), (32, 64, 4, 3, 64, 24, 32),
           (128, 64, 4, 3, 32, 64, 96), (64, 128, 4, 3, 32, 56, None), (128, 128, 8, 3, 64, 144, None)],
    "tf32": [(32, 32, 4, 4, 64, 48, 48), (32, 64, 4, 3, 64, 48, 48), (64, 32, 4, 3, 64, 72, 72),
             (64, 64, 4, 3, 64, 96, 96), (128, 32, 8, 3, 32, 80, 80)],
    "ieee": [(16, 32, 4, 4, 64, 20, 20), (16, 64, 8, 3, 64, 20, 20), (32, 32, 8, 3, 64, 28, 28),
             (32, 64, 8, 3, 64, 40, 40), (32, 32, 4, 4, 64, 40, 40), (16, 64, 4, 3, 32, 16, 16),
             (32, 64, 4, 3, 32, 32, 32), (64, 32, 4, 3, 16, 24, 32), (128, 32, 8, 3, 32, None, 80),
             (64, 64, 4, 3, 32, None, 64)],
}


def table_configs(table: dict, keys, cc, args, kind, x_arg: str, br_arg: str = "BR"):
    """The triton.Configs of `table` (kind -> rows as above, `keys` naming the two block sizes)
    for compute capability `cc` (None: the union over every target), narrowed by a launch's
    named arguments `args`: its dot kind `kind(args)`, BR and the dtype of the `x_arg` pointer."""
    smem = None if cc is None else SMEM_PER_BLOCK.get(cc, min(SMEM_PER_BLOCK.values()))
    kinds = list(table) if not args else [kind(args)]
    br = args.get(br_arg) if args else None
    xd = getattr(args.get(x_arg), "dtype", None) if args else None
    x32 = xd is not None and xd not in (torch.float16, torch.bfloat16)
    out, seen = [], set()
    for k in kinds:
        for b0, b1, w, st, max_br, kb16, kb32 in table[k]:
            kb = kb32 if x32 else kb16
            if kb is None or (cc is not None and kb * 1024 > smem) or (br is not None and br > max_br):
                continue
            if (b0, b1, w, st) not in seen:
                seen.add((b0, b1, w, st))
                out.append(triton.Config({keys[0]: b0, keys[1]: b1}, num_warps=w, num_stages=st))
    return out


def _lora_kind(args) -> str:
    return "16" if not args.get("F32_DOT", True) else args.get("DOT_PREC", "ieee")


def get_lora_shrink_configs(cc=None, args=None):
    """Configs of _lora_shrink_kernel (see _triton.py: per-target launch configs)."""
    if interpreting():
        return [triton.Config({"BM": 32, "BK": 32}, num_warps=4)]
    return table_configs(_SHRINK_TABLE, ("BM", "BK"), cc, args, _lora_kind, "x_ptr")


def get_lora_grad_a_configs(cc=None, args=None):
    """Configs of _lora_grad_a_kernel (BM: the reduced rows, BK: the output columns)."""
    if interpreting():
        return [triton.Config({"BM": 32, "BK": 32}, num_warps=4)]
    return table_configs(_GRAD_A_TABLE, ("BM", "BK"), cc, args, _lora_kind, "x_ptr")


if HAS_TRITON:
    from ._triton import keep_mask

    @triton.autotune(configs=get_lora_shrink_configs(), key=["M_BUCKET", "K", "BR", "F32_DOT", "DOT_PREC"],
                     prune_configs_by={"early_config_prune": target_pruner(get_lora_shrink_configs)})
    @triton.jit
    def _lora_shrink_kernel(
        # pointers
        x_ptr, a_ptr, out_ptr, seed_ptr,
        # sizes
        M, K, R, M_BUCKET,
        # strides
        sxm, sxk, sar, sak, som, sor,
        # dropout: 31-bit threshold (0: none) and 1/(1-p)
        thr, scale,
        # meta
        F32_DOT: tl.constexpr, DOT_PREC: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    ):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.program_id(1) * BR + tl.arange(0, BR)
        seed = tl.load(seed_ptr)
        # 64-bit offsets into x: M x sxm (and K x sxk of a transposed view) can pass 2^31 elements
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * sxm
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            xt = tl.load(x_rows + rk.to(tl.int64)[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K),
                         other=0.0)
            if thr > 0:
                xt = tl.where(keep_mask(seed, rm[:, None], rk[None, :], thr), xt, 0.0)
            at = tl.load(a_ptr + rk[:, None] * sak + rr[None, :] * sar, mask=(rk[:, None] < K) & (rr[None, :] < R),
                         other=0.0)
            # the dot runs in the adapter's precision (as lora_shrink_ref): x rounded to A's dtype
            xt = xt.to(at.dtype)
            if F32_DOT:
                xt, at = xt.to(tl.float32), at.to(tl.float32)
            acc = tl.dot(xt, at, acc=acc, input_precision=DOT_PREC)
        tl.store(out_ptr + rm.to(tl.int64)[:, None] * som + rr[None, :] * sor, (acc * scale).to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rr[None, :] < R))

    @triton.autotune(configs=get_lora_grad_a_configs(), key=["M_BUCKET", "K", "BR", "SPLIT", "F32_DOT", "DOT_PREC"],
                     reset_to_zero=["out_ptr"],
                     prune_configs_by={"early_config_prune": target_pruner(get_lora_grad_a_configs)})
    @triton.jit
    def _lora_grad_a_kernel(
        # pointers
        g_ptr, x_ptr, out_ptr, seed_ptr,
        # sizes
        M, K, R, M_BUCKET, SPLIT,
        # strides
        sgm, sgr, sxm, sxk, sor, sok,
        # dropout threshold (0: none) and the scale of the gradient
        thr, scale,
        # meta
        F32_DOT: tl.constexpr, DOT_PREC: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    ):
        # grid: K blocks x R blocks x SPLIT slices of M, accumulated with fp32 atomics
        rk = tl.program_id(0) * BK + tl.arange(0, BK)
        rr = tl.program_id(1) * BR + tl.arange(0, BR)
        split = tl.program_id(2)
        seed = tl.load(seed_ptr)
        rows_per = tl.cdiv(tl.cdiv(M, SPLIT), BM) * BM
        acc = tl.zeros((BR, BK), dtype=tl.float32)
        # 64-bit offsets into x and g: M x sxm (K x sxk, M x sgm) can pass 2^31 elements
        x_cols = x_ptr + rk.to(tl.int64)[None, :] * sxk
        for m0 in range(split * rows_per, tl.minimum(M, (split + 1) * rows_per), BM):
            rm = m0 + tl.arange(0, BM)
            rm64 = rm.to(tl.int64)
            xt = tl.load(x_cols + rm64[:, None] * sxm, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            if thr > 0:
                xt = tl.where(keep_mask(seed, rm[:, None], rk[None, :], thr), xt, 0.0)
            gt = tl.load(g_ptr + rr[:, None] * sgr + rm64[None, :] * sgm, mask=(rr[:, None] < R) & (rm[None, :] < M),
                         other=0.0)
            # the dot runs in g's (the adapter's) precision, as lora_grad_a_ref: x rounded to it
            xt = xt.to(gt.dtype)
            if F32_DOT:
                xt, gt = xt.to(tl.float32), gt.to(tl.float32)
            acc = tl.dot(gt, xt, acc=acc, input_precision=DOT_PREC)
        ptrs = out_ptr + rr[:, None] * sor + rk[None, :] * sok
        ok = (rr[:, None] < R) & (rk[None, :] < K)
        if SPLIT == 1:
            tl.store(ptrs, acc * scale, mask=ok)
        else:
            tl.atomic_add(ptrs, acc * scale, mask=ok)


def _dot_args(dtype: torch.dtype) -> dict:
    """Constexprs of a low-rank dot whose operands are rounded to the adapter's `dtype`:
    16-bit: a 16-bit tensor-core dot with fp32 accumulation (F32_DOT=False; DOT_PREC unused);
    fp32: "tf32" when torch allows TF32 matmuls, else "ieee" (an exact fp32 FMA dot, as cuBLAS
    without TF32). The interpreter always dots in fp32 (its 16-bit dots are wrong, DESIGN.md)."""
    if dtype == torch.float32:
        return {"F32_DOT": True, "DOT_PREC": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"}
    return {"F32_DOT": interpreting(), "DOT_PREC": "ieee"}


def _need_triton(name: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{name} needs triton; install it or set PEFT_FAST_BACKEND=torch")


def lora_shrink(x: Tensor, lora_A: Tensor, seed: Tensor, p: float) -> Tensor:
    """Triton launcher with the signature of `lora_shrink_ref`."""
    _need_triton("lora_shrink")
    M, K = x.shape
    R = lora_A.shape[0]
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_shrink: x has {K} features but lora_A is {tuple(lora_A.shape)}")
    out = torch.empty((M, R), dtype=lora_A.dtype, device=x.device)
    if M == 0:
        return out
    BR = min(next_pow2(R), 64)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(R, BR))  # noqa: E731
    _lora_shrink_kernel[grid](
        x, lora_A, out, seed, M, K, R, min(next_pow2(M), 4096),
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), out.stride(0), out.stride(1),
        keep_threshold(p) if p > 0.0 else 0, keep_scale(p) if p > 0.0 else 1.0,
        BR=BR, **_dot_args(lora_A.dtype),
    )
    return out


def lora_grad_a(g: Tensor, x: Tensor, seed: Tensor, p: float, scale: float, out_dtype: torch.dtype) -> Tensor:
    """Triton launcher with the signature of `lora_grad_a_ref`."""
    _need_triton("lora_grad_a")
    M, R = g.shape
    K = x.shape[1]
    if x.shape[0] != M:
        raise ValueError(f"lora_grad_a: g has {M} rows but x has {x.shape[0]}")
    out = torch.zeros((R, K), dtype=torch.float32, device=x.device)
    if M == 0:
        return out.to(out_dtype)
    BR = min(next_pow2(R), 64)
    n_k_min = triton.cdiv(K, 128) * triton.cdiv(R, BR)
    # enough programs to fill the device: split the M reduction (fp32 atomics) when K x R is small
    split = 1 if interpreting() or not x.is_cuda else max(1, min(triton.cdiv(M, 512), 264 // max(n_k_min, 1)))
    grid = lambda meta: (triton.cdiv(K, meta["BK"]), triton.cdiv(R, BR), split)  # noqa: E731
    _lora_grad_a_kernel[grid](
        g, x, out, seed, M, K, R, min(next_pow2(M), 4096), split,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        keep_threshold(p) if p > 0.0 else 0, float(scale),
        BR=BR, **_dot_args(g.dtype),
    )
    return out if out_dtype == torch.float32 else out.to(out_dtype)
