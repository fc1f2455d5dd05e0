"""TRL (SFTTrainer, DPOTrainer) on peft_fast through `peft_fast.install_as_peft()`, against real peft."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import peft_fast
from peft_fast.cli._train_demo import char_tokenizer
from peft_fast.tuners.lora.layer import LoraLayer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
TEXTS = ["the quick brown fox jumps over the lazy dog"[i:] + " abc" for i in range(16)]


def _tokenizer():
    return char_tokenizer(["abcdefghijklmnopqrstuvwxyz "])


def _base(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _sft(peft_lib, out, *, bf16=False, wrap_first=False):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = _tokenizer()
    model = _base(tok)
    args = SFTConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, report_to=[], logging_steps=1,
                     learning_rate=5e-3, save_strategy="no", use_cpu=True, bf16=bf16, seed=0, dataloader_num_workers=0)
    kwargs = dict(peft_config=peft_lib.LoraConfig(**LORA))
    torch.manual_seed(1)
    if wrap_first:
        model, kwargs = peft_lib.get_peft_model(model, peft_lib.LoraConfig(**LORA)), {}
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tok, **kwargs)
    trainer.train()
    trainer.save_model(str(out))
    return trainer


def _logits(model, tok):
    ids = tok(["the lazy fox", "abc dog"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**ids).logits.float()


def _real_peft_run(fn, *args, **kwargs):
    assert not peft_fast.is_installed_as_peft()
    import peft

    assert not peft.__name__.startswith("peft_fast") and "peft_fast" not in (peft.__file__ or "")
    return fn(peft, *args, **kwargs)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("wrap_first", [False, True], ids=["peft_config", "peft_model"])
def test_sft_trains_peft_fast_layers_like_peft_and_saves_an_adapter_peft_loads(tmp_path, bf16, wrap_first):
    import peft as real

    with peft_fast.as_peft():
        import peft as alias_peft

        trainer = _sft(alias_peft, tmp_path / "fast", bf16=bf16, wrap_first=wrap_first)
    model = trainer.model
    assert isinstance(model, peft_fast.PeftModel)
    n_lora = sum(isinstance(m, LoraLayer) for m in model.modules())
    assert n_lora == 14  # 7 linear layers x 2 decoder layers, all peft_fast's
    assert not any(type(m).__module__.startswith("peft.") for m in model.modules())
    ours = _losses(trainer)

    ref_trainer = _real_peft_run(_sft, tmp_path / "peft", bf16=bf16, wrap_first=wrap_first)
    assert isinstance(ref_trainer.model, real.PeftModel)
    ref = _losses(ref_trainer)
    assert len(ours) == len(ref) == 3
    tol = 2e-2 if bf16 else 1e-4
    assert ours == pytest.approx(ref, rel=tol), (ours, ref)
    assert ours[0] != ours[-1]  # it trained

    # the adapter peft_fast saved holds the trained weights, and loads in real peft with peft_fast's logits
    tok = _tokenizer()
    trained = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    loaded = real.PeftModel.from_pretrained(_base(tok), str(tmp_path / "fast"))
    saved = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert trained.keys() == saved.keys() and len(saved) == 28
    for k in saved:
        torch.testing.assert_close(saved[k], trained[k].float(), rtol=0, atol=0)
    ours_loaded = peft_fast.PeftModel.from_pretrained(_base(tok), str(tmp_path / "fast"))
    torch.testing.assert_close(_logits(loaded, tok), _logits(ours_loaded, tok), rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "fast" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4


def _dpo(peft_lib, out, *, bf16=False):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = _tokenizer()
    model = _base(tok)
    data = Dataset.from_dict({"prompt": ["abc", "hello", "xyz", "fox"] * 2,
                              "chosen": [" good", " yes", " ok", " run"] * 2,
                              "rejected": [" bad", " no", " meh", " sit"] * 2})
    args = DPOConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, report_to=[], logging_steps=1,
                     learning_rate=1e-2, save_strategy="no", use_cpu=True, bf16=bf16, seed=0)
    torch.manual_seed(1)
    return DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                      peft_config=peft_lib.LoraConfig(**LORA))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_dpo_with_a_lora_policy_takes_the_reference_through_disable_adapter(tmp_path, bf16, monkeypatch):
    calls = []
    original = peft_fast.PeftModel.disable_adapter

    def counting(self):
        calls.append(type(self).__name__)
        return original(self)

    monkeypatch.setattr(peft_fast.PeftModel, "disable_adapter", counting)
    with peft_fast.as_peft():
        import peft as alias_peft

        trainer = _dpo(alias_peft, tmp_path / "fast", bf16=bf16)
        assert trainer.ref_model is None and isinstance(trainer.model, peft_fast.PeftModel)
        assert sum(isinstance(m, LoraLayer) for m in trainer.model.modules()) == 14
        trainer.train()
    assert calls, "the reference log-probs were not computed through disable_adapter()"
    ours = [(h["loss"], h["rewards/chosen"]) for h in trainer.state.log_history if "loss" in h]
    assert ours[0][0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0
    assert any(abs(r) > 0 for _, r in ours[1:])  # the policy moved away from the reference

    ref_trainer = _real_peft_run(_dpo, tmp_path / "peft", bf16=bf16)
    ref_trainer.train()
    ref = [(h["loss"], h["rewards/chosen"]) for h in ref_trainer.state.log_history if "loss" in h]
    tol = 5e-2 if bf16 else 1e-3
    assert [r[0] for r in ours] == pytest.approx([r[0] for r in ref], rel=tol, abs=tol)
    assert [r[1] for r in ours] == pytest.approx([r[1] for r in ref], rel=tol * 10, abs=tol)


def test_accelerate_recognises_and_unwraps_peft_fast_models(peft_alias):
    from accelerate import Accelerator
    from accelerate.utils import extract_model_from_parallel, is_peft_model

    import peft

    tok = _tokenizer()
    model = peft.get_peft_model(_base(tok), peft.LoraConfig(**LORA))
    assert is_peft_model(model)
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(model)
    assert accelerator.unwrap_model(prepared) is model and extract_model_from_parallel(prepared) is model
    state = accelerator.get_state_dict(prepared)
    assert any("lora_A" in k for k in state)


def test_sft_without_real_peft_installed(tmp_path):
    code = textwrap.dedent(f"""
        import tests.no_peft as n; n.hide_real_peft()
        import json, peft_fast
        peft_fast.install_as_peft()
        import peft, torch
        from tests.test_trl_integration import _sft, _losses
        from peft_fast.tuners.lora.layer import LoraLayer
        t = _sft(peft, {str(tmp_path / "out")!r})
        print(json.dumps(dict(losses=_losses(t), fast=isinstance(t.model, peft_fast.PeftModel),
                              n=sum(isinstance(m, LoraLayer) for m in t.model.modules()))))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fast"] and out["n"] == 14 and len(out["losses"]) == 3
    assert os.path.exists(tmp_path / "out" / "adapter_model.safetensors")
