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
import signal
import statistics
import sys
import tempfile
import time
from typing import Iterable, Optional

_IMPORTED = time.monotonic()


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


def _csv_text(old: str, rows: list) -> str:
    """The text of a CSV file holding the rows of `old` (a CSV file's text, may be empty) and then
    `rows`: columns are old's header followed by the rows' new keys; old's text is kept as it is
    when no column is new, else its rows are rewritten under the wider header."""
    fields: list = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    header = next(csv.reader(io.StringIO(old)), None) if old else None
    if header:
        fields = header + [k for k in fields if k not in header]
        if header != fields:  # new columns: rewrite the old rows under the wider header
            rows = list(csv.DictReader(io.StringIO(old))) + list(rows)
            old = ""
    else:
        old = ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, restval="")
    if not old:
        w.writeheader()
    w.writerows(rows)
    return old + buf.getvalue()


def _read(path: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, newline="") as f:
        return f.read()


def write_rows(out_dir: str, stem: str, rows: list, meta: dict, append: bool = False) -> tuple:
    """<stem>.csv (the union of the rows' keys as columns) and <stem>.json (meta + rows).

    append=True keeps the rows already in <stem>.csv (same columns; the header is written once).
    """
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    _atomic_write(csv_path, _csv_text(_read(csv_path) if append else "", rows))
    json_path = os.path.join(out_dir, f"{stem}.json")
    _atomic_write(json_path, json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    return csv_path, json_path


def process_start() -> float:
    """The time.monotonic() reading at which this process started (Linux: from /proc/self/stat,
    so the interpreter's start and every import count), or, where that cannot be read, at the
    first import of this module. A benchmark's --time-budget counts from here: the caller's
    `timeout` cap counts from the process's start too."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22, starttime: clock ticks after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 7 * 86400:
            return min(time.monotonic() - age, _IMPORTED)
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    return _IMPORTED


class RowWriter:
    """Results written as they come: <stem>.csv and <stem>.json rewritten (atomically) after every
    add(), so a run killed at its cap keeps every finished row; <stem>.png by finish().

    append=True keeps the rows <stem>.csv held before this run (as write_rows does); the JSON holds
    this run's meta and rows, with meta["status"] "running" until finish() ("complete", or what the
    caller set) or a SIGTERM ("terminated": see install_sigterm). out_dir None: nothing is written.
    plot(path, rows, meta) -> bool draws the PNG; finalize(meta) adds what is known only at the end
    (e.g. the path choices) before the last write.
    """

    def __init__(self, out_dir: Optional[str], stem: str, meta: dict, append: bool = True, plot=None,
                 finalize=None, t0: Optional[float] = None):
        self.out_dir, self.stem, self.meta, self.plot, self.finalize = out_dir, stem, meta, plot, finalize
        self.t0 = process_start() if t0 is None else t0
        self.rows: list = []
        self._busy = False
        self._pending_signal = None
        self._finished = False
        self.meta.setdefault("status", "running")
        self.paths: list = []
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            self.csv_path = os.path.join(out_dir, f"{stem}.csv")
            self.json_path = os.path.join(out_dir, f"{stem}.json")
            self.png_path = os.path.join(out_dir, f"{stem}.png")
            self._old = _read(self.csv_path) if append else ""
            # the JSON at once: a run killed before its first row says so
            self._guarded(lambda: self._write(csv_too=False))

    def add(self, rows) -> None:
        """Record finished rows and rewrite the files."""
        rows = list(rows)
        if rows:
            self.rows.extend(rows)
            self._guarded(self._write)

    def finish(self, status: str = "complete") -> list:
        """The last write: finalize(meta), status, CSV, JSON and the PNG; returns the paths written."""
        def last():
            if self.meta.get("status") == "running":
                self.meta["status"] = status
            self._final_files()

        if not self._finished:
            self._finished = True
            self._guarded(last)
        self.uninstall_sigterm()
        return list(self.paths)

    def _guarded(self, fn) -> None:
        """fn() with a SIGTERM held back until it is done (then handled)."""
        self._busy = True
        try:
            fn()
        finally:
            self._busy = False
        if self._pending_signal is not None:
            self._terminate(self._pending_signal)

    def _write(self, csv_too: bool = True) -> None:
        if not self.out_dir:
            return
        self.meta["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.meta["rows_written"] = len(self.rows)
        if csv_too and self.rows:
            _atomic_write(self.csv_path, _csv_text(self._old, self.rows))
            if self.csv_path not in self.paths:
                self.paths[:0] = [self.csv_path]
        _atomic_write(self.json_path, json.dumps({"meta": self.meta, "rows": self.rows}, indent=2, default=str))
        if self.json_path not in self.paths:
            self.paths.append(self.json_path)

    def _final_files(self) -> None:
        if self.finalize is not None:
            try:
                self.finalize(self.meta)
            except Exception as e:  # noqa: BLE001 - the rows matter more than the extras
                self.meta["finalize_error"] = f"{type(e).__name__}: {e}"[:300]
        self._write()
        if self.out_dir and self.plot is not None and self.rows:
            try:
                if self.plot(self.png_path, self.rows, self.meta):
                    self.paths.append(self.png_path)
            except Exception as e:  # noqa: BLE001
                print(f"warning: {self.png_path} not drawn: {type(e).__name__}: {e}", file=sys.stderr)

    # ---- SIGTERM (what `timeout` sends at a step's cap)
    def install_sigterm(self, what=None) -> None:
        """On SIGTERM: write what is there (meta status "terminated", the PNG too) and exit with
        143 (128 + SIGTERM). A signal that arrives while the files are being written waits until
        that write is done. what() -> str, if given, says what was running (into the meta).
        Main thread only (Python's rule for signal handlers); elsewhere this does nothing."""
        self._what = what
        if not self.out_dir:
            return
        try:
            self._old_handler = signal.signal(signal.SIGTERM, self._on_signal)
        except ValueError:  # not the main thread
            pass

    def uninstall_sigterm(self) -> None:
        """Put back the SIGTERM handler install_sigterm replaced (finish() does this too)."""
        if self._old_handler is not None:
            try:
                signal.signal(signal.SIGTERM, self._old_handler)
            except ValueError:
                pass
            self._old_handler = None

    def _on_signal(self, signum, frame) -> None:
        self._pending_signal = signum
        if not self._busy:
            self._terminate(signum)

    def _terminate(self, signum) -> None:
        self._busy = True  # a second signal from here on only sets _pending_signal
        try:
            running = ""
            if self._what is not None:
                try:
                    running = self._what() or ""
                except Exception:  # noqa: BLE001
                    running = ""
            self.meta["status"] = "terminated"
            self.meta["terminated"] = (f"{signal.Signals(signum).name} after {time.monotonic() - self.t0:.1f} s from "
                                       "the process's start" + (f", during {running}" if running else "")
                                       + f"; {len(self.rows)} finished row(s) kept")
            print(f"warning: {self.meta['terminated']}", file=sys.stderr)
            self._finished = True
            self._final_files()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(128 + signum)

    _what = None
    _old_handler = None


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
