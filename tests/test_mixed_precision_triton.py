"""The mixed-precision tests through the Triton kernels (interpreter on CPU; `make test` runs
this file with TRITON_INTERPRET=1): every op-level autocast/16-bit test, and model-level parity
with peft under autocast, on 16-bit models, on 4-bit (QLoRA) models and in mixed-adapter batches.

The interpreter computes bf16 dots in fp32 (DESIGN.md), so these check dtypes, casts and the
fp32-accumulated result; the bf16 tensor-core path itself is covered by the `gpu` tests.
"""
from __future__ import annotations

import pytest
import torch

from peft_fast import ops
from test_mixed_precision_models import (  # noqa: F401  (re-collected under the interp marker)
    llama_dir, test_16bit_model_parity_with_peft, test_autocast_parity_with_peft,
    test_mixed_adapter_batch_under_autocast_matches_peft, test_qlora_under_autocast_parity_with_peft,
)
from test_mixed_precision_ops import (  # noqa: F401
    test_backward_runs_inside_another_autocast_region, test_dora_op_under_autocast, test_ia3_op_under_autocast,
    test_lora_op_under_autocast, test_lora_op_with_dropout_path_under_autocast,
    test_no_16bit_copy_of_the_base_weight_is_kept, test_qlora_op_under_autocast,
    test_16bit_inputs_with_fp32_adapters_without_autocast,
)

pytestmark = pytest.mark.interp


def test_these_tests_really_take_the_triton_path():
    assert ops.backend_for(torch.zeros(1)) == "triton"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.backend_for(torch.zeros(1)) == "triton"
