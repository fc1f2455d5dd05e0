"""Pure-torch references (triton_kernels/*_ref) and the autograd Functions of
peft_fast/functional against plain autograd through the textbook formula, with an fp64
oracle.

Tolerance rule (DESIGN.md "Tests"): for every output and gradient,
    max|got - fp64| <= 2 * max|plain_same_dtype - fp64| + atol(dtype) * max|fp64|
where `plain_same_dtype` is the straightforward formula run through autograd in the
same dtype. Inputs are fresh random tensors with nonzero B (never compare on zeros).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peft_fast
from peft_fast.functional import dora_linear, ia3_linear, lora_linear
from peft_fast.triton_kernels import dora as kdora
from peft_fast.triton_kernels import ia3 as kia3
from peft_fast.triton_kernels import lora as klora

M, K, N = 37, 100, 72
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# relative atol per dtype (fraction of max|fp64 reference|)
ATOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32) * scale


def leaf(t: torch.Tensor, dtype: torch.dtype, requires_grad: bool = True) -> torch.Tensor:
    """Same values, new leaf (strides kept: a transposed view stays non-contiguous)."""
    return t.detach().to(dtype).detach().requires_grad_(requires_grad)


def check(got: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got is not None, f"{what}: missing"
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    ref = ref64.detach().double()
    scale = ref.abs().max().item()
    assert scale > 0, f"{what}: reference is all zeros, the comparison would prove nothing"
    err = (got.detach().double() - ref).abs().max().item()
    err_plain = (plain.detach().double() - ref).abs().max().item()
    atol = ATOL[dtype] * scale
    assert err <= 2 * err_plain + atol, (
        f"{what} [{dtype}]: max err vs fp64 {err:.3e} > 2 * plain-torch err {err_plain:.3e} + atol {atol:.3e}"
    )


def lora_formula(x, W, b, As, Bs, scalings, fan_in_fan_out=False, masks=None, ps=None):
    """y = x W^T + b + sum_i s_i * (drop_i(x) A_i^T) B_i^T, the plain way."""
    w = W.t() if fan_in_fan_out else W
    y = x @ w.t()
    if b is not None:
        y = y + b
    for i, (A, B, s) in enumerate(zip(As, Bs, scalings)):
        xi = x.to(A.dtype)
        if masks is not None and masks[i] is not None:
            xi = xi * masks[i].to(xi.dtype) * (1.0 / (1.0 - ps[i]))
        y = y + ((xi @ A.t()) @ B.t() * s).to(y.dtype)
    return y


def make_lora_inputs(seed, ranks, fan_in_fan_out=False, layout="contig", with_bias=True):
    g = _gen(seed)
    if layout == "contig":
        x = randn(M, K, g=g)
    elif layout == "transposed":
        x = randn(K, M, g=g).t()  # [M, K] non-contiguous view
    elif layout == "3d":
        x = randn(3, 11, K, g=g)
    elif layout == "3d_noncontig":
        x = randn(11, 3, K, g=g).transpose(0, 1)  # [3, 11, K] non-contiguous
    else:
        raise ValueError(layout)
    W = randn(N, K, g=g, scale=K ** -0.5)
    if fan_in_fan_out:
        W = W.t().contiguous()  # Conv1D storage [K, N]
    b = randn(N, g=g) if with_bias else None
    As = [randn(r, K, g=g, scale=K ** -0.5) for r in ranks]
    Bs = [randn(N, r, g=g, scale=r ** -0.5) for r in ranks]  # nonzero B: never compare on zeros
    scalings = [2.0, 0.5, 1.25, 3.0][: len(ranks)]
    dy = randn(*x.shape[:-1], N, g=g)
    return x, W, b, As, Bs, scalings, dy


def run_autograd(fn, leaves: dict, dy: torch.Tensor):
    """Run fn(**leaves), backprop dy; return output and grads of leaves that require grad."""
    y = fn(**leaves)
    y.backward(dy.to(y.dtype))
    grads = {}
    for k, v in leaves.items():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            grads[k] = v.grad
        elif isinstance(v, list):
            for i, t in enumerate(v):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    grads[f"{k}{i}"] = t.grad
    return y, grads


def lora_leaves(x, W, b, As, Bs, dtype, train_base, adapter_dtype=None):
    adtype = adapter_dtype or dtype
    return dict(
        x=leaf(x, dtype), W=leaf(W, dtype, train_base), b=None if b is None else leaf(b, dtype, train_base),
        As=[leaf(A, adtype) for A in As], Bs=[leaf(B, adtype) for B in Bs],
    )


# --------------------------------------------------------------------------------------------
# LoRA: autograd Function
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ranks", [(1,), (64,), (1, 64, 5)], ids=["r1", "r64", "3adapters"])
@pytest.mark.parametrize("layout", ["contig", "transposed", "3d", "3d_noncontig"])
@pytest.mark.parametrize("fan_in_fan_out,train_base", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["linear", "conv1d", "linear-trainW", "conv1d-trainW"])
def test_lora_linear_matches_autograd(dtype, ranks, layout, fan_in_fan_out, train_base):
    x, W, b, As, Bs, sc, dy = make_lora_inputs(sum(ranks) + 7 * len(layout), ranks, fan_in_fan_out, layout)

    def fast(x, W, b, As, Bs):
        return lora_linear(x, W, b, As, Bs, sc, [0.0] * len(As), fan_in_fan_out)

    def plain(x, W, b, As, Bs):
        return lora_formula(x, W, b, As, Bs, sc, fan_in_fan_out)

    yf, gf = run_autograd(fast, lora_leaves(x, W, b, As, Bs, dtype, train_base), dy)
    yp, gp = run_autograd(plain, lora_leaves(x, W, b, As, Bs, dtype, train_base), dy)
    yr, gr = run_autograd(plain, lora_leaves(x, W, b, As, Bs, torch.float64, train_base), dy)
    assert yf.dtype == dtype
    check(yf, yp, yr, dtype, "y")
    assert set(gf) == set(gr), f"gradients produced for {sorted(gf)} but expected {sorted(gr)}"
    if train_base:
        assert {"W", "b"} <= set(gf)
    for k in gr:
        assert gf[k].dtype == dtype, f"d{k} has dtype {gf[k].dtype}"
        check(gf[k], gp[k], gr[k], dtype, f"d{k}")


def test_lora_linear_frozen_base_gets_no_grad():
    x, W, b, As, Bs, sc, dy = make_lora_inputs(1, (4,))
    leaves = lora_leaves(x, W, b, As, Bs, torch.float32, train_base=False)
    y = lora_linear(leaves["x"], leaves["W"], leaves["b"], leaves["As"], leaves["Bs"], sc, [0.0])
    y.backward(dy)
    assert leaves["W"].grad is None and leaves["b"].grad is None
    assert leaves["As"][0].grad is not None and leaves["Bs"][0].grad is not None


def test_lora_linear_no_bias_and_x_without_grad():
    x, W, _, As, Bs, sc, dy = make_lora_inputs(2, (3, 7), with_bias=False)
    xs = leaf(x, torch.float32, requires_grad=False)
    As_ = [leaf(A, torch.float32) for A in As]
    Bs_ = [leaf(B, torch.float32) for B in Bs]
    y = lora_linear(xs, W, None, As_, Bs_, sc, [0.0, 0.0])
    y.backward(dy)
    As64 = [leaf(A, torch.float64) for A in As]
    Bs64 = [leaf(B, torch.float64) for B in Bs]
    y64 = lora_formula(x.double(), W.double(), None, As64, Bs64, sc)
    y64.backward(dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for a, a64 in zip(As_ + Bs_, As64 + Bs64):
        torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_lora_linear_mixed_dtype_fp32_adapters(dtype):
    """Half-precision base and activations with fp32 adapter weights (autocast_adapter_dtype)."""
    x, W, b, As, Bs, sc, dy = make_lora_inputs(3, (1, 16), layout="3d")

    def fast(x, W, b, As, Bs):
        return lora_linear(x, W, b, As, Bs, sc, [0.0, 0.0])

    def plain(x, W, b, As, Bs):
        return lora_formula(x, W, b, As, Bs, sc)

    yf, gf = run_autograd(fast, lora_leaves(x, W, b, As, Bs, dtype, False, torch.float32), dy)
    yp, gp = run_autograd(plain, lora_leaves(x, W, b, As, Bs, dtype, False, torch.float32), dy)
    yr, gr = run_autograd(plain, lora_leaves(x, W, b, As, Bs, torch.float64, False), dy)
    assert yf.dtype == dtype
    check(yf, yp, yr, dtype, "y")
    for k in gr:
        assert gf[k].dtype == (dtype if k == "x" else torch.float32)
        check(gf[k], gp[k], gr[k], dtype, f"d{k}")


def test_lora_linear_empty_batch():
    _, W, b, As, Bs, sc, _ = make_lora_inputs(4, (2, 5))
    x = torch.zeros(0, K, requires_grad=True)
    As_ = [leaf(A, torch.float32) for A in As]
    Bs_ = [leaf(B, torch.float32) for B in Bs]
    y = lora_linear(x, W, b, As_, Bs_, sc, [0.0, 0.0])
    assert y.shape == (0, N)
    y.sum().backward()
    assert x.grad.shape == (0, K)
    for t in As_ + Bs_:
        assert t.grad.shape == t.shape and not t.grad.any()


# --------------------------------------------------------------------------------------------
# LoRA: the reference functions themselves
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ranks", [(1,), (64,), (1, 64, 5)], ids=["r1", "r64", "3adapters"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_lora_ref_fwd_bwd(dtype, ranks, fan_in_fan_out):
    x, W, b, As, Bs, sc, dy = make_lora_inputs(5 + len(ranks), ranks, fan_in_fan_out, "transposed")
    xd, Wd, bd = x.to(dtype), W.to(dtype), b.to(dtype)
    Ad, Bd = [A.to(dtype) for A in As], [B.to(dtype) for B in Bs]
    snapshot = [t.clone() for t in (xd, Wd, bd, *Ad, *Bd)]
    y, xas, masks = klora.lora_fwd_ref(xd, Wd, bd, Ad, Bd, sc, [0.0] * len(ranks), fan_in_fan_out)
    assert masks == [None] * len(ranks)
    dyd = dy.to(dtype)
    dx, dAs, dBs = klora.lora_bwd_ref(dyd, xd, Wd, Ad, Bd, sc, [0.0] * len(ranks), xas, masks, fan_in_fan_out)
    # references must not write into their inputs
    for before, after in zip(snapshot, (xd, Wd, bd, *Ad, *Bd)):
        assert torch.equal(before, after)

    def plain(x, W, b, As, Bs):
        return lora_formula(x, W, b, As, Bs, sc, fan_in_fan_out)

    yp, gp = run_autograd(plain, lora_leaves(x, W, b, As, Bs, dtype, False), dy)
    yr, gr = run_autograd(plain, lora_leaves(x, W, b, As, Bs, torch.float64, False), dy)
    check(y, yp, yr, dtype, "y")
    check(dx, gp["x"], gr["x"], dtype, "dx")
    for i in range(len(ranks)):
        xa64 = x.double() @ As[i].double().t()
        xa_plain = xd @ Ad[i].t()
        check(xas[i], xa_plain, xa64, dtype, f"xa{i}")
        check(dAs[i], gp[f"As{i}"], gr[f"As{i}"], dtype, f"dA{i}")
        check(dBs[i], gp[f"Bs{i}"], gr[f"Bs{i}"], dtype, f"dB{i}")
    # need_dx=False skips dx but leaves the adapter grads unchanged
    dx2, dAs2, dBs2 = klora.lora_bwd_ref(dyd, xd, Wd, Ad, Bd, sc, [0.0] * len(ranks), xas, masks, fan_in_fan_out,
                                         need_dx=False)
    assert dx2 is None
    for a, b2 in zip(dAs + dBs, dAs2 + dBs2):
        torch.testing.assert_close(a, b2, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# LoRA dropout
#
# The masks are whatever the reference draws (its RNG scheme is an implementation detail);
# the CPU path of lora_linear *is* lora_fwd_ref, so re-seeding and replaying lora_fwd_ref
# yields the masks a lora_linear forward drew. Every check below is then exact math.
# --------------------------------------------------------------------------------------------
def keep_scale(p: float) -> float:
    """1 / P(keep) of the reference's dropout (p may be quantised by the mask generator)."""
    fn = getattr(klora, "dropout_keep_scale", None)
    return fn(p) if fn is not None else 1.0 / (1.0 - p)


