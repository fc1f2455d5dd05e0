"""QLoRA plumbing on CPU.

- `prepare_model_for_kbit_training` against peft 0.21.2's on identical models: a bf16 tiny Llama
  flagged as quantized in several ways, a real bitsandbytes NF4 tiny Llama, and a non-transformers
  module (the forward-hook fallback): same requires_grad flags, same dtype per parameter, same
  gradient checkpointing (per-module flag and checkpoint kwargs), same input-grad behaviour.
- transformers' `Trainer` trains a peft_fast model with real `peft` hidden (a subprocess where
  `import peft` fails and `is_peft_available()` is False): loss goes down, only adapter weights
  change, checkpoints and `save_model` write PEFT-format adapters that real peft then loads to the
  same logits. Plain tiny Llama, then an NF4 base; the purely quantized base is still refused.
- `peft_fast.trainer_integration` install/uninstall restores transformers exactly.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import peft_fast

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                  attention_dropout=0.0)


def tiny_llama(dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).to(dtype)


def bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def nf4_config():
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved random tiny Llama (bf16): `from_pretrained` is the only way to get a bnb model."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(torch.bfloat16).save_pretrained(path)
    return path


def load_nf4(path: Path):
    if not bnb_available():
        pytest.skip("bitsandbytes is not importable")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4_config(),
                                                              dtype=torch.bfloat16)
    # DESIGN.md: a no-grad eval-mode forward can repack bnb weights on avx512_bf16 CPUs
    return model.train()


# --------------------------------------------------------------------------------------------
# prepare_model_for_kbit_training: parity with peft
# --------------------------------------------------------------------------------------------
def checkpointing_state(model: nn.Module) -> dict:
    """Per module: the `gradient_checkpointing` flag and the checkpoint function's kwargs."""
    state = {}
    for name, module in model.named_modules():
        if hasattr(module, "gradient_checkpointing"):
            fn = getattr(module, "_gradient_checkpointing_func", None)
            kw = None
            if isinstance(fn, functools.partial):
                kw = (getattr(fn.func, "__qualname__", repr(fn.func)), fn.args, dict(fn.keywords))
            state[name] = (bool(module.gradient_checkpointing), kw)
    return state


def prepared_state(model: nn.Module, ids: torch.Tensor) -> dict:
    emb = model.get_input_embeddings()
    out = emb(ids)  # grad mode on: requires_grad only if a hook asks for it (all params are frozen)
    return {
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "dtype": {n: (p.dtype, type(p).__name__) for n, p in model.named_parameters()},
        "checkpointing": checkpointing_state(model),
        "embedding_output_requires_grad": out.requires_grad,
        "embedding_hooks": len(emb._forward_hooks),
    }


def assert_same_preparation(ours: nn.Module, theirs: nn.Module) -> dict:
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 5))
    a, b = prepared_state(ours, ids), prepared_state(theirs, ids)
    for key in a:
        assert a[key] == b[key], f"{key} differs from peft:\npeft_fast: {a[key]}\npeft:      {b[key]}"
    assert not any(a["requires_grad"].values()), "prepare_model_for_kbit_training must freeze everything"
    return a


FLAGS = {
    "not_quantized": {},
    "4bit": {"is_loaded_in_4bit": True},
    "8bit": {"is_loaded_in_8bit": True},
    "gptq": {"quantization_method": "gptq"},  # quantized, but fp16/bf16 kept as they are
    "hqq": {"hqq_quantized": True},
}


@pytest.mark.parametrize("flag", list(FLAGS))
@pytest.mark.parametrize("use_gc,gc_kwargs", [(True, None), (True, {"use_reentrant": False}),
                                              (True, {"use_reentrant": True}), (False, None)],
                         ids=["gc-default", "gc-nonreentrant", "gc-reentrant", "no-gc"])
