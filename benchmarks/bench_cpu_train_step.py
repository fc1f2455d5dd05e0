"""Training-step throughput of peft_fast vs peft vs the frozen base model, side by side.

One process, providers interleaved step by step after a warm-up, so machine noise hits all
of them alike. Default workload (issue #2): a Llama-shaped model built from a config
(hidden 512, intermediate 1376, 4 layers, vocab 4096), batch 4 x seq 256, fp32, one CPU thread, r=16 on all linear layers;
LoRA with lora_dropout 0.05, DoRA with 0; IA3 on k_proj, v_proj, down_proj.

Reported per method: median step time (p20/p80), the ratio to the frozen base model's
fwd+bwd, the speed-up over peft, and the bytes of activations kept for backward (unique
storages saved by autograd during the forward: the memory a step holds at its peak).

    python benchmarks/bench_cpu_train_step.py --out benchmarks/results
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

warnings.filterwarnings("ignore")


def build_base(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                      max_position_embeddings=max(args.seq, 512))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
    model.config.use_cache = False
    return model


def method_config(lib, method: str, r: int):
    if method == "lora":
        return lib.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    if method == "dora":
        return lib.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, use_dora=True, target_modules="all-linear",
                              task_type="CAUSAL_LM")
    if method == "ia3":
        return lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                             task_type="CAUSAL_LM")
    raise ValueError(f"unknown method {method!r}")


def prepare(model, trainable: bool):
    if not trainable:  # the frozen base model: no weight gradients, only the backward to the input
        model.requires_grad_(False)
    model.train()
    model.enable_input_require_grads()  # the base model then also runs its full backward
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if (trainable and params) else None
    return model, opt


def make_step(model, opt, batch):
    def step():
        out = model(**batch)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
    return step


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the unique storages autograd keeps for backward during one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and t.numel():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def run(args) -> list[dict]:
    import peft
    import peft_fast

    torch.set_num_threads(args.threads)
    base = build_base(args)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    providers = {"base": prepare(copy.deepcopy(base), trainable=False)}
    for method in args.methods:
        for name, lib in (("peft", peft), ("peft_fast", peft_fast)):
            torch.manual_seed(2)
            m = lib.get_peft_model(copy.deepcopy(base), method_config(lib, method, args.rank))
            providers[f"{method}:{name}"] = prepare(m, trainable=True)
    steps = {k: make_step(m, o, batch) for k, (m, o) in providers.items()}
    mem = {k: saved_activation_bytes(m, batch) for k, (m, _) in providers.items()}
    for _ in range(args.warmup):
        for s in steps.values():
            s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    try:
        from tqdm.auto import tqdm
        rng = tqdm(range(args.steps), desc="interleaved steps", leave=False)
    except ImportError:
        rng = range(args.steps)
    order = list(steps)
    # CPU time of this (single-threaded) process: unaffected by other load on the machine
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for i in rng:
        for k in order[i % len(order):] + order[: i % len(order)]:  # rotate who goes first
            t0 = clock()
            steps[k]()
            times[k].append(clock() - t0)
    base_t = quantiles(times["base"])["median"]
    meta = {"device": device_name(), "date": now(), "versions": versions(), "threads": args.threads,
            "shape": f"llama h{args.hidden} i{args.intermediate} L{args.layers} V{args.vocab} b{args.batch}x{args.seq}",
            "dtype": args.dtype, "rank": args.rank, "clock": args.clock}
    rows = []
    for k, ts in times.items():
        q = quantiles(ts)
        method, _, provider = k.partition(":")
        rows.append({
            "date": meta["date"], "device": meta["device"], "torch": meta["versions"]["torch"],
            "peft": meta["versions"]["peft"], "shape": meta["shape"], "dtype": args.dtype, "threads": args.threads,
            "clock": args.clock, "method": method if provider else "base", "provider": provider or "base",
            "step_ms": round(q["median"] * 1e3, 2), "p20_ms": round(q["p20"] * 1e3, 2), "p80_ms": round(q["p80"] * 1e3, 2),
            "ratio_vs_base": round(q["median"] / base_t, 3), "saved_act_MiB": round(mem[k] / 2**20, 1),
            "tokens_per_s": round(args.batch * args.seq / q["median"], 1),
        })
    for method in args.methods:
        p = next(r for r in rows if r["method"] == method and r["provider"] == "peft")
        f = next(r for r in rows if r["method"] == method and r["provider"] == "peft_fast")
        f["speedup_vs_peft"] = round(p["step_ms"] / f["step_ms"], 3)
        p["speedup_vs_peft"] = 1.0
    for r in rows:
        r.setdefault("speedup_vs_peft", "")
    return rows, meta


def print_table(rows, meta):
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for r in rows:
            print(r)
        return
    t = Table(title=f"train step, {meta['shape']}, {meta['dtype']}, {meta['threads']} thread(s) — {meta['device']}")
    for col in ("method", "provider", "step ms (p20-p80)", "x base", "speedup vs peft", "saved act MiB"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["method"], r["provider"], f"{r['step_ms']:.1f} ({r['p20_ms']:.1f}-{r['p80_ms']:.1f})",
                  f"{r['ratio_vs_base']:.3f}", str(r["speedup_vs_peft"]), f"{r['saved_act_MiB']:.1f}")
    Console().print(t)


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
        csv_path, json_path = write_rows(args.out, stem, rows, meta)
        methods = args.methods
        series = {prov: [next(r["ratio_vs_base"] for r in rows if r["method"] == m and r["provider"] == prov)
                         for m in methods] for prov in ("peft", "peft_fast")}
        png = os.path.join(args.out, f"{stem}.png")
        bar_plot(png, methods, series, f"train step time / frozen base fwd+bwd — {meta['device']}", "x frozen base")
        print(f"wrote {csv_path}, {json_path}, {png}")
    return rows


if __name__ == "__main__":
    main()
