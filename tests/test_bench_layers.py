"""CPU smoke test of benchmarks/bench_layers.py: every provider runs every method and mode."""
from __future__ import annotations

import csv
import importlib.util
import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_layers.py")


def _load_bench():
    pytest.importorskip("peft")  # the benchmark compares against real peft
    spec = importlib.util.spec_from_file_location("bench_layers", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_layers_quick_writes_all_providers(tmp_path):
    bench = _load_bench()
    rows = bench.main(["--quick", "--device", "cpu", "--methods", "lora", "dora", "ia3", "--out", str(tmp_path)])
    assert rows
    with open(tmp_path / "layers.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert (tmp_path / "layers.json").exists()

    seen = {(r["method"], r["provider"], r["mode"]) for r in csv_rows}
    for method in ("lora", "dora", "ia3"):
        for provider in ("base", "peft", "peft_fast"):
            for mode in ("fwd", "bwd", "full"):
                assert (method, provider, mode) in seen, (method, provider, mode)

    for r in csv_rows:
        what = (r["method"], r["in_features"], r["out_features"], r["M"], r["r"], r["mode"], r["provider"], r["note"])
        assert float(r["median_ms"]) > 0, what  # "error"/"oom" fail here with the row in the message
        assert float(r["ratio_vs_base"]) > 0, what
        if r["provider"] != "base":
            assert float(r["speedup_vs_peft"]) > 0, what
        if r["provider"] == "peft_fast" and r["method"] != "lora":  # no dropout: same function as peft
            assert float(r["rel_diff_vs_peft"]) < 1e-4, what


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_layers_killed_midway_keeps_the_finished_rows(tmp_path):
    """What `timeout` does at a step's cap: SIGTERM. The rows of every finished case are already in
    layers.csv (written after each case); the handler adds the PNG and the JSON's status, exits 143."""
    import json
    import signal

    from bench_helpers import sigterm_after_first_rows

    pytest.importorskip("peft")
    rc, err = sigterm_after_first_rows([BENCH, "--quick", "--device", "cpu", "--reps", "60", "--out", tmp_path],
                                       tmp_path / "layers.csv")
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    rows = _csv(tmp_path / "layers.csv")
    n_per_case = 3 * 3  # providers x modes
    total = 20 * n_per_case  # --quick: 2 shapes x (lora 2 r x 2 M + dora 2 r x 2 M + ia3 2 M)
    assert 0 < len(rows) < total and len(rows) % n_per_case == 0, len(rows)
    for r in rows:  # finished rows only, each one whole
        assert float(r["median_ms"]) > 0 and float(r["ratio_vs_base"]) > 0, r
    js = json.loads((tmp_path / "layers.json").read_text())
    meta = js["meta"]
    assert meta["status"] == "terminated" and "SIGTERM" in meta["terminated"], meta
    assert len(js["rows"]) == len(rows) == meta["rows_written"] and meta["cases_done"] == len(rows) // n_per_case
    assert meta["cases_total"] == 20 and isinstance(meta["path_choices"], list)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "layers.png").stat().st_size > 0


def test_bench_layers_time_budget_counts_from_the_process_start(tmp_path):
    """3 s spent before the script is even imported (a slow interpreter start or import): with
    --time-budget 2 no case starts, and the JSON says why. A clock started after the imports would
    have run cases."""
    import json
    import subprocess
    import sys

    pytest.importorskip("peft")
    code = ("import runpy, sys, time; time.sleep(3)\n"
            f"sys.argv = [{BENCH!r}, '--quick', '--device', 'cpu', '--time-budget', '2', '--out', {str(tmp_path)!r}]\n"
            f"runpy.run_path({BENCH!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "layers.csv").exists()
    meta = json.loads((tmp_path / "layers.json").read_text())["meta"]
    assert meta["status"] == "truncated" and meta["time_budget_s"] == 2
    assert meta["truncated"].startswith("time budget 2 s spent") and "0 of 20 cases run" in meta["truncated"], meta
    assert float(meta["truncated"].split("(")[1].split(" s from")[0]) >= 3


def test_bench_layers_budget_stop_uses_the_last_like_case():
    import argparse

    bench = _load_bench()
    args = argparse.Namespace(time_budget=10.0)
    assert bench.budget_stop(args, 3.0, 5.0, 2, 9) is None
    assert "would end at 11.0 s" in bench.budget_stop(args, 3.0, 8.0, 2, 9)
    assert "spent" in bench.budget_stop(args, 10.5, 0.0, 2, 9)
    assert bench.budget_stop(argparse.Namespace(time_budget=None), 1e9, 1e9, 0, 1) is None


def test_bench_layers_in_process_budget_counts_from_t0(tmp_path):
    """main(t0=...) (the script passes its import time when called from another module): a budget
    already spent at t0 + budget runs no case; a generous one runs them all, rows written per case."""
    import json
    import time

    from peft_fast.cli import _bench_layers as bl

    pytest.importorskip("peft")
    import signal

    argv = ["--quick", "--device", "cpu", "--methods", "ia3", "--shapes", "64x96", "--time-budget", "30",
            "--out", str(tmp_path)]
    handler = signal.getsignal(signal.SIGTERM)
    assert bl.main(argv, t0=time.monotonic() - 31) == []
    assert signal.getsignal(signal.SIGTERM) is handler  # put back: no exit 143 for the test process
    assert json.loads((tmp_path / "layers.json").read_text())["meta"]["status"] == "truncated"
    rows = bl.main(argv, t0=time.monotonic())
    assert len(rows) == 2 * 9 and len(_csv(tmp_path / "layers.csv")) == 18
    assert json.loads((tmp_path / "layers.json").read_text())["meta"]["status"] == "complete"
