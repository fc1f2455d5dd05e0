"""Mixed-adapter batches: per-token adapter metadata and row gathers/scatters.

In a mixed batch every token (row) picks its own adapter: `adapter_idx [T]`, with -1 meaning
"__base__" (no adapter). A layer groups the tokens per adapter once (`segment_metadata`),
gathers each group's rows (`gather_rows`), runs each adapter on its contiguous group, and adds
the results back (`scatter_add_rows`).

Backends: the C++/CUDA extension `peft_fast._C` (ops `torch.ops.peft_fast_C.*`, built by
setup.py when possible) for tensors on a device it has kernels for; otherwise the pure-torch
`*_ref` functions below, which take the same arguments and give the same results (and the
same error messages). `PEFT_FAST_DISABLE_CPP=1` forces the references (read at each call,
for A/B tests). The C++ ops' fake implementation for torch.compile is registered here.

    order, counts, starts, active = segment_metadata(adapter_idx, n_adapters)
    xs = gather_rows(x, order)                   # [T, K], grouped: adapter a is rows
                                                 # starts[a] : starts[a] + counts[a]
    y = scatter_add_rows(y, ys, order)           # y[order[i]] += ys[i]
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

Tensor = torch.Tensor

__all__ = [
    "HAS_CPP", "HAS_CPP_CUDA", "cpp_enabled", "segment_metadata", "segment_metadata_ref", "gather_rows",
    "gather_rows_ref", "scatter_add_rows", "scatter_add_rows_ref",
]

DISABLE_ENV = "PEFT_FAST_DISABLE_CPP"
_FAILED_MARKER = "_C_BUILD_FAILED"  # left in the package by setup.py when the compile failed
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_compiling = torch.compiler.is_compiling


def _load_extension() -> bool:
    name = f"{__package__}._C"
    try:
        importlib.import_module(name)  # registers torch.ops.peft_fast_C.*
    except ModuleNotFoundError as exc:  # not built: PEFT_FAST_SKIP_CPP=1, no torch at build time, failed compile
        if exc.name != name:
            return _load_failed(exc)
        if os.path.exists(os.path.join(os.path.dirname(__file__), _FAILED_MARKER)):
            warnings.warn("the C++ extension peft_fast._C failed to compile when peft_fast was installed, so "
                          "mixed-adapter batches use the slower pure-torch fallback. Reinstall with `pip install -v "
                          "--no-build-isolation .` to see the error (PEFT_FAST_SKIP_CPP=1 skips the build and "
                          "this warning).", RuntimeWarning, stacklevel=2)
        return False
    except Exception as exc:  # built, but does not load (e.g. torch was upgraded since)
        return _load_failed(exc)
    return hasattr(torch.ops.peft_fast_C, "segment_metadata")


def _load_failed(exc: BaseException) -> bool:
    warnings.warn(f"peft_fast._C failed to load ({exc}); using the pure-torch fallback. Reinstall peft_fast "
                  "(`pip install --no-build-isolation .`) to rebuild it for this torch.", RuntimeWarning, stacklevel=3)
    return False


HAS_CPP: bool = _load_extension()
HAS_CPP_CUDA: bool = HAS_CPP and torch._C._dispatch_has_kernel_for_dispatch_key("peft_fast_C::gather_rows", "CUDA")
_CPP_DEVICES = ("cpu", "cuda") if HAS_CPP_CUDA else ("cpu",)
_OPS = torch.ops.peft_fast_C  # its ops exist once peft_fast._C is loaded (HAS_CPP)


def cpp_enabled() -> bool:
    """True when the calls below may use the C++ ops (built, loaded, not disabled)."""
    flag = os.environ.get(DISABLE_ENV)
    return HAS_CPP and (not flag or flag.strip() in ("", "0"))


def _use_cpp(*tensors: Tensor) -> bool:
    """C++ ops for these tensors? Mixed devices go to the reference, which names the mismatch."""
    if not cpp_enabled():
        return False
    device = tensors[0].device
    if device.type not in _CPP_DEVICES:
        return False
    for t in tensors[1:]:  # a plain loop: this runs on every eager call
        if t.device != device:
            return False
    return True


# ------------------------------------------------------------------------------ checks
# The same checks, in the same order and with the same messages, as csrc/segments.cpp.
def _check_segment_args(adapter_idx: Tensor, n_adapters: int) -> None:
    if adapter_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"segment_metadata: adapter_idx must be int32 or int64, got {adapter_idx.dtype}")
    if adapter_idx.dim() != 1:
        raise ValueError(f"segment_metadata: adapter_idx must be 1-D [T], got shape {list(adapter_idx.shape)}")
    if n_adapters < 0:
        raise ValueError(f"segment_metadata: n_adapters must be >= 0, got {n_adapters}")


def _check_adapter_range(adapter_idx: Tensor, n_adapters: int) -> None:
    if adapter_idx.numel() == 0 or _compiling():
        return
    bad = (adapter_idx < -1) | (adapter_idx >= n_adapters)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(f"segment_metadata: adapter index {int(adapter_idx[pos])} at position {pos} is out of "
                         f"range [-1, {n_adapters}) for n_adapters={n_adapters} (-1 means no adapter)")


def _check_row_index(op: str, index: Tensor, data_name: str, data: Tensor) -> None:
    if index.dtype != torch.int64:
        raise TypeError(f"{op}: index must be int64, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{op}: index must be 1-D, got shape {list(index.shape)}")
    if index.device != data.device:
        raise ValueError(f"{op}: index is on {index.device} but {data_name} is on {data.device}")


def _check_rows_in_range(op: str, index: Tensor, data_name: str, n_rows: int) -> None:
    # CPU only, as in C++: on CUDA an out-of-range row trips a device-side assert instead of
    # costing a host sync per call.
    if index.device.type != "cpu" or index.numel() == 0 or _compiling():
        return
    bad = (index < 0) | (index >= n_rows)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise IndexError(f"{op}: index {int(index[pos])} at position {pos} is out of range for {data_name} "
                         f"with {n_rows} rows")


def _check_gather_args(x: Tensor, index: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"gather_rows: x must be 2-D [T, K], got shape {list(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"gather_rows: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    _check_row_index("gather_rows", index, "x", x)


def _check_scatter_args(out: Tensor, src: Tensor, index: Tensor) -> None:
    if out.dim() != 2:
        raise ValueError(f"scatter_add_rows: out must be 2-D [T, N], got shape {list(out.shape)}")
    if src.dim() != 2:
        raise ValueError(f"scatter_add_rows: src must be 2-D [T', N], got shape {list(src.shape)}")
    if out.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"scatter_add_rows: out must be float16, bfloat16, float32 or float64, got {out.dtype}")
    if src.dtype != out.dtype:
        raise TypeError(f"scatter_add_rows: src dtype {src.dtype} does not match out dtype {out.dtype}")
    if src.device != out.device:
        raise ValueError(f"scatter_add_rows: src is on {src.device} but out is on {out.device}")
    _check_row_index("scatter_add_rows", index, "out", out)
    if src.shape[1] != out.shape[1]:
        raise ValueError(f"scatter_add_rows: src has {src.shape[1]} columns but out has {out.shape[1]}")
    if index.shape[0] != src.shape[0]:
        raise ValueError(f"scatter_add_rows: index has {index.shape[0]} entries but src has {src.shape[0]} rows")


# ------------------------------------------------------------------------------ references
def segment_metadata_ref(adapter_idx: Tensor, n_adapters: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Group tokens by adapter.

    adapter_idx: int32/int64 [T], values in [-1, n_adapters) (-1 = no adapter).
    Returns int64 tensors on adapter_idx's device:
      order  [T]          token positions stably sorted by adapter (the -1 tokens first)
      counts [n_adapters] tokens per adapter
      starts [n_adapters] offset in `order` where each adapter's group begins
      active [n_active]   adapters with count > 0, ascending
    """
    _check_segment_args(adapter_idx, n_adapters)
    _check_adapter_range(adapter_idx, n_adapters)
    bins = adapter_idx.to(torch.int64) + 1  # bin 0: the base model
    counts_full = bins.new_zeros(n_adapters + 1).index_add_(0, bins, torch.ones_like(bins))
    order = torch.argsort(adapter_idx, dim=0, stable=True)
    counts = counts_full[1:]
    starts = (counts_full.cumsum(0) - counts_full)[1:]
    active = counts.nonzero().flatten()
    return order, counts, starts, active


