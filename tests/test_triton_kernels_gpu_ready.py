"""GPU-readiness of the LoRA shrink/grad_A, colsum and DoRA-norm kernels, through the interpreter.

- 64-bit offsets: row x stride (and column x stride) products past 2^31 elements, e.g. the
  [M, 128256] gradient of a Llama 3 lm_head at M >= 16744 tokens. Each case builds its operands
  as strided views over a large `torch.empty` whose untouched pages Linux never commits (only the
  used rows are written; ~8 GB of address space, a few KB of memory). The view starts 2^31
  elements into the storage, so an offset wrapped to int32 still lands inside it (on zeros) and
  the case fails cleanly instead of faulting.
- Dot precision: the low-rank dots compute in the adapters' dtype (x rounded to it, as the
  `_ref` does) and the launch picks fp32 "ieee" / "tf32" from torch's TF32 switch and 16-bit
  tensor-core dots for 16-bit adapters.
- Launch configs: per target, every launch keeps >= 2 configs and the union covers them.
"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_kernel_close

pytestmark = pytest.mark.interp

HALF = [torch.float16, torch.bfloat16]
BIG = 2**30  # the large stride: rows 0, 1, 2 sit at 0, 2^30, 2^31 elements


def _d(t):
    return t.double()


def _big_views(dtype, specs, seed=0):
    """Strided views (shape, stride, offset) over one storage of 2^31 + max extent elements, each
    starting 2^31 (+ offset) elements in; only the viewed elements are written (random)."""
    pre = 2**31
    end = max(off + sum((n - 1) * s for n, s in zip(shape, stride)) + 1 for shape, stride, off in specs)
    storage = torch.empty(pre + end, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    views = []
    for shape, stride, off in specs:
        v = storage.as_strided(shape, stride, pre + off)
        v.copy_(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
        views.append(v)
    return views


def _needs_int64(t):
    return max((n - 1) * s for n, s in zip(t.shape, t.stride())) >= 2**31


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_shrink_large_strides(dtype, layout, p):
    from peft_fast.triton_kernels.lora import lora_shrink, lora_shrink_ref

    M, K, r = (3, 40, 5) if layout == "rows" else (37, 3, 4)
    stride = (BIG, 1) if layout == "rows" else (1, BIG)
    (x,) = _big_views(dtype, [((M, K), stride, 0)])
    assert _needs_int64(x)
    A = (torch.randn(r, K, dtype=torch.float64) * 0.3).to(dtype)
    seed = torch.randint(0, 2**62, (1,))
    got = lora_shrink(x, A, seed, p)
    assert_kernel_close(got, lora_shrink_ref(_d(x), _d(A), seed, p), lora_shrink_ref(x, A, seed, p), "shrink")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_grad_a_large_strides(dtype, p):
    """x rows and g rows 2^30 apart (one storage), and x with 2^30-apart columns."""
    from peft_fast.triton_kernels.lora import lora_grad_a, lora_grad_a_ref

    M, K, r = 3, 40, 5
    x, g = _big_views(dtype, [((M, K), (BIG, 1), 0), ((M, r), (BIG, 1), 64)])
    assert _needs_int64(x) and _needs_int64(g)
    seed = torch.randint(0, 2**62, (1,))
    got = lora_grad_a(g, x, seed, p, 1.5, dtype)
    assert_kernel_close(got, lora_grad_a_ref(_d(g), _d(x), seed, p, 1.5, torch.float64),
                        lora_grad_a_ref(g, x, seed, p, 1.5, dtype), "grad_A rows")
    del x, g
    (xt,) = _big_views(dtype, [((37, 3), (1, BIG), 0)])
    gt = torch.randn(37, r, dtype=torch.float64).to(dtype)
    got = lora_grad_a(gt, xt, seed, p, 1.5, dtype)
    assert_kernel_close(got, lora_grad_a_ref(_d(gt), _d(xt), seed, p, 1.5, torch.float64),
                        lora_grad_a_ref(gt, xt, seed, p, 1.5, dtype), "grad_A cols")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("layout", ["rows", "cols"])
def test_colsum_mul_large_strides(dtype, layout):
    from peft_fast.triton_kernels.colsum import colsum_mul, colsum_mul_ref

    shape, stride = ((3, 40), (BIG, 1)) if layout == "rows" else ((37, 3), (1, BIG))
    a, b = _big_views(dtype, [(shape, stride, 0), (shape, stride, 64)])
    assert _needs_int64(a)
    got = colsum_mul(a, b)
    assert_kernel_close(got, colsum_mul_ref(_d(a), _d(b)), (a * b).sum(0), "colsum")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("fifo", [False, True])
def test_dora_weight_norm_large_strides(dtype, fifo):
    """W [N, K] rows 2^30 apart; fan_in_fan_out stores [K, N], so the K index takes the stride."""
    from peft_fast.triton_kernels.dora import dora_weight_norm, dora_weight_norm_ref

    N, K, r = (3, 40, 4) if not fifo else (40, 3, 4)
    (W,) = _big_views(dtype, [(((K, N) if fifo else (N, K)), (BIG, 1), 0)])
    assert _needs_int64(W)
    A = (torch.randn(r, K, dtype=torch.float64) * 0.3).to(dtype)
    B = (torch.randn(N, r, dtype=torch.float64) * 0.3).to(dtype)
    got = dora_weight_norm(W, A, B, 1.7, fifo)
    assert_kernel_close(got, dora_weight_norm_ref(_d(W), _d(A), _d(B), 1.7, fifo),
                        dora_weight_norm_ref(W, A, B, 1.7, fifo), "dora norm")


# ------------------------------------------------------------------------------------------------
# Dot precision: the adapters' dtype and torch's TF32 switch
# ------------------------------------------------------------------------------------------------
MIXED = [(torch.float32, torch.float16), (torch.float32, torch.bfloat16), (torch.float16, torch.float32),
         (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("x_dtype,a_dtype", MIXED, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_shrink_grad_a_mixed_dtypes_match_reference(x_dtype, a_dtype, p):
    """x in one dtype, the adapter (A, g) in another: computed in the adapter's dtype, as the ref."""
    from peft_fast.triton_kernels._triton import keep_scale
    from peft_fast.triton_kernels.lora import lora_grad_a, lora_grad_a_ref, lora_shrink, lora_shrink_ref

    torch.manual_seed(3)
    M, K, r = 37, 100, 7
    x = torch.randn(M, K, dtype=torch.float64).to(x_dtype)
    A = (torch.randn(r, K, dtype=torch.float64) * 0.1).to(a_dtype)
    g = torch.randn(M, r, dtype=torch.float64).to(a_dtype)
    seed = torch.randint(0, 2**62, (1,))
    xr = x.to(a_dtype)  # the operand the ref multiplies
    xa = lora_shrink(x, A, seed, p)
    assert xa.dtype == a_dtype
    assert_kernel_close(xa, lora_shrink_ref(_d(xr), _d(A), seed, p), lora_shrink_ref(x, A, seed, p), "shrink")
    c = 0.7 * (keep_scale(p) if p else 1.0)
    dA = lora_grad_a(g, x, seed, p, c, a_dtype)
    assert dA.dtype == a_dtype
    assert_kernel_close(dA, lora_grad_a_ref(_d(g), _d(xr), seed, p, c, torch.float64),
                        lora_grad_a_ref(g, x, seed, p, c, a_dtype), "grad_A")


