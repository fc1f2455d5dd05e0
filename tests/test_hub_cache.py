"""Hub ids everywhere PEFT takes them (issue #14, item 2), offline, with real `peft` as the oracle.

The test lays out a Hugging Face cache itself, exactly as huggingface_hub writes it
(``models--org--name/{blobs/<sha>, snapshots/<commit>/<files as relative symlinks to the blobs>,
refs/<branch> holding the commit}``), with a tiny Llama base model and adapters saved by peft_fast
and by real peft: on ``main`` (at the root and in a subfolder), on a second branch ``v2``, and at a
commit no ref points to (reached by its bare commit id, saved as ``adapter_model.bin``). Every entry
point (``PeftModel.from_pretrained`` and a task class, ``load_adapter``, ``AutoPeftModelForCausalLM``,
``PeftConfig/LoraConfig.from_pretrained``, ``load_peft_weights``) loads from it with
``HF_HUB_OFFLINE=1`` (environment *and* ``huggingface_hub.constants.HF_HUB_OFFLINE``, which
huggingface_hub reads once at import), with peft_fast and with peft, and must give the same logits
and config. Missing repo / revision / file errors must name what is missing. ``push_to_hub`` is
run with the HfApi calls captured (nothing reaches the network) and must upload exactly what
``save_pretrained`` writes, model card included.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

import peft_fast

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
hub = pytest.importorskip("huggingface_hub")
yaml = pytest.importorskip("yaml")

from huggingface_hub import constants as hub_constants  # noqa: E402
from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: E402

BASE = "org/tiny-llama"
FAST = "org/adapter-fast"  # adapters saved by peft_fast
REF = "org/adapter-peft"  # adapters saved by real peft
CONFIG_ONLY = "org/config-only"  # adapter_config.json but no weights
ON_V_BASE = {"peft_fast": "org/fast-on-v-base", "peft": "org/peft-on-v-base"}  # base model at its branch v-base
NO_TASK = {"peft_fast": "org/fast-no-task", "peft": "org/peft-no-task"}  # task_type=None: auto_mapping used
WITH_TOKENIZER = "org/adapter-with-tokenizer"  # FAST's main adapter + a 130-token tokenizer (base: 128)
LIBS = {"peft": peft, "peft_fast": peft_fast}


def _commit(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


# where an adapter lives in a repo: (revision passed, subfolder passed)
WHERE = {
    "main": (None, None),
    "main-sub": (None, "sub"),
    "branch": ("v2", None),
    "bare-commit": (_commit("bare"), None),
}


# ---- building the cache ----------------------------------------------------------------------------
def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _add_snapshot(cache: str, repo_id: str, files: dict[str, bytes], commit: str, refs=()) -> None:
    """What hf_hub_download leaves behind: content-addressed blobs (sha256 for LFS files, the git
    blob sha1 for small text files), the snapshot's files as relative symlinks to them, and a ref
    file per branch holding the commit hash (no newline)."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    for rel, data in files.items():
        lfs = not rel.endswith((".json", ".md", ".txt"))
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data))
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(repo, "snapshots", commit, *rel.split("/"))
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    for ref in refs:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)


def _dir_files(directory: str, prefix: str = "") -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(directory):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[prefix + os.path.relpath(p, directory).replace(os.sep, "/")] = f.read()
    return out


def _tiny_llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _lora(lib, where: str):
    """A different adapter per location, so loading the wrong one cannot pass."""
    targets = {"main": ["q_proj", "v_proj"], "main-sub": ["k_proj", "o_proj"], "branch": ["q_proj", "up_proj"],
               "bare-commit": ["v_proj", "down_proj"]}[where]
    return lib.LoraConfig(target_modules=targets, r=2 + len(where) % 3, lora_alpha=8, init_lora_weights=False,
                          task_type="CAUSAL_LM")


