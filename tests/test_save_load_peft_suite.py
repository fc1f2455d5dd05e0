"""Saving and loading as PEFT does it (issue #12), with real `peft` as the oracle: the model card
README.md that save_pretrained writes, get/set_base_model_state_dict, get_peft_model_state_dict
on FSDP-wrapped models, low_cpu_mem_usage (adapter on meta, loaded with assign=True), IA3 merge
and unmerge on 16-bit models, and push_to_hub with the upload mocked (no network)."""
from __future__ import annotations

import os
import re
from unittest import mock

import pytest
import torch
import yaml
from torch import nn

import peft_fast

peft = pytest.importorskip("peft")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.lin1(self.relu(self.lin0(x))))


def _mlp(seed=0):
    torch.manual_seed(seed)
    return MLP()


def _lora_kwargs(**extra):
    return dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, init_lora_weights=False, **extra)


def _both(method="lora", seed=0, **kwargs):
    """The same model + adapter under peft and peft_fast (identical initial weights)."""
    models = []
    for lib in (peft, peft_fast):
        cfg_cls = lib.LoraConfig if method == "lora" else lib.IA3Config
        torch.manual_seed(seed + 1)
        models.append(lib.get_peft_model(_mlp(seed), cfg_cls(**kwargs)))
    models[1].load_state_dict(models[0].state_dict())
    return models


def _front_matter(path):
    text = open(path, encoding="utf-8").read()
    return yaml.safe_load(re.search(r"---\n(.*?)\n---", text, re.DOTALL).group(1)), text


def _tiny_llama(lib):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.config._name_or_path = "org/tiny-llama"
    model.name_or_path = "org/tiny-llama"
    return lib.get_peft_model(model, lib.LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


# ---- model card -------------------------------------------------------------------------------
def test_model_card_same_as_peft_for_a_transformers_model(tmp_path):
    pytest.importorskip("transformers")
    cards = []
    for lib in (peft, peft_fast):
        out = tmp_path / lib.__name__
        _tiny_llama(lib).save_pretrained(str(out))
        cards.append(open(out / "README.md", encoding="utf-8").read())
    assert cards[1] == cards[0]
    meta, _ = _front_matter(tmp_path / "peft_fast" / "README.md")
    assert meta["library_name"] == "peft" and meta["base_model"] == "org/tiny-llama"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["base_model:adapter:org/tiny-llama", "lora", "transformers"]


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_model_card_same_as_peft_for_a_custom_model(tmp_path, method):
    kwargs = _lora_kwargs() if method == "lora" else dict(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])
    cards = []
    for lib, model in zip((peft, peft_fast), _both(method, **kwargs)):
        out = tmp_path / lib.__name__
        model.save_pretrained(str(out), safe_serialization=(lib is peft_fast))
        cards.append(open(out / "README.md", encoding="utf-8").read())
    assert cards[1] == cards[0]
    meta, _ = _front_matter(tmp_path / "peft_fast" / "README.md")
    assert meta["library_name"] == "peft" and "base_model" not in meta
    assert ("lora" in meta.get("tags", [])) == (method == "lora")


def test_model_card_updates_an_existing_readme(tmp_path):
    """A user's card keeps its text and metadata; the PEFT lines are added once, not per save."""
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n\n# My adapter\n\nNotes.\n", encoding="utf-8")
    model = _both(**_lora_kwargs())[1]
    model.save_pretrained(str(tmp_path))
    model.save_pretrained(str(tmp_path))
    meta, text = _front_matter(tmp_path / "README.md")
    assert meta["license"] == "mit" and meta["library_name"] == "peft" and meta["tags"] == ["lora"]
    assert "# My adapter" in text and text.count("- PEFT ") == 1
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]  # atomic writes leave nothing


