"""Many LoRA adapters in one batch: every token carries its own adapter index.

Segmented kernels in the style of Punica (Chen et al., "Punica: Multi-Tenant LoRA Serving",
MLSys 2024, arXiv:2310.18547) and S-LoRA (Sheng et al., 2023, arXiv:2311.03285): the adapters'
A and B are stacked (ranks zero-padded to the largest), tokens are grouped by adapter
(`order`, `starts`, `counts` from the segment metadata), and one launch serves all adapters:
    shrink:  xa[i]       = x[order[i]] A[a]^T                  (rows i of adapter a's segment)
    expand:  y[order[i]] += s[a] * xa[i] B[a]^T
The decode variant needs no grouping: one program per (token, column block) reads the token's
adapter index and computes its whole low-rank update (xa stays in registers).
Tokens whose index is outside [0, n) get no update (-1 is "__base__"; the kernels and the
references agree on any other out-of-range index too, and never read adapter memory for it).

GPU notes. Every offset that can reach 2^31 elements (token x row stride, adapter x adapter
stride) is computed in int64. The shrink and expand dots run on the adapters' dtype: 16-bit
adapters use 16-bit tensor-core dots with fp32 accumulation (x, resp. xa, cast to that dtype,
as `lora_mixed_ref` computes), fp32 adapters use ieee fp32 dots unless
torch.backends.cuda.matmul.allow_tf32 is set (then tf32). Under the interpreter every dot is
fp32 (bf16 dots are wrong there). `y` is updated in place, so the autotuned kernels that do it
declare `restore_value=["y_ptr"]`: benchmarking configs must not add the update more than once.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ._triton import HAS_TRITON, config_key, interpreting, next_pow2, target_pruner, tl, triton

Tensor = torch.Tensor


def segments_ref(token_idx: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """(order, starts, counts): tokens stably sorted by adapter index (negative indices first,
    indices >= n last, both in no segment), where each adapter's group starts in `order`, and
    its size (int64 [T], [n], [n])."""
    order = torch.sort(token_idx, stable=True).indices
    valid = (token_idx >= 0) & (token_idx < n)
    counts = torch.bincount(token_idx[valid], minlength=n)
    starts = (token_idx < 0).sum() + torch.cumsum(counts, 0) - counts
    return order, starts, counts


def lora_mixed_ref(
    x: Tensor,  # [T, K]
    lora_A: Tensor,  # [n, R, K] stacked, zero-padded ranks
    lora_B: Tensor,  # [n, N, R]
    scales: Tensor,  # fp32 [n]
    token_idx: Tensor,  # int64 [T], -1 (or any index outside [0, n)) = no adapter
    out: Tensor,  # [T, N], updated in place and returned
    order: Optional[Tensor] = None,  # the segment metadata, if already computed
    starts: Optional[Tensor] = None,
    counts: Optional[Tensor] = None,
    gather: Optional[Callable[[Tensor, Tensor], Tensor]] = None,  # rows x[index] (default index_select)
) -> Tensor:
    """out += s[idx] * (x A[idx]^T) B[idx]^T per token. Tokens are grouped by adapter, so each
    adapter costs two contiguous matmuls (no per-token weight gathers)."""
    if order is None:
        order, starts, counts = segments_ref(token_idx, lora_A.shape[0])
    st, ct, sc = starts.tolist(), counts.tolist(), scales.tolist()
    if not ct:
        return out
    # tokens with a negative index come first in `order`, those with an index >= n last: the
    # adapters' segments are the rows n_base .. n_base + n_seg of `order`
    n_base, n_seg = st[0], sum(ct)
    xl = x.to(lora_A.dtype)
    used = [a for a, c in enumerate(ct) if c]
    if n_seg == x.shape[0] and len(used) == 1:  # the whole batch on one adapter: no grouping needed
        a = used[0]
        upd = (xl @ lora_A[a].t()) @ lora_B[a].t()
        return out.add_(upd.to(out.dtype), alpha=sc[a])
    rows = order[n_base:n_base + n_seg]
    xs = (gather or (lambda t, i: t.index_select(0, i)))(xl, rows)
    delta = torch.empty((n_seg, lora_B.shape[1]), dtype=lora_A.dtype, device=x.device)
    for a, (s0, c) in enumerate(zip(st, ct)):
        if c:
            d = delta[s0 - n_base:s0 - n_base + c]
            torch.mm(xs[s0 - n_base:s0 - n_base + c] @ lora_A[a].t(), lora_B[a].t(), out=d).mul_(sc[a])
    out.index_add_(0, rows, delta.to(out.dtype))
    return out


# Launch configs per target (see _triton.py). Tiles: shrink x [BM, BK] @ A^T [BK, BRN] (one rank
# chunk of BRN columns per program), expand xa [BM, BK] @ B^T [BK, BN] summed over rank chunks of
# BK, bgmv A [BR, BK] and B^T [BR, BN] in fp32 registers (one token per program; BR = next_pow2
# of the rank, 16..256). Chunking the rank keeps the shrink/expand tiles independent of it (no
# [BM, 256] fp32 accumulators). Lists are per BR and per dot kind (16-bit, tf32, ieee fp32); each
# has >= 3 configs, all measured (triton.compile + ptxas, triton 3.9 and 3.6, BR 16..256, fp32/
# fp16/bf16, see benchmarks/aot_compile.py) to use <= 64 KB shared memory and spill nothing on
# sm_80, sm_86, sm_89, sm_90 and sm_120 (the ieee fp32 FMA dots spill with larger tiles, the
# bgmv register tiles with BK x BR > 32 x 128 on 4 warps), so one list serves every target:
# `cc` is accepted for the get_X_configs(cc, args) protocol of _triton.target_pruner.
_BRS = (16, 32, 64, 128, 256)


def _dot_kind(args) -> str:
    """'16' (16-bit tensor cores), 'tf32' or 'f32' (ieee fp32: FMA dot) from a launch's args."""
    if not args.get("F32_DOT", False):
        return "16"
    return "tf32" if args.get("DOT_PREC") == "tf32" else "f32"


