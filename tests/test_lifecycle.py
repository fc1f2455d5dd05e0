"""Adapter lifecycle (issue #11): adding, loading, activating and disabling adapters.

- No path that adds, loads, activates or swaps an adapter changes another adapter's
  `requires_grad`; adapter names are matched exactly, never as substrings ("task" vs "task_v2").
  Real peft 0.21.2 is the oracle where it is right (load_adapter, set_adapter, modules_to_save).
- `disable_adapter()` is reentrant and restores the state it found, requires_grad included.
- `set_requires_grad` on PeftModel, the tuner model and the layers, as in PEFT.
- A model wrapped in eval mode stays in eval mode (PEFT 0.21.2 leaves the new dropouts in train mode).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import peft_fast
from peft_fast.utils.hotswap import hotswap_adapter

peft = pytest.importorskip("peft")

LIBS = pytest.mark.parametrize("lib", [peft, peft_fast], ids=["peft", "peft_fast"])


class Net(nn.Module):
    """Two Linear layers and a head; `lora_proj` is a base layer whose name contains LoRA's prefix."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(6, 8)
        self.lin1 = nn.Linear(8, 8)
        self.lora_proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.lora_proj(torch.tanh(self.lin1(torch.tanh(self.lin0(x))))))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _config(lib, **kw):
    kw.setdefault("target_modules", ["lin0", "lin1"])
    return lib.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **kw)


def _save(lib, tmp_path, name: str, seed: int = 1, **kw) -> str:
    torch.manual_seed(seed)
    pm = lib.get_peft_model(_net(), _config(lib, **kw))
    torch.manual_seed(seed)
    with torch.no_grad():  # heads of modules_to_save differ from the base too
        for n, p in pm.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn_like(p))
    path = tmp_path / name
    pm.save_pretrained(str(path))
    return str(path)