def _load_base(**kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(BASE, **kwargs).eval()


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _offline(monkeypatch, cache: str) -> None:
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE=cache, in the environment and in huggingface_hub.constants
    (both are read once, when huggingface_hub is imported)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", cache)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    cache_dir = str(root / "hub")
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, cache_dir)
        base_dir = str(root / "base")
        _tiny_llama().save_pretrained(base_dir)
        _add_snapshot(cache_dir, BASE, _dir_files(base_dir), _commit("base"), refs=["main"])
        x = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
        expected = {}
        for repo, lib in ((FAST, peft_fast), (REF, peft)):
            snapshots = {}  # commit -> files
            for i, where in enumerate(WHERE):
                base = _load_base()  # name_or_path is the Hub id, as for a user's model
                torch.manual_seed(10 + i)
                model = lib.get_peft_model(base, _lora(lib, where)).eval()
                expected[repo, where] = _logits(model, x)
                out = str(root / repo.replace("/", "_") / where)
                model.save_pretrained(out, safe_serialization=(where != "bare-commit"))
                revision, subfolder = WHERE[where]
                commit = revision if where == "bare-commit" else _commit(f"{repo}@{revision or 'main'}")
                snapshots.setdefault(commit, {}).update(_dir_files(out, f"{subfolder}/" if subfolder else ""))
            for commit, files in snapshots.items():
                refs = [r for r in ("main", "v2") if commit == _commit(f"{repo}@{r}")]
                _add_snapshot(cache_dir, repo, files, commit, refs=refs)
        config_file = _dir_files(str(root / FAST.replace("/", "_") / "main"))["adapter_config.json"]
        _add_snapshot(cache_dir, CONFIG_ONLY, {"adapter_config.json": config_file}, _commit("cfg"), refs=["main"])
        # a second base-model revision, and adapters trained on it (their config records revision="v-base")
        torch.manual_seed(5)
        base_v = transformers.LlamaForCausalLM(_tiny_llama().config)
        base_v.save_pretrained(str(root / "base-v"))
        _add_snapshot(cache_dir, BASE, _dir_files(str(root / "base-v")), _commit("base-v"), refs=["v-base"])
        for name, repo in ON_V_BASE.items():
            lib = LIBS[name]
            torch.manual_seed(20)
            model = lib.get_peft_model(_load_base(revision="v-base"), _lora(lib, "main"), revision="v-base").eval()
            expected[repo, "main"] = _logits(model, x)
            model.save_pretrained(str(root / repo.replace("/", "_")))
            _add_snapshot(cache_dir, repo, _dir_files(str(root / repo.replace("/", "_"))), _commit(repo), refs=["main"])
        for name, repo in NO_TASK.items():  # no task type: adapter_config.json records the base model class
            lib = LIBS[name]
            config = _lora(lib, "branch")
            config.task_type = None
            torch.manual_seed(30)
            model = lib.get_peft_model(_load_base(), config).eval()
            expected[repo, "main"] = _logits(model, x)
            model.save_pretrained(str(root / repo.replace("/", "_")))
            _add_snapshot(cache_dir, repo, _dir_files(str(root / repo.replace("/", "_"))), _commit(repo), refs=["main"])
        # an adapter repo with a tokenizer larger than the base model's vocabulary
        files = _dir_files(str(root / FAST.replace("/", "_") / "main"))
        files.update(_dir_files(_tokenizer_dir(str(root / "tok"), 130)))
        files["config.json"] = _dir_files(base_dir)["config.json"]  # transformers 5's AutoTokenizer wants one
        _add_snapshot(cache_dir, WITH_TOKENIZER, files, _commit(WITH_TOKENIZER), refs=["main"])
    return SimpleNamespace(dir=cache_dir, x=x, expected=expected)


def _tokenizer_dir(out: str, vocab_size: int) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
    assert len(fast) == vocab_size
    fast.save_pretrained(out)
    return out


@pytest.fixture
def offline(monkeypatch, cache):
    _offline(monkeypatch, cache.dir)
    return cache


def _hub_kwargs(where: str) -> dict:
    revision, subfolder = WHERE[where]
    return {k: v for k, v in (("revision", revision), ("subfolder", subfolder)) if v is not None}


def _config_dict(config) -> dict:
    d = config.to_dict()
    return {k: (sorted(v) if isinstance(v, (set, list)) and all(isinstance(i, str) for i in v) else
                getattr(v, "value", v)) for k, v in d.items()}


def _assert_same_config(ours, ref) -> None:
    a, b = _config_dict(ours), _config_dict(ref)
    shared = set(a) & set(b)
    assert {"r", "lora_alpha", "target_modules", "base_model_name_or_path", "revision", "task_type", "peft_type",
            "inference_mode"} <= shared
    assert {k: a[k] for k in shared} == {k: b[k] for k in shared}
    assert type(ours).__name__ == type(ref).__name__


# ---- loading ---------------------------------------------------------------------------------------
PEFT_OFFLINE_SUBFOLDER_BUG = ("peft 0.21.2's load_peft_weights, offline, asks the cache for "
                              "'sub/sub/adapter_model.safetensors' (the subfolder joined twice)")