def _shrink_rows(br: int, kind: str):  # (BM, BK, BRN, warps, stages)
    brn = min(br, 64)
    if kind == "16":
        return [(16, 64, brn, 4, 3), (64, 64, brn, 8, 3), (32, 64, brn, 4, 3)]
    rows = [(32, 32, brn, 4, 3), (64, 32, brn, 8, 3), (16, 32, brn, 4, 3)]
    return rows + [(64, 64, brn, 8, 2)] if kind == "tf32" else rows  # ieee BM64/BK64 spills on sm_80


def _expand_rows(br: int, kind: str):  # (BM, BN, BK, warps), BK (rank chunk) <= BR
    if kind == "16":
        rows = [(16, 64, 32, 4), (64, 64, 32, 8), (32, 64, 16, 4), (32, 64, 32, 4)]
    elif kind == "tf32":
        rows = [(16, 64, 32, 4), (32, 64, 32, 4), (64, 64, 32, 8)]
    else:
        rows = [(16, 64, 32, 4), (32, 64, 32, 8), (32, 32, 32, 4)]  # ieee fp32 (FMA dot): small tiles
    return [(bm, bn, min(bk, br), w) for bm, bn, bk, w in rows]


def _bgmv_rows(br: int):  # (BK, BN, warps)
    if br <= 64:
        return [(64, 128, 4), (32, 64, 4), (64, 128, 8), (32, 128, 4)]
    if br == 128:
        return [(16, 64, 4), (32, 128, 8), (16, 128, 8), (64, 64, 8)]
    return [(16, 64, 8), (16, 32, 8), (32, 64, 16)]


def _select(rows_of, args, make, by_kind=True):
    """Configs for the launch's BR (and dot kind), or the union over all when args is None.
    Reads BR, and F32_DOT / DOT_PREC when `by_kind` (kernels without a dot kind pass False):
    each name read must be in the kernel's autotune key."""
    kinds = ("16", "tf32", "f32") if by_kind else ("16",)
    if args and "BR" in args:
        keys = [(args["BR"], _dot_kind(args) if by_kind else "16")]
    else:
        keys = [(br, kind) for br in _BRS for kind in kinds]
    out, seen = [], set()
    for br, kind in keys:
        for row in rows_of(br, kind):
            cfg = make(row)
            if config_key(cfg) not in seen:
                seen.add(config_key(cfg))
                out.append(cfg)
    return out


