"""Every Triton kernel against its pure-torch `_ref`, through the interpreter on CPU.

Run with TRITON_INTERPRET=1 (make test does). Errors are judged by DESIGN.md's rule: the
kernel's error vs an fp64 reference is at most twice torch's own error in the same dtype.
"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_kernel_close

pytestmark = pytest.mark.interp

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _r(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def _d(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


from peft_fast.triton_kernels._triton import HAS_TRITON  # noqa: E402

if HAS_TRITON:
    import triton
    import triton.language as tl

    from peft_fast.triton_kernels._triton import keep_mask

    @triton.jit
    def _write_mask(out, seed_ptr, M, N, thr, BM: tl.constexpr, BN: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)[:, None]
        cols = tl.program_id(1) * BN + tl.arange(0, BN)[None, :]
        m = keep_mask(tl.load(seed_ptr), rows, cols, thr)
        tl.store(out + rows * N + cols, m.to(tl.int8), mask=(rows < M) & (cols < N))


def test_philox_keep_mask_matches_reference_bit_for_bit():
    from peft_fast.triton_kernels._triton import keep_threshold, philox_keep_mask_ref

    M, N = 37, 100
    for seed, p in ((0, 0.3), (12345, 0.05), (2**61 + 7, 0.9)):
        out = torch.full((M, N), 7, dtype=torch.int8)
        _write_mask[(triton.cdiv(M, 16), triton.cdiv(N, 32))](out, torch.tensor([seed]), M, N, keep_threshold(p),
                                                               BM=16, BN=32)
        ref = philox_keep_mask_ref(seed, M, N, p)
        assert torch.equal(out.bool(), ref), (seed, p)
        assert abs(ref.float().mean().item() - (1 - p)) < 0.05


def test_keep_scale_is_exact_for_the_quantised_p():
    from peft_fast.triton_kernels._triton import keep_scale, keep_threshold

    for p in (0.05, 0.1, 0.5, 0.999999999):
        assert keep_scale(p) * (1 - keep_threshold(p) / 2**31) == pytest.approx(1.0, abs=1e-12)


FUSED_CASES = {
    "bias": dict(bias=True),
    "lowrank2": dict(bias=True, lr=(1, 16), ps=(0.0, 0.0)),
    "lowrank_masked": dict(lr=(1, 16), ps=(0.3, 0.1)),
    "lowrank_r64": dict(lr=(64,), ps=(0.2,)),
    "pro_scale": dict(bias=True, pro=True),
    "col_scaled_bias_pre": dict(bias=True, col=True, bias_scaled=True, store_pre=True),
    "col_then_bias_lr": dict(bias=True, col=True, lr=(8,), ps=(0.0,), store_pre=True),
    "reduce": dict(col=True, reduce=True),
    "five_adapters": dict(lr=(1, 2, 3, 4, 5), ps=(0.1, 0.0, 0.2, 0.0, 0.3)),
}


def _fused_args(case, M, K, N, dtype, w_t):
    from peft_fast.triton_kernels._triton import keep_scale
    from peft_fast.triton_kernels.fused_linear import Segment

    x = _r(M, K, dtype=dtype)
    W = _r(N, K, dtype=dtype, scale=0.1)
    kw = {}
    if case.get("bias"):
        kw["bias"] = _r(N, dtype=dtype)
    if case.get("pro"):
        kw["pro_scale"] = (torch.rand(K) + 0.5).to(dtype)
    if case.get("col"):
        kw["col_scale"] = torch.rand(N) + 0.5
    if case.get("bias_scaled"):
        kw["bias_scaled"] = True
    if case.get("store_pre"):
        kw["store_pre"] = True
    if case.get("reduce"):
        kw["reduce_with"] = _r(M, N, dtype=dtype)
    if "lr" in case:
        R = sum(case["lr"])
        kw["lr_left"] = _r(M, R, dtype=dtype)
        kw["lr_right"] = _r(R, N, dtype=dtype, scale=0.2)
        segs, off = [], 0
        for i, (r, p) in enumerate(zip(case["lr"], case["ps"])):
            segs.append(Segment(off, r, (0.5 + i) * (keep_scale(p) if p else 1.0), p))
            off += r
        kw["segments"] = segs
        kw["seeds"] = torch.randint(0, 2**62, (len(segs),))
    w = W.t() if w_t else W.t().contiguous()  # [K, N]: a strided view or a contiguous copy
    return x, w, kw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(FUSED_CASES))
@pytest.mark.parametrize("shape", [(37, 100, 72), (1, 64, 48)], ids=str)
def test_fused_linear_matches_reference(case, dtype, shape):
    from peft_fast.triton_kernels.fused_linear import fused_linear, fused_linear_ref

    torch.manual_seed(hash((case, str(dtype), shape)) % 2**31)
    M, K, N = shape
    x, w, kw = _fused_args(FUSED_CASES[case], M, K, N, dtype, w_t=(M % 2 == 1))
    out, pre, red = fused_linear(x, w, **kw)
    ref = fused_linear_ref(_d(x), _d(w), **{k: _d(v) for k, v in kw.items()})
    same = fused_linear_ref(x, w, **kw)
    assert out.dtype == dtype
    assert_kernel_close(out, ref[0], same[0], f"{case} out")
    if kw.get("store_pre"):
        assert_kernel_close(pre, ref[1], same[1], f"{case} pre")
    else:
        assert pre is None
    if "reduce_with" in kw:
        assert red.dtype == torch.float32
        assert_kernel_close(red, ref[2], same[2], f"{case} reduction")


def test_fused_linear_non_contiguous_and_empty():
    from peft_fast.triton_kernels.fused_linear import Segment, fused_linear, fused_linear_ref

    torch.manual_seed(0)
    big = torch.randn(40, 2 * 50)
    x = big[:, ::2]  # stride 2 along K
    w = torch.randn(30, 50).t()
    L = torch.randn(8, 40).t()  # [40, 8] transposed view
    R = torch.randn(30, 8).t()
    kw = dict(lr_left=L, lr_right=R, segments=[Segment(0, 8, 0.7, 0.0)])
    out, _, _ = fused_linear(x, w, **kw)
    ref = fused_linear_ref(x.double(), w.double(), lr_left=L.double(), lr_right=R.double(), segments=kw["segments"])
    assert_kernel_close(out, ref[0], fused_linear_ref(x, w, **kw)[0], "strided")
    empty, _, _ = fused_linear(x[:0], w, **kw | {"lr_left": L[:0]})
    assert empty.shape == (0, 30)


def test_fused_linear_rejects_bad_shapes():
    from peft_fast.triton_kernels.fused_linear import fused_linear

    with pytest.raises(ValueError, match=r"\(4, 5\).*\(6, 3\)"):
        fused_linear(torch.randn(4, 5), torch.randn(6, 3))
    with pytest.raises(ValueError, match="bias has shape"):
        fused_linear(torch.randn(4, 5), torch.randn(5, 3), bias=torch.randn(4))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r,p", [(1, 0.3), (16, 0.0), (64, 0.1)])
def test_lora_shrink_and_grad_a_match_reference(dtype, r, p):
    from peft_fast.triton_kernels._triton import keep_scale
    from peft_fast.triton_kernels.lora import lora_grad_a, lora_grad_a_ref, lora_shrink, lora_shrink_ref

    torch.manual_seed(r)
    M, K = 37, 100
    x, A, g = _r(M, K, dtype=dtype), _r(r, K, dtype=dtype, scale=0.1), _r(M, r, dtype=dtype)
    seed = torch.randint(0, 2**62, (1,))
    xa = lora_shrink(x, A, seed, p)
    assert xa.shape == (M, r) and xa.dtype == dtype
    assert_kernel_close(xa, lora_shrink_ref(_d(x), _d(A), seed, p), lora_shrink_ref(x, A, seed, p), "shrink")
    c = 1.5 * (keep_scale(p) if p else 1.0)
    dA = lora_grad_a(g, x, seed, p, c, dtype)
    assert dA.shape == (r, K) and dA.dtype == dtype
    assert_kernel_close(dA, lora_grad_a_ref(_d(g), _d(x), seed, p, c, torch.float64),
                        lora_grad_a_ref(g, x, seed, p, c, dtype), "grad_A")


def test_shrink_and_grad_a_share_the_mask():
    """grad_A regenerates exactly the forward's mask: with A = I, xa is the dropped x itself."""
    from peft_fast.triton_kernels.lora import lora_grad_a, lora_shrink

    torch.manual_seed(0)
    M, K, p = 33, 16, 0.4
    x = torch.randn(M, K)
    seed = torch.randint(0, 2**62, (1,))
    xd = lora_shrink(x, torch.eye(K), seed, p)  # [M, K] = drop(x)
    kept = xd != 0
    assert 0.45 < kept.float().mean().item() < 0.75
    dA = lora_grad_a(torch.eye(M), x, seed, p, 1.0, torch.float32)  # [M, K] = mask * x
    assert torch.equal(dA != 0, kept)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r,fifo,cached", [(1, False, False), (16, True, True), (64, False, True)])
