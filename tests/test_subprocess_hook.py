"""The start-up hook `peft-fast run` gives its child processes (peft_fast/_subprocess_hook/sitecustomize.py)."""
import json
import os
import subprocess
import sys

from peft_fast.cli.run import HOOK_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, *paths: str, env=None) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join([*paths, ROOT])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env={**os.environ, "PEFT_FAST_AS_PEFT": "1", "PYTHONPATH": pythonpath, **(env or {})})


def _last_json(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_process_that_never_looks_for_peft_does_not_import_peft_fast():
    out = _last_json(_python("import sys, json, transformers\nprint(json.dumps('peft_fast' in sys.modules))", HOOK_DIR))
    assert out is False


def test_the_first_peft_lookup_installs_the_alias_once_and_uninstall_gives_real_peft():
    code = ("import sys, json, importlib.util\nspec = importlib.util.find_spec('peft')\nimport peft_fast\n"
            "n = sum(type(f).__name__ == '_AliasFinder' for f in sys.meta_path)\non = peft_fast.is_installed_as_peft()\n"
            "peft_fast.uninstall_as_peft()\nimport peft\n"
            "print(json.dumps(dict(n=n, on=on, off=peft_fast.is_installed_as_peft(), real='peft_fast' not in peft.__file__,"
            " hooks=sum(getattr(f, '_peft_fast_hook', False) for f in sys.meta_path))))")
    assert _last_json(_python(code, HOOK_DIR)) == {"n": 1, "on": True, "off": False, "real": True, "hooks": 0}


def test_importing_peft_fast_first_in_a_child_installs_once(tmp_path):
    code = ("import sys, json, peft_fast\nn = sum(type(f).__name__ == '_AliasFinder' for f in sys.meta_path)\n"
            "peft_fast.uninstall_as_peft()\nimport peft\nprint(json.dumps(dict(n=n, real='peft_fast' not in peft.__file__)))")
    assert _last_json(_python(code, HOOK_DIR)) == {"n": 1, "real": True}


def test_a_python_without_peft_fast_is_left_alone(tmp_path):
    # another environment inheriting PEFT_FAST_AS_PEFT/PYTHONPATH: peft_fast cannot be imported there
    # (simulated by a sitecustomize, which the hook runs after itself, that refuses to import it)
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nclass _NoPeftFast:\n    @staticmethod\n    def find_spec(name, path=None, target=None):\n"
        "        if name == 'peft_fast' or name.startswith('peft_fast.'):\n"
        "            raise ImportError('no peft_fast in this environment')\n"
        "sys.meta_path.insert(0, _NoPeftFast)\n")
    code = ("import json, importlib.util, importlib.metadata as md\nspec = importlib.util.find_spec('peft')\n"
            "print(json.dumps(dict(origin=spec.origin, version=md.version('peft'))))")
    out = _last_json(_python(code, HOOK_DIR, str(tmp_path)))
    assert "site-packages" in out["origin"] and out["version"] == __import__("importlib").metadata.version("peft")


def test_two_copies_of_the_hook_and_a_user_sitecustomize(tmp_path):
    copy = tmp_path / "hook_copy"
    copy.mkdir()
    with open(os.path.join(HOOK_DIR, "sitecustomize.py")) as f:
        (copy / "sitecustomize.py").write_text(f.read())
    user = tmp_path / "user"
    user.mkdir()
    (user / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE'] = 'ran'\n")
    code = ("import sys, os, json\nhooks = sum(getattr(f, '_peft_fast_hook', False) for f in sys.meta_path)\n"
            "import peft, peft_fast\nprint(json.dumps(dict(hooks=hooks, user=os.environ.get('USER_SITECUSTOMIZE'),"
            " alias=peft.LoraConfig is peft_fast.LoraConfig)))")
    assert _last_json(_python(code, HOOK_DIR, str(copy), str(user))) == {"hooks": 1, "user": "ran", "alias": True}


def test_peft_fast_commands_report_and_compare_with_real_peft_not_the_alias():
    code = ("import tests.no_peft as n; n.hide_real_peft()\nimport json, sys\nfrom peft_fast.cli import env\n"
            "from peft_fast.cli.main import main\nimport peft_fast\nassert peft_fast.is_installed_as_peft()\n"
            "main(['env', '--json'])\n")
    proc = _python(code)  # PEFT_FAST_AS_PEFT=1: the alias is installed on import peft_fast
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert data["versions"]["peft"] is None and data["settings"]["PEFT_FAST_AS_PEFT"] == "1"
