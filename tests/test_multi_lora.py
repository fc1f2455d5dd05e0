"""Mixed-adapter batches (`adapter_names=[...]`, one name per sample, "__base__" for none)
against real peft's mixed batch, and the multi-LoRA op against a per-token loop."""
from __future__ import annotations

import copy

import pytest
import torch

import peft_fast
from peft_fast.triton_kernels.multi_lora import lora_mixed_ref, segments_ref


def per_token_loop(x, A, B, s, idx, out):
    out = out.clone().double()
    for t in range(x.shape[0]):
        i = int(idx[t])
        if i >= 0:
            out[t] += float(s[i]) * (x[t].double() @ A[i].double().t() @ B[i].double().t())
    return out


@pytest.mark.parametrize("T,n", [(0, 3), (7, 1), (100, 3), (64, 17)])
def test_lora_mixed_ref_matches_per_token_loop(T, n):
    torch.manual_seed(T + n)
    K, N, R = 40, 24, 16
    x, A, B = torch.randn(T, K), torch.randn(n, R, K), torch.randn(n, N, R)
    s = torch.rand(n)
    idx = torch.randint(-1, n, (T,))
    out = torch.randn(T, N)
    got = lora_mixed_ref(x, A, B, s, idx, out.clone())
    torch.testing.assert_close(got.double(), per_token_loop(x, A, B, s, idx, out), rtol=1e-5, atol=1e-5)


def test_segments_ref_groups_tokens_stably():
    idx = torch.tensor([2, -1, 0, 2, -1, 1, 0])
    order, starts, counts = segments_ref(idx, 4)
    assert order.tolist() == [1, 4, 2, 6, 5, 0, 3]
    assert counts.tolist() == [2, 1, 2, 0] and starts.tolist() == [2, 4, 5, 7]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=80, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _multi(lib, base, n_adapters):
    """n adapters of different ranks (1..), different targets for some, nonzero B."""
    model = None
    for i in range(n_adapters):
        r = [1, 4, 8, 16, 2, 3][i % 6]
        targets = "all-linear" if i % 3 else ["q_proj", "v_proj", "down_proj"]
        cfg = lib.LoraConfig(r=r, lora_alpha=2 * r + i, target_modules=targets, init_lora_weights="gaussian")
        torch.manual_seed(100 + i)
        if model is None:
            model = lib.get_peft_model(copy.deepcopy(base), cfg, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(sum(map(ord, n)))) * 0.2)
    return model.eval()


@pytest.mark.parametrize("n_adapters", [1, 3, 17])
def test_mixed_batch_matches_peft(n_adapters):
    import peft

    base = _tiny_llama()
    names = [f"a{i % n_adapters}" for i in range(2 * n_adapters)] + ["__base__", "a0", "__base__"]
    ids = torch.randint(0, 80, (len(names), 6), generator=torch.Generator().manual_seed(1))
    outs = []
    for lib in (peft, peft_fast):
        m = _multi(lib, base, n_adapters)
        with torch.no_grad():
            outs.append(m(input_ids=ids, adapter_names=names).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    # and each row equals that adapter alone
    m = _multi(peft_fast, base, n_adapters)
    with torch.no_grad():
        for row, name in [(0, names[0]), (len(names) - 1, "__base__"), (n_adapters - 1, names[n_adapters - 1])]:
            if name == "__base__":
                with m.disable_adapter():
                    ref = m(input_ids=ids[row:row + 1]).logits
            else:
                m.set_adapter(name)
                ref = m(input_ids=ids[row:row + 1]).logits
            torch.testing.assert_close(outs[1][row:row + 1], ref, rtol=1e-4, atol=1e-5)


def test_mixed_batch_uses_the_multi_lora_op(monkeypatch):
    from peft_fast import ops

    calls = []
    real = ops.lora_mixed
    monkeypatch.setattr(ops, "lora_mixed", lambda *a: calls.append(1) or real(*a))
    m = _multi(peft_fast, _tiny_llama(), 3)
    with torch.no_grad():
        m(input_ids=torch.randint(0, 80, (4, 5)), adapter_names=["a0", "a1", "__base__", "a2"])
    assert len(calls) == 14  # every targeted projection of both layers: one call each, not one per adapter


def test_generate_with_adapter_names_matches_peft():
    import peft

    base = _tiny_llama()
    names = ["a0", "__base__", "a2", "a1"]
    ids = torch.randint(0, 80, (4, 5), generator=torch.Generator().manual_seed(2))
    gens = []
    for lib in (peft, peft_fast):
        m = _multi(lib, base, 3)
        gens.append(m.generate(input_ids=ids, adapter_names=names, max_new_tokens=6, do_sample=False, pad_token_id=0))
    assert torch.equal(gens[0], gens[1])


def test_mixed_batch_errors():
    m = _multi(peft_fast, _tiny_llama(), 2)
    ids = torch.randint(0, 80, (2, 4))
    with pytest.raises(ValueError, match="non-existing adapter"):
        m(input_ids=ids, adapter_names=["a0", "nope"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        m(input_ids=ids, adapter_names=["a0"])
    m.train()
    with pytest.raises(ValueError, match="training mode"):
        m(input_ids=ids, adapter_names=["a0", "a1"])
    ia3 = peft_fast.get_peft_model(_tiny_llama(), peft_fast.IA3Config(target_modules=["k_proj"],
                                                                       feedforward_modules=[])).eval()
    with pytest.raises(ValueError, match="LoRA adapters only.*'default'"):
        ia3(input_ids=ids, adapter_names=["default", "__base__"])
    dora = peft_fast.get_peft_model(_tiny_llama(), peft_fast.LoraConfig(r=2, use_dora=True,
                                                                          target_modules=["q_proj"])).eval()
    with pytest.raises(ValueError, match="DoRA"):
        dora(input_ids=ids, adapter_names=["default", "__base__"])