def as_float_mask(mask: torch.Tensor) -> torch.Tensor:
    assert mask.dtype in (torch.bool, torch.uint8), mask.dtype
    mf = mask.double()
    assert ((mf == 0) | (mf == 1)).all(), "mask holds values other than 0 and 1"
    return mf


def replay_masks(seed: int, x2d: torch.Tensor, As, Bs, sc, ps) -> list:
    torch.manual_seed(seed)
    W = torch.zeros(Bs[0].shape[0], x2d.shape[1], dtype=x2d.dtype)
    _, _, masks = klora.lora_fwd_ref(x2d, W, None, As, Bs, sc, ps)
    return masks


def check_against_masked_formula(y, lv, inputs, dtype, masks, ps_eff):
    """y and the grads in the leaves `lv` of a lora_linear call vs the formula evaluated with
    the given float masks (same dtype and fp64); returns the fp64 gradients."""
    x, W, b, As, Bs, sc, dy = inputs

    def plain(x, W, b, As, Bs):
        return lora_formula(x, W, b, As, Bs, sc, masks=masks, ps=ps_eff)

    yp, gp = run_autograd(plain, lora_leaves(x, W, b, As, Bs, dtype, True), dy)
    yr, gr = run_autograd(plain, lora_leaves(x, W, b, As, Bs, torch.float64, True), dy)
    check(y, yp, yr, dtype, "y")
    got = {"x": lv["x"].grad, "W": lv["W"].grad, "b": lv["b"].grad}
    got.update({f"As{i}": t.grad for i, t in enumerate(lv["As"])})
    got.update({f"Bs{i}": t.grad for i, t in enumerate(lv["Bs"])})
    for k in gr:
        check(got[k], gp[k], gr[k], dtype, f"d{k}")
    return gr