# ---- base model state dict ----------------------------------------------------------------------
@pytest.mark.parametrize("extra", [{}, {"modules_to_save": ["head"]}, {"use_dora": True}])
def test_get_base_model_state_dict_same_as_peft(extra):
    ref, ours = _both(**_lora_kwargs(**extra))
    expected = peft.get_base_model_state_dict(ref)
    got = peft_fast.get_base_model_state_dict(ours)
    assert list(got) == list(expected) == list(_mlp().state_dict())
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_set_base_model_state_dict_roundtrip_and_errors():
    ref, ours = _both(**_lora_kwargs(modules_to_save=["head"]))
    original = {k: v.clone() for k, v in peft_fast.get_base_model_state_dict(ours).items()}
    adapter_before = {k: v.clone() for k, v in peft_fast.get_peft_model_state_dict(ours).items()}
    with torch.no_grad():
        for p in ours.get_base_model().parameters():
            p.add_(1.0)
    result = peft_fast.set_base_model_state_dict(ours, original)
    assert result.missing_keys == [] and result.unexpected_keys == []
    restored = peft_fast.get_base_model_state_dict(ours)
    assert all(torch.equal(restored[k], v) for k, v in original.items())
    # adapter weights are not base weights: untouched by the load (they were shifted with the rest)
    adapter_after = peft_fast.get_peft_model_state_dict(ours)
    assert all(torch.equal(adapter_after[k], adapter_before[k] + 1.0) for k in adapter_before)

    partial = dict(original)
    partial.pop("lin0.bias")
    partial["nope.weight"] = torch.zeros(1)
    for lib, model in ((peft, ref), (peft_fast, ours)):
        with pytest.raises(RuntimeError) as err:
            lib.set_base_model_state_dict(model, partial)
        if lib is peft:
            expected = str(err.value)
        else:
            assert str(err.value) == expected
    result = peft_fast.set_base_model_state_dict(ours, partial, strict=False)
    assert result.missing_keys == ["lin0.bias"] and result.unexpected_keys == ["nope.weight"]


# ---- FSDP ---------------------------------------------------------------------------------------
@pytest.fixture
def gloo_group():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        yield
        return
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_peft_model_state_dict_of_fsdp_wrapped_model(gloo_group, bias):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    ref, ours = _both(**_lora_kwargs(bias=bias, modules_to_save=["head"]))
    expected = peft.get_peft_model_state_dict(FSDP(ref, use_orig_params=True, device_id="cpu"))
    plain = peft_fast.get_peft_model_state_dict(ours)
    wrapped = FSDP(ours, use_orig_params=True, device_id="cpu")
    got = peft_fast.get_peft_model_state_dict(wrapped)
    assert sorted(got) == sorted(expected) == sorted(plain)
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    x = torch.randn(5, 10)
    with torch.no_grad():
        before = wrapped(x)
    fresh = peft_fast.get_peft_model(_mlp(), peft_fast.LoraConfig(**_lora_kwargs(bias=bias, modules_to_save=["head"])))
    if bias != "none":  # the learnt biases travel with the adapter
        with torch.no_grad():
            for name, p in fresh.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
    peft_fast.set_peft_model_state_dict(fresh, got)
    with torch.no_grad():
        assert torch.allclose(fresh(x), before)


