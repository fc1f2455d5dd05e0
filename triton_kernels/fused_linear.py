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

from .nf4 import NF4Operand, nf4_dequantize, nf4_dequantize_ref, nf4_kernel_args
from ._triton import (HAS_TRITON, SMEM_PER_BLOCK, interpreting, keep_scale, keep_threshold, next_pow2,  # noqa: F401
                      philox_keep_mask_ref, target_pruner, tl, triton)

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


def nf4_decodes_in_gemm(op: NF4Operand) -> bool:
    """Whether fused_linear decodes this 4-bit weight inside the GEMM: each tile reads one
    absmax per row (W^T) or column (W) of the tile, so NF4 blocks must not straddle rows of W
    and must span at least the smallest tile (32). Other weights are expanded first."""
    bs = op.blocksize
    return bs >= 32 and bs & (bs - 1) == 0 and op.shape[1] % bs == 0


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


# Launch configs (BM, BN, BK, GROUP_M, num_warps, num_stages) per operand kind and shared-memory
# class, chosen from compile-only sweeps (benchmarks/aot_compile.py, triton 3.9 on sm_80/86/89/90/120
# and triton 3.6, the GPU image's, on sm_90): each fits its class's shared memory (the pipelined
# loop takes (stages - 1) * (BM + BN) * BK elements); the ptxas spill report is empty on
# sm_80..sm_90 except 4 bytes for (32, 32, 32, 1, 4, 2) with fp32 adapters under TF32 on sm_86/89
# (nf4t, the second config of blocksize-32 weights). Kinds:
#   "16"    16-bit x and w, 16-bit (or no) adapters, 16-byte aligned rows: mma / wgmma.
#   "16s"   16-bit, but dropout masks (Philox per element) or fp32 adapters (FMA low-rank dot):
#           tiles of <= 32 fp32 accumulator elements a thread.
#   "16f"   16-bit with fp32 adapters and exact fp32 low-rank products (FMA): smaller tiles still
#           (64x128 spills 40 B on sm_86/sm_89 with dropout masks).
#   "16u"   16-bit with unaligned rows (scalar loads pipelined through registers): small tiles.
#   "tf32"  fp32 with TF32 allowed (tf32 mma); "ieee": fp32 exact products (FMA, by design: torch
#           computes fp32 matmuls without TF32 unless allowed), operands in registers: small tiles.
#   "nf4t", "nf4w"  4-bit weight decoded in the GEMM as W^T (forward) or W (dx): small M,
#           BK (W^T) or BN (W) within one NF4 block; "nf4f32": the same with fp32 activations
#           (bitsandbytes' default compute dtype), whose FMA dot needs BK <= 32.
_CONFIGS = {
    ("16", "227k"): [(128, 128, 64, 8, 8, 4), (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4), (16, 128, 128, 1, 4, 4),
                     (16, 64, 256, 1, 4, 3)],
    ("16", "163k"): [(128, 128, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4), (16, 128, 128, 1, 4, 4),
                     (16, 64, 256, 1, 4, 3)],
    ("16", "99k"): [(128, 128, 64, 8, 8, 3), (64, 128, 64, 8, 4, 3), (128, 64, 64, 8, 4, 3), (16, 128, 64, 1, 4, 4),
                    (16, 64, 128, 1, 4, 4)],
    ("16s", "any"): [(64, 128, 64, 8, 8, 3), (64, 128, 32, 8, 8, 3), (16, 64, 64, 1, 4, 3), (16, 128, 32, 1, 4, 3)],
    ("16f", "any"): [(16, 64, 64, 1, 4, 3), (32, 32, 32, 4, 4, 3)],
    ("16u", "any"): [(32, 64, 32, 4, 4, 3), (16, 64, 64, 1, 4, 3), (16, 128, 32, 1, 4, 3), (16, 64, 64, 1, 4, 2)],
    ("tf32", "any"): [(64, 128, 32, 8, 8, 3), (32, 64, 32, 8, 4, 3), (16, 128, 32, 1, 4, 4)],
    ("ieee", "any"): [(32, 32, 32, 4, 4, 3), (16, 32, 32, 1, 4, 2)],
    ("nf4t", "any"): [(16, 32, 64, 1, 4, 4), (32, 32, 32, 1, 4, 3), (32, 32, 32, 1, 4, 2)],
    ("nf4w", "any"): [(16, 64, 32, 1, 4, 4), (16, 64, 64, 1, 4, 2), (16, 32, 64, 1, 4, 3), (32, 64, 32, 1, 4, 3),
                      (32, 32, 32, 1, 4, 3)],
    ("nf4f32", "any"): [(16, 32, 32, 1, 4, 3), (32, 32, 32, 1, 4, 3), (16, 64, 16, 1, 4, 3)],
}
_KINDS = ("16", "16s", "16f", "16u", "tf32", "ieee", "nf4t", "nf4w", "nf4f32")