def _peft_or_bug(fn, where):
    """Run `fn` with real peft; where peft has the offline-subfolder bug, assert it is still there
    (so this test notices the day it is fixed) and return None."""
    if where == "main-sub":
        with pytest.raises(LocalEntryNotFoundError):
            fn()
        return None
    return fn()


@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("repo", [FAST, REF])
def test_peft_model_from_pretrained_hub_id(offline, repo, where):
    """PeftModel.from_pretrained(base, "org/adapter", revision=..., subfolder=...) from the cache."""
    expected = offline.expected[repo, where]
    ours = peft_fast.PeftModel.from_pretrained(_load_base(), repo, **_hub_kwargs(where))
    assert isinstance(ours, peft_fast.PeftModelForCausalLM)
    torch.testing.assert_close(_logits(ours, offline.x), expected)
    ref = _peft_or_bug(lambda: peft.PeftModel.from_pretrained(_load_base(), repo, **_hub_kwargs(where)), where)
    if ref is not None:
        torch.testing.assert_close(_logits(ref, offline.x), expected)
        _assert_same_config(ours.peft_config["default"], ref.peft_config["default"])
    assert ours.peft_config["default"].inference_mode is True  # loaded for inference, as in PEFT


@pytest.mark.parametrize("where", ["main", "branch"])
def test_task_class_from_pretrained_hub_id(offline, where):
    for lib in LIBS.values():
        model = lib.PeftModelForCausalLM.from_pretrained(_load_base(), FAST, is_trainable=True, **_hub_kwargs(where))
        assert type(model).__name__ == "PeftModelForCausalLM"
        torch.testing.assert_close(_logits(model, offline.x), offline.expected[FAST, where])
        assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("repo", [FAST, REF])
def test_load_adapter_hub_id(offline, repo):
    """load_adapter of a branch, a bare commit and a subfolder next to the main adapter."""
    results = {}
    for name, lib in LIBS.items():
        model = lib.PeftModel.from_pretrained(_load_base(), repo)
        for where in ("branch", "bare-commit", "main-sub"):
            if name == "peft" and where == "main-sub":
                _peft_or_bug(lambda: model.load_adapter(repo, adapter_name=where, **_hub_kwargs(where)), where)
                continue
            model.load_adapter(repo, adapter_name=where, **_hub_kwargs(where))
            model.set_adapter(where)
            results[name, where] = _logits(model, offline.x)
            torch.testing.assert_close(results[name, where], offline.expected[repo, where])
        model.set_adapter("default")
        torch.testing.assert_close(_logits(model, offline.x), offline.expected[repo, "main"])
    for where in ("branch", "bare-commit"):
        torch.testing.assert_close(results["peft_fast", where], results["peft", where])


@pytest.mark.parametrize("where", ["main", "branch", "main-sub"])
def test_auto_peft_model_hub_id(offline, where):
    """AutoPeftModelForCausalLM reads the base model's Hub id from adapter_config.json and loads it
    from the cache too; `revision`/`subfolder` are the adapter's."""
    ours = peft_fast.AutoPeftModelForCausalLM.from_pretrained(FAST, **_hub_kwargs(where))
    assert isinstance(ours, peft_fast.PeftModelForCausalLM)
    assert ours.get_base_model().name_or_path == BASE
    torch.testing.assert_close(_logits(ours, offline.x), offline.expected[FAST, where])
    if where != "main-sub":  # peft also passes the adapter's subfolder to the base model's from_pretrained
        ref = peft.AutoPeftModelForCausalLM.from_pretrained(FAST, **_hub_kwargs(where))
        torch.testing.assert_close(_logits(ref, offline.x), offline.expected[FAST, where])
    else:  # peft looks for the base model in "org/tiny-llama/sub" too, and fails (transformers' OSError)
        with pytest.raises(OSError, match="couldn't find them in the cached files"):
            peft.AutoPeftModelForCausalLM.from_pretrained(FAST, **_hub_kwargs(where))


@pytest.mark.parametrize("saved_by", list(ON_V_BASE))
def test_auto_peft_model_loads_the_base_at_the_configs_revision(offline, saved_by):
    """adapter_config.json's `revision` is the base model's: AutoPeftModel loads "org/tiny-llama" at
    branch v-base (loading it at main gives other logits, checked), with peft_fast and with peft."""
    repo = ON_V_BASE[saved_by]
    expected = offline.expected[repo, "main"]
    wrong = peft_fast.PeftModel.from_pretrained(_load_base(), repo)
    assert not torch.allclose(_logits(wrong, offline.x), expected, atol=1e-3)
    for lib in LIBS.values():
        model = lib.AutoPeftModelForCausalLM.from_pretrained(repo)
        assert model.peft_config["default"].revision == "v-base"
        torch.testing.assert_close(_logits(model, offline.x), expected)


