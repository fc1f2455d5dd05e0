"""The launches peft_fast's Triton kernels really get, recorded without a GPU.

`record_launches()` runs the op launchers (peft_fast.ops_triton and the kernel launchers) on
CPU tensors the way they run on a GPU, with the Triton autotuner's `run` replaced by a recorder:
nothing executes, but every kernel call's arguments (pointer dtypes and 16-byte alignment, the
integer sizes and strides with the specialisation Triton derives from them, the constexpr
meta-parameters the launcher picks) are kept as a `Launch`. Two switches make the launchers
behave as on a GPU: TRITON_INTERPRET must be unset (launchers pick interpreter-only configs and
fp32 dots otherwise) and `Tensor.is_cuda` reads True while recording (launchers size their
split-K grids for the device).

Shapes: `real` (a 7B-class layer: K = N = 4096 or an 11008-wide MLP, 512 or 4096 tokens, and
decode batches of 1..16 tokens), `odd` (non-multiples of 16, rank 1: other specialisations).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Launch:
    """One distinct kernel launch: the kernel object and the arguments it was called with
    (tensors replaced by 1-element stand-ins with the same dtype and alignment)."""
    kernel: str  # e.g. "_fused_linear_kernel"
    fn: Any  # the Autotuner (or JITFunction) the launcher called
    args: dict  # argument name -> value (stand-in tensors, ints, floats, None)
    kwargs: dict  # keyword arguments of the launch (constexpr meta-parameters)
    scenario: str  # which op produced it, e.g. "lora_fwd/fp16/nf4_fused"
    dtype: str  # "fp32" | "fp16" | "bf16": the activations' dtype of the scenario
    tf32: bool = False  # torch.backends.cuda.matmul.allow_tf32 while the launcher ran
    tags: set = field(default_factory=set)

    def key(self) -> tuple:
        """Identity for de-duplication: what Triton specialises a compiled kernel on."""
        return (self.kernel, self.tf32, tuple((k, _spec(v)) for k, v in self.args.items()),
                tuple(sorted((k, _spec(v)) for k, v in self.kwargs.items())))


def _spec(v: Any) -> Any:
    # Triton specialises tensors on dtype and 16-byte alignment, ints on == 1, % 16 == 0 and
    # 32/64-bit range; floats and bools are not specialised (beyond their type)
    if isinstance(v, torch.Tensor):
        return ("tensor", str(v.dtype), v.data_ptr() % 16 == 0)
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return ("int", v == 1, v % 16 == 0, -2**31 <= v < 2**31)
    if isinstance(v, float):
        return ("float",)
    return repr(v)


def _stand_in(v: Any) -> Any:
    if not isinstance(v, torch.Tensor):
        return v
    # Triton specialises a pointer on dtype and 16-byte alignment only
    if v.data_ptr() % 16 == 0:
        return torch.empty(16, dtype=v.dtype)
    return torch.empty(17, dtype=v.dtype)[1:]


@contextlib.contextmanager
def _recording(sink: list, scenario: list) -> Iterator[None]:
    """Autotuner.run / JITFunction.run record their arguments instead of running."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def make(kind):
        def run(self, *args, **kwargs):
            fn = self.fn if kind == "autotuner" else self
            names = list(self.arg_names) if kind == "autotuner" else [p.name for p in self.params]
            kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            bound = dict(zip(names, args))
            sink.append(Launch(kernel=fn.fn.__name__, fn=self, scenario=scenario[0], dtype=scenario[1],
                               tf32=torch.backends.cuda.matmul.allow_tf32,
                               args={k: _stand_in(v) for k, v in bound.items()},
                               kwargs={k: _stand_in(v) for k, v in kwargs.items()}))
            return None
        return run

    saved = (Autotuner.run, JITFunction.run, torch.Tensor.__dict__.get("is_cuda"))
    Autotuner.run, JITFunction.run = make("autotuner"), make("jit")
    torch.Tensor.is_cuda = property(lambda self: True)  # launchers size grids as on a GPU
    try:
        yield
    finally:
        Autotuner.run, JITFunction.run = saved[0], saved[1]
        if saved[2] is None:
            del torch.Tensor.is_cuda
        else:  # pragma: no cover - torch defines is_cuda on TensorBase, not Tensor
            torch.Tensor.is_cuda = saved[2]


