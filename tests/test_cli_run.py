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


def test_module_runs_under_the_alias(tmp_path):
    (tmp_path / "mytrain.py").write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "peft_fast.cli.main", "run", "-m", "mytrain", "x"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert proc.returncode == 3, proc.stderr
    assert "RESULT True" in proc.stdout and "'x'" in proc.stdout


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
    assert proc.returncode == 2 and "'no-such-command-xyz' is neither a .py script" in proc.stderr
    proc = _peft_fast("missing_script.py")
    assert proc.returncode == 2 and "no such script: 'missing_script.py'" in proc.stderr
    proc = _peft_fast()
    assert proc.returncode == 2 and "give a script" in proc.stderr
