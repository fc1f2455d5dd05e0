"""PEFT's user-facing model API on peft_fast: merge/unmerge/unload, adapter management,
add_weighted_adapter, state dicts, save/load, generate, on a tiny Llama and a tiny MLP for
LoRA, DoRA and (IA)^3. Where PEFT's semantics are subtle, real `peft` on identical models
and weights is the oracle."""
from __future__ import annotations

import contextlib
import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import peft_fast
from peft_fast.tuners.tuners_utils import BaseTunerLayer

peft = pytest.importorskip("peft")

METHODS = ["lora", "dora", "ia3"]
ARCHS = ["llama", "mlp"]


# --------------------------------------------------------------------------------------------
# tiny models, configs, inputs
# --------------------------------------------------------------------------------------------
class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(12, 24)
        self.act = nn.Tanh()
        self.lin1 = nn.Linear(24, 20)
        self.lin2 = nn.Linear(20, 3)

    def forward(self, x):
        return self.lin2(self.act(self.lin1(self.act(self.lin0(x)))))


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def build_base(arch: str, seed: int = 0) -> nn.Module:
    if arch == "llama":
        return tiny_llama(seed)
    torch.manual_seed(seed)
    return TinyMLP().eval()


TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "mlp": ["lin0", "lin1"]}
FEEDFORWARD = {"llama": ["down_proj"], "mlp": ["lin1"]}


def make_config(lib, method: str, arch: str, r: int = 4, **kw):
    if method == "ia3":
        return lib.IA3Config(target_modules=list(TARGETS[arch]), feedforward_modules=list(FEEDFORWARD[arch]), **kw)
    return lib.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS[arch]), init_lora_weights=False,
                          use_dora=method == "dora", **kw)


