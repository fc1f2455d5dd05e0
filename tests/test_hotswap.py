"""Hot-swapping LoRA adapters (`peft_fast.utils.hotswap`, PEFT 0.21.2's `peft.utils.hotswap`).

A swapped model gives the outputs of the new adapter loaded fresh, and of real peft swapping
the same files; smaller ranks go into tensors padded by prepare_model_for_compiled_hotswap,
other alphas into 0-dim tensor scalings; the errors are PEFT's; and a model compiled with
fullgraph=True keeps its one graph across swaps while its outputs follow the new adapter.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings

import pytest
import torch
from torch import nn

import peft_fast
from peft_fast.utils import hotswap as fast_hotswap

from conftest import assert_close

PUBLIC = ("hotswap_adapter", "hotswap_adapter_from_state_dict", "prepare_model_for_compiled_hotswap",
          "check_hotswap_configs_compatible")
TARGETS = ["conv", "up", "down"]


class Net(nn.Module):
    """Conv2d -> Linear -> Linear: the layer types PEFT pads. x [B, 3, 2, 4] -> [B, 16]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.up = nn.Linear(48, 40)
        self.down = nn.Linear(40, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(torch.tanh(self.conv(x)).flatten(1))))


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture(scope="module")
def ref_peft():
    return pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Adapter directories (PEFT format) by name; never zero B, so every adapter changes the output."""
    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "r4a8": dict(r=4, lora_alpha=8), "r4a8b": dict(r=4, lora_alpha=8), "r2a3": dict(r=2, lora_alpha=3),
        "r8a16": dict(r=8, lora_alpha=16), "r4a5": dict(r=4, lora_alpha=5),
        "up_only": dict(r=4, lora_alpha=8, target_modules=["up"]),
        "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
        "dora0": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["up", "down"]),
        "dora1": dict(r=2, lora_alpha=3, use_dora=True, target_modules=["up", "down"]),
        "mts0": dict(r=4, lora_alpha=8, target_modules=["up"], modules_to_save=["down"]),
        "mts1": dict(r=4, lora_alpha=8, target_modules=["up"], modules_to_save=["down"]),
    }
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed, (name, kw) in enumerate(specs.items()):
            kw = {"target_modules": TARGETS, "init_lora_weights": "gaussian", **kw}
            model = peft_fast.get_peft_model(_net(), peft_fast.LoraConfig(**kw))
            torch.manual_seed(100 + seed)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.2)
                    elif "magnitude" in n or "modules_to_save" in n:
                        p.mul_(1 + 0.3 * torch.randn(p.shape))
            paths[name] = str(root / name)
            model.save_pretrained(paths[name])
    return paths


def _fast(path):
    return peft_fast.PeftModel.from_pretrained(_net(), path).eval()


def _ref(ref_peft, path):
    return ref_peft.PeftModel.from_pretrained(_net(), path).eval()


def _x():
    return torch.randn(5, 3, 2, 4, generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _out(model):
    return model(_x())


# ---------------------------------------------------------------- API surface
def test_same_names_signatures_and_exports_as_peft(ref_peft):
    import peft.utils.hotswap as ref_hotswap

    for name in PUBLIC:
        ours, theirs = inspect.signature(getattr(fast_hotswap, name)), inspect.signature(getattr(ref_hotswap, name))
        assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
            [(p.name, p.kind, p.default) for p in theirs.parameters.values()], name
        # exported where PEFT exports them (peft 0.21.2: only from the hotswap module)
        assert hasattr(peft_fast, name) == hasattr(ref_peft, name), name
        assert hasattr(peft_fast.utils, name) == hasattr(ref_peft.utils, name), name


# ---------------------------------------------------------------- numerics
@pytest.mark.parametrize("second", ["r4a8b", "r4a5", "up_only"])
def test_hotswap_matches_fresh_load_and_peft(ref_peft, adapters, second):
    """Same rank (other weights), other alpha (float scalings replaced), and an adapter missing
    keys (the old weights of the layers it does not target are zeroed)."""
    from peft.utils.hotswap import hotswap_adapter as ref_hotswap_adapter

    model = _fast(adapters["r4a8"])
    params = {n: p for n, p in model.named_parameters()}
    before = _out(model)
    fast_hotswap.hotswap_adapter(model, adapters[second], "default")
    after = _out(model)
    assert not torch.allclose(after, before)
    assert_close(after, _out(_fast(adapters[second])), msg="vs fresh load")
    assert all(p is params[n] for n, p in model.named_parameters()), "parameters must be swapped in place"

    ref = _ref(ref_peft, adapters["r4a8"])
    ref_hotswap_adapter(ref, adapters[second], "default")
    assert_close(after, _out(ref), msg="vs peft's hotswap")
    assert {k: float(v) for k, v in model.base_model.model.up.scaling.items()} == \
        {k: float(v) for k, v in ref.base_model.model.up.scaling.items()}


def test_smaller_and_larger_rank_after_padding(ref_peft, adapters):
    """r4 padded to 8, then r2 (zero-padded into the tensors) and r8 swapped in: shapes stay at
    the target rank, scalings are tensors filled in place, outputs follow each adapter."""
    from peft.utils.hotswap import hotswap_adapter as ref_swap
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap as ref_prepare

    model, ref = _fast(adapters["r4a8"]), _ref(ref_peft, adapters["r4a8"])
    config = model.peft_config
    fast_hotswap.prepare_model_for_compiled_hotswap(model, target_rank=8, config=config)
    ref_prepare(ref, target_rank=8, config=ref.peft_config)
    assert config["default"].r == 8
    assert_close(_out(model), _out(_fast(adapters["r4a8"])), msg="padding changes nothing")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in ref.named_parameters()}
    assert shapes["base_model.model.up.lora_A.default.weight"] == (8, 48)
    assert shapes["base_model.model.conv.lora_B.default.weight"] == (6, 8, 1, 1)
    scaling = model.base_model.model.up.scaling["default"]
    assert isinstance(scaling, torch.Tensor) and scaling.dim() == 0
    for name in ("r2a3", "r8a16", "r4a8b"):
        fast_hotswap.hotswap_adapter(model, adapters[name], "default")
        ref_swap(ref, adapters[name], "default")
        assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes
        assert model.base_model.model.up.scaling["default"] is scaling  # filled, not replaced
        assert_close(_out(model), _out(_fast(adapters[name])), msg=f"{name} vs fresh load")
        assert_close(_out(model), _out(ref), msg=f"{name} vs peft")


def test_larger_rank_without_padding_replaces_tensors(adapters):
    model = _fast(adapters["r2a3"])
    fast_hotswap.hotswap_adapter(model, adapters["r8a16"], "default")
    assert model.base_model.model.up.lora_A["default"].weight.shape == (8, 48)
    assert_close(_out(model), _out(_fast(adapters["r8a16"])))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_tensor_scaling_forward_and_grads_match_float(adapters, method):
    """The fused ops fold a 0-dim tensor scaling into B: same outputs and gradients as floats."""
    path = adapters["r4a8" if method == "lora" else "dora0"]
    models = []
    for prepare in (False, True):
        m = peft_fast.PeftModel.from_pretrained(_net(), path, is_trainable=True).train()
        if prepare:
            fast_hotswap.prepare_model_for_compiled_hotswap(m)
        x = _x().requires_grad_()
        y = m(x)
        y.pow(2).sum().backward()
        models.append((y.detach(), x.grad, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (y0, dx0, g0), (y1, dx1, g1) = models
    assert_close(y1, y0)
    assert_close(dx1, dx0)
    assert set(g1) == set(g0) and any("lora_B" in k for k in g0)
    for k in g0:
        assert_close(g1[k], g0[k], msg=k)


def test_dora_magnitude_swapped_from_state_dict(ref_peft, adapters):
    """hotswap_adapter refuses DoRA files as PEFT does (their key `lora_magnitude_vector` has no
    `.weight`); a state dict with model keys swaps A, B and the magnitude."""
    from peft.utils.hotswap import hotswap_adapter as ref_swap

    with pytest.raises(KeyError) as ours:
        fast_hotswap.hotswap_adapter(_fast(adapters["dora0"]), adapters["dora1"], "default")
    with pytest.raises(KeyError) as theirs:
        ref_swap(_ref(ref_peft, adapters["dora0"]), adapters["dora1"], "default")
    assert str(ours.value) == str(theirs.value)

    fresh = _fast(adapters["dora1"])
    sd = {k: v for k, v in fresh.state_dict().items() if "lora_" in k}
    config = peft_fast.LoraConfig.from_pretrained(adapters["dora1"])
    model = _fast(adapters["dora0"])
    fast_hotswap.prepare_model_for_compiled_hotswap(model, target_rank=4)
    fast_hotswap.hotswap_adapter_from_state_dict(model, sd, "default", config)
    assert_close(_out(model), _out(fresh))


# ---------------------------------------------------------------- errors, as PEFT raises them
def _both_raise(ref_peft, make_call):
    """make_call(lib) -> zero-argument callable; both libraries raise the same type and message."""
    import peft.utils.hotswap as ref_hotswap

    errors = []
    for lib, hs in ((peft_fast, fast_hotswap), (ref_peft, ref_hotswap)):
        with pytest.raises(Exception) as info:
            make_call(lib, hs)()
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]
    return errors[0]


def _load(lib, path):
    return lib.PeftModel.from_pretrained(_net(), path)


@pytest.mark.parametrize("case", [
    "rslora", "dora", "unexpected_keys", "rank_above_target", "compiled", "check_compiled_value",
    "no_adapter", "merged", "peft_type", "ia3_only", "modules_to_save",
])
def test_errors_match_peft(ref_peft, adapters, case):
    def make_call(lib, hs):
        if case == "rslora":  # incompatible configs
            return lambda: hs.hotswap_adapter(_load(lib, adapters["r4a8"]), adapters["rslora"], "default")
        if case == "dora":
            return lambda: hs.hotswap_adapter(_load(lib, adapters["r4a8"]), adapters["dora0"], "default")
        if case == "unexpected_keys":  # the new adapter targets layers the old one does not
            return lambda: hs.hotswap_adapter(_load(lib, adapters["up_only"]), adapters["r4a8"], "default")
        if case == "rank_above_target":
            return lambda: hs.prepare_model_for_compiled_hotswap(_load(lib, adapters["r8a16"]), target_rank=4)
        if case == "compiled":
            return lambda: hs.prepare_model_for_compiled_hotswap(torch.compile(_load(lib, adapters["r4a8"])))
        if case == "check_compiled_value":
            return lambda: hs.prepare_model_for_compiled_hotswap(torch.compile(_load(lib, adapters["r4a8"])),
                                                                 check_compiled="maybe")
        if case == "no_adapter":
            return lambda: hs.prepare_model_for_compiled_hotswap(_net())
        if case == "merged":
            def call():
                model = _load(lib, adapters["r4a8"])
                model.merge_adapter()
                hs.hotswap_adapter(model, adapters["r4a8b"], "default")
            return call
        if case == "peft_type":
            return lambda: hs.check_hotswap_configs_compatible(
                lib.LoraConfig(), lib.IA3Config(target_modules=["up"]))
        if case == "ia3_only":
            return lambda: hs.check_hotswap_configs_compatible(
                lib.IA3Config(target_modules=["up"]), lib.IA3Config(target_modules=["up"]))
        if case == "modules_to_save":  # PEFT's KeyError on the saved copy's keys
            return lambda: hs.hotswap_adapter(_load(lib, adapters["mts0"]), adapters["mts1"], "default")
        raise AssertionError(case)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        err_type, _ = _both_raise(ref_peft, make_call)
    expected = {"unexpected_keys": RuntimeError, "modules_to_save": KeyError}.get(case, ValueError)
    assert err_type is expected


def test_config_check_accepts_different_rank_and_alpha():
    a = peft_fast.LoraConfig(r=4, lora_alpha=8)
    fast_hotswap.check_hotswap_configs_compatible(a, peft_fast.LoraConfig(r=16, lora_alpha=3))
    with pytest.raises(ValueError, match="for lora_dropout, 0.0 != 0.1"):
        fast_hotswap.check_hotswap_configs_compatible(a, peft_fast.LoraConfig(lora_dropout=0.1))


# ---------------------------------------------------------------- torch.compile: no recompilation
@contextlib.contextmanager
def _no_recompile():
    old = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        yield
    finally:
        torch._dynamo.config.error_on_recompile = old


def _counting_backend():
    graphs = []

    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):  # aot_eager, counting the graphs it is given
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend, graphs


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_compiled_model_does_not_recompile_after_hotswap(adapters, kind):
    """fullgraph=True: one graph; swapping smaller/larger ranks and other alphas changes the
    outputs to each new adapter's without a recompile (error_on_recompile would raise)."""
    torch._dynamo.reset()
    first, rest = ("r4a8", ["r2a3", "r8a16", "r4a5"]) if kind == "lora" else ("dora0", ["dora1"])
    model = _fast(adapters[first])
    fast_hotswap.prepare_model_for_compiled_hotswap(model, target_rank=8)
    backend, graphs = _counting_backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    assert_close(_out(compiled), _out(_fast(adapters[first])))
    assert len(graphs) == 1
    with _no_recompile():
        for name in rest:
            if kind == "lora":
                fast_hotswap.hotswap_adapter(compiled, adapters[name], "default")
            else:  # DoRA files go through the state dict (see test_dora_magnitude_swapped_from_state_dict)
                fresh = _fast(adapters[name])
                sd = {k: v for k, v in fresh.state_dict().items() if "lora_" in k}
                fast_hotswap.hotswap_adapter_from_state_dict(
                    compiled, sd, "default", peft_fast.LoraConfig.from_pretrained(adapters[name]))
            assert_close(_out(compiled), _out(_fast(adapters[name])), msg=name)
    assert len(graphs) == 1, f"recompiled: {len(graphs)} graphs"
    torch._dynamo.reset()


