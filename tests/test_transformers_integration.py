"""transformers' adapter integration (PreTrainedModel.add_adapter/load_adapter/set_adapter/..., from_pretrained
of an adapter dir, save_pretrained) running on peft_fast through `peft_fast.install_as_peft()`.

Each scenario runs twice: with real peft (alias not installed) and with the alias; the second run must build
peft_fast's layers and give the same numbers. Adapter weights are set from the parameter names (the same
names in both libraries), so both runs hold identical weights. One subprocess test hides real peft.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch

import peft_fast
from tests.alias_helpers import alias

transformers = pytest.importorskip("transformers")
real_peft = pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 128


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def llama(dtype=torch.float32):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def gpt2(dtype=torch.float32):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1,
                                  eos_token_id=2)
    torch.manual_seed(1)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


ARCHS = {"llama": (llama, ["q_proj", "v_proj"], ["k_proj", "down_proj"], ["k_proj", "v_proj", "down_proj"],
                   ["down_proj"]),
         "gpt2": (gpt2, ["c_attn"], ["c_proj"], ["c_attn", "mlp.c_proj"], ["mlp.c_proj"])}


def fill_adapters(model, markers=("lora_", "ia3_"), salt=""):
    """Every adapter parameter gets values drawn from its own name: equal names -> equal weights in both libs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(m in name for m in markers):
                g = torch.Generator().manual_seed(zlib.crc32((salt + name).encode()))
                v = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.3
                if "ia3_" in name:
                    v = 1.0 + v
                p.copy_(v.to(p.dtype))


def batch(seed=0, n=2, t=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, t), generator=g)


def logits(model, x=None):
    with torch.no_grad():
        return model(batch() if x is None else x).logits.float().clone()


def adapter_layer_types(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: type(m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def assert_peft_fast_layers(model, base_cls, expect_fast: bool):
    """The adapted modules are peft_fast's classes (alias) or real peft's (no alias); at least one exists."""
    types = adapter_layer_types(model)
    assert types, "no adapter layer was built"
    for name, cls in types.items():
        assert cls.__module__.startswith("peft_fast." if expect_fast else "peft."), (name, cls)
    if expect_fast:
        assert all(issubclass(cls, base_cls) for cls in types.values())


def compare(fast: dict, real: dict, low_precision: bool = False):
    """Equal values; tensors within fp32 tolerance, or bf16's (relative to the largest value) for 16-bit
    tensors and everything computed under autocast (`low_precision`)."""
    assert fast.keys() == real.keys()
    for k in real:
        a, b = fast[k], real[k]
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype, k
            if low_precision:
                err = float((a.float() - b.float()).abs().max())
                assert err <= 4e-2 * max(1e-6, float(b.float().abs().max())), (k, err)
            elif b.dtype in (torch.bfloat16, torch.float16):
                torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2, msg=k)
            else:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=k)
        else:
            assert a == b, (k, a, b)


def save_peft_adapter(lib, base, targets, path, salt="", **extra):
    """An adapter saved by `lib` (real peft or peft_fast) with name-seeded weights."""
    model = lib.get_peft_model(base, lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **extra))
    fill_adapters(model, salt=salt)
    model.save_pretrained(path)
    return logits(model)