def perturb(model: nn.Module, adapter: str, seed: int) -> None:
    """Move (IA)^3 vectors and DoRA magnitudes off their identity init (LoRA A and B are
    already random with init_lora_weights=False): adapters must change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{adapter}" not in name:
                continue
            if "ia3_l" in name or "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))


def inputs_for(arch: str, seed: int = 0):
    g = torch.Generator().manual_seed(100 + seed)
    if arch == "llama":
        return {"input_ids": torch.randint(3, 100, (2, 7), generator=g)}
    return {"x": torch.randn(5, 12, generator=g)}


@torch.no_grad()
def out(model: nn.Module, arch: str, inp: dict) -> torch.Tensor:
    if arch == "llama":
        return model(**inp).logits
    return model(inp["x"])


def make_peft_model(lib, method, arch, seed=0, adapter_seed=1, **kw):
    base = build_base(arch, seed)
    torch.manual_seed(adapter_seed)
    pm = lib.get_peft_model(base, make_config(lib, method, arch, **kw))
    perturb(pm, "default", adapter_seed)
    return pm


def add_second(pm, lib, method, arch, name="other", seed=2, r=4):
    torch.manual_seed(seed)
    pm.add_adapter(name, make_config(lib, method, arch, r=r))
    perturb(pm, name, seed)


def twin_models(method, arch, seed=0):
    """The same model with adapter 'default' built by peft and peft_fast, identical weights."""
    ref = make_peft_model(peft, method, arch, seed)
    fast = make_peft_model(peft_fast, method, arch, seed)
    res = fast.load_state_dict(ref.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    return ref, fast


def assert_close(a, b, rel=1e-5, msg=""):
    assert a.shape == b.shape, msg
    scale = b.abs().max().item()
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * max(scale, 1e-6), msg=msg or None)


def tuner_layers(model):
    """Adapter layers of a peft_fast or a peft model."""
    from peft.tuners.tuners_utils import BaseTunerLayer as PeftBaseTunerLayer

    return [m for m in model.modules() if isinstance(m, (BaseTunerLayer, PeftBaseTunerLayer))]


combos = pytest.mark.parametrize("method,arch", [(m, a) for m in METHODS for a in ARCHS],
                                 ids=[f"{m}-{a}" for m in METHODS for a in ARCHS])


# --------------------------------------------------------------------------------------------
# merge / unmerge / unload
# --------------------------------------------------------------------------------------------
@combos
def test_merge_unmerge_round_trip(method, arch):
    pm = make_peft_model(peft_fast, method, arch)
    inp = inputs_for(arch)
    base_sd = {k: v.clone() for k, v in pm.get_base_model().state_dict().items() if "base_layer" in k}
    y_base = None
    with pm.disable_adapter():
        y_base = out(pm, arch, inp)
    y = out(pm, arch, inp)
    assert (y - y_base).abs().max() > 1e-3, "adapter does not change the output: test would prove nothing"
    pm.merge_adapter()
    assert all(layer.merged for layer in tuner_layers(pm))
    merged_sd = pm.get_base_model().state_dict()
    assert any(not torch.equal(merged_sd[k], v) for k, v in base_sd.items()), "merge did not touch the weights"
    assert_close(out(pm, arch, inp), y, msg="merged output")
    pm.unmerge_adapter()
    assert not any(layer.merged for layer in tuner_layers(pm))
    sd = pm.get_base_model().state_dict()
    for k, v in base_sd.items():
        assert_close(sd[k], v, rel=1e-5, msg=f"{k} not restored by unmerge")
    assert_close(out(pm, arch, inp), y, msg="output after unmerge")


@combos
@pytest.mark.parametrize("safe_merge", [False, True], ids=["plain", "safe"])
def test_merge_and_unload_equals_adapter_output(method, arch, safe_merge):
    pm = make_peft_model(peft_fast, method, arch)
    inp = inputs_for(arch)
    y = out(pm, arch, inp)
    merged = pm.merge_and_unload(safe_merge=safe_merge)
    assert not tuner_layers(merged)
    assert not isinstance(merged, peft_fast.PeftModel)
    assert_close(out(merged, arch, inp), y, msg="merge_and_unload output")


@combos
def test_merge_and_unload_adapter_names(method, arch):
    pm = make_peft_model(peft_fast, method, arch)
    add_second(pm, peft_fast, method, arch)
    inp = inputs_for(arch)
    only_other = copy.deepcopy(pm)
    only_other.set_adapter("other")
    y_other = out(only_other, arch, inp)
    y_default = out(pm, arch, inp)
    assert (y_other - y_default).abs().max() > 1e-3
    merged = pm.merge_and_unload(adapter_names=["other"])
    assert not tuner_layers(merged)
    assert_close(out(merged, arch, inp), y_other, msg="merge_and_unload(adapter_names=['other'])")


@combos
def test_merge_with_two_active_adapters(method, arch):
    pm = make_peft_model(peft_fast, method, arch)
    add_second(pm, peft_fast, method, arch)
    pm.base_model.set_adapter(["default", "other"])
    inp = inputs_for(arch)
    y = out(pm, arch, inp)
    pm.merge_adapter()
    assert_close(out(pm, arch, inp), y, msg="merged (2 adapters)")
    pm.unmerge_adapter()
    assert_close(out(pm, arch, inp), y, msg="unmerged (2 adapters)")


@combos
def test_disable_adapter_context_equals_base(method, arch):
    base = build_base(arch)
    inp = inputs_for(arch)
    y_base = out(base, arch, inp)
    torch.manual_seed(1)
    pm = peft_fast.get_peft_model(base, make_config(peft_fast, method, arch))
    perturb(pm, "default", 1)
    y = out(pm, arch, inp)
    assert (y - y_base).abs().max() > 1e-3
    with pm.disable_adapter():
        torch.testing.assert_close(out(pm, arch, inp), y_base, rtol=0, atol=0)
        assert not any(p.requires_grad for n, p in pm.named_parameters() if "default" in n)
    assert_close(out(pm, arch, inp), y, msg="adapter output after leaving disable_adapter()")
    assert all(p.requires_grad for n, p in pm.named_parameters() if ".default" in n)
    # also when merged: disabling gives the base output
    pm.merge_adapter()
    with pm.disable_adapter():
        assert_close(out(pm, arch, inp), y_base, msg="disable_adapter() on a merged model")


@combos
def test_enable_disable_adapter_layers(method, arch):
    base = build_base(arch)
    inp = inputs_for(arch)
    y_base = out(base, arch, inp)
    torch.manual_seed(1)
    pm = peft_fast.get_peft_model(base, make_config(peft_fast, method, arch))
    perturb(pm, "default", 1)
    y = out(pm, arch, inp)
    pm.base_model.disable_adapter_layers()
    assert all(layer.disable_adapters for layer in tuner_layers(pm))
    torch.testing.assert_close(out(pm, arch, inp), y_base, rtol=0, atol=0)
    pm.base_model.enable_adapter_layers()
    assert not any(layer.disable_adapters for layer in tuner_layers(pm))
    assert_close(out(pm, arch, inp), y)


@combos
def test_unload_restores_original_exactly(method, arch):
    base = build_base(arch)
    inp = inputs_for(arch)
    sd0 = {k: v.clone() for k, v in base.state_dict().items()}
    modules0 = {n: m for n, m in base.named_modules()}
    y_base = out(base, arch, inp)
    torch.manual_seed(1)
    pm = peft_fast.get_peft_model(base, make_config(peft_fast, method, arch))
    perturb(pm, "default", 1)
    # a few training steps on the adapter must leave the base untouched
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    pm.train()
    for _ in range(2):
        opt.zero_grad()
        if arch == "llama":
            loss = pm(**inp, labels=inp["input_ids"]).loss
        else:
            loss = pm(inp["x"]).pow(2).mean()
        loss.backward()
        opt.step()
    unloaded = pm.unload()
    assert unloaded is base
    assert not tuner_layers(unloaded)
    sd1 = unloaded.state_dict()
    assert list(sd1) == list(sd0)
    for k in sd0:
        assert sd1[k].dtype == sd0[k].dtype and torch.equal(sd1[k], sd0[k]), k
    mods1 = dict(unloaded.named_modules())
    assert list(mods1) == list(modules0)
    for n, m in mods1.items():
        assert m is modules0[n], f"module {n!r} is not the original object"
    unloaded.eval()
    torch.testing.assert_close(out(unloaded, arch, inp), y_base, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# adapter management
# --------------------------------------------------------------------------------------------
@combos
def test_add_set_active_adapter(method, arch):
    pm = make_peft_model(peft_fast, method, arch)
    add_second(pm, peft_fast, method, arch)
    assert set(pm.peft_config) == {"default", "other"}
    assert pm.active_adapters == ["default"]  # a new adapter is not activated
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".default" in n for n in trainable)
    pm.set_adapter("other")
    assert pm.active_adapter == "other" and pm.active_adapters == ["other"]
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    for layer in tuner_layers(pm):
        assert layer.active_adapters == ["other"]
    # reference: a fresh model holding only 'other' (same weights, renamed) gives the same output
    inp = inputs_for(arch)
    ref = peft_fast.get_peft_model(build_base(arch), make_config(peft_fast, method, arch))
    sd = {k.replace(".other.", ".default.").replace(".other", ".default"): v
          for k, v in pm.state_dict().items() if ".default" not in k}
    ref.load_state_dict(sd, strict=True)
    assert_close(out(pm, arch, inp), out(ref, arch, inp), msg="set_adapter('other') output")
    pm.set_adapter("default")
    assert pm.active_adapter == "default"
    assert not torch.allclose(out(pm, arch, inp), out(ref, arch, inp))


@pytest.mark.parametrize("method", METHODS)
def test_active_adapter_stays_str_after_add_adapter(method):
    """PEFT: PeftModel.active_adapter is the adapter's name (a str) and indexes peft_config."""
    for lib in (peft, peft_fast):
        pm = make_peft_model(lib, method, "mlp")
        assert pm.active_adapter == "default", f"{lib.__name__}: active_adapter is {pm.active_adapter!r}"
        add_second(pm, lib, method, "mlp")
        assert pm.active_adapter == "default", \
            f"{lib.__name__}: active_adapter is {pm.active_adapter!r} after add_adapter"
        assert pm.peft_config[pm.active_adapter] is pm.active_peft_config
        pm.set_adapter("other")
        assert pm.active_adapter == "other"


