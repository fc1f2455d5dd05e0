"""Bad input to the adapter lifecycle (issue #11): clear errors, and nothing half-done.

- merge_and_unload / merge_adapter with an unknown adapter name raise a ValueError naming it and
  the known adapters, before any weight changes (peft 0.21.2 silently returns the unmerged base).
- A load_adapter / from_pretrained / add_adapter / add_weighted_adapter that fails (shape mismatch,
  corrupt file, empty weights, an error half-way) leaves modules, parameters, requires_grad,
  peft_config and the active adapter exactly as they were.
- A corrupt adapter_model.safetensors or a truncated adapter_config.json is named in the error
  (same exception types as peft, so callers' except clauses still work).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from torch import nn

import peft_fast
from peft_fast.tuners.lora.model import LoraModel

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.lin0 = nn.Linear(6, width)
        self.lin1 = nn.Linear(width, 8)
        self.emb_proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.emb_proj(torch.tanh(self.lin1(torch.tanh(self.lin0(x))))))


def _net(width: int = 8) -> Net:
    torch.manual_seed(0)
    return Net(width)


def _config(lib=peft_fast, **kw):
    kw.setdefault("target_modules", ["lin0", "lin1"])
    return lib.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **kw)


def _save(tmp_path, name, width: int = 8, **kw) -> str:
    torch.manual_seed(1)
    pm = peft_fast.get_peft_model(_net(width), _config(**kw))
    pm.save_pretrained(str(tmp_path / name))
    return str(tmp_path / name)


def _state(pm) -> dict:
    """Everything a failed operation must leave unchanged."""
    return {
        "modules": [(n, type(m).__name__, m.training) for n, m in pm.named_modules()],
        "params": [(n, tuple(p.shape), p.requires_grad) for n, p in pm.named_parameters()],
        "state_dict": sorted(pm.state_dict()),
        "values": {k: v.clone() for k, v in pm.state_dict().items()},
        "peft_config": {k: v.to_dict() for k, v in pm.peft_config.items()},
        "active": (pm.active_adapter, [getattr(m, "active_adapters", None) for m in pm.modules()]),
        "targeted": list(pm.base_model.targeted_module_names),
    }


def _assert_unchanged(before: dict, pm) -> None:
    after = _state(pm)
    for key in ("modules", "params", "state_dict", "peft_config", "active", "targeted"):
        assert after[key] == before[key], key
    for k, v in before["values"].items():
        assert torch.equal(after["values"][k], v), k


@pytest.fixture
def two_adapters():
    pm = peft_fast.get_peft_model(_net(), _config(modules_to_save=["head"]))
    pm.add_adapter("other", _config(target_modules=["lin0"]))
    return pm


# --------------------------------------------------------------------------------------------
# unknown adapter names
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call", ["merge_and_unload", "merge_adapter", "base_model.merge_and_unload"])
def test_merge_with_unknown_adapter_names_raises(two_adapters, call):
    pm = two_adapters
    before = _state(pm)
    obj = pm.base_model if call.startswith("base_model.") else pm
    with pytest.raises(ValueError, match=r"\['nope'\].*\['default', 'other'\]"):
        getattr(obj, call.split(".")[-1])(adapter_names=["default", "nope"])
    _assert_unchanged(before, pm)


def test_merge_with_a_string_adapter_name_raises_before_unloading(two_adapters):
    before = _state(two_adapters)
    with pytest.raises(ValueError, match="adapter_names should be a list of strings, got 'default'"):
        two_adapters.merge_and_unload(adapter_names="default")
    _assert_unchanged(before, two_adapters)


def test_merge_with_known_names_still_works(two_adapters):
    x = torch.randn(3, 6)
    with torch.no_grad():
        y = two_adapters(x)
        merged = two_adapters.merge_and_unload(adapter_names=["default"])
        torch.testing.assert_close(merged(x), y)


# --------------------------------------------------------------------------------------------
# failed loads and adds roll back
# --------------------------------------------------------------------------------------------
def _corrupt(src: str, dst: str, name: str, keep: int) -> str:
    shutil.copytree(src, dst)
    with open(os.path.join(dst, name), "r+b") as f:
        f.truncate(keep)
    return dst


@pytest.mark.parametrize("failure", ["shape_mismatch", "corrupt_weights", "missing_weights", "bad_config"])
def test_failed_load_adapter_leaves_nothing_half_added(two_adapters, tmp_path, failure):
    good = _save(tmp_path, "good", modules_to_save=["head"])
    path = {
        "shape_mismatch": lambda: _save(tmp_path, "wide", width=12, modules_to_save=["head"]),
        "corrupt_weights": lambda: _corrupt(good, str(tmp_path / "c"), "adapter_model.safetensors", 40),
        "missing_weights": lambda: (shutil.copytree(good, str(tmp_path / "m")),
                                    os.remove(str(tmp_path / "m" / "adapter_model.safetensors")))[0],
        "bad_config": lambda: _corrupt(good, str(tmp_path / "j"), "adapter_config.json", 25),
    }[failure]()
    pm = two_adapters
    pm.set_requires_grad("other")
    before = _state(pm)
    with pytest.raises(Exception):
        pm.load_adapter(path, "new", is_trainable=True)
    _assert_unchanged(before, pm)
    assert "new" not in pm.peft_config
    pm.load_adapter(good, "new")  # and the name can be used afterwards
    assert "new" in pm.peft_config


def test_failed_from_pretrained_leaves_the_base_model_untouched(tmp_path):
    wide = _save(tmp_path, "wide", width=12)
    net = _net()
    modules = [(n, type(m)) for n, m in net.named_modules()]
    grads = [(n, p.requires_grad) for n, p in net.named_parameters()]
    with pytest.raises(ValueError, match="Shape mismatch"):
        peft_fast.PeftModel.from_pretrained(net, wide)
    assert [(n, type(m)) for n, m in net.named_modules()] == modules
    assert [(n, p.requires_grad) for n, p in net.named_parameters()] == grads
    assert not hasattr(net, "peft_config")


def test_failed_add_adapter_half_way_rolls_back(two_adapters):
    """A target that cannot be adapted (a ReLU) fails after emb_proj was already wrapped."""
    pm = two_adapters
    pm.base_model.model.extra = nn.ReLU()  # registered last: matched after emb_proj
    before = _state(pm)
    with pytest.raises(ValueError, match="is not supported"):
        pm.add_adapter("bad", _config(target_modules=["emb_proj", "extra"], modules_to_save=["head"]))
    _assert_unchanged(before, pm)


@pytest.mark.parametrize("weights", [[], [1.0, 2.0], None])
def test_add_weighted_adapter_bad_weights(two_adapters, weights):
    before = _state(two_adapters)
    with pytest.raises(ValueError, match=r"one weight per adapter.*\['default'\]"):
        two_adapters.add_weighted_adapter(["default"], weights, "mix", combination_type="linear")
    _assert_unchanged(before, two_adapters)


def test_add_weighted_adapter_failing_half_way_rolls_back(two_adapters, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("SVD did not converge")

    monkeypatch.setattr(LoraModel, "_svd_weighted", staticmethod(broken))
    before = _state(two_adapters)
    with pytest.raises(RuntimeError, match="SVD did not converge"):
        two_adapters.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", combination_type="svd")
    _assert_unchanged(before, two_adapters)


# --------------------------------------------------------------------------------------------
# corrupt files are named
# --------------------------------------------------------------------------------------------
def _error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.value


def test_corrupt_safetensors_error_names_the_file(tmp_path):
    path = _corrupt(_save(tmp_path, "good"), str(tmp_path / "bad"), "adapter_model.safetensors", 40)
    fast = _error(lambda: peft_fast.PeftModel.from_pretrained(_net(), path))
    ref = _error(lambda: peft.PeftModel.from_pretrained(_net(), path))
    assert os.path.join(path, "adapter_model.safetensors") in str(fast)
    assert isinstance(fast, type(ref))  # except clauses written for peft still catch it
    pm = peft_fast.get_peft_model(_net(), _config())
    assert os.path.join(path, "adapter_model.safetensors") in str(_error(lambda: pm.load_adapter(path, "x")))


def test_truncated_adapter_config_error_names_the_file(tmp_path):
    path = _corrupt(_save(tmp_path, "good"), str(tmp_path / "bad"), "adapter_config.json", 25)
    fast = _error(lambda: peft_fast.PeftModel.from_pretrained(_net(), path))
    ref = _error(lambda: peft.PeftModel.from_pretrained(_net(), path))
    assert os.path.join(path, "adapter_config.json") in str(fast)
    assert isinstance(fast, json.JSONDecodeError) and isinstance(ref, json.JSONDecodeError)
    assert os.path.join(path, "adapter_config.json") in str(
        _error(lambda: peft_fast.LoraConfig.from_pretrained(path)))


# --------------------------------------------------------------------------------------------
# found by trying it as a new user
# --------------------------------------------------------------------------------------------
def test_shape_mismatch_on_load_names_the_adapter_directory(two_adapters, tmp_path):
    wide = _save(tmp_path, "wide", width=12)
    with pytest.raises(ValueError, match="Shape mismatch") as info:
        two_adapters.load_adapter(wide, "new")
    assert wide in str(info.value) and "'new'" in str(info.value)


@pytest.mark.parametrize("weight", ["a", float("nan"), float("inf"), True, None, torch.ones(2)],
                         ids=["str", "nan", "inf", "bool", "none", "tensor2"])
def test_add_weighted_adapter_names_a_bad_weight_value(two_adapters, weight):
    before = _state(two_adapters)
    with pytest.raises(ValueError, match=r"weight of adapter 'default' must be a finite real number"):
        two_adapters.add_weighted_adapter(["default", "other"], [weight, 1.0], "mix", combination_type="svd")
    _assert_unchanged(before, two_adapters)


def test_add_weighted_adapter_accepts_int_and_0dim_tensor_weights(two_adapters):
    two_adapters.add_weighted_adapter(["default", "other"], [1, torch.tensor(0.5)], "mix", combination_type="svd")
    assert "mix" in two_adapters.peft_config


@pytest.mark.parametrize("svd_rank, needle", [(100, r"svd_rank=100 exceeds min\(in, out\)=\d+ of layer"),
                                              (-1, "svd_rank must be a positive integer"),
                                              (2.5, "svd_rank must be a positive integer")])
def test_add_weighted_adapter_svd_rank_that_cannot_fit_is_refused(two_adapters, svd_rank, needle):
    before = _state(two_adapters)
    with pytest.raises(ValueError, match=needle):
        two_adapters.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", combination_type="svd",
                                          svd_rank=svd_rank)
    _assert_unchanged(before, two_adapters)


def test_unmatched_targets_raise_peft_error_class():
    with pytest.raises(peft_fast.NoMatchingPeftModuleError, match="not found in the base model") as info:
        peft_fast.get_peft_model(_net(), _config(target_modules=["nonexistent_xyz"]))
    assert isinstance(info.value, ValueError) and isinstance(info.value, peft_fast.PeftError)
    from peft_fast.utils.error import NoMatchingPeftModuleError

    assert NoMatchingPeftModuleError is peft_fast.NoMatchingPeftModuleError
    assert type(info.value).__name__ == peft.NoMatchingPeftModuleError.__name__
