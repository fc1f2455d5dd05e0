"""Report of benchmarks/bench_qlora.py: headline ratios, the per-part tables and the PNG plot.

Rows are the dicts bench_qlora.py writes to its CSV; `args` its parsed arguments.
"""
from __future__ import annotations

import math
import statistics

from peft_fast.cli._bench_common import save_figure
from peft_fast.cli._bench_report import print_table_lines


def num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def geomean(vals) -> float | None:
    vals = [v for v in map(num, vals) if v is not None and v > 0]
    return math.exp(statistics.fmean(math.log(v) for v in vals)) if vals else None


def headlines(rows: list, args) -> list[tuple]:
    """(headline, per-case values, summary, target) tuples."""
    out = []

    def pick(**kw):
        return [r for r in rows if all(str(r[k]) == str(v) for k, v in kw.items())]

    for prov in ("triton", "bnb"):
        rs = pick(part="a", provider=prov)
        if rs:
            vals = [(f"{r['shape']} dq{r['double_quant']}", r["frac_copy_bw"]) for r in rs]
            ok = [num(v) for _, v in vals if num(v) is not None]
            out.append((f"dequant {prov}: fraction of copy bandwidth", vals,
                        f"mean {statistics.fmean(ok):.3f}" if ok else "-", "high (1.0 = copy)"))
    if args.train_tokens:
        M = max(args.train_tokens)
        rs = pick(part="b", mode="full", M=M, provider="peft_fast")
        if rs:
            out.append((f"QLoRA / dense LoRA ({args.dtype}), fwd+bwd M={M}",
                        [(r["shape"], r["ratio_vs_dense_lora"]) for r in rs],
                        fmt_g(geomean(r["ratio_vs_dense_lora"] for r in rs)), "<= 1.15"))
            out.append((f"peft+bnb / QLoRA (speed-up), fwd+bwd M={M}", [(r["shape"], r["speedup_vs_peft_bnb"]) for r in rs],
                        fmt_g(geomean(r["speedup_vs_peft_bnb"] for r in rs)), "> 1"))
    if args.decode_tokens:
        M = min(args.decode_tokens)
        rs = pick(part="b", mode="decode", M=M, provider="peft_fast")
        if rs:
            out.append((f"decode speed-up vs peft+bnb, M={M}", [(r["shape"], r["speedup_vs_peft_bnb"]) for r in rs],
                        fmt_g(geomean(r["speedup_vs_peft_bnb"] for r in rs)), "> 1"))
            out.append((f"decode QLoRA / bnb layer alone, M={M}", [(r["shape"], r["ratio_vs_bnb_base"]) for r in rs],
                        fmt_g(geomean(r["ratio_vs_bnb_base"] for r in rs)), "~1"))
    rs = pick(part="c", provider="peft_fast")
    if rs:
        r = rs[0]
        out.append(("part c train step: peak memory peft_fast / peft+bnb", [("step", r["mem_ratio_vs_peft_bnb"])],
                    fmt(r["mem_ratio_vs_peft_bnb"]) if r["mem_ratio_vs_peft_bnb"] != "" else "- (CUDA only)", "< 1"))
        out.append(("part c train step: tokens/s peft_fast / peft+bnb", [("step", r["speedup_vs_peft_bnb"])],
                    fmt(r["speedup_vs_peft_bnb"]), "> 1"))
    return out


def fmt_g(v) -> str:
    return f"geomean {v:.3f}" if v is not None else "-"


def fmt(v, nd=3) -> str:
    n = num(v)
    return f"{n:.{nd}f}" if n is not None else (str(v) if v != "" else "-")


def fmt_e(v) -> str:
    n = num(v)
    return f"{n:.2g}" if n is not None else "-"


def print_table(title: str, header: tuple, lines: list) -> None:
    print_table_lines(title, header, lines, n_left=0)


def report(rows: list, meta: dict, args) -> None:
    def by(part):
        return [r for r in rows if r["part"] == part]

    if by("a"):
        lines = [(r["shape"], r["layer"], str(r["double_quant"]), r["provider"], fmt(r["median_ms"], 4),
                  fmt(r["GB_per_s"], 1), fmt(r["frac_copy_bw"]), fmt(r["speedup_vs_bnb_dequant"]), fmt_e(r["rel_diff"]))
                 for r in by("a")]
        print_table(f"part a: NF4 dequant, {args.dtype}; copy bandwidth {meta.get('copy_bandwidth_GBps')} GB/s",
                    ("in x out", "layer", "dq", "provider", "ms", "GB/s", "frac copy", "x bnb", "max|diff| vs bnb"), lines)
    if by("b"):
        lines = [(r["shape"], str(r["M"]), r["mode"], r["provider"], fmt(r["median_ms"], 4), fmt(r["ratio_vs_bnb_base"]),
                  fmt(r["ratio_vs_dense_lora"]), fmt(r["speedup_vs_peft_bnb"]), fmt(r["peak_mem_MiB"], 1),
                  fmt_e(r["rel_diff"])) for r in by("b")]
        print_table(f"part b: one layer, r={args.rank}, {args.dtype}, NF4 dq (train: fwd/bwd/full; decode: eval no-grad)",
                    ("in x out", "M", "mode", "provider", "ms", "/ bnb base", "/ dense LoRA", "peft+bnb / this",
                     "peak MiB", "rel diff"), lines)
    if by("c"):
        lines = [(r["provider"], fmt(r["median_ms"], 2), fmt(r["tokens_per_s"], 0), fmt(r["peak_mem_MiB"], 1),
                  fmt(r["speedup_vs_peft_bnb"]), fmt(r["mem_ratio_vs_peft_bnb"]), r["note"]) for r in by("c")]
        print_table(f"part c: one training step, {by('c')[0]['shape']}, {args.dtype}",
                    ("provider", "step ms", "tokens/s", "peak MiB", "speed-up vs peft+bnb", "mem / peft+bnb", "note"),
                    lines)
    hl = headlines(rows, args)
    if hl:
        print_table(f"QLoRA headlines — {meta['device']}",
                    ("headline", "per case", "summary", "target"),
                    [(h, ", ".join(f"{k}: {fmt(v)}" for k, v in vals), s, tgt) for h, vals, s, tgt in hl])


def plot(path: str, rows: list, args, meta: dict) -> bool:
    """One panel per headline that has numbers: its per-case values as bars (1.0 dashed)."""
    hl = [h for h in headlines(rows, args) if any(num(v) is not None for _, v in h[1])]
    if not hl:
        return False
    try:
        import textwrap

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    ncol = min(4, len(hl))
    nrow = math.ceil(len(hl) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 3.4 * nrow), squeeze=False)
    for ax in axes.flat[len(hl):]:
        ax.axis("off")
    for ax, (h, vals, s, tgt) in zip(axes.flat, hl):
        ys = [num(v) if num(v) is not None else math.nan for _, v in vals]
        bars = ax.bar(range(len(ys)), ys, color="tab:blue")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        if "1.15" in tgt:
            ax.axhline(1.15, color="red", lw=0.8, ls=":")
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels([k for k, _ in vals], fontsize=6, rotation=45, ha="right")
        ax.set_title("\n".join(textwrap.wrap(f"{h}: {s} (target {tgt})", 42)), fontsize=7)
    fig.suptitle(f"QLoRA, {args.dtype} r={args.rank} — {meta['device']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)  # a temporary file renamed: never a half-written PNG
    plt.close(fig)
    return True
