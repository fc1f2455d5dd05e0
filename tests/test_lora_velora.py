"""VeLoRA (LoraConfig(velora_config=VeloraConfig(...)), issue #12) against real peft: same seeds ->
same projection buffer, same outputs and (approximate, VeLoRA's) gradients over several training
steps for every init_type, same saved files and cross-loading, merges, adapter deletion, fp32
upcast of the buffer, PEFT's errors; training takes VeLoRA's autograd function, inference the
fused op."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

from conftest import assert_close

peft = pytest.importorskip("peft")
import peft_fast  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

INIT_TYPES = ("random", "batch_average", "batch_average_once")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 7)
        self.conv = nn.Conv1d(4, 4, 1)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


@pytest.fixture
def base():
    torch.manual_seed(0)
    return MLP()


def _config(lib, init_type="random", num_groups=3, **kw):
    kw.setdefault("target_modules", ["lin0", "lin1"])
    kw.setdefault("init_lora_weights", False)  # B != 0: the A gradient is not trivially zero
    return lib.LoraConfig(velora_config=lib.VeloraConfig(num_groups=num_groups, init_type=init_type, scale=0.7), **kw)


def _build(lib, base, **kw):
    torch.manual_seed(1)
    return lib.get_peft_model(copy.deepcopy(base), _config(lib, **kw))


def _train(model, steps=3, seed=2, dtype=torch.float32):
    """Outputs and the accumulated gradients of a few training forwards on shifting batches."""
    model.train()
    torch.manual_seed(seed)
    x = torch.randn(3, 5, 10).to(dtype)
    outs = []
    for step in range(steps):
        y = model(x * (1 + step) + step)
        y.pow(2).mean().backward()
        outs.append(y.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outs, grads


@pytest.mark.parametrize("init_type", INIT_TYPES)
def test_outputs_gradients_buffers_match_peft(base, init_type):
    ref, fast = _build(peft, base, init_type=init_type), _build(peft_fast, base, init_type=init_type)
    for name in ("lin0", "lin1"):
        r, f = getattr(ref.base_model.model, name), getattr(fast.base_model.model, name)
        assert_close(f.lora_velora_embed["default"], r.lora_velora_embed["default"])
        assert f.lora_velora_initialized == r.lora_velora_initialized
        assert (f.lora_velora_num_groups, f.lora_velora_init_type, f.lora_velora_scale) == \
            (r.lora_velora_num_groups, r.lora_velora_init_type, r.lora_velora_scale)
    (ro, rg), (fo, fg) = _train(ref), _train(fast)
    for a, b in zip(fo, ro):
        assert_close(a, b)
    assert fg.keys() == rg.keys() and any("lora_A" in k for k in fg)
    for k in rg:
        assert_close(fg[k], rg[k])
    for name in ("lin0", "lin1"):  # batch averages follow the same batches
        r, f = getattr(ref.base_model.model, name), getattr(fast.base_model.model, name)
        assert_close(f.lora_velora_embed["default"], r.lora_velora_embed["default"])
        assert f.lora_velora_initialized == r.lora_velora_initialized


def test_velora_gradient_differs_from_plain_lora(base):
    """The A gradient is VeLoRA's approximation, not the exact one the fused op would give."""
    _, vg = _train(_build(peft_fast, base, num_groups=2, target_modules=["lin0"]))
    torch.manual_seed(1)  # one layer: the projection's draw comes after all LoRA weights
    plain = peft_fast.get_peft_model(copy.deepcopy(base), peft_fast.LoraConfig(target_modules=["lin0"],
                                                                               init_lora_weights=False))
    _, pg = _train(plain)
    key = "base_model.model.lin0.lora_A.default.weight"
    assert not torch.allclose(vg[key], pg[key])
    assert_close(vg["base_model.model.lin0.lora_B.default.weight"], pg["base_model.model.lin0.lora_B.default.weight"])


def test_dropout_same_masks_as_peft(base):
    ref = _build(peft, base, lora_dropout=0.3)
    fast = _build(peft_fast, base, lora_dropout=0.3)
    (ro, rg), (fo, fg) = _train(ref, steps=2), _train(fast, steps=2)
    for a, b in zip(fo, ro):
        assert_close(a, b)
    for k in rg:
        assert_close(fg[k], rg[k])