def _trainable(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# trainability: the three reported cases, with peft as the oracle
# --------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    """The same adapter files for both libraries (peft_fast writes PEFT's format)."""
    return {"plain": _save(peft_fast, tmp_path, "plain"),
            "head": _save(peft_fast, tmp_path, "head", target_modules=["lin0"], modules_to_save=["head"])}


@LIBS
def test_load_trainable_adapter_keeps_frozen_one_frozen(lib, saved):
    m = lib.PeftModel.from_pretrained(_net(), saved["plain"], adapter_name="frozen")
    m.load_adapter(saved["plain"], "trainable", is_trainable=True)
    names = _trainable(m)
    assert names and all(".trainable." in n for n in names), names
    assert not any(".frozen." in n for n in names)


@LIBS
def test_adapter_names_are_not_matched_by_substring(lib, saved):
    m = lib.PeftModel.from_pretrained(_net(), saved["plain"], adapter_name="task_v2", is_trainable=True)
    before = _trainable(m)
    n_trainable = 2 * 6 + 8 * 2 + 2 * 8 + 8 * 2  # lora_A/B of lin0 (6 -> 8) and lin1 (8 -> 8), r=2
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == n_trainable
    m.load_adapter(saved["plain"], "task")
    assert _trainable(m) == before
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == n_trainable


@LIBS
def test_modules_to_save_copy_of_trainable_adapter_stays_trainable(lib, saved):
    m = lib.PeftModel.from_pretrained(_net(), saved["head"], adapter_name="policy", is_trainable=True)
    before = _trainable(m)
    assert "base_model.model.head.modules_to_save.policy.weight" in before
    m.load_adapter(saved["head"], "ref")
    assert _trainable(m) == before
    # the active adapter's head is used, not the one just loaded
    assert m.base_model.model.head.active_adapters == ["policy"]


@LIBS
@torch.no_grad()
def test_loading_inactive_adapters_does_not_switch_modules_to_save(lib, saved):
    """Loading adapters with modules_to_save while another (without them) is active changes neither
    the outputs nor what is trainable; activating one then uses its head copy."""
    x = _x()
    m = lib.PeftModel.from_pretrained(_net(), saved["plain"], is_trainable=True)
    y, before = m(x), _trainable(m)
    m.load_adapter(saved["head"], "first")
    m.load_adapter(saved["head"], "second")
    torch.testing.assert_close(m(x), y)
    assert _trainable(m) == before
    m.set_adapter("second")
    torch.testing.assert_close(m(x), lib.PeftModel.from_pretrained(_net(), saved["head"])(x))


# every path that adds, loads, activates or swaps, as a sequence compared step by step with peft
def _steps(lib, saved, tmp_path):
    return [
        ("from_pretrained trainable", lambda m: None),
        ("load frozen 'task'", lambda m: m.load_adapter(saved["plain"], "task")),
        ("add_adapter 'ta'", lambda m: m.add_adapter("ta", _config(lib))),
        ("add_adapter inference 'tas'", lambda m: m.add_adapter("tas", _config(lib, inference_mode=True))),
        ("load trainable 'task_v'", lambda m: m.load_adapter(saved["plain"], "task_v", is_trainable=True)),
        ("load head 'policy'", lambda m: m.load_adapter(saved["head"], "policy", is_trainable=True)),
        ("load head 'ref'", lambda m: m.load_adapter(saved["head"], "ref")),
        ("set_adapter 'policy'", lambda m: m.set_adapter("policy")),
        ("set_adapter 'ref' inference", lambda m: m.set_adapter("ref", inference_mode=True)),
        ("set_adapter 'task_v2'", lambda m: m.set_adapter("task_v2")),
        ("set_requires_grad 'task'", lambda m: m.set_requires_grad("task")),
        ("set_requires_grad off", lambda m: m.set_requires_grad(["task", "task_v2"], requires_grad=False)),
    ]


def test_every_lifecycle_step_keeps_trainability_like_peft(saved, tmp_path):
    models = {lib: lib.PeftModel.from_pretrained(_net(), saved["plain"], adapter_name="task_v2", is_trainable=True)
              for lib in (peft, peft_fast)}
    steps = {lib: _steps(lib, saved, tmp_path) for lib in models}
    for i, (label, _) in enumerate(steps[peft]):
        for lib, m in models.items():
            steps[lib][i][1](m)
        assert _trainable(models[peft_fast]) == _trainable(models[peft]), label
        assert models[peft_fast].active_adapter == models[peft].active_adapter, label


def test_add_weighted_adapter_and_hotswap_leave_other_adapters_alone(saved, tmp_path):
    """peft 0.21.2 freezes every parameter whose name contains the new adapter's name after
    add_weighted_adapter ('t' freezes them all); peft_fast freezes only the new adapter."""
    m = peft_fast.PeftModel.from_pretrained(_net(), saved["plain"], adapter_name="task", is_trainable=True)
    m.load_adapter(saved["plain"], "task_v2")
    m.set_requires_grad("task_v2")
    before = _trainable(m)
    m.add_weighted_adapter(["task", "task_v2"], [0.5, 0.5], "t", combination_type="cat")
    assert _trainable(m) == before
    # a larger rank replaces the tensors of the adapter being swapped: trainability stays
    big = _save(peft_fast, tmp_path, "big", seed=3)
    cfg = peft_fast.LoraConfig.from_pretrained(big)
    cfg.r, cfg.lora_alpha = 4, 8
    torch.manual_seed(3)
    pm = peft_fast.get_peft_model(_net(), cfg)
    pm.save_pretrained(big)
    hotswap_adapter(m, big, "task", torch_device="cpu")
    assert _trainable(m) == before
    assert m.base_model.model.lin0.lora_A["task"].weight.shape[0] == 4


@LIBS
def test_base_layer_named_like_the_prefix_is_frozen(lib):
    pm = lib.get_peft_model(_net(), _config(lib))
    pm.add_adapter("other", _config(lib, target_modules=["lin0"]))
    assert not any("lora_proj" in n for n in _trainable(pm))


# --------------------------------------------------------------------------------------------
# disable_adapter() is reentrant
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def test_nested_disable_adapter_keeps_outer_block_disabled():
    base = _net()
    x = _x()
    y_base = base(x)
    pm = peft_fast.get_peft_model(base, _config(peft_fast, modules_to_save=["head"]))
    y_adapter = pm(x)
    assert not torch.allclose(y_adapter, y_base)
    with pm.disable_adapter():
        torch.testing.assert_close(pm(x), y_base)
        with pm.disable_adapter():
            torch.testing.assert_close(pm(x), y_base)
        torch.testing.assert_close(pm(x), y_base, msg="outer block after the inner one exited")
    torch.testing.assert_close(pm(x), y_adapter)


def test_disable_adapter_restores_requires_grad(saved):
    """peft 0.21.2 makes an adapter loaded for inference trainable on exit; peft_fast restores."""
    m = peft_fast.PeftModel.from_pretrained(_net(), saved["head"], adapter_name="ref")
    m.load_adapter(saved["head"], "policy", is_trainable=True)
    m.set_adapter("policy")
    m.set_requires_grad("ref", False)
    before = _trainable(m)
    with m.disable_adapter():
        assert _trainable(m) == []
        with m.disable_adapter():
            pass
    assert _trainable(m) == before
    m.set_adapter("ref", inference_mode=True)
    with m.disable_adapter():
        pass
    assert _trainable(m) == []


def test_disable_adapter_keeps_changes_made_inside_the_block(saved):
    m = peft_fast.PeftModel.from_pretrained(_net(), saved["plain"], is_trainable=True)
    lora_A = m.base_model.model.lin0.lora_A["default"].weight
    with m.disable_adapter():
        lora_A.requires_grad_(True)  # the user's choice inside the block wins
    assert lora_A.requires_grad
    assert m.base_model.model.lin1.lora_A["default"].weight.requires_grad


def test_disable_adapter_restores_an_already_disabled_layer():
    pm = peft_fast.get_peft_model(_net(), _config(peft_fast))
    pm.base_model.disable_adapter_layers()
    with pm.disable_adapter():
        pass
    assert all(layer.disable_adapters for layer in pm.base_model._tuner_layers())


# --------------------------------------------------------------------------------------------
# set_requires_grad
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["peft_model", "tuner", "layers"])
def test_set_requires_grad_matches_peft(target):
    models = {}
    for lib in (peft, peft_fast):
        pm = lib.get_peft_model(_net(), _config(lib, modules_to_save=["head"]))
        pm.add_adapter("other", _config(lib, modules_to_save=["head"]))
        obj = {"peft_model": pm, "tuner": pm.base_model}.get(target)
        calls = [(["other"], True), ("default", False), (("default", "other"), True), ("other", False)]
        for names, flag in calls:
            if obj is not None:
                obj.set_requires_grad(names, requires_grad=flag)
            else:
                for module in pm.modules():
                    if hasattr(module, "set_requires_grad") and not isinstance(module, (lib.PeftModel, nn.Linear)) \
                            and module is not pm.base_model:
                        module.set_requires_grad(names, requires_grad=flag)
        models[lib] = pm
    assert _trainable(models[peft_fast]) == _trainable(models[peft])
    assert _trainable(models[peft_fast])


