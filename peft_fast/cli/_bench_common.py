"""Shared plumbing of `peft-fast bench`: environment facts, timing stats, CSV/JSON/PNG output.

Files are written to a temporary name and renamed, so an interrupted run never leaves a
half-written result behind.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import platform
import statistics
import tempfile
from typing import Iterable, Optional


def device_name(device=None) -> str:
    import torch

    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev if dev is not None and dev.index is not None else 0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


def versions() -> dict:
    """Versions of the libraries a measurement depends on (None where not importable)."""
    import sys

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("peft", "transformers", "triton", "bitsandbytes", "peft_fast"):
        if mod in sys.modules and sys.modules[mod] is None:  # hidden on purpose (tests)
            out[mod] = None
            continue
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - missing or broken: recorded as absent
            out[mod] = None
    return out


def quantiles(samples: list) -> dict:
    """median with p20/p80, in the samples' unit."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
    return {"median": statistics.median(s), "p20": q[1], "p80": q[7], "n": len(s)}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def num(v) -> Optional[float]:
    """v as a finite number, else None (statuses such as 'error' or '' are not numbers)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def ratio(a, b, nd: int = 3):
    """round(a / b, nd), or '' when either is not a positive finite number."""
    a, b = num(a), num(b)
    return round(a / b, nd) if a is not None and b else ""


def _atomic_write(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_rows(out_dir: str, stem: str, rows: list, meta: dict, append: bool = False) -> tuple:
    """<stem>.csv (the union of the rows' keys as columns) and <stem>.json (meta + rows).

    append=True keeps the rows already in <stem>.csv (same columns; the header is written once).
    """
    os.makedirs(out_dir, exist_ok=True)
    fields: list = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    old = ""
    if append and os.path.exists(csv_path):
        with open(csv_path, newline="") as f:
            old = f.read()
        header = next(csv.reader(io.StringIO(old)), None)
        if header:
            fields = header + [k for k in fields if k not in header]
            if header != fields:  # new columns: rewrite the old rows under the wider header
                old_rows = list(csv.DictReader(io.StringIO(old)))
                rows = old_rows + list(rows)
                old = ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, restval="")
    if not old:
        w.writeheader()
    w.writerows(rows)
    _atomic_write(csv_path, old + buf.getvalue())
    json_path = os.path.join(out_dir, f"{stem}.json")
    _atomic_write(json_path, json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    return csv_path, json_path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - no plot without matplotlib, the rest still runs
        return None
    return plt


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Save a matplotlib figure through a temporary file (same extension, so the format is kept)."""
    d = os.path.dirname(os.path.abspath(path))
    root, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + root + ".", suffix=ext)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def bar_plot(path: str, labels: Iterable, series: dict, title: str, ylabel: str) -> bool:
    """Grouped bar chart with a dashed line at 1.0; returns False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    labels = list(labels)
    n = len(series)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * max(len(labels), 1), 4))
    for i, (name, vals) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
        vals = [v if num(v) is not None else math.nan for v in vals]
        bars = ax.bar(xs, vals, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True
