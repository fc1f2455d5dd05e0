"""PeftModel / tuner API as PEFT 0.21.2 has it (issue #12), real peft as the oracle.

- `autocast_adapter_dtype` on get_peft_model, add_adapter, from_pretrained and load_adapter:
  the adapter's fp16/bf16 weights become fp32 (True) or keep the model's dtype (False).
  One deliberate difference: in a 16-bit model PEFT's upcast of an IA3 ParameterDict entry
  makes an inactive adapter trainable; peft_fast keeps it frozen (issue #11).
- `has_active_enabled_adapter` and `disable_adapter()` (nested, irregular layer states).
- `delete_adapter`: PEFT's texts for unknown and merged adapters, nothing changed on refusal.
- modules_to_save copies of two adapters cannot be active together (PEFT's text, checked
  before any layer switches).
- default target modules from the (patchable) table, a str default stays a regex.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import peft_fast
from peft_fast.tuners.tuners_utils import BaseTunerLayer

peft = pytest.importorskip("peft")

LIBS = pytest.mark.parametrize("lib", [peft, peft_fast], ids=["peft", "peft_fast"])


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 12)
        self.lin1 = nn.Linear(12, 12)
        self.lin2 = nn.Linear(12, 3)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def _mlp(dtype=torch.float32, seed=0) -> MLP:
    torch.manual_seed(seed)
    return MLP().to(dtype)


CONFIGS = {
    "lora": lambda lib: lib.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False),
    "dora": lambda lib: lib.LoraConfig(target_modules=["lin0"], use_dora=True, init_lora_weights=False),
    "ia3": lambda lib: lib.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"],
                                     init_ia3_weights=False),
    "lora_mts": lambda lib: lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin2"]),
}


def _adapter_params(pm):
    return {n: (p.dtype, p.requires_grad) for n, p in pm.named_parameters() if pm.prefix in n}


# --------------------------------------------------------------------------------------------
# autocast_adapter_dtype
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_matches_peft(method, dtype, autocast, tmp_path):
    results = []
    for lib in (peft, peft_fast):
        pm = lib.get_peft_model(_mlp(dtype), CONFIGS[method](lib), autocast_adapter_dtype=autocast)
        pm.add_adapter("other", CONFIGS[method](lib), autocast_adapter_dtype=autocast)
        created = _adapter_params(pm)
        out = tmp_path / lib.__name__
        pm.save_pretrained(out)
        loaded = lib.PeftModel.from_pretrained(_mlp(dtype), out, autocast_adapter_dtype=autocast)
        loaded.load_adapter(out / "other", adapter_name="other", autocast_adapter_dtype=autocast)
        results.append((created, _adapter_params(loaded)))
    expected = torch.float32 if autocast else dtype
    for created, loaded in results:
        assert {d for d, _ in created.values()} == {expected}
        assert {d for d, _ in loaded.values()} == {expected}
    (peft_created, peft_loaded), (fast_created, fast_loaded) = results
    # PEFT re-creates an upcast ParameterDict entry (IA3) as a trainable Parameter: the inactive adapter
    # and adapters loaded for inference become trainable there; peft_fast keeps each flag as it was
    peft_bug = method == "ia3" and autocast and dtype != torch.float32
    for fast, ref, frozen in ((fast_created, peft_created, lambda n: ".other" in n), (fast_loaded, peft_loaded,
                                                                                      lambda n: True)):
        assert fast.keys() == ref.keys()
        for name, (d, requires_grad) in fast.items():
            assert d == ref[name][0], name
            if peft_bug and frozen(name):
                assert not requires_grad and ref[name][1], name
            else:
                assert requires_grad == ref[name][1], name


def test_autocast_keeps_parameter_identity():
    pm = peft_fast.get_peft_model(_mlp(torch.bfloat16), CONFIGS["lora"](peft_fast), autocast_adapter_dtype=False)
    p = pm.base_model.model.lin0.lora_A["default"].weight
    assert p.dtype == torch.bfloat16
    pm.base_model._cast_adapter_dtype("default")
    assert pm.base_model.model.lin0.lora_A["default"].weight is p and p.dtype == torch.float32 and p.requires_grad
    x = torch.randn(4, 10, dtype=torch.bfloat16)
    pm(x).float().sum().backward()  # the fp32 adapter still runs in the bf16 model
    assert p.grad is not None and p.grad.dtype == torch.float32


def test_uses_shared_state_and_push_to_hub():
    assert peft_fast.LoraModel.uses_shared_state is peft.LoraModel.uses_shared_state is False
    assert peft_fast.IA3Model.uses_shared_state is peft.IA3Model.uses_shared_state is False
    pm = peft_fast.get_peft_model(_mlp(), CONFIGS["lora"](peft_fast))
    assert callable(pm.push_to_hub)


# --------------------------------------------------------------------------------------------
# disable_adapter / has_active_enabled_adapter
# --------------------------------------------------------------------------------------------
@LIBS
@pytest.mark.parametrize("method", ["lora", "ia3", "lora_mts"])
def test_has_active_enabled_adapter_nested(lib, method):
    pm = lib.get_peft_model(_mlp(), CONFIGS[method](lib))
    layers = [m for m in pm.modules() if isinstance(m, (BaseTunerLayer, peft.tuners.tuners_utils.BaseTunerLayer))]
    trace = [pm.has_active_enabled_adapter]
    with pm.disable_adapter():
        trace.append((pm.has_active_enabled_adapter, all(m.disable_adapters for m in layers)))
        with pm.disable_adapter():
            trace.append((pm.has_active_enabled_adapter, all(m.disable_adapters for m in layers)))
        trace.append((pm.has_active_enabled_adapter, all(m.disable_adapters for m in layers)))
    trace.append((pm.has_active_enabled_adapter, any(m.disable_adapters for m in layers)))
    assert trace == [True, (False, True), (False, True), (False, True), (True, False)]


@pytest.mark.parametrize("method", ["lora", "ia3", "lora_mts"])
def test_disable_adapter_irregular_state_like_peft(method):
    results = []
    x = torch.randn(5, 10)
    for lib in (peft, peft_fast):
        pm = lib.get_peft_model(_mlp(), CONFIGS[method](lib))
        layer_cls = BaseTunerLayer if lib is peft_fast else peft.tuners.tuners_utils.BaseTunerLayer
        layers = [m for m in pm.modules() if isinstance(m, layer_cls)]
        layers[0].enable_adapters(False)
        with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
            with pm.disable_adapter():
                y_base = pm(x)
        results.append(([m.disable_adapters for m in layers],
                        sorted(n for n, p in pm.named_parameters() if p.requires_grad), y_base, pm(x)))
    assert results[1][:2] == results[0][:2]
    assert not any(results[1][0])
    torch.testing.assert_close(results[1][2], results[0][2])
    torch.testing.assert_close(results[1][3], results[0][3])


# --------------------------------------------------------------------------------------------
# delete_adapter
# --------------------------------------------------------------------------------------------
def _error(fn) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_delete_unknown_and_merged_adapter_texts(method):
    texts = []
    for lib in (peft, peft_fast):
        pm = lib.get_peft_model(_mlp(), CONFIGS[method](lib), adapter_name="a0")
        pm.add_adapter("a1", CONFIGS[method](lib))
        pm.set_adapter("a1")
        pm.merge_adapter()
        weights = {n: p.detach().clone() for n, p in pm.named_parameters()}
        texts.append((_error(lambda: pm.delete_adapter("unknown-adapter")), _error(lambda: pm.delete_adapter("a1"))))
        # refused: nothing changed
        assert set(pm.peft_config) == {"a0", "a1"}
        for n, p in pm.named_parameters():
            assert torch.equal(p, weights[n]), n
        pm.delete_adapter("a0")  # the unmerged one can go, the merge stays
        assert set(pm.peft_config) == {"a1"}
        pm.unmerge_adapter()
        pm.delete_adapter("a1")
        assert not pm.peft_config
    assert texts[1] == texts[0]
    assert texts[1] == ("Adapter unknown-adapter does not exist",
                        "Cannot delete adapter(s) ['a1'] while they are merged. Please unmerge them first.")


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_delete_active_adapter_picks_first_in_sorted_order(method):
    results = []
    for lib in (peft, peft_fast):
        pm = lib.get_peft_model(_mlp(), CONFIGS[method](lib), adapter_name="zeta")
        pm.add_adapter("beta", CONFIGS[method](lib))
        pm.add_adapter("alpha", CONFIGS[method](lib))
        with pytest.warns(UserWarning, match="Adapter zeta was active which is now deleted"):
            pm.delete_adapter("zeta")
        results.append((pm.active_adapter, sorted(n for n, p in pm.named_parameters() if p.requires_grad)))
    assert results[1] == results[0]
    assert results[1][0] == "alpha"


# --------------------------------------------------------------------------------------------
# modules_to_save: one active copy per wrapper
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_name", ["LoraConfig", "IA3Config"])
def test_two_adapters_with_the_same_modules_to_save_cannot_both_be_active(config_name):
    messages = []
    for lib in (peft, peft_fast):
        kwargs = {"feedforward_modules": []} if config_name == "IA3Config" else {}
        make = lambda: getattr(lib, config_name)(target_modules=["lin0"], modules_to_save=["lin2"], **kwargs)  # noqa: E731
        pm = lib.get_peft_model(_mlp(), make())
        pm.add_adapter("other", make())
        with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper") as info:
            pm.base_model.set_adapter(["default", "other"])
        messages.append(str(info.value))
        layer_cls = BaseTunerLayer if lib is peft_fast else peft.tuners.tuners_utils.BaseTunerLayer
        assert all(m.active_adapters == ["default"] for m in pm.modules() if isinstance(m, layer_cls))
        wrapper = pm.base_model.model.lin2
        assert wrapper.adapter_layer_names == ("modules_to_save",)
    assert messages[1].split("(")[0] == messages[0].split("(")[0]
    assert messages[1].endswith("got 2") and messages[0].endswith("got 2")


# --------------------------------------------------------------------------------------------
# default target modules
# --------------------------------------------------------------------------------------------
class _Config:
    def __init__(self, model_type):
        self.model_type = model_type

    def to_dict(self):
        return {"model_type": self.model_type}


@pytest.mark.parametrize("default", [["lin0"], "lin0", "lin[01]"], ids=["list", "str", "regex"])
def test_default_target_modules_from_the_table(default, monkeypatch):
    results = []
    for lib in (peft, peft_fast):
        table = lib.tuners.lora.model.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
        monkeypatch.setitem(table, "foobar", default)
        model = _mlp()
        model.config = _Config("foobar")
        pm = lib.get_peft_model(model, lib.LoraConfig())
        results.append((sorted(pm.targeted_module_names), pm.peft_config["default"].target_modules))
    assert results[1] == results[0]
    model = _mlp()
    model.config = _Config("no-such-type")
    with pytest.raises(ValueError, match="Please specify `target_modules`"):
        peft_fast.get_peft_model(model, peft_fast.LoraConfig())


# --------------------------------------------------------------------------------------------
# get_peft_model / add_adapter warnings, adapter_names inside disable_adapter()
# --------------------------------------------------------------------------------------------
def _warning_texts(fn) -> list[str]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return sorted(str(w.message) for w in caught if "was renamed" in str(w.message) or "second time" in
                  str(w.message) or "should not be contained" in str(w.message))


def test_get_peft_model_and_add_adapter_warnings_like_peft():
    texts = []
    for lib in (peft, peft_fast):
        def run():
            model = _mlp()
            pm = lib.get_peft_model(model, lib.LoraConfig(target_modules=["lin0"], base_model_name_or_path="custom"),
                                    adapter_name="lora")
            pm.add_adapter("ora", lib.LoraConfig(target_modules=["lin0"]))
            lib.get_peft_model(pm.base_model.model, lib.LoraConfig(target_modules=["lin1"]), adapter_name="x")
        texts.append(_warning_texts(run))
    assert texts[1] == texts[0]
    assert len(texts[1]) == 4


def test_adapter_names_inside_disable_adapter_run_the_base_model():
    results = []
    x = torch.randn(3, 10)
    for lib in (peft, peft_fast):
        base = _mlp()
        y_base = base(x)
        pm = lib.get_peft_model(base, CONFIGS["lora"](lib))
        pm.train()  # PEFT refuses adapter_names in training mode, but not inside disable_adapter()
        with pm.disable_adapter():
            y = pm(x, adapter_names=["default", "__base__", "unknown"])
        results.append(y)
        torch.testing.assert_close(y, y_base)
    torch.testing.assert_close(results[1], results[0])
