"""Grouped convolutions and hot-swap scalings (issue #11).

- LoRA on a grouped conv warns at creation and refuses to merge with PEFT's texts, before any
  layer is merged; a rank not divisible by groups is refused with PEFT's text.
- DoRA on grouped Conv1d/Conv2d runs with PEFT's numbers (magnitudes, outputs, gradients).
- hotswap_adapter uses the new adapter's per-module rank/alpha patterns (peft 0.21.2 matches
  them against parameter keys, so `rank_pattern={"lin1": 4}` with alpha 9, r 8 scales lin1 by
  9/8 instead of 9/4), and the model's config follows the swap so save + reload gives the same outputs.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peft_fast
from peft_fast.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

peft = pytest.importorskip("peft")

GROUP_WARNING = "LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported."
MERGE_ERROR = "Merging is not supported for _ConvNd layers with groups > 1!"


class ConvNet(nn.Module):
    """A plain conv, then a grouped one: x [B, 4, H, W] (or [B, 4, L] in 1-D)."""

    def __init__(self, dim: int = 2):
        super().__init__()
        conv = nn.Conv2d if dim == 2 else nn.Conv1d
        self.plain = conv(4, 4, 1)
        self.grouped = conv(4, 4, 3, groups=2)
        self.grouped1x1 = conv(4, 6, 1, groups=2)

    def forward(self, x):
        return self.grouped1x1(torch.tanh(self.grouped(self.plain(x))))


def _conv_model(lib, dim=2, targets=("plain", "grouped", "grouped1x1"), **kw):
    torch.manual_seed(0)
    net = ConvNet(dim)
    torch.manual_seed(1)
    return lib.get_peft_model(net, lib.LoraConfig(r=2, lora_alpha=4, target_modules=list(targets),
                                                  init_lora_weights=False, **kw))


def _conv_x(dim=2):
    shape = (3, 4, 7, 6) if dim == 2 else (3, 4, 9)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("lib", [peft, peft_fast], ids=["peft", "peft_fast"])
def test_grouped_conv_warns_at_creation(lib):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _conv_model(lib, targets=["grouped"])
    assert [str(w.message) for w in caught if "groups" in str(w.message)] == [GROUP_WARNING]


@pytest.mark.parametrize("call", ["merge_and_unload", "merge_adapter", "layer"])
def test_grouped_conv_merge_is_refused_before_anything_merges(call):
    pm = _conv_model(peft_fast)
    weights = {n: p.detach().clone() for n, p in pm.named_parameters()}
    modules = [type(m) for m in pm.modules()]
    with pytest.raises(NotImplementedError, match=MERGE_ERROR.replace("!", "")):
        if call == "layer":
            pm.base_model.model.grouped.merge()
        else:
            getattr(pm, call)()
    for n, p in pm.named_parameters():  # the plain conv, first in order, was not merged either
        assert torch.equal(p, weights[n]), n
    assert [type(m) for m in pm.modules()] == modules
    assert not any(getattr(m, "merged", False) for m in pm.modules())


def test_grouped_conv_merge_error_matches_peft():
    ref = _conv_model(peft, targets=["grouped"])
    with pytest.raises(NotImplementedError) as info:
        ref.merge_and_unload()
    assert str(info.value) == MERGE_ERROR


def test_rank_not_divisible_by_groups_matches_peft():
    errors = []
    for lib in (peft, peft_fast):
        with pytest.raises(ValueError) as info:
            torch.manual_seed(0)
            lib.get_peft_model(ConvNet(), lib.LoraConfig(r=3, target_modules=["grouped"]))
        errors.append(str(info.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("targets", [("grouped",), ("plain", "grouped", "grouped1x1")], ids=["grouped", "all"])
def test_dora_on_grouped_conv_matches_peft(dim, targets):
    ref = _conv_model(peft, dim, targets, use_dora=True)
    fast = _conv_model(peft_fast, dim, targets, use_dora=True)
    ref_sd = ref.state_dict()
    for k, v in fast.state_dict().items():  # same init: magnitudes computed the same way
        torch.testing.assert_close(v, ref_sd[k], rtol=1e-6, atol=1e-7, msg=k)
    with torch.no_grad():  # move the magnitudes off their init so the norm matters
        for m in (ref, fast):
            for n, p in m.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1.1)
    x = _conv_x(dim)
    y_ref, y_fast = ref(x), fast(x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    (y_ref * torch.arange(y_ref.numel()).reshape(y_ref.shape).sin()).sum().backward()
    (y_fast * torch.arange(y_fast.numel()).reshape(y_fast.shape).sin()).sum().backward()
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    grads_fast = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    assert sorted(grads_fast) == sorted(grads_ref)
    for n, g in grads_fast.items():
        torch.testing.assert_close(g, grads_ref[n], rtol=1e-5, atol=1e-6, msg=n)


# --------------------------------------------------------------------------------------------
# hot-swap: per-module patterns and saving afterwards
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(6, 10)
        self.lin1 = nn.Linear(10, 10)
        self.lin2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(torch.tanh(self.lin0(x)))))


def _mlp():
    torch.manual_seed(0)
    return MLP()


def _save_adapter(tmp_path, name, seed, **kw) -> str:
    torch.manual_seed(seed)
    cfg = peft_fast.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False, **kw)
    path = str(tmp_path / name)
    peft_fast.get_peft_model(_mlp(), cfg).save_pretrained(path)
    return path


_X = torch.randn(5, 6, generator=torch.Generator().manual_seed(9))


@torch.no_grad()
def _out(path) -> torch.Tensor:
    return peft_fast.PeftModel.from_pretrained(_mlp(), path)(_X)


@pytest.fixture
def paths(tmp_path):
    return {
        "r8a8": _save_adapter(tmp_path, "r8a8", 1, r=8, lora_alpha=8),
        "pattern": _save_adapter(tmp_path, "pattern", 2, r=8, lora_alpha=9, rank_pattern={"lin1": 4}),
        "r8a20": _save_adapter(tmp_path, "r8a20", 3, r=8, lora_alpha=20),
        "r4a6": _save_adapter(tmp_path, "r4a6", 4, r=4, lora_alpha=6),
    }


@torch.no_grad()
def test_hotswap_uses_per_module_rank_pattern(paths):
    pm = peft_fast.PeftModel.from_pretrained(_mlp(), paths["r8a8"])
    hotswap_adapter(pm, paths["pattern"], "default", torch_device="cpu")
    assert pm.base_model.model.lin1.scaling["default"] == pytest.approx(9 / 4)
    assert pm.base_model.model.lin0.scaling["default"] == pytest.approx(9 / 8)
    torch.testing.assert_close(pm(_X), _out(paths["pattern"]))


@torch.no_grad()
@pytest.mark.parametrize("sequence", [["r8a20"], ["pattern"], ["pattern", "r8a20"], ["r4a6", "r8a20"]])
def test_save_after_hotswap_reloads_the_same_outputs(paths, tmp_path, sequence):
    pm = peft_fast.PeftModel.from_pretrained(_mlp(), paths["r8a8"])
    for name in sequence:  # chains too: the synced config stays compatible with later swaps
        hotswap_adapter(pm, paths[name], "default", torch_device="cpu")
        torch.testing.assert_close(pm(_X), _out(paths[name]))
    pm.save_pretrained(str(tmp_path / "after"))
    torch.testing.assert_close(_out(str(tmp_path / "after")), pm(_X))


@torch.no_grad()
def test_save_after_hotswap_into_padded_model_reloads_the_same_outputs(paths, tmp_path):
    pm = peft_fast.PeftModel.from_pretrained(_mlp(), paths["r4a6"])
    prepare_model_for_compiled_hotswap(pm, target_rank=8, config=pm.peft_config)
    hotswap_adapter(pm, paths["r4a6"], "default", torch_device="cpu")
    torch.testing.assert_close(pm(_X), _out(paths["r4a6"]))
    pm.save_pretrained(str(tmp_path / "padded"))
    torch.testing.assert_close(_out(str(tmp_path / "padded")), pm(_X))