@pytest.mark.parametrize("p", [0.1, 0.3, 0.75])
def test_lora_dropout_keep_rate_and_scaling(p):
    g = _gen(10)
    x = randn(512, K, g=g) + 3.0  # offset: no zero entries
    A = torch.eye(K)  # xa = drop(x) exactly
    B = randn(N, K, g=g)
    torch.manual_seed(0)
    _, xas, masks = klora.lora_fwd_ref(x, torch.zeros(N, K), None, [A], [B], [1.0], [p])
    mask = masks[0]
    assert mask.shape == x.shape
    mf = as_float_mask(mask)
    keep = mf.mean().item()
    std = (p * (1 - p) / mask.numel()) ** 0.5
    assert abs(keep - (1 - p)) < 6 * std, f"keep rate {keep:.4f}, expected {1 - p}"
    assert abs(keep_scale(p) * (1 - p) - 1) < 1e-4, f"keep scale {keep_scale(p)} for p={p}"
    # kept entries scaled by 1/P(keep), dropped entries exactly zero
    torch.testing.assert_close(xas[0].double(), x.double() * mf * keep_scale(p), rtol=1e-6, atol=1e-6)
    # masks are independent: across rows, across adapters, and across calls
    torch.manual_seed(1)
    _, _, masks2 = klora.lora_fwd_ref(x, torch.zeros(N, K), None, [A, A], [B, B], [1.0, 1.0], [p, p])
    m0, m1 = as_float_mask(masks2[0]), as_float_mask(masks2[1])
    assert not torch.equal(m0, m1)
    agree = (m0 == m1).double().mean().item()
    expected_agree = (1 - p) ** 2 + p ** 2
    assert abs(agree - expected_agree) < 0.02, \
        f"masks of two adapters agree on {agree:.3f} (independent: {expected_agree:.3f})"
    assert not torch.equal(m0, mf)
    # no structure along rows or columns (a broken bit-slicing would repeat patterns)
    col_rate = m0.mean(0)
    row_rate = m0.mean(1)
    assert (col_rate - (1 - p)).abs().max() < 6 * (p * (1 - p) / m0.shape[0]) ** 0.5 + 0.02
    assert (row_rate - (1 - p)).abs().max() < 6 * (p * (1 - p) / m0.shape[1]) ** 0.5 + 0.02
    assert not torch.equal(m0[0], m0[1]) and not torch.equal(m0[:, 0], m0[:, 1])