# --------------------------------------------------------------------------------------------------------------
# scenarios: the same calls with either library
# --------------------------------------------------------------------------------------------------------------
def scenario_add_set_enable_delete(arch, on):
    make, t1, t2, ia3_t, ia3_ff = ARCHS[arch]
    out = {}
    with alias(on) as peft:
        model = make()
        out["base"] = logits(model)
        model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=t1))
        assert_peft_fast_layers(model, peft_fast.tuners.lora.layer.LoraLayer, on)
        fill_adapters(model)
        out["default"] = logits(model)
        out["active0"] = model.active_adapters()
        model.add_adapter(peft.LoraConfig(r=2, lora_alpha=4, target_modules=t2), adapter_name="second")
        fill_adapters(model)
        out["active1"] = model.active_adapters()  # add_adapter activates the new one
        out["second"] = logits(model)
        model.set_adapter("default")
        out["active2"] = model.active_adapters()
        out["set_default"] = logits(model)
        model.set_adapter(["default", "second"])
        out["active3"] = model.active_adapters()
        out["both"] = logits(model)
        model.disable_adapters()
        out["disabled"] = logits(model)
        model.enable_adapters()
        out["enabled"] = logits(model)
        sd = model.get_adapter_state_dict("second")
        out["sd_keys"] = sorted(sd)
        for k, v in sd.items():
            out[f"sd:{k}"] = v.clone()
        out["sd_default_keys"] = sorted(model.get_adapter_state_dict("default"))
        model.delete_adapter("second")
        out["after_delete_cfg"] = sorted(model.peft_config)
        out["after_delete_active"] = model.active_adapters()
        out["after_delete"] = logits(model)
        out["after_delete_names"] = sorted(n for n, _ in model.named_parameters() if "lora_" in n)
        model.delete_adapter("default")
        out["hf_loaded"] = model._hf_peft_config_loaded
        # IA3 on a fresh model
        model = make()
        model.add_adapter(peft.IA3Config(target_modules=ia3_t, feedforward_modules=ia3_ff), adapter_name="ia")
        assert_peft_fast_layers(model, peft_fast.tuners.ia3.layer.IA3Layer, on)
        fill_adapters(model)
        out["ia3"] = logits(model)
        out["ia3_active"] = model.active_adapters()
        out["ia3_sd_keys"] = sorted(model.get_adapter_state_dict())
        model.disable_adapters()
        out["ia3_disabled"] = logits(model)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_add_set_enable_delete_matches_peft(arch):
    real = scenario_add_set_enable_delete(arch, on=False)
    fast = scenario_add_set_enable_delete(arch, on=True)
    compare(fast, real)
    # the scenario is not vacuous: adapters change the logits, disabling restores the base, deletion removes
    assert not torch.allclose(real["default"], real["base"], atol=1e-3)
    assert not torch.allclose(real["both"], real["set_default"], atol=1e-3)
    torch.testing.assert_close(fast["disabled"], fast["base"])
    torch.testing.assert_close(fast["after_delete"], fast["set_default"])
    assert fast["active1"] == ["second"] and fast["active3"] == ["default", "second"]
    assert fast["after_delete_cfg"] == ["default"] and fast["hf_loaded"] is False
    assert not torch.allclose(real["ia3"], real["base"], atol=1e-3)
    torch.testing.assert_close(fast["ia3_disabled"], fast["base"])


def scenario_modules_to_save(on):
    out = {}
    with alias(on) as peft:
        m = llama()
        m.add_adapter(peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
        fill_adapters(m, markers=("lora_", "modules_to_save"))
        out["grad1"] = sorted(n for n, q in m.named_parameters() if q.requires_grad)
        out["one"] = logits(m)
        m.add_adapter(peft.LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]), adapter_name="b")
        fill_adapters(m, markers=("lora_", "modules_to_save"), salt="b")
        out["grad2"] = sorted(n for n, q in m.named_parameters() if q.requires_grad)
        out["two"] = logits(m)
        m.set_adapter("default")
        out["grad3"] = sorted(n for n, q in m.named_parameters() if q.requires_grad)
        out["back"] = logits(m)
        out["sd_b"] = sorted(m.get_adapter_state_dict("b"))
        m.delete_adapter("b")
        out["deleted"] = logits(m)
        out["grad4"] = sorted(n for n, q in m.named_parameters() if q.requires_grad)
    return out


def test_modules_to_save_two_adapters_matches_peft():
    real = scenario_modules_to_save(False)
    fast = scenario_modules_to_save(True)
    compare(fast, real)
    assert "lm_head.modules_to_save.b.weight" in fast["grad2"] and "lm_head.weight" in fast["sd_b"]
    assert not torch.allclose(fast["two"], fast["back"], atol=1e-3)
    torch.testing.assert_close(fast["deleted"], fast["back"])


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    """Adapters saved by real peft and by peft_fast (LoRA on llama), their logits, and a base model dir."""
    root = tmp_path_factory.mktemp("adapters")
    real_logits = save_peft_adapter(real_peft, llama(), ["q_proj", "v_proj"], root / "real")
    fast_logits = save_peft_adapter(peft_fast, llama(), ["k_proj", "o_proj", "up_proj"], root / "fast")
    base_dir = root / "base"
    llama().save_pretrained(base_dir)
    hot_logits = save_peft_adapter(real_peft, llama(), ["q_proj", "v_proj"], root / "hot", salt="hot")
    adapter_dir = root / "with_base"
    save_peft_adapter(real_peft, llama(), ["q_proj", "down_proj"], adapter_dir)
    with open(adapter_dir / "adapter_config.json") as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = str(base_dir)
    with open(adapter_dir / "adapter_config.json", "w") as f:
        json.dump(cfg, f)
    return {"root": root, "real": root / "real", "fast": root / "fast", "real_logits": real_logits,
            "fast_logits": fast_logits, "with_base": adapter_dir, "hot": root / "hot", "hot_logits": hot_logits}


