"""LoRA on nn.Parameters (`LoraConfig.target_parameters`, lora.ParamWrapper) against real peft:
same seeds -> same initial weights, outputs, gradients, saved tensors, merged weights; PEFT's errors.

Models: a hand-written MoE block (3d expert stacks in PEFT's default [E, out, in] layout and the
transposed [E, in, out] one, plus a 2d parameter on the same module, so wrappers nest) and tiny
GptOss / Llama4 built from configs (the MoE models PEFT's own tests download).
"""
from __future__ import annotations

import re

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peft_fast
from peft_fast.tuners.lora.layer import ParamWrapper, _LoraFactorsProxy

LIBS = (peft, peft_fast)


class Experts(nn.Module):
    """E experts, weights read straight from the parameters (no nn.Linear to wrap)."""

    def __init__(self, num_experts=3, dim=6, hidden=5, transposed=False):
        super().__init__()
        self.is_transposed = transposed
        up = (num_experts, dim, 2 * hidden) if transposed else (num_experts, 2 * hidden, dim)
        down = (num_experts, hidden, dim) if transposed else (num_experts, dim, hidden)
        self.gate_up_proj = nn.Parameter(torch.randn(up) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(down) * 0.3)
        self.router = nn.Parameter(torch.randn(num_experts, dim) * 0.3)  # 2d [out, in]

    def forward(self, x):  # [B, T, dim]
        probs = F.softmax(x @ self.router.T, dim=-1)  # [B, T, E]
        xe = x.flatten(0, 1).unsqueeze(0).expand(self.gate_up_proj.shape[0], -1, -1)  # [E, N, dim]
        up = self.gate_up_proj if self.is_transposed else self.gate_up_proj.transpose(1, 2)
        a, b = torch.bmm(xe, up).chunk(2, dim=-1)
        down = self.down_proj if self.is_transposed else self.down_proj.transpose(1, 2)
        y = torch.bmm(F.silu(a) * b, down)  # [E, N, dim]
        return (y.permute(1, 0, 2) * probs.flatten(0, 1).unsqueeze(-1)).sum(1).view_as(x)


class MoeModel(nn.Module):
    def __init__(self, transposed=False):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.experts = Experts(transposed=transposed)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.experts(self.emb(x)))


def _make(lib, factory, config_kwargs, seed=0):
    torch.manual_seed(seed)
    model = factory()
    torch.manual_seed(seed + 1)  # adapter init
    return lib.get_peft_model(model, lib.LoraConfig(**config_kwargs))


def _pair(factory, config_kwargs):
    return [_make(lib, factory, config_kwargs) for lib in LIBS]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


X = torch.tensor([[1, 4, 7, 2], [3, 0, 9, 5]])

ALL_THREE = ["experts.gate_up_proj", "experts.down_proj", "experts.router"]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("targets", [["experts.gate_up_proj"], ALL_THREE, ["router"]])
@pytest.mark.parametrize("init", [True, False])
def test_outputs_gradients_state_dict_equal_peft(transposed, targets, init):
    kwargs = dict(target_modules=["head"], target_parameters=targets, init_lora_weights=init, r=2, lora_alpha=5)
    ref, fast = _pair(lambda: MoeModel(transposed), kwargs)
    assert type(fast.base_model.model.experts).__name__ == "ParamWrapper"
    assert fast.base_model.targeted_parameter_names == ref.base_model.targeted_parameter_names
    sd_ref, sd_fast = peft.get_peft_model_state_dict(ref), peft_fast.get_peft_model_state_dict(fast)
    assert sd_ref.keys() == sd_fast.keys()
    for k in sd_ref:
        torch.testing.assert_close(sd_fast[k], sd_ref[k], rtol=0, atol=0)
    out_ref, out_fast = ref(X), fast(X)
    torch.testing.assert_close(out_fast, out_ref, rtol=0, atol=0)
    out_ref.square().sum().backward()
    out_fast.square().sum().backward()
    g_ref, g_fast = _grads(ref), _grads(fast)
    assert g_ref.keys() == g_fast.keys() and len(g_ref) == 2 * (len(targets) + 1)
    for k in g_ref:
        torch.testing.assert_close(g_fast[k], g_ref[k])
    assert [n for n, p in fast.named_parameters() if p.requires_grad] == \
        [n for n, p in ref.named_parameters() if p.requires_grad]
    # the parametrization is gone after the forward: the parameter reads as the base value
    assert not hasattr(fast.base_model.model.experts.get_base_layer(), "parametrizations")


