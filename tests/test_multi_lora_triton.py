"""Multi-LoRA kernels (segmented shrink/expand, per-token decode) through the Triton interpreter,
and the model-level mixed-batch tests re-run on the Triton path. Run with TRITON_INTERPRET=1."""
from __future__ import annotations

import pytest
import torch

from test_multi_lora import (  # noqa: F401  (re-collected under the interp marker)
    per_token_loop, test_generate_with_adapter_names_matches_peft, test_mixed_batch_matches_peft,
)

pytestmark = pytest.mark.interp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,n,R", [(1, 1, 1), (9, 3, 16), (100, 3, 8), (130, 17, 64)])
def test_lora_mixed_kernels_match_per_token_loop(dtype, T, n, R):
    from peft_fast.triton_kernels.multi_lora import DECODE_TOKENS, lora_mixed, lora_mixed_ref

    torch.manual_seed(T * n + R)
    K, N = 40, 72
    x = torch.randn(K, T).t().to(dtype)  # non-contiguous
    A = (torch.randn(n, R, K) * 0.2).to(dtype)
    B = (torch.randn(n, N, R) * 0.2).to(dtype)
    A[0, R // 2:] = 0  # a smaller rank, zero-padded as the layers stack them
    B[0, :, R // 2:] = 0
    s = torch.rand(n) + 0.5
    idx = torch.randint(-1, n, (T,))
    out = torch.randn(T, N).to(dtype)
    expected = per_token_loop(x, A, B, s, idx, out)
    got = lora_mixed(x, A, B, s, idx, out.clone())
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)
    same = lora_mixed_ref(x, A, B, s, idx, out.clone())
    assert (got.double() - expected).abs().max() <= 2 * (same.double() - expected).abs().max() + tol
    assert (T <= DECODE_TOKENS) == (T < 100)  # both kernels are exercised by this table


def test_base_rows_are_untouched():
    from peft_fast.triton_kernels.multi_lora import lora_mixed

    x, A, B = torch.randn(70, 16), torch.randn(2, 4, 16), torch.randn(2, 8, 4)
    idx = torch.full((70,), -1)
    idx[::7] = 1
    out = torch.randn(70, 8)
    got = lora_mixed(x, A, B, torch.ones(2), idx, out.clone())
    assert torch.equal(got[idx < 0], out[idx < 0]) and not torch.equal(got[idx >= 0], out[idx >= 0])
