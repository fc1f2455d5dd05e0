"""Per-shape choice between a Triton kernel and the cuBLAS composition, made by measurement.

The first call of an op for a shape key times every candidate on the device (CUDA events,
after a warm-up that also runs Triton's autotuner) and keeps the fastest; later calls with
the same key reuse it. Every choice is recorded with its timings (`path_choices()`), so a
benchmark can show which path ran. `PEFT_FAST_GEMM=triton|torch|nf4_fused` forces one path.
Without a measurable device (the Triton interpreter, stream capture) the Triton kernel runs
and the record says why nothing was measured.

Launch failures. A kernel that does not fit the GPU (Triton's `OutOfResources`: shared memory,
threads, tensor memory), does not compile for it (`CompilationError`, `PTXASError`, or the
RuntimeError that older Triton raises for ptxas/MLIR failures) or has no config left
(`AutotunerError`) is a property of (kernel, shape, GPU), not a bug in the caller: such a
candidate is dropped from the measurement, and a chosen, forced or only candidate that raises
one when it runs hands over to the next path (the remaining candidates, fastest first, then the
op's `fallbacks`, which are never measured). The failure is remembered per (op, key), so the
failing path is not tried again, and shows in the record (`failed`: path -> error, `reason`).
A `PathFallbackWarning` is emitted once per (op, failed path, error class) in a process, naming
the first shape key and the error, and attributed to the first calling frame outside peft_fast,
torch and triton (the user's line); further keys failing the same way are only recorded (a model
has dozens of shape keys per op, and they fail together). Every other exception (TypeError,
ValueError from bad inputs, CUDA errors such as an illegal address) propagates unchanged.
`PEFT_FAST_PATH_STRICT=1` turns the fallback off (launch failures raise), for GPU tests that
must see a kernel fail rather than pass on the torch composition.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from typing import Callable, Optional

import torch

_CHOICES: dict[tuple, dict] = {}
_FAILED: dict[tuple, dict[str, str]] = {}  # (op, *key) -> {path: "ErrorClass: message"}
_WARNED: set[tuple] = set()  # (op, path, error class) already warned about
_LOCK = threading.Lock()
_REPS = 3
# 'nf4_fused' (4-bit weight decoded inside the GEMM) exists for 4-bit weights and small M only;
# a forced path that an op does not have falls back to the measured choice.
_PATHS = ("auto", "triton", "torch", "nf4_fused")
_MSG_CHARS = 400  # of an error's text kept in the record (a CompilationError quotes source)


class PathFallbackWarning(RuntimeWarning):
    """A path of an op could not compile or launch on this GPU; another path ran instead."""


def _launch_error_types() -> tuple[type, ...]:
    """Triton's compile / launch error classes present in the installed version (>= 3.0)."""
    found = []
    for mod, names in (("triton.runtime.errors", ("OutOfResources", "PTXASError", "AutotunerError")),
                       ("triton.compiler.errors", ("CompilationError",))):
        try:
            m = __import__(mod, fromlist=list(names))
        except Exception:  # no triton: nothing of it can fail
            continue
        found += [getattr(m, n) for n in names if isinstance(getattr(m, n, None), type)]
    return tuple(found)


_LAUNCH_ERRORS = _launch_error_types()
# RuntimeError texts of compile / launch failures that carry no class of their own: ptxas in
# triton < 3.2, MLIR pass failures, and the CUDA driver refusing a launch's resources
_RUNTIME_MARKERS = ("Internal Triton PTX codegen error", "`ptxas` failed", "to confirm that this is a bug in `ptxas`",
                    "PassManager::run failed", "too many resources requested for launch")


def is_launch_failure(e: BaseException) -> bool:
    """True for errors that mean "this kernel cannot compile or launch here" (see module doc)."""
    if _LAUNCH_ERRORS and isinstance(e, _LAUNCH_ERRORS):
        return True
    return type(e) is RuntimeError and any(m in str(e) for m in _RUNTIME_MARKERS)


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if len(text) > _MSG_CHARS:
        text = text[:_MSG_CHARS] + "..."
    return f"{type(e).__name__}: {text}"


def _strict() -> bool:
    return os.environ.get("PEFT_FAST_PATH_STRICT", "0").lower() not in ("", "0", "false", "no")


def path_choices() -> list[dict]:
    """Every recorded choice: op, key, chosen path, median ms per candidate, reason, and the
    paths that failed to compile or launch for that key (`failed`: path -> error)."""
    with _LOCK:
        return [{**v, "ms": dict(v["ms"]), "failed": dict(v["failed"])} for v in _CHOICES.values()]


def clear_path_choices() -> None:
    """Forget every choice, every remembered launch failure and which warnings were given."""
    with _LOCK:
        _CHOICES.clear()
        _FAILED.clear()
        _WARNED.clear()


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


def _unmeasurable(device: torch.device) -> Optional[str]:
    """Why candidates cannot be timed on `device` (None: they can)."""
    if device.type != "cuda":
        return f"not measured on {device.type}"
    if torch.cuda.is_current_stream_capturing():
        return "not measured during stream capture"
    return None


def _library_dirs() -> tuple[str, ...]:
    """Directories whose frames are library code, not the caller's: peft_fast (and its
    triton_kernels, installed from their own folder in a development checkout), torch, triton."""
    dirs = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__))]
    for name in ("peft_fast.triton_kernels", "triton"):
        mod = sys.modules.get(name)
        if getattr(mod, "__file__", None):
            dirs.append(os.path.dirname(os.path.abspath(mod.__file__)))
    return tuple(d + os.sep for d in dirs)