@pytest.mark.parametrize("transposed", [False, True])
def test_merge_unmerge_unload_equal_peft(transposed):
    kwargs = dict(target_modules=[], target_parameters=ALL_THREE, init_lora_weights=False, r=3)
    ref, fast = _pair(lambda: MoeModel(transposed), kwargs)
    before = fast(X).detach()
    fast.merge_adapter()
    torch.testing.assert_close(fast(X), before, atol=1e-5, rtol=1e-5)
    fast.unmerge_adapter()
    torch.testing.assert_close(fast(X), before, atol=1e-6, rtol=1e-6)
    merged_ref, merged_fast = ref.merge_and_unload(), fast.merge_and_unload()
    assert type(merged_fast.experts) is Experts and not any(isinstance(m, ParamWrapper) for m in merged_fast.modules())
    for (n1, p1), (n2, p2) in zip(merged_ref.named_parameters(), merged_fast.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p2, p1, rtol=0, atol=1e-7)
    torch.testing.assert_close(merged_fast(X), before, atol=1e-5, rtol=1e-5)


def test_disable_adapter_and_unload_give_base_outputs():
    kwargs = dict(target_modules=[], target_parameters=ALL_THREE, init_lora_weights=False)
    torch.manual_seed(0)
    base_out = MoeModel()(X)
    fast = _make(peft_fast, MoeModel, kwargs)
    assert not torch.allclose(fast(X), base_out)
    with fast.disable_adapter():
        torch.testing.assert_close(fast(X), base_out, rtol=0, atol=0)
    torch.testing.assert_close(fast.unload()(X), base_out, rtol=0, atol=0)