def scenario_load(paths, on):
    out = {}
    with alias(on):
        model = llama()
        model.load_adapter(str(paths["real"]))
        assert_peft_fast_layers(model, peft_fast.tuners.lora.layer.LoraLayer, on)
        out["real"] = logits(model)
        out["real_grad"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        model.load_adapter(str(paths["fast"]), adapter_name="fast", is_trainable=True)
        out["names"] = sorted(model.peft_config)
        out["active_after_load"] = model.active_adapters()
        model.set_adapter("fast")
        out["fast"] = logits(model)
        out["fast_grad"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        # a state dict and a config instead of a directory
        from safetensors.torch import load_file

        import peft

        m3 = llama()
        m3.load_adapter(peft_config=peft.LoraConfig.from_pretrained(str(paths["real"])), adapter_name="sd",
                        adapter_state_dict=load_file(str(paths["real"] / "adapter_model.safetensors")))
        assert_peft_fast_layers(m3, peft_fast.tuners.lora.layer.LoraLayer, on)
        out["from_state_dict"] = logits(m3)
        # from_pretrained of an adapter dir whose config names a local base model dir
        m2 = transformers.AutoModelForCausalLM.from_pretrained(str(paths["with_base"]))
        assert_peft_fast_layers(m2, peft_fast.tuners.lora.layer.LoraLayer, on)
        out["from_pretrained"] = logits(m2.eval())
        out["from_pretrained_cfg"] = sorted(m2.peft_config)
        # save_pretrained of a model with adapters: PEFT's format
        save_dir = paths["root"] / f"saved_{int(on)}"
        model.set_adapter("default")
        model.save_pretrained(save_dir)
        out["saved_files"] = sorted(f for f in os.listdir(save_dir) if f.startswith("adapter_"))
        # hotswap: same targets and rank, new weights into the existing "default" adapter, layers kept
        layers_before = {n: id(m) for n, m in model.named_modules() if "lora_" in n}
        model.load_adapter(str(paths["hot"]), adapter_name="default", hotswap=True)
        out["hotswap"] = logits(model)
        out["hotswap_same_modules"] = layers_before == {n: id(m) for n, m in model.named_modules() if "lora_" in n}
    return out, save_dir


def test_load_adapter_from_pretrained_save_match_peft(saved_adapters):
    real, real_dir = scenario_load(saved_adapters, on=False)
    fast, fast_dir = scenario_load(saved_adapters, on=True)
    compare(fast, real)
    # what the adapters were saved with: real peft's and peft_fast's own PeftModel logits
    torch.testing.assert_close(fast["real"], saved_adapters["real_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast["from_state_dict"], saved_adapters["real_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast["fast"], saved_adapters["fast_logits"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast["real"], fast["fast"], atol=1e-3)
    assert fast["real_grad"] == []  # is_trainable=False: frozen
    assert fast["fast_grad"] and all(".fast." in n for n in fast["fast_grad"])
    assert fast["saved_files"] == ["adapter_config.json", "adapter_model.safetensors"]
    torch.testing.assert_close(fast["hotswap"], saved_adapters["hot_logits"], atol=1e-5, rtol=1e-5)
    assert fast["hotswap_same_modules"] is True and not torch.allclose(fast["hotswap"], fast["real"], atol=1e-3)
    # the adapter transformers saved from peft_fast's layers loads in real peft with equal logits
    loaded = real_peft.PeftModel.from_pretrained(llama(), str(fast_dir))
    assert type(loaded.base_model.model.model.layers[0].self_attn.q_proj).__module__.startswith("peft.")
    torch.testing.assert_close(logits(loaded), fast["real"], atol=1e-5, rtol=1e-5)


def scenario_bf16(on, mode):
    out = {}
    with alias(on) as peft:
        model = llama(torch.bfloat16 if mode == "bf16_model" else torch.float32).train()
        model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]))
        assert_peft_fast_layers(model, peft_fast.tuners.lora.layer.LoraLayer, on)
        fill_adapters(model)
        out["adapter_dtypes"] = sorted({str(p.dtype) for n, p in model.named_parameters() if "lora_" in n})
        x = batch(3)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
        with ctx:
            res = model(x, labels=x)
        out["logits"] = res.logits.detach().clone()
        res.loss.backward()
        out["loss"] = res.loss.detach().float()
        for n, p in model.named_parameters():
            if "lora_" in n:
                assert p.grad is not None and torch.isfinite(p.grad).all(), n
                out[f"grad:{n}"] = p.grad.detach().clone()
            else:
                assert p.grad is None, n
    return out


@pytest.mark.parametrize("mode", ["bf16_model", "autocast"])
def test_bf16_add_adapter_forward_backward_matches_peft(mode):
    real = scenario_bf16(False, mode)
    fast = scenario_bf16(True, mode)
    assert real["logits"].dtype == torch.bfloat16
    compare(fast, real, low_precision=True)


# --------------------------------------------------------------------------------------------------------------
# PEFT's names at PEFT's module paths (what transformers imports)
# --------------------------------------------------------------------------------------------------------------
def test_peft_module_paths_used_by_transformers_exist():
    with alias(True):
        from peft import PeftConfig, PeftType, get_peft_model_state_dict, inject_adapter_in_model
        from peft.functional import (cast_adapter_dtype, delete_adapter, get_peft_model_state_dict as g2,
                                     inject_adapter_in_model as i2, set_adapter, set_peft_model_state_dict,
                                     set_requires_grad)
        from peft.tuners.ia3 import IA3Config, IA3Layer, IA3Model
        from peft.tuners.lora import (Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraConfig, LoraLayer,
                                      LoraModel, LoraRuntimeConfig, ParamWrapper)
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
        from peft.utils.other import AuxiliaryTrainingWrapper, fsdp_auto_wrap_policy
        from peft.utils.transformers_weight_conversion import build_peft_weight_mapping

        assert LoraLayer is peft_fast.tuners.lora.layer.LoraLayer and i2 is peft_fast.inject_adapter_in_model
        assert BaseTunerLayer is peft_fast.tuners.tuners_utils.BaseTunerLayer
        # peft_fast's own objects, not the alias's placeholders for what peft_fast lacks
        for obj in (PeftConfig, PeftType, get_peft_model_state_dict, inject_adapter_in_model, g2, IA3Config, IA3Layer,
                    IA3Model, Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraConfig, LoraModel, LoraRuntimeConfig,
                    ParamWrapper, ModulesToSaveWrapper, AuxiliaryTrainingWrapper, cast_adapter_dtype, delete_adapter,
                    set_adapter, set_peft_model_state_dict, set_requires_grad, build_peft_weight_mapping,
                    fsdp_auto_wrap_policy):
            assert obj.__module__.startswith("peft_fast."), obj
            assert not hasattr(obj, "_peft_fast_missing"), obj
        assert issubclass(LoraModel, peft_fast.tuners.tuners_utils.BaseTuner) and issubclass(Linear, LoraLayer)
        assert issubclass(IA3Layer, BaseTunerLayer) and issubclass(ParamWrapper, LoraLayer)
        assert issubclass(ModulesToSaveWrapper, AuxiliaryTrainingWrapper)
        import peft.utils as pu

        for name in pu.__all__:  # every name peft_fast.utils exports is PEFT's too, and peft_fast's own object
            assert name in real_peft.utils.__all__ or hasattr(real_peft.utils, name), name
        assert pu.PeftType is peft_fast.PeftType and pu.CONFIG_NAME == real_peft.utils.CONFIG_NAME
        assert pu.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"] == \
            real_peft.utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"]


