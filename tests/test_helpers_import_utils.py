"""peft_fast.helpers and peft_fast.import_utils against real peft's modules of the same names."""
import copy
import inspect
import json

import pytest
import torch
from torch import nn

import peft
import peft.helpers as p_helpers
import peft.import_utils as p_iu
import peft_fast
import peft_fast.helpers as f_helpers
import peft_fast.import_utils as f_iu


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, X):
        return self.lin1(torch.relu(self.lin0(X)))


def _pair(**cfg):
    torch.manual_seed(0)
    base = MLP()
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["lin0", "lin1"], **cfg))
    torch.manual_seed(1)
    fm = peft_fast.get_peft_model(copy.deepcopy(base), peft_fast.LoraConfig(target_modules=["lin0", "lin1"], **cfg))
    return pm, fm


def test_import_utils_same_public_names_and_values():
    names = [n for n in dir(p_iu) if n.startswith("is_")]
    assert names
    for name in names:
        ref, ours = getattr(p_iu, name), getattr(f_iu, name)
        if callable(ref):
            assert str(inspect.signature(ref)) == str(inspect.signature(ours)), name
            assert hasattr(ours, "cache_clear"), name  # lru_cache'd as in PEFT
            assert ours() == ref(), name
        else:
            assert ours == ref, name


def test_helpers_signatures_match_peft():
    for name in ["update_forward_signature", "update_generate_signature", "update_signature", "check_if_peft_model",
                 "rescale_adapter_scale", "disable_input_dtype_casting", "find_kappa_target_modules"]:
        ours = str(inspect.signature(getattr(f_helpers, name))).replace("peft_fast.", "peft.")
        assert ours == str(inspect.signature(getattr(p_helpers, name))), name


def test_update_signature_errors_and_effect():
    _, fm = _pair()
    with pytest.raises(ValueError, match=r"method foo is not supported please choose one of"):
        f_helpers.update_signature(fm, method="foo")
    f_helpers.update_signature(fm, method="forward")  # PeftModel.forward is (*args, **kwargs)
    assert fm.forward.__doc__ == MLP.forward.__doc__


def test_check_if_peft_model(tmp_path):
    _, fm = _pair()
    fm.save_pretrained(tmp_path / "ok")
    assert f_helpers.check_if_peft_model(tmp_path / "ok") is p_helpers.check_if_peft_model(tmp_path / "ok") is True
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text(json.dumps({"foo": "bar"}))
    assert f_helpers.check_if_peft_model(tmp_path / "broken") is False
    assert f_helpers.check_if_peft_model(tmp_path / "missing") is False


@pytest.mark.parametrize("tensor_scaling", [False, True])
def test_rescale_adapter_scale_matches_peft(tensor_scaling):
    pm, fm = _pair(init_lora_weights=False)
    if tensor_scaling:
        for model in (pm, fm):
            for m in model.modules():
                if hasattr(m, "scaling") and isinstance(m.scaling, dict):
                    m.scaling = {k: torch.tensor(v) for k, v in m.scaling.items()}
    x = torch.randn(4, 10)
    before = fm(x)
    for mult in (0.0, 0.5, 2):
        with p_helpers.rescale_adapter_scale(pm, mult), f_helpers.rescale_adapter_scale(fm, mult):
            torch.testing.assert_close(fm(x), pm(x))
    torch.testing.assert_close(fm(x), before)
    with pytest.raises(TypeError, match="Argument multiplier should be of type float"):
        with f_helpers.rescale_adapter_scale(fm, "1"):
            pass
    with pytest.raises(ValueError, match="scaling is only supported for models with `LoraLayer`s"):
        with f_helpers.rescale_adapter_scale(MLP(), 0.5):
            pass