def _caller_stacklevel() -> int:
    """The `stacklevel` for a warnings.warn in the function that calls this one that names the
    first frame outside peft_fast, torch and triton: the user's code (or the framework's, e.g.
    a Trainer, that called the model). 2 (the op that chose the path) when there is none."""
    lib = _library_dirs()
    frame, level = sys._getframe(1), 1
    while frame is not None:
        if not os.path.abspath(frame.f_code.co_filename).startswith(lib):
            return level
        frame, level = frame.f_back, level + 1
    return 2


def _note_failure(op: str, key: tuple, path: str, e: BaseException, when: str, then: Optional[str]) -> str:
    """Remember that `path` cannot run for (op, key); warn once per (op, path, error class)."""
    desc = _describe(e)
    with _LOCK:
        _FAILED.setdefault((op, *key), {})[path] = desc
        first = (op, path, type(e).__name__) not in _WARNED
        _WARNED.add((op, path, type(e).__name__))
    if first:
        warnings.warn(
            f"peft_fast: the {path!r} path of {op} failed {when} for shape key {key} ({desc}); "
            + (f"running {then!r} instead. " if then else "the other paths are measured without it. ")
            + f"Further {op} keys failing on {path!r} with {type(e).__name__} are recorded in "
            "peft_fast.ops.path_choices() without a warning. Set PEFT_FAST_PATH_STRICT=1 to raise instead.",
            PathFallbackWarning, stacklevel=_caller_stacklevel())
    return desc


def _record(op: str, key: tuple, path: str, times: dict, reason: str, forced: bool = False) -> None:
    with _LOCK:
        _CHOICES[(op, *key)] = {"op": op, "key": key, "path": path, "ms": times, "reason": reason,
                                "failed": dict(_FAILED.get((op, *key), {})), "forced": forced}


def _run(op: str, key: tuple, order: list[str], fns: dict[str, Callable[[], object]], times: dict, reason: str,
         forced: bool):
    """Run the first path of `order` that launches; a path that fails to compile or launch hands
    over to the next one (the last one's error propagates), and the record then names the path
    that ran."""
    strict = _strict()
    for i, name in enumerate(order):
        try:
            out = fns[name]()
        except Exception as e:
            if strict or not is_launch_failure(e) or i == len(order) - 1:
                raise
            _note_failure(op, key, name, e, "at run time", order[i + 1])
            continue
        if i > 0:
            _record(op, key, name, times, f"{reason}; {', '.join(order[:i])} failed at run time, ran {name}", forced)
        return out
    raise AssertionError("empty path order")  # callers always pass at least one path


def choose(op: str, key: tuple, candidates: dict[str, Callable[[], object]], device: torch.device,
           fallbacks: Optional[dict[str, Callable[[], object]]] = None):
    """Run the chosen candidate for (op, key) and return its result (choosing first if needed).

    `candidates` are measured against each other (when nothing can be measured: "triton" first,
    then insertion order); `fallbacks` (name -> fn, in order) are never measured and run only
    when the candidates before them failed to compile or launch.
    """
    fallbacks = {n: f for n, f in (fallbacks or {}).items() if n not in candidates}
    fns = {**candidates, **fallbacks}
    forced = os.environ.get("PEFT_FAST_GEMM", "auto").lower()
    if forced not in _PATHS:
        raise ValueError(f"PEFT_FAST_GEMM={forced!r} is not one of {_PATHS}")
    full_key = (op, *key)
    with _LOCK:
        failed = dict(_FAILED.get(full_key, {}))
        hit = _CHOICES.get(full_key)

    def order_from(first: list[str], ms: dict) -> list[str]:
        """`first`, then the other candidates (fastest first), then the fallbacks; known failures
        left out unless nothing else is left (then the first one runs again and raises)."""
        rest = sorted(candidates, key=lambda n: ms.get(n, float("inf"))) + list(fallbacks)
        order = [n for n in dict.fromkeys(first + rest) if n not in failed]
        return order or first[:1] or rest[:1]

    if forced != "auto" and forced in candidates:
        reason = f"forced {forced}" + (f" (failed earlier: {failed[forced]})" if forced in failed else "")
        return _run(op, key, order_from([forced], {}), fns, {}, reason, True)
    if hit is not None and not hit["forced"]:  # a record left by a forced run is not a choice
        return _run(op, key, order_from([hit["path"]], hit["ms"]), fns, hit["ms"], hit["reason"], False)
    measured = [n for n in candidates if n not in failed]
    times: dict[str, float] = {}
    errors: list[BaseException] = []
    if len(measured) <= 1:
        reason = "only candidate"
    elif _unmeasurable(device) is not None:
        reason = _unmeasurable(device)
        measured.sort(key=lambda n: n != "triton")  # stable: triton, then insertion order
    else:
        for name in measured:
            try:
                times[name] = _time_ms(candidates[name])
            except Exception as e:
                if _strict() or not is_launch_failure(e):
                    raise
                errors.append(e)
                _note_failure(op, key, name, e, "while being measured", None)
        measured = sorted(times, key=times.get)
        reason = "measured"
        if not measured and not fallbacks:  # nothing launches for this key
            raise errors[0]
    with _LOCK:
        failed = dict(_FAILED.get(full_key, {}))
    if failed:
        reason += "; failed: " + ", ".join(sorted(failed))
    order = order_from(measured, times)
    _record(op, key, order[0], times, reason)
    return _run(op, key, order, fns, times, reason, False)


def bucket(m: int) -> int:
    """Token counts are bucketed to powers of two so varying batch sizes share a choice."""
    return 1 << max(int(m) - 1, 0).bit_length()
