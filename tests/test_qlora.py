"""QLoRA on CPU: LoRA/DoRA/IA3 on bitsandbytes 4-bit (and LoRA on 8-bit) layers against real
peft, the fused QLoRA op against its reference, training, merging, checkpoints.

bitsandbytes 0.50 runs on CPU; tiny Llama models are saved from a config and loaded back with
`BitsAndBytesConfig` (the path users take). Their layers are shapes bitsandbytes' CPU kernels
handle on every CPU (in_features a multiple of the block size 64, out_features of 32); eval-mode
comparisons run with bitsandbytes' AVX512-bf16 repacking turned off (`simulate_cpu`) so both
libraries take the same fp32 path on Intel and AMD. Odd shapes and repacked weights are tested
against fp64 references in test_bnb_state.py.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peft_fast

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

from bnb_helpers import simulate_cpu  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny_llama")
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d)


def load_quantized(path, bits=4, double_quant=True, dtype=torch.float32):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                               bnb_4bit_use_double_quant=double_quant)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = LlamaForCausalLM.from_pretrained(path, quantization_config=q, dtype=dtype)
    return m.train()


def config_for(lib, method):
    if method == "ia3":
        return lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian",
                          use_dora=method == "dora")


def randomise(model, seed=0):
    """Nonzero B and non-unit IA3 vectors, identical in both libraries (never compare on zeros)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            g = torch.Generator().manual_seed(seed + sum(map(ord, n)))
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "ia3_l" in n:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))


def run(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
def test_4bit_parity_with_peft(tiny_dir, method, double_quant):
    import peft

    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    res = []
    for lib in (peft, peft_fast):
        torch.manual_seed(1)
        m = lib.get_peft_model(load_quantized(tiny_dir, double_quant=double_quant), config_for(lib, method))
        randomise(m)
        res.append(run(m, ids))
        if lib is peft_fast:
            q = m.base_model.model.model.layers[0].self_attn.q_proj
            assert type(q).__name__ == ("Linear4bit" if method != "ia3" else "LlamaAttention q_proj untouched") \
                or method == "ia3"
    (lr, gr), (lf, gf) = res
    torch.testing.assert_close(lf, lr, rtol=1e-4, atol=1e-5)
    assert set(gf) == set(gr) and gr
    for k in gr:
        assert gr[k].abs().max() > 0, k
        torch.testing.assert_close(gf[k], gr[k], rtol=1e-3, atol=1e-6 * max(1.0, gr[k].abs().max().item()), msg=k)


def test_lora_layers_on_4bit_use_the_fused_qlora_op(tiny_dir, monkeypatch):
    from peft_fast.functional import qlora as fq

    calls = []
    real = fq.QLoraLinearFunction.apply
    monkeypatch.setattr(fq.QLoraLinearFunction, "apply", lambda *a: calls.append(1) or real(*a))
    m = peft_fast.get_peft_model(load_quantized(tiny_dir), config_for(peft_fast, "lora"))
    q = m.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, peft_fast.tuners.lora.bnb.Linear4bit)
    assert q.nf4_operand().packed.data_ptr() == q.base_layer.weight.data_ptr()  # no copy of the 4-bit data
    run(m, torch.randint(0, 100, (2, 8)))
    assert len(calls) == 14  # 7 projections x 2 layers


def test_qlora_saves_no_dequantized_weight(tiny_dir):
    m = peft_fast.get_peft_model(load_quantized(tiny_dir), peft_fast.LoraConfig(r=4, lora_dropout=0.1,
                                                                                  target_modules="all-linear"))
    q = m.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, q.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    numel_w = q.in_features * q.out_features
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= numel_w], \
        "a dense copy of the 4-bit weight was saved for backward"
    y.sum().backward()
    assert x.grad is not None and q.lora_A["default"].weight.grad is not None


def test_qlora_training_reduces_loss_and_trains_every_adapter(tiny_dir):
    torch.manual_seed(0)
    m = peft_fast.get_peft_model(load_quantized(tiny_dir), peft_fast.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(3))
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    losses = []
    for _ in range(8):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        for n, p in m.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0 or "lora_A" in n and losses == [], n
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(not torch.equal(before[n], p) for n, p in m.named_parameters() if p.requires_grad)
    assert all(torch.equal(frozen[n], p) for n, p in m.named_parameters() if not p.requires_grad)


