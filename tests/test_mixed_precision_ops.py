"""The fused ops under torch.autocast (bf16, fp16) and on 16-bit inputs, op by op.

Each fused op must follow autocast as `nn.Linear` plus PEFT's formula does: the result in the
autocast dtype, every gradient in its input's own dtype (fp32 adapter weights get fp32
gradients, an fp32 activation an fp32 gradient), and values as accurate as the same math done by
torch under the same autocast (DESIGN.md rule: error vs fp64 <= 2x torch's error + atol).
Collected twice: on the torch path here, and through the Triton kernels in the `interp` run
(tests/test_mixed_precision_triton.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tolerance
from peft_fast import functional as PF

AUTOCAST = [torch.bfloat16, torch.float16]
IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _close(out, ref64, same, what, compute_dtype):
    """DESIGN.md: |out - ref64| <= 2 |same - ref64| + atol, atol of the dtype the math ran in
    (an fp32 gradient computed in 16 bits carries 16-bit error), scaled by the magnitude."""
    assert torch.isfinite(out.float()).all(), f"{what}: non-finite values"
    err = (out.double() - ref64).abs().max().item()
    base = (same.double() - ref64).abs().max().item()
    atol = tolerance(compute_dtype)["atol"] * max(1.0, ref64.abs().max().item())
    assert err <= 2 * base + atol, f"{what}: error {err:.3e} > 2 x torch's {base:.3e} + {atol:.1e}"


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in ts]


def _run(fn, tensors, ac_dtype, upstream_seed=7):
    """fn(*tensors) under autocast(ac_dtype) (None: no autocast), then backward with a fixed
    random upstream gradient; -> (y, [grads of the tensors])."""
    ts = _leaves(*tensors)
    if ac_dtype is None:
        y = fn(*ts)
    else:
        with torch.autocast(ts[0].device.type, dtype=ac_dtype):
            y = fn(*ts)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(upstream_seed)).to(y.dtype).to(y.device)
    y.backward(g)
    return y, [None if t is None or not t.requires_grad else t.grad for t in ts]


def _check(fused, composite, tensors, ac_dtype):
    """fused vs PEFT's composite under the same autocast, both against the composite in fp64."""
    yf, gf = _run(fused, tensors, ac_dtype)
    yc, gc = _run(composite, tensors, ac_dtype)
    y64, g64 = _run(composite, [None if t is None else t.double() for t in tensors], None)
    assert yf.dtype == yc.dtype, f"output dtype {yf.dtype} != PEFT's {yc.dtype}"
    if ac_dtype is None:  # 16-bit inputs: the math runs in the lowest precision among them
        ac_dtype = max((t.dtype for t in tensors if t is not None), key=lambda d: tolerance(d)["atol"])
    _close(yf, y64, yc, "output", ac_dtype)
    for i, (a, b, r) in enumerate(zip(gf, gc, g64)):
        assert (a is None) == (b is None), f"grad {i}: presence differs"
        if a is None:
            continue
        assert a.dtype == b.dtype == tensors[i].dtype, f"grad {i}: dtype {a.dtype}, PEFT's {b.dtype}"
        _close(a, r, b, f"grad {i}", ac_dtype)


def _inputs(M, K, N, ranks, x_dtype, w_dtype=torch.float32, train_w=False, noncontig=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(x_dtype)
    if noncontig:  # a transposed view: strides (1, M)
        x = torch.randn(K, M, generator=g).to(x_dtype).t()
    x.requires_grad_()
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(w_dtype).requires_grad_(train_w)
    b = (torch.randn(N, generator=g) * 0.1).to(w_dtype).requires_grad_(train_w) if bias else None
    As = [(torch.randn(r, K, generator=g) / K ** 0.5).requires_grad_() for r in ranks]
    Bs = [(torch.randn(N, r, generator=g) * 0.3).requires_grad_() for r in ranks]
    return x, W, b, As, Bs


LORA_SHAPES = [  # (M, K, N, ranks): odd sizes, rank 1, a large rank, several adapters
    (13, 37, 29, [1]),
    (16, 64, 48, [64]),
    (9, 40, 24, [2, 5, 3]),
]


@pytest.mark.parametrize("ac", AUTOCAST, ids=IDS.get)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=lambda d: "x" + IDS[d])
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}r{s[3]}")
@pytest.mark.parametrize("train_w,noncontig", [(False, False), (True, True)], ids=["frozen", "trainW-strided"])
def test_lora_op_under_autocast(ac, x_dtype, shape, train_w, noncontig):
    M, K, N, ranks = shape
    x, W, b, As, Bs = _inputs(M, K, N, ranks, x_dtype, train_w=train_w, noncontig=noncontig)
    s = [0.5 + i for i in range(len(ranks))]
    n = len(ranks)

    def fused(x, W, b, *AB):
        return PF.lora_linear(x, W, b, AB[:n], AB[n:], s, [0.0] * n)

    def composite(x, W, b, *AB):  # PEFT's formula: base layer, then each adapter, then the cast back
        y = F.linear(x, W, b)
        for A, B, si in zip(AB[:n], AB[n:], s):
            y = y + F.linear(F.linear(x.to(A.dtype), A), B) * si
        return y.to(F.linear(x, W, b).dtype)

    _check(fused, composite, [x, W, b, *As, *Bs], ac)