@contextlib.contextmanager
def _env(**kv) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update({k: v for k, v in kv.items() if v is not None})
    for k, v in kv.items():
        if v is None:
            os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _r(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float32).mul_(0.05).to(dtype)


SHAPES = {
    # (M tokens, K in, N out, decode M, adapter ranks)
    "real": dict(M=512, K=4096, N=4096, M_dec=16, ranks=(16, 8), big_rank=256, T_mixed=(8, 512)),
    "odd": dict(M=37, K=100, N=300, M_dec=3, ranks=(1, 5), big_rank=70, T_mixed=(5, 90)),
}


def _scenarios(dtype_name: str, shapes: dict, adapter_dtype_name: str):
    """(name, thunk) pairs; each thunk calls launchers the way the ops do."""
    from peft_fast import ops_triton as ot
    from peft_fast.quant.nf4 import quantize_nf4
    from peft_fast.triton_kernels import colsum, dora, lora, multi_lora, nf4
    from peft_fast.triton_kernels._triton import new_seed

    dt, at = DTYPES[dtype_name], DTYPES[adapter_dtype_name]
    M, K, N, Md = shapes["M"], shapes["K"], shapes["N"], shapes["M_dec"]
    ranks = shapes["ranks"]
    x, dy = _r(M, K, dtype=dt), _r(M, N, dtype=dt)
    W, b = _r(N, K, dtype=dt), _r(N, dtype=dt)
    As = [_r(r, K, dtype=at) for r in ranks]
    Bs = [_r(N, r, dtype=at) for r in ranks]
    sc = [2.0, 0.5][:len(ranks)]
    mag, wn = _r(N, dtype=at).abs_().add_(1), _r(N, dtype=torch.float32).abs_().add_(1)
    l_n, l_k = _r(N, dtype=at), _r(K, dtype=at)

    def lora_pair(ps, weight, xx, ddy, fifo=False):
        w = weight.t() if fifo and isinstance(weight, torch.Tensor) else weight
        y, xas, rng = ot.lora_fwd(xx, w, b, As, Bs, sc, ps, fan_in_fan_out=fifo)
        ot.lora_bwd(ddy, xx, w, As, Bs, sc, ps, xas, rng, fan_in_fan_out=fifo)

    def dora_pair(weight, xx, ddy):
        y, xa, pre = ot.dora_fwd(xx, weight, b, As[0], Bs[0], 2.0, mag, wn)
        ot.dora_bwd(ddy, xx, weight, As[0], Bs[0], 2.0, mag, wn, xa, pre if pre is not None else ddy)

    def ia3_all(weight, xx, ddy):
        for ff, l in ((True, l_k), (False, l_n)):
            y, base = ot.ia3_fwd(xx, weight, b, l, ff)
            ot.ia3_bwd(ddy, xx, weight, l, ff, base if base is not None else ddy)

    out = []
    for gemm in ("triton",):
        out += [
            (f"lora/{gemm}", lambda: lora_pair([0.0, 0.0], W, x, dy)),
            (f"lora_dropout/{gemm}", lambda: lora_pair([0.1, 0.0], W, x, dy)),
            (f"lora_fan_in_fan_out/{gemm}", lambda: lora_pair([0.0, 0.0], W, x, dy, fifo=True)),
            (f"dora/{gemm}", lambda: dora_pair(W, x, dy)),
            (f"ia3/{gemm}", lambda: ia3_all(W, x, dy)),
        ]
    if dtype_name != "fp32" or adapter_dtype_name == "fp32":
        # 4-bit base weights: dequantize + Triton GEMM (any M), decode inside the GEMM (small M)
        for dq in (False, True):
            op = quantize_nf4(W, 64, compress_statistics=dq).operand()
            xd, dyd = x[:Md], dy[:Md]
            tag = "nf4_dq" if dq else "nf4"
            out += [
                (f"lora_{tag}/triton", lambda op=op: lora_pair([0.0, 0.0], op, x, dy)),
                (f"lora_{tag}/nf4_fused", lambda op=op, xd=xd, dyd=dyd: lora_pair([0.1, 0.0], op, xd, dyd)),
                (f"dora_{tag}/nf4_fused", lambda op=op, xd=xd, dyd=dyd: dora_pair(op, xd, dyd)),
                (f"ia3_{tag}/nf4_fused", lambda op=op, xd=xd, dyd=dyd: ia3_all(op, xd, dyd)),
                (f"nf4_dequantize_{tag}", lambda op=op: nf4.nf4_dequantize(op)),
            ]
    seed = new_seed(torch.device("cpu"))
    big = shapes["big_rank"]
    out += [
        ("lora_shrink_grad_a", lambda: (lora.lora_shrink(x, As[0], seed, 0.1),
                                        lora.lora_grad_a(_r(M, ranks[0], dtype=at), x, seed, 0.1, 1.5, at))),
        ("colsum_mul", lambda: colsum.colsum_mul(dy, dy)),
        ("dora_weight_norm", lambda: (dora.dora_weight_norm(W, As[0], Bs[0], 2.0),
                                      dora.dora_weight_norm(W, _r(big, K, dtype=at), _r(N, big, dtype=at), 2.0,
                                                            weight_sqnorm=wn))),
    ]
    n_ad = 4
    A3, B3 = _r(n_ad, max(ranks), K, dtype=at), _r(n_ad, N, max(ranks), dtype=at)
    scales = torch.ones(n_ad)
    for T in shapes["T_mixed"]:
        idx = torch.arange(T) % (n_ad + 1) - 1
        xt = _r(T, K, dtype=dt)
        out.append((f"lora_mixed_T{T}", lambda xt=xt, idx=idx, T=T: multi_lora.lora_mixed(
            xt, A3, B3, scales, idx, torch.zeros(T, N, dtype=dt))))
    return out