@pytest.mark.parametrize("saved_by", list(NO_TASK))
def test_auto_peft_model_without_task_type_uses_auto_mapping(offline, saved_by):
    """No task type: AutoPeftModel (and AutoPeftModelForCausalLM) rebuild the base model class
    recorded in adapter_config.json's auto_mapping (LlamaForCausalLM, not the bare LlamaModel)."""
    repo = NO_TASK[saved_by]
    for lib in LIBS.values():
        for auto in (lib.AutoPeftModel, lib.AutoPeftModelForCausalLM):
            model = auto.from_pretrained(repo)
            assert type(model.get_base_model()).__name__ == "LlamaForCausalLM"
            torch.testing.assert_close(_logits(model, offline.x), offline.expected[repo, "main"])


def test_auto_peft_model_class_errors_same_as_peft(offline):
    cases = [("AutoPeftModel", FAST, {}),  # a task type needs the task's class
             ("AutoPeftModelForSequenceClassification", FAST, {}),  # the wrong task's class
             ("AutoPeftModel", NO_TASK["peft_fast"], {"import_allowlist": ["diffusers"]})]
    for cls_name, repo, kw in cases:
        messages = []
        for lib in LIBS.values():
            with pytest.raises(ValueError) as err:
                getattr(lib, cls_name).from_pretrained(repo, **kw)
            messages.append(str(err.value))
        assert messages[1] == messages[0], cls_name
    assert "'transformers.models.llama.modeling_llama' which is not in the import allowlist" in messages[0]
    assert peft_fast.auto.get_default_import_allowlist() == peft.auto.get_default_import_allowlist()
    for parent in ("transformers", "transformers.models", "transformersx", "os"):
        assert peft_fast.auto.check_import_allowlist(["transformers"], parent) == \
            peft.auto.check_import_allowlist(["transformers"], parent)


def test_auto_peft_model_resizes_to_a_cached_tokenizer(offline):
    """A tokenizer in the adapter repo larger than the base vocabulary: the embeddings are resized, as
    PEFT does for a local directory or online. (Offline, peft does not look for the tokenizer at all
    and keeps 128 rows; peft_fast reads it from the cache.)"""
    snapshot = os.path.join(offline.dir, "models--" + WITH_TOKENIZER.replace("/", "--"), "snapshots",
                            _commit(WITH_TOKENIZER))
    torch.manual_seed(0)
    ours = peft_fast.AutoPeftModelForCausalLM.from_pretrained(WITH_TOKENIZER)
    torch.manual_seed(0)
    ref = peft.AutoPeftModelForCausalLM.from_pretrained(snapshot)  # a local directory: peft resizes
    ref_offline = peft.AutoPeftModelForCausalLM.from_pretrained(WITH_TOKENIZER)
    assert ours.get_input_embeddings().weight.shape[0] == ref.get_input_embeddings().weight.shape[0] == 130
    assert ref_offline.get_input_embeddings().weight.shape[0] == 128
    logits = _logits(ours, offline.x)
    assert logits.shape[-1] == 130
    torch.testing.assert_close(logits[..., :128], offline.expected[FAST, "main"])
    torch.testing.assert_close(logits, _logits(ref, offline.x))


def test_auto_peft_model_cache_dir_argument(offline, monkeypatch, tmp_path):
    """cache_dir= alone finds adapter and base model (the default cache is empty)."""
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    for lib in LIBS.values():
        with pytest.raises(Exception):  # not in the default cache
            lib.AutoPeftModelForCausalLM.from_pretrained(REF)
        model = lib.AutoPeftModelForCausalLM.from_pretrained(REF, cache_dir=offline.dir, token="hf_unused",
                                                             revision="v2")
        torch.testing.assert_close(_logits(model, offline.x), offline.expected[REF, "branch"])


@pytest.mark.parametrize("where", list(WHERE))
def test_config_from_pretrained_hub_id(offline, where):
    for cls_name in ("PeftConfig", "LoraConfig"):
        ours = getattr(peft_fast, cls_name).from_pretrained(FAST, **_hub_kwargs(where))
        ref = getattr(peft, cls_name).from_pretrained(FAST, **_hub_kwargs(where))
        assert type(ours).__name__ == "LoraConfig"
        _assert_same_config(ours, ref)
        assert ours.revision is None  # the *base model's* revision, not the adapter's