def get_sgmv_shrink_configs(cc=None, args=None):
    if interpreting():
        return [triton.Config({"BM": 16, "BK": 32, "BRN": 16}, num_warps=4)]
    return _select(_shrink_rows, args, lambda r: triton.Config({"BM": r[0], "BK": r[1], "BRN": r[2]},
                                                               num_warps=r[3], num_stages=r[4]))


def get_sgmv_expand_configs(cc=None, args=None):
    if interpreting():
        return [triton.Config({"BM": 16, "BN": 32, "BK": 16}, num_warps=4)]
    return _select(_expand_rows, args, lambda r: triton.Config({"BM": r[0], "BN": r[1], "BK": r[2]},
                                                               num_warps=r[3], num_stages=2))


def get_bgmv_configs(cc=None, args=None):
    if interpreting():
        return [triton.Config({"BK": 32, "BN": 32}, num_warps=4)]
    return _select(lambda br, kind: _bgmv_rows(br), args,
                   lambda r: triton.Config({"BK": r[0], "BN": r[1]}, num_warps=r[2], num_stages=1), by_kind=False)


if HAS_TRITON:

    @triton.autotune(configs=get_sgmv_shrink_configs(), key=["K", "BR", "T_BUCKET", "F32_DOT", "DOT_PREC"],
                     prune_configs_by={"early_config_prune": target_pruner(get_sgmv_shrink_configs)})
    @triton.jit
    def _sgmv_shrink_kernel(
        # pointers: x [T, K], A [n, R, K], out [T, R] fp32 (sorted rows), order/starts/counts
        x_ptr, a_ptr, out_ptr, order_ptr, starts_ptr, counts_ptr,
        # sizes
        K, R, T_BUCKET,
        # strides
        sxm, sxk, san, sar, sak, som, sor,
        # meta (BR: next_pow2 of the rank, the autotune key; BRN: rank columns per program)
        F32_DOT: tl.constexpr, DOT_PREC: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
        BRN: tl.constexpr,
    ):
        tile, a, rc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(starts_ptr + a).to(tl.int64)
        cnt = tl.load(counts_ptr + a)
        if tile * BM >= cnt:  # this adapter's segment has no rows here
            return
        rows = tile * BM + tl.arange(0, BM)
        ok = rows < cnt
        tok = tl.load(order_ptr + start + rows, mask=ok, other=0).to(tl.int64)
        rr = rc * BRN + tl.arange(0, BRN)
        rk = tl.arange(0, BK)
        x_ptrs = x_ptr + tok[:, None] * sxm + rk[None, :] * sxk  # int64: tok * sxm, a * san can pass 2^31
        a_ptrs = a_ptr + a.to(tl.int64) * san + rr[None, :] * sar + rk[:, None] * sak
        acc = tl.zeros((BM, BRN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            xt = tl.load(x_ptrs, mask=ok[:, None] & (rk[None, :] < K - k0), other=0.0)
            at = tl.load(a_ptrs, mask=(rr[None, :] < R) & (rk[:, None] < K - k0), other=0.0)
            if F32_DOT:  # fp32 adapters (ieee or tf32 by DOT_PREC), or the interpreter
                xt, at = xt.to(tl.float32), at.to(tl.float32)
            else:  # 16-bit adapters: 16-bit tensor-core dot, fp32 accumulation
                xt = xt.to(at.dtype)
            acc = tl.dot(xt, at, acc=acc, input_precision=DOT_PREC)
            x_ptrs += BK * sxk
            a_ptrs += BK * sak
        tl.store(out_ptr + (start + rows)[:, None] * som + rr[None, :] * sor, acc, mask=ok[:, None] & (rr[None, :] < R))

    @triton.autotune(configs=get_sgmv_expand_configs(), key=["N", "BR", "T_BUCKET", "F32_DOT", "DOT_PREC"], restore_value=["y_ptr"],
                     prune_configs_by={"early_config_prune": target_pruner(get_sgmv_expand_configs)})
    @triton.jit
    def _sgmv_expand_kernel(
        # pointers: xa [T, R] fp32 (sorted rows), B [n, N, R], scales fp32 [n], y [T, N] (updated)
        xa_ptr, b_ptr, s_ptr, y_ptr, order_ptr, starts_ptr, counts_ptr,
        # sizes
        N, R, T_BUCKET,
        # strides
        sxm, sxr, sbn_, sbo, sbr, sym, syn,
        # meta (BR: next_pow2 of the rank, the autotune key; BK: rank chunk of the dot)
        F32_DOT: tl.constexpr, DOT_PREC: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        tile, a, nt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(starts_ptr + a).to(tl.int64)
        cnt = tl.load(counts_ptr + a)
        if tile * BM >= cnt:
            return
        rows = tile * BM + tl.arange(0, BM)
        ok = rows < cnt
        tok = tl.load(order_ptr + start + rows, mask=ok, other=0).to(tl.int64)
        rn = nt * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        xa_ptrs = xa_ptr + (start + rows)[:, None] * sxm + rk[None, :] * sxr
        b_ptrs = b_ptr + a.to(tl.int64) * sbn_ + rn[None, :] * sbo + rk[:, None] * sbr  # int64: a * sbn_
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for r0 in range(0, R, BK):
            xa = tl.load(xa_ptrs, mask=ok[:, None] & (rk[None, :] < R - r0), other=0.0)
            bt = tl.load(b_ptrs, mask=(rk[:, None] < R - r0) & (rn[None, :] < N), other=0.0)
            if F32_DOT:  # fp32 adapters (ieee or tf32 by DOT_PREC), or the interpreter
                acc = tl.dot(xa, bt.to(tl.float32), acc=acc, input_precision=DOT_PREC)
            else:  # 16-bit adapters: xa rounded to B's dtype (as the reference does), 16-bit mma, fp32 acc
                acc = tl.dot(xa.to(bt.dtype), bt, acc=acc)
            xa_ptrs += BK * sxr
            b_ptrs += BK * sbr
        upd = acc * tl.load(s_ptr + a)
        ptrs = y_ptr + tok[:, None] * sym + rn[None, :] * syn
        m = ok[:, None] & (rn[None, :] < N)
        y = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)  # each token is in exactly one segment: no race
        tl.store(ptrs, (y + upd).to(y_ptr.dtype.element_ty), mask=m)

    @triton.autotune(configs=get_bgmv_configs(), key=["K", "N", "BR"], restore_value=["y_ptr"],
                     prune_configs_by={"early_config_prune": target_pruner(get_bgmv_configs)})
    @triton.jit
    def _bgmv_kernel(
        # pointers: x [T, K], A [n, R, K], B [n, N, R], scales fp32 [n], token_idx [T], y [T, N] (updated)
        x_ptr, a_ptr, b_ptr, s_ptr, idx_ptr, y_ptr,
        # sizes (n_adapters: the number of stacked adapters)
        K, N, R, n_adapters,
        # strides
        sxm, sxk, san, sar, sak, sbn_, sbo, sbr, sym, syn,
        # meta
        BR: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    ):
        # One token per program: vector x matrix products (M = 1) have no tensor-core form, so both
        # products are fp32 FMA reductions (exact fp32 accumulation of the widened inputs).
        t, nt = tl.program_id(0), tl.program_id(1)
        a = tl.load(idx_ptr + t).to(tl.int64)
        if (a < 0) | (a >= n_adapters):  # "__base__" (-1) or out of range: no update, no adapter read
            return
        t = t.to(tl.int64)  # int64 offsets: t * sxm, a * san can pass 2^31 elements
        rr = tl.arange(0, BR)
        xa = tl.zeros((BR,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            xv = tl.load(x_ptr + t * sxm + rk * sxk, mask=rk < K, other=0.0).to(tl.float32)
            at = tl.load(a_ptr + a * san + rr[:, None] * sar + rk[None, :] * sak, mask=(rr[:, None] < R) & (rk[None, :] < K),
                         other=0.0).to(tl.float32)
            xa += tl.sum(at * xv[None, :], axis=1)
        rn = nt * BN + tl.arange(0, BN)
        bt = tl.load(b_ptr + a * sbn_ + rn[None, :] * sbo + rr[:, None] * sbr, mask=(rr[:, None] < R) & (rn[None, :] < N),
                     other=0.0).to(tl.float32)
        upd = tl.sum(bt * xa[:, None], axis=0) * tl.load(s_ptr + a)
        ptrs = y_ptr + t * sym + rn * syn
        y = tl.load(ptrs, mask=rn < N, other=0.0).to(tl.float32)
        tl.store(ptrs, (y + upd).to(y_ptr.dtype.element_ty), mask=rn < N)


def _check(x, lora_A, lora_B, scales, token_idx, out):
    T, K = x.shape
    n, R, Ka = lora_A.shape
    if Ka != K or lora_B.shape[0] != n or lora_B.shape[2] != R:
        raise ValueError(f"lora_mixed: x {tuple(x.shape)}, A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)} do not fit")
    if token_idx.shape != (T,) or out.shape != (T, lora_B.shape[1]) or scales.shape != (n,):
        raise ValueError(f"lora_mixed: token_idx {tuple(token_idx.shape)}, out {tuple(out.shape)}, scales "
                         f"{tuple(scales.shape)} do not fit T={T}, N={lora_B.shape[1]}, n={n}")
    if R > 256:
        raise ValueError(f"lora_mixed: ranks up to 256 are supported, got {R}")


DECODE_TOKENS = 64  # up to this many tokens, the per-token kernel (no grouping) is used


def lora_mixed(x, lora_A, lora_B, scales, token_idx, out, order=None, starts=None, counts=None):
    """Triton launcher with the signature of `lora_mixed_ref`: the per-token kernel for decode
    batches, the segmented shrink/expand pair otherwise (metadata computed if not given)."""
    if not HAS_TRITON:
        raise RuntimeError("lora_mixed needs triton; install it or set PEFT_FAST_BACKEND=torch")
    _check(x, lora_A, lora_B, scales, token_idx, out)
    T, K = x.shape
    n, R, _ = lora_A.shape
    N = lora_B.shape[1]
    if T == 0 or n == 0:
        return out
    BR = next_pow2(R)
    scales = scales.to(torch.float32)
    if T <= DECODE_TOKENS and order is None:
        grid = lambda meta: (T, triton.cdiv(N, meta["BN"]))  # noqa: E731
        _bgmv_kernel[grid](x, lora_A, lora_B, scales, token_idx, out, K, N, R, n, x.stride(0), x.stride(1),
                           *lora_A.stride(), *lora_B.stride(), out.stride(0), out.stride(1), BR=BR)
        return out
    if order is None:
        order, starts, counts = segments_ref(token_idx, n)
    xa = torch.empty((T, R), dtype=torch.float32, device=x.device)
    # the dots follow the adapters' dtype (16-bit tensor cores, or fp32: ieee unless TF32 is
    # allowed); the interpreter computes every dot in fp32 (its bf16 dots are wrong)
    prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 and not interpreting() else "ieee"
    tb = min(next_pow2(T), 8192)
    grid = lambda meta: (triton.cdiv(T, meta["BM"]), n, triton.cdiv(R, meta["BRN"]))  # noqa: E731
    _sgmv_shrink_kernel[grid](x, lora_A, xa, order, starts, counts, K, R, tb, x.stride(0), x.stride(1),
                              *lora_A.stride(), xa.stride(0), xa.stride(1),
                              F32_DOT=interpreting() or lora_A.dtype == torch.float32, DOT_PREC=prec, BR=BR)
    grid = lambda meta: (triton.cdiv(T, meta["BM"]), n, triton.cdiv(N, meta["BN"]))  # noqa: E731
    _sgmv_expand_kernel[grid](xa, lora_B, scales, out, order, starts, counts, N, R, tb, xa.stride(0), xa.stride(1),
                              *lora_B.stride(), out.stride(0), out.stride(1),
                              F32_DOT=interpreting() or lora_B.dtype == torch.float32, DOT_PREC=prec, BR=BR)
    return out
