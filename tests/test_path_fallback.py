"""The path chooser (_path.choose) when a kernel cannot compile or launch on the GPU at hand.

No GPU needed: Triton's own error classes (OutOfResources, PTXASError, CompilationError) are
raised by stand-in candidates, and the measuring branch (CUDA only) is reached by replacing
`_path._unmeasurable` (the device check) and `_path._time_ms` (the CUDA-event timer). The op
level tests replace the Triton launchers that ops_triton calls with ones that raise, and check
that the op's result is the torch composition's (bit for bit) and the masked formula's (fp64).
The last test runs the real kernels through the interpreter (marker `interp`).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import assert_close
from peft_fast import _path, ops, ops_triton
from peft_fast.triton_kernels._triton import keep_scale, philox_keep_mask_ref

triton_errors = pytest.importorskip("triton.runtime.errors")
from triton.compiler.errors import CompilationError  # noqa: E402

OutOfResources = triton_errors.OutOfResources


def _oor():
    return OutOfResources(232448, 101376, "shared memory")  # an sm_90 config on a 99 KB GPU


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("PEFT_FAST_GEMM", raising=False)
    monkeypatch.delenv("PEFT_FAST_PATH_STRICT", raising=False)
    _path.clear_path_choices()
    yield
    _path.clear_path_choices()


@pytest.fixture
def measurable(monkeypatch):
    """The measuring branch on CPU: every device counts as measurable; a candidate's time is
    looked up by its function name in `times` (it is called once, as the warm-up would)."""
    times: dict[str, float] = {}

    def fake_time_ms(fn):
        fn()
        return times.get(getattr(fn, "__name__", ""), 1.0)

    monkeypatch.setattr(_path, "_unmeasurable", lambda device: None)
    monkeypatch.setattr(_path, "_time_ms", fake_time_ms)
    return times


class Candidate:
    """A path that returns `value` or raises `error`, counting its calls."""

    def __init__(self, name, value=None, error=None):
        self.__name__, self.value, self.error, self.calls = name, value, error, 0

    def __call__(self):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.value


def _fallback_warnings(record):
    return [w for w in record if issubclass(w.category, _path.PathFallbackWarning)]


@pytest.fixture
def caught():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield record


CPU = torch.device("cpu")


# ------------------------------------------------------------------ which errors are launch failures
@pytest.mark.parametrize("err,expected", [
    (_oor(), True),
    (triton_errors.PTXASError("ptxas fatal: Value 'sm_120a' is not defined"), True),
    (CompilationError("src", None, "For loop bounds and step must all be ints"), True),
    (RuntimeError("Internal Triton PTX codegen error: \nptxas error: Entry function uses too much shared data"), True),
    (RuntimeError("Triton Error [CUDA]: too many resources requested for launch"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (TypeError("fused_linear() got an unexpected keyword argument 'seed'"), False),
    (ValueError("fused_linear: x (3, 8) and w (4, 4) do not chain"), False),
    (triton_errors.InterpreterError("bug in a kernel under the interpreter"), False),
], ids=["oor", "ptxas", "compile", "ptxas-old", "launch-resources", "illegal-address", "type", "value", "interp"])
def test_launch_failures_are_triton_compile_and_resource_errors_only(err, expected):
    assert _path.is_launch_failure(err) is expected


# ------------------------------------------------------------------ measuring branch
def test_measurement_drops_an_out_of_resources_candidate(measurable, caught):
    measurable.update(torch=2.0, nf4_fused=3.0)
    triton = Candidate("triton", error=_oor())
    torch_ = Candidate("torch", value="torch result")
    fused = Candidate("nf4_fused", value="fused result")
    key = (64, 4096, 4096, (16,), "torch.float16", True, ())
    out = _path.choose("lora_fwd", key, {"triton": triton, "torch": torch_, "nf4_fused": fused}, CPU)
    assert out == "torch result"
    (rec,) = _path.path_choices()
    assert rec["path"] == "torch" and set(rec["ms"]) == {"torch", "nf4_fused"}
    assert rec["failed"].keys() == {"triton"} and rec["failed"]["triton"].startswith("OutOfResources: out of resource")
    assert rec["reason"].startswith("measured") and "triton" in rec["reason"]
    (w,) = _fallback_warnings(caught)
    msg = str(w.message)
    assert "lora_fwd" in msg and str(key) in msg and "'triton'" in msg and "shared memory" in msg
    # later calls reuse the choice and never try the failed kernel again
    assert _path.choose("lora_fwd", key, {"triton": triton, "torch": torch_, "nf4_fused": fused}, CPU) == "torch result"
    assert triton.calls == 1 and len(_fallback_warnings(caught)) == 1


def test_measurement_keeps_the_fastest_of_the_candidates_that_launch(measurable):
    measurable.update(triton=1.0, torch=2.0)
    fused = Candidate("nf4_fused", error=triton_errors.PTXASError("ptxas: too much shared data"))
    out = _path.choose("op", (1,), {"triton": Candidate("triton", "t"), "torch": Candidate("torch", "c"),
                                    "nf4_fused": fused}, CPU)
    assert out == "t" and _path.path_choices()[0]["failed"].keys() == {"nf4_fused"}


def test_every_candidate_failing_measurement_runs_the_fallback(measurable, caught):
    cands = {"triton": Candidate("triton", error=_oor()), "nf4_fused": Candidate("nf4_fused", error=_oor())}
    ref = Candidate("torch_dequant", value="ref")
    assert _path.choose("op", (2,), cands, CPU, {"torch_dequant": ref}) == "ref"
    (rec,) = _path.path_choices()
    assert rec["path"] == "torch_dequant" and rec["ms"] == {} and rec["failed"].keys() == {"triton", "nf4_fused"}
    assert len(_fallback_warnings(caught)) == 2  # one per failed path


def test_every_candidate_failing_measurement_without_fallback_raises(measurable):
    cands = {"triton": Candidate("triton", error=_oor()), "torch": Candidate("torch", error=_oor())}
    with pytest.raises(OutOfResources):
        _path.choose("op", (3,), cands, CPU)


# ------------------------------------------------------------------ run-time failures
def test_run_time_failure_of_the_chosen_path_falls_back_and_is_remembered(caught):
    triton = Candidate("triton", error=CompilationError("src", None, "For loop bounds and step must all be ints"))
    torch_ = Candidate("torch", value="torch result")
    key = (16, 100, 72, (), "torch.float32", False, ("bias", "pro_scale"))
    for _ in range(3):  # not measurable on CPU: triton is chosen, fails, torch runs
        assert _path.choose("ia3_ff_fwd", key, {"triton": triton, "torch": torch_}, CPU) == "torch result"
    assert triton.calls == 1 and torch_.calls == 3
    (rec,) = _path.path_choices()
    assert rec["path"] == "torch" and "failed at run time" in rec["reason"] and "CompilationError" in rec["failed"]["triton"]
    (w,) = _fallback_warnings(caught)
    assert "ia3_ff_fwd" in str(w.message) and "running 'torch' instead" in str(w.message)


def test_only_candidate_falls_back_to_the_unmeasured_torch_composition(caught):
    triton = Candidate("triton", error=_oor())
    ref = Candidate("torch", value="masked ref")
    assert _path.choose("lora_dx", (8,), {"triton": triton}, CPU, {"torch": ref}) == "masked ref"
    assert _path.choose("lora_dx", (8,), {"triton": triton}, CPU, {"torch": ref}) == "masked ref"
    assert triton.calls == 1 and ref.calls == 2
    assert _path.path_choices()[0]["path"] == "torch"


def test_only_candidate_failing_with_a_fallback_in_measurable_mode(measurable):
    # one candidate is never timed; the fallback is never timed either
    triton = Candidate("triton", error=_oor())
    ref = Candidate("torch", value="r")
    assert _path.choose("op", (1,), {"triton": triton}, CPU, {"torch": ref}) == "r"
    assert ref.calls == 1


def test_the_last_paths_error_propagates_when_nothing_launches():
    cands = {"triton": Candidate("triton", error=_oor())}
    with pytest.raises(triton_errors.PTXASError):
        _path.choose("op", (5,), cands, CPU, {"torch": Candidate("torch", error=triton_errors.PTXASError("x"))})


def test_forced_path_that_fails_falls_back_and_is_not_retried(monkeypatch, caught):
    monkeypatch.setenv("PEFT_FAST_GEMM", "nf4_fused")
    fused = Candidate("nf4_fused", error=_oor())
    cands = {"triton": Candidate("triton", "t"), "torch": Candidate("torch", "c"), "nf4_fused": fused}
    assert _path.choose("lora_fwd", (4,), cands, CPU) == "t"
    assert _path.choose("lora_fwd", (4,), cands, CPU) == "t"
    assert fused.calls == 1 and len(_fallback_warnings(caught)) == 1
    (rec,) = _path.path_choices()
    assert rec["forced"] and rec["path"] == "triton" and "forced nf4_fused" in rec["reason"]
    # back to auto: the forced run's record is no choice, but the failure is still known
    monkeypatch.delenv("PEFT_FAST_GEMM")
    assert _path.choose("lora_fwd", (4,), cands, CPU) == "t"
    rec = _path.path_choices()[0]
    assert not rec["forced"] and "nf4_fused" in rec["failed"] and fused.calls == 1


def test_forced_path_that_runs_leaves_no_record(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_GEMM", "torch")
    assert _path.choose("op", (1,), {"triton": Candidate("triton", "t"), "torch": Candidate("torch", "c")}, CPU) == "c"
    assert _path.path_choices() == []


def test_warning_once_per_op_path_and_error_class(caught):
    triton = Candidate("triton", error=_oor())
    torch_ = Candidate("torch", value=0)
    for m in (1, 2, 4, 8):
        _path.choose("lora_fwd", (m, 4096), {"triton": triton, "torch": torch_}, CPU)
    _path.choose("lora_dx", (1, 4096), {"triton": triton, "torch": torch_}, CPU)
    triton.error = triton_errors.PTXASError("ptxas")
    _path.choose("lora_fwd", (16, 4096), {"triton": triton, "torch": torch_}, CPU)
    msgs = [str(w.message) for w in _fallback_warnings(caught)]
    assert len(msgs) == 3, msgs
    assert "lora_fwd" in msgs[0] and "(1, 4096)" in msgs[0] and "OutOfResources" in msgs[0]
    assert "lora_dx" in msgs[1] and "PTXASError" in msgs[2]
    recs = _path.path_choices()  # every key's failure is recorded, warned about or not
    assert len(recs) == 6 and all(r["path"] == "torch" and "triton" in r["failed"] for r in recs)
    _path.clear_path_choices()  # forgets the warnings too
    _path.choose("lora_fwd", (1, 4096), {"triton": triton, "torch": torch_}, CPU)
    assert len(_fallback_warnings(caught)) == 4


# ------------------------------------------------------------------ errors that must propagate
@pytest.mark.parametrize("err", [TypeError("bad argument"), ValueError("bad shape"),
                                 RuntimeError("CUDA error: an illegal memory access was encountered")],
                         ids=["type", "value", "cuda"])
@pytest.mark.parametrize("where", ["run", "measure", "forced"])
def test_ordinary_errors_are_not_swallowed(err, where, monkeypatch, caught):
    if where == "measure":
        monkeypatch.setattr(_path, "_unmeasurable", lambda device: None)
        monkeypatch.setattr(_path, "_time_ms", lambda fn: fn())
    if where == "forced":
        monkeypatch.setenv("PEFT_FAST_GEMM", "triton")
    torch_ = Candidate("torch", value="c")
    with pytest.raises(type(err), match=str(err)):
        _path.choose("op", (1,), {"triton": Candidate("triton", error=err), "torch": torch_}, CPU, {"ref": torch_})
    assert torch_.calls == 0 and _fallback_warnings(caught) == []
    assert all(not r["failed"] for r in _path.path_choices())


@pytest.mark.parametrize("where", ["run", "measure"])
def test_strict_mode_raises_launch_failures(where, monkeypatch):
    monkeypatch.setenv("PEFT_FAST_PATH_STRICT", "1")
    if where == "measure":
        monkeypatch.setattr(_path, "_unmeasurable", lambda device: None)
        monkeypatch.setattr(_path, "_time_ms", lambda fn: fn())
    with pytest.raises(OutOfResources):
        _path.choose("op", (1,), {"triton": Candidate("triton", error=_oor()), "torch": Candidate("torch", "c")}, CPU)


# ------------------------------------------------------------------ the ops: results are the fallback's
def _raise_oor(*args, **kwargs):
    raise _oor()


@pytest.fixture
def no_kernel_launches(monkeypatch):
    """Every Triton launcher ops_triton calls raises OutOfResources (a GPU too small for all)."""
    from peft_fast.triton_kernels import colsum, dora, lora

    monkeypatch.setattr(ops_triton, "fused_linear", _raise_oor)
    monkeypatch.setattr(ops_triton, "nf4_dequantize", _raise_oor)
    for mod, name in ((lora, "lora_shrink"), (lora, "lora_grad_a"), (colsum, "colsum_mul"), (dora, "dora_weight_norm")):
        monkeypatch.setattr(mod, name, _raise_oor)


def _masked_lora_inputs(dtype, M=13, K=40, N=24, ranks=(4, 1)):
    g = torch.Generator().manual_seed(M * K + N)
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dtype)  # noqa: E731
    return (r(M, K), r(N, K, sc=K ** -0.5), r(N), [r(k, K, sc=K ** -0.5) for k in ranks],
            [r(N, k, sc=k ** -0.5) for k in ranks], [2.0, 0.5], [0.3, 0.0], r(M, N))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_masked_lora_runs_on_the_torch_composition_when_no_kernel_launches(no_kernel_launches, dtype, caught):
    from peft_fast.triton_kernels.fused_linear import Segment, fused_linear_ref
    from peft_fast.triton_kernels.lora import lora_grad_a_ref, lora_shrink_ref

    x, W, b, As, Bs, sc, ps, dy = _masked_lora_inputs(dtype)
    y, xas, rng = ops_triton.lora_fwd(x, W, b, As, Bs, sc, ps)
    dx, dAs, dBs = ops_triton.lora_bwd(dy, x, W, As, Bs, sc, ps, xas, rng)
    seed = int(rng[0])
    # bit for bit the torch composition's results
    xa0 = lora_shrink_ref(x, As[0], rng[0], ps[0])
    assert torch.equal(xas[0], xa0)
    L = torch.cat([xa0, x @ As[1].t()], 1)
    segs = [Segment(0, 4, 2.0, 0.0), Segment(4, 1, 0.5, 0.0)]
    assert torch.equal(y, fused_linear_ref(x, W.t(), bias=b, lr_left=L, lr_right=torch.cat(Bs, 1).t(), segments=segs)[0])
    g = dy @ torch.cat(Bs, 1)
    k = keep_scale(ps[0])
    assert torch.equal(dAs[0], lora_grad_a_ref(g[:, :4], x, rng[0], ps[0], 2.0 * k, dtype))
    # and the masked formula, in fp64
    keep = philox_keep_mask_ref(seed, x.shape[0], x.shape[1], ps[0]).double()
    x64, W64, dy64 = x.double(), W.double(), dy.double()
    A0, A1, B0, B1 = (t.double() for t in (*As, *Bs))
    xd = x64 * keep * k
    assert_close(y, x64 @ W64.t() + b.double() + 2.0 * (xd @ A0.t()) @ B0.t() + 0.5 * (x64 @ A1.t()) @ B1.t(), dtype)
    g64 = dy64 @ torch.cat([B0, B1], 1)
    assert_close(dx, dy64 @ W64 + 2.0 * (g64[:, :4] @ A0) * keep * k + 0.5 * g64[:, 4:] @ A1, dtype)
    assert_close(dAs[0], 2.0 * g64[:, :4].t() @ xd, dtype)
    assert_close(dBs[0], 2.0 * (dy64.t() @ (xd @ A0.t())), dtype)
    paths = {r["op"]: r["path"] for r in _path.path_choices()}
    assert paths == {"lora_shrink": "torch", "lora_fwd": "torch", "lora_grad_a": "torch", "lora_dx": "torch"}
    assert {str(w.message).split(" of ")[1].split()[0] for w in _fallback_warnings(caught)} == set(paths)


def _nf4_weight(N=24, K=128, dtype=torch.float16):
    from peft_fast.quant import NF4_CODE
    from peft_fast.triton_kernels.nf4 import NF4Operand

    g = torch.Generator().manual_seed(N + K)
    packed = torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8, generator=g)
    absmax = torch.rand(N * K // 64, generator=g) + 0.5
    return NF4Operand(packed, absmax, NF4_CODE.clone(), (N, K), dtype, 64)


@pytest.mark.parametrize("M", [5, 100], ids=["decode-M", "large-M"])
def test_nf4_linear_dequantizes_in_torch_when_no_kernel_launches(no_kernel_launches, measurable, M, caught):
    from peft_fast.triton_kernels.fused_linear import NF4KN, Segment, fused_linear_ref
    from peft_fast.triton_kernels.nf4 import nf4_dequantize_ref

    op = _nf4_weight(dtype=torch.float32)
    g = torch.Generator().manual_seed(M)
    x, L, R = torch.randn(M, 128, generator=g), torch.randn(M, 4, generator=g), torch.randn(4, 24, generator=g)
    segs = [Segment(0, 4, 2.0, 0.0)]
    y, _, _ = ops_triton._linear("lora_fwd", x, NF4KN(op, True), lr_left=L, lr_right=R, segments=segs)
    assert torch.equal(y, fused_linear_ref(x, NF4KN(op, True), lr_left=L, lr_right=R, segments=segs)[0])
    W = nf4_dequantize_ref(op).double()
    assert_close(y, x.double() @ W.t() + 2.0 * L.double() @ R.double(), torch.float32)
    (rec,) = _path.path_choices()
    assert rec["path"] == "torch_dequant" and rec["ms"] == {}
    assert rec["failed"].keys() == ({"triton", "torch", "nf4_fused"} if M <= ops_triton._DECODE_M else {"triton", "torch"})


def test_nf4_decode_in_gemm_that_does_not_fit_is_dropped_from_the_measurement(monkeypatch, measurable, caught):
    """The A100 / consumer-GPU case: the in-GEMM NF4 decode needs more shared memory than the
    GPU has, the dense paths launch: the choice is between those."""
    from peft_fast.triton_kernels.fused_linear import NF4KN, fused_linear_ref
    from peft_fast.triton_kernels.nf4 import nf4_dequantize_ref

    def fused_linear(x, w, **kw):  # the dense Triton GEMM launches, the NF4-decoding one does not
        if isinstance(w, NF4KN):
            raise _oor()
        return fused_linear_ref(x, w, **kw)

    monkeypatch.setattr(ops_triton, "fused_linear", fused_linear)
    monkeypatch.setattr(ops_triton, "nf4_dequantize", lambda w, out: out.copy_(nf4_dequantize_ref(w)))
    op = _nf4_weight(dtype=torch.float32)
    x = torch.randn(7, 128)
    y, _, _ = ops_triton._linear("ia3_fwd", x, NF4KN(op, True))
    assert_close(y, fused_linear_ref(x, NF4KN(op, True))[0], torch.float32)
    (rec,) = _path.path_choices()
    assert rec["path"] in ("triton", "torch") and set(rec["ms"]) == {"triton", "torch"}
    assert rec["failed"].keys() == {"nf4_fused"}
    (w,) = _fallback_warnings(caught)
    assert "'nf4_fused' path of ia3_fwd failed while being measured" in str(w.message)
    assert w.filename == __file__  # through ops_triton's frames to this test's line


def test_bad_input_to_a_guarded_kernel_raises_its_error():
    """A launcher's ValueError is the caller's bug: no fallback to the reference (which would
    broadcast these shapes), nothing recorded as failed."""
    with pytest.raises(ValueError, match="colsum_mul: shapes"):
        ops_triton.colsum_mul(torch.randn(3, 4), torch.randn(3, 1))
    assert all(not r["failed"] for r in _path.path_choices())


# ------------------------------------------------------------------ the real kernels (interpreter)
@pytest.mark.interp
def test_fallback_matches_the_interpreted_kernels(monkeypatch):
    """The torch fallbacks regenerate the same dropout masks as the kernels: same results."""
    if ops.backend_for(torch.zeros(1)) != "triton":
        pytest.skip("needs TRITON_INTERPRET=1")
    x, W, b, As, Bs, sc, ps, dy = _masked_lora_inputs(torch.float32)
    seeds = iter([torch.tensor([1234567], dtype=torch.int64), torch.tensor([1234567], dtype=torch.int64)])
    monkeypatch.setattr(ops_triton, "new_seed", lambda device: next(seeds))
    results = []
    for fail in (False, True):
        if fail:
            from peft_fast.triton_kernels import lora

            monkeypatch.setattr(ops_triton, "fused_linear", _raise_oor)
            monkeypatch.setattr(lora, "lora_shrink", _raise_oor)
            monkeypatch.setattr(lora, "lora_grad_a", _raise_oor)
        _path.clear_path_choices()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _path.PathFallbackWarning)
            y, xas, rng = ops_triton.lora_fwd(x, W, b, As, Bs, sc, ps)
            dx, dAs, dBs = ops_triton.lora_bwd(dy, x, W, As, Bs, sc, ps, xas, rng)
        assert all(r["path"] == ("torch" if fail else "triton") for r in _path.path_choices())
        results.append((y, dx, *dAs, *dBs))
    for got, want in zip(results[1], results[0]):
        assert_close(got, want, torch.float32)


# ------------------------------------------------------------------ the warning: how to make it raise, where it points
def test_fallback_warning_names_the_strict_switch_and_points_at_the_caller(measurable, caught):
    """The warning says how to turn the fallback into an error, and is attributed to the first
    frame outside peft_fast / torch / triton: here this test (directly, and through an op)."""
    measurable.update(torch=2.0)
    key = (16, 64, 64)
    out = _path.choose("lora_fwd", key, {"triton": Candidate("triton", error=_oor()),
                                        "torch": Candidate("torch", value="t")}, CPU)
    assert out == "t"
    (w,) = _fallback_warnings(caught)
    assert "PEFT_FAST_PATH_STRICT=1" in str(w.message) and "lora_fwd" in str(w.message)
    assert w.filename == __file__, w.filename

    # at run time (nothing measured), called from a nested function: its line
    _path.clear_path_choices()
    caught.clear()
    monkeypatch = pytest.MonkeyPatch()
    try:
        monkeypatch.setattr(_path, "_unmeasurable", lambda device: "not measured on cpu")

        def nested():
            return _path.choose("dora_fwd", key, {"triton": Candidate("triton", error=_oor()),
                                                  "torch": Candidate("torch", value="t2")}, CPU)

        assert nested() == "t2"
    finally:
        monkeypatch.undo()
    (w,) = _fallback_warnings(caught)
    assert "at run time" in str(w.message) and "PEFT_FAST_PATH_STRICT=1" in str(w.message)
    assert w.filename == __file__ and w.lineno == nested.__code__.co_firstlineno + 1, (w.filename, w.lineno)


def test_caller_stacklevel_skips_library_frames():
    import os

    assert _path._caller_stacklevel() == 1  # called from this test file: the caller itself
    lib = _path._library_dirs()
    assert any(os.path.abspath(_path.__file__).startswith(d) for d in lib)
    assert any(os.path.abspath(torch.__file__).startswith(d) for d in lib)
    assert not any(os.path.abspath(__file__).startswith(d) for d in lib)
