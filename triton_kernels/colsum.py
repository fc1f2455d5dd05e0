"""Fused product + column sum: red[n] = sum_m a[m, n] b[m, n] in fp32, without the [M, N]
product. The gradient of the IA3 vector of output-feature layers (a = dy, b = x W^T + b) and of
the DoRA magnitude (a = dy, b = ypre) (IA3: Liu et al., 2022, arXiv:2205.05638; DoRA: Liu et
al., 2024, arXiv:2402.09353)."""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, interpreting, target_pruner, tl, triton

Tensor = torch.Tensor


def colsum_mul_ref(
    a: Tensor,  # [M, N]
    b: Tensor,  # [M, N]
) -> Tensor:
    """fp32 [N]."""
    return (a.float() * b.float()).sum(0)


def get_colsum_configs(cc=None, args=None):
    """Launch configs (see _triton.py: per-target launch configs). The same on every target:
    compiled for sm_80/86/89/90/120 in fp32/fp16/bf16 they use <= 146 registers, no spills and
    <= 4 KB of shared memory (the reduction keeps no tile in shared memory)."""
    if interpreting():
        return [triton.Config({"BM": 32, "BN": 32}, num_warps=4)]
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=3)
            for bm, bn, w in ((64, 128, 4), (128, 64, 4), (32, 256, 8))]


if HAS_TRITON:

    @triton.autotune(configs=get_colsum_configs(), key=["N", "SPLIT"], reset_to_zero=["out_ptr"],
                     prune_configs_by={"early_config_prune": target_pruner(get_colsum_configs)})
    @triton.jit
    def _colsum_mul_kernel(
        # pointers
        a_ptr, b_ptr, out_ptr,
        # sizes
        M, N, SPLIT,
        # strides
        sam, san, sbm, sbn,
        # meta
        BM: tl.constexpr, BN: tl.constexpr,
    ):
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        split = tl.program_id(1)
        rows_per = tl.cdiv(tl.cdiv(M, SPLIT), BM) * BM
        acc = tl.zeros((BN,), dtype=tl.float32)
        # 64-bit offsets: M x stride passes 2^31 elements at an lm_head's N = 128256 from M = 16744
        rn64 = rn.to(tl.int64)
        a_cols = a_ptr + rn64[None, :] * san
        b_cols = b_ptr + rn64[None, :] * sbn
        for m0 in range(split * rows_per, tl.minimum(M, (split + 1) * rows_per), BM):
            rm = m0 + tl.arange(0, BM)
            rm64 = rm.to(tl.int64)
            ok = (rm[:, None] < M) & (rn[None, :] < N)
            at = tl.load(a_cols + rm64[:, None] * sam, mask=ok, other=0.0).to(tl.float32)
            bt = tl.load(b_cols + rm64[:, None] * sbm, mask=ok, other=0.0).to(tl.float32)
            acc += tl.sum(at * bt, axis=0)
        if SPLIT == 1:
            tl.store(out_ptr + rn, acc, mask=rn < N)
        else:
            tl.atomic_add(out_ptr + rn, acc, mask=rn < N)


def colsum_mul(a: Tensor, b: Tensor) -> Tensor:
    """Triton launcher with the signature of `colsum_mul_ref`."""
    if not HAS_TRITON:
        raise RuntimeError("colsum_mul needs triton; install it or set PEFT_FAST_BACKEND=torch")
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"colsum_mul: shapes {tuple(a.shape)} and {tuple(b.shape)} differ or are not 2-D")
    M, N = a.shape
    out = torch.zeros((N,), dtype=torch.float32, device=a.device)
    if M == 0:
        return out
    split = 1 if interpreting() or not a.is_cuda else max(1, min(triton.cdiv(M, 256), 64))
    grid = lambda meta: (triton.cdiv(N, meta["BN"]), split)  # noqa: E731
    _colsum_mul_kernel[grid](a, b, out, M, N, split, a.stride(0), a.stride(1), b.stride(0), b.stride(1))
    return out