@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("repo", [FAST, REF])
def test_load_peft_weights_hub_id(offline, repo, where):
    ours = peft_fast.load_peft_weights(repo, **_hub_kwargs(where))
    assert ours and all(k.startswith("base_model.model.") for k in ours)
    ref = _peft_or_bug(lambda: peft.load_peft_weights(repo, device="cpu", **_hub_kwargs(where)), where)
    if ref is not None:
        assert sorted(ours) == sorted(ref)
        for k in ref:
            assert torch.equal(ours[k], ref[k]), k


def test_download_options_reach_hf_hub_download(offline):
    """revision, cache_dir and token reach the same hf_hub_download calls as with peft (the calls
    spied on; they still read the cache). PEFT's deprecated `use_auth_token` is taken as the token
    (peft passes it on as is, and huggingface_hub 2 refuses it)."""
    from contextlib import ExitStack

    real = hub.file_download.hf_hub_download
    seen = {}
    for name, lib in LIBS.items():
        calls = seen[name] = set()

        def spy(repo_id, filename, *args, calls=calls, **kw):
            path = f"{kw['subfolder']}/{filename}" if kw.get("subfolder") else filename
            calls.add((repo_id, path, kw.get("revision"), kw.get("token") or kw.get("use_auth_token"),
                       kw.get("cache_dir")))
            return real(repo_id, filename, *args, **kw)

        targets = ["huggingface_hub.hf_hub_download"]
        if name == "peft":
            targets += ["peft.config.hf_hub_download", "peft.peft_model.hf_hub_download",
                        "peft.utils.save_and_load.hf_hub_download"]
        with ExitStack() as stack:
            for target in targets:
                # autospec keeps the signature, which peft reads to sort its kwargs
                stack.enter_context(mock.patch(target, autospec=True, side_effect=spy))
            model = lib.PeftModel.from_pretrained(_load_base(), REF, revision="v2", token="hf_tok",
                                                  cache_dir=offline.dir)
            if name == "peft":  # peft hands use_auth_token to hf_hub_download, which (huggingface_hub >= 1) refuses it
                with pytest.raises(ValueError, match="Can't find 'adapter_config.json'") as err:
                    model.load_adapter(FAST, adapter_name="b", revision=_commit("bare"), use_auth_token="hf_old")
                assert "use_auth_token" in str(err.value.__cause__ or err.value.__context__)
                model.load_adapter(FAST, adapter_name="b", revision=_commit("bare"), token="hf_old")
            else:
                model.load_adapter(FAST, adapter_name="b", revision=_commit("bare"), use_auth_token="hf_old")
            lib.LoraConfig.from_pretrained(FAST, subfolder="sub", token="hf_cfg")
        torch.testing.assert_close(_logits(model, offline.x), offline.expected[REF, "branch"], msg=name)
    assert seen["peft_fast"] == seen["peft"]
    assert (REF, "adapter_model.safetensors", "v2", "hf_tok", offline.dir) in seen["peft_fast"]
    assert (FAST, "adapter_model.bin", _commit("bare"), "hf_old", None) in seen["peft_fast"]
    assert (FAST, "sub/adapter_config.json", None, "hf_cfg", None) in seen["peft_fast"]


def test_local_files_only_without_offline_mode(monkeypatch, cache):
    """local_files_only=True + cache_dir + token, HF_HUB_OFFLINE unset: read from the cache, and no
    request ever made by peft_fast (transformers' own look-up of an adapter_config.json in the base
    model's repo ignores local_files_only; it gets a connection error, as without network)."""
    import inspect

    from huggingface_hub.errors import OfflineModeIsEnabled

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    ours_online = []

    def no_network(url, *args, **kwargs):
        caller = next(f.filename for f in inspect.stack()[1:] if os.sep + "huggingface_hub" + os.sep not in f.filename)
        if os.sep + "peft_fast" + os.sep in caller:  # the download was asked for by peft_fast itself
            ours_online.append(url)
        raise OfflineModeIsEnabled(f"no network in this test: {url}")

    monkeypatch.setattr("huggingface_hub.file_download.get_hf_file_metadata", no_network)
    kw = dict(cache_dir=cache.dir, local_files_only=True, token="hf_unused")
    model = peft_fast.PeftModel.from_pretrained(_load_base(**kw), FAST, revision="v2", **kw)
    torch.testing.assert_close(_logits(model, cache.x), cache.expected[FAST, "branch"])
    model.load_adapter(REF, adapter_name="sub", subfolder="sub", **kw)
    model.set_adapter("sub")
    torch.testing.assert_close(_logits(model, cache.x), cache.expected[REF, "main-sub"])
    auto = peft_fast.AutoPeftModelForCausalLM.from_pretrained(REF, revision=_commit("bare"), **kw)
    torch.testing.assert_close(_logits(auto, cache.x), cache.expected[REF, "bare-commit"])
    assert peft_fast.LoraConfig.from_pretrained(FAST, subfolder="sub", **kw).target_modules == {"k_proj", "o_proj"}
    with pytest.raises(ValueError, match="local_files_only=True"):
        peft_fast.PeftConfig.from_pretrained("org/not-cached", **kw)
    assert ours_online == []


