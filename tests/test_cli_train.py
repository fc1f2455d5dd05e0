"""`peft-fast train` on CPU at toy sizes: the demo learns, prompt tokens are masked out of the
loss, adapters load in real peft with the same outputs, 4-bit runs, --resume continues exactly,
bad input gets a clear error, and --resume keeps the run's own settings (issue #11)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from peft_fast.cli import train as train_cmd  # noqa: E402
from peft_fast.cli._train_data import IGNORE, Example, encode  # noqa: E402
from peft_fast.cli._train_demo import DEMO_DATA, char_tokenizer, demo_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a, b in
        [(1, 2), (3, 4), (12, 7), (5, 5), (9, 13), (20, 2), (6, 8), (11, 11)]]
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=False)


def cli(*argv: str) -> int:
    """Run `peft-fast train ...` in this process (the sub-command's own parser, as main.py builds it)."""
    ap = argparse.ArgumentParser(prog="peft-fast")
    train_cmd.add_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args([str(a) for a in argv])
    return args.func(args)


def train_log(out: Path) -> dict:
    return json.loads((out / "train_log.json").read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir with a tiny Llama + character tokenizer, JSONL of prompt/response rows)."""
    root = tmp_path_factory.mktemp("tiny")
    tok = char_tokenizer([r["prompt"] + r["response"] for r in ROWS])
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id, **TINY)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root / "model", root / "data.jsonl"


def run_tiny(tiny, out: Path, *extra: str) -> int:
    model, data = tiny
    return cli("train", "--model", model, "--data", data, "--output", out, "--no-progress", "--threads", 1,
               "--batch-size", 8, "--lr", 1e-2, *extra)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def check_peft_loads_same(base_dir: Path, adapter_dir: Path, vocab: int) -> None:
    """Real peft and peft_fast load the saved adapter to the same logits, which differ from the base's."""
    import peft

    import peft_fast

    ids = torch.randint(4, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()  # noqa: E731
    base_logits = logits_of(load(), ids)
    theirs = logits_of(peft.PeftModel.from_pretrained(load(), adapter_dir).eval(), ids)
    ours = logits_of(peft_fast.PeftModel.from_pretrained(load(), adapter_dir).eval(), ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (theirs - base_logits).abs().max() > 1e-3, "the saved adapter is a no-op (did training change it?)"


# ------------------------------------------------------------------------------ demo
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert cli("train", "--output", out, "--max-steps", 40, "--no-progress") == 0
    return out


def test_demo_loss_falls_and_outputs_are_written(demo_run, capsys):
    log = train_log(demo_run)
    losses = log["losses"]
    assert log["demo"] and len(losses) == 40
    tail = sum(losses[-5:]) / 5
    assert tail < losses[0] - 0.8, f"demo loss did not fall clearly: {losses[0]:.3f} -> {tail:.3f}"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "loss.png"} <= \
        {p.name for p in demo_run.iterdir()}
    assert (demo_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (demo_run / "demo_base" / "config.json").is_file()
    assert [p.name for p in demo_run.glob("checkpoint-*")] == ["checkpoint-40"]
    assert not list(demo_run.glob(".*tmp*")), "temporary files left behind"
    cfg = json.loads((demo_run / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["task_type"] == "CAUSAL_LM"


def test_demo_adapter_loads_in_real_peft(demo_run):
    vocab = transformers.AutoConfig.from_pretrained(demo_run / "demo_base").vocab_size
    check_peft_loads_same(demo_run / "demo_base", demo_run, vocab)


def test_shipped_demo_data_is_the_generator_output():
    lines = DEMO_DATA.read_text().splitlines()
    assert [json.loads(x) for x in lines] == demo_rows()
    row = json.loads(lines[0])
    assert row["response"] == row["prompt"].removeprefix("reverse: ").rstrip("\n")[::-1]


# ------------------------------------------------------------------------------ --model / --data
def test_model_data_run_masks_the_prompt(tiny, tmp_path):
    """Step 1's loss (LoRA B = 0: the adapter model is the base) is the base model's mean loss over
    response tokens (+ eos) only -- not over the prompt -- and the loss then falls."""
    out = tmp_path / "out"
    assert run_tiny(tiny, out, "--max-steps", 4, "--dropout", 0, "--targets", "q_proj,v_proj") == 0
    losses = train_log(out)["losses"]

    model_dir, _ = tiny
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    resp_sum = resp_n = full_sum = full_n = 0.0
    for r in ROWS:
        p = tok(r["prompt"])["input_ids"]
        resp = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + resp])
        ce = F.cross_entropy(logits_of(base, ids)[0, :-1], ids[0, 1:], reduction="none")
        resp_sum += float(ce[len(p) - 1:].sum())
        resp_n += len(resp)
        full_sum += float(ce.sum())
        full_n += len(ce)
    assert losses[0] == pytest.approx(resp_sum / resp_n, abs=1e-4)
    assert abs(losses[0] - full_sum / full_n) > 0.05
    assert losses[-1] < losses[0] - 0.1, losses
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def test_encode_masks_prompt_and_truncates():
    tok = char_tokenizer(["abc=xyz"])
    (ids, labels), = encode([Example(1, prompt="abc=", response="xyz")], tok, 64)[0]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert ids[0] == bos and ids[-1] == eos and len(ids) == 1 + 4 + 3 + 1
    assert labels == [IGNORE] * 5 + ids[5:]
    (ids, labels), = encode([Example(1, text="abc")], tok, 64)[0]
    assert labels == ids and ids[-1] == eos
    rows, dropped = encode([Example(1, prompt="abcabc=", response="x"), Example(2, text="ab")], tok, 5)
    assert dropped == 1 and len(rows) == 1 and len(rows[0][0]) == 4  # the prompt filled all 5 tokens


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_methods_save_adapters_real_peft_loads(tiny, tmp_path, method):
    out = tmp_path / "out"
    assert run_tiny(tiny, out, "--method", method, "--max-steps", 3) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == ("IA3" if method == "ia3" else "LORA")
    assert cfg.get("use_dora", False) == (method == "dora")
    model_dir, _ = tiny
    check_peft_loads_same(model_dir, out, transformers.AutoConfig.from_pretrained(model_dir).vocab_size)


def test_resume_continues_exactly(tiny, tmp_path):
    """4 steps in one go == 2 steps, then --resume to 4: same losses, same adapter, bit for bit."""
    from safetensors.torch import load_file

    common = ("--lr-scheduler", "constant", "--save-steps", 2, "--batch-size", 3, "--gradient-checkpointing")
    assert run_tiny(tiny, tmp_path / "a", "--max-steps", 4, *common) == 0
    assert run_tiny(tiny, tmp_path / "b", "--max-steps", 2, *common) == 0
    assert (tmp_path / "b" / "checkpoint-2" / "training_state.pt").is_file()
    assert run_tiny(tiny, tmp_path / "b", "--max-steps", 4, "--resume", *common) == 0
    a, b = train_log(tmp_path / "a"), train_log(tmp_path / "b")
    assert a["losses"] == b["losses"] and len(a["losses"]) == 4
    wa = load_file(tmp_path / "a" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tiny, tmp_path, monkeypatch, capsys):
    from peft_fast.cli import _train_loop

    common = ("--max-steps", 4, "--batch-size", 3, "--save-steps", 10)  # linear decay over the 4 steps
    assert run_tiny(tiny, tmp_path / "a", *common) == 0
    real, calls = _train_loop.collate, []

    def interrupt_in_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(_train_loop, "collate", interrupt_in_step_3)
    assert run_tiny(tiny, tmp_path / "b", *common) == 130
    assert "--resume" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "b").glob("checkpoint-*")] == ["checkpoint-2"]
    monkeypatch.setattr(_train_loop, "collate", real)
    assert run_tiny(tiny, tmp_path / "b", "--resume", *common) == 0
    assert train_log(tmp_path / "a")["losses"] == train_log(tmp_path / "b")["losses"]


def test_grad_accum_equals_one_big_batch(tiny, tmp_path):
    """Token-weighted accumulation: 2 x 4 rows is one step on the same 8 rows (same loss and update)."""
    from safetensors.torch import load_file

    assert run_tiny(tiny, tmp_path / "a", "--max-steps", 1, "--dropout", 0) == 0
    assert run_tiny(tiny, tmp_path / "b", "--max-steps", 1, "--dropout", 0, "--batch-size", 4, "--grad-accum", 2) == 0
    la, lb = train_log(tmp_path / "a")["losses"], train_log(tmp_path / "b")["losses"]
    assert la[0] == pytest.approx(lb[0], abs=1e-5)
    wa = load_file(tmp_path / "a" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "adapter_model.safetensors")
    for k in wa:  # Adam's first step is ~lr * sign(grad): compare against the step size lr = 1e-2
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=0)


