"""Shared helpers of the benchmark scripts: the package's own (peft_fast.cli._bench_common),
with DESIGN.md's convention that benchmark rows are appended to `benchmarks/results/*.csv`."""
from __future__ import annotations

from peft_fast.cli._bench_common import bar_plot, device_name, now, quantiles, versions  # noqa: F401
from peft_fast.cli._bench_common import write_rows as _write_rows


def write_rows(out_dir: str, stem: str, rows: list, meta: dict) -> tuple:
    """Append rows to <stem>.csv (header on creation) and write <stem>.json (meta + rows)."""
    return _write_rows(out_dir, stem, rows, meta, append=True)