@combos
def test_delete_adapter_frees_parameters(method, arch):
    pm = make_peft_model(peft_fast, method, arch)
    add_second(pm, peft_fast, method, arch)
    refs = [weakref.ref(p) for n, p in pm.named_parameters() if ".other" in n]
    assert refs
    pm.delete_adapter("other")
    assert "other" not in pm.peft_config
    assert not [n for n in pm.state_dict() if ".other" in n]
    assert not [n for n, _ in pm.named_modules() if n.endswith(".other")]
    for layer in tuner_layers(pm):
        assert "other" not in layer._all_available_adapter_names()
    gc.collect()
    assert all(r() is None for r in refs), "parameters of the deleted adapter are still referenced"
    assert pm.active_adapter == "default"


@combos
def test_delete_active_adapter_switches_like_peft(method, arch):
    results = []
    for lib in (peft, peft_fast):
        pm = make_peft_model(lib, method, arch)
        add_second(pm, lib, method, arch)
        add_second(pm, lib, method, arch, name="third", seed=3)
        pm.set_adapter("other")
        with pytest.warns(UserWarning) if lib is peft else contextlib.nullcontext():
            pm.delete_adapter("other")
        trainable = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
        results.append((pm.active_adapter, pm.active_adapters, sorted(pm.peft_config), trainable,
                        [layer.active_adapters for layer in tuner_layers(pm)]))
    assert results[1] == results[0]


