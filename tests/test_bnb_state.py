"""peft_fast.quant.bnb_state: one reader for bitsandbytes weights in every state, on any CPU.

bitsandbytes 0.50 repacks a Linear4bit weight into its AVX512-bf16 CPU layout on an eval-mode
no-grad forward, but only on CPUs with avx512_bf16. The repacking is pure torch, so these tests
apply it explicitly (`repack_for_cpu`) and simulate either kind of CPU (`simulate_cpu`): the
repacked-layout code paths run on Intel and AMD alike, and nothing is compared against
bitsandbytes' CPU kernels (fp64 references from the quantized codes instead).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peft_fast
from peft_fast.quant import dequantize_bnb_weight, nf4_from_bnb, quantize_nf4
from peft_fast.quant.bnb_state import bnb_4bit_operand, cpu_forward_problem, int8_scales, unpack_cpu_layout

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

from bnb_helpers import (  # noqa: E402
    layer_dequant_fp64,
    nf4_dequant_fp64,
    nibbles,
    repack_for_cpu,
    set_cpu_repack,
    simulate_cpu,
    true_absmax,
)
from conftest import assert_close  # noqa: E402

# (out, in): repackable (out % 32 == 0, in % 64 == 0); and one bitsandbytes' CPU path cannot take
ALIGNED, ODD = (96, 128), (72, 96)


def linear4bit(shape, double_quant=True, quant_type="nf4", quant_storage=torch.uint8, seed=0, bias=True):
    out_f, in_f = shape
    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_f, out_f, bias=bias)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.float32, quant_type=quant_type,
                              compress_statistics=double_quant, quant_storage=quant_storage)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu").train()


def repacked_reference(layer):
    """(codes, bf16-rounded absmax) of a canonical layer: what its weight holds after repacking."""
    st = layer.weight.quant_state
    n = st.shape[0] * st.shape[1]
    return nibbles(layer.weight.data, n), true_absmax(st).to(torch.bfloat16).float()


# ---------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
def test_nf4_from_bnb_reads_the_cpu_layout(double_quant, quant_storage):
    layer = linear4bit(ALIGNED, double_quant, quant_storage=quant_storage)
    codes, absmax = repacked_reference(layer)
    repack_for_cpu(layer)
    data, state = layer.weight.data, layer.weight.quant_state
    before = (data.data_ptr(), data.clone(), state.absmax.clone(), state.dtype, state.nested)
    w = nf4_from_bnb(layer)
    # the canonical codes, the bf16-rounded scales bitsandbytes now computes with, the original dtype
    assert torch.equal(nibbles(w.packed, w.numel), codes)
    assert not w.double_quant and w.absmax.dtype == torch.float32 and torch.equal(w.absmax, absmax)
    assert w.shape == ALIGNED and w.dtype == torch.float32 and w.blocksize == 64
    assert torch.equal(w.dequantize(), nf4_dequant_fp64(codes, absmax, ALIGNED, 64).float())
    # the module is untouched
    assert layer.weight.data.data_ptr() == before[0] and torch.equal(layer.weight.data, before[1])
    assert torch.equal(state.absmax, before[2]) and state.dtype == before[3] and state.nested == before[4]
    assert state.packing_format_for_cpu
    # the same bytes as bitsandbytes' own (in-place) inverse
    inv, _ = BF._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
    assert torch.equal(inv.reshape(-1).view(torch.uint8), w.packed)


def test_unpack_cpu_layout_errors_name_the_shape():
    layer = linear4bit(ALIGNED)
    repack_for_cpu(layer)
    st = layer.weight.quant_state
    with pytest.raises(ValueError, match=r"CPU layout of a \[96, 128\]"):
        unpack_cpu_layout(layer.weight.data[:10], st)
    bad = copy.deepcopy(st)
    bad.absmax = bad.absmax.t().contiguous()
    with pytest.raises(ValueError, match=r"absmax of shape \(96, 2\)"):
        unpack_cpu_layout(layer.weight.data, bad)


# ---------------------------------------------------------------------------------------------- accessor
@pytest.mark.parametrize("shape", [ALIGNED, ODD], ids=["aligned", "odd"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
def test_dequantize_4bit_matches_fp64_reference(shape, double_quant):
    layer = linear4bit(shape, double_quant)
    assert torch.equal(dequantize_bnb_weight(layer), layer_dequant_fp64(layer).float())
    if shape == ALIGNED:  # bitsandbytes' kernel itself handles this shape on every CPU
        bnb_w = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(dequantize_bnb_weight(layer), bnb_w)
        codes, absmax = repacked_reference(layer)
        repack_for_cpu(layer)
        assert torch.equal(dequantize_bnb_weight(layer), nf4_dequant_fp64(codes, absmax, shape, 64).float())


@pytest.mark.parametrize("shape", [ALIGNED, ODD], ids=["aligned", "odd"])
def test_dequantize_4bit_fp4_and_unquantized(shape):
    layer = linear4bit(shape, quant_type="fp4")
    table = layer.weight.quant_state.code.tolist()
    assert torch.equal(dequantize_bnb_weight(layer), layer_dequant_fp64(layer).float())
    op, quant_type, is_copy = bnb_4bit_operand(layer)
    assert quant_type == "fp4" and not is_copy and op.packed.data_ptr() == layer.weight.data.data_ptr()
    if shape == ALIGNED:
        codes, absmax = repacked_reference(layer)
        repack_for_cpu(layer)
        assert torch.equal(dequantize_bnb_weight(layer), nf4_dequant_fp64(codes, absmax, shape, 64, table).float())
    fresh = bnb.nn.Linear4bit(64, 32)  # never moved to a device: not quantized, the weight is dense
    assert torch.equal(dequantize_bnb_weight(fresh), fresh.weight.data)


def test_cpu_forward_problem_mirrors_bitsandbytes():
    x = torch.randn(2, 96)
    odd, aligned = linear4bit(ODD).eval(), linear4bit((72, 128)).eval()
    for m in (odd, aligned):
        m.support_avx512bf16_for_cpu = True
    assert "in_features 96" in cpu_forward_problem(odd, x)
    assert "out_features 72" in cpu_forward_problem(aligned, torch.randn(2, 128))
    assert cpu_forward_problem(aligned, torch.randn(2, 128, requires_grad=True)) is None  # no repack with grad
    aligned.support_avx512bf16_for_cpu = False
    assert cpu_forward_problem(aligned, torch.randn(2, 128)) is None
    ok = linear4bit(ALIGNED).eval()
    repack_for_cpu(ok)
    ok.support_avx512bf16_for_cpu = False
    assert "unavailable" in cpu_forward_problem(ok, torch.randn(2, 128))
    ok.support_avx512bf16_for_cpu = True
    assert cpu_forward_problem(ok, torch.randn(2, 128)) is None


def int8_layer(shape=(40, 48), seed=0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(shape[1], shape[0])
    layer = bnb.nn.Linear8bitLt(shape[1], shape[0], has_fp16_weights=False)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")


def test_dequantize_8bit_before_and_after_the_first_forward():
    layer = int8_layer()
    codes, scb = layer.weight.data.clone(), layer.weight.SCB.clone()
    ref = (codes.double() * scb.double()[:, None] / 127).float()
    assert codes.dtype == torch.int8 and torch.equal(int8_scales(layer), scb)
    before = dequantize_bnb_weight(layer)
    assert_close(before, ref, torch.float32)
    layer(torch.randn(3, 48))  # moves the scales: weight.SCB -> state.SCB
    assert layer.weight.SCB is None and torch.equal(layer.state.SCB, scb)
    assert torch.equal(dequantize_bnb_weight(layer), before)
    layer.state.SCB = None
    with pytest.raises(ValueError, match=r"int8 weight \(40, 48\) of Linear8bitLt has no scales"):
        dequantize_bnb_weight(layer)


# ---------------------------------------------------------------------------------------------- layers
class One(torch.nn.Module):
    """A model of one layer, `proj` (the target of the adapters)."""

    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def lora_on(layer, use_dora=False, seed=0):
    torch.manual_seed(seed)
    m = peft_fast.get_peft_model(One(layer), peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                             use_dora=use_dora))
    lora = m.base_model.model.proj
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(0, 0.1)
    return m, lora


def lora_reference(lora, W64, x, bias):
    A = lora.lora_A["default"].weight.double()
    B = lora.lora_B["default"].weight.double()
    y = x.double() @ W64.T + x.double() @ A.T @ B.T * lora.scaling["default"]
    return y + bias.double() if bias is not None else y


def test_lora_trains_on_a_repacked_weight():
    """Training after an eval forward repacked the weight (Intel): the weight goes back to the
    canonical layout with the scales it was computed with (bitsandbytes' kernel for the CPU layout
    has no backward); outputs and gradients as from the repacked weight, on every CPU."""
    layer = linear4bit(ALIGNED)
    codes, absmax = repacked_reference(layer)
    m, lora = lora_on(layer)
    repack_for_cpu(layer)
    W64 = nf4_dequant_fp64(codes, absmax, ALIGNED, 64)
    x = torch.randn(3, 5, 128, requires_grad=True)
    m.train()
    y = m(x)
    assert_close(y, lora_reference(lora, W64, x, layer.bias).float(), torch.float32)
    y.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert lora.lora_A["default"].weight.grad.abs().sum() > 0
    st = layer.weight.quant_state
    assert not getattr(st, "packing_format_for_cpu", False) and st.dtype == torch.float32 and st.absmax.dim() == 1
    assert torch.equal(nibbles(layer.weight.data, codes.numel()), codes) and torch.equal(st.absmax, absmax)
    assert layer.weight.data.dtype == torch.uint8 and layer.quant_state is st
    assert lora.nf4_operand().packed.data_ptr() == layer.weight.data.data_ptr()  # no copy again


@pytest.mark.parametrize("method", ["dora", "ia3", "ia3_ff"])
def test_dora_and_ia3_train_on_a_repacked_weight(method):
    layer = linear4bit(ALIGNED, double_quant=False, quant_storage=torch.bfloat16)
    codes, absmax = repacked_reference(layer)
    W64 = nf4_dequant_fp64(codes, absmax, ALIGNED, 64)
    if method == "dora":
        m, adapter = lora_on(layer, use_dora=True)
    else:
        m = peft_fast.get_peft_model(One(layer), peft_fast.IA3Config(
            target_modules=["proj"], feedforward_modules=["proj"] if method == "ia3_ff" else []))
        adapter = m.base_model.model.proj
        with torch.no_grad():
            adapter.ia3_l["default"].uniform_(0.5, 1.5)
    repack_for_cpu(layer)
    x = torch.randn(4, 128, requires_grad=True)
    m.train()
    y = m(x)
    y.pow(2).sum().backward()
    x64, b64 = x.detach().double(), layer.bias.double()
    if method == "dora":
        A, B = adapter.lora_A["default"].weight.double(), adapter.lora_B["default"].weight.double()
        s = adapter.scaling["default"]
        norm = (W64 + s * B @ A).norm(dim=1)
        mag = adapter.lora_magnitude_vector["default"].weight.double()
        want = (mag / norm) * (x64 @ W64.T + s * x64 @ A.T @ B.T) + b64
    else:
        l64 = adapter.ia3_l["default"].detach().double().reshape(-1)
        want = (x64 * l64) @ W64.T + b64 if method == "ia3_ff" else (x64 @ W64.T + b64) * l64
    assert_close(y, want.float(), torch.float32)
    if method == "dora":  # computed from the restored weight, not a cached norm of the replaced one
        assert_close(adapter._weight_sqnorm(), W64.pow(2).sum(1).float(), torch.float32)
    assert x.grad is not None and all(p.grad is not None and p.grad.abs().sum() > 0
                                      for p in m.parameters() if p.requires_grad)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert layer.weight.data.dtype == torch.bfloat16  # the original storage type again


@pytest.mark.parametrize("shape,avx512_bf16", [(ALIGNED, False), (ODD, False), (ODD, True), ((72, 128), True)],
                         ids=["aligned-no_avx512bf16", "odd-no_avx512bf16", "odd-avx512bf16", "n72-avx512bf16"])
def test_lora_eval_on_either_cpu(monkeypatch, shape, avx512_bf16):
    """Eval-mode no-grad forwards on a simulated CPU: bitsandbytes' kernels where they handle the
    shape (canonical layout, fp32), the fused op where bitsandbytes would assert (repacking needs
    out % 32 == 0 and in % 64 == 0) or misread the weight (in % 64 != 0). (bitsandbytes' bf16
    kernel for repacked weights exists only on avx512_bf16 CPUs: the parity tests cover it there.)"""
    simulate_cpu(monkeypatch, avx512_bf16)
    layer = linear4bit(shape)
    W64 = layer_dequant_fp64(layer)
    m, lora = lora_on(layer)
    m.eval()
    x = torch.randn(2, 7, shape[1])
    with torch.no_grad():
        y = m(x)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert_close(y, lora_reference(lora, W64, x, layer.bias).float(), torch.float32)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_unmerge_on_a_repacked_weight(use_dora):
    layer = linear4bit(ALIGNED)
    codes, absmax = repacked_reference(layer)
    m, lora = lora_on(layer, use_dora=use_dora)
    repack_for_cpu(layer)
    W32 = nf4_dequant_fp64(codes, absmax, ALIGNED, 64).float()
    assert torch.equal(lora._dense_weight(), W32)
    delta = lora.get_delta_weight("default").detach()
    if use_dora:
        norm = (W32.double() + delta.double()).norm(dim=1)
        assert_close(lora.get_weight_norm("default"), norm.float(), torch.float32)
        merged = (lora.lora_magnitude_vector["default"].weight.detach().double() / norm)[:, None] * \
            (W32.double() + delta.double())
    else:
        merged = W32 + delta
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.merge_adapter()
    new = layer.weight
    assert not getattr(new.quant_state, "packing_format_for_cpu", False)  # requantized, canonical
    want = quantize_nf4(merged.float(), 64, compress_statistics=True)
    assert torch.equal(nibbles(new.data, want.numel), nibbles(want.packed, want.numel))
    assert torch.equal(dequantize_bnb_weight(layer), want.dequantize())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.unmerge_adapter()
    assert "weight_sqnorm" not in lora._caches  # computed from a replaced weight (its address may be reused)
    back = dequantize_bnb_weight(layer)
    if not use_dora:  # W + dW requantized, minus dW, requantized
        again = quantize_nf4(want.dequantize() - delta, 64, compress_statistics=True)
        assert torch.equal(back, again.dequantize())
    # the repacked weight up to two NF4 roundings
    assert (back - W32).norm() < 0.15 * W32.norm()


def test_merge_and_unload_after_repack_keeps_training_results():
    layer = linear4bit(ALIGNED)
    m, lora = lora_on(layer)
    x = torch.randn(4, 128)
    m.train()
    with torch.no_grad():
        y_adapter = m(x)
    repack_for_cpu(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = m.merge_and_unload()
    q = base.proj
    assert type(q).__name__ == "Linear4bit" and not getattr(q.weight.quant_state, "packing_format_for_cpu", False)
    set_cpu_repack(base, False).train()
    with torch.no_grad():
        y = base(x)
    # requantization error only (a fresh NF4 rounding of W + dW)
    assert (y - y_adapter).norm() < 0.1 * y_adapter.norm()


def test_save_after_repack_keeps_the_weight_and_the_files(tmp_path):
    """save_pretrained reads model.state_dict(), and bitsandbytes' Linear4bit then undoes its CPU
    layout in place, leaving a non-nested absmax transposed: forward, merge and the saved files
    must not change."""
    layer = linear4bit(ALIGNED, double_quant=False)
    codes, absmax = repacked_reference(layer)
    W32 = nf4_dequant_fp64(codes, absmax, ALIGNED, 64).float()
    m, lora = lora_on(layer)
    m.save_pretrained(tmp_path / "before")
    repack_for_cpu(layer)
    m.save_pretrained(tmp_path / "after")
    st = layer.weight.quant_state
    assert not getattr(st, "packing_format_for_cpu", False) and st.absmax.dim() == 2  # bitsandbytes' leftover
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "before" / f).read_bytes() == (tmp_path / "after" / f).read_bytes(), f
    assert torch.equal(dequantize_bnb_weight(layer), W32) and torch.equal(nf4_from_bnb(layer).dequantize(), W32)
    set_cpu_repack(m, False).eval()  # one fp32 path on every CPU
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        y = m(x)
    assert_close(y, lora_reference(lora, W32.double(), x, layer.bias).float(), torch.float32)
    assert layer.weight.quant_state.absmax.dim() == 1  # repaired for bitsandbytes' own kernels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.merge_adapter()
    want = quantize_nf4(W32 + lora.get_delta_weight("default").detach(), 64)
    assert torch.equal(dequantize_bnb_weight(layer), want.dequantize())
