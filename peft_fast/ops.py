"""Layer L1: the fused ops as torch.library custom ops, and the one place that picks a backend.

CUDA tensors go to the Triton kernels (ops_triton.py), CPU tensors to the pure-torch
references; `TRITON_INTERPRET=1` sends CPU tensors through Triton (tests), and
`PEFT_FAST_BACKEND=torch|triton` forces one path everywhere (debugging, A/B).
Layers above never import Triton: they call these functions.

Each op is registered as `torch.ops.peft_fast.<name>` with a fake (meta) implementation, so
`torch.compile(model, fullgraph=True)` sees one opaque node per op and no graph break.
Custom ops cannot return None: absent outputs are empty tensors here, and the functions
below turn them back into None. A dropout "mask" is a uint8 [M, K] keep mask on the torch
path and an int64 [1] Philox seed on the Triton path (the kernels regenerate the mask).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ._path import clear_path_choices, path_choices  # noqa: F401  (public: which GEMM path ran)
from .triton_kernels import dora as _dora
from .triton_kernels import ia3 as _ia3
from .triton_kernels import lora as _lora
from .triton_kernels import nf4 as _nf4
from .triton_kernels._triton import HAS_TRITON, interpreting

Tensor = torch.Tensor
_VALID = ("auto", "torch", "triton")


def backend_for(t: torch.Tensor) -> str:
    """'torch' or 'triton' for the tensors of one call."""
    forced = os.environ.get("PEFT_FAST_BACKEND", "auto").lower()
    if forced not in _VALID:
        raise ValueError(f"PEFT_FAST_BACKEND={forced!r} is not one of {_VALID}")
    if forced == "triton" and not HAS_TRITON:
        raise RuntimeError("PEFT_FAST_BACKEND=triton but triton is not installed")
    if forced == "triton" and t.device.type == "cpu" and not interpreting():
        raise RuntimeError("PEFT_FAST_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 (or a GPU)")
    if forced != "auto":
        return forced
    if HAS_TRITON and (t.is_cuda or (t.device.type == "cpu" and interpreting())):
        return "triton"
    return "torch"


def autocast_dtype(t: Tensor) -> Optional[torch.dtype]:
    """The dtype `torch.autocast` runs a linear layer in on t's device (torch.bfloat16 or
    torch.float16), or None when autocast is off there (or the device has no autocast).

    The fused ops follow autocast as `nn.Linear` does: floating inputs (not float64) are cast to
    this dtype and the op runs with autocast disabled, like `torch.amp.custom_fwd(cast_inputs=)`.
    """
    dev = t.device.type
    try:
        if not torch.is_autocast_enabled(dev):
            return None
        return torch.get_autocast_dtype(dev)
    except (TypeError, RuntimeError, AttributeError):  # torch < 2.4, or a device without autocast
        if dev == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if dev == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        return None


def no_autocast(device_type: str):
    """Context manager: autocast off on `device_type` (the fused ops' bodies, forward and
    backward, run in the dtype they were given; see autocast_dtype)."""
    return torch.autocast(device_type, enabled=False)


def cast_for_autocast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """t cast as autocast casts a linear's argument: floating tensors other than float64 go to
    `dtype`; None, integer tensors, float64 and a `dtype` of None pass through."""
    if t is None or dtype is None or t.dtype == dtype or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _impl(t: Tensor):
    if backend_for(t) == "triton":
        from . import ops_triton

        return ops_triton
    return _REF


class _Ref:
    """The torch references under the names ops_triton uses."""
    lora_fwd = staticmethod(_lora.lora_fwd_ref)
    lora_bwd = staticmethod(_lora.lora_bwd_ref)
    dora_weight_norm = staticmethod(_dora.dora_weight_norm_ref)
    dora_fwd = staticmethod(_dora.dora_fwd_ref)
    dora_bwd = staticmethod(_dora.dora_bwd_ref)
    ia3_fwd = staticmethod(_ia3.ia3_fwd_ref)
    ia3_bwd = staticmethod(_ia3.ia3_bwd_ref)


_REF = _Ref()


def _none(t: Tensor) -> Tensor:
    return t.new_empty((0,))


def _opt(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else _none(like)


def _back(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 and t.dim() == 1 else t


def _rng_like(x: Tensor, p: float) -> Tensor:
    """Metadata of one adapter's dropout state (fake implementations)."""
    if p <= 0.0:
        return _none(x)
    if backend_for(x) == "triton":
        return x.new_empty((1,), dtype=torch.int64)
    return x.new_empty(x.shape, dtype=torch.uint8)


def _n_out(weight: Tensor, fan_in_fan_out: bool) -> int:
    return weight.shape[1] if fan_in_fan_out else weight.shape[0]


