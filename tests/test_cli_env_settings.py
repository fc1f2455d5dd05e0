"""`peft-fast env` lists every setting that changes what peft_fast runs, with what it does."""
from __future__ import annotations

import json

from peft_fast.cli import env


def test_env_settings_include_path_strict_with_a_description(capsys, monkeypatch):
    assert "PEFT_FAST_PATH_STRICT" in env.SETTINGS
    for k in env.SETTINGS:
        assert env.SETTING_HELP[k].strip() and "\n" not in env.SETTING_HELP[k], k
    monkeypatch.setenv("PEFT_FAST_PATH_STRICT", "1")
    from peft_fast.cli.main import main

    assert main(["env", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["PEFT_FAST_PATH_STRICT"] == "1"
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "PEFT_FAST_PATH_STRICT" in out and "falling back" in out.replace("\n", " ")


def test_env_plain_report_prints_the_descriptions(capsys, monkeypatch):
    monkeypatch.delenv("PEFT_FAST_PATH_STRICT", raising=False)
    env._print_plain(env.collect())
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "PEFT_FAST_PATH_STRICT" in ln)
    assert "None" in line and "instead of falling back" in line


def test_env_settings_include_autotune_switch(capsys, monkeypatch):
    assert "PEFT_FAST_AUTOTUNE" in env.SETTINGS and "first config" in env.SETTING_HELP["PEFT_FAST_AUTOTUNE"]
    monkeypatch.setenv("PEFT_FAST_AUTOTUNE", "0")
    from peft_fast.cli.main import main

    assert main(["env", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["PEFT_FAST_AUTOTUNE"] == "0"
    env._print_plain(env.collect())
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "PEFT_FAST_AUTOTUNE" in ln)
    assert "0" in line and "autotuning" in line
