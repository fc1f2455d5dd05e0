"""The Triton path of the fused ops (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

Same inputs and outputs as the torch references, except that a dropout "mask" is an int64 [1]
seed: the kernels regenerate the keep mask from it, so no [M, K] mask or dropped copy of x is
stored. Products with no mask and nothing to fuse (x A^T, dy B, xa^T dy) go to cuBLAS; the
base product with its epilogue picks Triton or cuBLAS per shape by measurement (_path.py).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _path
from .triton_kernels._triton import keep_scale, new_seed
from .triton_kernels import colsum as _colsum
from .triton_kernels import lora as _lora
from .triton_kernels import dora as _dora
from .triton_kernels._workspace import scratch
from .triton_kernels.fused_linear import NF4KN, Segment, fused_linear, fused_linear_ref
from .triton_kernels.nf4 import NF4Operand, nf4_dequantize

Tensor = torch.Tensor


_DECODE_M = 64  # up to this many tokens the 4-bit weight may be decoded inside the GEMM


def _dequantized(w: NF4KN) -> Tensor:
    """The 4-bit weight expanded into one reused buffer per (device, dtype): never kept."""
    buf = scratch("nf4_weight", tuple(w.op.shape), w.op.dtype, w.op.packed.device)
    nf4_dequantize(w.op, out=buf)
    return buf.t() if w.transpose else buf


def _linear(op: str, x: Tensor, w, **kw):
    """fused_linear on the path measured fastest for this shape (Triton only when masked).
    For a 4-bit weight: decode in the GEMM (small M), or dequantize into a buffer and then
    the Triton or cuBLAS GEMM.

    Fallbacks, run only when the paths before them cannot compile or launch on this GPU
    (_path.choose): with dropout masks, the torch composition regenerating the keep mask from
    the seeds (philox_keep_mask_ref: the same mask, built as an [M, K] tensor with ~10 integer
    passes, so never measured: it cannot win and timing it would only slow the first call);
    with a 4-bit weight, dequantization in torch + cuBLAS (nf4_dequantize_ref: it does not
    depend on the Triton dequantization kernel the other paths share)."""
    segs = kw.get("segments", ())
    masked = any(s.p > 0.0 for s in segs)
    nf4 = isinstance(w, NF4KN)
    key = (_path.bucket(x.shape[0]), x.shape[1], w.shape[1], tuple(s.rank for s in segs), str(x.dtype), nf4,
           tuple(sorted(k for k, v in kw.items() if v is not None and v is not False and k != "segments")))
    dense = (lambda: _dequantized(w)) if nf4 else (lambda: w)
    cands = {"triton": lambda: fused_linear(x, dense(), **kw)}
    fallbacks = {}
    if masked:
        fallbacks["torch"] = lambda: fused_linear_ref(x, dense(), **kw)
    else:
        cands["torch"] = lambda: fused_linear_ref(x, dense(), **kw)
    if nf4 and x.shape[0] <= _DECODE_M:
        cands["nf4_fused"] = lambda: fused_linear(x, w, **kw)
    if nf4:
        fallbacks["torch_dequant"] = lambda: fused_linear_ref(x, w, **kw)
    return _path.choose(op, key, cands, x.device, fallbacks)


def _guarded(op: str, key: tuple, device: torch.device, kernel, ref, *args):
    """A kernel with no cuBLAS rival, and its torch reference as the fallback when it cannot
    compile or launch on this GPU (same results: the references regenerate the same masks)."""
    return _path.choose(op, key, {"triton": lambda: kernel(*args)}, device, {"torch": lambda: ref(*args)})


def lora_shrink(x: Tensor, A: Tensor, seed: Tensor, p: float) -> Tensor:
    """drop(x) A^T [M, r] with the in-kernel Philox mask (no [M, K] mask stored)."""
    key = (_path.bucket(x.shape[0]), x.shape[1], A.shape[0], str(x.dtype), str(A.dtype))
    return _guarded("lora_shrink", key, x.device, _lora.lora_shrink, _lora.lora_shrink_ref, x, A, seed, p)


def lora_grad_a(g: Tensor, x: Tensor, seed: Tensor, p: float, scale: float, out_dtype: torch.dtype) -> Tensor:
    """dA = scale g^T drop(x) [r, K], the mask regenerated from the forward's seed."""
    key = (_path.bucket(x.shape[0]), x.shape[1], g.shape[1], str(x.dtype), str(g.dtype))
    return _guarded("lora_grad_a", key, x.device, _lora.lora_grad_a, _lora.lora_grad_a_ref,
                    g, x, seed, p, scale, out_dtype)