@pytest.mark.parametrize("a_dtype", HALF, ids=str)
def test_lora_dots_round_fp32_x_to_16bit_adapters(a_dtype):
    """x = 1 + t with t below the 16-bit ulp: the ref rounds x to A's dtype first, so a row pair
    of A (or g) that cancels gives exactly 0; a dot on the unrounded x would give t1 - t2."""
    from peft_fast.triton_kernels.lora import lora_grad_a, lora_grad_a_ref, lora_shrink, lora_shrink_ref

    torch.manual_seed(4)
    M, K = 33, 20
    x = 1.0 + torch.rand(M, K) * 2**-13  # rounds to 1.0 in fp16 and bf16
    A = torch.zeros(3, K, dtype=a_dtype)
    A[0, 0], A[0, 1] = 1.0, -1.0  # x[:, 0] - x[:, 1]
    A[1, 2], A[2, 5] = 1.0, 0.5
    seed = torch.zeros(1, dtype=torch.int64)
    got = lora_shrink(x, A, seed, 0.0)
    ref = lora_shrink_ref(x, A, seed, 0.0)
    assert torch.equal(got, ref), (got - ref).abs().max()
    assert (got[:, 0] == 0).all()
    g = torch.zeros(M, 2, dtype=a_dtype)
    g[0, 0], g[1, 0], g[2, 1] = 1.0, -1.0, 1.0  # x[0] - x[1], x[2]
    got = lora_grad_a(g, x, seed, 0.0, 1.0, torch.float32)
    ref = lora_grad_a_ref(g, x, seed, 0.0, 1.0, torch.float32)
    assert torch.equal(got, ref), (got - ref).abs().max()
    assert (got[0] == 0).all()


