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