def test_second_adapter_reuses_wrappers_and_save_load_cross(tmp_path):
    kwargs = dict(target_modules=[], target_parameters=ALL_THREE, init_lora_weights=False)
    models = _pair(MoeModel, kwargs)
    outs = []
    for lib, m in zip(LIBS, models):
        n_wrappers = sum(isinstance(x, (ParamWrapper, peft.tuners.lora.layer.ParamWrapper)) for x in m.modules())
        torch.manual_seed(5)
        m.add_adapter("other", lib.LoraConfig(**kwargs))
        assert sum(isinstance(x, (ParamWrapper, peft.tuners.lora.layer.ParamWrapper)) for x in m.modules()) \
            == n_wrappers == 3
        m.set_adapter("other")
        outs.append(m(X).detach())
        m.save_pretrained(tmp_path / lib.__name__)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    # peft's files load into peft_fast ('other' first, then 'default') and give peft's outputs
    torch.manual_seed(0)
    loaded = peft_fast.PeftModel.from_pretrained(MoeModel(), tmp_path / "peft" / "other", adapter_name="other")
    result = loaded.load_adapter(tmp_path / "peft", adapter_name="default")
    assert not result.missing_keys and not result.unexpected_keys
    loaded.set_adapter("other")
    torch.testing.assert_close(loaded(X), outs[0], rtol=0, atol=0)
    # and peft_fast's saved tensors equal peft's
    from safetensors.torch import load_file

    for sub in ("", "other"):
        a = load_file(tmp_path / "peft" / sub / "adapter_model.safetensors")
        b = load_file(tmp_path / "peft_fast" / sub / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


def test_single_adapter_3d_folds_with_baddbmm(monkeypatch):
    calls = []
    orig = _LoraFactorsProxy.forward
    monkeypatch.setattr(_LoraFactorsProxy, "forward", lambda self, W: calls.append(W.shape) or orig(self, W))
    fast = _make(peft_fast, MoeModel, dict(target_modules=[], target_parameters=["gate_up_proj"],
                                            init_lora_weights=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(X)
    assert calls and out.dtype == torch.bfloat16


def _tiny_moe(kind):
    from transformers import GptOssConfig, GptOssForCausalLM, Llama4ForCausalLM, Llama4TextConfig

    common = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, num_local_experts=4)
    if kind == "gptoss":
        return GptOssForCausalLM(GptOssConfig(num_experts_per_tok=2, layer_types=["full_attention"] * 2, **common))
    return Llama4ForCausalLM(Llama4TextConfig(intermediate_size_mlp=24, num_experts_per_tok=1, **common)).eval()


@pytest.mark.parametrize("kind, targets", [
    ("gptoss", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    ("llama4", ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]),
])
def test_transformers_moe_models_equal_peft(kind, targets):
    pytest.importorskip("transformers")
    ref, fast = _pair(lambda: _tiny_moe(kind), dict(target_modules=[], target_parameters=targets,
                                                      init_lora_weights=False))
    x = torch.arange(10).view(2, 5)
    out_ref, out_fast = ref(x).logits, fast(x).logits
    torch.testing.assert_close(out_fast, out_ref, rtol=0, atol=0)
    out_ref.sum().backward()
    out_fast.sum().backward()
    g_ref, g_fast = _grads(ref), _grads(fast)
    assert g_ref.keys() == g_fast.keys() and len(g_ref) == 2 * 2 * len(targets)
    for k in g_ref:
        torch.testing.assert_close(g_fast[k], g_ref[k])


# ---- errors: PEFT's types and texts ------------------------------------------------------------
def _raises_same(fn, exc=ValueError):
    msgs = []
    for lib in LIBS:
        with pytest.raises(exc) as info:
            fn(lib)
        msgs.append(str(info.value))
    assert msgs[0] == msgs[1], msgs


def test_top_level_parameter_refused():
    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.param = nn.Parameter(torch.zeros(10, 10))

    _raises_same(lambda lib: lib.get_peft_model(Top(), lib.LoraConfig(target_parameters=["param"])))


@pytest.mark.parametrize("bad", [dict(lora_dropout=0.1), dict(use_dora=True), dict(lora_bias=True),
                                 dict(fan_in_fan_out=True)])
def test_unsupported_options_refused(bad):
    _raises_same(lambda lib: lib.get_peft_model(MoeModel(), lib.LoraConfig(target_parameters=["router"], **bad)))


def test_config_and_multi_adapter_errors():
    _raises_same(lambda lib: lib.LoraConfig(target_parameters="router"), TypeError)

    def different_targets(lib):
        m = lib.get_peft_model(MoeModel(), lib.LoraConfig(target_parameters=["router"]))
        m.add_adapter("b", lib.LoraConfig(target_parameters=["down_proj"]))

    _raises_same(different_targets)

    def module_and_param(lib):
        lib.get_peft_model(MoeModel(), lib.LoraConfig(target_modules=["experts"], target_parameters=["router"]))

    with pytest.raises(ValueError):  # peft: 'not supported' for the module, then the wrap refusal
        module_and_param(peft_fast)

    def weighted(lib):
        m = lib.get_peft_model(MoeModel(), lib.LoraConfig(target_parameters=["router"]))
        m.add_adapter("b", lib.LoraConfig(target_parameters=["router"]))
        m.add_weighted_adapter(["default", "b"], [1.0, 1.0], "m", combination_type="linear")

    _raises_same(weighted)

    def mixed_batch(lib):
        m = lib.get_peft_model(MoeModel(), lib.LoraConfig(target_parameters=["router"]))
        m(X, adapter_names=["default", "default"])

    _raises_same(mixed_batch, (ValueError, TypeError))


def test_no_parameter_matched_warns_and_nothing_matched_raises():
    with pytest.warns(RuntimeWarning, match=re.escape("were set but no parameter was matched")):
        peft_fast.get_peft_model(MoeModel(), peft_fast.LoraConfig(target_modules=["head"],
                                                                 target_parameters=["nope"]))
    with pytest.raises(ValueError, match="No `target_modules` passed but also no `target_parameters` found"):
        peft_fast.get_peft_model(MoeModel(), peft_fast.LoraConfig(target_modules=[], target_parameters=["nope"]))


def test_parametrization_cached_within_a_forward(monkeypatch):
    # as in peft: one call when the parametrization is registered, one cached for the whole forward,
    # however often the module reads the parameter
    calls = []
    orig = _LoraFactorsProxy.forward
    monkeypatch.setattr(_LoraFactorsProxy, "forward", lambda self, W: calls.append(1) or orig(self, W))
    fast = _make(peft_fast, MoeModel, dict(target_modules=[], target_parameters=["gate_up_proj", "down_proj"],
                                            init_lora_weights=False))
    with torch.inference_mode():
        for _ in range(3):
            fast(X)
    assert len(calls) == 3 * 2 * 2


def test_rank_alpha_patterns_modules_to_save_and_adapter_lifecycle_equal_peft():
    results = []
    for lib in LIBS:
        torch.manual_seed(0)
        model = MoeModel()
        torch.manual_seed(1)
        pm = lib.get_peft_model(model, lib.LoraConfig(
            target_modules=[], target_parameters=ALL_THREE, rank_pattern={"gate_up_proj": 5},
            alpha_pattern={"router": 3}, modules_to_save=["head"], init_lora_weights=False))
        torch.manual_seed(2)
        pm.add_adapter("b", lib.LoraConfig(target_modules=[], target_parameters=ALL_THREE, init_lora_weights=False))
        outs = [pm(X)]
        pm.set_adapter("b")
        outs.append(pm(X))
        pm.delete_adapter("default")
        outs.append(pm(X))
        results.append((outs, {n: tuple(p.shape) for n, p in pm.named_parameters()},
                        [n for n, p in pm.named_parameters() if p.requires_grad]))
    (o_ref, s_ref, g_ref), (o_fast, s_fast, g_fast) = results
    for a, b in zip(o_ref, o_fast):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert s_fast == s_ref and g_fast == g_ref
