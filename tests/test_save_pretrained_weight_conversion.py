"""`save_pretrained(path_initial_model_for_weight_conversion=...)` (PEFT 0.21.2): an adapter trained
from a base-mutating initialisation (PiSSA/CorDA/OLoRA: W = W_res + s B0 A0) is saved as the
equivalent plain LoRA of rank 2r for the unmutated base W: [B | -B0] [A ; A0], r and lora_alpha
doubled. peft_fast has no PiSSA/OLoRA/CorDA initialisers, but the conversion only needs the initial
adapter saved in that folder, so it is done exactly as PEFT does it; real `peft` is the oracle for
the files written, and the converted adapter on the plain base must reproduce the mutated model."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import peft_fast

peft = pytest.importorskip("peft")

LIBS = (peft, peft_fast)
TARGETS = ["q_proj", "v_proj"]


def _base(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _randomize(model, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3).to(p.dtype))


def _x():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def _run(lib, tmp, dtype=torch.float32, safe=True, **cfg_kwargs):
    """'Initialise' (random A0, B0), save the initial adapter, 'train' (new random A, B), save with
    the conversion. Returns the model and the folders."""
    cfg_kwargs = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "task_type": "CAUSAL_LM", **cfg_kwargs}
    model = lib.get_peft_model(_base(dtype), lib.LoraConfig(**cfg_kwargs), autocast_adapter_dtype=False)
    _randomize(model, 11, dtype)
    root = os.path.join(tmp, lib.__name__)
    init_dir, out_dir = os.path.join(root, "pissa_init"), os.path.join(root, "pissa_ft")
    model.save_pretrained(init_dir)
    _randomize(model, 22, dtype)
    model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=init_dir, safe_serialization=safe)
    return model, init_dir, out_dir


def _read(out_dir, safe=True):
    if safe:
        return load_file(os.path.join(out_dir, "adapter_model.safetensors"))
    return torch.load(os.path.join(out_dir, "adapter_model.bin"), weights_only=True)


def _config(path):
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg.pop("peft_version", None)
    if isinstance(cfg.get("target_modules"), list):  # a set in both libraries: its order follows the hash seed
        cfg["target_modules"] = sorted(cfg["target_modules"])
    return cfg


@pytest.mark.parametrize("dtype,safe", [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)])
def test_files_as_peft(tmp_path, dtype, safe):
    out = {lib.__name__: _run(lib, str(tmp_path), dtype, safe) for lib in LIBS}
    ref, got = _read(out["peft"][2], safe), _read(out["peft_fast"][2], safe)
    assert sorted(got) == sorted(ref) and len(ref) == 8
    for k in ref:
        # PEFT loads the initial adapter with autocast_adapter_dtype=True: 16-bit halves come out fp32
        assert got[k].dtype == ref[k].dtype == torch.float32
        assert torch.equal(got[k], ref[k]), k
        assert got[k].shape[0 if "lora_A" in k else 1] == 8  # rank 2r
    keys = ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules")
    for i in (1, 2):  # the rewritten initial folder's config and the converted adapter's config
        ref_cfg, got_cfg = _config(out["peft"][i]), _config(out["peft_fast"][i])
        assert {k: got_cfg[k] for k in keys} == {k: ref_cfg[k] for k in keys}, i
    assert _config(out["peft_fast"][2])["r"] == 8 and _config(out["peft_fast"][2])["lora_alpha"] == 16
    assert _config(out["peft_fast"][1])["init_lora_weights"] is True


def test_model_left_as_it_was(tmp_path):
    """The initial adapter is loaded only for the conversion: deleted again, 'default' still active,
    same outputs."""
    model = peft_fast.get_peft_model(_base(), peft_fast.LoraConfig(r=4, target_modules=TARGETS))
    _randomize(model, 11, torch.float32)
    model.save_pretrained(str(tmp_path / "pissa_init"))
    _randomize(model, 22, torch.float32)
    with torch.no_grad():
        before = model(_x()).logits
    model.save_pretrained(str(tmp_path / "ft"), path_initial_model_for_weight_conversion=str(tmp_path / "pissa_init"))
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert not any("pissa_init" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(_x()).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("lib", LIBS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_converted_adapter_reproduces_mutated_model(tmp_path, lib, use_rslora):
    """Mutated model: base W_res = W - s B0 A0 (what PiSSA does to the base) + trained adapter (A, B).
    The converted adapter on the plain base W must give the same logits (fp64 math)."""
    model, init_dir, out_dir = _run(lib, str(tmp_path), torch.float64, use_rslora=use_rslora)
    scale = 8 / (math.sqrt(4) if use_rslora else 4)
    init_sd, trained_sd = _read(init_dir), _read(out_dir)
    mutated = _base(torch.float64)
    modules = dict(mutated.named_modules())
    for key, a0 in init_sd.items():
        if "lora_A" in key:
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b0 = init_sd[key.replace("lora_A", "lora_B")]
            with torch.no_grad():
                modules[name].weight -= scale * (b0 @ a0)
    trained = lib.get_peft_model(mutated, lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                         use_rslora=use_rslora))
    with torch.no_grad():
        for key, v in trained_sd.items():  # the first r ranks of the converted adapter are (A, B)
            name = key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
            param = trained.base_model.model.get_parameter(name)
            param.copy_(v[:4] if "lora_A" in key else v[:, :4])
        want = trained(_x()).logits
        converted = lib.PeftModel.from_pretrained(_base(torch.float64), out_dir)
        got = converted(_x()).logits
        plain = _base(torch.float64)(_x()).logits
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
    assert (got - plain).abs().max() > 1e-2


def test_rslora_with_patterns_error_as_peft(tmp_path):
    msgs = []
    for lib in LIBS:
        with pytest.raises(ValueError) as info:
            _run(lib, str(tmp_path), use_rslora=True, rank_pattern={"q_proj": 2})
        msgs.append(str(info.value))
    assert msgs[0] == msgs[1] and "path_initial_model_for_weight_conversion" in msgs[0]


def test_rank_pattern_doubled_as_peft(tmp_path):
    out = {lib.__name__: _run(lib, str(tmp_path), rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})
           for lib in LIBS}
    ref, got = _config(out["peft"][2]), _config(out["peft_fast"][2])
    assert got["rank_pattern"] == ref["rank_pattern"] == {"q_proj": 4}
    assert got["alpha_pattern"] == ref["alpha_pattern"] == {"v_proj": 6}
    ref_sd, got_sd = _read(out["peft"][2]), _read(out["peft_fast"][2])
    assert all(torch.equal(got_sd[k], ref_sd[k]) for k in ref_sd) and sorted(got_sd) == sorted(ref_sd)


def test_non_lora_tuner_error_as_peft(tmp_path):
    msgs = []
    for lib in LIBS:
        model = lib.get_peft_model(_base(), lib.IA3Config(target_modules=["k_proj", "down_proj"],
                                                          feedforward_modules=["down_proj"]))
        init_dir = str(tmp_path / lib.__name__ / "init")
        model.save_pretrained(init_dir)
        with pytest.raises(ValueError) as info:
            model.save_pretrained(str(tmp_path / lib.__name__ / "ft"),
                                  path_initial_model_for_weight_conversion=init_dir)
        msgs.append(str(info.value))
    assert msgs[0] == msgs[1] == ("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not "
                                  "supported for IA3Model.")


def test_missing_initial_adapter_fails_and_leaves_model_clean(tmp_path):
    model = peft_fast.get_peft_model(_base(), peft_fast.LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(Exception):
        model.save_pretrained(str(tmp_path / "ft"), path_initial_model_for_weight_conversion=str(tmp_path / "nothing"))
    assert list(model.peft_config) == ["default"]