def test_prepare_matches_peft_on_flagged_bf16_llama(flag, use_gc, gc_kwargs):
    base = tiny_llama(torch.bfloat16)
    for k, v in FLAGS[flag].items():
        setattr(base, k, v)
    ours, theirs = base, copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5: gradient_checkpointing_enable is deprecated
        out = peft_fast.prepare_model_for_kbit_training(ours, use_gradient_checkpointing=use_gc,
                                                        gradient_checkpointing_kwargs=copy.deepcopy(gc_kwargs))
        peft.prepare_model_for_kbit_training(theirs, use_gradient_checkpointing=use_gc,
                                             gradient_checkpointing_kwargs=copy.deepcopy(gc_kwargs))
    assert out is ours
    state = assert_same_preparation(ours, theirs)
    # spot checks that the comparison is not vacuous
    norm_dtype = state["dtype"]["model.norm.weight"][0]
    assert norm_dtype == (torch.bfloat16 if flag in ("gptq", "hqq") else torch.float32)
    quantized = flag != "not_quantized"
    assert any(on for on, _ in state["checkpointing"].values()) == (quantized and use_gc)
    # PEFT skips its input-grad hack for use_reentrant=False, but transformers 5's checkpointing
    # enables input grads itself for input_ids models, so both come out the same here
    assert state["embedding_output_requires_grad"] == (quantized and use_gc)


def test_prepare_matches_peft_on_nf4_llama(tiny_llama_dir):
    ours, theirs = load_nf4(tiny_llama_dir), load_nf4(tiny_llama_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_fast.prepare_model_for_kbit_training(ours)
        peft.prepare_model_for_kbit_training(theirs)
    state = assert_same_preparation(ours, theirs)
    kinds = {kind for _, kind in state["dtype"].values()}
    assert "Params4bit" in kinds
    for name, (dtype, kind) in state["dtype"].items():
        assert dtype == (torch.uint8 if kind == "Params4bit" else torch.float32), name
    assert all(on for on, _ in state["checkpointing"].values())
    assert state["embedding_output_requires_grad"]
    # the prepared NF4 model still trains through its frozen 4-bit layers
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 6))
    ours(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in ours.parameters())


