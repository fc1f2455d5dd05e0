"""NF4 kernels and the QLoRA op through Triton (interpreter on CPU; run with TRITON_INTERPRET=1).

The dequant kernel must be bit-identical to bitsandbytes' dequantize_4bit; the 4-bit GEMM paths
(decode in registers, or dequantize into a buffer) must match the reference; the model-level
QLoRA tests of test_qlora.py are re-collected here so they run through the Triton path too.
"""
from __future__ import annotations

import pytest
import torch

from test_qlora import (  # noqa: F401  (fixtures and tests re-collected under the interp marker)
    test_4bit_parity_with_peft, test_lora_layers_on_4bit_use_the_fused_qlora_op, test_qlora_op_matches_reference_with_dropout,
    test_qlora_saves_no_dequantized_weight, tiny_dir,
)

pytestmark = pytest.mark.interp
bnb = pytest.importorskip("bitsandbytes")


def _operand(W, blocksize=64, double_quant=False):
    from peft_fast.triton_kernels.nf4 import NF4Operand

    p, qs = bnb.functional.quantize_4bit(W, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    extra = (qs.offset, qs.state2.absmax, qs.state2.code, qs.state2.blocksize) if double_quant else ()
    return NF4Operand(p.reshape(-1), qs.absmax, qs.code, tuple(W.shape), W.dtype, blocksize, *extra), p, qs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,blocksize", [((72, 100), 64), ((33, 37), 128), ((1, 64), 64)], ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
def test_nf4_dequantize_bit_exact_vs_bitsandbytes(dtype, shape, blocksize, double_quant):
    from peft_fast.triton_kernels.nf4 import nf4_dequantize, nf4_dequantize_ref

    torch.manual_seed(sum(shape))
    W = torch.randn(*shape).to(dtype)
    op, p, qs = _operand(W, blocksize, double_quant)
    expected = bnb.functional.dequantize_4bit(p, qs)
    assert torch.equal(nf4_dequantize_ref(op), expected)
    out = torch.full(shape, float("nan"), dtype=dtype)  # poisoned: every element must be written
    got = nf4_dequantize(op, out=out)
    assert got is out and torch.equal(got, expected)


def test_nf4_dequantize_rejects_bad_buffers():
    from peft_fast.triton_kernels.nf4 import nf4_dequantize

    op, _, _ = _operand(torch.randn(8, 16))
    with pytest.raises(ValueError, match="out must be contiguous"):
        nf4_dequantize(op, out=torch.empty(16, 8))
    with pytest.raises(ValueError, match="packed bytes"):
        nf4_dequantize(op._replace(shape=(80, 16)))


@pytest.mark.parametrize("transpose", [True, False], ids=["W^T", "W"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape,blocksize", [((72, 192), 64), ((40, 256), 128), ((72, 100), 64)], ids=str)
def test_fused_linear_reads_nf4_weight_in_registers(transpose, double_quant, dtype, shape, blocksize):
    """Rows of W that are whole NF4 blocks: decoded in the GEMM; (72, 100): blocks straddle
    rows, the weight is expanded first."""
    from conftest import assert_kernel_close
    from peft_fast.triton_kernels.fused_linear import NF4KN, Segment, fused_linear, fused_linear_ref, nf4_decodes_in_gemm

    torch.manual_seed(3)
    (N, K), M = shape, 5
    op, _, _ = _operand(torch.randn(N, K).to(dtype), blocksize, double_quant)
    assert nf4_decodes_in_gemm(op) == (K % blocksize == 0)
    w = NF4KN(op, transpose)
    kin, kout = w.shape
    x = torch.randn(M, kin).to(dtype)
    L, R = torch.randn(M, 4).to(dtype), torch.randn(4, kout).to(dtype)
    kw = dict(lr_left=L, lr_right=R, segments=[Segment(0, 4, 0.5, 0.0)], bias=torch.randn(kout).to(dtype))
    out, _, _ = fused_linear(x, w, **kw)
    dense = w.dequantize()
    ref = fused_linear_ref(x.double(), dense.double(), **{k: (v.double() if torch.is_tensor(v) else v)
                                                          for k, v in kw.items()})
    assert_kernel_close(out, ref[0], fused_linear_ref(x, dense, **kw)[0], "nf4 gemm")


@pytest.mark.parametrize("path", ["nf4_fused", "triton", "torch"])
def test_qlora_op_paths_agree(path, monkeypatch):
    """Every GEMM path of the QLoRA op gives the dense-weight LoRA result (same seeds)."""
    from peft_fast import ops
    from peft_fast.functional import lora_linear, qlora_linear
    from peft_fast.triton_kernels.nf4 import nf4_dequantize_ref

    torch.manual_seed(0)
    op, _, _ = _operand(torch.randn(72, 100), 64, True)
    W = nf4_dequantize_ref(op)
    As, Bs = [torch.randn(4, 100, requires_grad=True)], [torch.randn(72, 4, requires_grad=True)]
    x = torch.randn(9, 100)
    results = []
    for use_nf4 in (True, False):
        monkeypatch.setenv("PEFT_FAST_GEMM", path if use_nf4 else "triton")
        ops.clear_path_choices()
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)
        y = qlora_linear(xi, op, None, As, Bs, [2.0], [0.1]) if use_nf4 else lora_linear(xi, W, None, As, Bs, [2.0], [0.1])
        y.pow(2).sum().backward()
        results.append((y.detach(), xi.grad, As[0].grad.clone(), Bs[0].grad.clone()))
        As[0].grad = Bs[0].grad = None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
