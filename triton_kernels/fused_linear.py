"""One GEMM with every adapter epilogue/prologue the LoRA, DoRA and IA3 ops need.

    acc[m, n] = sum_k x[m, k] pro[k] w[k, n]                                  (base product)
              + sum_i c_i * keep_i[m, n] * sum_{j in seg_i} L[m, j] R[j, n]    (low-rank terms)
    pre  = acc (+ b if bias_scaled)                  -> optionally stored (IA3 base, DoRA ypre)
    red[n] += sum_m pre[m, n] z[m, n]                -> optional fused column reduction (fp32)
    out  = pre * col[n] (+ b if not bias_scaled)

Uses (w given as a [K, N] view with any strides, so W^T and W need no copy):
  LoRA forward      x W^T + b + sum_i s_i xa_i B_i^T                 (L = xa, R = B^T)
  LoRA dx           dy W + sum_i s_i/(1-p_i) keep_i * (g_i A_i)      (L = dy B, R = A; masks
                    regenerated from the forward's seeds, see _triton.py)
  DoRA forward      (m/n) * (x W^T + s xa B^T) + b                    (col = m/n, stores ypre)
  IA3               (x W^T + b) * l, or x (diag(l) W^T) + b, and the dx of both; the IA3
                    feed-forward gradient colsum((dy W) * x) is the fused reduction.
The low-rank part follows LoRA (Hu et al., 2021, arXiv:2106.09685): it adds a rank-r tile
product to the accumulator of the base product, so the [M, N] output is written once.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from .nf4 import NF4Operand, nf4_dequantize_ref, nf4_kernel_args
from ._triton import HAS_TRITON, interpreting, keep_scale, keep_threshold, next_pow2, philox_keep_mask_ref, tl, triton  # noqa: F401

Tensor = torch.Tensor


class Segment(NamedTuple):
    """One adapter's slice [offset, offset + rank) of the low-rank operands."""
    offset: int
    rank: int
    scale: float  # multiplies the term (s_i, times 1/(1-p_i) when masked)
    p: float  # dropout probability of the mask applied to the term (0: no mask)


class NF4KN(NamedTuple):
    """An NF4 weight W [out, in] used as the [K, N] operand: W^T (transpose=True, forward) or W."""
    op: NF4Operand
    transpose: bool

    @property
    def shape(self) -> tuple:
        o, i = self.op.shape
        return (i, o) if self.transpose else (o, i)

    def element_strides(self) -> tuple:
        """(stride along K, stride along N) in elements of the flat row-major W."""
        i = self.op.shape[1]
        return (1, i) if self.transpose else (i, 1)

    def dequantize(self) -> Tensor:
        w = nf4_dequantize_ref(self.op)
        return w.t() if self.transpose else w