class NoTransformersModel(nn.Module):
    """Not a PreTrainedModel: no `enable_input_require_grads`, a kwargs-less
    `gradient_checkpointing_enable` -> the forward-hook fallback and the FutureWarning."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(TINY_LLAMA["vocab_size"], 8).to(torch.float16)
        self.norm = nn.LayerNorm(8).to(torch.bfloat16)
        self.is_loaded_in_4bit = True
        self.gc_calls = 0

    def get_input_embeddings(self):
        return self.emb

    def gradient_checkpointing_enable(self):
        self.gc_calls += 1


def test_prepare_matches_peft_fallbacks_without_transformers_api():
    ours, theirs = NoTransformersModel(), NoTransformersModel()
    with pytest.warns(FutureWarning, match="gradient_checkpointing_kwargs is not supported"):
        peft_fast.prepare_model_for_kbit_training(ours, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.warns(FutureWarning, match="gradient_checkpointing_kwargs is not supported"):
        peft.prepare_model_for_kbit_training(theirs, gradient_checkpointing_kwargs={"use_reentrant": True})
    state = assert_same_preparation(ours, theirs)
    assert state["embedding_output_requires_grad"] and state["embedding_hooks"] == 1
    assert ours.gc_calls == theirs.gc_calls == 1
    assert {d for d, _ in state["dtype"].values()} == {torch.float32}


def test_exported_like_peft():
    import peft_fast.utils

    assert peft_fast.prepare_model_for_kbit_training is peft_fast.utils.prepare_model_for_kbit_training
    # peft 0.21.2 no longer has prepare_model_for_int8_training; neither do we
    assert not hasattr(peft, "prepare_model_for_int8_training")
    assert not hasattr(peft_fast, "prepare_model_for_int8_training")
    import inspect

    ours = inspect.signature(peft_fast.prepare_model_for_kbit_training).parameters
    theirs = inspect.signature(peft.prepare_model_for_kbit_training).parameters
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in theirs.values()]


# --------------------------------------------------------------------------------------------
# Trainer with real peft hidden (one subprocess runs every scenario: imports dominate its time)
# --------------------------------------------------------------------------------------------
_CHILD = textwrap.dedent(r"""
    import sys
    sys.modules["peft"] = None  # real peft hidden: `import peft` fails, find_spec("peft") is None
    import json, os, traceback
    work, tiny, modes = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
    import torch
    torch.set_num_threads(1)
    import peft_fast  # first: the integration patches transformers.trainer* as they get imported
    import transformers.trainer
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Trainer,
                              TrainingArguments)
    from transformers.utils import is_peft_available

    try:
        import peft  # noqa: F401
        peft_importable = True
    except ImportError:
        peft_importable = False

    cfg = LlamaConfig(**tiny)
    # a learnable toy language: each row counts up with its own stride
    data = [{"input_ids": (torch.arange(16) * (s + 1)) % cfg.vocab_size} for s in range(8)]
    for row in data:
        row["labels"] = row["input_ids"].clone()
        row["attention_mask"] = torch.ones_like(row["input_ids"])
    batch = {k: torch.stack([r[k] for r in data]) for k in data[0]}


    def loss_and_logits(model):
        model.train()  # train mode (dropout is 0 everywhere); see DESIGN.md on bnb repacking in eval
        with torch.no_grad():
            out = model(**batch)
        return out.loss.item(), out.logits


    def run(mode, work):
        res = {"peft_available": is_peft_available(), "peft_importable": peft_importable}
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(os.path.join(work, "base"))
        args = dict(output_dir=os.path.join(work, "run"), per_device_train_batch_size=4, learning_rate=3e-2,
                    max_steps=8, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                    save_strategy="steps", save_steps=4)
        if mode == "plain":
            base = AutoModelForCausalLM.from_pretrained(os.path.join(work, "base"))
            targets = ["q_proj", "v_proj"]
            # checkpoints, evaluation and load_best_model_at_end go through Trainer's PEFT paths too
            args.update(eval_strategy="steps", eval_steps=4, load_best_model_at_end=True)
        else:
            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_compute_dtype=torch.float32)
            base = AutoModelForCausalLM.from_pretrained(os.path.join(work, "base"), quantization_config=bnb,
                                                        dtype=torch.bfloat16).train()
            try:
                Trainer(model=base, args=TrainingArguments(**args), train_dataset=data)
                res["bare_quantized_refused"] = None
            except ValueError as e:
                res["bare_quantized_refused"] = str(e)
            base = peft_fast.prepare_model_for_kbit_training(base)
            # "qlora-embed": LoRA only on the non-quantized embed_tokens / lm_head (gradients still flow
            # back through every frozen Linear4bit); "qlora-linear4bit": LoRA on the Linear4bit layers
            targets = ["embed_tokens", "lm_head"] if mode == "qlora-embed" else ["q_proj", "v_proj"]
        config = peft_fast.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                      task_type="CAUSAL_LM")
        model = peft_fast.get_peft_model(base, config)
        res["loss_before"], _ = loss_and_logits(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=data,
                          eval_dataset=data[:4] if mode == "plain" else None)
        res["label_names"] = trainer.label_names
        transformers.trainer.update_fsdp_plugin_peft(model, None)  # FSDP hook: must not import peft
        res["gradient_checkpointing"] = bool(getattr(model, "is_activation_checkpointing", False))
        trainer.train()
        res["loss_after"], logits = loss_and_logits(model)
        torch.save(logits, os.path.join(work, "logits.pt"))
        res["train_losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        res["eval_losses"] = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
        res["changed"] = sorted(n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n]))
        res["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        res["all_params"] = sorted(before)
        trainer.save_model(os.path.join(work, "adapter"))
        res["saved_files"] = sorted(os.listdir(os.path.join(work, "adapter")))
        ckpts = sorted(d for d in os.listdir(args["output_dir"]) if d.startswith("checkpoint-"))
        res["checkpoint_files"] = {d: sorted(os.listdir(os.path.join(args["output_dir"], d))) for d in ckpts}
        return res


    results = {}
    for mode in modes:
        os.makedirs(os.path.join(work, mode))
        try:
            results[mode] = run(mode, os.path.join(work, mode))
        except Exception:
            results[mode] = {"error": traceback.format_exc()}
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f)
""")


def _has_lora_on_linear4bit() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft_fast.tuners.lora.bnb") is not None


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory) -> dict:
    """{mode: (result dict, work dir)} from one child process with peft hidden."""
    modes = ["plain"]
    if bnb_available():
        modes.append("qlora-embed")
        if _has_lora_on_linear4bit():
            modes.append("qlora-linear4bit")
    work = tmp_path_factory.mktemp("trainer_without_peft")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("PEFT_FAST_TRAINER_INTEGRATION", None)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(work), json.dumps(TINY_LLAMA), *modes], cwd=work,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads((work / "results.json").read_text())
    return {mode: (res, work / mode) for mode, res in results.items()}


def trainer_run(trainer_runs: dict, mode: str) -> tuple[dict, Path]:
    res, work = trainer_runs[mode]
    assert "error" not in res, f"{mode} failed in the child:\n{res.get('error')}"
    return res, work


def check_trained_adapter(res: dict, work: Path, base_loader, adapter_marker: str = "lora_") -> None:
    assert res["peft_available"] is False and res["peft_importable"] is False, "peft was not hidden"
    assert res["label_names"] == ["labels"], "Trainer did not inspect the base model's forward"
    assert res["loss_after"] < res["loss_before"] - 0.05, (res["loss_before"], res["loss_after"], res["train_losses"])
    adapter_params = sorted(n for n in res["all_params"] if adapter_marker in n)
    assert adapter_params and res["trainable"] == adapter_params
    assert res["changed"] == adapter_params, "only (and all) adapter weights may change"
    for files in [res["saved_files"], *res["checkpoint_files"].values()]:
        assert {"adapter_model.safetensors", "adapter_config.json"} <= set(files), files
        assert "model.safetensors" not in files, "Trainer saved the whole model instead of the adapter"
    assert res["checkpoint_files"], "no checkpoint was written"

    # the saved adapter is PEFT's format: real peft loads it onto the same base to the same logits
    from safetensors.torch import load_file

    cfg = json.loads((work / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    keys = load_file(work / "adapter" / "adapter_model.safetensors").keys()
    assert keys and all(k.startswith("base_model.model.") and ".default." not in k for k in keys), sorted(keys)
    theirs = peft.PeftModel.from_pretrained(base_loader(work / "base"), work / "adapter").train()
    expected = torch.load(work / "logits.pt")
    rows = [(torch.arange(16) * (s + 1)) % TINY_LLAMA["vocab_size"] for s in range(8)]
    with torch.no_grad():
        logits = theirs(input_ids=torch.stack(rows), attention_mask=torch.ones(8, 16, dtype=torch.long)).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_trainer_trains_peft_fast_lora_without_peft(trainer_runs):
    res, work = trainer_run(trainer_runs, "plain")
    assert len(res["eval_losses"]) == 2, "evaluation found no labels (eval_loss missing)"
    check_trained_adapter(res, work, lambda p: transformers.AutoModelForCausalLM.from_pretrained(p))


def _nf4_base_for_peft(path):
    model = load_nf4(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return peft.prepare_model_for_kbit_training(model)


def _check_qlora_run(res: dict) -> None:
    assert res["bare_quantized_refused"] and "purely quantized" in res["bare_quantized_refused"]
    assert res["gradient_checkpointing"], "prepare_model_for_kbit_training did not enable checkpointing"


def test_trainer_trains_peft_fast_on_nf4_base_without_peft(trainer_runs):
    """QLoRA shape that needs no LoRA-on-Linear4bit: adapters on the (upcast) embed_tokens and
    lm_head, so the backward still runs through every frozen NF4 layer with checkpointing."""
    if not bnb_available():
        pytest.skip("bitsandbytes is not importable")
    res, work = trainer_run(trainer_runs, "qlora-embed")
    _check_qlora_run(res)
    check_trained_adapter(res, work, _nf4_base_for_peft)


def test_trainer_trains_peft_fast_lora_on_linear4bit_without_peft(trainer_runs):
    pytest.importorskip("peft_fast.tuners.lora.bnb", reason="needs LoRA on Linear4bit")
    if not bnb_available():
        pytest.skip("bitsandbytes is not importable")
    res, work = trainer_run(trainer_runs, "qlora-linear4bit")
    _check_qlora_run(res)
    assert any("q_proj" in n for n in res["changed"]) and any("v_proj" in n for n in res["changed"])
    check_trained_adapter(res, work, _nf4_base_for_peft)


# --------------------------------------------------------------------------------------------
# In-process: transformers' own refusal stays; the integration is reversible
# --------------------------------------------------------------------------------------------
def _args(tmp_path):
    return transformers.TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True,
                                          disable_tqdm=True, max_steps=1)


def test_trainer_still_refuses_purely_quantized_base(tiny_llama_dir, tmp_path):
    from peft_fast.trainer_integration import trainer_integration_installed

    assert trainer_integration_installed()
    base = load_nf4(tiny_llama_dir)
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=base, args=_args(tmp_path), train_dataset=[])
    # prepared (frozen, upcast) but still without adapters: still refused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_fast.prepare_model_for_kbit_training(base)
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=base, args=_args(tmp_path), train_dataset=[])
    # with peft_fast adapters on top it is accepted
    model = peft_fast.get_peft_model(base, peft_fast.LoraConfig(r=2, target_modules=["lm_head"], task_type="CAUSAL_LM"))
    transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=[])


def test_integration_is_reversible_and_coexists_with_peft(tmp_path):
    """Uninstall restores transformers exactly; re-installing with the modules already imported
    (the other order than `import peft_fast` first) patches them again; real peft models keep
    being recognised throughout, plain models never."""
    import transformers.integrations.neftune as neftune
    import transformers.trainer as trainer_mod
    import transformers.trainer_utils as trainer_utils
    from peft_fast import trainer_integration as ti

    cfg = peft_fast.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    ours = peft_fast.get_peft_model(tiny_llama(), cfg)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    plain = tiny_llama()
    modules = (trainer_utils, trainer_mod, neftune)
    assert ti.trainer_integration_installed(), "import peft_fast should have installed the integration"
    patched = [m._is_peft_model for m in modules]
    for fn in patched:
        assert fn(ours) and fn(theirs) and not fn(plain)
    try:
        ti.uninstall_trainer_integration()
        originals = [m._is_peft_model for m in modules]
        assert len({id(f) for f in originals}) == 1 and not getattr(originals[0], "_peft_fast_wrapper", False)
        assert originals[0] is patched[0].__wrapped__
        assert trainer_mod.PeftModel is peft.PeftModel
        assert trainer_mod.is_peft_available is transformers.utils.is_peft_available
        assert not getattr(trainer_mod.update_fsdp_plugin_peft, "_peft_fast_wrapper", False)
        assert not any(isinstance(f, ti._PatchAfterImport) for f in sys.meta_path)
        assert not trainer_utils._is_peft_model(ours) and trainer_utils._is_peft_model(theirs)
    finally:
        ti.install_trainer_integration()
    assert not any(isinstance(f, ti._PatchAfterImport) for f in sys.meta_path), "nothing left to watch"
    assert all(m._is_peft_model(ours) and m._is_peft_model(theirs) for m in modules)
    assert trainer_mod.PeftModel == (peft.PeftModel, peft_fast.PeftModel)

    trainer = transformers.Trainer(model=ours, args=_args(tmp_path), train_dataset=[])
    assert trainer.label_names == ["labels"]
    trainer.save_model(str(tmp_path / "saved"))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(tmp_path / "saved"))
    assert "model.safetensors" not in os.listdir(tmp_path / "saved")
    trainer_mod.update_fsdp_plugin_peft(ours, None)  # real peft installed: the original runs, no-op here
    trainer = transformers.Trainer(model=theirs, args=_args(tmp_path), train_dataset=[])
    trainer.save_model(str(tmp_path / "saved_peft"))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(tmp_path / "saved_peft"))