def gather_rows_ref(x: Tensor, index: Tensor) -> Tensor:
    """x [T, K] (fp16/bf16/fp32/fp64, any strides), index int64 [T'] -> x[index], [T', K] contiguous."""
    _check_gather_args(x, index)
    _check_rows_in_range("gather_rows", index, "x", x.shape[0])
    return x.index_select(0, index)


def scatter_add_rows_ref(out: Tensor, src: Tensor, index: Tensor) -> Tensor:
    """A contiguous copy of out [T, N] with out[index[i]] += src[i] (src [T', N], index int64
    [T']); duplicate indices accumulate.

    Each output row is out[j] plus its src rows in index order, summed in fp32 for fp16/bf16
    (in the dtype otherwise) and rounded once: explicit here because torch's own index_add_
    rounds after every addition or not depending on the path it takes.
    """
    _check_scatter_args(out, src, index)
    _check_rows_in_range("scatter_add_rows", index, "out", out.shape[0])
    acc_dtype = torch.float32 if out.dtype in (torch.float16, torch.bfloat16) else out.dtype
    acc = out.to(acc_dtype, memory_format=torch.contiguous_format, copy=True)
    acc.index_add_(0, index, src.to(acc_dtype))
    return acc if acc_dtype == out.dtype else acc.to(out.dtype)