def test_disable_input_dtype_casting():
    pm, fm = _pair(init_lora_weights=False)
    layers = [m.base_model.model.lin0 for m in (pm, fm)]
    assert layers[1].cast_input_dtype_enabled is True
    # fp16 adapters, fp32 base and input: x is cast to fp16 for the adapter unless casting is disabled
    for layer in layers:
        for m in (layer.lora_A["default"], layer.lora_B["default"]):
            m.half()
    x = torch.randn(2, 10)
    torch.testing.assert_close(fm(x), pm(x))
    seen = []
    layers[1].lora_A["default"].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    with f_helpers.disable_input_dtype_casting(fm), p_helpers.disable_input_dtype_casting(pm):
        assert layers[1].cast_input_dtype_enabled is False
        with pytest.raises(RuntimeError) as ref:
            pm(x)
        with pytest.raises(RuntimeError) as ours:
            fm(x)
        assert str(ours.value) == str(ref.value)
        assert seen == [torch.float32]
    assert layers[1].cast_input_dtype_enabled is True
    torch.testing.assert_close(fm(x), pm(x))
    with f_helpers.disable_input_dtype_casting(fm, active=False):
        assert layers[1].cast_input_dtype_enabled is True
        fm(x)


def test_find_kappa_target_modules_matches_peft():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 6))
    for kw in ({"top_p": 0.5}, {"top_p": 1.0}):
        assert f_helpers.find_kappa_target_modules(model, show_progress=False, **kw) == \
            p_helpers.find_kappa_target_modules(model, show_progress=False, **kw)
    sel_f = f_helpers.KappaTuneSelector(model, show_progress=False)
    sel_p = p_helpers.KappaTuneSelector(model, show_progress=False)
    for kw in ({"num_modules": 2}, {"threshold": 1e9}, {}):
        assert sel_f.get_best_targets(**kw) == sel_p.get_best_targets(**kw)


def test_monteclora_trainer_mixin_matches_peft():
    class _Base:  # stands in for transformers.Trainer.compute_loss
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            out = model(inputs["x"])
            loss = out.pow(2).mean()
            return (loss, out) if return_outputs else loss

    class PeftTrainer(p_helpers.MontecloraTrainerMixin, _Base):
        pass

    class FastTrainer(f_helpers.MontecloraTrainerMixin, _Base):
        pass

    torch.manual_seed(0)
    base = MLP()
    losses = []
    for lib, trainer in ((peft, PeftTrainer()), (peft_fast, FastTrainer())):
        torch.manual_seed(1)
        cfg = lib.LoraConfig(target_modules=["lin0"], monteclora_config=lib.MontecloraConfig(num_samples=2))
        model = lib.get_peft_model(copy.deepcopy(base), cfg).train()
        torch.manual_seed(2)
        inputs = {"x": torch.randn(4, 10)}
        torch.manual_seed(3)
        task = _Base().compute_loss(model, inputs)
        torch.manual_seed(3)
        total, out = trainer.compute_loss(model, inputs, return_outputs=True)
        assert total.item() != task.item()
        total.backward()
        losses.append(total.detach())
    torch.testing.assert_close(losses[1], losses[0])


@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_dora_caching(kind):
    torch.manual_seed(0)
    if kind == "linear":
        base, target, x = MLP(), ["lin0", "lin1"], torch.randn(3, 10)
    elif kind == "conv":
        base, target, x = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(5, 5, 3)), ["0", "1"], \
            torch.randn(1, 3, 4, 4)
    else:
        base, target, x = nn.Sequential(nn.Embedding(12, 6), nn.Linear(6, 3)), ["0"], torch.arange(10).view(2, 5)
    outs = []
    for lib, helpers in ((peft, p_helpers), (peft_fast, f_helpers)):
        torch.manual_seed(1)
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(target_modules=target, use_dora=True,
                                                                          init_lora_weights=False))
        caches = [m._dora_cache for m in model.modules() if hasattr(m, "_dora_cache")]
        ref = model(x)
        assert caches and not any(caches)
        model.eval()
        with helpers.DoraCaching():
            cached = model(x)
            assert all(caches)
            torch.testing.assert_close(model(x), cached)
        torch.testing.assert_close(cached, ref)
        model(x)
        assert not any(caches)
        with helpers.DoraCaching():
            model(x)
        model.train()
        assert not any(caches)
        outs.append(cached)
    assert not p_helpers.dora.ENABLE_DORA_CACHING and not f_helpers.dora.ENABLE_DORA_CACHING
    torch.testing.assert_close(outs[1], outs[0])
