"""Mixed-adapter batches: prefill and decode throughput with N distinct LoRA adapters in one batch.

Providers, interleaved per case in one process:
  peft_fast_mixed  peft_fast, `adapter_names` with N distinct adapters (one per sample, cycling)
  peft_mixed       real peft, the same batch and names (its per-adapter loop)
  peft_fast_one    peft_fast, the same batch on a single adapter (the ceiling to approach)
Prefill: one forward over batch x seq tokens. Decode: one new token per sequence on top of a
KV cache of `--ctx` tokens (the cache is rebuilt outside the timed region for every rep).
Headline: tokens/s, mixed / one-adapter ratio, and peft_fast_mixed / peft_mixed speed-up.

GPU default (issue target): Llama-3.2-1B-shaped model (random weights from a config), bf16,
r=16 adapters on all linear layers, batch 32, prefill 512 tokens each, N in {1, 4, 16, 32, 64}.
    python benchmarks/bench_multi_lora.py --out benchmarks/results/gpu/h100
    python benchmarks/bench_multi_lora.py --quick            # small CPU model (smoke test)
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bar_plot, device_name, now, quantiles, versions, write_rows  # noqa: E402
from peft_fast.cli._bench_report import print_table_lines  # noqa: E402

warnings.filterwarnings("ignore")
PROVIDERS = ("peft_fast_mixed", "peft_mixed", "peft_fast_one")


def build_base(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=max(args.seq + args.ctx + 8, 64))
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg)
    return model.to(args.dtype).eval()


def add_adapters(lib, base, n: int, r: int):
    model = None
    for i in range(n):
        cfg = lib.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights="gaussian")
        torch.manual_seed(100 + i)
        if model is None:
            model = lib.get_peft_model(base, cfg, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.eval()


def timer(args):
    if args.device.type == "cuda":
        from triton.testing import do_bench

        def run(fn, setup=None):
            if setup is None:
                ms = do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=[0.5, 0.2, 0.8])
                return {"median": ms[0] / 1e3, "p20": ms[1] / 1e3, "p80": ms[2] / 1e3}
            ts = []  # decode: a fresh KV cache per rep, outside the timed region
            for i in range(args.reps + 2):
                state = setup()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(state)
                torch.cuda.synchronize()
                if i >= 2:
                    ts.append(time.perf_counter() - t0)
            return quantiles(ts)
        return run

    def run(fn, setup=None):  # CPU: process CPU time of one thread, robust to other load
        ts = []
        for i in range(args.reps + 1):
            state = setup() if setup is not None else None
            t0 = time.process_time()
            fn(state) if setup is not None else fn()
            if i >= 1:
                ts.append(time.process_time() - t0)
        return quantiles(ts)
    return run


def run(args) -> tuple[list[dict], dict]:
    import peft

    import peft_fast

    base = build_base(args)
    bench = timer(args)
    rows = []
    meta = {"device": device_name(), "date": now(), "versions": versions(), "dtype": str(args.dtype),
            "shape": f"llama h{args.hidden} i{args.intermediate} L{args.layers} V{args.vocab}",
            "batch": args.batch, "seq": args.seq, "ctx": args.ctx, "rank": args.rank}
    try:
        from tqdm.auto import tqdm
        ns = tqdm(args.adapters, desc="adapters", leave=False)
    except ImportError:
        ns = args.adapters
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    ctx_ids = torch.randint(0, args.vocab, (args.batch, args.ctx), generator=g).to(args.device)
    nxt = torch.randint(0, args.vocab, (args.batch, 1), generator=g).to(args.device)
    for n in ns:
        models = {"peft_fast": add_adapters(peft_fast, copy.deepcopy(base), n, args.rank),
                  "peft": add_adapters(peft, copy.deepcopy(base), n, args.rank)}
        names = [f"a{i % n}" for i in range(args.batch)]
        calls = {
            "peft_fast_mixed": (models["peft_fast"], {"adapter_names": names}),
            "peft_mixed": (models["peft"], {"adapter_names": names}),
            "peft_fast_one": (models["peft_fast"], {}),
        }
        for mode in ("prefill", "decode"):
            for prov in PROVIDERS:
                model, kw = calls[prov]
                if prov == "peft_fast_one":
                    model.set_adapter("a0")

                if mode == "prefill":
                    def fn(model=model, kw=kw):
                        with torch.no_grad():
                            model(input_ids=ids, use_cache=False, **kw)
                    setup = None
                    tokens = args.batch * args.seq
                else:
                    def setup(model=model, kw=kw):
                        with torch.no_grad():
                            return model(input_ids=ctx_ids, use_cache=True, **kw).past_key_values

                    def fn(cache, model=model, kw=kw):
                        with torch.no_grad():
                            model(input_ids=nxt, past_key_values=cache, use_cache=True, **kw)
                    tokens = args.batch
                try:
                    q = bench(fn, setup) if setup is not None else bench(fn)
                    note = ""
                except torch.cuda.OutOfMemoryError:
                    q, note = {"median": float("nan"), "p20": float("nan"), "p80": float("nan")}, "oom"
                rows.append({"date": meta["date"], "device": meta["device"], "shape": meta["shape"],
                             "dtype": meta["dtype"], "mode": mode, "adapters": n, "batch": args.batch,
                             "seq": args.seq if mode == "prefill" else 1, "provider": prov,
                             "median_ms": round(q["median"] * 1e3, 3), "p20_ms": round(q["p20"] * 1e3, 3),
                             "p80_ms": round(q["p80"] * 1e3, 3),
                             "tokens_per_s": round(tokens / q["median"], 1), "note": note})
        del models
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    for r in rows:  # ratios within one (mode, N) case
        case = {p["provider"]: p for p in rows if p["mode"] == r["mode"] and p["adapters"] == r["adapters"]}
        r["vs_one_adapter"] = round(r["tokens_per_s"] / case["peft_fast_one"]["tokens_per_s"], 3)
        r["speedup_vs_peft_mixed"] = round(r["tokens_per_s"] / case["peft_mixed"]["tokens_per_s"], 3)
    return rows, meta


def print_table(rows, meta):
    lines = [(r["mode"], str(r["adapters"]), r["provider"], f"{r['tokens_per_s']:.0f}", f"{r['vs_one_adapter']:.2f}",
              f"{r['speedup_vs_peft_mixed']:.2f}") for r in rows]
    title = f"mixed-adapter batches, {meta['shape']}, batch {meta['batch']} — {meta['device']}"
    header = ("mode", "N", "provider", "tokens/s", "x one adapter", "x peft mixed")
    print_table_lines(title, header, lines, n_left=0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model on CPU, few reps (smoke test)")
    ap.add_argument("--adapters", nargs="+", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None, help="prefill tokens per sequence")
    ap.add_argument("--ctx", type=int, default=None, help="KV-cache length before the decode step")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup-ms", type=float, default=25)
    ap.add_argument("--rep-ms", type=float, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    big = args.device.type == "cuda" and not args.quick
    dims = dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256) if big else \
        dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512)
    for k, v in dims.items():
        setattr(args, k, v)
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    args.adapters = args.adapters or ([1, 4, 16, 32, 64] if big else [1, 4, 16])
    args.batch = args.batch or (32 if big else 16)
    args.seq = args.seq or (512 if big else 32)
    args.ctx = args.ctx or (512 if big else 32)
    args.reps = args.reps or (10 if big else (3 if args.quick else 10))
    if args.device.type == "cpu":
        torch.set_num_threads(1)
    return args


def main(argv=None):
    args = parse_args(argv)
    rows, meta = run(args)
    print_table(rows, meta)
    if args.out:
        csv_path, json_path = write_rows(args.out, "multi_lora", rows, meta)
        cats = [f"{r['mode']} N={r['adapters']}" for r in rows if r["provider"] == "peft_fast_mixed"]
        series = {p: [r["vs_one_adapter"] for r in rows if r["provider"] == p] for p in ("peft_fast_mixed", "peft_mixed")}
        png = os.path.join(args.out, "multi_lora.png")
        bar_plot(png, cats, series, f"mixed batch throughput / one adapter — {meta['device']}", "x one-adapter batch")
        print(f"wrote {csv_path}, {json_path}, {png}")
    return rows


if __name__ == "__main__":
    main()
