"""LoRA and DoRA on bitsandbytes' Linear8bitLt against real peft, through the states the int8
weight goes through: its scales sit on `weight.SCB` until the first forward, then on
`state.SCB` (weight.SCB = None); merging replaces the weight (scales on it again) and resets the
state. Forward (train and eval), merge_adapter + forward, unmerge, merge_and_unload after a first
forward: same outputs, gradients and int8 weights as peft.

peft 0.21.2's DoRA on Linear8bitLt fails on CPU once a forward has run (its dequantization
rebuilds the weight without scales), so the peft side always starts from a model that has not
run a forward; the first forward moves scales but changes no weight, so both sides hold the same
weights when they merge.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import peft_fast

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_qlora import config_for, load_quantized, randomise, run, tiny_dir  # noqa: E402,F401

from peft_fast.quant.bnb_state import int8_scales  # noqa: E402

METHODS = ["lora", "dora"]


IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(6))


def build(lib, tiny_dir, method):
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = lib.get_peft_model(load_quantized(tiny_dir, bits=8), config_for(lib, method))
    randomise(m)
    if lib is peft_fast:
        assert type(m.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    return m


def logits(model):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=IDS).logits


def quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


def int8_of(layer):
    """(int8 codes, fp32 scales) of a Linear8bitLt or the one a LoRA layer wraps."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    return base.weight.data, int8_scales(base)


def assert_same_int8(fast, ref, max_code_diff=0):
    """fast, ref: layers or (codes, scales) pairs."""
    (cf, sf), (cr, sr) = (int8_of(t) if isinstance(t, torch.nn.Module) else t for t in (fast, ref))
    assert cf.dtype == torch.int8 and cr.dtype == torch.int8
    assert (cf.int() - cr.int()).abs().max() <= max_code_diff
    torch.testing.assert_close(sf, sr, rtol=1e-5, atol=0)


def q_proj(model):
    inner = model.base_model.model if hasattr(model, "peft_config") else model
    return inner.model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("method", METHODS)
def test_8bit_train_forward_parity_and_second_step(tiny_dir, method):
    (lr, gr), fast = run(build(peft, tiny_dir, method), IDS), build(peft_fast, tiny_dir, method)
    lf, gf = run(fast, IDS)
    torch.testing.assert_close(lf, lr, rtol=1e-4, atol=1e-5)
    assert set(gf) == set(gr) and gr
    for k in gr:
        assert gr[k].abs().max() > 0, k
        torch.testing.assert_close(gf[k], gr[k], rtol=1e-3, atol=1e-6 * max(1.0, gr[k].abs().max().item()), msg=k)
    # the second step reads the scales from state.SCB (weight.SCB is None now): same result
    assert q_proj(fast).get_base_layer().weight.SCB is None
    fast.zero_grad()
    lf2, gf2 = run(fast, IDS)
    torch.testing.assert_close(lf2, lf, rtol=0, atol=0)
    assert all(torch.isfinite(g).all() for g in gf2.values())


@pytest.mark.parametrize("method", METHODS)
def test_8bit_eval_forward_parity(tiny_dir, method):
    ref = logits(build(peft, tiny_dir, method).eval())
    fast = build(peft_fast, tiny_dir, method).eval()
    torch.testing.assert_close(logits(fast), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(fast), ref, rtol=1e-4, atol=1e-5)  # after the scales moved


@pytest.mark.parametrize("method", METHODS)
def test_8bit_merge_unmerge_after_first_forward(tiny_dir, method):
    fast = build(peft_fast, tiny_dir, method).eval()
    y_adapter = logits(fast)  # moves the scales to state.SCB
    quiet(fast.merge_adapter)
    y_merged = logits(fast)
    merged = tuple(t.clone() for t in int8_of(q_proj(fast)))
    quiet(fast.unmerge_adapter)
    # nothing computed from a replaced weight survives (a new weight can reuse a freed address)
    assert "weight_sqnorm" not in q_proj(fast)._caches
    y_unmerged = logits(fast)

    ref = build(peft, tiny_dir, method).eval()
    quiet(ref.merge_adapter)
    assert_same_int8(merged, q_proj(ref), max_code_diff=0)
    r_merged = logits(ref)
    quiet(ref.unmerge_adapter)
    r_unmerged = logits(ref)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_merged, r_merged, **tol)
    torch.testing.assert_close(y_unmerged, r_unmerged, **tol)
    assert_same_int8(q_proj(fast), q_proj(ref), max_code_diff=0)
    # merging computes the adapter model up to int8 requantization (not the base model, not NaN)
    with fast.disable_adapter():
        y_base = logits(fast)
    assert torch.isfinite(y_merged).all() and (y_merged - y_adapter).norm() < 0.5 * (y_base - y_adapter).norm()


@pytest.mark.parametrize("method", METHODS)
def test_8bit_merge_and_unload_after_first_forward(tiny_dir, method):
    fast = build(peft_fast, tiny_dir, method).train()
    run(fast, IDS)  # a training step first: the scales now live in state.SCB
    base_f = quiet(fast.merge_and_unload)
    ref = build(peft, tiny_dir, method).train()
    base_r = quiet(ref.merge_and_unload)
    qf, qr = q_proj(base_f), q_proj(base_r)
    assert type(qf).__name__ == type(qr).__name__ == "Linear8bitLt"
    assert_same_int8(qf, qr, max_code_diff=0)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(base_f.eval()), logits(base_r.eval()), **tol)
