"""Per-shape choice between a Triton kernel and the cuBLAS composition, made by measurement.

The first call of an op for a shape key times every candidate on the device (CUDA events,
after a warm-up that also runs Triton's autotuner) and keeps the fastest; later calls with
the same key reuse it. Every choice is recorded with its timings (`path_choices()`), so a
benchmark can show which path ran. `PEFT_FAST_GEMM=triton|torch|nf4_fused` forces one path.
Without a measurable device (the Triton interpreter, stream capture) the Triton kernel runs
and the record says why nothing was measured.
"""
from __future__ import annotations

import os
import threading
from typing import Callable

import torch

_CHOICES: dict[tuple, dict] = {}
_LOCK = threading.Lock()
_REPS = 3
# 'nf4_fused' (4-bit weight decoded inside the GEMM) exists for 4-bit weights and small M only;
# a forced path that an op does not have falls back to the measured choice.
_PATHS = ("auto", "triton", "torch", "nf4_fused")


def path_choices() -> list[dict]:
    """Every recorded choice: op, key, chosen path, median ms per candidate, reason."""
    with _LOCK:
        return [dict(v) for v in _CHOICES.values()]


def clear_path_choices() -> None:
    with _LOCK:
        _CHOICES.clear()


def _time_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()  # warm-up (compiles / autotunes)
    times = []
    for _ in range(_REPS):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def choose(op: str, key: tuple, candidates: dict[str, Callable[[], object]], device: torch.device):
    """Run the chosen candidate for (op, key) and return its result (choosing first if needed)."""
    forced = os.environ.get("PEFT_FAST_GEMM", "auto").lower()
    if forced not in _PATHS:
        raise ValueError(f"PEFT_FAST_GEMM={forced!r} is not one of {_PATHS}")
    if forced != "auto" and forced in candidates:
        return candidates[forced]()
    full_key = (op, *key)
    hit = _CHOICES.get(full_key)
    if hit is not None:
        return candidates[hit["path"]]()
    if len(candidates) == 1:
        name = next(iter(candidates))
        reason = "only candidate"
        times = {}
    elif device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        name, reason, times = "triton", f"not measured on {device.type}", {}
    else:
        times = {n: _time_ms(fn) for n, fn in candidates.items()}
        name = min(times, key=times.get)
        reason = "measured"
    with _LOCK:
        _CHOICES[full_key] = {"op": op, "key": key, "path": name, "ms": times, "reason": reason}
    return candidates[name]()


def bucket(m: int) -> int:
    """Token counts are bucketed to powers of two so varying batch sizes share a choice."""
    return 1 << max(int(m) - 1, 0).bit_length()
