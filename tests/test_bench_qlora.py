"""CPU smoke test of benchmarks/bench_qlora.py --quick: every part that runs on CPU writes its
rows for every provider (dequant, one 4-bit LoRA layer, a toy Llama training step); shapes
bitsandbytes' CPU path cannot take become "unsupported" rows with the reason, on any CPU."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_qlora.py")


def _load_bench(name="bench_qlora_under_test"):
    spec = importlib.util.spec_from_file_location(name, BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_qlora_quick_writes_all_parts_and_providers(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("transformers")
    import bitsandbytes.nn.modules as bnb_modules

    # one path on every CPU: no AVX512-bf16 repacking (its bf16 kernel would make the decode diffs
    # depend on the CPU; the shapes are ones that kernel accepts)
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)
    bench = _load_bench()
    rows = bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    with open(tmp_path / "qlora.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) > 0
    meta = json.loads((tmp_path / "qlora.json").read_text())["meta"]
    assert meta["copy_bandwidth_GBps"] > 0
    assert isinstance(meta["path_choices"], list)
    assert meta["c_models_identical"] is True
    for r in csv_rows:  # "error"/"oom" fail here with the row in the message
        assert float(r["median_ms"]) > 0, r

    # part a: bitsandbytes and the torch reference (Triton only on CUDA or under the interpreter)
    a = [r for r in csv_rows if r["part"] == "a"]
    assert any(r["provider"] == "copy" for r in a)
    deq = [r for r in a if r["provider"] != "copy"]
    want_a = {"bnb", "torch_ref"} | ({"triton"} if os.environ.get("TRITON_INTERPRET") == "1" else set())
    assert {r["provider"] for r in deq} == want_a
    assert {(r["shape"], r["double_quant"]) for r in deq} == {("64x96", "0"), ("64x96", "1"), ("192x96", "0"),
                                                              ("192x96", "1")}
    for r in deq:
        assert float(r["GB_per_s"]) > 0 and float(r["frac_copy_bw"]) > 0, r
        assert float(r["rel_diff"]) == 0.0, r  # bit-exact vs bitsandbytes

    # part b: four providers, training modes and decode, every ratio filled in
    b = [r for r in csv_rows if r["part"] == "b"]
    seen = {(r["mode"], r["provider"]) for r in b}
    for mode in ("fwd", "bwd", "full", "decode"):
        for prov in ("bnb_base", "peft_bnb", "peft_fast", "peft_fast_dense"):
            assert (mode, prov) in seen, (mode, prov)
    for r in b:
        for col in ("ratio_vs_bnb_base", "ratio_vs_dense_lora", "speedup_vs_peft_bnb"):
            assert float(r[col]) > 0, (col, r)
        assert "not " not in r["note"], r  # peft's and peft_fast's 4-bit LoRA layers were the ones built
        if r["mode"] == "decode" and r["provider"] in ("peft_fast", "peft_fast_dense"):
            assert float(r["rel_diff"]) < 1e-4, r  # fp32, no dropout in eval: the same function as peft+bnb

    # part c: both providers trained a toy 4-bit Llama
    c = [r for r in csv_rows if r["part"] == "c"]
    assert {r["provider"] for r in c} == {"peft_bnb", "peft_fast"}
    for r in c:
        assert float(r["tokens_per_s"]) > 0 and float(r["speedup_vs_peft_bnb"]) > 0, r

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "qlora.png").stat().st_size > 0


@pytest.mark.parametrize("avx512_bf16", [False, True], ids=["no_avx512bf16", "avx512bf16"])
def test_bench_qlora_marks_shapes_bitsandbytes_cpu_cannot_take(tmp_path, monkeypatch, capsys, avx512_bf16):
    """96x72 (W [72, 96]): bitsandbytes' CPU dequant needs IN % 64 == 0 and its AVX512-bf16
    repacking OUT % 32 == 0. Its providers are marked unsupported with the reason; peft_fast runs."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: avx512_bf16)  # simulate either CPU
    bench = _load_bench("bench_qlora_unsupported")
    rows = bench.main(["--quick", "--device", "cpu", "--parts", "a", "b", "--shapes", "96x72", "--double-quant", "1",
                       "--train-tokens", "--decode-tokens", "1", "--out", str(tmp_path)])
    assert rows and not [r for r in rows if r["median_ms"] == "error"], rows
    unsupported = {(r["part"], r["provider"]) for r in rows if r["median_ms"] == "unsupported"}
    assert unsupported == {("a", "bnb"), ("b", "bnb_base"), ("b", "peft_bnb")}
    for r in rows:
        if r["median_ms"] == "unsupported":
            assert "in_features 96 is not a multiple of the 4-bit block size 64" in r["note"], r
        elif r["provider"] != "copy":
            assert float(r["median_ms"]) > 0, r
    assert float(next(r for r in rows if r["provider"] == "torch_ref")["rel_diff"]) == 0.0
    assert "unsupported: bitsandbytes CPU: in_features 96" in capsys.readouterr().err