@combos
def test_several_active_adapters_match_peft(method, arch):
    inp = inputs_for(arch)
    ref, fast = twin_models(method, arch)
    for lib, pm in ((peft, ref), (peft_fast, fast)):
        add_second(pm, lib, method, arch)
    fast.load_state_dict(ref.state_dict(), strict=True)
    for pm in (ref, fast):
        pm.base_model.set_adapter(["default", "other"])
    assert fast.active_adapters == ["default", "other"]
    assert_close(out(fast, arch, inp), out(ref, arch, inp), msg="two active adapters vs peft")


def test_several_active_lora_adapters_sum_at_layer():
    pm = make_peft_model(peft_fast, "lora", "mlp")
    add_second(pm, peft_fast, "lora", "mlp", r=7)
    pm.base_model.set_adapter(["default", "other"])
    layer = pm.base_model.model.lin0
    x = torch.randn(6, 12)
    expected = layer.base_layer(x)
    for a in ("default", "other"):
        expected = expected + layer.scaling[a] * x @ layer.lora_A[a].weight.t() @ layer.lora_B[a].weight.t()
    with torch.no_grad():
        assert_close(layer(x), expected.detach(), msg="sum of two LoRA adapters")


def test_several_active_ia3_adapters_multiply_at_layer():
    pm = make_peft_model(peft_fast, "ia3", "mlp")
    add_second(pm, peft_fast, "ia3", "mlp")
    pm.base_model.set_adapter(["default", "other"])
    x = torch.randn(6, 12)
    out_layer = pm.base_model.model.lin0  # output-feature layer
    l = out_layer.ia3_l["default"].flatten() * out_layer.ia3_l["other"].flatten()
    with torch.no_grad():
        assert_close(out_layer(x), out_layer.base_layer(x) * l, msg="IA3 output layer, 2 adapters")
    ff = pm.base_model.model.lin1  # feed-forward layer
    h = torch.randn(6, 24)
    l = ff.ia3_l["default"].flatten() * ff.ia3_l["other"].flatten()
    with torch.no_grad():
        assert_close(ff(h), ff.base_layer(h * l), msg="IA3 feed-forward layer, 2 adapters")