def test_lora_dropout_mean_output_matches_no_dropout():
    p = 0.25
    g = _gen(11)
    row = randn(1, K, g=g)
    x = row.expand(20000, K).contiguous()
    W = randn(N, K, g=g, scale=K ** -0.5)
    A = randn(8, K, g=g, scale=K ** -0.5)
    B = randn(N, 8, g=g, scale=8 ** -0.5)
    torch.manual_seed(0)
    with torch.no_grad():
        y = lora_linear(x, W, None, [A], [B], [2.0], [p])
    y0 = lora_formula(row, W, None, [A], [B], [2.0])
    mean = y.mean(0, keepdim=True)
    sem = y.std(0, keepdim=True) / x.shape[0] ** 0.5
    assert (y.std(0) > 0).all(), "dropout had no effect"
    z = ((mean - y0).abs() / sem).max().item()
    assert z < 6.0, f"mean output under dropout deviates by {z:.1f} standard errors"


@pytest.mark.parametrize("layout", ["contig", "3d_noncontig"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_dropout_backward_uses_forward_mask(layout, dtype):
    """Every output and gradient of lora_linear matches the formula evaluated with exactly the
    masks its forward drew (replayed from the seed), although the RNG advanced in between."""
    ps = [0.3, 0.0, 0.6]
    ranks = (4, 1, 9)
    x, W, b, As, Bs, sc, dy = make_lora_inputs(12, ranks, layout=layout)
    lv = lora_leaves(x, W, b, As, Bs, dtype, train_base=True)
    torch.manual_seed(1234)
    y = lora_linear(lv["x"], lv["W"], lv["b"], lv["As"], lv["Bs"], sc, ps)
    torch.rand(1000)  # random numbers drawn between forward and backward must not matter
    y.backward(dy.to(dtype))

    x2 = lv["x"].detach().reshape(-1, K)
    masks2d = replay_masks(1234, x2, [t.detach() for t in lv["As"]], [t.detach() for t in lv["Bs"]], sc, ps)
    masks = [None if m is None else as_float_mask(m).reshape(x.shape) for m in masks2d]
    assert masks[1] is None and masks[0] is not None and masks[2] is not None
    assert 0 < masks[0].mean() < 1 and 0 < masks[2].mean() < 1
    scales = [keep_scale(p) if p > 0 else 1.0 for p in ps]
    ps_eff = [1 - 1 / s for s in scales]  # the p the scale corresponds to

    gr = check_against_masked_formula(y, lv, (x, W, b, As, Bs, sc, dy), dtype, masks, ps_eff)

    # manual dA with the saved mask: dA = s * (dy B)^T (x * mask / P(keep))
    x64, dy64 = x.double().reshape(-1, K), dy.double().reshape(-1, N)
    m0 = masks[0].reshape(-1, K)
    dA_manual = sc[0] * (dy64 @ Bs[0].double()).t() @ (x64 * m0 * scales[0])
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    scale = dA_manual.abs().max().item()
    torch.testing.assert_close(lv["As"][0].grad.double(), dA_manual, rtol=tol, atol=tol * scale)
    # a fresh mask would give a different dA: the comparison is discriminating
    other = replay_masks(99, x2, [t.detach() for t in lv["As"]], [t.detach() for t in lv["Bs"]], sc, ps)[0]
    dA_other = sc[0] * (dy64 @ Bs[0].double()).t() @ (x64 * as_float_mask(other).reshape(-1, K) * scales[0])
    assert (dA_other - dA_manual).abs().max() > 10 * tol * scale


def test_lora_ref_dropout_bwd_uses_given_mask():
    p = 0.4
    x, W, b, As, Bs, sc, dy = make_lora_inputs(13, (6,))
    torch.manual_seed(7)
    y, xas, masks = klora.lora_fwd_ref(x, W, b, As, Bs, sc, [p])
    dx, dAs, dBs = klora.lora_bwd_ref(dy, x, W, As, Bs, sc, [p], xas, masks)
    mf = as_float_mask(masks[0])
    xd = x.double() * mf * keep_scale(p)
    g = sc[0] * dy.double() @ Bs[0].double()

    def close(got, ref):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())

    close(dAs[0], g.t() @ xd)
    close(dBs[0], sc[0] * dy.double().t() @ (xd @ As[0].double().t()))
    close(dx, dy.double() @ W.double() + (g @ As[0].double()) * mf * keep_scale(p))
    close(y, x.double() @ W.double().t() + b.double() + sc[0] * (xd @ As[0].double().t()) @ Bs[0].double().t())
    close(xas[0], xd @ As[0].double().t())


# --------------------------------------------------------------------------------------------
# Reused scratch memory: results never alias it, and nothing reads it before writing
# --------------------------------------------------------------------------------------------
def _poison_scratch() -> int:
    """Fill every cached scratch buffer of this thread with NaN; returns how many there were."""
    try:
        from peft_fast.triton_kernels import _workspace
    except ImportError:
        return 0
    cache = getattr(_workspace._local, "cache", None) or {}
    for buf in cache.values():
        if buf.dtype.is_floating_point:
            buf.fill_(float("nan"))
        else:
            buf.fill_(0x5A)
    return len(cache)


def _lora_case(seed):
    x, W, b, As, Bs, sc, dy = make_lora_inputs(seed, (3, 8))
    return x, W, b, As, Bs, sc, dy, [0.3, 0.5]


def _run_all_refs(seed):
    """Forward + backward of every reference with dropout on; returns every result tensor."""
    x, W, b, As, Bs, sc, dy, ps = _lora_case(seed)
    torch.manual_seed(seed)
    y, xas, masks = klora.lora_fwd_ref(x, W, b, As, Bs, sc, ps)
    dx, dAs, dBs = klora.lora_bwd_ref(dy, x, W, As, Bs, sc, ps, xas, masks)
    m = (1 + 0.3 * torch.randn(N, generator=_gen(seed))) * torch.linalg.norm(W, dim=1)
    n = torch.linalg.norm(W + sc[0] * Bs[0] @ As[0], dim=1)
    yd, xad, ypre = kdora.dora_fwd_ref(x, W, b, As[0], Bs[0], sc[0], m, n)
    ddx, ddA, ddB, ddm = kdora.dora_bwd_ref(dy, x, W, As[0], Bs[0], sc[0], m, n, xad, ypre)
    outs = [y, *xas, *[mk.clone() for mk in masks], dx, *dAs, *dBs, yd, xad, ypre, ddx, ddA, ddB, ddm]
    for ff in (False, True):
        l = 1 + 0.3 * torch.randn(K if ff else N, generator=_gen(seed + 1))
        yi, base = kia3.ia3_fwd_ref(x, W, b, l, ff)
        dxi, dl = kia3.ia3_bwd_ref(dy, x, W, l, ff, base)
        outs += [yi, dxi, dl] + ([base] if base is not None else [])
    return outs, [mk for mk in masks]


def test_results_do_not_alias_scratch_and_scratch_is_written_before_read():
    first, first_masks = _run_all_refs(1)
    snapshot = [t.clone() for t in first]
    _poison_scratch()
    second, _ = _run_all_refs(2)  # same shapes: same scratch buffers reused
    # results of the first call are untouched by the second (no result lives in scratch)
    for i, (a, b) in enumerate(zip(first, snapshot)):
        assert torch.equal(a, b), f"result #{i} of the first call changed when the op ran again"
    for mk, snap in zip(first_masks, snapshot[3:5]):
        assert torch.equal(mk, snap), "a returned dropout mask was overwritten by a later call"
    # nothing read the NaN-poisoned scratch before writing it
    for i, t in enumerate(second):
        if t.dtype.is_floating_point:
            assert torch.isfinite(t).all(), f"result #{i} reads uninitialised scratch memory"
    # and the poisoned run computes the same numbers as a clean run with the same seed
    _poison_scratch()
    third, _ = _run_all_refs(2)
    for i, (a, b) in enumerate(zip(second, third)):
        assert torch.equal(a, b), f"result #{i} depends on scratch contents"


def test_lora_linear_backward_survives_interleaved_calls():
    """Two autograd graphs alive at once, each backward run after the other forward: saved
    tensors must not live in shared scratch memory."""
    x, W, b, As, Bs, sc, dy = make_lora_inputs(14, (5,))
    ps = [0.35]
    leaves1 = [leaf(t, torch.float32) for t in (x, As[0], Bs[0])]
    leaves2 = [leaf(t, torch.float32) for t in (x * 2 + 1, As[0], Bs[0])]
    torch.manual_seed(21)
    y1 = lora_linear(leaves1[0], W, b, [leaves1[1]], [leaves1[2]], sc, ps)
    torch.manual_seed(22)
    y2 = lora_linear(leaves2[0], W, b, [leaves2[1]], [leaves2[2]], sc, ps)
    y2.backward(dy * 3)
    y1.backward(dy)
    for seed, lv, ddy in ((21, leaves1, dy), (22, leaves2, dy * 3)):
        xx = lv[0].detach()
        mf = as_float_mask(replay_masks(seed, xx, [As[0]], [Bs[0]], sc, ps)[0])
        xd = xx.double() * mf * keep_scale(ps[0])
        g = sc[0] * ddy.double() @ Bs[0].double()
        ref_dA = g.t() @ xd
        torch.testing.assert_close(lv[1].grad.double(), ref_dA, rtol=1e-5, atol=1e-5 * ref_dA.abs().max().item())
        ref_dx = ddy.double() @ W.double() + (g @ As[0].double()) * mf * keep_scale(ps[0])
        torch.testing.assert_close(lv[0].grad.double(), ref_dx, rtol=1e-5, atol=1e-5 * ref_dx.abs().max().item())

# --------------------------------------------------------------------------------------------
# DoRA
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("r", [1, 64])
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("cached", [False, True], ids=["nocache", "sqnorm-cache"])
def test_dora_weight_norm_factored_equals_direct(dtype, r, fan_in_fan_out, cached):
    g = _gen(20 + r)
    W = randn(N, K, g=g, scale=K ** -0.5)
    A = randn(r, K, g=g, scale=K ** -0.5)
    B = randn(N, r, g=g, scale=r ** -0.5)
    s = 1.7
    Wst = (W.t().contiguous() if fan_in_fan_out else W).to(dtype)
    Ad, Bd = A.to(dtype), B.to(dtype)
    sq = (Wst.t() if fan_in_fan_out else Wst).float().pow(2).sum(1) if cached else None
    n = kdora.dora_weight_norm_ref(Wst, Ad, Bd, s, fan_in_fan_out, sq)
    assert n.shape == (N,) and n.dtype == torch.float32  # the norm is kept in fp32 for every base dtype
    Wnk = lambda t: t.t() if fan_in_fan_out else t  # noqa: E731
    ref = torch.linalg.norm(Wnk(Wst.double()) + s * Bd.double() @ Ad.double(), dim=1)
    plain = torch.linalg.norm(Wnk(Wst) + s * Bd @ Ad, dim=1)
    check(n, plain, ref, dtype, "norm")
    if dtype == torch.float32:
        torch.testing.assert_close(n, torch.linalg.norm(Wnk(Wst) + s * Bd @ Ad, dim=1), rtol=1e-5, atol=1e-6)


def test_dora_weight_norm_is_detached():
    g = _gen(21)
    W = randn(N, K, g=g).requires_grad_()
    A = randn(3, K, g=g).requires_grad_()
    B = randn(N, 3, g=g).requires_grad_()
    n = kdora.dora_weight_norm_ref(W.detach(), A, B, 1.0)
    assert not n.requires_grad


def dora_formula(x, W, b, A, B, m, n, s, fan_in_fan_out=False):
    """y = (m / n) * (x W^T + s (x A^T) B^T) + b with n a constant (detached)."""
    w = W.t() if fan_in_fan_out else W
    ypre = x @ w.t() + s * ((x.to(A.dtype) @ A.t()) @ B.t()).to(x.dtype)
    y = (m / n.detach()).to(ypre.dtype) * ypre
    return y + b if b is not None else y


def make_dora_inputs(seed, r, fan_in_fan_out=False, layout="contig"):
    x, W, b, As, Bs, sc, dy = make_lora_inputs(seed, (r,), fan_in_fan_out, layout)
    g = _gen(seed + 1000)
    Wnk = W.t() if fan_in_fan_out else W
    n = torch.linalg.norm(Wnk + sc[0] * Bs[0] @ As[0], dim=1)
    m = n * (1 + 0.3 * randn(N, g=g))  # m != n so c != 1 and dm != 0
    return x, W, b, As[0], Bs[0], m, n, sc[0], dy


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("r", [1, 64])
@pytest.mark.parametrize("layout", ["contig", "transposed", "3d_noncontig"])
@pytest.mark.parametrize("fan_in_fan_out,train_base", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["linear", "conv1d", "linear-trainW", "conv1d-trainW"])
def test_dora_linear_matches_autograd(dtype, r, layout, fan_in_fan_out, train_base):
    x, W, b, A, B, m, n, s, dy = make_dora_inputs(30 + r, r, fan_in_fan_out, layout)

    def leaves(dt):
        return dict(x=leaf(x, dt), W=leaf(W, dt, train_base), b=leaf(b, dt, train_base), A=leaf(A, dt),
                    B=leaf(B, dt), m=leaf(m, dt), n=leaf(n, dt, False))

    def fast(x, W, b, A, B, m, n):
        return dora_linear(x, W, b, A, B, m, n, s, fan_in_fan_out)

    def plain(x, W, b, A, B, m, n):
        return dora_formula(x, W, b, A, B, m, n, s, fan_in_fan_out)

    yf, gf = run_autograd(fast, leaves(dtype), dy)
    yp, gp = run_autograd(plain, leaves(dtype), dy)
    yr, gr = run_autograd(plain, leaves(torch.float64), dy)
    check(yf, yp, yr, dtype, "y")
    assert set(gf) == set(gr)
    for k in gr:
        check(gf[k], gp[k], gr[k], dtype, f"d{k}")


def test_dora_linear_inference_path_matches_training_path():
    x, W, b, A, B, m, n, s, _ = make_dora_inputs(40, 8, layout="3d")
    with torch.no_grad():
        y_inf = dora_linear(x, W, b, A, B, m, n, s)
    y_tr = dora_linear(x, W, b, A.requires_grad_(), B, m, n, s)
    assert not y_inf.requires_grad and y_tr.requires_grad
    torch.testing.assert_close(y_inf, y_tr.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_dora_ref_fwd_bwd(dtype, fan_in_fan_out):
    x, W, b, A, B, m, n, s, dy = make_dora_inputs(41, 16, fan_in_fan_out)
    xd, Wd, bd, Ad, Bd, md, nd, dyd = (t.to(dtype) for t in (x, W, b, A, B, m, n, dy))
    snapshot = [t.clone() for t in (xd, Wd, bd, Ad, Bd, md, nd)]
    y, xa, ypre = kdora.dora_fwd_ref(xd, Wd, bd, Ad, Bd, s, md, nd, fan_in_fan_out, keep_pre=True)
    y2, _, none = kdora.dora_fwd_ref(xd, Wd, bd, Ad, Bd, s, md, nd, fan_in_fan_out, keep_pre=False)
    assert none is None
    dx, dA, dB, dm = kdora.dora_bwd_ref(dyd, xd, Wd, Ad, Bd, s, md, nd, xa, ypre, fan_in_fan_out)
    for before, after in zip(snapshot, (xd, Wd, bd, Ad, Bd, md, nd)):
        assert torch.equal(before, after)

    def leaves(dt):
        return dict(x=leaf(x, dt), W=leaf(W, dt, False), b=leaf(b, dt, False), A=leaf(A, dt), B=leaf(B, dt),
                    m=leaf(m, dt), n=leaf(n, dt, False))

    def plain(x, W, b, A, B, m, n):
        return dora_formula(x, W, b, A, B, m, n, s, fan_in_fan_out)

    yp, gp = run_autograd(plain, leaves(dtype), dy)
    yr, gr = run_autograd(plain, leaves(torch.float64), dy)
    check(y, yp, yr, dtype, "y")
    check(y2, yp, yr, dtype, "y (keep_pre=False)")
    w64 = (W.t() if fan_in_fan_out else W).double()
    ypre64 = x.double() @ w64.t() + s * (x.double() @ A.double().t()) @ B.double().t()
    wd = Wd.t() if fan_in_fan_out else Wd
    check(ypre, xd @ wd.t() + s * (xd @ Ad.t()) @ Bd.t(), ypre64, dtype, "ypre")
    for got, k in ((dx, "x"), (dA, "A"), (dB, "B"), (dm, "m")):
        check(got, gp[k], gr[k], dtype, f"d{k}")
    # magnitude gradient in closed form: colsum(dy * ypre) / n
    torch.testing.assert_close(gr["m"], (dy.double() * ypre64).sum(0) / n.double())


def _dora_pair(base: nn.Module, target: str, fan_in_fan_out: bool, r: int = 8, seed: int = 0):
    """The same DoRA model built by peft and by peft_fast, with identical (nonzero) weights."""
    import peft

    import peft_fast

    kw = dict(r=r, lora_alpha=2 * r, target_modules=[target], use_dora=True, init_lora_weights=False,
              fan_in_fan_out=fan_in_fan_out)
    torch.manual_seed(seed)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    torch.manual_seed(seed)
    fast = peft_fast.get_peft_model(copy.deepcopy(base), peft_fast.LoraConfig(**kw))
    sd = ref.state_dict()
    missing, unexpected = fast.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    # move the magnitude off the initial norm so that c = m / n != 1
    with torch.no_grad():
        for model in (ref, fast):
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.3 * torch.randn(p.shape, generator=_gen(seed + 5)))
    ref.train()
    fast.train()
    return ref, fast


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_matches_peft_layer(kind):
    if kind == "linear":
        base = nn.Sequential(nn.Linear(K, N), nn.Tanh(), nn.Linear(N, 5))
        fan_in_fan_out = False
    else:
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(3)
        base = nn.Sequential(Conv1D(N, K), nn.Tanh(), nn.Linear(N, 5))
        with torch.no_grad():
            base[0].bias.normal_()
        fan_in_fan_out = True
    ref, fast = _dora_pair(base, "0", fan_in_fan_out)
    g = _gen(50)
    x = randn(4, 9, K, g=g)
    dy = randn(4, 9, 5, g=g)
    outs = []
    for model in (ref, fast):
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.backward(dy)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        outs.append((y.detach(), xi.grad, grads))
    (y_r, dx_r, g_r), (y_f, dx_f, g_f) = outs
    assert set(g_r) == set(g_f)
    assert any("lora_magnitude_vector" in k for k in g_f)
    torch.testing.assert_close(y_f, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_f, dx_r, rtol=1e-5, atol=1e-6)
    for k in g_r:
        assert g_r[k].abs().max() > 0, k
        torch.testing.assert_close(g_f[k], g_r[k], rtol=1e-4, atol=1e-5 * g_r[k].abs().max().item(), msg=k)


def test_dora_norm_is_detached_like_peft():
    """Gradients of A and B treat the row norm as a constant (paper Sec. 4.3, PEFT): they must
    match the detached formula and differ measurably from the undetached one."""
    x, W, b, A, B, m, n, s, dy = make_dora_inputs(60, 4)

    def grads(detach):
        A_, B_, m_ = leaf(A, torch.float64), leaf(B, torch.float64), leaf(m, torch.float64)
        nn_ = torch.linalg.norm(W.double() + s * B_ @ A_, dim=1)
        if detach:
            nn_ = nn_.detach()
        y = (m_ / nn_) * (x.double() @ W.double().t() + s * (x.double() @ A_.t()) @ B_.t()) + b.double()
        y.backward(dy.double())
        return A_.grad, B_.grad, m_.grad

    A_, B_, m_ = leaf(A, torch.float32), leaf(B, torch.float32), leaf(m, torch.float32)
    n_live = kdora.dora_weight_norm_ref(W, A_, B_, s)
    dora_linear(x, W, b, A_, B_, m_, n_live, s).backward(dy)
    dA_det, dB_det, dm_det = grads(True)
    dA_live, _, _ = grads(False)
    torch.testing.assert_close(A_.grad.double(), dA_det, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(B_.grad.double(), dB_det, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m_.grad.double(), dm_det, rtol=1e-4, atol=1e-5)
    assert (dA_live - dA_det).abs().max() > 1e-3 * dA_det.abs().max()


# --------------------------------------------------------------------------------------------
# (IA)^3
# --------------------------------------------------------------------------------------------
def ia3_formula(x, W, b, l, is_ff, fan_in_fan_out=False):
    w = W.t() if fan_in_fan_out else W
    if is_ff:
        y = (x * l) @ w.t()
        return y + b if b is not None else y
    y = x @ w.t()
    if b is not None:
        y = y + b
    return y * l


def make_ia3_inputs(seed, is_ff, fan_in_fan_out=False, layout="contig"):
    x, W, b, _, _, _, dy = make_lora_inputs(seed, (1,), fan_in_fan_out, layout)
    g = _gen(seed + 77)
    l = 1 + 0.5 * randn(K if is_ff else N, g=g)
    return x, W, b, l, dy


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("is_ff", [False, True], ids=["output", "feedforward"])
@pytest.mark.parametrize("layout", ["contig", "transposed", "3d_noncontig"])
@pytest.mark.parametrize("fan_in_fan_out,train_base", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["linear", "conv1d", "linear-trainW", "conv1d-trainW"])
def test_ia3_linear_matches_autograd(dtype, is_ff, layout, fan_in_fan_out, train_base):
    x, W, b, l, dy = make_ia3_inputs(70 + is_ff, is_ff, fan_in_fan_out, layout)

    def leaves(dt):
        return dict(x=leaf(x, dt), W=leaf(W, dt, train_base), b=leaf(b, dt, train_base), l=leaf(l, dt))

    def fast(x, W, b, l):
        return ia3_linear(x, W, b, l, is_ff, fan_in_fan_out)

    def plain(x, W, b, l):
        return ia3_formula(x, W, b, l, is_ff, fan_in_fan_out)

    yf, gf = run_autograd(fast, leaves(dtype), dy)
    yp, gp = run_autograd(plain, leaves(dtype), dy)
    yr, gr = run_autograd(plain, leaves(torch.float64), dy)
    check(yf, yp, yr, dtype, "y")
    assert set(gf) == set(gr)
    for k in gr:
        assert gf[k].dtype == dtype
        check(gf[k], gp[k], gr[k], dtype, f"d{k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("is_ff", [False, True], ids=["output", "feedforward"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_ia3_ref_fwd_bwd(dtype, is_ff, fan_in_fan_out):
    x, W, b, l, dy = make_ia3_inputs(80, is_ff, fan_in_fan_out, "transposed")
    xd, Wd, bd, ld, dyd = (t.to(dtype) for t in (x, W, b, l, dy))
    snapshot = [t.clone() for t in (xd, Wd, bd, ld)]
    y, base = kia3.ia3_fwd_ref(xd, Wd, bd, ld, is_ff, fan_in_fan_out, keep_base=True)
    y2, none = kia3.ia3_fwd_ref(xd, Wd, bd, ld, is_ff, fan_in_fan_out, keep_base=False)
    assert none is None
    assert (base is None) == is_ff
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    dx, dl = kia3.ia3_bwd_ref(dyd, xd, Wd, ld, is_ff, base, fan_in_fan_out)
    for before, after in zip(snapshot, (xd, Wd, bd, ld)):
        assert torch.equal(before, after)

    def leaves(dt):
        return dict(x=leaf(x, dt), W=leaf(W, dt, False), b=leaf(b, dt, False), l=leaf(l, dt))

    def plain(x, W, b, l):
        return ia3_formula(x, W, b, l, is_ff, fan_in_fan_out)

    yp, gp = run_autograd(plain, leaves(dtype), dy)
    yr, gr = run_autograd(plain, leaves(torch.float64), dy)
    check(y, yp, yr, dtype, "y")
    check(dx, gp["x"], gr["x"], dtype, "dx")
    check(dl, gp["l"], gr["l"], dtype, "dl")
    dx2, dl2 = kia3.ia3_bwd_ref(dyd, xd, Wd, ld, is_ff, base, fan_in_fan_out, need_dx=False)
    assert dx2 is None
    torch.testing.assert_close(dl2, dl, rtol=0, atol=0)


def test_ia3_inference_path_matches_training_path():
    for is_ff in (False, True):
        x, W, b, l, _ = make_ia3_inputs(90, is_ff, layout="3d")
        with torch.no_grad():
            y_inf = ia3_linear(x, W, b, l, is_ff)
        y_tr = ia3_linear(x, W, b, l.clone().requires_grad_(), is_ff)
        torch.testing.assert_close(y_inf, y_tr.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("p", [1e-6, 0.999995])
def test_lora_dropout_extreme_p(p):
    """Any lora_dropout that LoraConfig accepts ([0, 1)) must run: finite output, keep rate ~ 1-p."""
    assert peft_fast.LoraConfig(lora_dropout=p).lora_dropout == p
    x, W, b, As, Bs, sc, dy = make_lora_inputs(15, (3,))
    A = leaf(As[0], torch.float32)
    torch.manual_seed(0)
    y = lora_linear(x, W, b, [A], [Bs[0]], sc, [p])
    y.backward(dy)
    assert torch.isfinite(y).all() and torch.isfinite(A.grad).all()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_base_fp32_adapter_layer_vs_peft_and_fp64(use_dora, dtype):
    """Half-precision base layer with fp32 adapters (PEFT's autocast_adapter_dtype): the layer's
    error vs an fp64 evaluation is within 2x of PEFT's own error (+ atol)."""
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(K, N)).to(dtype)
    kw = dict(r=8, lora_alpha=16, target_modules=["0"], use_dora=use_dora, init_lora_weights=False)
    torch.manual_seed(1)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    fast = peft_fast.get_peft_model(copy.deepcopy(base), peft_fast.LoraConfig(**kw))
    fast.load_state_dict(ref.state_dict(), strict=True)
    assert fast.base_model.model[0].lora_A["default"].weight.dtype == torch.float32
    g = _gen(16)
    x = randn(3, 13, K, g=g).to(dtype)
    dy = randn(3, 13, N, g=g).to(dtype)
    L = ref.base_model.model[0]
    W, b = L.base_layer.weight.detach().double(), L.base_layer.bias.detach().double()
    A, B = L.lora_A["default"].weight.detach().double(), L.lora_B["default"].weight.detach().double()
    s = L.scaling["default"]
    A64, B64 = A.clone().requires_grad_(), B.clone().requires_grad_()
    x64 = x.double().requires_grad_()
    ypre = x64 @ W.t() + s * (x64 @ A64.t()) @ B64.t()
    if use_dora:
        m64 = L.lora_magnitude_vector["default"].weight.detach().double().requires_grad_()
        n = torch.linalg.norm(W + s * B @ A, dim=1)
        y64 = (m64 / n) * ypre + b
    else:
        y64 = ypre + b
    y64.backward(dy.double())
    results = []
    for pm in (ref, fast):
        xi = x.clone().requires_grad_()
        y = pm(xi)
        y.backward(dy)
        lay = pm.base_model.model[0]
        grads = {"x": xi.grad, "A": lay.lora_A["default"].weight.grad, "B": lay.lora_B["default"].weight.grad}
        if use_dora:
            grads["m"] = lay.lora_magnitude_vector["default"].weight.grad
        results.append((y, grads))
    (y_r, g_r), (y_f, g_f) = results
    assert y_f.dtype == y_r.dtype == dtype
    check(y_f, y_r, y64, dtype, "y")
    ref64 = {"x": x64.grad, "A": A64.grad, "B": B64.grad}
    if use_dora:
        ref64["m"] = m64.grad
    for k, r64 in ref64.items():
        assert g_f[k].dtype == g_r[k].dtype
        check(g_f[k], g_r[k], r64, dtype, f"d{k}")
