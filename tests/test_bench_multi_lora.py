"""Smoke test of benchmarks/bench_multi_lora.py on a tiny CPU model."""
from __future__ import annotations

import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


def test_bench_multi_lora_quick(tmp_path):
    import bench_multi_lora

    rows = bench_multi_lora.main(["--quick", "--adapters", "1", "3", "--batch", "4", "--seq", "8", "--ctx", "8",
                                  "--reps", "1", "--out", str(tmp_path)])
    assert {r["provider"] for r in rows} == set(bench_multi_lora.PROVIDERS)
    assert {(r["mode"], r["adapters"]) for r in rows} == {(m, n) for m in ("prefill", "decode") for n in (1, 3)}
    assert all(r["tokens_per_s"] > 0 for r in rows)
    with open(tmp_path / "multi_lora.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
