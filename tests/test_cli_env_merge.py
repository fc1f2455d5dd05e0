"""`peft-fast env` (table and JSON, following the backend settings) and `peft-fast merge` (outputs
equal the adapter model's, tokenizer copied, atomic, clear errors)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from peft_fast.cli import env as env_cmd
from peft_fast.cli import merge as merge_cmd

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def cli(*argv) -> int:
    ap = argparse.ArgumentParser(prog="peft-fast")
    sub = ap.add_subparsers(dest="command")
    env_cmd.add_parser(sub)
    merge_cmd.add_parser(sub)
    args = ap.parse_args([str(a) for a in argv])
    return args.func(args)


# ------------------------------------------------------------------------------ env
def test_env_prints_the_tables(capsys):
    assert cli("env") == 0
    out = capsys.readouterr().out
    for word in ("peft_fast", "torch", "transformers", "bitsandbytes", "triton", "C++ extension", "op paths",
                 "lora", "PEFT_FAST_BACKEND", "cpu"):
        assert word in out, f"{word!r} missing from the env report"


def test_env_json_follows_the_settings(capsys, monkeypatch):
    from peft_fast import _segments
    from peft_fast.triton_kernels._triton import HAS_TRITON

    for var in ("PEFT_FAST_BACKEND", "TRITON_INTERPRET", "PEFT_FAST_GEMM"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PEFT_FAST_DISABLE_CPP", "1")
    assert cli("env", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) >= {"versions", "devices", "backends", "settings", "op_paths"}
    assert info["versions"]["torch"] == torch.__version__
    assert {"python", "triton", "transformers", "peft", "bitsandbytes", "peft_fast"} <= set(info["versions"])
    assert info["backends"]["C++ extension (peft_fast._C)"] is _segments.HAS_CPP
    assert info["settings"]["PEFT_FAST_DISABLE_CPP"] == "1"
    cpu = info["op_paths"]["cpu"]
    assert cpu["lora"] == cpu["dora"] == cpu["ia3"] == "torch"
    assert cpu["mixed-adapter batch"] == "torch (C++ fallback)"

    monkeypatch.delenv("PEFT_FAST_DISABLE_CPP")
    if HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli("env", "--json") == 0
    cpu = json.loads(capsys.readouterr().out)["op_paths"]["cpu"]
    if HAS_TRITON:
        assert cpu["lora"] == "triton (interpreter)"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("PEFT_FAST_BACKEND", "bogus")
    assert cli("env", "--json") == 0  # a bad setting is reported, not a crash
    assert "PEFT_FAST_BACKEND" in json.loads(capsys.readouterr().out)["op_paths"]["cpu"]["lora"]


def test_env_through_the_dispatcher(capsys):
    from peft_fast.cli.main import main

    assert main(["env", "--json"]) == 0
    assert "op_paths" in json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------ merge
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from peft_fast.cli._train_demo import char_tokenizer

    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(path)
    char_tokenizer(["abcdefgh 0123456789"]).save_pretrained(path)
    return path


def make_adapter(base_dir: Path, path: Path, method: str) -> None:
    import peft_fast

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(1)
    if method == "ia3":
        cfg = peft_fast.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                  init_ia3_weights=False, task_type="CAUSAL_LM")
    else:  # non-zero B, so merging changes the weights
        cfg = peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                   use_dora=method == "dora", task_type="CAUSAL_LM")
    peft_fast.get_peft_model(base, cfg).save_pretrained(path)


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merge_matches_the_adapter_model(base_dir, tmp_path, method, capsys):
    import peft_fast
    from safetensors.torch import load_file

    make_adapter(base_dir, tmp_path / "adapter", method)
    out = tmp_path / "merged"
    assert cli("merge", "--base", base_dir, "--adapter", tmp_path / "adapter", "--out", out) == 0
    assert "merged" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(k for k in load_file(out / "model.safetensors") if "lora_" in k or "ia3_" in k or "base_layer" in k)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"], "temporary directories left"

    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(2))
    adapted = peft_fast.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                                  tmp_path / "adapter")
    expected = logits(adapted, ids)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=1e-5)
    base_logits = logits(transformers.AutoModelForCausalLM.from_pretrained(base_dir), ids)
    assert (expected - base_logits).abs().max() > 1e-3, "the test adapter is a no-op"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("abc")["input_ids"], skip_special_tokens=True) == "abc"


def test_merge_errors_and_atomicity(base_dir, tmp_path, capsys):
    make_adapter(base_dir, tmp_path / "adapter", "lora")
    adapter, out = tmp_path / "adapter", tmp_path / "out"

    assert cli("merge", "--base", tmp_path / "nope", "--adapter", adapter, "--out", out) == 2
    err = capsys.readouterr().err
    assert "base model directory" in err and str(tmp_path / "nope") in err
    assert cli("merge", "--base", base_dir, "--adapter", tmp_path / "gone", "--out", out) == 2
    err = capsys.readouterr().err
    assert "adapter directory" in err and str(tmp_path / "gone") in err
    assert cli("merge", "--base", adapter, "--adapter", adapter, "--out", out) == 2
    assert "config.json" in capsys.readouterr().err
    assert not out.exists()

    # an existing, non-empty --out is kept unless --overwrite
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli("merge", "--base", base_dir, "--adapter", adapter, "--out", out) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"

    # a failure while loading leaves --out untouched and no temporary directory behind
    bad = tmp_path / "bad_adapter"
    bad.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["no_such_module"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    assert cli("merge", "--base", base_dir, "--adapter", bad, "--out", out, "--overwrite") == 2
    assert "cannot load adapter" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    assert cli("merge", "--base", base_dir, "--adapter", adapter, "--out", out, "--overwrite") == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "bad_adapter", "out"]