_lib_op = getattr(torch.library, "custom_op", None)
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or torch._dynamo.is_compiling


def _register(name, fake):
    """Decorator: register `fn` as torch.ops.peft_fast.<name> with `fake`.

    The registered op is what torch.compile traces; eager calls (the public functions below)
    skip it and its None <-> empty-tensor conversions: the dispatcher costs ~85 us a call,
    more than a decode-sized layer takes on a GPU.
    """
    def deco(fn):
        if _lib_op is None:  # torch < 2.4: no custom ops, the functions run eagerly
            return fn
        op = _lib_op(f"peft_fast::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        return op
    return deco


def is_compiling() -> bool:
    """True while torch.compile traces (layers skip caches keyed on data pointers)."""
    return _compiling()


def _eager() -> bool:
    return _lib_op is None or not _compiling()


# ---------------------------------------------------------------- LoRA
def _lora_fwd_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out):
    y = x.new_empty((x.shape[0], _n_out(weight, fan_in_fan_out)))
    return y, [x.new_empty((x.shape[0], A.shape[0]), dtype=A.dtype) for A in lora_A], \
        [_rng_like(x, p) for p in dropout_p]


@_register("lora_fwd", _lora_fwd_fake)
def _lora_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: list[Tensor], lora_B: list[Tensor],
                 scaling: list[float], dropout_p: list[float], fan_in_fan_out: bool
                 ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    y, xas, rng = _impl(x).lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out)
    return y, xas, [_opt(m, x) for m in rng]


def _lora_bwd_fake(dy, x, weight, lora_A, lora_B, scaling, dropout_p, xas, rng, fan_in_fan_out, need_dx):
    dx = x.new_empty(x.shape) if need_dx else _none(x)
    return dx, [torch.empty_like(A) for A in lora_A], [torch.empty_like(B) for B in lora_B]


@_register("lora_bwd", _lora_bwd_fake)
def _lora_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, lora_A: list[Tensor], lora_B: list[Tensor],
                 scaling: list[float], dropout_p: list[float], xas: list[Tensor], rng: list[Tensor],
                 fan_in_fan_out: bool, need_dx: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    masks = [m if p > 0.0 else None for m, p in zip(rng, dropout_p)]
    dx, dAs, dBs = _impl(dy).lora_bwd(dy, x, weight, lora_A, lora_B, scaling, dropout_p, xas, masks,
                                      fan_in_fan_out, need_dx)
    return _opt(dx, x), [g.contiguous() for g in dAs], [g.contiguous() for g in dBs]


def lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out=False):
    """-> (y [M, N], xa_i [M, r_i], dropout state per adapter (None where p == 0))."""
    if _eager():
        return _impl(x).lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out)
    y, xas, rng = _lora_fwd_op(x, weight, bias, list(lora_A), list(lora_B), [float(s) for s in scaling],
                               [float(p) for p in dropout_p], bool(fan_in_fan_out))
    return y, list(xas), [m if p > 0.0 else None for m, p in zip(rng, dropout_p)]


def lora_bwd(dy, x, weight, lora_A, lora_B, scaling, dropout_p, xas, masks, fan_in_fan_out=False, need_dx=True):
    if _eager():
        return _impl(dy).lora_bwd(dy, x, weight, lora_A, lora_B, scaling, dropout_p, xas, masks, fan_in_fan_out,
                                  need_dx)
    rng = [m if m is not None else _none(x) for m in masks]
    dx, dAs, dBs = _lora_bwd_op(dy, x, weight, list(lora_A), list(lora_B), [float(s) for s in scaling],
                                [float(p) for p in dropout_p], list(xas), rng, bool(fan_in_fan_out), bool(need_dx))
    return (dx if need_dx else None), list(dAs), list(dBs)


# ---------------------------------------------------------------- DoRA
def _dora_norm_fake(weight, lora_A, lora_B, scaling, fan_in_fan_out, weight_sqnorm):
    return weight.new_empty((_n_out(weight, fan_in_fan_out),), dtype=torch.float32)


@_register("dora_weight_norm", _dora_norm_fake)
def _dora_norm_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, fan_in_fan_out: bool,
                  weight_sqnorm: Optional[Tensor]) -> Tensor:
    return _impl(weight).dora_weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out, weight_sqnorm)


def dora_weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out=False, weight_sqnorm=None):
    """||W + s B A|| per output row, fp32 [N], detached; computed in fp32 even under autocast."""
    if autocast_dtype(weight) is not None:
        with no_autocast(weight.device.type):
            return dora_weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out, weight_sqnorm)
    if _eager():
        return _impl(weight).dora_weight_norm(weight, lora_A.detach(), lora_B.detach(), scaling, fan_in_fan_out,
                                              weight_sqnorm)
    return _dora_norm_op(weight, lora_A.detach(), lora_B.detach(), float(scaling), bool(fan_in_fan_out), weight_sqnorm)


