"""The fused ops and autograd Functions through the Triton path (interpreter on CPU), and
layer-level parity with real peft through that path.

Run with TRITON_INTERPRET=1 (make test does): the autograd-Function tests of
test_refs_autograd.py are re-collected here, so the same formulas, shapes (M=37, K=100,
N=72, rank 1/64, three adapters, non-contiguous and 3-D inputs, fp32/fp16/bf16) check the
Triton path too. Dropout tests replay the Philox masks from the seeds the forward drew.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peft_fast
from peft_fast import ops, ops_triton
from peft_fast.functional import lora_linear
from peft_fast.triton_kernels._triton import keep_scale, philox_keep_mask_ref
from test_refs_autograd import (  # noqa: F401  (re-collected under the interp marker)
    K, N, check_against_masked_formula, lora_leaves, make_lora_inputs,
    test_dora_linear_inference_path_matches_training_path, test_dora_linear_matches_autograd,
    test_dora_matches_peft_layer, test_ia3_linear_matches_autograd, test_lora_linear_empty_batch,
    test_lora_linear_frozen_base_gets_no_grad, test_lora_linear_matches_autograd,
    test_lora_linear_mixed_dtype_fp32_adapters, test_lora_linear_no_bias_and_x_without_grad,
)

pytestmark = pytest.mark.interp


def test_cpu_tensors_take_the_triton_path_when_interpreting():
    assert ops.backend_for(torch.zeros(1)) == "triton"


@pytest.fixture
def recorded_seeds(monkeypatch):
    seeds = []
    real = ops_triton.new_seed

    def record(device):
        s = real(device)
        seeds.append(int(s))
        return s

    monkeypatch.setattr(ops_triton, "new_seed", record)
    return seeds


@pytest.mark.parametrize("layout", ["contig", "3d_noncontig"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_lora_dropout_backward_uses_forward_mask(recorded_seeds, layout, dtype):
    """Outputs and gradients match the formula evaluated with the Philox masks of the seeds the
    forward drew, although torch's RNG advanced between forward and backward."""
    ps = [0.3, 0.0, 0.6]
    ranks = (4, 1, 9)
    x, W, b, As, Bs, sc, dy = make_lora_inputs(12, ranks, layout=layout)
    lv = lora_leaves(x, W, b, As, Bs, dtype, train_base=True)
    y = lora_linear(lv["x"], lv["W"], lv["b"], lv["As"], lv["Bs"], sc, ps)
    torch.rand(1000)
    y.backward(dy.to(dtype))
    assert len(recorded_seeds) == 2  # one per adapter with dropout
    M2 = x.reshape(-1, K).shape[0]
    it = iter(recorded_seeds)
    masks = [None if p == 0 else philox_keep_mask_ref(next(it), M2, K, p).double().reshape(x.shape) for p in ps]
    ps_eff = [1 - 1 / keep_scale(p) if p > 0 else 0.0 for p in ps]

    gr = check_against_masked_formula(y, lv, (x, W, b, As, Bs, sc, dy), dtype, masks, ps_eff)
    # discriminating: another seed's mask gives a clearly different dA
    other = philox_keep_mask_ref(recorded_seeds[0] + 1, M2, K, ps[0]).double()
    x64, dy64 = x.double().reshape(-1, K), dy.double().reshape(-1, N)
    g0 = sc[0] * keep_scale(ps[0]) * (dy64 @ Bs[0].double()).t()
    dA_other = g0 @ (x64 * other)
    assert (dA_other - gr["As0"]).abs().max() > 1e-2 * gr["As0"].abs().max()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_lora_dropout_keep_rate_and_mean(p):
    """With A = I and B = I, y - x W^T = s drop(x): keep rate 1 - p, kept entries scaled by
    1/(1-p), mean output equal to the no-dropout output."""
    torch.manual_seed(0)
    M, D = 400, 32
    x = torch.randn(M, D) + 3.0
    W = torch.zeros(D, D)
    with torch.no_grad():
        y = lora_linear(x, W, None, [torch.eye(D)], [torch.eye(D)], [1.0], [p])
    kept = y != 0
    rate = kept.float().mean().item()
    std = (p * (1 - p) / y.numel()) ** 0.5
    assert abs(rate - (1 - p)) < 6 * std, rate
    torch.testing.assert_close(y[kept], x[kept] * keep_scale(p))
    z = (y.mean() - x.mean()).abs() / (y.std() / y.numel() ** 0.5)
    assert z < 6
    # two calls draw different masks
    with torch.no_grad():
        y2 = lora_linear(x, W, None, [torch.eye(D)], [torch.eye(D)], [1.0], [p])
    assert not torch.equal(kept, y2 != 0)


def test_triton_path_saves_no_mask_or_dropped_copy():
    """Saved for backward: x, W, A, B, xa and an int64 [1] seed; nothing of size M x K besides x."""
    torch.manual_seed(0)
    x = torch.randn(37, 100, requires_grad=True)
    W, A, B = torch.randn(72, 100), torch.randn(8, 100, requires_grad=True), torch.randn(72, 8, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, W, None, [A], [B], [2.0], [0.1])
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 2 and any(t.data_ptr() == x.data_ptr() for t in big) and any(t.shape == W.shape for t in big)
    seeds = [t for t in saved if t.dtype == torch.int64]
    assert len(seeds) == 1 and seeds[0].numel() == 1
    y.sum().backward()


def test_path_choices_are_recorded():
    ops.clear_path_choices()
    x = torch.randn(5, 100)
    lora_linear(x, torch.randn(72, 100), None, [torch.randn(4, 100)], [torch.randn(72, 4)], [1.0], [0.0])
    rec = ops.path_choices()
    assert rec and rec[0]["op"] == "lora_fwd" and rec[0]["path"] == "triton"
    assert "not measured" in rec[0]["reason"]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=32)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "lora-2adapters"])
def test_layer_parity_with_peft_through_triton(method):
    import peft

    base = _tiny_llama()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    results = []
    for lib in (peft, peft_fast):
        torch.manual_seed(3)
        if method == "ia3":
            cfg = lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                task_type="CAUSAL_LM")
        else:
            cfg = lib.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian",
                                 use_dora=method == "dora", task_type="CAUSAL_LM")
        m = lib.get_peft_model(copy.deepcopy(base), cfg)
        if method == "lora-2adapters":
            torch.manual_seed(4)
            m.add_adapter("second", lib.LoraConfig(r=1, lora_alpha=3, target_modules=["q_proj", "down_proj"],
                                                   init_lora_weights="gaussian"))
            m.base_model.set_adapter(["default", "second"])
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "ia3_l" in n or "lora_magnitude" in n:
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
        m.train()
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad and p.grad is not None}
        results.append((out.logits.detach(), grads))
    (lr, gr), (lf, gf) = results
    torch.testing.assert_close(lf, lr, rtol=1e-4, atol=1e-5)
    assert set(gf) == set(gr) and gr
    for k in gr:
        torch.testing.assert_close(gf[k], gr[k], rtol=1e-3, atol=1e-5 * max(1.0, gr[k].abs().max().item()), msg=k)
