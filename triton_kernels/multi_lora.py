"""Many LoRA adapters in one batch: every token carries its own adapter index.

Segmented kernels in the style of Punica (Chen et al., "Punica: Multi-Tenant LoRA Serving",
MLSys 2024, arXiv:2310.18547) and S-LoRA (Sheng et al., 2023, arXiv:2311.03285): the adapters'
A and B are stacked (ranks zero-padded to the largest), tokens are grouped by adapter
(`order`, `starts`, `counts` from the segment metadata), and one launch serves all adapters:
    shrink:  xa[i]       = x[order[i]] A[a]^T                  (rows i of adapter a's segment)
    expand:  y[order[i]] += s[a] * xa[i] B[a]^T
The decode variant needs no grouping: one program per (token, column block) reads the token's
adapter index and computes its whole low-rank update (xa stays in registers).
Tokens with index -1 ("__base__") get no update.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ._triton import HAS_TRITON, interpreting, next_pow2, tl, triton

Tensor = torch.Tensor


def segments_ref(token_idx: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """(order, starts, counts): tokens stably sorted by adapter (-1 first), where each adapter's
    group starts in `order`, and its size (int64 [T], [n], [n])."""
    order = torch.sort(token_idx, stable=True).indices
    counts = torch.bincount(token_idx[token_idx >= 0], minlength=n)[:n]
    starts = (token_idx < 0).sum() + torch.cumsum(counts, 0) - counts
    return order, starts, counts


def lora_mixed_ref(
    x: Tensor,  # [T, K]
    lora_A: Tensor,  # [n, R, K] stacked, zero-padded ranks
    lora_B: Tensor,  # [n, N, R]
    scales: Tensor,  # fp32 [n]
    token_idx: Tensor,  # int64 [T], -1 = no adapter
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
    n_base = x.shape[0] - sum(ct)  # "__base__" tokens come first in `order` and get nothing
    xl = x.to(lora_A.dtype)
    used = [a for a, c in enumerate(ct) if c]
    if n_base == 0 and len(used) == 1:  # the whole batch on one adapter: no grouping needed
        a = used[0]
        upd = (xl @ lora_A[a].t()) @ lora_B[a].t()
        return out.add_(upd.to(out.dtype), alpha=sc[a])
    xs = (gather or (lambda t, i: t.index_select(0, i)))(xl, order)
    delta = torch.empty((x.shape[0] - n_base, lora_B.shape[1]), dtype=lora_A.dtype, device=x.device)
    for a, (s0, c) in enumerate(zip(st, ct)):
        if c:
            d = delta[s0 - n_base:s0 - n_base + c]
            torch.mm(xs[s0:s0 + c] @ lora_A[a].t(), lora_B[a].t(), out=d).mul_(sc[a])
    out.index_add_(0, order[n_base:], delta.to(out.dtype))
    return out


def get_multi_lora_configs():
    if interpreting():
        return [triton.Config({"BM": 16, "BK": 32, "BN": 32}, num_warps=4)]
    return [triton.Config({"BM": bm, "BK": bk, "BN": bn}, num_warps=w, num_stages=3)
            for bm, bk, bn, w in ((16, 64, 128, 4), (64, 64, 128, 4), (128, 64, 128, 8), (32, 128, 64, 4))]


if HAS_TRITON:

    @triton.autotune(configs=get_multi_lora_configs(), key=["K", "BR", "T_BUCKET"])
    @triton.jit
    def _sgmv_shrink_kernel(
        # pointers: x [T, K], A [n, R, K], out [T, BR-padded R] (sorted rows), order/starts/counts
        x_ptr, a_ptr, out_ptr, order_ptr, starts_ptr, counts_ptr,
        # sizes
        K, R, T_BUCKET,
        # strides
        sxm, sxk, san, sar, sak, som, sor,
        # meta
        F32_DOT: tl.constexpr, DOT_PREC: tl.constexpr, BR: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    ):
        tile, a = tl.program_id(0), tl.program_id(1)
        start = tl.load(starts_ptr + a)
        cnt = tl.load(counts_ptr + a)
        if tile * BM >= cnt:  # this adapter's segment has no rows here
            return
        rows = tile * BM + tl.arange(0, BM)
        ok = rows < cnt
        tok = tl.load(order_ptr + start + rows, mask=ok, other=0)
        rr = tl.arange(0, BR)
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            xt = tl.load(x_ptr + tok[:, None] * sxm + rk[None, :] * sxk, mask=ok[:, None] & (rk[None, :] < K), other=0.0)
            at = tl.load(a_ptr + a * san + rr[None, :] * sar + rk[:, None] * sak,
                         mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
            if F32_DOT:
                xt, at = xt.to(tl.float32), at.to(tl.float32)
            else:
                xt = xt.to(at.dtype)
            acc = tl.dot(xt, at, acc=acc, input_precision=DOT_PREC)
        tl.store(out_ptr + (start + rows)[:, None] * som + rr[None, :] * sor, acc, mask=ok[:, None] & (rr[None, :] < R))

    @triton.autotune(configs=get_multi_lora_configs(), key=["N", "BR", "T_BUCKET"])
    @triton.jit
    def _sgmv_expand_kernel(
        # pointers: xa [T, R] fp32 (sorted rows), B [n, N, R], scales fp32 [n], y [T, N] (updated)
        xa_ptr, b_ptr, s_ptr, y_ptr, order_ptr, starts_ptr, counts_ptr,
        # sizes
        N, R, T_BUCKET,
        # strides
        sxm, sxr, sbn_, sbo, sbr, sym, syn,
        # meta
        DOT_PREC: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    ):
        tile, a, nt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(starts_ptr + a)
        cnt = tl.load(counts_ptr + a)
        if tile * BM >= cnt:
            return
        rows = tile * BM + tl.arange(0, BM)
        ok = rows < cnt
        tok = tl.load(order_ptr + start + rows, mask=ok, other=0)
        rr = tl.arange(0, BR)
        rn = nt * BN + tl.arange(0, BN)
        xa = tl.load(xa_ptr + (start + rows)[:, None] * sxm + rr[None, :] * sxr, mask=ok[:, None] & (rr[None, :] < R),
                     other=0.0)
        bt = tl.load(b_ptr + a * sbn_ + rn[None, :] * sbo + rr[:, None] * sbr, mask=(rr[:, None] < R) & (rn[None, :] < N),
                     other=0.0).to(tl.float32)
        upd = tl.dot(xa, bt, input_precision=DOT_PREC) * tl.load(s_ptr + a)
        ptrs = y_ptr + tok[:, None] * sym + rn[None, :] * syn
        m = ok[:, None] & (rn[None, :] < N)
        y = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)  # each token is in exactly one segment: no race
        tl.store(ptrs, (y + upd).to(y_ptr.dtype.element_ty), mask=m)

    @triton.autotune(configs=get_multi_lora_configs(), key=["K", "N", "BR"])
    @triton.jit
    def _bgmv_kernel(
        # pointers: x [T, K], A [n, R, K], B [n, N, R], scales fp32 [n], token_idx [T], y [T, N] (updated)
        x_ptr, a_ptr, b_ptr, s_ptr, idx_ptr, y_ptr,
        # sizes
        K, N, R,
        # strides
        sxm, sxk, san, sar, sak, sbn_, sbo, sbr, sym, syn,
        # meta
        BR: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    ):
        t, nt = tl.program_id(0), tl.program_id(1)
        a = tl.load(idx_ptr + t)
        if a < 0:
            return
        rr = tl.arange(0, BR)
        xa = tl.zeros((BR,), dtype=tl.float32)
        for k0 in range(0, K, BK):  # one token: the shrink is a vector-matrix product
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
        _bgmv_kernel[grid](x, lora_A, lora_B, scales, token_idx, out, K, N, R, x.stride(0), x.stride(1),
                           *lora_A.stride(), *lora_B.stride(), out.stride(0), out.stride(1), BR=BR)
        return out
    if order is None:
        order, starts, counts = segments_ref(token_idx, n)
    xa = torch.empty((T, R), dtype=torch.float32, device=x.device)
    f32 = interpreting() or x.dtype == torch.float32 or lora_A.dtype == torch.float32
    prec = "ieee" if f32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    tb = min(next_pow2(T), 8192)
    grid = lambda meta: (triton.cdiv(T, meta["BM"]), n)  # noqa: E731
    _sgmv_shrink_kernel[grid](x, lora_A, xa, order, starts, counts, K, R, tb, x.stride(0), x.stride(1),
                              *lora_A.stride(), xa.stride(0), xa.stride(1), F32_DOT=f32, DOT_PREC=prec, BR=BR)
    grid = lambda meta: (triton.cdiv(T, meta["BM"]), n, triton.cdiv(N, meta["BN"]))  # noqa: E731
    _sgmv_expand_kernel[grid](xa, lora_B, scales, out, order, starts, counts, N, R, tb, xa.stride(0), xa.stride(1),
                              *lora_B.stride(), out.stride(0), out.stride(1), DOT_PREC=prec, BR=BR)
    return out
