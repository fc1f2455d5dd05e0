"""Training-step throughput of peft_fast vs peft vs the frozen base model, side by side.

A thin wrapper over the training workload of `peft-fast bench` (peft_fast/cli/_bench_*.py),
kept for its command line and its result files (cpu_train_step.{csv,json,png}, rows appended
to the CSV with the columns of the earlier results). `peft-fast bench` is the main entry point;
this script adds free model dimensions and --clock. It times the train step only (no forward
phase). Default workload (issue #2): a Llama-shaped model built from a config (hidden 512,
intermediate 1376, 4 layers, vocab 4096), batch 4 x seq 256, fp32, one CPU thread, r=16 on all
linear layers; LoRA with lora_dropout 0.05, DoRA with 0; IA3 on k_proj, v_proj, down_proj.
Adapter weights are randomised (the same for peft and peft_fast), the frozen weights shared.

Reported per method: median step time (p20/p80), the ratio to the frozen base model's
fwd+bwd, the speed-up over peft, and the bytes of activations kept for backward (unique
storages saved by autograd during the forward: the memory a step holds at its peak).

    python benchmarks/bench_cpu_train_step.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from types import SimpleNamespace

try:
    import peft_fast as _installed  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from peft_fast.cli._bench_common import bar_plot, device_name, now, versions, write_rows  # noqa: E402
from peft_fast.cli._bench_model import build_llama  # noqa: E402
from peft_fast.cli._bench_report import print_table_lines  # noqa: E402
from peft_fast.cli._bench_run import Clock  # noqa: E402
from peft_fast.cli._bench_workload import rows_from, run_train  # noqa: E402


def run(args) -> tuple:
    import peft

    import peft_fast

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    spec = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab)
    dtype = getattr(torch, args.dtype)
    base = build_llama(spec, dtype, device, args.seq)
    base.requires_grad_(False)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    cfg = SimpleNamespace(device=device, dtype=dtype, batch=args.batch, seq=args.seq, rank=args.rank, targets=None,
                          steps=args.steps, warmup=args.warmup, clock=Clock(device, args.threads, args.clock),
                          progress=True, qlora_problem=None, batch_tensors={"input_ids": ids, "labels": ids})
    providers = run_train(cfg, base, {"peft": peft, "peft_fast": peft_fast}, args.methods, print, phases=("train",))
    meta = {"device": device_name(device), "date": now(), "versions": versions(), "threads": args.threads,
            "shape": f"llama h{args.hidden} i{args.intermediate} L{args.layers} V{args.vocab} b{args.batch}x{args.seq}",
            "dtype": args.dtype, "rank": args.rank, "clock": args.clock}
    new = rows_from(providers, cfg, {}, base, train_phases=("train",))
    rows = []
    for r in new:  # the columns of the earlier cpu_train_step results
        if r["status"] != "ok":
            raise RuntimeError(f"{r['method']}:{r['provider']}: {r['note']}")
        rows.append({
            "date": meta["date"], "device": meta["device"], "torch": meta["versions"]["torch"],
            "peft": meta["versions"]["peft"], "shape": meta["shape"], "dtype": args.dtype, "threads": args.threads,
            "clock": args.clock, "method": r["method"], "provider": r["provider"], "step_ms": round(r["median_ms"], 2),
            "p20_ms": round(r["p20_ms"], 2), "p80_ms": round(r["p80_ms"], 2), "ratio_vs_base": r["time_vs_base"],
            "saved_act_MiB": r["peak_mem_MiB"], "tokens_per_s": r["tokens_per_s"],
            "speedup_vs_peft": r["speedup_vs_peft"] if r["provider"] != "base" else "",
        })
    return rows, meta


def print_table(rows, meta):
    lines = [(r["method"], r["provider"], f"{r['step_ms']:.1f} ({r['p20_ms']:.1f}-{r['p80_ms']:.1f})",
              f"{r['ratio_vs_base']:.3f}", str(r["speedup_vs_peft"]), f"{r['saved_act_MiB']:.1f}") for r in rows]
    title = f"train step, {meta['shape']}, {meta['dtype']}, {meta['threads']} thread(s) — {meta['device']}"
    header = ("method", "provider", "step ms (p20-p80)", "x base", "speedup vs peft", "saved act MiB")
    print_table_lines(title, header, lines, n_left=0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["lora", "dora", "ia3"], choices=["lora", "dora", "ia3"])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--clock", default="cpu", choices=["cpu", "wall"],
                    help="cpu: process CPU time (robust to other load; meaningful with --threads 1); wall: elapsed time")
    ap.add_argument("--out", default=None, help="directory for CSV/JSON/PNG (appends to the CSV)")
    args = ap.parse_args(argv)
    rows, meta = run(args)
    print_table(rows, meta)
    if args.out:
        stem = "cpu_train_step"
        csv_path, json_path = write_rows(args.out, stem, rows, meta, append=True)
        series = {prov: [next(r["ratio_vs_base"] for r in rows if r["method"] == m and r["provider"] == prov)
                         for m in args.methods] for prov in ("peft", "peft_fast")}
        png = os.path.join(args.out, f"{stem}.png")
        bar_plot(png, args.methods, series, f"train step time / frozen base fwd+bwd — {meta['device']}", "x frozen base")
        print(f"wrote {csv_path}, {json_path}, {png}")
    return rows


if __name__ == "__main__":
    main()