# ---- errors ------------------------------------------------------------------------------------------
ERROR_CASES = {
    # name: (repo, kwargs, strings our message must contain)
    "missing-repo": ("org/not-there", {}, ["org/not-there", "adapter_config.json"]),
    "missing-revision": (FAST, {"revision": "v9"}, [FAST, "v9", "adapter_config.json"]),
    "missing-commit": (FAST, {"revision": "f" * 40}, [FAST, "f" * 40, "adapter_config.json"]),
    "missing-subfolder": (FAST, {"subfolder": "nope"}, [FAST, "nope/adapter_config.json"]),
    "missing-weights": (CONFIG_ONLY, {}, [CONFIG_ONLY, "adapter_model.safetensors", "adapter_model.bin"]),
}


def _entry_points(lib):
    return {
        "PeftConfig.from_pretrained": lambda repo, kw: lib.PeftConfig.from_pretrained(repo, **kw),
        "LoraConfig.from_pretrained": lambda repo, kw: lib.LoraConfig.from_pretrained(repo, **kw),
        "PeftModel.from_pretrained": lambda repo, kw: lib.PeftModel.from_pretrained(_load_base(), repo, **kw),
        "load_adapter": lambda repo, kw: lib.PeftModel.from_pretrained(_load_base(), FAST).load_adapter(
            repo, adapter_name="other", **kw),
        "AutoPeftModelForCausalLM": lambda repo, kw: lib.AutoPeftModelForCausalLM.from_pretrained(repo, **kw),
        "load_peft_weights": lambda repo, kw: lib.load_peft_weights(repo, device="cpu", **kw),
    }


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_hub_errors_name_what_is_missing(offline, case):
    """Each entry point fails where peft fails, with an exception peft's `except` clauses catch, and a
    message naming the repo id, the revision and the file (peft's often names none of them)."""
    repo, kw, needles = ERROR_CASES[case]
    for entry, ours in _entry_points(peft_fast).items():
        config_only = entry in ("PeftConfig.from_pretrained", "LoraConfig.from_pretrained")
        if case == "missing-weights" and config_only:
            assert ours(repo, kw).peft_type.value == "LORA"
            continue
        with pytest.raises(Exception) as ref_err:
            _entry_points(peft)[entry](repo, kw)
        with pytest.raises(Exception) as our_err:
            ours(repo, kw)
        assert isinstance(our_err.value, ref_err.type), (entry, our_err.value, ref_err.value)
        message = str(our_err.value)
        for needle in needles:
            if entry == "load_peft_weights":  # the weights are what it looks for
                needle = needle.replace("adapter_config.json", "adapter_model.safetensors")
            assert needle in message, (entry, needle, message)
        assert "offline" in message.lower() or "HF_HUB_OFFLINE" in message, (entry, message)


