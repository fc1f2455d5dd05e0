"""benchmarks/gpu_suite.sh, on CPU: it fits the GPU budget (one call <= 8 minutes with every step
capped), its first step prints the versions it found, and what it returns fits the device tool
(at most 8 files, two folders down). The install step is never run here: it would reinstall
this checkout (and remove its in-place C++ build) in the environment the tests run in."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(REPO, "benchmarks", "gpu_suite.sh")
CALL_LIMIT_S = 480  # one device call's share of the 15 minutes (start included)
SKIP_ALL = {"SUITE_SKIP_INSTALL": "1", "SUITE_SKIP_PYTEST": "1", "SUITE_SKIP_LAYERS": "1", "SUITE_SKIP_QLORA": "1"}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _run(tmp_path, env_extra: dict, timeout=300, python=sys.executable):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUITE_") and k != "OUT"}
    env.update(PYTHON=python, SUITE_RESULTS_DIR=str(tmp_path / "res"), **env_extra)
    r = subprocess.run(["bash", SUITE], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    summary = json.loads((tmp_path / "res" / "suite_summary.json").read_text())
    return r, summary


def test_script_parses():
    r = subprocess.run(["bash", "-n", SUITE], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("extra,limit", [
    ({}, 470),  # call 1: the defaults
    ({"SUITE_CPP": "1", "SUITE_QUICK": "1"}, 470),
    # the recommended second calls (header)
    ({"SUITE_SKIP_PYTEST": "1", "SUITE_SKIP_LAYERS": "1", "SUITE_SKIP_QLORA": "1", "SUITE_MULTI": "1",
      "SUITE_CPP": "1", "SUITE_HARD_S": "220"}, 220),
    ({"SUITE_SKIP_PYTEST": "1", "SUITE_SKIP_QLORA": "1", "SUITE_HARD_S": "220", "SUITE_BUDGET_S": "200"}, 220),
], ids=["defaults", "cpp", "second-call-multi", "second-call-layers"])
def test_worst_case_fits_the_call(tmp_path, extra, limit):
    """Dry run: every step is assumed to run to its cap; the whole call still ends by the hard end,
    every command runs under `timeout`, and env is the first step."""
    r, summary = _run(tmp_path, {"SUITE_DRY_RUN": "1", **extra})
    steps = summary["steps"]
    assert steps[0]["step"] == "env" and summary["dry_run"] and summary["complete"]
    assert summary["total_seconds"] <= limit <= CALL_LIMIT_S - 10, summary
    assert sum(s["seconds"] for s in steps) <= limit
    assert all(s["seconds"] <= s["cap_seconds"] for s in steps), steps
    cmds = [ln for ln in r.stdout.splitlines() if ln.startswith("(dry run)")]
    assert cmds and all(re.match(r"\(dry run\) timeout \d+s: ", c) for c in cmds)
    expected = ["env"] + [s for s, k in (("install", "SUITE_SKIP_INSTALL"), ("pytest_gpu", "SUITE_SKIP_PYTEST"),
                                         ("bench_layers", "SUITE_SKIP_LAYERS"), ("bench_qlora", "SUITE_SKIP_QLORA"))
                          if extra.get(k) != "1"]
    expected += ["bench_multi_lora"] if extra.get("SUITE_MULTI") == "1" else []
    assert [s["step"] for s in steps] == expected
    if "bench_layers" in expected:  # the benches get real time, not the 1-second remainder
        assert next(s for s in steps if s["step"] == "bench_layers")["seconds"] >= 60


def test_caps_asked_too_large_are_cut_at_the_hard_end(tmp_path):
    r, summary = _run(tmp_path, {"SUITE_DRY_RUN": "1", "SUITE_PYTEST_TIMEOUT_S": "400"})
    steps = {s["step"]: s for s in summary["steps"]}
    assert summary["total_seconds"] <= 470 and steps["pytest_gpu"]["cap_seconds"] < 400
    # nothing left for the benches: skipped (exit 124), and the suite says it failed
    assert steps["bench_qlora"]["exit_code"] == 124 and r.returncode == 1 and not summary["ok"]


def test_first_step_prints_versions_and_exports_fit_the_device_tool(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r, summary = _run(tmp_path, {**SKIP_ALL, "OUT": str(out)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [s["step"] for s in summary["steps"]] == ["env"] and summary["ok"]
    env_txt = (tmp_path / "res" / "env.txt").read_text()
    for name in ("python", "torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "GPU"):
        assert re.search(rf"^{name}\b", env_txt, re.M), (name, env_txt)
    assert "torch CUDA" in env_txt
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert 0 < len(files) <= 8 and "cpu/suite_summary.json" in files and "cpu/env.txt" in files
    assert all(p.count(os.sep) <= 2 and re.fullmatch(r"[A-Za-z0-9._/-]+", p) for p in files), files


@pytest.mark.slow
def test_a_step_past_the_hard_end_is_stopped(tmp_path):
    """A bench that would run on is killed at the hard end; the summary says so, the call ends."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\ncase \"$1\" in benchmarks/bench_*) exec sleep 120;; esac\nexec {sys.executable} \"$@\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**SKIP_ALL, "SUITE_SKIP_LAYERS": "0", "SUITE_HARD_S": "40"}
    r, summary = _run(tmp_path, env, python=str(fake), timeout=120)
    assert r.returncode == 1
    steps = {s["step"]: s for s in summary["steps"]}
    assert steps["bench_layers"]["exit_code"] == 124 and summary["complete"] and not summary["ok"]
    assert "== [bench_layers]" in r.stdout and "stopped at its cap" in r.stdout, r.stdout[-2000:]
    assert steps["bench_layers"]["seconds"] >= 10 and summary["total_seconds"] <= 42, summary


def test_pytest_step_alone_runs_without_autotuning(tmp_path):
    """PEFT_FAST_AUTOTUNE=0 (and PEFT_FAST_PATH_STRICT=1) reach the pytest step's process, not the
    benches': shown in a dry run's commands, and seen by a stand-in python in a real run."""
    r, _ = _run(tmp_path, {"SUITE_DRY_RUN": "1", "SUITE_MULTI": "1"})
    cmds = [ln for ln in r.stdout.splitlines() if ln.startswith("(dry run)")]
    (pytest_cmd,) = [c for c in cmds if " -m pytest " in c]
    assert "PEFT_FAST_AUTOTUNE=0" in pytest_cmd and "PEFT_FAST_PATH_STRICT=1" in pytest_cmd
    benches = [c for c in cmds if "benchmarks/bench_" in c]
    assert len(benches) >= 2 and not any("PEFT_FAST_AUTOTUNE" in c for c in benches), benches

    log = tmp_path / "seen.log"
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n"
                    f"case \"$1\" in -m) echo \"pytest AUTOTUNE=${{PEFT_FAST_AUTOTUNE-unset}} "
                    f"STRICT=${{PEFT_FAST_PATH_STRICT-unset}}\" >> {log}; exit 0;;\n"
                    f"  benchmarks/bench_*) echo \"bench AUTOTUNE=${{PEFT_FAST_AUTOTUNE-unset}}\" >> {log}; exit 0;;\n"
                    f"esac\nexec {sys.executable} \"$@\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**SKIP_ALL, "SUITE_SKIP_PYTEST": "0", "SUITE_SKIP_QLORA": "0", "SUITE_HARD_S": "120"}
    _run(tmp_path, env, python=str(fake), timeout=200)
    seen = log.read_text().splitlines()
    assert "pytest AUTOTUNE=0 STRICT=1" in seen and "bench AUTOTUNE=unset" in seen, seen
