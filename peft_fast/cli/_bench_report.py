"""What `peft-fast bench` shows and writes: rich tables, bench.{json,csv} and a PNG of the ratios."""
from __future__ import annotations

import math
import os

from ._bench_common import _pyplot, num, save_figure, write_rows

PROVIDER_ORDER = ("base", "peft", "peft_fast", "peft_fast_one")
METHOD_LABEL = {"base": "base", "base_4bit": "base (NF4)"}



def precision(settings: dict) -> str:
    """The model dtype, with the autocast dtype when the run used one ("float32 + autocast(bfloat16)")."""
    ac = settings.get("autocast")
    return settings["dtype"] + (f" + autocast({ac})" if ac else "")

def _f(v, fmt: str = "{:.3f}", empty: str = "-") -> str:
    return fmt.format(v) if num(v) is not None else empty


def _speed(v) -> str:
    """A peft_fast/peft ratio, green when faster, red when slower (rich markup)."""
    if num(v) is None:
        return "-"
    return f"[green]{v:.2f}x[/]" if v >= 1.0 else f"[red]{v:.2f}x[/]"


def _status(r) -> str:
    return {"error": "[red]error[/]", "skipped": "[yellow]skipped[/]"}.get(r["status"], r["status"])


def _console():
    from rich.console import Console

    width = int(os.environ.get("COLUMNS", "0") or 0)
    return Console(width=max(width, 120), highlight=False)


def _print_plain(title: str, header: list, lines: list) -> None:
    import re

    print(title)
    print(" | ".join(header))
    for ln in lines:
        print(" | ".join(re.sub(r"\[/?[a-z ]*\]", "", c) for c in ln))


def print_table_lines(title: str, header, lines: list, caption: str = "", n_left: int = 2) -> None:
    """A rich table of pre-formatted cells (rich markup allowed); plain text without rich."""
    header = list(header)
    try:
        from rich.table import Table
    except ImportError:
        _print_plain(title + ("\n" + caption if caption else ""), header, lines)
        return
    t = Table(title=title, caption=caption or None, caption_justify="left")
    for i, col in enumerate(header):
        t.add_column(col, justify="left" if i < n_left else "right")
    for ln in lines:
        t.add_row(*ln)
    _console().print(t)


def train_lines(rows: list) -> list:
    by = {}
    for r in rows:
        if r["method"] != "mixed":
            by.setdefault((r["method"], r["provider"]), {})[r["phase"]] = r
    lines = []
    for (method, prov), ph in by.items():
        tr, fw = ph.get("train"), ph.get("forward")
        if tr["status"] != "ok" and (fw is None or fw["status"] != "ok"):
            lines.append([METHOD_LABEL.get(method, method), prov, _status(tr), "", "", "", "", "", "", ""])
            continue
        lines.append([
            METHOD_LABEL.get(method, method), prov,
            _f(tr["tokens_per_s"], "{:,.0f}"), _speed(tr["speedup_vs_peft"]) if prov != "peft" else "1",
            _f(tr["time_vs_base"]),
            _f(fw["tokens_per_s"], "{:,.0f}") if fw else "-",
            (_speed(fw["speedup_vs_peft"]) if prov != "peft" else "1") if fw else "-",
            _f(fw["time_vs_base"]) if fw else "-",
            _f(tr["peak_mem_MiB"], "{:,.1f}"), _f(tr["mem_vs_peft"], "{:.2f}"),
        ])
        if prov == "base":
            lines[-1][3] = lines[-1][6] = ""
    return lines


def mixed_lines(rows: list) -> list:
    by = {}
    for r in rows:
        if r["method"] == "mixed":
            by.setdefault(r["provider"], {})[r["phase"]] = r
    lines = []
    for prov, ph in by.items():
        pre, dec = ph.get("prefill"), ph.get("decode")
        if pre["status"] != "ok" and dec["status"] != "ok":
            lines.append([prov, _status(pre), "", "", "", "", "", "", ""])
            continue
        cells = [prov]
        for r in (pre, dec):
            cells += [_f(r["tokens_per_s"], "{:,.0f}"),
                      "1" if prov == "peft" else ("" if prov == "base" else _speed(r["speedup_vs_peft"])),
                      "" if prov == "base" else _f(r["vs_one_adapter"], "{:.2f}"), _f(r["time_vs_base"])]
        lines.append(cells)
    return lines


def _problems(rows: list) -> list:
    """One line per provider that failed or was skipped (its note), for the table's caption."""
    seen = {}
    for r in rows:
        if r["note"]:
            seen.setdefault(f"{r['method']}/{r['provider']}", r["note"])
    return [f"[red]{k}[/]: {v[:240]}" for k, v in seen.items()]