def test_lora_dot_args_follow_adapter_dtype_and_tf32(monkeypatch):
    """fp32 adapters: "ieee" unless torch allows TF32 matmuls; 16-bit adapters: a 16-bit dot on
    GPU (F32_DOT False), fp32 only under the interpreter."""
    from peft_fast.triton_kernels import lora

    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allow
            assert lora._dot_args(torch.float32) == {"F32_DOT": True, "DOT_PREC": "tf32" if allow else "ieee"}
            for dt in HALF:
                monkeypatch.setattr(lora, "interpreting", lambda: False)
                assert lora._dot_args(dt)["F32_DOT"] is False
                monkeypatch.setattr(lora, "interpreting", lambda: True)
                assert lora._dot_args(dt)["F32_DOT"] is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("w_dtype,a_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.float32)], ids=str)
@pytest.mark.parametrize("r", [1, 16, 200])
def test_dora_weight_norm_fp32_accurate(w_dtype, a_dtype, r):
    """The norm stays accurate to fp32 level (it divides the magnitude) for fp32 adapters over a
    16-bit or fp32 base, at ranks up to the kernel's 256."""
    from peft_fast.triton_kernels.dora import dora_weight_norm, dora_weight_norm_ref

    torch.manual_seed(r)
    N, K = 45, 70
    W = torch.randn(N, K, dtype=torch.float64).to(w_dtype)
    A = (torch.randn(r, K, dtype=torch.float64) * 0.3).to(a_dtype)
    B = (torch.randn(N, r, dtype=torch.float64) * 0.3).to(a_dtype)
    got = dora_weight_norm(W, A, B, 0.9)
    ref64 = dora_weight_norm_ref(_d(W), _d(A), _d(B), 0.9)
    rel = ((got.double() - ref64).abs() / ref64).max().item()
    assert rel < 1e-5, rel
    assert_kernel_close(got, ref64, dora_weight_norm_ref(W, A, B, 0.9), "dora norm")


# ------------------------------------------------------------------------------------------------
# Per-target launch configs
# ------------------------------------------------------------------------------------------------
TARGETS = (80, 86, 89, 90, 120)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _keys(cfgs):
    from peft_fast.triton_kernels._triton import config_key

    return [config_key(c) for c in cfgs]


def _launches():
    """(getter name, args) for every launch the lora/dora/colsum launchers can make."""
    from peft_fast.triton_kernels.lora import _dot_args

    out = []
    for op, x_arg in (("get_lora_shrink_configs", "x_ptr"), ("get_lora_grad_a_configs", "x_ptr")):
        for xd in DTYPES:
            for ad in DTYPES:
                for br in (16, 32, 64):
                    for tf32 in (False, True):
                        saved = torch.backends.cuda.matmul.allow_tf32
                        torch.backends.cuda.matmul.allow_tf32 = tf32
                        try:
                            dot = _dot_args(ad)
                        finally:
                            torch.backends.cuda.matmul.allow_tf32 = saved
                        out.append(("lora", op, dict(dot, BR=br, **{x_arg: torch.empty(0, dtype=xd)},
                                                     a_ptr=torch.empty(0, dtype=ad))))
    for wd in DTYPES:
        for ad in DTYPES:
            for br in (16, 32, 64, 128, 256):
                dot16 = wd == ad and ad != torch.float32
                out.append(("dora", "get_dora_norm_configs", dict(BR=br, DOT16=dot16, w_ptr=torch.empty(0, dtype=wd),
                                                                    a_ptr=torch.empty(0, dtype=ad))))
    for d in DTYPES:
        out.append(("colsum", "get_colsum_configs", dict(a_ptr=torch.empty(0, dtype=d), b_ptr=torch.empty(0, dtype=d))))
    return out


def test_every_launch_keeps_two_configs_per_target(monkeypatch):
    """For each target and launch (kind, dtype, BR), >= 2 configs, all in the autotuner's list."""
    import importlib

    mods = {m: importlib.import_module(f"peft_fast.triton_kernels.{m}") for m in ("lora", "dora", "colsum")}
    for m in mods.values():
        monkeypatch.setattr(m, "interpreting", lambda: False)
    for mod, getter, args in _launches():
        get = getattr(mods[mod], getter)
        union = set(_keys(get()))
        for cc in TARGETS:
            cfgs = get(cc, args)
            assert len(cfgs) >= 2, (getter, cc, args)
            assert set(_keys(cfgs)) <= union, (getter, cc, args)
            assert len(set(_keys(cfgs))) == len(cfgs)
