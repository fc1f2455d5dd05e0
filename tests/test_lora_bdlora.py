"""BD-LoRA (LoraConfig(use_bdlora=BdLoraConfig(...)), issue #12) against real peft: same seeds ->
same packed block weights, same outputs and gradients (block-diagonal A, B, both, several blocks,
rslora, several adapters, mixed-adapter batches), same saved files and cross-loading, merges,
PEFT's errors; the forward goes through the fused LoRA op with the dense block-diagonal factors."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from conftest import assert_close

peft = pytest.importorskip("peft")
import peft_fast  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(12, 24)
        self.down_proj = nn.Linear(24, 8)
        self.head = nn.Linear(8, 3)
        self.emb = nn.Embedding(10, 12)

    def forward(self, x):
        return self.head(torch.relu(self.down_proj(torch.relu(self.up_proj(x)))))


@pytest.fixture
def base():
    torch.manual_seed(0)
    return MLP()


CASES = {
    "A": dict(target_modules_bd_a=["up_proj"], nblocks=2, match_strict=False),
    "B": dict(target_modules_bd_b=["down_proj"], nblocks=4, match_strict=False),
    "both": dict(target_modules_bd_a=["down_proj"], target_modules_bd_b=["up_proj"], nblocks=4),
    "one_block": dict(target_modules_bd_a=["up_proj", "down_proj"], nblocks=1),
}


def _config(lib, case, **kw):
    kw.setdefault("target_modules", ["up_proj", "down_proj"])
    kw.setdefault("r", 8)
    return lib.LoraConfig(use_bdlora=lib.tuners.lora.config.BdLoraConfig(**CASES[case]), **kw)


def _build(lib, base, case, **kw):
    torch.manual_seed(1)
    model = lib.get_peft_model(copy.deepcopy(base), _config(lib, case, **kw))
    torch.manual_seed(5)  # B starts at zero: give every factor values
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _train(model, steps=2, seed=2, dtype=torch.float32):
    model.train()
    torch.manual_seed(seed)
    x = torch.randn(3, 5, 12).to(dtype)
    outs = []
    for step in range(steps):
        y = model(x + step)
        y.float().pow(2).mean().backward()
        outs.append(y.detach())
    return outs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_training(ref, fast, **kw):
    (ro, rg), (fo, fg) = _train(ref, **kw), _train(fast, **kw)
    for a, b in zip(fo, ro):
        assert_close(a, b)
    assert fg.keys() == rg.keys()
    for k in rg:
        assert fg[k].shape == rg[k].shape
        assert_close(fg[k], rg[k])


@pytest.mark.parametrize("case", sorted(CASES))
def test_init_outputs_gradients_match_peft(base, case):
    torch.manual_seed(1)
    ref0 = peft.get_peft_model(copy.deepcopy(base), _config(peft, case))
    torch.manual_seed(1)
    fast0 = peft_fast.get_peft_model(copy.deepcopy(base), _config(peft_fast, case))
    rs, fs = ref0.state_dict(), fast0.state_dict()
    assert fs.keys() == rs.keys()
    for k in rs:  # same packed shapes, same initial values (same random stream)
        assert fs[k].shape == rs[k].shape
        assert torch.equal(fs[k], rs[k]), k
    _assert_same_training(_build(peft, base, case), _build(peft_fast, base, case))


def test_rslora_and_dropout(base):
    _assert_same_training(_build(peft, base, "both", use_rslora=True), _build(peft_fast, base, "both", use_rslora=True))
    # the fused op draws its own dropout masks (as for plain LoRA): same eval outputs, masks in training
    ref, fast = _build(peft, base, "both", lora_dropout=0.25), _build(peft_fast, base, "both", lora_dropout=0.25)
    x = torch.randn(64, 12)
    with torch.no_grad():
        assert_close(fast.eval()(x), ref.eval()(x))
        assert not torch.allclose(fast.train()(x), fast.eval()(x))


def test_forward_takes_the_fused_op_with_dense_factors(base, monkeypatch):
    from peft_fast.tuners.lora import layer as layer_mod

    seen = []
    fused = layer_mod.lora_linear

    def spy(x, w, b, As, Bs, *a, **k):
        seen.append(([tuple(t.shape) for t in As], [tuple(t.shape) for t in Bs]))
        return fused(x, w, b, As, Bs, *a, **k)

    monkeypatch.setattr(layer_mod, "lora_linear", spy)
    model = _build(peft_fast, base, "both")
    model.train()
    model(torch.randn(2, 12)).sum().backward()
    assert seen == [([(8, 12)], [(24, 8)]), ([(8, 24)], [(8, 8)])]
    layer = model.base_model.model.up_proj
    assert tuple(layer.lora_B["default"].weight.shape) == (24, 2)  # packed: out x r / nblocks
    assert layer.lora_B["default"].weight.grad is not None


def test_several_adapters_and_mixed_batch(base):
    def build(lib):
        m = _build(lib, base, "A")
        torch.manual_seed(7)
        m.add_adapter("other", _config(lib, "B"))
        with torch.no_grad():
            for n, p in sorted(m.named_parameters()):
                if "lora_" in n and ".other." in n:
                    p.add_(torch.randn_like(p) * 0.2)
        return m

    ref, fast = build(peft), build(peft_fast)
    ref.eval(), fast.eval()
    x = torch.randn(4, 12)
    names = ["default", "other", "__base__", "other"]
    with torch.no_grad():
        assert_close(fast(x, adapter_names=names), ref(x, adapter_names=names))
        for lib_model in (ref, fast):
            lib_model.base_model.set_adapter(["default", "other"])
        assert_close(fast(x), ref(x))


@pytest.mark.parametrize("case", ["A", "both"])
def test_merge_unmerge_as_peft(base, case):
    ref, fast = _build(peft, base, case).eval(), _build(peft_fast, base, case).eval()
    x = torch.randn(4, 12)
    with torch.no_grad():
        expected = ref(x)
        for lib_model in (ref, fast):
            lib_model.merge_adapter()
        assert_close(fast.base_model.model.up_proj.base_layer.weight, ref.base_model.model.up_proj.base_layer.weight)
        assert_close(fast(x), expected)
        fast.unmerge_adapter()
        assert_close(fast(x), expected)
        layer = fast.base_model.model.down_proj
        assert_close(layer.get_delta_weight("default"),
                     ref.base_model.model.down_proj.lora_variant["default"]._get_bdlora_delta_weight(
                         ref.base_model.model.down_proj, "default"))
        assert_close(fast.merge_and_unload()(x), expected)


def test_16bit_model(base):
    def build(lib):
        torch.manual_seed(1)
        return lib.get_peft_model(copy.deepcopy(base).to(torch.bfloat16), _config(lib, "both"),
                                  autocast_adapter_dtype=False)

    ref, fast = build(peft), build(peft_fast)
    assert fast.base_model.model.up_proj.lora_B["default"].weight.dtype == torch.bfloat16
    _assert_same_training(ref, fast, dtype=torch.bfloat16)


def test_saved_files_match_and_cross_load(base, tmp_path):
    ref, fast = _build(peft, base, "both"), _build(peft_fast, base, "both")
    ref.save_pretrained(tmp_path / "ref")
    fast.save_pretrained(tmp_path / "fast")
    rf = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    ff = load_file(tmp_path / "fast" / "adapter_model.safetensors")
    assert sorted(ff) == sorted(rf)
    for k in rf:
        assert ff[k].shape == rf[k].shape
        assert_close(ff[k], rf[k])
    with open(tmp_path / "ref" / "adapter_config.json") as f:
        rc = json.load(f)
    with open(tmp_path / "fast" / "adapter_config.json") as f:
        fc = json.load(f)
    assert fc["use_bdlora"] == rc["use_bdlora"]
    x = torch.randn(3, 12)
    loaded = peft_fast.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ref").eval()
    assert isinstance(loaded.peft_config["default"].use_bdlora, peft_fast.BdLoraConfig)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fast").eval()
    with torch.no_grad():
        assert_close(loaded(x), ref.eval()(x))
        assert_close(back(x), loaded(x))


def test_errors_as_peft(base):
    def both(make):
        with pytest.raises(ValueError) as r:
            make(peft)
        with pytest.raises(ValueError) as f:
            make(peft_fast)
        assert str(f.value) == str(r.value)

    bd = lambda lib, **kw: lib.tuners.lora.config.BdLoraConfig(**kw)  # noqa: E731
    both(lambda lib: bd(lib, target_modules_bd_a=["x", "y"], target_modules_bd_b=["y"]))
    both(lambda lib: lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(
        target_modules=["up_proj", "head"], use_bdlora=bd(lib, target_modules_bd_a=["up_proj"]))))  # strict
    both(lambda lib: lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(
        target_modules=["up_proj"], use_bdlora=bd(lib, target_modules_bd_a=["up"], target_modules_bd_b=["proj"]))))
    both(lambda lib: lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(
        target_modules=["up_proj"], r=6, use_bdlora=bd(lib, target_modules_bd_b=["up_proj"], nblocks=4))))
    both(lambda lib: lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(
        target_modules=["emb"], use_bdlora=bd(lib, target_modules_bd_a=["emb"]))))


def test_block_diagonal_linear_as_peft():
    from peft.tuners.lora.variants import BlockDiagonalLinear as Ref

    from peft_fast.tuners.lora.variants import BlockDiagonalLinear

    torch.manual_seed(0)
    ref = Ref(12, 8, nblocks=4)
    torch.manual_seed(0)
    fast = BlockDiagonalLinear(12, 8, nblocks=4)
    assert torch.equal(fast.weight, ref.weight)
    x = torch.randn(2, 3, 12)
    assert torch.equal(fast(x), ref(x))
    assert torch.equal(fast.weight_as_blockdiagonal_matrix(), ref.weight_as_blockdiagonal_matrix())