# ------------------------------------------------------------------------------ dispatch
def segment_metadata(adapter_idx: Tensor, n_adapters: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(order, counts, starts, active) for adapter_idx [T]; see `segment_metadata_ref`."""
    if _use_cpp(adapter_idx):
        return _OPS.segment_metadata(adapter_idx, n_adapters)
    return segment_metadata_ref(adapter_idx, n_adapters)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x[index] as a contiguous [T', K] tensor; see `gather_rows_ref`."""
    if _use_cpp(x, index):
        return _OPS.gather_rows(x, index)
    return gather_rows_ref(x, index)


def scatter_add_rows(out: Tensor, src: Tensor, index: Tensor) -> Tensor:
    """A copy of out with out[index[i]] += src[i]; see `scatter_add_rows_ref`."""
    if _use_cpp(out, src, index):
        return _OPS.scatter_add_rows(out, src, index)
    return scatter_add_rows_ref(out, src, index)


# ------------------------------------------------------------------------------ fake
def _segment_metadata_fake(adapter_idx: Tensor, n_adapters: int):
    _check_segment_args(adapter_idx, n_adapters)
    n_active = torch.library.get_ctx().new_dynamic_size(min=0, max=n_adapters) if n_adapters > 0 else 0
    i64 = torch.int64
    return (adapter_idx.new_empty((adapter_idx.shape[0],), dtype=i64), adapter_idx.new_empty((n_adapters,), dtype=i64),
            adapter_idx.new_empty((n_adapters,), dtype=i64), adapter_idx.new_empty((n_active,), dtype=i64))


if HAS_CPP:
    # Autograd and the Meta kernels of gather/scatter are in C++; this is the one fake that
    # needs Python (a data-dependent output length). Module import runs once; a second
    # registration would raise.
    torch.library.register_fake("peft_fast_C::segment_metadata", _segment_metadata_fake)