def test_set_requires_grad_signature_matches_peft():
    import inspect

    for fast, ref in [(peft_fast.PeftModel, peft.PeftModel), (peft_fast.LoraModel, peft.LoraModel)]:
        def params(fn):
            return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]

        assert params(fast.set_requires_grad) == params(ref.set_requires_grad)


def test_set_requires_grad_unknown_adapter_is_named():
    pm = peft_fast.get_peft_model(_net(), _config(peft_fast))
    with pytest.raises(ValueError, match=r"\['nope'\].*\['default'\]"):
        pm.set_requires_grad(["nope"])


# --------------------------------------------------------------------------------------------
# train / eval mode (beyond peft 0.21.2)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def test_get_peft_model_keeps_eval_mode():
    pm = peft_fast.get_peft_model(_net().eval(), _config(peft_fast, lora_dropout=0.5, modules_to_save=["head"]))
    assert not pm.training and not pm.base_model.training
    assert not any(m.training for m in pm.modules())
    x = _x()
    torch.testing.assert_close(pm(x), pm(x), rtol=0, atol=0)
    pm.add_adapter("other", _config(peft_fast, lora_dropout=0.5))
    pm.set_adapter("other")
    assert not any(m.training for m in pm.modules())
    torch.testing.assert_close(pm(x), pm(x), rtol=0, atol=0)
    pm.train()
    assert all(m.training for m in pm.modules())


def test_get_peft_model_keeps_train_mode_and_mixed_modes():
    net = _net().train()
    net.lin1.eval()  # a user's deliberate mix is kept: only the new modules follow their layer
    pm = peft_fast.get_peft_model(net, _config(peft_fast, lora_dropout=0.5))
    assert pm.training and pm.base_model.training
    assert pm.base_model.model.lin0.lora_dropout["default"].training
    assert not pm.base_model.model.lin1.training
    assert not pm.base_model.model.lin1.lora_dropout["default"].training
    assert not pm.base_model.model.lin1.base_layer.training