def test_fsdp_auto_wrap_policy_matches_peft():
    """The policy's decision for every module of a LoRA model equals real peft's."""
    from peft.utils.other import fsdp_auto_wrap_policy as real_policy

    from peft_fast.utils.other import fsdp_auto_wrap_policy

    def decisions(lib, policy_fn):
        model = lib.get_peft_model(llama(), lib.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        policy = policy_fn(model)
        return {n: bool(policy(module=m, recurse=False, nonwrapped_numel=1)) for n, m in model.named_modules() if n}

    real = decisions(real_peft, real_policy)
    fast = decisions(peft_fast, fsdp_auto_wrap_policy)
    assert fast == real
    assert fast["base_model.model.model.layers.0"] and fast["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"]
    assert not fast["base_model.model.model.layers.0.self_attn.q_proj.base_layer"]


def test_functional_on_plain_module_peft_semantics():
    """peft.functional on a plain nn.Module with two LoRA adapters + modules_to_save, vs real peft."""
    def run(lib_functional, lib):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        lib_functional.inject_adapter_in_model(lib.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]),
                                               model, "a")
        # (a second adapter with modules_to_save on the same module: PEFT leaves its wrapper with no active
        # adapter after the inject, peft_fast activates it; not compared here)
        lib_functional.inject_adapter_in_model(lib.LoraConfig(r=3, target_modules=["0"]), model, "b")
        fill_adapters(model, markers=("lora_", "modules_to_save"))
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
        res = {}
        lib_functional.set_adapter(model, "b")
        res["b"] = model(x).detach()
        res["b_active"] = model[0].active_adapters
        res["grad_b"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        lib_functional.set_requires_grad(model, "a", requires_grad=True)
        res["grad_ab"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        lib_functional.set_adapter(model, "a", inference_mode=True)
        res["a"] = model(x).detach()
        res["grad_a_inf"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        res["new_active"] = lib_functional.delete_adapter(model, "a", prefix="lora_")
        res["after_delete"] = model(x).detach()
        res["names"] = sorted(n for n, _ in model.named_parameters())
        sd = lib_functional.get_peft_model_state_dict(model, adapter_name="b")
        res["sd"] = sorted(sd)
        m16 = torch.nn.Sequential(torch.nn.Linear(8, 8)).to(torch.bfloat16)
        lib_functional.inject_adapter_in_model(lib.LoraConfig(r=2, target_modules=["0"]), m16, "c")
        lib_functional.cast_adapter_dtype(m16, "c", autocast_adapter_dtype=False)
        res["dtype_kept"] = str(m16[0].lora_A["c"].weight.dtype)
        lib_functional.cast_adapter_dtype(m16, "c")
        res["dtype_cast"] = str(m16[0].lora_A["c"].weight.dtype)
        return res

    import peft.functional as real_functional

    real = run(real_functional, real_peft)
    with alias(True) as peft:
        import peft.functional as pf

        assert pf is peft_fast.functional
        fast = run(pf, peft)
    compare(fast, real)
    assert not torch.allclose(real["a"], real["b"], atol=1e-3)
    assert real["dtype_cast"] == "torch.float32" and real["dtype_kept"] == "torch.bfloat16"


def test_build_peft_weight_mapping_renames_and_moe_refusal():
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    from peft_fast.utils.transformers_weight_conversion import build_peft_weight_mapping
    from peft.utils.transformers_weight_conversion import build_peft_weight_mapping as real_build

    model = llama()
    convs = get_model_conversion_mapping(model)
    keys = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.lm_head.lora_B.weight", "base_model.model.model.layers.1.mlp.down_proj.ia3_l",
            "base_model.model.model.embed_tokens.lora_embedding_A"]

    def rename(mapping, key):
        for r in mapping:
            if isinstance(r, WeightRenaming):
                key, _ = r.rename_source_key(key)
        return key

    for cfg in (peft_fast.LoraConfig(target_modules=["q_proj"]), peft_fast.IA3Config(target_modules=["down_proj"]),
                None):
        real_cfg = None if cfg is None else getattr(real_peft, type(cfg).__name__)(target_modules=cfg.target_modules)
        mine = build_peft_weight_mapping(convs, "ad", peft_config=cfg)
        ref = real_build(convs, "ad", peft_config=real_cfg)
        assert [rename(mine, k) for k in keys] == [rename(ref, k) for k in keys]
    assert rename(build_peft_weight_mapping(convs, "ad", peft_fast.LoraConfig(target_modules=["q_proj"])), keys[0]) \
        == "model.layers.0.self_attn.q_proj.lora_A.ad.weight"
    assert build_peft_weight_mapping([], "x") == [] and build_peft_weight_mapping(None, "x") == []

    moe = get_checkpoint_conversion_mapping("mixtral")
    ok = build_peft_weight_mapping(moe, "default", peft_fast.LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert any(isinstance(r, WeightRenaming) and r.source_patterns == [".block_sparse_moe."] for r in ok)
    # per expert fusion, one converter for lora_A and one for lora_B, as PEFT
    assert len(ok) - len([r for r in ok if isinstance(r, WeightRenaming)]) == 4


E, H, F, R = 4, 32, 48, 2


def mixtral():
    cfg = transformers.MixtralConfig(hidden_size=H, intermediate_size=F, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=VOCAB, num_local_experts=E,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def v4_moe(tmp_path_factory):
    """An adapter in transformers v4's per-expert Mixtral layout (w1/w2/w3 of each expert + q_proj), and the
    logits of an independent reference: the deltas B_e @ A_e * scale added to v5's fused base weights."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("v4moe")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for layer in range(2):
        for e in range(E):
            for w, (fan_in, fan_out) in {"w1": (H, F), "w3": (H, F), "w2": (F, H)}.items():
                pre = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{e}.{w}"
                sd[pre + ".lora_A.weight"] = torch.randn(R, fan_in, generator=g) * 0.3
                sd[pre + ".lora_B.weight"] = torch.randn(fan_out, R, generator=g) * 0.3
        pre = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        sd[pre + ".lora_A.weight"] = torch.randn(R, H, generator=g) * 0.3
        sd[pre + ".lora_B.weight"] = torch.randn(H, R, generator=g) * 0.3
    save_file(sd, str(path / "adapter_model.safetensors"))
    cfg = real_peft.LoraConfig(r=R, lora_alpha=4, target_modules=["q_proj", "w1", "w2", "w3"]).to_dict()
    with open(path / "adapter_config.json", "w") as f:
        json.dump({k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}, f, default=str)

    ref = mixtral()
    scale = 4 / R
    with torch.no_grad():
        for layer in range(2):
            blk = ref.model.layers[layer]
            pre = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts"

            def delta(w, e, pre=pre):
                return sd[f"{pre}.{e}.{w}.lora_B.weight"] @ sd[f"{pre}.{e}.{w}.lora_A.weight"] * scale

            for e in range(E):
                blk.mlp.experts.gate_up_proj[e] += torch.cat([delta("w1", e), delta("w3", e)], 0)
                blk.mlp.experts.down_proj[e] += delta("w2", e)
            q = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
            blk.self_attn.q_proj.weight += sd[q + ".lora_B.weight"] @ sd[q + ".lora_A.weight"] * scale
    expected = logits(ref)
    assert not torch.allclose(expected, logits(mixtral()), atol=1e-2)
    return {"path": path, "sd": sd, "expected": expected}


def test_load_v4_layout_moe_adapter_fuses_experts(v4_moe):
    """transformers' load_adapter of the v4-layout adapter into v5's fused gate_up_proj/down_proj through
    peft_fast's ParamWrapper: logits equal the independent reference and real peft's."""
    got = {}
    for on in (False, True):
        with alias(on):
            model = mixtral()
            model.load_adapter(str(v4_moe["path"]))
            got[on] = logits(model)
            cfg = model.peft_config["default"]
            assert sorted(cfg.target_parameters) == ["down_proj", "gate_up_proj"]
            assert set(cfg.target_modules) == {"q_proj"} and cfg.rank_pattern == {r".*\.gate_up_proj": 2 * R}
            if on:
                from peft_fast.tuners.lora.param_wrapper import ParamWrapper

                assert isinstance(model.model.layers[0].mlp.experts, ParamWrapper)
                assert_peft_fast_layers(model, peft_fast.tuners.lora.layer.LoraLayer, True)
    torch.testing.assert_close(got[True], v4_moe["expected"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[True], got[False], atol=1e-5, rtol=1e-5)


def test_peft_model_from_pretrained_v4_layout_moe_adapter(v4_moe):
    """peft_fast's own PeftModel.from_pretrained converts the v4-layout checkpoint too (as PEFT), and the state
    dict conversion equals PEFT's key for key, value for value."""
    from peft.utils.transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers as ref

    from peft_fast.utils.transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers

    model = peft_fast.PeftModel.from_pretrained(mixtral(), str(v4_moe["path"]))
    torch.testing.assert_close(logits(model), v4_moe["expected"], atol=1e-5, rtol=1e-5)
    mine = convert_peft_adapter_state_dict_for_transformers(model, model.peft_config["default"], v4_moe["sd"])
    real_model = real_peft.PeftModel.from_pretrained(mixtral(), str(v4_moe["path"]))
    theirs = ref(real_model, real_model.peft_config["default"], v4_moe["sd"])
    assert sorted(mine) == sorted(theirs) and len(mine) == 12
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k
    # a non-MoE model and a non-LoRA config are left alone
    plain = peft_fast.get_peft_model(llama(), peft_fast.LoraConfig(target_modules=["q_proj"]))
    assert convert_peft_adapter_state_dict_for_transformers(plain, plain.peft_config["default"], v4_moe["sd"]) \
        is v4_moe["sd"]
    broken = {k: v for k, v in v4_moe["sd"].items() if ".w3." not in k}
    with pytest.raises(ValueError, match="no lora_A for w3"):
        convert_peft_adapter_state_dict_for_transformers(model, model.peft_config["default"], broken)


def test_convert_peft_config_for_transformers_moe_rules():
    from peft_fast.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    model = mixtral()
    cfg = peft_fast.LoraConfig(r=3, lora_alpha=5, target_modules=["w2", "gate", "k_proj"])
    convert_peft_config_for_transformers(cfg, model)
    assert sorted(cfg.target_parameters) == ["down_proj", "gate.weight"] and set(cfg.target_modules) == {"k_proj"}
    assert not cfg.rank_pattern  # down_proj fuses one projection: rank and alpha unchanged
    with pytest.raises(ValueError, match="without also targeting w3 because they are fused into gate_up_proj"):
        convert_peft_config_for_transformers(peft_fast.LoraConfig(target_modules=["w1"]), model)
    with pytest.raises(NotImplementedError, match="regex target_modules"):
        convert_peft_config_for_transformers(peft_fast.LoraConfig(target_modules=r".*\.w[13]"), model)
    untouched = peft_fast.LoraConfig(target_modules=["q_proj"])
    convert_peft_config_for_transformers(untouched, llama())
    convert_peft_config_for_transformers(untouched, model)
    assert untouched.target_modules == {"q_proj"} and not untouched.target_parameters
    ia3 = peft_fast.IA3Config(target_modules=["w1"], feedforward_modules=[])
    convert_peft_config_for_transformers(ia3, model)  # PEFT converts LoRA only
    assert ia3.target_modules == {"w1"}


# --------------------------------------------------------------------------------------------------------------
# without real peft
# --------------------------------------------------------------------------------------------------------------
_NO_PEFT_SCRIPT = r"""
import sys, json, os
sys.path.insert(0, {root!r})
import tests.no_peft
tests.no_peft.hide_real_peft()
import torch, transformers
import peft_fast
peft_fast.install_as_peft()
import peft
assert peft.LoraConfig is peft_fast.LoraConfig
sys.path.insert(0, os.path.join({root!r}, "tests"))
from test_transformers_integration import llama, fill_adapters, logits, adapter_layer_types
model = llama()
model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="new")
fill_adapters(model)
model.load_adapter({adapter!r}, adapter_name="loaded")
types = sorted({{c.__module__ + "." + c.__name__ for c in adapter_layer_types(model).values()}})
assert types and all(t.startswith("peft_fast.") for t in types), types
model.set_adapter("loaded")
out = {{"loaded": logits(model)}}
model.set_adapter("new")
out["new"] = logits(model)
model.save_pretrained({save!r})
torch.save(out, os.path.join({save!r}, "logits.pt"))
print(json.dumps({{"types": types, "peft_in_modules": sorted(m for m in sys.modules if m == "peft" or m.startswith("peft."))[:3]}}))
"""


def test_without_real_peft_subprocess(saved_adapters, tmp_path):
    save = tmp_path / "saved"
    code = _NO_PEFT_SCRIPT.format(root=ROOT, adapter=str(saved_adapters["real"]), save=str(save))
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PEFT_FAST_TEST_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert "peft_fast.tuners.lora.layer.Linear" in info["types"]
    out = torch.load(save / "logits.pt")
    # the adapter saved by real peft gives real peft's logits on peft_fast's layers
    torch.testing.assert_close(out["loaded"], saved_adapters["real_logits"], atol=1e-5, rtol=1e-5)
    # the adapter transformers saved there (active: "new") loads in real peft with the same logits
    loaded = real_peft.PeftModel.from_pretrained(llama(), str(save))
    torch.testing.assert_close(logits(loaded), out["new"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out["new"], out["loaded"], atol=1e-3)