def _dora_fwd_fake(x, weight, bias, lora_A, lora_B, scaling, magnitude, weight_norm, fan_in_fan_out, keep_pre):
    y = x.new_empty((x.shape[0], _n_out(weight, fan_in_fan_out)))
    return y, x.new_empty((x.shape[0], lora_A.shape[0]), dtype=lora_A.dtype), \
        (torch.empty_like(y) if keep_pre else _none(x))


@_register("dora_fwd", _dora_fwd_fake)
def _dora_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                 magnitude: Tensor, weight_norm: Tensor, fan_in_fan_out: bool, keep_pre: bool
                 ) -> tuple[Tensor, Tensor, Tensor]:
    y, xa, pre = _impl(x).dora_fwd(x, weight, bias, lora_A, lora_B, scaling, magnitude, weight_norm, fan_in_fan_out,
                                   keep_pre)
    return y, xa, _opt(pre, x)


def dora_fwd(x, weight, bias, lora_A, lora_B, scaling, magnitude, weight_norm, fan_in_fan_out=False, keep_pre=True):
    if _eager():
        return _impl(x).dora_fwd(x, weight, bias, lora_A, lora_B, scaling, magnitude, weight_norm, fan_in_fan_out,
                                 keep_pre)
    y, xa, pre = _dora_fwd_op(x, weight, bias, lora_A, lora_B, float(scaling), magnitude, weight_norm,
                              bool(fan_in_fan_out), bool(keep_pre))
    return y, xa, (pre if keep_pre else None)


def _dora_bwd_fake(dy, x, weight, lora_A, lora_B, scaling, magnitude, weight_norm, xa, ypre, fan_in_fan_out, need_dx):
    return (x.new_empty(x.shape) if need_dx else _none(x)), torch.empty_like(lora_A), torch.empty_like(lora_B), \
        torch.empty_like(magnitude)


@_register("dora_bwd", _dora_bwd_fake)
def _dora_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 magnitude: Tensor, weight_norm: Tensor, xa: Tensor, ypre: Tensor, fan_in_fan_out: bool,
                 need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dA, dB, dm = _impl(dy).dora_bwd(dy, x, weight, lora_A, lora_B, scaling, magnitude, weight_norm, xa, ypre,
                                        fan_in_fan_out, need_dx)
    return _opt(dx, x), dA.contiguous(), dB.contiguous(), dm.contiguous()


def dora_bwd(dy, x, weight, lora_A, lora_B, scaling, magnitude, weight_norm, xa, ypre, fan_in_fan_out=False,
             need_dx=True):
    if _eager():
        return _impl(dy).dora_bwd(dy, x, weight, lora_A, lora_B, scaling, magnitude, weight_norm, xa, ypre,
                                  fan_in_fan_out, need_dx)
    dx, dA, dB, dm = _dora_bwd_op(dy, x, weight, lora_A, lora_B, float(scaling), magnitude, weight_norm, xa, ypre,
                                  bool(fan_in_fan_out), bool(need_dx))
    return (dx if need_dx else None), dA, dB, dm


# ---------------------------------------------------------------- IA3
def _ia3_fwd_fake(x, weight, bias, ia3_l, is_feedforward, fan_in_fan_out, keep_base):
    y = x.new_empty((x.shape[0], _n_out(weight, fan_in_fan_out)))
    return y, (torch.empty_like(y) if keep_base and not is_feedforward else _none(x))


@_register("ia3_fwd", _ia3_fwd_fake)
def _ia3_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], ia3_l: Tensor, is_feedforward: bool,
                fan_in_fan_out: bool, keep_base: bool) -> tuple[Tensor, Tensor]:
    y, base = _impl(x).ia3_fwd(x, weight, bias, ia3_l, is_feedforward, fan_in_fan_out, keep_base)
    return y, _opt(base, x)


def ia3_fwd(x, weight, bias, ia3_l, is_feedforward, fan_in_fan_out=False, keep_base=True):
    if _eager():
        return _impl(x).ia3_fwd(x, weight, bias, ia3_l, is_feedforward, fan_in_fan_out, keep_base)
    y, base = _ia3_fwd_op(x, weight, bias, ia3_l, bool(is_feedforward), bool(fan_in_fan_out), bool(keep_base))
    return y, (base if keep_base and not is_feedforward else None)