def test_online_hub_errors_name_what_is_missing(offline, monkeypatch):
    """Online, the Hub's answers (no such repo / revision / file; hf_hub_download mocked to give
    them, nothing reaches the network) become errors of peft's types naming the repo, revision, file."""
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    bases = {name: _load_base() for name in LIBS}  # loaded while still offline
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    response = SimpleNamespace(headers={}, status_code=404, request=None)
    real = hub.file_download.hf_hub_download

    def fake(repo_id, filename, *args, revision=None, subfolder=None, **kw):
        if repo_id == "org/gone":
            raise RepositoryNotFoundError(f"404 {repo_id}", response=response)
        if revision == "v9":
            raise RevisionNotFoundError(f"404 {revision}", response=response)
        if filename.endswith("adapter_config.json"):
            return real(repo_id, filename, subfolder=subfolder, local_files_only=True, **kw)
        raise RemoteEntryNotFoundError(f"404 {filename}", response=response)

    for target in ("huggingface_hub.hf_hub_download", "peft.config.hf_hub_download",
                   "peft.utils.save_and_load.hf_hub_download"):
        monkeypatch.setattr(target, mock.create_autospec(real, side_effect=fake))
    monkeypatch.setattr("peft.utils.save_and_load.file_exists", lambda *a, **k: False)
    cases = [("org/gone", {}, ["has no repo 'org/gone'"]),
             (FAST, {"revision": "v9"}, [FAST, "has no revision 'v9'"]),
             (CONFIG_ONLY, {}, [f"repo '{CONFIG_ONLY}' at revision 'main' has no 'adapter_model.safetensors' or "
                                "'adapter_model.bin'"])]
    for repo, kw, needles in cases:
        errors = {}
        for name, lib in LIBS.items():
            with pytest.raises(Exception) as err:
                lib.PeftModel.from_pretrained(bases[name], repo, **kw)
            errors[name] = err.value
        assert isinstance(errors["peft_fast"], type(errors["peft"])), (errors["peft_fast"], errors["peft"])
        assert str(errors["peft_fast"]).startswith(str(errors["peft"])), (errors["peft_fast"], errors["peft"])
        for needle in needles:
            assert needle.lower() in str(errors["peft_fast"]).lower(), (needle, errors["peft_fast"])


def test_missing_weights_message_names_the_cached_snapshot(offline):
    with pytest.raises(LocalEntryNotFoundError) as err:
        peft_fast.PeftModel.from_pretrained(_load_base(), CONFIG_ONLY)
    message = str(err.value)
    assert _commit("cfg") in message and "main" in message and "adapter_model.bin" in message


def test_missing_revision_message_lists_the_cached_ones(offline):
    with pytest.raises(ValueError) as err:
        peft_fast.PeftConfig.from_pretrained(FAST, revision="v9")
    assert "'main'" in str(err.value) and "'v2'" in str(err.value)


# ---- model card and push_to_hub ----------------------------------------------------------------------
def _front_matter(text: str) -> dict:
    return yaml.safe_load(re.match(r"---\n(.*?)\n---", text, re.DOTALL).group(1))


def test_model_card_of_a_hub_model_same_as_peft(offline, tmp_path):
    cards = {}
    for name, lib in LIBS.items():
        model = lib.PeftModel.from_pretrained(_load_base(), REF, revision="v2")
        model.save_pretrained(str(tmp_path / name))
        cards[name] = (tmp_path / name / "README.md").read_text(encoding="utf-8")
    assert cards["peft_fast"] == cards["peft"]
    meta = _front_matter(cards["peft_fast"])
    assert meta == {"base_model": BASE, "library_name": "peft", "pipeline_tag": "text-generation",
                    "tags": [f"base_model:adapter:{BASE}", "lora", "transformers"]}


@pytest.mark.parametrize("safe", [True, False])
def test_push_to_hub_uploads_what_save_pretrained_writes(offline, tmp_path, safe):
    """Two adapters (one in a sub-folder), model card included: byte for byte the save_pretrained
    folder. create_repo / create_branch / upload_folder / ModelCard.load are captured; no request."""
    from huggingface_hub.errors import EntryNotFoundError

    model = peft_fast.PeftModel.from_pretrained(_load_base(), FAST)
    model.load_adapter(FAST, adapter_name="second", revision="v2")
    model.save_pretrained(str(tmp_path / "saved"), safe_serialization=safe)
    saved = _dir_files(str(tmp_path / "saved"))
    uploaded, calls = {}, []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=f"me/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, kwargs))
        uploaded.update(_dir_files(folder_path))
        return "commit-info"

    def card_load(repo_id_or_path, **kwargs):
        if os.path.exists(str(repo_id_or_path)):
            return real_card_load(repo_id_or_path, **kwargs)
        calls.append(("ModelCard.load", repo_id_or_path, kwargs))
        raise EntryNotFoundError("no README.md in a new repo")

    real_card_load = hub.ModelCard.load
    with mock.patch.object(hub.HfApi, "create_repo", create_repo), \
            mock.patch.object(hub.HfApi, "create_branch", create_branch), \
            mock.patch.object(hub.HfApi, "upload_folder", upload_folder), \
            mock.patch.object(hub.ModelCard, "load", side_effect=card_load):
        assert model.push_to_hub("adapter", revision="dev", token="hf_x", safe_serialization=safe) == "commit-info"
    assert sorted(uploaded) == sorted(saved)
    for name, data in saved.items():
        if name.endswith(".bin"):  # a torch zip names its records after the (temporary) file: compare tensors
            a, b = (torch.load(io.BytesIO(d), weights_only=True) for d in (uploaded[name], data))
            assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name
        else:
            assert uploaded[name] == data, name
    expected_files = {"README.md", "adapter_config.json", "second/adapter_config.json"} | \
        {f"{p}adapter_model.{'safetensors' if safe else 'bin'}" for p in ("", "second/")}
    assert set(saved) == expected_files
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "ModelCard.load", "upload_folder"]
    assert calls[1][1] == "me/adapter" and calls[1][2]["branch"] == "dev" and calls[2][1] == "me/adapter"
    assert calls[3][1] == "me/adapter" and calls[3][2]["revision"] == "dev" and calls[3][2]["token"] == "hf_x"
    meta = _front_matter(uploaded["README.md"].decode())
    assert meta["library_name"] == "peft" and meta["base_model"] == BASE
    assert json.loads(uploaded["adapter_config.json"])["base_model_name_or_path"] == BASE


