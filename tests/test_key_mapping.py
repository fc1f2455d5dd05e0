"""`key_mapping` (PEFT 0.21.2): regex renames applied to a saved adapter's keys, without their
``base_model.model.`` prefix, before loading (used for transformers models whose module names
changed). Real `peft` is the oracle: adapters saved by real peft, files whose keys are renamed and
mapped back, logits of peft_fast equal to real peft's doing the same call; matching-nothing
mappings, bad regexes and keys without the PEFT prefix behave as in PEFT."""
from __future__ import annotations

import inspect
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import peft_fast
from peft_fast.utils import save_and_load as fast_sl

peft = pytest.importorskip("peft")
from peft.utils import save_and_load as peft_sl  # noqa: E402

LIBS = (peft, peft_fast)


def _base(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An adapter saved by real peft (random, non-default weights) in ``orig``, and the same tensors
    under renamed keys in ``renamed`` (``model.layers.N.`` -> ``model.blk_N.``; ``q_proj`` -> ``query``)."""
    d = tmp_path_factory.mktemp("key_mapping")
    model = peft.get_peft_model(_base(), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                                                         task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(str(d / "orig"))
    sd = load_file(str(d / "orig" / "adapter_model.safetensors"))
    renamed = {}
    for k, v in sd.items():
        new = k.replace("model.layers.0.", "model.blk_0.").replace("model.layers.1.", "model.blk_1.")
        renamed[new.replace("q_proj", "query")] = v
    assert set(renamed) != set(sd) and len(renamed) == len(sd) == 8
    os.makedirs(d / "renamed")
    shutil.copy(d / "orig" / "adapter_config.json", d / "renamed" / "adapter_config.json")
    save_file(renamed, str(d / "renamed" / "adapter_model.safetensors"), metadata={"format": "pt"})
    return d


# the first pattern that matches a key is the only one applied (PEFT's early exit): the catch-all
# ``blk_`` pattern must not also rewrite what the q_proj one matched
MAPPING = {r"^model\.blk_(\d+)\.self_attn\.query": r"model.layers.\1.self_attn.q_proj",
           r"^model\.blk_(\d+)\.": r"model.layers.\1.",
           r"q_proj": "SHOULD_NOT_APPLY"}


def _x():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(7))


def _logits(model, dtype=torch.float32):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        return model(_x()).logits.float()


def test_signatures_match_peft():
    pairs = [(peft.PeftModel.from_pretrained, peft_fast.PeftModel.from_pretrained),
             (peft.PeftModel.load_adapter, peft_fast.PeftModel.load_adapter),
             (peft_sl.load_peft_weights, fast_sl.load_peft_weights),
             (peft.load_peft_weights, peft_fast.load_peft_weights)]
    for ref, fast in pairs:
        want = [(p.name, p.default, p.kind) for p in inspect.signature(ref).parameters.values()]
        got = [(p.name, p.default, p.kind) for p in inspect.signature(fast).parameters.values()]
        assert got == want, (ref.__qualname__, got, want)


def test_load_peft_weights_key_mapping_as_peft(saved):
    path = str(saved / "renamed")
    ref = peft_sl.load_peft_weights(path, device="cpu", key_mapping=MAPPING)
    got = fast_sl.load_peft_weights(path, device="cpu", key_mapping=MAPPING)
    orig = load_file(str(saved / "orig" / "adapter_model.safetensors"))
    assert list(got) == list(ref)
    assert set(got) == set(orig)  # mapped back exactly; SHOULD_NOT_APPLY never applied
    for k in ref:
        assert torch.equal(got[k], ref[k]) and torch.equal(got[k], orig[k])
    # None and {} change nothing
    for km in (None, {}):
        assert list(fast_sl.load_peft_weights(path, device="cpu", key_mapping=km)) == list(
            peft_sl.load_peft_weights(path, device="cpu", key_mapping=km))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_pretrained_key_mapping_logits_as_peft(saved, dtype):
    want_orig = _logits(peft.PeftModel.from_pretrained(_base(dtype), str(saved / "orig")), dtype)
    base_logits = _logits(_base(dtype), dtype)
    out = {}
    for lib in LIBS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = lib.PeftModel.from_pretrained(_base(dtype), str(saved / "renamed"), key_mapping=MAPPING)
        assert not [w for w in caught if "missing adapter keys" in str(w.message)], lib.__name__
        out[lib.__name__] = _logits(model, dtype)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out["peft_fast"], out["peft"], **tol)
    torch.testing.assert_close(out["peft_fast"], want_orig, **tol)
    # the adapter does something: a silently ignored mapping would give other logits
    assert (out["peft_fast"] - base_logits).abs().max() > 0.05


def test_load_adapter_key_mapping_as_peft(saved):
    out, results = {}, {}
    for lib in LIBS:
        model = lib.PeftModel.from_pretrained(_base(), str(saved / "orig"))
        res = model.load_adapter(str(saved / "renamed"), "other", key_mapping=MAPPING)
        results[lib.__name__] = (sorted(res.missing_keys), sorted(res.unexpected_keys))
        model.set_adapter("other")
        out[lib.__name__] = _logits(model)
    assert results["peft_fast"] == results["peft"] == ([], [])
    torch.testing.assert_close(out["peft_fast"], out["peft"], atol=2e-5, rtol=1e-4)


def test_mapping_that_matches_nothing_as_peft(saved):
    """Nothing renamed: PEFT's missing-keys warning from from_pretrained, and the same missing /
    unexpected keys from load_adapter; the adapter keeps its fresh initial weights in both."""
    no_match = {r"^nothing\.here": "x"}
    out, results = {}, {}
    for lib in LIBS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = lib.PeftModel.from_pretrained(_base(), str(saved / "renamed"), key_mapping=no_match)
        msgs = [str(w.message) for w in caught if "Found missing adapter keys while loading the checkpoint" in
                str(w.message)]
        assert msgs and "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in msgs[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = model.load_adapter(str(saved / "renamed"), "other", key_mapping=no_match)
        results[lib.__name__] = (sorted(res.missing_keys), sorted(res.unexpected_keys))
        out[lib.__name__] = _logits(model)
    assert results["peft_fast"] == results["peft"]
    assert len(results["peft"][0]) == 8 and len(results["peft"][1]) == 8
    torch.testing.assert_close(out["peft_fast"], out["peft"], atol=2e-5, rtol=1e-4)


def test_bad_regex_raises_as_peft(saved):
    import re

    errors = []
    for lib in LIBS:
        with pytest.raises(re.error) as info:
            lib.PeftModel.from_pretrained(_base(), str(saved / "renamed"), key_mapping={"model.(blk": "x"})
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_key_without_peft_prefix_raises_as_peft(saved, tmp_path):
    os.makedirs(tmp_path / "bare")
    sd = load_file(str(saved / "orig" / "adapter_model.safetensors"))
    save_file({k.removeprefix("base_model.model."): v for k, v in sd.items()},
              str(tmp_path / "bare" / "adapter_model.safetensors"))
    msgs = []
    for sl in (peft_sl, fast_sl):
        with pytest.raises(ValueError, match="while trying to load a PEFT state_dict with key_mapping") as info:
            sl.load_peft_weights(str(tmp_path / "bare"), device="cpu", key_mapping={"a": "b"})
        msgs.append(str(info.value))
    assert msgs[0] == msgs[1]
    # without a mapping the keys pass through unchanged (no error), as in PEFT
    assert list(fast_sl.load_peft_weights(str(tmp_path / "bare"), device="cpu")) == list(
        peft_sl.load_peft_weights(str(tmp_path / "bare"), device="cpu"))


def test_checkpoint_conversion_mapping_is_the_default(saved):
    """from_pretrained with key_mapping=None uses the model's ``_checkpoint_conversion_mapping``
    (transformers), as PEFT; an explicit key_mapping={} turns it off."""
    out = {}
    for lib in LIBS:
        base = _base()
        base._checkpoint_conversion_mapping = MAPPING
        out[lib.__name__] = _logits(lib.PeftModel.from_pretrained(base, str(saved / "renamed")))
        base = _base()
        base._checkpoint_conversion_mapping = MAPPING
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lib.PeftModel.from_pretrained(base, str(saved / "renamed"), key_mapping={})
        assert any("Found missing adapter keys" in str(w.message) for w in caught), lib.__name__
    want = _logits(peft.PeftModel.from_pretrained(_base(), str(saved / "orig")))
    torch.testing.assert_close(out["peft_fast"], out["peft"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out["peft_fast"], want, atol=2e-5, rtol=1e-4)


def test_key_mapping_under_the_peft_alias(saved):
    """Code written for peft (``from peft import PeftModel``) gets the mapping under the switch."""
    want = _logits(peft.PeftModel.from_pretrained(_base(), str(saved / "orig")))
    peft_fast.install_as_peft()
    try:
        from peft import PeftModel as AliasedPeftModel

        assert AliasedPeftModel is peft_fast.PeftModel
        got = _logits(AliasedPeftModel.from_pretrained(_base(), str(saved / "renamed"), key_mapping=MAPPING))
    finally:
        peft_fast.uninstall_as_peft()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