def test_resume_refuses_a_different_adapter_and_fresh_runs_keep_checkpoints(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_tiny(tiny, out, "--max-steps", 1) == 0
    capsys.readouterr()
    assert run_tiny(tiny, out, "--max-steps", 2, "--resume", "--r", 4) == 2
    assert "r=8" in capsys.readouterr().err
    assert run_tiny(tiny, out, "--max-steps", 2) == 2  # checkpoints there, neither --resume nor --overwrite
    assert "--resume" in capsys.readouterr().err
    assert run_tiny(tiny, tmp_path / "empty", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_4bit_on_cpu_runs(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q"
    assert cli("train", "--4bit", "--output", out, "--max-steps", 2, "--batch-size", 4, "--no-progress") == 0
    log = train_log(out)
    assert log["settings"]["four_bit"] and len(log["losses"]) == 2
    assert all(0 < x < 10 for x in log["losses"])
    assert (out / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------ errors
def test_missing_model_dir_is_named(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert cli("train", "--model", missing, "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert cli("train", "--model", tmp_path / "empty", "--output", tmp_path / "o") == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.parametrize("lines,line_no,what", [
    (['{"text": "ok"}', "", '{"text": "broken",}'], 3, "not valid JSON"),
    (['{"prompt": "a", "response": "b"}', '{"prompt": "only a prompt"}'], 2, "'prompt' and 'response'"),
    (['["a list"]'], 1, "JSON object"),
    (['{"text": 5}'], 1, "must be a string"),
])
def test_malformed_jsonl_names_the_line(tmp_path, capsys, lines, line_no, what):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    assert cli("train", "--data", data, "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert f"line {line_no}:" in err and what in err and str(data) in err
    assert not (tmp_path / "o").exists(), "nothing may be written for bad input"


def test_4bit_without_bitsandbytes_fails_clearly(tmp_path):
    """bitsandbytes hidden in a child process (the real entry point's dispatcher)."""
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "from peft_fast.cli.main import main\nsys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, "train", "--4bit", "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--4bit needs bitsandbytes" in proc.stderr and "pip install bitsandbytes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_4bit_on_an_unsupported_device(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    assert cli("train", "--4bit", "--device", "meta", "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "no 4-bit kernels for device 'meta'" in err


# ------------------------------------------------------------------------------ traps (issue #11)
def ckpt_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


def test_resume_keeps_the_runs_own_save_total_limit(tiny, tmp_path):
    """A run saved with --save-total-limit 0 keeps every checkpoint through --resume: with no more
    steps to train (the run's own --max-steps 30 is carried too) and when it trains further."""
    out = tmp_path / "out"
    assert run_tiny(tiny, out, "--max-steps", 30, "--save-steps", 10, "--save-total-limit", 0) == 0
    assert ckpt_steps(out) == [10, 20, 30]
    assert run_tiny(tiny, out, "--resume") == 0
    assert ckpt_steps(out) == [10, 20, 30]
    log = train_log(out)
    assert log["total_steps"] == 30 and log["settings"]["save_total_limit"] == 0
    assert run_tiny(tiny, out, "--resume", "--max-steps", 40) == 0
    assert ckpt_steps(out) == [10, 20, 30, 40]
    assert train_log(out)["settings"]["save_total_limit"] == 0 and len(train_log(out)["losses"]) == 40


def test_resume_explicit_overrides_win(tiny, tmp_path):
    """Flags given again on --resume replace the run's saved ones: --save-total-limit prunes,
    --weight-decay reaches the optimizer (whose saved state would otherwise restore the old one)."""
    out = tmp_path / "out"
    assert run_tiny(tiny, out, "--max-steps", 3, "--save-steps", 1, "--save-total-limit", 0) == 0
    assert ckpt_steps(out) == [1, 2, 3]
    assert run_tiny(tiny, out, "--resume", "--max-steps", 4, "--save-total-limit", 1, "--weight-decay", 0.1) == 0
    assert ckpt_steps(out) == [4]
    blob = torch.load(out / "checkpoint-4" / "training_state.pt", weights_only=True)
    assert {g["weight_decay"] for g in blob["optimizer"]["param_groups"]} == {0.1}
    assert blob["meta"]["settings"]["save_total_limit"] == 1


@pytest.fixture(scope="module")
def one_step_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    assert run_tiny(tiny, out, "--max-steps", 1, "--targets", "q_proj,v_proj") == 0
    return out


@pytest.mark.parametrize("flag,value,saved", [("--method", "dora", "method='lora'"), ("--seed", 3, "seed=0"),
                                              ("--batch-size", 4, "batch_size=8"),
                                              ("--targets", "q_proj", "targets='q_proj,v_proj'")])
def test_resume_refuses_to_change_what_defines_the_run(tiny, one_step_run, capsys, flag, value, saved):
    before = sorted(p.name for p in one_step_run.iterdir())
    assert run_tiny(tiny, one_step_run, "--resume", "--max-steps", 2, flag, value) == 2
    err = capsys.readouterr().err
    assert saved in err and str(value) in err and flag in err and "Traceback" not in err
    assert sorted(p.name for p in one_step_run.iterdir()) == before


def test_resume_past_a_shorter_max_steps_is_refused(tiny, one_step_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_tiny(tiny, out, "--max-steps", 2) == 0
    assert run_tiny(tiny, out, "--resume", "--max-steps", 1) == 2
    err = capsys.readouterr().err
    assert "step 2" in err and "--max-steps 1" in err


def test_model_without_data_is_refused(tiny, tmp_path, capsys):
    model, _ = tiny
    assert cli("train", "--model", model, "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "--data" in err and str(model) in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_refused_run_leaves_no_empty_output_dir(tiny, tmp_path, capsys):
    """Refused after --output was created (unknown target module): the new, empty directory goes;
    an --output that existed before stays."""
    out = tmp_path / "new_out"
    assert run_tiny(tiny, out, "--targets", "nope_proj") == 2
    assert "nope_proj" in capsys.readouterr().err
    assert not out.exists()
    kept = tmp_path / "existing"
    kept.mkdir()
    assert run_tiny(tiny, kept, "--targets", "nope_proj") == 2
    assert kept.is_dir()


@pytest.mark.parametrize("which", ["training_state.pt", "adapter_model.safetensors"])
def test_resume_from_a_corrupt_checkpoint_names_it(tiny, tmp_path, capsys, which):
    out = tmp_path / "out"
    assert run_tiny(tiny, out, "--max-steps", 1) == 0
    bad = out / "checkpoint-1" / which
    bad.write_bytes(bad.read_bytes()[:100])
    capsys.readouterr()
    assert run_tiny(tiny, out, "--resume", "--max-steps", 2) == 2
    err = capsys.readouterr().err
    assert str(out / "checkpoint-1") in err and "Traceback" not in err


def test_resume_from_a_checkpoint_path_writes_beside_it(tiny, tmp_path, monkeypatch):
    """--resume DIR/checkpoint-N without --output continues in DIR, not in ./peft-fast-output."""
    out = tmp_path / "out"
    assert run_tiny(tiny, out, "--max-steps", 2, "--save-steps", 1, "--save-total-limit", 0) == 0
    monkeypatch.chdir(tmp_path)
    model, data = tiny
    assert cli("train", "--model", model, "--data", data, "--no-progress", "--resume", out / "checkpoint-1",
               "--max-steps", 3) == 0
    assert not (tmp_path / "peft-fast-output").exists()
    assert ckpt_steps(out) == [1, 2, 3] and len(train_log(out)["losses"]) == 3


def test_resume_into_an_output_of_another_run_is_refused(tiny, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_tiny(tiny, a, "--max-steps", 1) == 0
    assert run_tiny(tiny, b, "--max-steps", 1) == 0
    assert run_tiny(tiny, b, "--resume", a / "checkpoint-1", "--max-steps", 2) == 2
    err = capsys.readouterr().err
    assert str(b) in err and "checkpoint-1" in err
    assert ckpt_steps(b) == [1]


def test_output_holding_another_run_or_a_model_is_refused(tiny, tmp_path, capsys):
    """The demo starts over only in an earlier demo's output; no run writes into a model directory
    or over a finished adapter without --overwrite."""
    import shutil

    out = tmp_path / "out"
    assert run_tiny(tiny, out, "--max-steps", 1) == 0
    capsys.readouterr()
    assert cli("train", "--output", out, "--max-steps", 1, "--no-progress") == 2  # the demo
    assert "--overwrite" in capsys.readouterr().err and ckpt_steps(out) == [1]
    shutil.rmtree(out / "checkpoint-1")  # a finished adapter without checkpoints
    assert run_tiny(tiny, out, "--max-steps", 1) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    model_copy = tmp_path / "model_copy"
    shutil.copytree(tiny[0], model_copy)
    assert run_tiny(tiny, model_copy, "--max-steps", 1) == 2
    assert "config.json" in capsys.readouterr().err and not (model_copy / "adapter_config.json").exists()


@pytest.mark.parametrize("argv,what", [
    (("--method", "ia3", "--r", 4), "--r"),
    (("--epochs", 2, "--max-steps", 3), "--max-steps"),
    (("--save-total-limit", -1), "--save-total-limit"),
    (("--resume", "--overwrite"), "--overwrite"),
])
def test_flags_that_would_be_ignored_are_refused(tiny, tmp_path, capsys, argv, what):
    assert run_tiny(tiny, tmp_path / "o", *argv) == 2
    err = capsys.readouterr().err
    assert what in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_resume_after_the_model_moved(tiny, tmp_path, capsys):
    """The saved model path is gone: the error names it and asks for --model; the new place then works
    (and a fresh resume needs neither --model nor --data: the run's own are carried)."""
    import shutil

    model, data = tiny
    a, b, out = tmp_path / "model_a", tmp_path / "model_b", tmp_path / "out"
    shutil.copytree(model, a)
    assert cli("train", "--model", a, "--data", data, "--output", out, "--max-steps", 1, "--no-progress") == 0
    assert cli("train", "--output", out, "--resume", "--max-steps", 2, "--no-progress") == 0
    a.rename(b)
    capsys.readouterr()
    assert cli("train", "--output", out, "--resume", "--max-steps", 3, "--no-progress") == 2
    err = capsys.readouterr().err
    assert str(a) in err and "--model" in err
    assert cli("train", "--model", b, "--output", out, "--resume", "--max-steps", 3, "--no-progress") == 0
    assert len(train_log(out)["losses"]) == 3