def test_push_to_hub_keeps_peft_s_card_where_peft_loses_it(offline):
    """The one deliberate difference (utils/hub.py): peft's push_to_hub (transformers' PushToHubMixin)
    replaces the card save_pretrained wrote by transformers' generic one (library_name: transformers,
    no tags) for a new repo; peft_fast uploads PEFT's card, the one peft's save_pretrained writes."""
    from huggingface_hub.errors import EntryNotFoundError

    real_card_load = hub.ModelCard.load
    uploaded = {}

    def card_load(repo_id_or_path, **kwargs):
        if os.path.exists(str(repo_id_or_path)):
            return real_card_load(repo_id_or_path, **kwargs)
        raise EntryNotFoundError("no README.md in a new repo")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded[lib_name] = _dir_files(folder_path)["README.md"].decode()

    def create_commit(self, repo_id, operations, **kwargs):  # what transformers' push_to_hub uses
        for op in operations:
            if op.path_in_repo == "README.md":
                with open(op.path_or_fileobj, encoding="utf-8") as f:
                    uploaded[lib_name] = f.read()

    with mock.patch.object(hub.HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id)), \
            mock.patch.object(hub.HfApi, "upload_folder", upload_folder), \
            mock.patch.object(hub.HfApi, "create_commit", create_commit), \
            mock.patch.object(hub.ModelCard, "load", side_effect=card_load):
        for lib_name, lib in LIBS.items():
            lib.PeftModel.from_pretrained(_load_base(), FAST).push_to_hub("me/adapter")
    assert _front_matter(uploaded["peft"]) == {"library_name": "transformers", "tags": []}
    assert _front_matter(uploaded["peft_fast"]) == {
        "base_model": BASE, "library_name": "peft", "pipeline_tag": "text-generation",
        "tags": [f"base_model:adapter:{BASE}", "lora", "transformers"]}


def test_transformers_hub_paths_under_the_peft_alias(offline):
    """With ``peft_fast.as_peft()``, transformers' own Hub paths (``model.load_adapter(repo id)`` with
    its `adapter_kwargs`, ``AutoModelForCausalLM.from_pretrained(adapter repo id)``) build peft_fast's
    layers from the cache, with the right revision / subfolder."""
    from peft_fast.tuners.lora.layer import LoraLayer

    with peft_fast.as_peft():
        model = _load_base()
        model.load_adapter(REF, adapter_kwargs={"revision": "v2"})
        assert isinstance(model.model.layers[0].self_attn.q_proj, LoraLayer)
        torch.testing.assert_close(_logits(model, offline.x), offline.expected[REF, "branch"])
        model.load_adapter(FAST, adapter_name="sub", adapter_kwargs={"subfolder": "sub"})  # made active, as with peft
        torch.testing.assert_close(_logits(model, offline.x), offline.expected[FAST, "main-sub"])
        model.set_adapter("default")
        torch.testing.assert_close(_logits(model, offline.x), offline.expected[REF, "branch"])
        auto = transformers.AutoModelForCausalLM.from_pretrained(FAST).eval()
        assert isinstance(auto.model.layers[0].self_attn.v_proj, LoraLayer)
        torch.testing.assert_close(_logits(auto, offline.x), offline.expected[FAST, "main"])