def test_bench_qlora_imports_without_triton_and_exits_2_without_bitsandbytes():
    """In a fresh interpreter (hiding modules in-process would leave peft_fast imported without
    triton for the tests that follow in the same worker)."""
    import subprocess

    code = ("import sys; sys.modules['triton'] = None; sys.modules['bitsandbytes'] = None\n"
            f"sys.path.insert(0, {os.path.dirname(BENCH)!r}); import bench_qlora\n"
            "bench_qlora.main(['--quick', '--device', 'cpu'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "needs bitsandbytes" in r.stderr


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("how", ["prior", "c_min_s"])
def test_bench_qlora_part_c_skipped_when_its_estimate_does_not_fit(tmp_path, how):
    """Part c checks the budget before it starts: too little left for its estimate (the --quick
    prior, or --c-min-s) gives "skipped" rows that say how much was left, what was needed and where
    the estimate comes from, instead of a step killed at its cap."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("transformers")
    bench = _load_bench(f"bench_qlora_c_skip_{how}")
    extra = ["--time-budget", "1"] if how == "prior" else ["--time-budget", "600", "--c-min-s", "5000"]
    rows = bench.main(["--quick", "--device", "cpu", "--parts", "c", *extra, "--out", str(tmp_path)])
    assert [(r["part"], r["provider"], r["median_ms"]) for r in rows] == [("c", "peft_bnb", "skipped"),
                                                                          ("c", "peft_fast", "skipped")]
    note = rows[0]["note"]
    if how == "prior":
        assert "part c needs an estimated 2.2 s" in note and "a prior for --quick" in note, note
        assert "not measured on this device" in note
    else:
        assert "left of the 600 s time budget" in note and "estimated 5000.0 s" in note and "--c-min-s" in note
    assert [r["median_ms"] for r in _csv(tmp_path / "qlora.csv")] == ["skipped", "skipped"]
    meta = json.loads((tmp_path / "qlora.json").read_text())["meta"]
    assert meta["status"] == "truncated" and meta["c_skipped"] == note and "c_estimate" in meta


def test_bench_qlora_part_c_checks_the_budget_as_it_goes(tmp_path, monkeypatch):
    """Inside part c: the second model is skipped when the first one's measured setup would not fit
    what is left; timed rounds stop (after one step each) when the next would not fit."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("transformers")
    bench = _load_bench("bench_qlora_c_as_it_goes")
    argv = ["--quick", "--device", "cpu", "--parts", "c", "--time-budget", "600", "--c-steps", "4"]

    left = iter([500.0, 0.0])  # the pre-check fits; nothing left before the second model
    monkeypatch.setattr(bench, "time_left", lambda args: next(left, 0.0))
    rows = {r["provider"]: r for r in bench.main(argv)}
    assert float(rows["peft_bnb"]["median_ms"]) > 0 and "1 steps (of 4: time budget)" in rows["peft_bnb"]["note"]
    assert rows["peft_fast"]["median_ms"] == "skipped"
    assert "measured: peft_bnb" in rows["peft_fast"]["note"], rows["peft_fast"]["note"]

    left = iter([500.0, 500.0, 500.0])  # both models; one round of timed steps fits, the next does not
    monkeypatch.setattr(bench, "time_left", lambda args: next(left, 0.0))
    rows = bench.main(argv + ["--out", str(tmp_path)])
    assert {r["provider"] for r in rows} == {"peft_bnb", "peft_fast"}
    for r in rows:
        assert float(r["tokens_per_s"]) > 0 and "2 steps (of 4: time budget)" in r["note"], r
    meta = json.loads((tmp_path / "qlora.json").read_text())["meta"]
    assert meta["c_truncated"].startswith("2 of 4 timed steps") and set(meta["c_setup_s"]) == {"peft_bnb", "peft_fast"}


def test_bench_qlora_killed_midway_keeps_the_finished_rows(tmp_path):
    """SIGTERM (`timeout` at the step's cap) during the run: the finished rows are in qlora.csv,
    the JSON says terminated, exit 143."""
    import signal

    from bench_helpers import sigterm_after_first_rows

    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("transformers")
    rc, err = sigterm_after_first_rows([BENCH, "--quick", "--device", "cpu", "--parts", "a", "b", "--reps", "40",
                                        "--out", tmp_path], tmp_path / "qlora.csv")
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    rows = _csv(tmp_path / "qlora.csv")
    assert rows and rows[0]["provider"] == "copy"
    assert not [r for r in rows if r["part"] == "b" and r["mode"] == "decode"]  # stopped well before the end
    js = json.loads((tmp_path / "qlora.json").read_text())
    assert js["meta"]["status"] == "terminated" and len(js["rows"]) == len(rows), js["meta"]
    assert "during part a" in js["meta"]["terminated"] or "during part b" in js["meta"]["terminated"]
