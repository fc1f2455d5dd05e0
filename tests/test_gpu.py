"""GPU checks of the Triton path (skipped without CUDA; run by benchmarks/gpu_suite.sh).

bf16 `tl.dot` cannot be checked in the interpreter, so bf16 is covered here; the rest repeats
the interpreter checks on compiled kernels, plus torch.compile with Inductor on the device.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_kernel_close

pytestmark = pytest.mark.gpu
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cu(t):
    return t.to(DEV) if isinstance(t, torch.Tensor) else t


def _d(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 100, 72), (1, 4096, 1024), (515, 1024, 3000)], ids=str)
@pytest.mark.parametrize("case", ["bias", "lowrank2", "lowrank_masked", "lowrank_r64", "pro_scale",
                                  "col_scaled_bias_pre", "col_then_bias_lr", "reduce", "five_adapters"])
def test_fused_linear_cuda(case, dtype, shape):
    from test_triton_kernels import FUSED_CASES, _fused_args

    from peft_fast.triton_kernels.fused_linear import fused_linear, fused_linear_ref

    torch.manual_seed(0)
    x, w, kw = _fused_args(FUSED_CASES[case], *shape, dtype, w_t=True)
    x, w, kw = _cu(x), _cu(w), {k: _cu(v) for k, v in kw.items()}
    out, pre, red = fused_linear(x, w, **kw)
    torch.cuda.synchronize()
    ref = fused_linear_ref(_d(x), _d(w), **{k: _d(v) for k, v in kw.items()})
    same = fused_linear_ref(x, w, **kw)
    assert_kernel_close(out, ref[0], same[0], f"{case} out")
    if kw.get("store_pre"):
        assert_kernel_close(pre, ref[1], same[1], f"{case} pre")
    if "reduce_with" in kw:
        assert_kernel_close(red, ref[2], same[2], f"{case} red")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,r,p", [(37, 100, 1, 0.3), (8192, 4096, 16, 0.05), (513, 1024, 64, 0.0)])
def test_lora_shrink_grad_a_cuda(dtype, M, K, r, p):
    from peft_fast.triton_kernels._triton import keep_scale
    from peft_fast.triton_kernels.lora import lora_grad_a, lora_grad_a_ref, lora_shrink, lora_shrink_ref

    torch.manual_seed(0)
    x = torch.randn(M, K, device=DEV, dtype=dtype)
    A = (torch.randn(r, K, device=DEV) * K ** -0.5).to(dtype)
    g = torch.randn(M, r, device=DEV, dtype=dtype)
    seed = torch.randint(0, 2**62, (1,), device=DEV)
    assert_kernel_close(lora_shrink(x, A, seed, p), lora_shrink_ref(_d(x), _d(A), seed, p),
                        lora_shrink_ref(x, A, seed, p), "shrink")
    c = 2.0 * (keep_scale(p) if p else 1.0)
    assert_kernel_close(lora_grad_a(g, x, seed, p, c, dtype), lora_grad_a_ref(_d(g), _d(x), seed, p, c, torch.float64),
                        lora_grad_a_ref(g, x, seed, p, c, dtype), "grad_A")


def test_philox_mask_on_gpu_matches_reference():
    from peft_fast.triton_kernels._triton import philox_keep_mask_ref
    from peft_fast.triton_kernels.lora import lora_shrink

    x = torch.randn(300, 64, device=DEV) + 3
    seed = torch.tensor([987654321987], device=DEV)
    xd = lora_shrink(x, torch.eye(64, device=DEV), seed, 0.25)
    assert torch.equal((xd != 0).cpu(), philox_keep_mask_ref(987654321987, 300, 64, 0.25))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dora_norm_and_colsum_cuda(dtype):
    from peft_fast.triton_kernels.colsum import colsum_mul, colsum_mul_ref
    from peft_fast.triton_kernels.dora import dora_weight_norm, dora_weight_norm_ref

    torch.manual_seed(0)
    W = torch.randn(1024, 4096, device=DEV).to(dtype)
    A, B = (torch.randn(16, 4096, device=DEV) * 0.02).to(dtype), (torch.randn(1024, 16, device=DEV) * 0.02).to(dtype)
    assert_kernel_close(dora_weight_norm(W, A, B, 2.0), dora_weight_norm_ref(_d(W), _d(A), _d(B), 2.0),
                        dora_weight_norm_ref(W, A, B, 2.0), "dora norm")
    a, b = torch.randn(8192, 1024, device=DEV, dtype=dtype), torch.randn(8192, 1024, device=DEV, dtype=dtype)
    assert_kernel_close(colsum_mul(a, b), colsum_mul_ref(_d(a), _d(b)), (a * b).sum(0), "colsum")


def _tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(DEV, dtype)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_parity_with_peft_on_cuda(method, dtype):
    import peft

    import peft_fast

    base = _tiny_llama(dtype)
    ids = torch.randint(0, 512, (2, 64), device=DEV)
    res = []
    for lib in (peft, peft_fast):
        torch.manual_seed(1)
        if method == "ia3":
            cfg = lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
        else:
            cfg = lib.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=method == "dora",
                                 init_lora_weights="gaussian")
        m = lib.get_peft_model(copy.deepcopy(base), cfg).train()
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))).to(p) * 0.05)
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        res.append((out.logits.float().detach(), {n: p.grad.float() for n, p in m.named_parameters()
                                                  if p.grad is not None}))
    (lr, gr), (lf, gf) = res
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(lf, lr, **tol)
    assert set(gf) == set(gr)
    for k in gr:
        scale = gr[k].abs().max().item()
        torch.testing.assert_close(gf[k], gr[k], rtol=tol["rtol"] * 5, atol=tol["atol"] * 5 * max(scale, 1e-3), msg=k)


def test_train_step_stores_no_dropout_copy():
    import peft

    import peft_fast

    base = _tiny_llama(torch.bfloat16)
    ids = torch.randint(0, 512, (4, 128), device=DEV)
    peak = {}
    for name, lib in (("peft", peft), ("peft_fast", peft_fast)):
        m = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=16, lora_dropout=0.05, target_modules="all-linear"))
        m.train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        m(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        peak[name] = torch.cuda.max_memory_allocated() - start
        del m
    assert peak["peft_fast"] < peak["peft"], peak


def test_compile_inductor_fullgraph_cuda():
    import peft_fast

    torch._dynamo.reset()
    lin = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512)).to(DEV)
    m = peft_fast.get_peft_model(lin, peft_fast.LoraConfig(r=16, target_modules=["0", "2"], lora_dropout=0.1)).train()
    cm = torch.compile(m, fullgraph=True)
    x = torch.randn(64, 512, device=DEV, requires_grad=True)
    cm(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    m.eval()
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x), rtol=1e-4, atol=1e-4)


def test_path_choice_is_measured_on_cuda():
    from peft_fast import ops
    from peft_fast.functional import lora_linear

    ops.clear_path_choices()
    x = torch.randn(512, 1024, device=DEV, dtype=torch.bfloat16)
    W = torch.randn(1024, 1024, device=DEV, dtype=torch.bfloat16)
    lora_linear(x, W, None, [torch.randn(16, 1024, device=DEV)], [torch.randn(1024, 16, device=DEV)], [1.0], [0.0])
    rec = [r for r in ops.path_choices() if r["op"] == "lora_fwd"]
    assert rec and rec[0]["reason"] == "measured" and set(rec[0]["ms"]) == {"triton", "torch"}


# ---------------------------------------------------------------- QLoRA on the device
def test_nf4_dequant_cuda_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    from peft_fast.quant import nf4_from_bnb
    from peft_fast.triton_kernels.nf4 import nf4_dequantize

    for dq in (False, True):
        lin = bnb.nn.Linear4bit(4096, 1024, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                compress_statistics=dq)
        lin.weight = bnb.nn.Params4bit(torch.randn(1024, 4096).to(torch.bfloat16), requires_grad=False,
                                       quant_type="nf4", compress_statistics=dq)
        lin = lin.to(DEV)
        expected = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
        got = nf4_dequantize(nf4_from_bnb(lin).operand())
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("M", [1, 16, 4096])
def test_qlora_layer_parity_with_peft_cuda(M):
    bnb = pytest.importorskip("bitsandbytes")
    import peft

    import peft_fast

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(2048, 1024, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                          compress_statistics=True)
            self.proj.weight = bnb.nn.Params4bit((torch.randn(1024, 2048) * 0.02).to(torch.bfloat16),
                                                 requires_grad=False, quant_type="nf4", compress_statistics=True)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    base = One().to(DEV)
    x = torch.randn(M, 2048, device=DEV, dtype=torch.bfloat16)
    outs = []
    for lib in (peft, peft_fast):
        m = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=16, target_modules=["proj"],
                                                                   init_lora_weights="gaussian")).train()
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(p) * 0.05)
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.float().pow(2).sum().backward()
        outs.append((y.float().detach(), xi.grad.float(), {n: p.grad.float() for n, p in m.named_parameters()
                                                          if p.grad is not None}))
    (yr, dxr, gr), (yf, dxf, gf) = outs
    torch.testing.assert_close(yf, yr, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dxf, dxr, rtol=5e-2, atol=5e-2 * dxr.abs().max().item())
    for k in gr:
        torch.testing.assert_close(gf[k], gr[k], rtol=5e-2, atol=5e-2 * gr[k].abs().max().item(), msg=k)