def _smem_class(cc: int) -> str:
    smem = SMEM_PER_BLOCK.get(cc, 99 * 1024)
    return "227k" if smem >= 227 * 1024 else "163k" if smem >= 163 * 1024 else "99k"


def _aligned(args) -> bool:
    """16-byte aligned rows for 16-bit operands (vectorised loads, cp.async pipelining)."""
    return all(int(args.get(n, 8)) in (0, 1) or int(args.get(n, 8)) % 8 == 0
               for n in ("K", "N", "sxm", "sxk", "swk", "swn"))


def _operand_kind(args) -> str:
    if args.get("W_NF4"):
        return "nf4f32" if args.get("F32_DOT") else "nf4t" if args.get("W_T") else "nf4w"
    if args.get("F32_DOT"):
        return "tf32" if args.get("DOT_PREC") == "tf32" else "ieee"
    if not _aligned(args):
        return "16u"
    if args.get("HAS_LR") and args.get("LR_F32") and args.get("LR_PREC") != "tf32":
        return "16f"
    if args.get("LR_MASK") or (args.get("HAS_LR") and args.get("LR_F32")):
        return "16s"
    return "16"


def _nf4_fits(cfg: tuple, args) -> bool:
    """The in-GEMM decode reads one absmax per tile row/column: the tile's span along the
    weight's contiguous dimension (BK for W^T, BN for W) must not cross an NF4 block."""
    if not args or not args.get("W_NF4"):
        return True
    span = cfg[2] if args.get("W_T") else cfg[1]
    return span <= int(args.get("q_bs", 64))


