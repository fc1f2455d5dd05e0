"""Parity with Hugging Face PEFT for the layer types of issue #12: LoRA / DoRA / (IA)^3 on
nn.Conv3d, LoRA on nn.MultiheadAttention and DoRA on nn.Embedding.

Each case seeds the RNG identically, wraps a deep copy of one base model with peft and with
peft_fast, perturbs every adapter weight the same way (so nothing is compared on zeros: B != 0,
l != 1, m != ||W||) and compares: parameter names and initial weights, outputs, gradients of every
trainable parameter, merged / unmerged / merge_and_unload outputs and merged base weights, saved
adapter files (keys and values) and loading the other library's files.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import peft_fast  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from conftest import assert_close  # noqa: E402


class Conv3dModel(nn.Module):
    def __init__(self, groups: int = 1):
        super().__init__()
        self.conv3d = nn.Conv3d(4, 6, 3, groups=groups)
        self.lin0 = nn.Linear(6 * 8, 3)

    def forward(self, x):
        return self.lin0(torch.relu(self.conv3d(x)).flatten(1))


class MhaModel(nn.Module):
    def __init__(self, batch_first: bool = False):
        super().__init__()
        self.mha = nn.MultiheadAttention(12, 3, batch_first=batch_first)
        self.lin0 = nn.Linear(12, 3)

    def forward(self, x):
        y, _ = self.mha(x, x, x)
        return self.lin0(y)


class EmbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 7, padding_idx=0)
        self.lin0 = nn.Linear(7, 3)

    def forward(self, x):
        return self.lin0(self.emb(x))


class ScaledEmbedding(nn.Embedding):
    """An embedding that scales its output (as Gemma's), exposed as `embed_scale`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(2.5), persistent=False)

    def forward(self, x):
        return super().forward(x) * self.embed_scale


class ScaledEmbModel(EmbModel):
    def __init__(self):
        super().__init__()
        self.emb = ScaledEmbedding(50, 7)


def _inputs(model: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(123)
    if model == "conv3d" or model == "conv3d_groups":
        return torch.randn(2, 4, 4, 4, 4, generator=g).to(dtype)
    if model == "mha":
        return torch.randn(5, 2, 12, generator=g).to(dtype)  # [L, N, E]
    if model == "mha_bf":
        return torch.randn(2, 5, 12, generator=g).to(dtype)  # [N, L, E]
    return torch.randint(0, 50, (3, 6), generator=g)


BASES = {
    "conv3d": Conv3dModel,
    "conv3d_groups": lambda: Conv3dModel(groups=2),
    "mha": MhaModel,
    "mha_bf": lambda: MhaModel(batch_first=True),
    "emb": EmbModel,
    "emb_scaled": ScaledEmbModel,
}

# (id, base model, config class name, config kwargs, second adapter kwargs or None)
CASES = [
    ("lora-conv3d", "conv3d", "LoraConfig", dict(target_modules=["conv3d", "lin0"], lora_alpha=5), None),
    ("lora-conv3d-bias", "conv3d", "LoraConfig", dict(target_modules=["conv3d"], lora_bias=True), None),
    ("lora-conv3d-two", "conv3d", "LoraConfig", dict(target_modules=["conv3d"], r=3),
     dict(target_modules=["conv3d"], r=5, use_rslora=True)),
    ("dora-conv3d", "conv3d", "LoraConfig", dict(target_modules=["conv3d", "lin0"], use_dora=True), None),
    ("dora-conv3d-two", "conv3d", "LoraConfig", dict(target_modules=["conv3d"], use_dora=True, r=2),
     dict(target_modules=["conv3d"], use_dora=True, r=4)),
    ("ia3-conv3d", "conv3d", "IA3Config", dict(target_modules=["conv3d"], feedforward_modules=[]), None),
    ("ia3-conv3d-ff", "conv3d", "IA3Config", dict(target_modules=["conv3d", "lin0"], feedforward_modules=["conv3d"]),
     None),
    ("ia3-conv3d-ff-groups", "conv3d_groups", "IA3Config",
     dict(target_modules=["conv3d"], feedforward_modules=["conv3d"]), None),
    ("lora-mha", "mha", "LoraConfig", dict(target_modules=["mha"], lora_alpha=4), None),
    ("lora-mha-lin", "mha_bf", "LoraConfig", dict(target_modules=["mha", "lin0"], r=3), None),
    ("lora-mha-two", "mha", "LoraConfig", dict(target_modules=["mha"], r=2), dict(target_modules=["mha"], r=6)),
    ("dora-emb", "emb", "LoraConfig", dict(target_modules=["emb"], use_dora=True, lora_alpha=3), None),
    ("dora-emb-lin", "emb", "LoraConfig", dict(target_modules=["emb", "lin0"], use_dora=True), None),
    ("dora-emb-two", "emb", "LoraConfig", dict(target_modules=["emb"], use_dora=True, r=2),
     dict(target_modules=["emb"], use_dora=True, r=5)),
    ("dora-emb-plus-lora", "emb", "LoraConfig", dict(target_modules=["emb"], use_dora=True), dict(target_modules=["emb"])),
    ("dora-emb-scaled", "emb_scaled", "LoraConfig", dict(target_modules=["emb"], use_dora=True), None),
]


def _perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if any(k in name for k in ("lora_", "ia3_")):
                p.add_((torch.randn(p.shape, generator=g) * 0.3).to(p.dtype))


def _build(lib, case, dtype=torch.float32):
    _, base_name, cfg_name, kwargs, second = case
    torch.manual_seed(0)
    base = BASES[base_name]().to(dtype)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(copy.deepcopy(base), getattr(lib, cfg_name)(**kwargs))
        if second is not None:
            torch.manual_seed(2)
            model.add_adapter("other", getattr(lib, cfg_name)(**second))
            model.base_model.set_adapter(["default", "other"])
    _perturb(model, 7)
    return model


def _pair(case, dtype=torch.float32):
    return _build(peft, case, dtype), _build(peft_fast, case, dtype)


def _run(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(x)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_structure_outputs_gradients(case):
    ref, fast = _pair(case)
    ref_params, fast_params = dict(ref.named_parameters()), dict(fast.named_parameters())
    assert list(ref_params) == list(fast_params)
    for n, p in ref_params.items():
        q = fast_params[n]
        assert p.requires_grad == q.requires_grad, n
        assert p.dtype == q.dtype, n
        if "lin0.lora_magnitude_vector" in n:  # Linear DoRA: norm from the fused op's factored form
            assert_close(q, p, msg=n)
        else:
            assert torch.equal(p, q), n  # same RNG use when created, same norms
    assert list(ref.state_dict()) == list(fast.state_dict())
    x = _inputs(case[1])
    ref.train(), fast.train()
    y_ref, y_fast = _run(ref, x), _run(fast, x)
    assert_close(y_fast, y_ref, msg="output")
    y_ref.square().sum().backward()
    y_fast.square().sum().backward()
    for n, p in ref_params.items():
        if p.grad is None:
            assert fast_params[n].grad is None, n
            continue
        assert_close(fast_params[n].grad, p.grad, msg=f"grad {n}")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_merge_unmerge_unload(case):
    ref, fast = _pair(case)
    x = _inputs(case[1])
    ref.eval(), fast.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = fast(x)
        for safe in (False, True):
            ref.base_model.merge_adapter(safe_merge=safe)
            fast.base_model.merge_adapter(safe_merge=safe)
            assert_close(fast(x), ref(x), msg="merged")
            assert_close(fast(x), y, msg="merged vs unmerged")
            ref.unmerge_adapter(), fast.unmerge_adapter()
            assert_close(fast(x), y, msg="unmerged")
        with fast.disable_adapter(), ref.disable_adapter():
            assert_close(fast(x), ref(x), msg="disabled")
        ref_merged, fast_merged = ref.merge_and_unload(), fast.merge_and_unload()
    assert [type(m) for m in fast_merged.modules()] == [type(m) for m in ref_merged.modules()]
    ref_sd, fast_sd = ref_merged.state_dict(), fast_merged.state_dict()
    assert list(ref_sd) == list(fast_sd)
    for k in ref_sd:
        assert_close(fast_sd[k], ref_sd[k], msg=f"merged weight {k}")
    with torch.no_grad():
        assert_close(fast_merged(x), y, msg="merge_and_unload")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_save_load_cross(case, tmp_path):
    ref, fast = _pair(case)
    x = _inputs(case[1])
    ref.eval(), fast.eval()
    ref.save_pretrained(tmp_path / "ref")
    fast.save_pretrained(tmp_path / "fast")
    names = ["default"] + (["other"] if case[4] is not None else [])
    for name in names:
        sub = "" if name == "default" else name
        a = load_file(tmp_path / "ref" / sub / "adapter_model.safetensors")
        b = load_file(tmp_path / "fast" / sub / "adapter_model.safetensors")
        assert sorted(a) == sorted(b)
        for k in a:
            if "lin0.lora_magnitude_vector" in k:  # Linear DoRA: see test_structure_outputs_gradients
                assert_close(b[k], a[k], msg=k)
            else:
                assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        y_ref = _run(ref, x)
    # each library loads the other's files and reproduces the output
    for lib, src in ((peft_fast, "ref"), (peft, "fast")):
        torch.manual_seed(0)
        base = BASES[case[1]]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = lib.PeftModel.from_pretrained(base, tmp_path / src)
            if case[4] is not None:
                loaded.load_adapter(tmp_path / src / "other", adapter_name="other")
                loaded.base_model.set_adapter(["default", "other"])
        loaded.eval()
        with torch.no_grad():
            assert_close(_run(loaded, x), y_ref, msg=f"{lib.__name__} loading {src}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case_id", ["lora-conv3d", "dora-conv3d", "ia3-conv3d-ff", "lora-mha", "dora-emb"])
def test_half_precision(case_id, dtype):
    case = next(c for c in CASES if c[0] == case_id)
    ref, fast = _pair(case, dtype)
    x = _inputs(case[1], dtype)
    ref.eval(), fast.eval()
    with torch.no_grad():
        assert_close(_run(fast, x), _run(ref, x), dtype=dtype, msg="output")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.merge_adapter(), fast.merge_adapter()
        assert_close(_run(fast, x), _run(ref, x), dtype=dtype, msg="merged")


def test_mha_refusals_and_attributes():
    base = MhaModel()
    with pytest.raises(ValueError, match=r"MultiheadAttention does not support DoRA \(yet\), please set use_dora"):
        peft_fast.get_peft_model(copy.deepcopy(base), peft_fast.LoraConfig(target_modules=["mha"], use_dora=True))

    class KV(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(12, 3, kdim=5, vdim=6)

    with pytest.raises(ValueError, match="Only same embed for query/key/value is supported"):
        peft_fast.get_peft_model(KV(), peft_fast.LoraConfig(target_modules=["mha"]))
    model = peft_fast.get_peft_model(base, peft_fast.LoraConfig(target_modules=["mha"]))
    layer = model.base_model.model.mha
    inner = layer.get_base_layer()
    assert (layer.embed_dim, layer.num_heads, layer.head_dim, layer.batch_first) == (12, 3, 4, False)
    assert layer.in_proj_weight is inner.in_proj_weight and layer.out_proj is inner.out_proj.get_base_layer()
    x = _inputs("mha")
    model.eval()
    with pytest.raises(TypeError, match="lora.MultiheadAttention does not support mixed adapter batches"):
        model(x, adapter_names=["default"] * 2)
    # forward leaves the registered base parameters untouched (same objects, frozen, same order)
    before = [(n, id(p), p.requires_grad) for n, p in model.named_parameters()]
    model.train()
    model(x).sum().backward()
    assert [(n, id(p), p.requires_grad) for n, p in model.named_parameters()] == before
    assert inner.in_proj_weight.grad is None and "in_proj_weight" not in inner.__dict__
    unloaded = model.unload()
    assert type(unloaded.mha) is nn.MultiheadAttention and type(unloaded.mha.out_proj) is not type(layer)
    assert isinstance(unloaded.mha.in_proj_weight, nn.Parameter)


def test_dora_embedding_mixed_batch_refused():
    model = peft_fast.get_peft_model(EmbModel(), peft_fast.LoraConfig(target_modules=["emb"], use_dora=True)).eval()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        model(_inputs("emb"), adapter_names=["default"] * 3)