def test_dora_weight_norm_matches_reference(dtype, r, fifo, cached):
    from peft_fast.triton_kernels.dora import dora_weight_norm, dora_weight_norm_ref

    torch.manual_seed(r)
    N, K = 72, 100
    W = _r(N, K, dtype=dtype)
    if fifo:
        W = W.t().contiguous()  # Conv1D stores [K, N]
    A, B = _r(r, K, dtype=dtype, scale=0.3), _r(N, r, dtype=dtype, scale=0.3)
    sq = (W.t() if fifo else W).float().pow(2).sum(1) if cached else None
    got = dora_weight_norm(W, A, B, 1.7, fifo, sq)
    assert got.dtype == torch.float32 and got.shape == (N,)
    ref = dora_weight_norm_ref(_d(W), _d(A), _d(B), 1.7, fifo)
    assert_kernel_close(got, ref, dora_weight_norm_ref(W, A, B, 1.7, fifo, sq), "dora norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_colsum_mul_matches_reference(dtype):
    from peft_fast.triton_kernels.colsum import colsum_mul, colsum_mul_ref

    torch.manual_seed(1)
    a = _r(37, 72, dtype=dtype)
    b = _r(72, 37, dtype=dtype).t()  # non-contiguous
    got = colsum_mul(a, b)
    assert got.dtype == torch.float32
    assert_kernel_close(got, colsum_mul_ref(_d(a), _d(b)), (a * b).sum(0), "colsum")
    assert torch.equal(colsum_mul(a[:0], b[:0]), torch.zeros(72))