# --------------------------------------------------------------------------------------------
# add_weighted_adapter vs peft
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd"])
def test_add_weighted_adapter_matches_peft(arch, combination_type):
    ref, fast = twin_models("lora", arch)
    for lib, pm in ((peft, ref), (peft_fast, fast)):
        add_second(pm, lib, "lora", arch, name="b", r=4)
    fast.load_state_dict(ref.state_dict(), strict=True)
    weights = [0.7, -0.4]
    for pm in (ref, fast):
        pm.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=combination_type)
    cref, cfast = ref.peft_config["mix"], fast.peft_config["mix"]
    assert (cfast.r, cfast.lora_alpha) == (cref.r, cref.lora_alpha)
    assert set(cfast.target_modules) == set(cref.target_modules)
    ref_layers = {n: m for n, m in ref.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    fast_layers = {n: m for n, m in fast.named_modules() if isinstance(m, BaseTunerLayer)}
    assert set(ref_layers) == set(fast_layers)
    for n, lf in fast_layers.items():
        lr = ref_layers[n]
        assert "mix" in lf.lora_A
        assert lf.lora_A["mix"].weight.shape == lr.lora_A["mix"].weight.shape
        assert not lf.lora_A["mix"].weight.requires_grad
        dref = lr.get_delta_weight("mix")
        assert dref.abs().max() > 0
        assert_close(lf.get_delta_weight("mix"), dref, rel=1e-4, msg=f"{n} delta weight")
        if combination_type != "svd":  # svd factors are defined up to sign; the delta is not
            assert_close(lf.lora_A["mix"].weight, lr.lora_A["mix"].weight, msg=f"{n} lora_A")
            assert_close(lf.lora_B["mix"].weight, lr.lora_B["mix"].weight, msg=f"{n} lora_B")
    inp = inputs_for(arch)
    for pm in (ref, fast):
        pm.set_adapter("mix")
    assert_close(out(fast, arch, inp), out(ref, arch, inp), rel=1e-4, msg="output with the weighted adapter")


def test_add_weighted_adapter_cat_is_exact_sum():
    """cat concatenates ranks: its delta is exactly w1*delta1 + w2*delta2 (mixed ranks)."""
    pm = make_peft_model(peft_fast, "lora", "mlp")
    add_second(pm, peft_fast, "lora", "mlp", name="b", r=6)
    pm.add_weighted_adapter(["default", "b"], [0.5, 2.0], "cat", combination_type="cat")
    assert pm.peft_config["cat"].r == 10
    for layer in tuner_layers(pm):
        expected = 0.5 * layer.get_delta_weight("default") + 2.0 * layer.get_delta_weight("b")
        assert_close(layer.get_delta_weight("cat"), expected)


# --------------------------------------------------------------------------------------------
# trainable parameter counts, injection, state dicts
# --------------------------------------------------------------------------------------------
@combos
def test_trainable_parameters_equal_peft(method, arch, capsys):
    counts, printed = [], []
    for lib in (peft, peft_fast):
        pm = make_peft_model(lib, method, arch)
        counts.append(pm.get_nb_trainable_parameters())
        capsys.readouterr()
        pm.print_trainable_parameters()
        printed.append(capsys.readouterr().out)
    assert counts[1] == counts[0]
    assert counts[1][0] > 0
    assert printed[1] == printed[0]


@combos
def test_inject_adapter_in_model_matches_peft(method, arch):
    inp = inputs_for(arch)
    models = []
    for lib in (peft, peft_fast):
        base = build_base(arch)
        torch.manual_seed(1)
        m = lib.inject_adapter_in_model(make_config(lib, method, arch), base)
        assert m is base
        perturb(m, "default", 1)
        models.append(m)
    ref, fast = models
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert {n for n, p in fast.named_parameters() if p.requires_grad} == \
        {n for n, p in ref.named_parameters() if p.requires_grad}
    assert tuner_layers(fast) and not isinstance(fast, peft_fast.PeftModel)
    fast.load_state_dict(ref.state_dict())
    assert_close(out(fast, arch, inp), out(ref, arch, inp), msg="injected model output")


@combos
def test_peft_model_state_dict_round_trip(method, arch):
    ref, fast = twin_models(method, arch)
    sd_ref = peft.get_peft_model_state_dict(ref)
    sd = peft_fast.get_peft_model_state_dict(fast)
    assert sorted(sd) == sorted(sd_ref)
    for k in sd:
        torch.testing.assert_close(sd[k], sd_ref[k], rtol=0, atol=0)
    # load into a model whose adapter weights differ
    other = make_peft_model(peft_fast, method, arch, adapter_seed=9)
    inp = inputs_for(arch)
    assert not torch.allclose(out(other, arch, inp), out(fast, arch, inp))
    result = peft_fast.set_peft_model_state_dict(other, sd)
    assert not result.unexpected_keys and not result.missing_keys
    assert_close(out(other, arch, inp), out(fast, arch, inp), msg="after set_peft_model_state_dict")
    sd2 = peft_fast.get_peft_model_state_dict(other)
    assert sorted(sd2) == sorted(sd)
    for k in sd:
        torch.testing.assert_close(sd2[k], sd[k], rtol=0, atol=0)
    # and into a second adapter name of the same model
    add_second(other, peft_fast, method, arch, name="copied", seed=11)
    peft_fast.set_peft_model_state_dict(other, sd, adapter_name="copied")
    other.set_adapter("copied")
    assert_close(out(other, arch, inp), out(fast, arch, inp), msg="state dict loaded under another name")


# --------------------------------------------------------------------------------------------
# drop-in usage, save/load, generate
# --------------------------------------------------------------------------------------------
def _user_script(lib, tmp_path):
    """Code written for `import peft`, run with `import peft_fast as peft` too."""
    base = tiny_llama(0)
    config = lib.LoraConfig(task_type=lib.TaskType.CAUSAL_LM, r=4, lora_alpha=16, lora_dropout=0.0,
                            target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    model = lib.get_peft_model(base, config)
    assert isinstance(model, lib.PeftModel)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = inputs_for("llama")["input_ids"]
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.save_pretrained(str(tmp_path))
    loaded = lib.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path))
    loaded_cfg = lib.PeftConfig.from_pretrained(str(tmp_path))
    model.eval()
    with torch.no_grad():
        y = model(input_ids=ids).logits
        y_loaded = loaded(input_ids=ids).logits
    return losses, y, y_loaded, loaded_cfg


