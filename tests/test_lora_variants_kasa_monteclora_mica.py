"""KaSA, MonteCLoRA and MiCA (LoRA variants, issue #12) against real peft: same seeds -> same
initial weights (incl. KaSA's truncated base weight and MiCA's SVD init), same outputs and
gradients in train and eval mode (MonteCLoRA's sampling draws the same numbers), same variant
losses, same frozen weights, same saved files, cross-loading, merges, and PEFT's errors."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
import peft_fast  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 10)
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 12)
        self.conv = nn.Conv1d(4, 4, 1)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(self.emb(x))))


def _variants(lib):
    return {
        "kasa": dict(target_modules=["lin0", "lin1"], kasa_config=lib.KasaConfig(beta=0.1, gamma=0.2), r=4),
        "mica": dict(target_modules=["lin0", "emb"], init_lora_weights="mica", r=4),
        "monteclora": dict(target_modules=["lin0", "lin1"], monteclora_config=lib.MontecloraConfig(num_samples=3)),
    }


def _build(lib, variant, base):
    torch.manual_seed(1)
    model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**_variants(lib)[variant]))
    return model


@pytest.fixture
def base():
    torch.manual_seed(0)
    return MLP()


def _perturb(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.3)


def _loss(lib, model, variant, x):
    y = model(x)
    loss = y.square().mean()
    if variant == "kasa":
        loss = loss + model._get_kasa_loss()
    if variant == "monteclora":
        loss = loss + model._get_monteclora_loss()
    return y, loss


@pytest.mark.parametrize("variant", ["kasa", "mica", "monteclora"])
@pytest.mark.parametrize("train", [True, False])
def test_outputs_gradients_and_state_match_peft(base, variant, train):
    ref, fast = _build(peft, variant, base), _build(peft_fast, variant, base)
    sd_ref, sd_fast = ref.state_dict(), fast.state_dict()
    assert sorted(sd_ref) == sorted(sd_fast)
    for k in sd_ref:  # incl. KaSA's truncated base weights and MiCA's SVD-initialised lora_B
        assert torch.equal(sd_ref[k], sd_fast[k]), k
    assert {n: p.requires_grad for n, p in ref.named_parameters()} == \
        {n: p.requires_grad for n, p in fast.named_parameters()}
    _perturb(ref), _perturb(fast)
    x = torch.randint(0, 30, (4, 5))
    for step in range(3):  # MonteCLoRA: a fresh sample each step, the same as peft's
        ref.train(train), fast.train(train)
        ref.zero_grad(), fast.zero_grad()
        y_ref, l_ref = _loss(peft, ref, variant, x)
        y_fast, l_fast = _loss(peft_fast, fast, variant, x)
        torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(l_fast, l_ref, rtol=1e-5, atol=1e-6)
        l_ref.backward(), l_fast.backward()
        g_ref = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        g_fast = {n: p.grad for n, p in fast.named_parameters() if p.grad is not None}
        assert sorted(g_ref) == sorted(g_fast)
        for n in g_ref:
            torch.testing.assert_close(g_fast[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)
        with torch.no_grad():
            for (n, p), (_, q) in zip(ref.named_parameters(), fast.named_parameters()):
                if p.grad is not None:
                    p.sub_(0.1 * p.grad), q.sub_(0.1 * q.grad)


@pytest.mark.parametrize("variant", ["kasa", "mica", "monteclora"])
def test_saved_files_and_cross_loading(base, variant, tmp_path):
    ref, fast = _build(peft, variant, base), _build(peft_fast, variant, base)
    _perturb(ref), _perturb(fast)
    ref.save_pretrained(tmp_path / "ref"), fast.save_pretrained(tmp_path / "fast")
    t_ref = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    t_fast = load_file(tmp_path / "fast" / "adapter_model.safetensors")
    assert sorted(t_ref) == sorted(t_fast)
    for k in t_ref:
        assert torch.equal(t_ref[k], t_fast[k]), k
    c_ref = json.load(open(tmp_path / "ref" / "adapter_config.json"))
    c_fast = json.load(open(tmp_path / "fast" / "adapter_config.json"))
    key = {"kasa": "kasa_config", "monteclora": "monteclora_config", "mica": "init_lora_weights"}[variant]
    assert c_fast[key] == c_ref[key]
    x = torch.randint(0, 30, (4, 5))
    ref.eval(), fast.eval()
    expected = ref(x)
    # each library loads the other's files (KaSA truncates the fresh base model the same way)
    torch.manual_seed(7)
    loaded_fast = peft_fast.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ref").eval()
    torch.manual_seed(7)
    loaded_ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fast").eval()
    assert isinstance(loaded_fast.peft_config["default"], peft_fast.LoraConfig)
    torch.testing.assert_close(loaded_fast(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded_ref(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["kasa", "mica", "monteclora"])
def test_merge_unmerge_match_peft(base, variant):
    ref, fast = _build(peft, variant, base), _build(peft_fast, variant, base)
    _perturb(ref), _perturb(fast)
    ref.eval(), fast.eval()
    x = torch.randint(0, 30, (4, 5))
    before = fast(x)
    fast.merge_adapter(), ref.merge_adapter()
    torch.testing.assert_close(fast(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-6)
    fast.unmerge_adapter()
    torch.testing.assert_close(fast(x), before, rtol=1e-5, atol=1e-5)
    merged = fast.merge_and_unload()
    torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-5)


def test_mica_lora_b_stays_frozen(base):
    fast = _build(peft_fast, "mica", base)
    ref = _build(peft, "mica", base)
    for model in (fast, ref):
        model.add_adapter("other", type(model.peft_config["default"])(target_modules=["lin0"], init_lora_weights="mica", r=2))
        model.set_adapter("other")
        model.set_adapter("default")
        model.base_model.set_requires_grad("default", True)
    grads = [{n: p.requires_grad for n, p in m.named_parameters()} for m in (ref, fast)]
    assert grads[0] == grads[1]
    assert not fast.base_model.model.lin0.lora_B["default"].weight.requires_grad
    assert fast.base_model.model.lin0.lora_A["default"].weight.requires_grad


def test_variant_errors_match_peft(base):
    def both(kwargs_fn, model=None):
        errs = []
        for lib in (peft, peft_fast):
            with pytest.raises(ValueError) as e:
                lib.get_peft_model(copy.deepcopy(model or base), lib.LoraConfig(**kwargs_fn(lib)))
            errs.append(str(e.value))
        assert errs[0] == errs[1]

    both(lambda lib: dict(target_modules=["lin0"], kasa_config=lib.KasaConfig(), r=10))  # r >= min(in, out)
    both(lambda lib: dict(target_modules=["conv"], kasa_config=lib.KasaConfig(), r=2))
    both(lambda lib: dict(target_modules=["conv"], init_lora_weights="mica", r=2))
    both(lambda lib: dict(target_modules=["lin0"], kasa_config=lib.KasaConfig(), use_dora=True, r=2))
    both(lambda lib: dict(target_modules=["lin0"], init_lora_weights="mica", lora_bias=True))
    for first, second in [(True, False), (False, True)]:
        errs = []
        for lib in (peft, peft_fast):
            kasa = lambda on: dict(kasa_config=lib.KasaConfig()) if on else {}  # noqa: E731
            model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(target_modules=["lin0"], r=2, **kasa(first)))
            with pytest.raises(ValueError) as e:
                model.add_adapter("b", lib.LoraConfig(target_modules=["lin0"], r=2, **kasa(second)))
            errs.append(str(e.value))
        assert errs[0] == errs[1]
    for lib in (peft, peft_fast):
        with pytest.raises(ValueError, match="beta"):
            lib.KasaConfig(beta=-1)
        with pytest.raises(ValueError, match="num_samples"):
            lib.MontecloraConfig(num_samples=0)


@pytest.mark.parametrize("variant", ["kasa", "mica", "monteclora"])
def test_mixed_adapter_batch_matches_peft(base, variant):
    x = torch.randint(0, 30, (4, 5))
    outs = []
    for lib in (peft, peft_fast):
        model = _build(lib, variant, base)
        model.add_adapter("other", lib.LoraConfig(**_variants(lib)[variant]))
        _perturb(model)
        model.eval()
        with torch.no_grad():
            outs.append(model(x, adapter_names=["default", "other", "__base__", "other"]))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