def test_training_uses_velora_function_inference_the_fused_op(base, monkeypatch):
    from peft_fast.tuners.lora import layer as layer_mod
    from peft_fast.tuners.lora import velora

    calls = {"fused": 0, "velora": 0}
    fused, apply = layer_mod.lora_linear, velora.VeloraFunction.apply

    def spy_fused(*a, **k):
        calls["fused"] += 1
        return fused(*a, **k)

    def spy_apply(*a, **k):
        calls["velora"] += 1
        return apply(*a, **k)

    monkeypatch.setattr(layer_mod, "lora_linear", spy_fused)
    monkeypatch.setattr(velora.VeloraFunction, "apply", spy_apply)
    model = _build(peft_fast, base)
    ref = _build(peft, base)
    x = torch.randn(4, 10)
    model.train()
    model(x).sum().backward()
    assert calls == {"fused": 0, "velora": 2}
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert_close(model(x), ref(x))
    assert calls == {"fused": 2, "velora": 2}
    model.train()
    with torch.no_grad():  # no graph: nothing to compress, plain LoRA
        model(x)
    assert calls == {"fused": 4, "velora": 2}


@pytest.mark.parametrize("init_type", INIT_TYPES)
def test_saved_files_match_and_cross_load(base, init_type, tmp_path):
    ref, fast = _build(peft, base, init_type=init_type), _build(peft_fast, base, init_type=init_type)
    _train(ref, steps=1), _train(fast, steps=1)
    ref.save_pretrained(tmp_path / "ref")
    fast.save_pretrained(tmp_path / "fast")
    rf, ff = load_file(tmp_path / "ref" / "adapter_model.safetensors"), load_file(tmp_path / "fast" / "adapter_model.safetensors")
    assert sorted(ff) == sorted(rf)
    assert "base_model.model.lin0.lora_velora_embed" in ff
    for k in rf:
        assert ff[k].dtype == rf[k].dtype
        assert_close(ff[k], rf[k])
    with open(tmp_path / "ref" / "adapter_config.json") as f:
        rc = json.load(f)
    with open(tmp_path / "fast" / "adapter_config.json") as f:
        fc = json.load(f)
    assert fc["velora_config"] == rc["velora_config"] == {"num_groups": 3, "scale": 0.7, "init_type": init_type}

    x = torch.randn(2, 10)
    loaded = peft_fast.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ref").eval()
    assert isinstance(loaded.peft_config["default"].velora_config, peft_fast.VeloraConfig)
    assert_close(loaded.base_model.model.lin0.lora_velora_embed["default"],
                 ref.base_model.model.lin0.lora_velora_embed["default"])
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fast").eval()
    with torch.no_grad():
        assert_close(loaded(x), ref.eval()(x))
        assert_close(back(x), loaded(x))


def test_merge_unmerge_and_unload(base):
    ref, fast = _build(peft, base), _build(peft_fast, base)
    x = torch.randn(4, 10)
    ref.eval(), fast.eval()
    with torch.no_grad():
        expected = ref(x)
        fast.merge_adapter()
        assert_close(fast(x), expected)
        fast.unmerge_adapter()
        assert_close(fast(x), expected)
        merged = fast.merge_and_unload()
        assert_close(merged(x), expected)