@pytest.mark.parametrize("ac", AUTOCAST, ids=IDS.get)
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_lora_op_with_dropout_path_under_autocast(ac, fan_in_fan_out):
    """p = 1e-9 runs the dropout code path (masks, keep scale) while keeping every element, so
    the result is deterministic and comparable; p = 0.5 checks dtypes and finiteness."""
    x, W, b, (A,), (B,) = _inputs(11, 24, 20, [4], torch.float32)
    Wt = W.detach().t().contiguous() if fan_in_fan_out else W

    def fused(x, W, b, A, B):
        return PF.lora_linear(x, W, b, [A], [B], [2.0], [1e-9], fan_in_fan_out)

    def composite(x, W, b, A, B):
        w = W.t() if fan_in_fan_out else W
        return F.linear(x, w, b) + F.linear(F.linear(x, A), B) * 2.0

    _check(fused, composite, [x, Wt, b, A, B], ac)
    y, (dx, _, _, dA, dB) = _run(lambda x, W, b, A, B: PF.lora_linear(x, W, b, [A], [B], [2.0], [0.5], fan_in_fan_out),
                                 [x, Wt, b, A, B], ac)
    assert y.dtype == ac and dx.dtype == dA.dtype == dB.dtype == torch.float32
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in (y.float(), dx, dA, dB))


@pytest.mark.parametrize("ac", AUTOCAST, ids=IDS.get)
@pytest.mark.parametrize("shape", [(13, 37, 29, 1), (16, 64, 48, 32)], ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}r{s[3]}")
@pytest.mark.parametrize("train_w", [False, True], ids=["frozen", "trainW"])
def test_dora_op_under_autocast(ac, shape, train_w):
    from peft_fast import ops

    M, K, N, r = shape
    x, W, b, (A,), (B,) = _inputs(M, K, N, [r], torch.float32, train_w=train_w)
    s = 1.5
    with torch.no_grad():
        norm0 = ops.dora_weight_norm(W, A, B, s)
    m = (norm0 * (1 + 0.2 * torch.randn(N, generator=torch.Generator().manual_seed(3)))).requires_grad_()

    def fused(x, W, b, A, B, m):
        return PF.dora_linear(x, W, b, A, B, m, ops.dora_weight_norm(W, A, B, s), s)

    def composite(x, W, b, A, B, m):  # PEFT's DoRA layer: norm of W + s BA in W's dtype, detached
        base = F.linear(x, W, b)
        norm = (W + s * (B @ A).to(W.dtype)).norm(dim=1).detach()
        c = (m / norm).view(1, -1)
        out = base + (c - 1) * (base - b if b is not None else base) + c * F.linear(F.linear(x, A), B) * s
        return out.to(base.dtype)

    _check(fused, composite, [x, W, b, A, B, m], ac)