def test_compiled_same_rank_and_alpha_needs_no_preparation(adapters):
    """As in PEFT: equal ranks and alphas swap without prepare_model_for_compiled_hotswap."""
    torch._dynamo.reset()
    backend, graphs = _counting_backend()
    compiled = torch.compile(_fast(adapters["r4a8"]), backend=backend, fullgraph=True)
    _out(compiled)
    with _no_recompile():
        fast_hotswap.hotswap_adapter(compiled, adapters["r4a8b"], "default")
        assert_close(_out(compiled), _out(_fast(adapters["r4a8b"])))
    assert len(graphs) == 1
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_inductor_does_not_recompile_after_hotswap(adapters):
    """The same with the default backend (inductor, C++ on CPU): ~10 s of compiling."""
    torch._dynamo.reset()
    model = _fast(adapters["r4a8"])
    fast_hotswap.prepare_model_for_compiled_hotswap(model, target_rank=8)
    compiled = torch.compile(model, fullgraph=True)
    assert_close(_out(compiled), _out(_fast(adapters["r4a8"])))
    with _no_recompile():
        for name in ("r2a3", "r8a16"):
            fast_hotswap.hotswap_adapter(compiled, adapters[name], "default")
            assert_close(_out(compiled), _out(_fast(adapters[name])), msg=name)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_compiled_hotswap_on_gpu(adapters):
    """CUDA: the Triton kernels behind the custom ops, inductor around them, no recompile."""
    torch._dynamo.reset()
    x = _x().cuda()
    model = _fast(adapters["r4a8"]).cuda()
    fast_hotswap.prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert model.base_model.model.up.scaling["default"].is_cuda
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        compiled(x)
        with _no_recompile():
            for name in ("r2a3", "r8a16"):
                fast_hotswap.hotswap_adapter(compiled, adapters[name], "default", torch_device="cuda")
                expected = _fast(adapters[name]).cuda()(x)
                # fp32 Triton GEMMs may use TF32: a looser bound than the CPU table
                torch.testing.assert_close(compiled(x), expected, atol=2e-3, rtol=2e-3, msg=name)
    torch._dynamo.reset()


class EmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)

    def forward(self, ids):
        return self.lin(self.emb(ids))


def test_embedding_lora_refused_as_peft_does(ref_peft, tmp_path):
    """PEFT 0.21.2 takes the model itself for the LoRA layer of an Embedding key (its key has no
    `.weight`) and fails on `.scaling`; prepare_model_for_compiled_hotswap converts its scalings."""
    paths = []
    for seed in (1, 2):
        torch.manual_seed(0)
        model = peft_fast.get_peft_model(EmbNet(), peft_fast.LoraConfig(r=4, target_modules=["emb", "lin"]))
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_()
        paths.append(str(tmp_path / str(seed)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(paths[-1])

    def make_call(lib, hs):
        def call():
            torch.manual_seed(0)
            model = lib.PeftModel.from_pretrained(EmbNet(), paths[0])
            hs.prepare_model_for_compiled_hotswap(model)
            assert isinstance(model.base_model.model.emb.scaling["default"], torch.Tensor)
            hs.hotswap_adapter(model, paths[1], "default")
        return call

    err_type, msg = _both_raise(ref_peft, make_call)
    assert err_type is AttributeError and "scaling" in msg
