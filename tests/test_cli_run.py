"""`peft-fast run`: a script, a module or a console command runs with `import peft` giving peft_fast."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = "import sys, peft, peft_fast\nprint('RESULT', peft.LoraConfig is peft_fast.LoraConfig, sys.argv)\nsys.exit(3)\n"


def _peft_fast(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "peft_fast.cli.main", "run", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd or ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def test_script_runs_under_the_alias_with_its_argv_and_exit_status(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    proc = _peft_fast(str(script), "--epochs", "1")
    assert proc.returncode == 3, proc.stderr
    assert f"RESULT True ['{script}', '--epochs', '1']" in proc.stdout


def test_module_runs_under_the_alias_from_the_current_directory_with_its_options(tmp_path):
    (tmp_path / "mytrain.py").write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "peft_fast.cli.main", "run", "-m", "mytrain", "--cpu", "-x"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ROOT})  # mytrain is found in the cwd, as python -m
    assert proc.returncode == 3, proc.stderr
    assert f"RESULT True ['{tmp_path / 'mytrain.py'}', '--cpu', '-x']" in proc.stdout  # argv[0] as python -m sets it


FAKE_PEFT = 'raise ImportError("real peft is hidden: this process did not get the peft alias")\n'


def _hidden_peft_path(tmp_path):
    """A directory whose `peft` package shadows the real one: only the alias gets past it."""
    (tmp_path / "fake" / "peft").mkdir(parents=True)
    (tmp_path / "fake" / "peft" / "__init__.py").write_text(FAKE_PEFT)
    path = f"{tmp_path / 'fake'}{os.pathsep}{ROOT}"
    control = subprocess.run([sys.executable, "-c", "import peft"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": path})
    assert "real peft is hidden" in control.stderr  # without the alias, the fake is what `import peft` finds
    return path


def test_spawned_child_processes_get_the_alias(tmp_path):
    script = tmp_path / "spawn.py"
    script.write_text("import multiprocessing as mp\n"
                      "def child(q):\n    import peft, peft_fast\n    q.put(peft.LoraConfig is peft_fast.LoraConfig)\n"
                      "if __name__ == '__main__':\n    ctx = mp.get_context('spawn'); q = ctx.Queue()\n"
                      "    p = ctx.Process(target=child, args=(q,)); p.start(); print('CHILD', q.get()); p.join()\n")
    proc = subprocess.run([sys.executable, "-m", "peft_fast.cli.main", "run", str(script)], capture_output=True,
                          text=True, timeout=180, cwd=tmp_path, env={**os.environ, "PYTHONPATH": _hidden_peft_path(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CHILD True" in proc.stdout


def test_trl_sft_cli_trains_peft_fast_adapters_in_its_launched_process(tmp_path):
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_fast.cli._train_demo import char_tokenizer

    tok = char_tokenizer(["abcdefghijklmnopqrstuvwxyz "])
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog"[i:]}) + "\n" for i in range(16)))
    proc = subprocess.run(
        [sys.executable, "-m", "peft_fast.cli.main", "run", "trl", "sft", "--model_name_or_path", str(tmp_path / "model"),
         "--dataset_name", str(tmp_path / "data"), "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj",
         "v_proj", "--max_steps", "2", "--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none",
         "--disable_tqdm", "true", "--save_strategy", "no"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": _hidden_peft_path(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_console_command_runs_its_entry_point_under_the_alias():
    # `trl env` reports the PEFT version it sees; with real peft hidden only the alias can supply one
    code = ("import sys, tests.no_peft as n; n.hide_real_peft()\n"
            "from peft_fast.cli.main import main\nsys.exit(main(['run', 'trl', 'env']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    from peft_fast import PEFT_VERSION

    assert f"PEFT version: {PEFT_VERSION}" in proc.stdout
    without = "import tests.no_peft as n; n.hide_real_peft()\nimport trl.scripts.env as e; e.print_env()\n"
    hidden = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert hidden.returncode == 0 and "TRL version" in hidden.stdout, hidden.stderr
    assert f"PEFT version: {PEFT_VERSION}" not in hidden.stdout


def test_bad_targets_are_named():
    proc = _peft_fast("no-such-command-xyz")
    assert proc.returncode == 2 and "'no-such-command-xyz' is neither a script" in proc.stderr
    proc = _peft_fast("missing_script.py")
    assert proc.returncode == 2 and "no such script: 'missing_script.py'" in proc.stderr
    proc = _peft_fast()
    assert proc.returncode == 2 and "give a script" in proc.stderr
    proc = _peft_fast("-m", "no_such_module_xyz")
    assert proc.returncode == 2 and "no module named 'no_such_module_xyz'" in proc.stderr
    proc = _peft_fast("--help")
    assert proc.returncode == 0 and "usage: peft-fast run" in proc.stdout


def test_module_of_a_package_that_imports_peft_sees_the_alias(tmp_path):
    (tmp_path / "upkg").mkdir()
    (tmp_path / "upkg" / "__init__.py").write_text("from peft import LoraConfig\n")
    (tmp_path / "upkg" / "train.py").write_text("import peft, peft_fast, upkg\n"
                                                 "print('SAME', upkg.LoraConfig is peft_fast.LoraConfig)\n")
    proc = subprocess.run([sys.executable, "-m", "peft_fast.cli.main", "run", "-m", "upkg.train"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SAME True" in proc.stdout