def _ia3_bwd_fake(dy, x, weight, ia3_l, is_feedforward, base, fan_in_fan_out, need_dx):
    # dl: fp32 from the Triton reduction and from the reference on fp16 (colsum_mul), else dy's dtype
    fp32 = backend_for(dy) != "torch" or dy.dtype == torch.float16
    return (x.new_empty(x.shape) if need_dx else _none(x)), \
        ia3_l.new_empty(ia3_l.shape, dtype=torch.float32 if fp32 else dy.dtype)


@_register("ia3_bwd", _ia3_bwd_fake)
def _ia3_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, ia3_l: Tensor, is_feedforward: bool, base: Optional[Tensor],
                fan_in_fan_out: bool, need_dx: bool) -> tuple[Tensor, Tensor]:
    dx, dl = _impl(dy).ia3_bwd(dy, x, weight, ia3_l, is_feedforward, base, fan_in_fan_out, need_dx)
    return _opt(dx, x), dl.contiguous()


def ia3_bwd(dy, x, weight, ia3_l, is_feedforward, base, fan_in_fan_out=False, need_dx=True):
    if _eager():
        return _impl(dy).ia3_bwd(dy, x, weight, ia3_l, is_feedforward, base, fan_in_fan_out, need_dx)
    dx, dl = _ia3_bwd_op(dy, x, weight, ia3_l, bool(is_feedforward), base, bool(fan_in_fan_out), bool(need_dx))
    return (dx if need_dx else None), dl


# ---------------------------------------------------------------- QLoRA (4-bit NF4 base weight)
# Eager only (the NF4 operand is not a tensor): the torch path dequantizes with the reference,
# the Triton path decodes inside the GEMM or into a reused buffer (ops_triton._linear).
def _nf4_weight(w, impl):
    return w if impl is not _REF else _nf4.nf4_dequantize_ref(w)


def qlora_fwd(x, nf4, bias, lora_A, lora_B, scaling, dropout_p):
    """LoRA forward on W = dequant(nf4) [N, K]; the dequantized W is never kept."""
    impl = _impl(x)
    return impl.lora_fwd(x, _nf4_weight(nf4, impl), bias, lora_A, lora_B, scaling, dropout_p, False)


def qlora_bwd(dy, x, nf4, lora_A, lora_B, scaling, dropout_p, xas, masks, need_dx=True):
    """LoRA backward with W dequantized again (not saved from the forward)."""
    impl = _impl(dy)
    return impl.lora_bwd(dy, x, _nf4_weight(nf4, impl), lora_A, lora_B, scaling, dropout_p, xas, masks, False,
                         need_dx)


# ---------------------------------------------------------------- mixed-adapter batches
_SEGMENT_CACHE: dict = {}


def _segments_of(token_idx: Tensor, n: int):
    """(order, starts, counts) of a token-index tensor. The layers of one forward pass share the
    same index tensor (layer._token_adapter_index caches it), so the metadata is computed once
    per forward rather than once per layer."""
    from . import _segments

    key = (id(token_idx), token_idx._version, token_idx.data_ptr(), n)
    hit = _SEGMENT_CACHE.get(key)
    if hit is None or hit[0] is not token_idx:
        order, counts, starts, _ = _segments.segment_metadata(token_idx, n)
        if len(_SEGMENT_CACHE) > 16:
            _SEGMENT_CACHE.clear()
        hit = _SEGMENT_CACHE[key] = (token_idx, (order, starts, counts))
    return hit[1]


def lora_mixed(x, lora_A, lora_B, scales, token_idx, out):
    """out [T, N] += s[i] (x A[i]^T) B[i]^T with i = token_idx[t] (-1: nothing), adapters stacked
    [n, R, K] / [n, N, R] with zero-padded ranks. The torch path groups tokens by adapter with
    the C++ extension's metadata and row gather (torch fallback without it); the Triton path
    launches the segmented shrink/expand pair, or the per-token kernel for decode-sized batches.
    Under autocast the adapter terms are computed in the stacks' dtype (not cast down) and added
    into `out` in out's dtype."""
    if autocast_dtype(x) is not None:  # the adapters' math in their own dtype, added into `out` (cast)
        with no_autocast(x.device.type):
            return lora_mixed(x, lora_A, lora_B, scales, token_idx, out)
    from . import _segments
    from .triton_kernels import multi_lora as _ml

    triton_path = backend_for(x) == "triton"
    if triton_path and x.shape[0] <= _ml.DECODE_TOKENS:
        return _ml.lora_mixed(x, lora_A, lora_B, scales, token_idx, out)
    order, starts, counts = _segments_of(token_idx, lora_A.shape[0])
    if triton_path:
        return _ml.lora_mixed(x, lora_A, lora_B, scales, token_idx, out, order, starts, counts)
    return _ml.lora_mixed_ref(x, lora_A, lora_B, scales, token_idx, out, order, starts, counts,
                              gather=_segments.gather_rows)
