"""`peft-fast bench` on CPU at tiny sizes: the files it writes, its ratios, --layers, --model,
the path without peft (a subprocess that hides it), and clear errors for bad arguments."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

import peft_fast.cli.main as cli_main  # noqa: E402

TINY = ["--preset", "tiny", "--steps", "2", "--warmup", "1", "--no-progress"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _only_present_commands(monkeypatch):
    """The dispatcher imports every sub-command module; the others are written separately, so
    these tests register only those that exist (bench among them)."""
    present = tuple(c for c in cli_main.COMMANDS if importlib.util.find_spec(f"peft_fast.cli.{c}") is not None)
    monkeypatch.setattr(cli_main, "COMMANDS", present)


def bench(*argv) -> int:
    return cli_main.main(["bench", *argv])


def read_out(out) -> tuple:
    with open(os.path.join(out, "bench.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    data = json.loads(open(os.path.join(out, "bench.json")).read())
    with open(os.path.join(out, "bench.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(data["rows"]) == len(rows) > 0
    return rows, data


def positive(v) -> float:
    x = float(v)
    assert math.isfinite(x) and x > 0, v
    return x


def check_rows(rows, methods, with_peft=True) -> None:
    for r in rows:
        assert r["status"] == "ok", r
        positive(r["tokens_per_s"])
        positive(r["median_ms"])
        positive(r["time_vs_base"])  # every row has its frozen base
    provs = {(r["method"], r["provider"]) for r in rows}
    for m in methods:
        assert (m, "peft_fast") in provs, m
        assert ((m, "peft") in provs) == with_peft, m
        for r in rows:
            if r["method"] == m and r["provider"] == "peft_fast":
                if with_peft:
                    positive(r["speedup_vs_peft"])
                else:
                    assert r["speedup_vs_peft"] == "", r


def test_default_methods_tiny_writes_json_csv_png(tmp_path):
    import torch

    threads = torch.get_num_threads()
    pytest.importorskip("peft")
    assert bench(*TINY, "--out", str(tmp_path)) == 0
    assert torch.get_num_threads() == threads  # restored after the run
    rows, data = read_out(tmp_path)
    check_rows(rows, ["lora", "dora", "ia3"])
    assert {r["phase"] for r in rows} == {"train", "forward"}
    for r in rows:
        if r["phase"] == "train":
            assert r["peak_mem_kind"] == "cpu_saved_activations"
            positive(r["peak_mem_MiB"])
        if r["phase"] == "train" and r["provider"] == "peft_fast" and r["method"] in ("dora", "ia3"):
            # no dropout, the same weights and batch: the same first loss as peft
            assert float(r["rel_loss_diff_vs_peft"]) < 1e-4, r
    meta = data["meta"]
    assert meta["device"].startswith("CPU") and meta["date"]
    assert meta["versions"]["torch"] and meta["versions"]["peft"]
    s = meta["settings"]
    assert (s["batch_size"], s["seq_len"], s["dtype"], s["steps"], s["warmup"]) == (2, 32, "float32", 2, 1)
    assert s["methods"] == ["lora", "dora", "ia3"]
    assert "saved for backward" in meta["peak_mem_kind"]


@pytest.mark.parametrize("ac", ["bf16", "fp16"])
def test_autocast_tiny(tmp_path, ac, capsys):
    """--autocast: the fp32 model trains under torch.autocast (Trainer's bf16=True); peft_fast and
    peft give the same first loss within the 16-bit tolerance, and the settings say so."""
    pytest.importorskip("peft")
    assert bench(*TINY, "--autocast", ac, "--methods", "lora", "dora", "--out", str(tmp_path)) == 0
    rows, data = read_out(tmp_path)
    check_rows(rows, ["lora", "dora"])
    name = {"bf16": "bfloat16", "fp16": "float16"}[ac]
    assert data["meta"]["settings"]["autocast"] == name and data["meta"]["settings"]["dtype"] == "float32"
    assert all(r["autocast"] == name for r in rows)
    for r in rows:
        if r["phase"] == "train" and r["provider"] == "peft_fast":
            assert float(r["rel_loss_diff_vs_peft"]) < 2e-2, r
    assert f"autocast({name})" in capsys.readouterr().out


def test_qlora_and_mixed_tiny(tmp_path, capsys):
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "o"
    assert bench(*TINY, "--methods", "qlora,mixed", "lora", "--out", str(out)) == 0
    rows, data = read_out(out)
    check_rows(rows, ["lora", "qlora", "mixed"])
    provs = {(r["method"], r["provider"], r["phase"]) for r in rows}
    assert ("base_4bit", "base", "train") in provs  # qlora's ratio is to the frozen NF4 base
    for ph in ("prefill", "decode"):
        for prov in ("base", "peft", "peft_fast", "peft_fast_one"):
            assert ("mixed", prov, ph) in provs
        fast = next(r for r in rows if r["method"] == "mixed" and r["provider"] == "peft_fast" and r["phase"] == ph)
        positive(fast["vs_one_adapter"])
    assert data["meta"]["mixed"]["adapters"] == 2  # default: one adapter per sample
    shown = capsys.readouterr().out
    assert "mixed-adapter batch" in shown and "qlora" in shown


def test_layers_tiny(tmp_path):
    pytest.importorskip("peft")
    assert bench("--layers", "--preset", "tiny", "--methods", "lora", "ia3", "--steps", "2", "--warmup", "1",
                 "--layer-tokens", "5", "--no-progress", "--out", str(tmp_path)) == 0
    with open(tmp_path / "layers.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert (tmp_path / "layers.json").exists() and (tmp_path / "layers.png").exists()
    # tiny preset: h64 i128, 4 heads, 2 kv heads -> 64x64, 64x32, 64x128, 128x64
    assert {(r["in_features"], r["out_features"]) for r in rows} == {("64", "64"), ("64", "32"), ("64", "128"),
                                                                     ("128", "64")}
    assert {r["method"] for r in rows} == {"lora", "ia3"} and {r["M"] for r in rows} == {"5"}
    for r in rows:
        positive(r["median_ms"])
        positive(r["ratio_vs_base"])


def test_model_dir_and_no_warmup(tmp_path):
    pytest.importorskip("peft")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=128)).save_pretrained(tmp_path / "m")
    out = tmp_path / "o"
    assert bench("--model", str(tmp_path / "m"), "--methods", "ia3", "--targets", "q_proj,down_proj", "--seq-len", "8",
                 "--batch-size", "3", "--steps", "1", "--warmup", "0", "--no-progress", "--out", str(out)) == 0
    rows, data = read_out(out)
    check_rows(rows, ["ia3"])
    assert data["meta"]["settings"]["model_dir"] == str(tmp_path / "m")
    assert all(r["tokens_per_step"] in ("24",) for r in rows)  # 3 x 8
    assert "down_proj" in next(r["adapter"] for r in rows if r["provider"] == "peft_fast")


def test_without_peft_compares_with_the_base_only(tmp_path):
    code = (
        "import importlib.util, sys\n"
        "sys.modules['peft'] = None\n"  # hides the installed peft: `import peft` raises ImportError
        "import peft_fast.cli.main as m\n"
        "m.COMMANDS = tuple(c for c in m.COMMANDS if importlib.util.find_spec('peft_fast.cli.' + c))\n"
        f"rc = m.main(['bench', *{TINY!r}, '--methods', 'lora', 'mixed', '--out', {str(tmp_path)!r}])\n"
        f"rc += 10 * m.main(['bench', '--layers', *{TINY!r}, '--methods', 'dora', '--layer-tokens', '3', "
        f"'--layer-shapes', '24x40', '--out', {str(tmp_path / 'layers')!r}])\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "COLUMNS": "160"}
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "peft is not installed" in p.stdout + p.stderr
    rows, data = read_out(tmp_path)
    check_rows(rows, ["lora", "mixed"], with_peft=False)
    assert data["meta"]["no_peft"] is True and data["meta"]["versions"]["peft"] is None
    assert not any(r["provider"] == "peft" for r in rows)
    with open(tmp_path / "layers" / "layers.csv", newline="") as f:
        layer_rows = list(csv.DictReader(f))
    assert {r["provider"] for r in layer_rows} == {"base", "peft_fast"}
    for r in layer_rows:
        positive(r["ratio_vs_base"])


@pytest.mark.parametrize("argv, needle", [
    (["--model", "/nonexistent/llama-dir"], "/nonexistent/llama-dir"),
    (["--methods", "lora", "lorax"], "unknown method 'lorax'"),
    (["--methods", "lora,bogus"], "unknown method 'bogus'"),
    (["--layers", "--methods", "mixed"], "--layers measures lora, dora, ia3; not mixed"),
    (["--steps", "0"], "must be >= 1"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--targets", "all-linear,q_proj"], "all-linear cannot be combined"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--autocast", "float32"], "autocast needs a 16-bit dtype"),
    (["--autocast", "bf16", "--dtype", "bfloat16"], "autocast is for float32 models"),
])
def test_bad_arguments_give_a_clear_error(argv, needle, capsys):
    try:
        rc = bench(*argv, "--no-progress")
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err


def test_model_dir_without_config_names_the_path(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert bench("--model", str(tmp_path / "empty"), "--no-progress") == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and "config.json" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    assert bench("--device", "cuda", "--no-progress") == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_qlora_without_4bit_support(tmp_path, monkeypatch, capsys):
    """Asked for: a clear error up front. In the default method list (CUDA's): skipped, with the reason."""
    import peft_fast.cli._bench_model as bm
    import peft_fast.cli.bench as cli_bench

    monkeypatch.setattr(bm, "bnb_4bit_problem", lambda device: "bitsandbytes is not importable (test)")
    assert bench(*TINY, "--methods", "qlora") == 2
    assert "--methods qlora: bitsandbytes is not importable (test)" in capsys.readouterr().err

    monkeypatch.setitem(cli_bench.DEFAULT_METHODS, "cpu", ["ia3", "qlora"])
    assert bench(*TINY, "--out", str(tmp_path)) == 0
    with open(tmp_path / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    q = [r for r in rows if r["method"] == "qlora"]
    assert q and all(r["status"] == "skipped" and "not importable (test)" in r["note"] for r in q)
    check_rows([r for r in rows if r["method"] != "qlora"], ["ia3"])
    assert "skipped" in capsys.readouterr().out