@pytest.mark.parametrize("ac", AUTOCAST, ids=IDS.get)
@pytest.mark.parametrize("is_ff", [False, True], ids=["out", "ff"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=lambda d: "x" + IDS[d])
def test_ia3_op_under_autocast(ac, is_ff, x_dtype):
    x, W, b, _, _ = _inputs(13, 37, 29, [], x_dtype)
    l = (1 + 0.3 * torch.randn(37 if is_ff else 29, generator=torch.Generator().manual_seed(5))).requires_grad_()

    def fused(x, W, b, l):
        return PF.ia3_linear(x, W, b, l, is_ff)

    def composite(x, W, b, l):  # PEFT's IA3 Linear.forward
        if is_ff:
            return F.linear((x.to(l.dtype) * l).to(x.dtype), W, b)
        y = F.linear(x, W, b)
        return (y * l).to(y.dtype)

    _check(fused, composite, [x, W, b, l], ac)


@pytest.mark.parametrize("ac", AUTOCAST, ids=IDS.get)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=lambda d: "nf4" + IDS[d])
def test_qlora_op_under_autocast(ac, w_dtype):
    """The NF4 op runs its base GEMM in the weight's (compute) dtype whatever the autocast, and
    returns x's dtype, as bitsandbytes' Linear4bit under PEFT (`matmul_4bit(x.to(compute_dtype),
    ...).to(inp_dtype)`, a custom op autocast passes through); PEFT's adapters run under autocast."""
    from peft_fast.quant import quantize_nf4
    from peft_fast.triton_kernels.nf4 import nf4_dequantize_ref

    x, W, b, As, Bs = _inputs(13, 64, 40, [1, 8], torch.float32, w_dtype=w_dtype)
    nf4 = quantize_nf4(W.detach(), blocksize=64).operand()
    Wq = nf4_dequantize_ref(nf4).detach()

    def fused(x, b, *AB):
        return PF.qlora_linear(x, nf4, b, AB[:2], AB[2:], [2.0, 0.5], [0.0, 0.0])

    def composite(x, b, *AB):  # bitsandbytes: x to the compute dtype, 4-bit matmul (no autocast), back
        wdt = torch.float64 if x.dtype == torch.float64 else w_dtype
        with torch.autocast("cpu", enabled=False):
            base = F.linear(x.to(wdt), Wq.to(wdt), b.to(wdt)).to(x.dtype)
        y = base
        xl = x.to(wdt)  # the one read of x serves both: the adapters see it in the compute dtype too
        for A, B, s in zip(AB[:2], AB[2:], [2.0, 0.5]):
            y = y + F.linear(F.linear(xl, A), B) * s
        return y.to(base.dtype)

    _check(fused, composite, [x, b, *As, *Bs], ac)


def test_backward_runs_inside_another_autocast_region():
    """backward called inside an autocast block (of another dtype) must not re-cast the op's
    backward matmuls: the gradients equal those of a backward outside autocast."""
    x, W, b, (A,), (B,) = _inputs(10, 24, 16, [4], torch.float32)
    outs = []
    for inside in (False, True):
        xs, As, Bs = _leaves(x, A, B)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = PF.lora_linear(xs, W, b, [As], [Bs], [2.0], [0.0])
            if inside:
                with torch.autocast("cpu", dtype=torch.float16):
                    y.float().pow(2).sum().backward()
        if not inside:
            y.float().pow(2).sum().backward()
        outs.append((xs.grad, As.grad, Bs.grad))
    for a, c in zip(*outs):
        assert a.dtype == c.dtype == torch.float32
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["lora", "dora", "ia3"])
def test_no_16bit_copy_of_the_base_weight_is_kept(op):
    """Under autocast the fp32 base weight is cast again in backward: the node keeps the
    parameter itself (no extra memory), not an N x K 16-bit copy as nn.Linear under autocast does."""
    from peft_fast import ops

    N, K = 48, 40
    x, W, b, (A,), (B,) = _inputs(8, K, N, [4], torch.float32)
    m = ops.dora_weight_norm(W, A, B, 1.0).clone().requires_grad_()
    l = torch.ones(N, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if op == "lora":
                y = PF.lora_linear(x, W, b, [A], [B], [1.0], [0.0])
            elif op == "dora":
                y = PF.dora_linear(x, W, b, A, B, m, ops.dora_weight_norm(W, A, B, 1.0), 1.0)
            else:
                y = PF.ia3_linear(x, W, b, l, False)
    assert y.dtype == torch.bfloat16
    big16 = [t for t in saved if t.shape in ((N, K), (K, N)) and t.dtype == torch.bfloat16]
    assert not big16, "a 16-bit copy of W was saved for backward"
    assert any(t.data_ptr() == W.data_ptr() and t.dtype == W.dtype for t in saved), "backward should use W itself"
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert (l.grad if op == "ia3" else A.grad).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=IDS.get)
def test_16bit_inputs_with_fp32_adapters_without_autocast(dtype):
    """A 16-bit model (no autocast) with fp32 adapter weights, PEFT's default
    (autocast_adapter_dtype=True): result in the model's dtype, adapter gradients fp32."""
    x, W, b, As, Bs = _inputs(13, 37, 29, [1, 6], dtype, w_dtype=dtype)

    def fused(x, W, b, *AB):
        return PF.lora_linear(x, W, b, AB[:2], AB[2:], [1.0, 3.0], [0.0, 0.0])

    def composite(x, W, b, *AB):
        y = F.linear(x, W, b)
        out_dtype = y.dtype
        for A, B, s in zip(AB[:2], AB[2:], [1.0, 3.0]):
            y = y + F.linear(F.linear(x.to(A.dtype), A), B) * s
        return y.to(out_dtype)

    _check(fused, composite, [x, W, b, *As, *Bs], None)