def test_import_peft_fast_as_peft(tmp_path):
    import peft_fast as peft_alias

    for name in ("LoraConfig", "IA3Config", "PeftConfig", "PeftModel", "PeftModelForCausalLM", "TaskType",
                 "PeftType", "get_peft_model", "inject_adapter_in_model", "get_peft_model_state_dict",
                 "set_peft_model_state_dict", "load_peft_weights", "get_peft_config", "AutoPeftModelForCausalLM",
                 "LoraModel", "IA3Model"):
        assert hasattr(peft_alias, name), name
    losses_r, y_r, yl_r, cfg_r = _user_script(peft, tmp_path / "peft")
    losses_f, y_f, yl_f, cfg_f = _user_script(peft_alias, tmp_path / "fast")
    torch.testing.assert_close(torch.tensor(losses_f), torch.tensor(losses_r), rtol=1e-4, atol=1e-5)
    assert losses_f[-1] < losses_f[0]
    assert_close(yl_f, y_f, msg="reloaded adapter output")
    assert_close(y_f, y_r, rel=1e-3, msg="trained output vs peft")
    assert isinstance(cfg_f, peft_alias.LoraConfig)
    def summary(c):
        return c.r, c.lora_alpha, set(c.target_modules)

    assert summary(cfg_f) == summary(cfg_r)