# ---- low_cpu_mem_usage --------------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True])
def test_low_cpu_mem_usage_loads_the_same_adapter(tmp_path, use_dora):
    model = peft_fast.get_peft_model(_mlp(), peft_fast.LoraConfig(**_lora_kwargs(use_dora=use_dora)))
    model.save_pretrained(str(tmp_path))
    x = torch.randn(4, 10)
    with torch.no_grad():
        expected = model(x)

    direct = peft_fast.inject_adapter_in_model(peft_fast.LoraConfig(**_lora_kwargs(use_dora=use_dora)), _mlp(),
                                               low_cpu_mem_usage=True)
    meta = {n for n, p in direct.named_parameters() if p.device.type == "meta"}
    assert meta and all(".lora_" in n for n in meta)

    loaded = peft_fast.PeftModel.from_pretrained(_mlp(), str(tmp_path), low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    loaded.load_adapter(str(tmp_path), adapter_name="other", low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    loaded.set_adapter("other")
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)

    trainable = peft_fast.PeftModel.from_pretrained(_mlp(), str(tmp_path), is_trainable=True, low_cpu_mem_usage=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


# ---- IA3 on 16-bit models -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ia3_merge_unmerge_keeps_16bit_bias(dtype):
    """Unmerging divided the fp16 bias by the fp32 vector and left it fp32; the next forward failed."""
    kwargs = dict(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], init_ia3_weights=False)
    ref, ours = _both("ia3", **kwargs)
    x = torch.randn(4, 10).to(dtype)
    for model in (ref, ours):
        model.to(dtype)
        model.merge_adapter()
        model.unmerge_adapter()
    for name, p in ours.get_base_model().named_parameters():
        if "ia3_l" not in name:
            assert p.dtype == dtype, name
    with torch.no_grad():
        assert torch.allclose(ours(x).float(), ref(x).float(), atol=1e-2, rtol=1e-2)


# ---- push_to_hub (upload mocked) ------------------------------------------------------------------
def test_push_to_hub_signature_is_peft_s():
    import inspect

    ref = inspect.signature(peft.PeftModel.push_to_hub).parameters
    ours = inspect.signature(peft_fast.PeftModel.push_to_hub).parameters
    assert [(n, p.kind, p.default) for n, p in ref.items()] == \
        [(n, p.kind, p.default) for n, p in ours.items() if p.kind != p.VAR_KEYWORD]


@pytest.mark.parametrize("remote_card", [False, True])
def test_push_to_hub_uploads_the_saved_adapter(remote_card):
    """One commit with the save_pretrained files; the repo's card (if any) is updated with PEFT's
    metadata and the tags, never replaced; nothing goes to the network (HfApi and the card load mocked)."""
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import EntryNotFoundError

    model = _both(**_lora_kwargs())[1]
    seen = {}

    def upload_folder(*args, folder_path=None, **kwargs):
        seen.update(kwargs, files=sorted(os.listdir(folder_path)),
                    card=open(os.path.join(folder_path, "README.md"), encoding="utf-8").read(),
                    config=open(os.path.join(folder_path, "adapter_config.json"), encoding="utf-8").read())
        return "commit-info"

    def load_card(repo_or_path, **kwargs):
        if os.path.exists(str(repo_or_path)):
            return real_load(repo_or_path, **kwargs)
        if not remote_card:
            raise EntryNotFoundError("no README.md")
        return hub.ModelCard("---\nlicense: mit\ntags:\n- mine\n---\n\n# Their adapter\n")

    real_load = hub.ModelCard.load
    with mock.patch("huggingface_hub.HfApi.create_repo") as create_repo, \
            mock.patch("huggingface_hub.HfApi.create_branch") as create_branch, \
            mock.patch("huggingface_hub.HfApi.upload_folder", side_effect=upload_folder), \
            mock.patch("huggingface_hub.ModelCard.load", side_effect=load_card):
        create_repo.return_value = mock.Mock(repo_id="me/adapter")
        result = model.push_to_hub("adapter", commit_message="first", commit_description="desc", revision="dev",
                                   tags=["t1"], safe_serialization=False)
    assert result == "commit-info"
    create_repo.assert_called_once()
    create_branch.assert_called_once_with(repo_id="me/adapter", branch="dev", token=None, exist_ok=True)
    assert seen["repo_id"] == "me/adapter" and seen["commit_message"] == "first"
    assert seen["commit_description"] == "desc" and seen["revision"] == "dev" and seen["create_pr"] is False
    assert seen["files"] == ["README.md", "adapter_config.json", "adapter_model.bin"]
    meta = yaml.safe_load(re.search(r"---\n(.*?)\n---", seen["card"], re.DOTALL).group(1))
    assert meta["library_name"] == "peft" and "lora" in meta["tags"] and "t1" in meta["tags"]
    assert ("# Their adapter" in seen["card"]) == remote_card
    assert (meta.get("license") == "mit" and "mine" in meta["tags"]) == remote_card


# ---- save_pretrained details ------------------------------------------------------------------------
def test_save_pretrained_selected_adapters_error_and_non_main_process(tmp_path):
    ref, ours = _both(**_lora_kwargs())
    messages = []
    for model in (ref, ours):
        with pytest.raises(ValueError) as err:
            model.save_pretrained(str(tmp_path / "x"), selected_adapters=["default", "nope"])
        messages.append(str(err.value))
    assert messages[1] == messages[0]
    # a non-main rank builds the state dict (a collective under FSDP) but writes nothing
    with mock.patch("peft_fast.peft_model.get_peft_model_state_dict",
                    wraps=peft_fast.get_peft_model_state_dict) as get_state:
        ours.save_pretrained(str(tmp_path / "rank1"), is_main_process=False)
    assert get_state.call_count == 1 and not (tmp_path / "rank1").exists()


# ---- loading from the Hub (downloads mocked) --------------------------------------------------------
def _fake_hub(root, calls):
    from huggingface_hub.errors import EntryNotFoundError

    def hf_hub_download(repo_id, filename, subfolder=None, **kwargs):
        calls.append((repo_id, filename, subfolder, kwargs))
        path = os.path.join(root, subfolder or "", filename)
        if not os.path.isfile(path):
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return path

    return hf_hub_download


@pytest.mark.parametrize("safe", [True, False])
def test_from_pretrained_downloads_from_the_hub(tmp_path, safe):
    pytest.importorskip("huggingface_hub")
    model = peft_fast.get_peft_model(_mlp(), peft_fast.LoraConfig(**_lora_kwargs()))
    model.save_pretrained(str(tmp_path / "sub"), safe_serialization=safe)
    x = torch.randn(3, 10)
    with torch.no_grad():
        expected = model(x)
    calls = []
    with mock.patch("huggingface_hub.hf_hub_download", side_effect=_fake_hub(str(tmp_path), calls)):
        loaded = peft_fast.PeftModel.from_pretrained(_mlp(), "org/adapter", subfolder="sub", revision="v1")
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    files = [c[1] for c in calls]
    assert files[0] == "adapter_config.json"
    assert files[1:] == (["adapter_model.safetensors"] if safe else ["adapter_model.safetensors", "adapter_model.bin"])
    assert all(c[0] == "org/adapter" and c[2] == "sub" and c[3].get("revision") == "v1" for c in calls)


def test_hub_errors_and_offline_mode(tmp_path):
    pytest.importorskip("huggingface_hub")
    calls = []
    with mock.patch("huggingface_hub.hf_hub_download", side_effect=_fake_hub(str(tmp_path), calls)):
        with pytest.raises(ValueError, match=re.escape("Can't find 'adapter_config.json' at 'org/none'")):
            peft_fast.PeftConfig.from_pretrained("org/none")
        with pytest.raises(ValueError, match=re.escape("Can't find weights for org/none in org/none or in the "
                                                       "Hugging Face Hub")):
            peft_fast.load_peft_weights("org/none")
        with mock.patch("huggingface_hub.constants.HF_HUB_OFFLINE", True):
            with pytest.raises(ValueError):
                peft_fast.load_peft_weights("org/none")
    assert calls[-1][3].get("local_files_only") is True


# ---- adapter_config.json details ----------------------------------------------------------------------
def test_config_texts_same_as_peft(tmp_path):
    import json
    import warnings

    for cls_name in ("LoraConfig", "IA3Config"):
        messages = []
        for lib in (peft, peft_fast):
            with pytest.raises(ValueError) as err:
                getattr(lib, cls_name)(task_type="nope")
            messages.append(str(err.value))
        assert messages[1] == messages[0]
    (tmp_path / "adapter_config.json").write_text(json.dumps({"foo": "bar"}))
    messages = []
    for lib in (peft, peft_fast):
        with pytest.raises(TypeError) as err:
            lib.LoraConfig.from_pretrained(str(tmp_path))
        messages.append(str(err.value))
    assert messages[1] == messages[0]
    cfg = peft_fast.LoraConfig(target_modules=["lin0"])
    cfg.save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "from_the_future": 1}))
    caught = []
    for lib in (peft, peft_fast):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            lib.PeftConfig.from_pretrained(str(tmp_path))
        caught.append([str(w.message) for w in rec if "Unexpected keyword arguments" in str(w.message)])
    assert caught[1] == caught[0] and len(caught[0]) == 1


@pytest.mark.parametrize("commit", ["abcdef0", None, RuntimeError])
def test_peft_version_of_a_dev_version(monkeypatch, tmp_path, commit):
    from peft_fast import config as config_module

    monkeypatch.setattr(config_module, "__version__", "0.15.0.dev7")

    def fake_commit_hash(pkg_name):
        if commit is RuntimeError:
            raise RuntimeError("no metadata")
        return commit

    monkeypatch.setattr(config_module, "_get_commit_hash", fake_commit_hash)
    if commit is RuntimeError:
        with pytest.warns(UserWarning, match="A dev version of PEFT is used"):
            cfg = peft_fast.LoraConfig(target_modules=["lin0"])
    else:
        cfg = peft_fast.LoraConfig(target_modules=["lin0"])
    expected = "0.15.0.dev7@" + (commit if isinstance(commit, str) else "UNKNOWN")
    assert cfg.peft_version == expected
    cfg.save_pretrained(str(tmp_path))
    monkeypatch.setattr(config_module, "__version__", "0.1.another-version")
    assert peft_fast.PeftConfig.from_pretrained(str(tmp_path)).peft_version == expected