def colsum_mul(a: Tensor, b: Tensor) -> Tensor:
    """fp32 [N] column sums of a * b."""
    key = (_path.bucket(a.shape[0]), a.shape[1], str(a.dtype), str(b.dtype))
    return _guarded("colsum_mul", key, a.device, _colsum.colsum_mul, _colsum.colsum_mul_ref, a, b)


def dora_weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out=False, weight_sqnorm=None) -> Tensor:
    """||W + s B A|| per output row, fp32 [N] (the op ops.py calls on this path)."""
    key = (tuple(weight.shape), lora_A.shape[0], str(weight.dtype), str(lora_A.dtype), bool(fan_in_fan_out),
           weight_sqnorm is not None)
    return _guarded("dora_weight_norm", key, lora_A.device, _dora.dora_weight_norm, _dora.dora_weight_norm_ref,
                    weight, lora_A, lora_B, scaling, fan_in_fan_out, weight_sqnorm)


def _cat(ts: Sequence[Tensor], dim: int) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(list(ts), dim)


def _segments(ranks: Sequence[int], scales: Sequence[float], ps: Sequence[float]) -> list[Segment]:
    segs, off = [], 0
    for r, s, p in zip(ranks, scales, ps):
        segs.append(Segment(off, r, s, p))
        off += r
    return segs


def _w_kn(weight, fan_in_fan_out: bool):
    """[K, N] operand of the base weight (a view; an NF4 weight is read transposed in place)."""
    if isinstance(weight, NF4Operand):
        return NF4KN(weight, True)
    return weight if fan_in_fan_out else weight.t()


def _w_nk(weight, fan_in_fan_out: bool):
    """The base weight as the [N, K] operand of dx = dy W."""
    if isinstance(weight, NF4Operand):
        return NF4KN(weight, False)
    return weight.t() if fan_in_fan_out else weight


def lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out=False):
    """-> (y [M, N], xa_i [M, r_i], seeds (int64 [1] per masked adapter, empty otherwise))."""
    xas, rng = [], []
    for A, p in zip(lora_A, dropout_p):
        if p > 0.0:
            seed = new_seed(x.device)
            xas.append(lora_shrink(x, A, seed, p))
            rng.append(seed)
        else:
            xas.append(x.to(A.dtype) @ A.t())
            rng.append(None)
    L = _cat(xas, 1)
    Rm = _cat([B.to(L.dtype) for B in lora_B], 1).t()  # [R, N]
    segs = _segments([A.shape[0] for A in lora_A], scaling, [0.0] * len(lora_A))
    y, _, _ = _linear("lora_fwd", x, _w_kn(weight, fan_in_fan_out), bias=bias, lr_left=L, lr_right=Rm, segments=segs)
    return y, xas, rng


def lora_bwd(dy, x, weight, lora_A, lora_B, scaling, dropout_p, xas, rng, fan_in_fan_out=False, need_dx=True):
    """-> (dx [M, K] or None, [dA_i], [dB_i]); masks regenerated from the forward's seeds."""
    ranks = [A.shape[0] for A in lora_A]
    Bcat = _cat(list(lora_B), 1)  # [N, R]
    dyl = dy if dy.dtype == Bcat.dtype else dy.to(Bcat.dtype)
    g = dyl @ Bcat  # [M, R], unscaled
    dBt = _cat(list(xas), 1).t() @ dyl  # [R, N]
    dAs, dBs, off = [], [], 0
    ks = [keep_scale(p) if p > 0.0 else 1.0 for p in dropout_p]
    for A, B, s, p, seed, k, r in zip(lora_A, lora_B, scaling, dropout_p, rng, ks, ranks):
        gi = g[:, off:off + r]
        if p > 0.0:
            dAs.append(lora_grad_a(gi, x, seed, p, s * k, A.dtype))
        else:
            dAs.append((gi.t() @ x.to(gi.dtype)).mul_(s).to(A.dtype))
        dBs.append((dBt[off:off + r].t() * s).to(B.dtype))
        off += r
    dx = None
    if need_dx:
        segs = _segments(ranks, [s * k for s, k in zip(scaling, ks)], dropout_p)
        seeds = torch.cat([sd if sd is not None else torch.zeros(1, dtype=torch.int64, device=x.device) for sd in rng]) \
            if any(p > 0.0 for p in dropout_p) else None
        dx, _, _ = _linear("lora_dx", dy, _w_nk(weight, fan_in_fan_out), lr_left=g,
                           lr_right=_cat(list(lora_A), 0).to(g.dtype),
                           segments=segs, seeds=seeds, out_dtype=x.dtype)
    return dx, dAs, dBs


