"""LoraConfig.trainable_token_indices (TrainableTokensWrapper / TrainableTokensLayer, issue #12)
against real peft: same wrapped modules and state-dict keys, same outputs and gradients (incl. a
tied GPT-2 LM head), same saved files both ways, merge/unload, adapter switching and deletion."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import peft_fast  # noqa: E402
from peft_fast.utils import AuxiliaryTrainingWrapper, TrainableTokensWrapper  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from conftest import build_tiny_model  # noqa: E402


class EmbLin(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 6)
        self.emb1 = nn.Embedding(40, 6)
        self.lin0 = nn.Linear(6, 3)

    def forward(self, x):
        return self.lin0(self.emb(x) + self.emb1(x))


def _pair(base, make_kwargs, adapter_name="default"):
    out = []
    for lib in (peft, peft_fast):
        torch.manual_seed(1)
        out.append(lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**make_kwargs()), adapter_name=adapter_name))
    return out


def _perturb(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn_like(p))


def _check_same(ref, fast, inputs):
    assert sorted(ref.state_dict()) == sorted(fast.state_dict())
    assert {n: p.requires_grad for n, p in ref.named_parameters()} == \
        {n: p.requires_grad for n, p in fast.named_parameters()}
    y_ref, y_fast = ref(**inputs), fast(**inputs)
    y_ref = getattr(y_ref, "logits", y_ref)
    y_fast = getattr(y_fast, "logits", y_fast)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    y_ref.square().mean().backward(), y_fast.square().mean().backward()
    g_ref = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    g_fast = {n: p.grad for n, p in fast.named_parameters() if p.grad is not None}
    assert sorted(g_ref) == sorted(g_fast)
    for n in g_ref:
        torch.testing.assert_close(g_fast[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)
    return y_fast.detach()


def test_dict_indices_outputs_gradients_files(tmp_path):
    torch.manual_seed(0)
    base = EmbLin()
    ref, fast = _pair(base, lambda: dict(target_modules=["lin0"], trainable_token_indices={"emb": [0, 3, 9], "emb1": [1]}))
    assert isinstance(fast.base_model.model.emb, TrainableTokensWrapper)
    assert isinstance(fast.base_model.model.emb, AuxiliaryTrainingWrapper)
    _perturb(ref), _perturb(fast)
    x = {"x": torch.randint(0, 40, (4, 5))}
    expected = _check_same(ref, fast, x)
    ref.save_pretrained(tmp_path / "ref"), fast.save_pretrained(tmp_path / "fast")
    t_ref = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    t_fast = load_file(tmp_path / "fast" / "adapter_model.safetensors")
    assert sorted(t_ref) == sorted(t_fast)
    assert "base_model.model.emb.token_adapter.trainable_tokens_delta" in t_fast
    for k in t_ref:
        assert torch.equal(t_ref[k], t_fast[k]), k
    loaded = peft_fast.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ref")
    torch.testing.assert_close(loaded(**x), expected, rtol=1e-5, atol=1e-6)
    loaded_ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fast")
    torch.testing.assert_close(loaded_ref(**x), expected, rtol=1e-5, atol=1e-6)
    # merge and unload writes the rows into the embedding
    merged = fast.merge_and_unload()
    assert isinstance(merged.emb, nn.Embedding)
    torch.testing.assert_close(merged(**x), expected, rtol=1e-5, atol=1e-6)


def test_tied_gpt2_lm_head_matches_peft():
    base = build_tiny_model("gpt2")
    ref, fast = _pair(base, lambda: dict(target_modules=["c_attn"], trainable_token_indices=[0, 5, 7]))
    lm_head = fast.base_model.model.lm_head
    assert isinstance(lm_head, TrainableTokensWrapper) and lm_head.token_adapter.tied_adapter is not None
    _perturb(ref), _perturb(fast)
    ids = {"input_ids": torch.randint(0, 50, (2, 6))}
    _check_same(ref, fast, ids)
    sd_ref = peft.get_peft_model_state_dict(ref)
    sd_fast = peft_fast.get_peft_model_state_dict(fast)
    assert sorted(sd_ref) == sorted(sd_fast)


def test_switching_disabling_deleting_match_peft():
    torch.manual_seed(0)
    base = EmbLin()
    models = _pair(base, lambda: dict(target_modules=["lin0"], trainable_token_indices={"emb": [0, 1]}))
    x = {"x": torch.randint(0, 40, (3, 4))}
    for model, lib in zip(models, (peft, peft_fast)):
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [2]}))
        _perturb(model)
    outs = []
    for model in models:
        res = []
        model.set_adapter("other")
        res.append(model(**x))
        res.append({n: p.requires_grad for n, p in model.named_parameters()})
        with model.disable_adapter():
            res.append(model(**x))
        model.set_adapter("default")
        res.append(model(**x))
        model.delete_adapter("default")
        res.append(model(**x))
        res.append(sorted(model.base_model.model.emb.token_adapter.trainable_tokens_delta))
        outs.append(res)
    for a, b in zip(*outs):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        else:
            assert a == b


def test_errors_match_peft():
    torch.manual_seed(0)
    base = EmbLin()
    for kwargs in (dict(target_modules=["lin0"], trainable_token_indices={"emb": [0]}, modules_to_save=["emb"]),
                   dict(target_modules=["lin0"], trainable_token_indices={"nope": [0]})):
        errs = []
        for lib in (peft, peft_fast):
            with pytest.raises(ValueError) as e:
                lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**kwargs))
            errs.append(str(e.value))
        assert errs[0] == errs[1]
    errs = []
    for lib in (peft, peft_fast):
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [0]}))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [0]}))
        with pytest.raises(ValueError) as e:
            model.base_model.set_adapter(["default", "other"])
        errs.append(str(e.value).split("(")[0])
    assert errs[0] == errs[1]


def test_mixed_adapter_batch_matches_peft():
    torch.manual_seed(0)
    base = EmbLin()
    x = torch.randint(0, 40, (4, 5))
    outs = []
    for lib in (peft, peft_fast):
        torch.manual_seed(1)
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(target_modules=["lin0"],
                                                                       trainable_token_indices={"emb": [0, 1]}))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [2, 3]}))
        _perturb(model)
        model.eval()
        with torch.no_grad():
            outs.append(model(x, adapter_names=["default", "other", "__base__", "other"]))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_mixed_adapter_batch_with_autograd_matches_peft():
    # an upstream trainable module (here modules_to_save) makes the LoRA input require grad: the
    # inference-only multi-LoRA op must step aside for PEFT's loop (same outputs and gradients)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    res = []
    for lib in (peft, peft_fast):
        torch.manual_seed(1)
        kw = dict(target_modules=["1"], modules_to_save=["0"], init_lora_weights=False)
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**kw))
        model.add_adapter("b", lib.LoraConfig(**kw))
        model.eval()
        y = model(torch.ones(3, 4), adapter_names=["default", "b", "__base__"])
        y.sum().backward()
        res.append((y.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(res[1][0], res[0][0])
    assert sorted(res[0][1]) == sorted(res[1][1])
    for n in res[0][1]:
        torch.testing.assert_close(res[1][1][n], res[0][1][n], msg=n)