def test_delete_adapter_removes_velora_state(base):
    model = _build(peft_fast, base)
    model.add_adapter("other", _config(peft_fast, init_type="batch_average"))
    layer = model.base_model.model.lin0
    assert set(layer.lora_velora_embed) == {"default", "other"}
    model.delete_adapter("other")
    for attr in layer.adapter_layer_names + layer.other_param_names:
        assert "other" not in getattr(layer, attr)
    assert "other" not in layer.lora_variant


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_16bit_model_buffer_dtype_as_peft(base, dtype, autocast_adapter_dtype):
    def build(lib):
        torch.manual_seed(1)
        return lib.get_peft_model(copy.deepcopy(base).to(dtype), _config(lib, init_type="batch_average"),
                                  autocast_adapter_dtype=autocast_adapter_dtype)

    ref, fast = build(peft), build(peft_fast)
    for name in ("lin0", "lin1"):
        r, f = getattr(ref.base_model.model, name), getattr(fast.base_model.model, name)
        assert f.lora_velora_embed["default"].dtype == r.lora_velora_embed["default"].dtype
        assert f.lora_A["default"].weight.dtype == r.lora_A["default"].weight.dtype
    (ro, rg), (fo, fg) = _train(ref, steps=2, dtype=dtype), _train(fast, steps=2, dtype=dtype)
    for a, b in zip(fo, ro):
        assert a.dtype == b.dtype
        assert_close(a, b)
    for k in rg:
        assert_close(fg[k], rg[k])


def test_config_validation_and_errors_as_peft(base):
    for kw in (dict(num_groups=0), dict(scale=0), dict(init_type="zeros")):
        with pytest.raises(ValueError) as r:
            peft.VeloraConfig(**kw)
        with pytest.raises(ValueError) as f:
            peft_fast.VeloraConfig(**kw)
        assert str(f.value) == str(r.value)
    for kw in (dict(target_modules=["conv"]), dict(target_modules=["lin0"], use_dora=True)):
        with pytest.raises(ValueError) as r:
            peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(velora_config=peft.VeloraConfig(), **kw))
        with pytest.raises(ValueError) as f:
            peft_fast.get_peft_model(copy.deepcopy(base), peft_fast.LoraConfig(velora_config=peft_fast.VeloraConfig(), **kw))
        assert str(f.value) == str(r.value)
    # a dict (as read back from adapter_config.json) becomes the dataclass
    cfg = peft_fast.LoraConfig(velora_config={"num_groups": 4, "scale": 2.0, "init_type": "random"})
    assert cfg.velora_config == peft_fast.VeloraConfig(num_groups=4, scale=2.0, init_type="random")


def test_helpers_match_peft():
    from peft.tuners.lora import velora as pv

    from peft_fast.tuners.lora import velora as fv

    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, requires_grad=True)
    w, b = torch.randn(5, 11, requires_grad=True), torch.randn(5, requires_grad=True)
    embed = fv._normalize_projection(torch.randn(fv._get_group_dim(11, 4)))
    assert torch.equal(fv._compress_activations(x, embed, 4), pv._compress_activations(x, embed, 4))
    c = fv._compress_activations(x, embed, 4)
    assert torch.equal(fv._reconstruct_activations(c, embed, 11, 0.5), pv._reconstruct_activations(c, embed, 11, 0.5))
    g = torch.randn(2, 3, 5)
    grads = []
    for mod in (pv, fv):
        out = mod.VeloraFunction.apply(x, w, b, embed, 4, 0.5)
        grads.append(torch.autograd.grad(out, (x, w, b), g))
    for a, r in zip(grads[1], grads[0]):
        assert torch.equal(a, r)


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_bitsandbytes_layers_refuse_velora_and_take_bdlora_as_plain_lora(kind):
    """As PEFT's bitsandbytes LoRA layers (used for models loaded in 8/4 bit)."""
    bnb = pytest.importorskip("bitsandbytes")

    def model():
        m = nn.Module()
        m.lin = (bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False) if kind == "8bit"
                 else bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32))
        setattr(m, f"is_loaded_in_{kind}", True)
        return m

    errors = []
    for lib in (peft, peft_fast):
        with pytest.raises(ValueError) as e:
            lib.get_peft_model(model(), lib.LoraConfig(target_modules=["lin"], velora_config=lib.VeloraConfig()))
        errors.append(str(e.value))
        bd = lib.tuners.lora.config.BdLoraConfig(target_modules_bd_a=["lin"], nblocks=2)
        layer = lib.get_peft_model(model(), lib.LoraConfig(target_modules=["lin"], use_bdlora=bd)).base_model.model.lin
        assert type(layer.lora_A["default"]) is nn.Linear and not layer.lora_variant
    assert errors[0] == errors[1]