@pytest.mark.parametrize("as_enum", [True, False], ids=["enum", "str"])
@pytest.mark.parametrize("task", ["SEQ_CLS", "CAUSAL_LM"])
def test_task_type_selects_task_model_class(task, as_enum):
    """TaskType.SEQ_CLS (the enum, as in PEFT's docs) or "SEQ_CLS" picks
    PeftModelForSequenceClassification, which adds the classification head to modules_to_save:
    same class and trainable names as peft."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    results = []
    for lib in (peft, peft_fast):
        torch.manual_seed(0)
        base = LlamaForSequenceClassification(cfg) if task == "SEQ_CLS" else tiny_llama(0)
        tt = getattr(lib.TaskType, task) if as_enum else task
        pm = lib.get_peft_model(base, lib.LoraConfig(task_type=tt, r=4, target_modules=["q_proj", "v_proj"]))
        trainable = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
        results.append((type(pm).__name__, trainable, pm.get_nb_trainable_parameters()))
    expected = {"SEQ_CLS": "PeftModelForSequenceClassification", "CAUSAL_LM": "PeftModelForCausalLM"}[task]
    assert results[0][0] == expected
    assert results[1][0] == expected, f"get_peft_model(task_type={tt!r}) returned {results[1][0]}"
    if task == "SEQ_CLS":
        assert any("score" in n for n in results[1][1]), "classification head is not trainable"
    assert results[1] == results[0]


@pytest.mark.parametrize("method", METHODS)
def test_from_pretrained_is_trainable(method, tmp_path):
    pm = make_peft_model(peft_fast, method, "llama")
    n_trainable, _ = pm.get_nb_trainable_parameters()
    inp = inputs_for("llama")
    y = out(pm, "llama", inp)
    pm.save_pretrained(str(tmp_path))
    frozen = peft_fast.PeftModel.from_pretrained(build_base("llama"), str(tmp_path))
    assert frozen.get_nb_trainable_parameters()[0] == 0
    assert not frozen.training
    assert_close(out(frozen, "llama", inp), y, msg="from_pretrained output")
    trainable = peft_fast.PeftModel.from_pretrained(build_base("llama"), str(tmp_path), is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == n_trainable > 0
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names == {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable.peft_config["default"].inference_mode is False
    assert_close(out(trainable, "llama", inp), y)
    # a gradient step actually reaches the adapter parameters
    trainable.train()
    ids = inp["input_ids"]
    trainable(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.named_parameters()
               if p.requires_grad)


@pytest.mark.parametrize("method", METHODS)
def test_peft_fast_loads_peft_saved_adapter(method, tmp_path):
    ref, fast = twin_models(method, "llama")
    ref.save_pretrained(str(tmp_path))
    loaded = peft_fast.PeftModel.from_pretrained(build_base("llama"), str(tmp_path))
    inp = inputs_for("llama")
    assert_close(out(loaded, "llama", inp), out(ref, "llama", inp), msg="peft-saved adapter in peft_fast")


@pytest.mark.parametrize("method", METHODS)
def test_generate_tiny_llama(method):
    ref, fast = twin_models(method, "llama")
    ids = inputs_for("llama")["input_ids"]
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
              pad_token_id=0)
    with torch.no_grad():
        gen = fast.generate(**kw)
        gen_ref = ref.generate(**kw)
    assert gen.shape == (2, 7 + 5)
    assert torch.equal(gen[:, :7], ids)
    assert torch.equal(gen, gen_ref)
    merged = fast.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(merged.generate(**kw), gen)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_adapter_batch_lora(arch):
    """adapter_names routes each row of the batch through its own adapter (or the base)."""
    pm = make_peft_model(peft_fast, "lora", arch)
    add_second(pm, peft_fast, "lora", arch)
    pm.eval()
    inp = inputs_for(arch)
    key = "input_ids" if arch == "llama" else "x"
    batch = torch.cat([inp[key], inp[key][:1]], 0)  # 3 rows (llama) / 6 rows (mlp)
    names = (["default", "__base__", "other", "default", "other", "__base__"])[: batch.shape[0]]
    with torch.no_grad():
        mixed = pm(**{key: batch}, adapter_names=names)
        mixed = mixed.logits if arch == "llama" else mixed
        expected = []
        for i, a in enumerate(names):
            row = {key: batch[i:i + 1]}
            if a == "__base__":
                with pm.disable_adapter():
                    expected.append(out(pm, arch, row))
            else:
                pm.set_adapter(a)
                expected.append(out(pm, arch, row))
        pm.set_adapter("default")
    assert_close(mixed, torch.cat(expected, 0), msg="mixed adapter batch")


def test_saved_layout_with_two_adapters_matches_peft(tmp_path):
    ref, fast = twin_models("lora", "mlp")
    for lib, pm in ((peft, ref), (peft_fast, fast)):
        add_second(pm, lib, "lora", "mlp")
    fast.load_state_dict(ref.state_dict(), strict=True)
    layouts = []
    for name, pm in (("ref", ref), ("fast", fast)):
        d = tmp_path / name
        pm.save_pretrained(str(d))
        # peft also writes a README.md model card; the adapter files are what must match
        layouts.append(sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != "README.md"))
    assert layouts[1] == layouts[0]
    loaded = peft_fast.PeftModel.from_pretrained(build_base("mlp"), str(tmp_path / "fast"))
    loaded.load_adapter(str(tmp_path / "fast" / "other"), adapter_name="other")
    inp = inputs_for("mlp")
    for a in ("default", "other"):
        loaded.set_adapter(a)
        ref.set_adapter(a)
        assert_close(out(loaded, "mlp", inp), out(ref, "mlp", inp), msg=f"reloaded adapter {a}")