def print_report(rows: list, meta: dict) -> None:
    s = meta["settings"]
    where = f"{meta['device']} | torch {meta['versions']['torch']}, peft {meta['versions']['peft'] or '(not installed)'}"
    what = f"{s['model']} | batch {s['batch_size']} x seq {s['seq_len']} | {precision(s)} | r={s['rank']}"
    notes = [f"clock: {s['clock']}; median of {s['steps']} steps after {s['warmup']} warm-up round(s), "
             "providers interleaved",
             "x peft: peft_fast tokens/s / peft tokens/s (>1: faster); time/base: step time / the frozen base "
             "model's (the adapters' overhead)",
             f"peak MiB: {meta['peak_mem_kind']}"]
    if meta.get("no_peft"):
        notes.insert(0, "[yellow]peft is not installed: peft_fast is compared with the frozen base model only[/]")
    train = train_lines(rows)
    if train:
        print_table_lines(f"peft-fast bench: training — {what}\n{where}",
               ["method", "provider", "train tok/s", "x peft", "time/base", "fwd tok/s", "x peft", "time/base",
                "peak MiB", "mem x peft"], train,
               "\n".join(notes + _problems([r for r in rows if r["method"] != "mixed"])))
    mixed = mixed_lines(rows)
    if mixed:
        m = meta.get("mixed", {})
        print_table_lines(f"peft-fast bench: mixed-adapter batch, {m.get('adapters')} adapters in a batch of {s['batch_size']} "
               f"— {what}\n{where}",
               ["provider", "prefill tok/s", "x peft", "x one", "time/base", "decode tok/s", "x peft", "x one",
                "time/base"], mixed,
               "peft / peft_fast: the mixed batch (adapter_names); peft_fast_one: the same batch on one adapter;\n"
               "x one: tokens/s / peft_fast_one's; decode: one token per sample on a KV cache of seq tokens"
               + ("\n[yellow]peft is not installed[/]" if meta.get("no_peft") else "")
               + "".join("\n" + p for p in _problems([r for r in rows if r["method"] == "mixed"])), n_left=1)


def ratio_plot(path: str, rows: list, meta: dict) -> bool:
    """Left: peft_fast/peft tokens/s per method and phase (with peft); right: time / frozen base."""
    plt = _pyplot()
    if plt is None:
        return False
    fast = [r for r in rows if r["provider"] == "peft_fast" and r["status"] == "ok"]
    sp = [(f"{r['method']}\n{r['phase']}", r["speedup_vs_peft"]) for r in fast if num(r["speedup_vs_peft"])]
    cats = list(dict.fromkeys(f"{r['method']}\n{r['phase']}" for r in rows
                              if r["provider"] in ("peft", "peft_fast") and r["status"] == "ok"))
    panels = (1 if sp else 0) + (1 if cats else 0)
    if not panels:
        return False
    fig, axes = plt.subplots(panels, 1, figsize=(max(6.0, 1.5 + 0.85 * len(cats)), 3.6 * panels), squeeze=False)
    axes = list(axes[:, 0])
    if sp:
        ax = axes.pop(0)
        bars = ax.bar(range(len(sp)), [v for _, v in sp],
                      color=["tab:green" if v >= 1 else "tab:red" for _, v in sp])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(sp)))
        ax.set_xticklabels([c for c, _ in sp], fontsize=8)
        ax.set_ylabel("peft_fast tokens/s / peft tokens/s")
        ax.set_title("speed-up over peft (>1: faster)", fontsize=9)
    if cats:
        ax = axes.pop(0)
        provs = [p for p in ("peft", "peft_fast") if any(r["provider"] == p and r["status"] == "ok" for r in rows)]
        w = 0.8 / max(len(provs), 1)
        for i, prov in enumerate(provs):
            vals = []
            for c in cats:
                r = next((r for r in rows if r["provider"] == prov and f"{r['method']}\n{r['phase']}" == c), None)
                vals.append(num(r["time_vs_base"]) if r else None)
            xs = [j + (i - (len(provs) - 1) / 2) * w for j in range(len(cats))]
            bars = ax.bar(xs, [v if v is not None else math.nan for v in vals], w, label=prov)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, fontsize=8)
        ax.set_ylabel("step time / frozen base model")
        ax.set_title("time vs the frozen base model (1 = no overhead)", fontsize=9)
        ax.legend(fontsize=8)
    s = meta["settings"]
    fig.suptitle(f"peft-fast bench: {s['model']}\nbatch {s['batch_size']} x seq {s['seq_len']}, {precision(s)}, "
                 f"r={s['rank']} — {meta['device']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def write_outputs(out_dir: str, rows: list, meta: dict) -> list:
    """bench.json, bench.csv (rewritten each run) and bench.png in out_dir; returns the paths."""
    csv_path, json_path = write_rows(out_dir, "bench", rows, meta, append=False)
    png = os.path.join(out_dir, "bench.png")
    return [json_path, csv_path] + ([png] if ratio_plot(png, rows, meta) else [])
