"""Shared pieces of the autograd Functions: base-weight and bias gradients, autocast handling."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .. import ops


def autocast_scope(x: torch.Tensor):
    """(compute dtype, context manager) for one fused call on x's device.

    Outside autocast: (None, a null context): the op runs in its inputs' dtypes. Under
    torch.autocast: (the autocast dtype, autocast disabled): the caller casts its floating inputs
    with `to_dtype` and the op body runs without autocast, as `torch.amp.custom_fwd(cast_inputs=)`
    does, so the result has the dtype `nn.Linear` would give under the same autocast.
    """
    cd = ops.autocast_dtype(x)
    return cd, (ops.no_autocast(x.device.type) if cd is not None else contextlib.nullcontext())


def to_dtype(dtype: Optional[torch.dtype], *tensors) -> list:
    """The tensors cast as autocast casts a linear's arguments (ops.cast_for_autocast); None
    entries stay None; a dtype of None returns them unchanged."""
    if dtype is None:
        return list(tensors)
    return [ops.cast_for_autocast(t, dtype) for t in tensors]


def cast_grads(dtypes, *grads) -> list:
    """Each gradient in the dtype of its input (autocast computes in 16 bits; fp32 parameters and
    inputs get fp32 gradients, as autograd gives through autocast's casts)."""
    return [g.to(dt) if g is not None and dt is not None and g.dtype != dt else g for g, dt in zip(grads, dtypes)]


def base_param_grads(ctx, dy: torch.Tensor, x: torch.Tensor, weight_idx: int, bias_idx: int,
                     fan_in_fan_out: bool, x_scale: Optional[torch.Tensor] = None):
    """dW = dy^T x (transposed for Conv1D's [K, N] storage), db = colsum(dy); None when
    the parameter is frozen (the usual case: only the adapter trains)."""
    dW = db = None
    if ctx.needs_input_grad[weight_idx]:
        xs = x if x_scale is None else x * x_scale
        dW = dy.t() @ xs
        if fan_in_fan_out:
            dW = dW.t()
    if ctx.needs_input_grad[bias_idx]:
        db = dy.sum(0)
    return dW, db


def fold_tensor_scaling(lora_B: torch.Tensor, scaling):
    """(B, s) for the fused ops, which take s as a Python float: a 0-dim tensor s (scalings after
    `utils.hotswap.prepare_model_for_compiled_hotswap`) becomes (B * s, 1.0).

    float(s) would read the value on the host, a graph break under torch.compile (and a graph
    specialised on the value); B * s stays in the graph, so a hot-swapped alpha (s.fill_) needs no
    recompile. Exact in autograd: the op sees B' = s B, and dB = s dB' flows through the product.
    Costs one [N, r] product per call, only for tensor scalings; floats pass through untouched.
    """
    if isinstance(scaling, torch.Tensor):
        return lora_B * scaling, 1.0
    return lora_B, scaling


def fold_tensor_scalings(lora_B, scaling):
    """fold_tensor_scaling over the adapters of one call: (list of B, list of float s)."""
    Bs, ss = [], []
    for B, s in zip(lora_B, scaling):
        B, s = fold_tensor_scaling(B, s)
        Bs.append(B)
        ss.append(s)
    return Bs, ss


def fold_any_tensor_scalings(lora_B, scaling):
    """(lora_B, scaling) unchanged on the usual all-float path; with any 0-dim tensor scaling,
    every B is scaled by its s and the scalings become 1.0 (fold_tensor_scalings)."""
    for s in scaling:  # a plain loop: any(<genexpr>) costs ~0.7 us per call on the float path
        if isinstance(s, torch.Tensor):
            return fold_tensor_scalings(lora_B, scaling)
    return lora_B, scaling


def needs_autograd(*items) -> bool:
    """Whether grad mode is on and any tensor (or tensor in a sequence) among `items` requires
    grad; otherwise the functions run the op directly (inference: no node, nothing kept)."""
    if not torch.is_grad_enabled():
        return False
    for it in items:
        if isinstance(it, torch.Tensor):
            if it.requires_grad:
                return True
        elif isinstance(it, (list, tuple)):
            if any(t.requires_grad for t in it):
                return True
    return False