def dora_fwd(x, weight, bias, lora_A, lora_B, scaling, magnitude, weight_norm, fan_in_fan_out=False, keep_pre=True):
    """-> (y, xa, ypre or None); c = m / n applied in fp32 in the epilogue."""
    xa = x.to(lora_A.dtype) @ lora_A.t()
    c = magnitude.float() / weight_norm.float()
    y, pre, _ = _linear("dora_fwd", x, _w_kn(weight, fan_in_fan_out), bias=bias, col_scale=c, lr_left=xa,
                        lr_right=lora_B.t().to(xa.dtype), segments=[Segment(0, lora_A.shape[0], scaling, 0.0)],
                        store_pre=keep_pre)
    return y, xa, pre


def dora_bwd(dy, x, weight, lora_A, lora_B, scaling, magnitude, weight_norm, xa, ypre, fan_in_fan_out=False,
             need_dx=True):
    """dm = colsum(dy ypre) / n; with c = m/n: g = s dy (c B), dB = s c (xa^T dy)^T, dA = g^T x,
    dx = (dy c) W + g A (c folded into W's rows inside the kernel, dy c never formed)."""
    c = magnitude.float() / weight_norm.float()
    dm = (colsum_mul(dy, ypre) / weight_norm.float()).to(magnitude.dtype)
    Bc = (lora_B.float() * c[:, None]).to(lora_B.dtype)
    dyl = dy if dy.dtype == lora_B.dtype else dy.to(lora_B.dtype)
    g = (dyl @ Bc).mul_(scaling)  # [M, r]
    dB = ((xa.t() @ dyl).t().float() * (c[:, None] * scaling)).to(lora_B.dtype)
    dA = (g.t() @ x.to(g.dtype)).to(lora_A.dtype)
    dx = None
    if need_dx:
        dx, _, _ = _linear("dora_dx", dy, _w_nk(weight, fan_in_fan_out), pro_scale=c, lr_left=g, lr_right=lora_A.to(g.dtype),
                           segments=[Segment(0, lora_A.shape[0], 1.0, 0.0)], out_dtype=x.dtype)
    return dx, dA, dB, dm


def ia3_fwd(x, weight, bias, ia3_l, is_feedforward, fan_in_fan_out=False, keep_base=True):
    w = _w_kn(weight, fan_in_fan_out)
    l = ia3_l.to(x.dtype)
    if is_feedforward:
        y, _, _ = _linear("ia3_ff_fwd", x, w, bias=bias, pro_scale=l)
        return y, None
    y, base, _ = _linear("ia3_fwd", x, w, bias=bias, col_scale=l, bias_scaled=True, store_pre=keep_base)
    return y, base


def ia3_bwd(dy, x, weight, ia3_l, is_feedforward, base: Optional[Tensor], fan_in_fan_out=False, need_dx=True):
    w_nk = _w_nk(weight, fan_in_fan_out)
    l = ia3_l.to(dy.dtype)
    if is_feedforward:  # t = dy W; dx = t l; dl = colsum(t x), fused into the same GEMM
        dx, _, dl = _linear("ia3_ff_dx", dy, w_nk, col_scale=l, reduce_with=x, out_dtype=x.dtype)
        return (dx if need_dx else None), dl
    dl = colsum_mul(dy, base)
    dx = _linear("ia3_dx", dy, w_nk, pro_scale=l, out_dtype=x.dtype)[0] if need_dx else None
    return dx, dl