def get_fused_linear_configs(cc=None, args=None):
    """Launch configs (see _triton.py): one fixed config under the interpreter; every target's
    configs when cc is None; for compute capability `cc` the configs that fit its shared memory
    without spills, for the operand kind of the launch's named arguments `args`."""
    if interpreting():
        return [triton.Config({"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 4}, num_warps=4)]
    classes = ("227k", "163k", "99k") if cc is None else (_smem_class(cc),)
    kinds = _KINDS if not args else (_operand_kind(args),)
    seen, out = set(), []
    for kind in kinds:
        for cls in classes:
            for cfg in _CONFIGS.get((kind, cls), _CONFIGS.get((kind, "any"), [])):
                if cfg in seen or not _nf4_fits(cfg, args):
                    continue
                seen.add(cfg)
                bm, bn, bk, g, w, st = cfg
                out.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": g}, num_warps=w, num_stages=st))
    return out


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


_DUMMY_SEGS: dict = {}


def _no_segments(device: torch.device) -> Tensor:
    """int32 [3] zeros: the segment-table slot of launches without low-rank terms (never read;
    an int32 table keeps the pointer type of every launch the same)."""
    key = str(device)
    hit = _DUMMY_SEGS.get(key)
    if hit is None:
        hit = _DUMMY_SEGS[key] = torch.zeros(3, dtype=torch.int32, device=device)
    return hit


if HAS_TRITON:
    from ._triton import keep_mask
    from .nf4 import nf4_block_absmax, nf4_code_select

    @triton.autotune(configs=get_fused_linear_configs(),
                     # every argument get_fused_linear_configs reads (a cached choice is reused for
                     # the whole key, the pruner runs only on a miss): the operand kind, q_bs (an NF4
                     # tile must not span two blocks) and the strides of the alignment check
                     key=["M_BUCKET", "N", "K", "N_SEG", "BR", "W_NF4", "W_T", "LR_MASK", "F32_DOT", "DOT_PREC",
                          "HAS_LR", "LR_F32", "LR_PREC", "q_bs", "sxm", "sxk", "swk", "swn"],
                     prune_configs_by={"early_config_prune": target_pruner(get_fused_linear_configs)},
                     reset_to_zero=["red_ptr"])
    @triton.jit
    def _fused_linear_kernel(
        # pointers
        x_ptr, w_ptr, out_ptr, bias_ptr, pro_ptr, col_ptr, pre_ptr, red_ptr, z_ptr,
        l_ptr, r_ptr, seg_ptr, segscale_ptr, seeds_ptr,
        # NF4 weight (W_NF4): packed, absmax, code, offset, absmax2, code2, the block sizes and
        # the length of W's rows in elements (in_features)
        q_packed, q_absmax, q_code, q_offset, q_absmax2, q_code2, q_bs, q_bs2, q_row,
        # sizes
        M, N, K, M_BUCKET, N_SEG,
        # strides
        sxm, sxk, swk, swn, som, son, spm, spn, szm, szn, slm, slr, srr, srn,
        # meta
        HAS_LR: tl.constexpr, LR_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_SCALED: tl.constexpr,
        HAS_PRO: tl.constexpr, HAS_COL: tl.constexpr, STORE_PRE: tl.constexpr, REDUCE: tl.constexpr,
        F32_DOT: tl.constexpr, DOT_PREC: tl.constexpr, LR_F32: tl.constexpr, LR_PREC: tl.constexpr, BR: tl.constexpr,
        W_NF4: tl.constexpr, W_T: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
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
        # 64-bit offsets: row x stride reaches 2^31 elements on large outputs (lm_head N=128256)
        rm64, rn64 = rm.to(tl.int64), rn.to(tl.int64)
        x_m = x_ptr + rm64[:, None] * sxm

        if W_NF4:
            # the 4-bit weight is decoded in registers: the packed bytes are the only per-element
            # load; the 16 code values are scalars (select tree), the absmax one per block
            tl.static_assert(BK <= 4096)
            c0, c1, c2, c3 = tl.load(q_code), tl.load(q_code + 1), tl.load(q_code + 2), tl.load(q_code + 3)
            c4, c5, c6, c7 = tl.load(q_code + 4), tl.load(q_code + 5), tl.load(q_code + 6), tl.load(q_code + 7)
            c8, c9, c10, c11 = tl.load(q_code + 8), tl.load(q_code + 9), tl.load(q_code + 10), tl.load(q_code + 11)
            c12, c13, c14, c15 = tl.load(q_code + 12), tl.load(q_code + 13), tl.load(q_code + 14), tl.load(q_code + 15)
            q_off = tl.load(q_offset) if DOUBLE_QUANT else 0.0
            n_blk = q_row // q_bs  # blocks per row of W (the launcher checks q_row % q_bs == 0)
            half_row = q_row // 2
            if W_T:  # [K, N] = W^T: element (k, n) = W[n, k], contiguous along k
                q_n = q_packed + rn64[None, :] * half_row
            else:  # [K, N] = W: element (k, n) = W[k, n], contiguous along n
                q_n = q_packed + (rn >> 1)[None, :]
                lo_n = ((rn & 1) != 0)[None, :]
                blk_n = pid_n * BN // q_bs  # the whole tile lies in one block along n
        else:
            w_n = w_ptr + rn64[None, :] * swn

        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            rk64 = rk.to(tl.int64)
            k_ok = rk < K
            a = tl.load(x_m + rk64[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b_ok = k_ok[:, None] & n_ok[None, :]
            if W_NF4:
                if W_T:
                    byte = tl.load(q_n + (rk >> 1)[:, None], mask=b_ok, other=0).to(tl.int32)
                    nib = tl.where(((rk & 1) != 0)[:, None], byte & 0xF, byte >> 4)
                    am = nf4_block_absmax(q_absmax, q_off, q_absmax2, q_code2, rn64 * n_blk + k0 // q_bs, n_ok,
                                          q_bs2, DOUBLE_QUANT)[None, :]
                else:
                    byte = tl.load(q_n + rk64[:, None] * half_row, mask=b_ok, other=0).to(tl.int32)
                    nib = tl.where(lo_n, byte & 0xF, byte >> 4)
                    am = nf4_block_absmax(q_absmax, q_off, q_absmax2, q_code2, rk64 * n_blk + blk_n, k_ok,
                                          q_bs2, DOUBLE_QUANT)[:, None]
                b = nf4_code_select(nib, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
                b = (b * am).to(x_ptr.dtype.element_ty)
            else:
                b = tl.load(w_n + rk64[:, None] * swk, mask=b_ok, other=0.0)
            if HAS_PRO:
                p = tl.load(pro_ptr + rk, mask=k_ok, other=0.0)
                b = (b.to(tl.float32) * p.to(tl.float32)[:, None]).to(b.dtype)
            if F32_DOT:  # fp32 operands (or the interpreter): tf32 mma, or FMA when DOT_PREC is "ieee"
                a, b = a.to(tl.float32), b.to(tl.float32)
            else:  # 16-bit mma, fp32 accumulation
                b = b.to(a.dtype)
            acc = tl.dot(a, b, acc=acc, input_precision=DOT_PREC)

        if HAS_LR:  # low-rank terms, one per adapter (compiled only when there are any)
            l_m = l_ptr + rm64[:, None] * slm
            r_n = r_ptr + rn64[None, :] * srn
            for seg in range(0, N_SEG):
                off = tl.load(seg_ptr + 3 * seg)
                rank = tl.load(seg_ptr + 3 * seg + 1)
                lr = tl.zeros((BM, BN), dtype=tl.float32)
                for r0 in range(0, rank, BR):
                    rr = r0 + tl.arange(0, BR)
                    rr64 = (off + rr).to(tl.int64)
                    la = tl.load(l_m + rr64[None, :] * slr, mask=m_ok[:, None] & (rr[None, :] < rank), other=0.0)
                    rb = tl.load(r_n + rr64[:, None] * srr, mask=(rr[:, None] < rank) & n_ok[None, :], other=0.0)
                    if LR_F32:  # fp32 adapters: tf32 only when allowed (LR_PREC), else exact
                        la, rb = la.to(tl.float32), rb.to(tl.float32)
                    else:  # 16-bit adapters: 16-bit mma, fp32 accumulation
                        rb = rb.to(la.dtype)
                    lr = tl.dot(la, rb, acc=lr, input_precision=LR_PREC)
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
            tl.store(pre_ptr + rm64[:, None] * spm + rn64[None, :] * spn, acc.to(pre_ptr.dtype.element_ty), mask=tile_ok)
        if REDUCE:
            z = tl.load(z_ptr + rm64[:, None] * szm + rn64[None, :] * szn, mask=tile_ok, other=0.0).to(tl.float32)
            tl.atomic_add(red_ptr + rn, tl.sum(acc * z, axis=0), mask=n_ok)
        if HAS_COL:
            acc = acc * tl.load(col_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            if not BIAS_SCALED:
                acc = acc + bias[None, :]
        tl.store(out_ptr + rm64[:, None] * som + rn64[None, :] * son, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


def _dot_precision(*dtypes: torch.dtype) -> tuple[bool, str]:
    """(fp32 dot?, input_precision) of a dot whose operands have `dtypes`. fp32 operands: exact
    fp32 products ("ieee", FMA) as torch's default unless the user allowed TF32; 16-bit
    operands: 16-bit mma with fp32 accumulation (the precision string does not apply). The
    interpreter runs every dot in fp32 (DESIGN.md: its 16-bit dots are wrong)."""
    f32 = any(d == torch.float32 for d in dtypes)
    if f32 and not torch.backends.cuda.matmul.allow_tf32:
        return True, "ieee"
    return f32 or interpreting(), "tf32"


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
    4-bit weight is then decoded tile by tile inside the GEMM (read once, never expanded) when
    `nf4_decodes_in_gemm` (blocks aligned to W's rows, as in every transformer layer), else
    expanded by nf4_dequantize first."""
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
    if nf4 is not None and not nf4_decodes_in_gemm(nf4.op):
        # blocks that straddle rows of W: expand the weight once, then the dense GEMM
        w_dense = nf4_dequantize(nf4.op)
        nf4, w = None, (w_dense.t() if nf4.transpose else w_dense)
    dummy = out
    segs = list(segments) if has_lr else []
    masked = any(s.p > 0.0 for s in segs)
    if masked and (seeds is None or seeds.numel() < len(segs)):
        raise ValueError("fused_linear: masked low-rank segments need one seed each")
    seg_ints, seg_scales = segment_table(segs, dev) if segs else (_no_segments(dev), dummy)
    opt = lambda t: t if t is not None else dummy  # noqa: E731  (unused pointer slots)
    strides = lambda t: t.stride() if t is not None else (0, 0)  # noqa: E731
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    if nf4 is not None:
        q_args = (*nf4_kernel_args(nf4.op), nf4.op.blocksize, nf4.op.blocksize2, nf4.op.shape[1])
        w_t, (swk, swn), w_dtype = dummy, nf4.element_strides(), x.dtype
    else:
        q_args = (dummy,) * 6 + (1, 1, 1)
        w_t, (swk, swn), w_dtype = w, w.stride(), w.dtype
    f32_dot, dot_prec = _dot_precision(x.dtype, w_dtype)
    lr_f32, lr_prec = _dot_precision(lr_left.dtype, lr_right.dtype) if segs else (f32_dot, dot_prec)
    _fused_linear_kernel[grid](
        x, w_t, out, opt(bias), opt(pro_scale), opt(col_scale), opt(pre), opt(red), opt(reduce_with),
        lr_left if segs else dummy, lr_right if segs else dummy, seg_ints, seg_scales,
        seeds if masked else dummy, *q_args,
        M, N, K, min(next_pow2(M, 16), 4096), len(segs),
        x.stride(0), x.stride(1), swk, swn, out.stride(0), out.stride(1),
        *strides(pre), *strides(reduce_with), *strides(lr_left if segs else None), *strides(lr_right if segs else None),
        HAS_LR=bool(segs), LR_MASK=masked, HAS_BIAS=bias is not None, BIAS_SCALED=bias_scaled,
        HAS_PRO=pro_scale is not None, HAS_COL=col_scale is not None, STORE_PRE=store_pre,
        REDUCE=reduce_with is not None, F32_DOT=f32_dot, DOT_PREC=dot_prec, LR_F32=lr_f32, LR_PREC=lr_prec,
        BR=min(next_pow2(max((s.rank for s in segs), default=1)), 64),
        W_NF4=nf4 is not None, W_T=nf4 is not None and nf4.transpose,
        DOUBLE_QUANT=nf4 is not None and nf4.op.double_quant,
        # bitsandbytes rounds code2 * absmax2 before adding the offset: no fused multiply-add
        enable_fp_fusion=nf4 is None,
    )
    return out, pre, red


__all__ = ["Segment", "fused_linear", "nf4_decodes_in_gemm", "fused_linear_ref", "get_fused_linear_configs", "keep_scale"]