def test_qlora_checkpoints_cross_load_with_peft(tiny_dir, tmp_path, monkeypatch):
    import peft

    simulate_cpu(monkeypatch, avx512_bf16=False)  # PeftModel.from_pretrained evaluates: one fp32 path on any CPU
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(4))
    m = peft_fast.get_peft_model(load_quantized(tiny_dir), config_for(peft_fast, "lora"))
    randomise(m, 7)
    m.save_pretrained(tmp_path / "fast")
    ref = peft.PeftModel.from_pretrained(load_quantized(tiny_dir), tmp_path / "fast")
    back = peft_fast.PeftModel.from_pretrained(load_quantized(tiny_dir), tmp_path / "fast")
    with torch.no_grad():
        y_fast, y_peft, y_back = (mm(input_ids=ids).logits for mm in (m, ref, back))
    torch.testing.assert_close(y_peft, y_fast, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_back, y_fast, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_and_unload_4bit_matches_peft(tiny_dir, method):
    import peft

    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(5))
    merged = []
    for lib in (peft, peft_fast):
        torch.manual_seed(2)
        m = lib.get_peft_model(load_quantized(tiny_dir), config_for(lib, method))
        randomise(m, 3)
        with torch.no_grad():
            y_adapter = m(input_ids=ids).logits
            with m.disable_adapter():
                y_base = m(input_ids=ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = m.merge_and_unload()
        q = base.model.layers[0].self_attn.q_proj
        assert type(q).__name__ == "Linear4bit"  # still a 4-bit layer, weights requantized
        with torch.no_grad():
            y_merged = base(input_ids=ids).logits
        merged.append((y_adapter, y_merged, bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state),
                       y_base))
    (ya_r, ym_r, w_r, _), (ya_f, ym_f, w_f, yb_f) = merged
    torch.testing.assert_close(w_f, w_r, rtol=1e-5, atol=1e-6)  # same 4-bit codes; absmax may differ in the last bit
    torch.testing.assert_close(ym_f, ym_r, rtol=1e-3, atol=5e-5)
    # up to requantization error the merged model computes the adapter model, not the base one
    assert (ym_f - ya_f).norm() < 0.5 * (yb_f - ya_f).norm()


def test_ia3_merge_refused_on_4bit(tiny_dir):
    m = peft_fast.get_peft_model(load_quantized(tiny_dir), config_for(peft_fast, "ia3"))
    with pytest.raises(ValueError, match="4-bit"):
        m.merge_and_unload()


def test_lora_on_8bit_parity_with_peft(tiny_dir):
    import peft

    try:
        load_quantized(tiny_dir, bits=8)
    except Exception as e:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"bitsandbytes cannot load 8-bit on this CPU: {e}")
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(6))
    res = []
    for lib in (peft, peft_fast):
        torch.manual_seed(1)
        m = lib.get_peft_model(load_quantized(tiny_dir, bits=8), config_for(lib, "lora"))
        randomise(m)
        res.append(run(m, ids))
        if lib is peft_fast:
            assert type(m.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    (lr, gr), (lf, gf) = res
    torch.testing.assert_close(lf, lr, rtol=1e-4, atol=1e-5)
    for k in gr:
        torch.testing.assert_close(gf[k], gr[k], rtol=1e-3, atol=1e-6 * max(1.0, gr[k].abs().max().item()), msg=k)


def test_qlora_op_matches_reference_with_dropout():
    """qlora_linear == lora_linear on the dequantized weight, with the same dropout masks."""
    from peft_fast.functional import lora_linear, qlora_linear
    from peft_fast.quant import quantize_nf4
    from peft_fast.triton_kernels.nf4 import NF4Operand, nf4_dequantize_ref

    torch.manual_seed(0)
    q = quantize_nf4(torch.randn(72, 100), blocksize=64, compress_statistics=True)
    op = NF4Operand(q.packed, q.absmax, q.code, tuple(q.shape), q.dtype, q.blocksize, q.offset, q.absmax2, q.code2)
    W = nf4_dequantize_ref(op)
    x = torch.randn(3, 37, 100)
    As = [torch.randn(4, 100, requires_grad=True), torch.randn(1, 100, requires_grad=True)]
    Bs = [torch.randn(72, 4, requires_grad=True), torch.randn(72, 1, requires_grad=True)]
    b = torch.randn(72)
    outs = []
    for fn, w in ((qlora_linear, op), (lora_linear, W)):
        xi = x.clone().requires_grad_()
        torch.manual_seed(9)
        if fn is qlora_linear:
            y = fn(xi, w, b, As, Bs, [2.0, 0.5], [0.2, 0.0])
        else:
            y = fn(xi, w, b, As, Bs, [2.0, 0.5], [0.2, 0.0])
        y.pow(2).sum().backward()
        outs.append((y.detach(), xi.grad, [t.grad.clone() for t in As + Bs]))
        for t in As + Bs:
            t.grad = None
    (y1, dx1, g1), (y2, dx2, g2) = outs
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(dx1, dx2)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)


def test_fp4_weights_take_peft_formula_and_match_peft(tiny_dir):
    import peft
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(8))
    res = []
    for lib in (peft, peft_fast):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = LlamaForCausalLM.from_pretrained(tiny_dir, quantization_config=q, dtype=torch.float32).train()
        torch.manual_seed(1)
        m = lib.get_peft_model(base, config_for(lib, "lora"))
        randomise(m)
        if lib is peft_fast:
            assert m.base_model.model.model.layers[0].self_attn.q_proj.nf4_operand() is None  # FP4: no NF4 kernel
        res.append(run(m, ids))
    (lr, gr), (lf, gf) = res
    torch.testing.assert_close(lf, lr, rtol=1e-4, atol=1e-5)
    for k in gr:
        torch.testing.assert_close(gf[k], gr[k], rtol=1e-3, atol=1e-6 * max(1.0, gr[k].abs().max().item()), msg=k)