def record_launches(dtypes=("fp32", "fp16", "bf16"), shapes=("real",), mixed_adapters: bool = True,
                    tf32: bool = True, progress=None) -> list[Launch]:
    """Every distinct launch of every kernel for the given activation dtypes and shape sets.
    With mixed_adapters, 16-bit activations also run with fp32 adapters (autocast-free
    16-bit models keep fp32 LoRA weights in PEFT's autocast_adapter_dtype default). With tf32,
    the fp32 cases run a second time with torch.backends.cuda.matmul.allow_tf32 = True."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("record_launches needs TRITON_INTERPRET unset (launchers pick interpreter configs)")
    launches: list[Launch] = []
    current = ["", ""]
    combos = [(d, d, False) for d in dtypes]
    if mixed_adapters:
        combos += [(d, "fp32", False) for d in dtypes if d != "fp32"]
    if tf32:
        combos += [(d, a, True) for d, a, _ in combos if "fp32" in (d, a)]
    torch.manual_seed(0)
    allow = torch.backends.cuda.matmul.allow_tf32
    with _recording(launches, current), _env(PEFT_FAST_BACKEND=None):
        try:
            for shape_name in shapes:
                for dname, aname, tf in combos:
                    torch.backends.cuda.matmul.allow_tf32 = tf
                    for name, thunk in _scenarios(dname, SHAPES[shape_name], aname):
                        gemm = name.split("/")[1] if "/" in name else None
                        current[0] = (f"{name}/{dname}" + (f"+{aname} adapters" if aname != dname else "")
                                      + ("/tf32" if tf else "") + f"/{shape_name}")
                        current[1] = dname
                        with _env(PEFT_FAST_GEMM=gemm):
                            thunk()
                        if progress is not None:
                            progress(current[0])
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allow
    seen, unique = set(), []
    for launch in launches:
        k = launch.key()
        if k not in seen:
            seen.add(k)
            unique.append(launch)
    return unique