def fused_linear_ref(
    x: Tensor,  # [M, K]
    w,  # Tensor [K, N] (any strides), or NF4KN
    bias: Optional[Tensor] = None,  # [N]
    pro_scale: Optional[Tensor] = None,  # [K]
    col_scale: Optional[Tensor] = None,  # [N], applied in fp32
    bias_scaled: bool = False,
    lr_left: Optional[Tensor] = None,  # [M, R]
    lr_right: Optional[Tensor] = None,  # [R, N]
    segments: Sequence[Segment] = (),
    seeds: Optional[Tensor] = None,  # int64 [len(segments)], for the masked segments
    store_pre: bool = False,
    reduce_with: Optional[Tensor] = None,  # [M, N]
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Returns (out [M, N], pre [M, N] or None, red fp32 [N] or None). Pure torch (cuBLAS on GPU):
    the test oracle and the 'torch' path the op picks when it measures faster."""
    out_dtype = out_dtype or x.dtype
    if isinstance(w, NF4KN):
        w = w.dequantize()
    wk = w if pro_scale is None else w * pro_scale.to(w.dtype)[:, None]
    # the bias joins the first GEMM (cuBLAS epilogue) unless a column scale comes in between
    bias_first = bias is not None and (bias_scaled or col_scale is None)
    acc = torch.addmm(bias.to(x.dtype), x, wk) if bias_first else x @ wk
    if lr_left is not None:
        for i, seg in enumerate(segments):
            lo, hi = seg.offset, seg.offset + seg.rank
            left, right = lr_left[:, lo:hi], lr_right[lo:hi].to(lr_left.dtype)
            if seg.p > 0.0:
                term = left @ right
                term = term * philox_keep_mask_ref(int(seeds[i]), term.shape[0], term.shape[1], seg.p, term.device)
                acc.add_(term.to(acc.dtype), alpha=seg.scale)
            elif left.dtype == acc.dtype:
                acc.addmm_(left, right, alpha=seg.scale)
            else:
                acc.add_((left @ right).to(acc.dtype), alpha=seg.scale)
    pre = acc.to(out_dtype, copy=True) if store_pre else None
    red = (acc.float() * reduce_with.float()).sum(0) if reduce_with is not None else None
    if col_scale is not None:
        acc = (acc.float() * col_scale.float()).to(acc.dtype)
    if bias is not None and not bias_first:
        acc = acc + bias.to(acc.dtype)
    return acc.to(out_dtype), pre, red


def get_fused_linear_configs():
    """Launch configs; autotuned on GPU, one fixed config under the interpreter."""
    if interpreting():
        return [triton.Config({"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 4}, num_warps=4)]
    return [
        triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BM": 64, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BM": 128, "BN": 64, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BM": 16, "BN": 128, "BK": 128, "GROUP_M": 1}, num_warps=4, num_stages=4),
        triton.Config({"BM": 16, "BN": 64, "BK": 256, "GROUP_M": 1}, num_warps=4, num_stages=3),
    ]


_SEG_TABLES: dict = {}


def segment_table(segments: Sequence[Segment], device: torch.device) -> tuple[Tensor, Tensor]:
    """Device copies of the segment list (int32 [S, 3]: offset, rank, mask threshold; fp32 [S]
    scales), cached per distinct list so steady-state calls copy nothing host-to-device."""
    key = (str(device), tuple(segments))
    hit = _SEG_TABLES.get(key)
    if hit is None:
        ints = torch.tensor([[s.offset, s.rank, keep_threshold(s.p) if s.p > 0.0 else 0] for s in segments],
                            dtype=torch.int32).reshape(-1, 3)
        scales = torch.tensor([float(s.scale) for s in segments], dtype=torch.float32)
        hit = _SEG_TABLES[key] = (ints.to(device), scales.to(device))
    return hit


if HAS_TRITON:
    from ._triton import keep_mask
    from .nf4 import nf4_decode

    @triton.autotune(configs=get_fused_linear_configs(), key=["M_BUCKET", "N", "K", "N_SEG", "BR", "W_NF4"],
                     reset_to_zero=["red_ptr"])
    @triton.jit
    def _fused_linear_kernel(
        # pointers
        x_ptr, w_ptr, out_ptr, bias_ptr, pro_ptr, col_ptr, pre_ptr, red_ptr, z_ptr,
        l_ptr, r_ptr, seg_ptr, segscale_ptr, seeds_ptr,
        # NF4 weight (W_NF4): packed, absmax, code, offset, absmax2, code2 and the block sizes
        q_packed, q_absmax, q_code, q_offset, q_absmax2, q_code2, q_bs, q_bs2,
        # sizes
        M, N, K, M_BUCKET, N_SEG,
        # strides
        sxm, sxk, swk, swn, som, son, spm, spn, szm, szn, slm, slr, srr, srn,
        # meta
        LR_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_SCALED: tl.constexpr, HAS_PRO: tl.constexpr,
        HAS_COL: tl.constexpr, STORE_PRE: tl.constexpr, REDUCE: tl.constexpr, F32_DOT: tl.constexpr,
        DOT_PREC: tl.constexpr, BR: tl.constexpr, W_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # grouped launch order: GROUP_M row-blocks share each column block of w in L2
        pid = tl.program_id(0)
        n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        group = pid // (GROUP_M * n_n)
        first_m = group * GROUP_M
        size_m = min(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
        pid_n = (pid % (GROUP_M * n_n)) // size_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        m_ok, n_ok = rm < M, rn < N

        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            a = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=m_ok[:, None] & (rk[None, :] < K), other=0.0)
            b_ok = (rk[:, None] < K) & n_ok[None, :]
            if W_NF4:  # 4-bit weight: decode the tile in registers (swk, swn: element strides of W)
                e = rk[:, None].to(tl.int64) * swk + rn[None, :].to(tl.int64) * swn
                b = nf4_decode(q_packed, q_absmax, q_code, q_offset, q_absmax2, q_code2, e, b_ok, q_bs, q_bs2,
                               DOUBLE_QUANT).to(x_ptr.dtype.element_ty)
            else:
                b = tl.load(w_ptr + rk[:, None] * swk + rn[None, :] * swn, mask=b_ok, other=0.0)
            if HAS_PRO:
                p = tl.load(pro_ptr + rk, mask=rk < K, other=0.0)
                b = (b.to(tl.float32) * p.to(tl.float32)[:, None]).to(b.dtype)
            if F32_DOT:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc=acc, input_precision=DOT_PREC)

        for seg in range(0, N_SEG):  # low-rank terms, one per adapter
            off = tl.load(seg_ptr + 3 * seg)
            rank = tl.load(seg_ptr + 3 * seg + 1)
            lr = tl.zeros((BM, BN), dtype=tl.float32)
            for r0 in range(0, rank, BR):
                rr = r0 + tl.arange(0, BR)
                la = tl.load(l_ptr + rm[:, None] * slm + (off + rr)[None, :] * slr,
                             mask=m_ok[:, None] & (rr[None, :] < rank), other=0.0)
                rb = tl.load(r_ptr + (off + rr)[:, None] * srr + rn[None, :] * srn,
                             mask=(rr[:, None] < rank) & n_ok[None, :], other=0.0)
                if F32_DOT:
                    la, rb = la.to(tl.float32), rb.to(tl.float32)
                else:
                    rb = rb.to(la.dtype)
                lr = tl.dot(la, rb, acc=lr, input_precision=DOT_PREC)
            if LR_MASK:
                thr = tl.load(seg_ptr + 3 * seg + 2)
                if thr > 0:  # dropout keep mask of this adapter, regenerated from its seed
                    seed = tl.load(seeds_ptr + seg)
                    lr = tl.where(keep_mask(seed, rm[:, None], rn[None, :], thr), lr, 0.0)
            acc += lr * tl.load(segscale_ptr + seg)

        tile_ok = m_ok[:, None] & n_ok[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            if BIAS_SCALED:
                acc = acc + bias[None, :]
        if STORE_PRE:
            tl.store(pre_ptr + rm[:, None] * spm + rn[None, :] * spn, acc.to(pre_ptr.dtype.element_ty), mask=tile_ok)
        if REDUCE:
            z = tl.load(z_ptr + rm[:, None] * szm + rn[None, :] * szn, mask=tile_ok, other=0.0).to(tl.float32)
            tl.atomic_add(red_ptr + rn, tl.sum(acc * z, axis=0), mask=n_ok)
        if HAS_COL:
            acc = acc * tl.load(col_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            if not BIAS_SCALED:
                acc = acc + bias[None, :]
        tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products as torch's default (no TF32) unless the user allowed TF32
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _check(name: str, t: Optional[Tensor], shape: tuple, device: torch.device) -> None:
    if t is None:
        return
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"fused_linear: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.device != device:
        raise ValueError(f"fused_linear: {name} is on {t.device}, expected {device}")


def fused_linear(
    x: Tensor,  # [M, K]
    w,  # Tensor [K, N] (any strides), or NF4KN
    bias: Optional[Tensor] = None,  # [N]
    pro_scale: Optional[Tensor] = None,  # [K]
    col_scale: Optional[Tensor] = None,  # [N]
    bias_scaled: bool = False,
    lr_left: Optional[Tensor] = None,  # [M, R]
    lr_right: Optional[Tensor] = None,  # [R, N]
    segments: Sequence[Segment] = (),
    seeds: Optional[Tensor] = None,  # int64 [len(segments)]
    store_pre: bool = False,
    reduce_with: Optional[Tensor] = None,  # [M, N]
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Triton launcher with the signature of `fused_linear_ref`. `w` may be an `NF4KN`: the
    4-bit weight is then decoded tile by tile inside the GEMM (read once, never expanded)."""
    if not HAS_TRITON:
        raise RuntimeError("fused_linear needs triton; install it or use PEFT_FAST_BACKEND=torch")
    nf4 = w if isinstance(w, NF4KN) else None
    w_shape = nf4.shape if nf4 is not None else tuple(w.shape)
    if x.dim() != 2 or len(w_shape) != 2 or x.shape[1] != w_shape[0]:
        raise ValueError(f"fused_linear: x {tuple(x.shape)} and w {tuple(w_shape)} do not chain ([M, K] @ [K, N])")
    if nf4 is not None and x.dtype != nf4.op.dtype:
        raise ValueError(f"fused_linear: x is {x.dtype} but the NF4 weight dequantizes to {nf4.op.dtype}")
    M, K = x.shape
    N = w_shape[1]
    dev = x.device
    for name, t, shp in (("bias", bias, (N,)), ("pro_scale", pro_scale, (K,)), ("col_scale", col_scale, (N,)),
                         ("reduce_with", reduce_with, (M, N))):
        _check(name, t, shp, dev)
    has_lr = lr_left is not None and len(segments) > 0
    if has_lr:
        R = lr_left.shape[1]
        _check("lr_left", lr_left, (M, R), dev)
        _check("lr_right", lr_right, (R, N), dev)
    out_dtype = out_dtype or x.dtype
    out = torch.empty((M, N), dtype=out_dtype, device=dev)
    pre = torch.empty((M, N), dtype=out_dtype, device=dev) if store_pre else None
    red = torch.zeros((N,), dtype=torch.float32, device=dev) if reduce_with is not None else None
    if M == 0 or N == 0:
        return out, pre, red
    dummy = out
    segs = list(segments) if has_lr else []
    masked = any(s.p > 0.0 for s in segs)
    if masked and (seeds is None or seeds.numel() < len(segs)):
        raise ValueError("fused_linear: masked low-rank segments need one seed each")
    seg_ints, seg_scales = segment_table(segs, dev) if segs else (dummy, dummy)
    opt = lambda t: t if t is not None else dummy  # noqa: E731  (unused pointer slots)
    strides = lambda t: t.stride() if t is not None else (0, 0)  # noqa: E731
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    if nf4 is not None:
        q_args = (*nf4_kernel_args(nf4.op), nf4.op.blocksize, nf4.op.blocksize2)
        w_t, (swk, swn) = dummy, nf4.element_strides()
    else:
        q_args = (dummy,) * 6 + (1, 1)
        w_t, (swk, swn) = w, w.stride()
    _fused_linear_kernel[grid](
        x, w_t, out, opt(bias), opt(pro_scale), opt(col_scale), opt(pre), opt(red), opt(reduce_with),
        lr_left if segs else dummy, lr_right if segs else dummy, seg_ints, seg_scales,
        seeds if masked else dummy, *q_args,
        M, N, K, min(next_pow2(M, 16), 4096), len(segs),
        x.stride(0), x.stride(1), swk, swn, out.stride(0), out.stride(1),
        *strides(pre), *strides(reduce_with), *strides(lr_left if segs else None), *strides(lr_right if segs else None),
        LR_MASK=masked, HAS_BIAS=bias is not None, BIAS_SCALED=bias_scaled, HAS_PRO=pro_scale is not None,
        HAS_COL=col_scale is not None, STORE_PRE=store_pre, REDUCE=reduce_with is not None,
        F32_DOT=interpreting() or x.dtype == torch.float32, DOT_PREC=_dot_precision(x.dtype),
        BR=min(next_pow2(max((s.rank for s in segs), default=1)), 64),
        W_NF4=nf4 is not None, DOUBLE_QUANT=nf4 is not None and nf4.op.double_quant,
    )
    return out, pre, red


__all__ = ["Segment", "fused_linear", "fused_linear_ref", "get_fused_linear_configs", "keep_scale"]
