"""The mixed-precision tests on CUDA (skipped without a GPU): torch.autocast("cuda") with bf16
and fp16 through the compiled Triton kernels (real bf16/fp16 dots, unlike the interpreter), op by
op against PEFT's formula and fp64, and model-level parity with peft."""
from __future__ import annotations

import pytest
import torch

from test_mixed_precision_models import AUTOCAST, IDS, METHODS, compare_with_peft
from test_mixed_precision_ops import LORA_SHAPES, _check, _inputs

pytestmark = pytest.mark.gpu
F = torch.nn.functional


def _cuda(ts):
    return [None if t is None else t.detach().cuda().requires_grad_(t.requires_grad) for t in ts]


@pytest.mark.parametrize("ac", AUTOCAST, ids=IDS.get)
@pytest.mark.parametrize("shape", LORA_SHAPES + [(4096, 1024, 768, [16])], ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}r{s[3]}")
def test_lora_op_under_cuda_autocast(ac, shape):
    from peft_fast import functional as PF

    M, K, N, ranks = shape
    x, W, b, As, Bs = _inputs(M, K, N, ranks, torch.float32)
    n, s = len(ranks), [0.5 + i for i in range(len(ranks))]

    def fused(x, W, b, *AB):
        return PF.lora_linear(x, W, b, AB[:n], AB[n:], s, [0.0] * n)

    def composite(x, W, b, *AB):
        y = F.linear(x, W, b)
        for A, B, si in zip(AB[:n], AB[n:], s):
            y = y + F.linear(F.linear(x, A), B) * si
        return y.to(F.linear(x, W, b).dtype)

    _check(fused, composite, _cuda([x, W, b, *As, *Bs]), ac)


@pytest.mark.parametrize("ac", AUTOCAST, ids=IDS.get)
@pytest.mark.parametrize("method", list(METHODS))
def test_model_autocast_parity_with_peft_on_cuda(method, ac):
    compare_with_peft("llama", method, ac_dtype=ac, device="cuda")


@pytest.mark.parametrize("dtype", AUTOCAST, ids=IDS.get)
@pytest.mark.parametrize("method", list(METHODS))
def test_16bit_model_parity_with_peft_on_cuda(method, dtype):
    compare_with_peft("llama", method, model_dtype=dtype, device="cuda")
