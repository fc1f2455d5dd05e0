"""Mixed-precision training parity with real peft on tiny models: torch.autocast (bf16, fp16)
around fp32 models, 16-bit models without autocast, fp16 with GradScaler, torch.compile under
autocast, QLoRA and mixed-adapter batches under autocast, and transformers' Trainer(bf16=True).

Autocast runs the math in 16 bits, so peft and peft_fast differ by rounding: each is compared
with the same model run in fp64 (no autocast), and peft_fast's error must stay within 2x peft's
error plus the dtype's tolerance (DESIGN.md); output and gradient dtypes must equal peft's.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peft_fast
from conftest import build_tiny_model, forward_with_loss, make_batch, tolerance

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

AUTOCAST = [torch.bfloat16, torch.float16]
IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
LLAMA_IA3 = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
GPT2_IA3 = dict(target_modules=["c_attn", "c_fc", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)
GPT2_LORA = dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
BERT_IA3 = dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
BERT_LORA = dict(target_modules=["query", "key", "value", "dense"])
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}

# p = 1e-9: the dropout code path (masks, keep scale) runs but keeps everything: comparable with peft
METHODS = {
    "lora": dict(r=4, lora_alpha=8),
    "lora-dropout-path": dict(r=4, lora_alpha=8, lora_dropout=1e-9),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "dora-dropout-path": dict(r=4, lora_alpha=8, use_dora=True, lora_dropout=1e-9),  # PEFT's composite formula
    "ia3": {},
}


def make_config(lib, kind, method):
    if method == "ia3":
        return lib.IA3Config(task_type=TASK[kind], **{"llama": LLAMA_IA3, "gpt2": GPT2_IA3, "bert": BERT_IA3}[kind])
    targets = {"llama": dict(target_modules="all-linear"), "gpt2": GPT2_LORA, "bert": BERT_LORA}[kind]
    return lib.LoraConfig(task_type=TASK[kind], **targets, **METHODS[method])


def randomise(model, seed=0):
    """Nonzero B, non-unit IA3 vectors and DoRA magnitudes, identical in both libraries."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            g = torch.Generator().manual_seed(seed + sum(map(ord, n)))
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if "lora_B" in n:
                p.copy_(noise * 0.1)
            elif "ia3_l" in n or "magnitude" in n:
                p.mul_(1 + 0.2 * noise)


def build(lib, kind, method, dtype=torch.float32, device="cpu"):
    base = build_tiny_model(kind, dtype).to(device)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = lib.get_peft_model(base, make_config(lib, kind, method))
    randomise(m)
    return m.train()


def step(model, batch, ac_dtype=None):
    """(logits, loss, {trainable name: grad}) of one forward/backward, under autocast(ac_dtype)."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    if ac_dtype is None:
        logits, loss = forward_with_loss(model, batch)
    else:
        with torch.autocast(device.type, dtype=ac_dtype):
            logits, loss = forward_with_loss(model, batch)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_as_accurate_as_peft(fast, ref, exact, dtype, what):
    """|fast - exact| <= 2 |ref - exact| + atol(dtype) * max|exact|, and same dtype as peft's. The
    slack is relative to the tensor's own scale, so tiny gradients (which fp16 can underflow) are
    held to the same relative accuracy as large ones."""
    assert fast.dtype == ref.dtype, f"{what}: dtype {fast.dtype} != peft's {ref.dtype}"
    assert torch.isfinite(fast.float()).all(), f"{what}: non-finite"
    err = (fast.double() - exact.double()).abs().max().item()
    base = (ref.double() - exact.double()).abs().max().item()
    atol = tolerance(dtype)["atol"] * exact.abs().max().item()
    assert err <= 2 * base + atol, f"{what}: error {err:.3e} > 2 x peft's {base:.3e} + {atol:.1e}"


def compare_with_peft(kind, method, ac_dtype=None, model_dtype=torch.float32, device="cpu"):
    """peft_fast vs peft in the given precision, both against peft's fp64 run."""
    batch = make_batch(kind)
    ref_model = build(peft, kind, method, model_dtype, device)
    exact_model = copy.deepcopy(ref_model).double()
    fast_model = build(peft_fast, kind, method, model_dtype, device)
    lr, Lr, gr = step(ref_model, batch, ac_dtype)
    lf, Lf, gf = step(fast_model, batch, ac_dtype)
    le, Le, ge = step(exact_model, batch)
    dtype = ac_dtype or model_dtype
    assert_as_accurate_as_peft(lf, lr, le, dtype, "logits")
    assert_as_accurate_as_peft(Lf, Lr, Le, dtype, "loss")
    assert set(gf) == set(gr) and gr
    for k in gr:
        assert gr[k] is not None and gf[k] is not None, k
        assert_as_accurate_as_peft(gf[k], gr[k], ge[k], dtype, k)
    return fast_model


@pytest.mark.parametrize("ac", AUTOCAST, ids=IDS.get)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_autocast_parity_with_peft(kind, method, ac):
    compare_with_peft(kind, method, ac_dtype=ac)


@pytest.mark.parametrize("dtype", AUTOCAST, ids=IDS.get)
@pytest.mark.parametrize("method", list(METHODS))
def test_16bit_model_parity_with_peft(method, dtype):
    """A bf16/fp16 model without autocast; adapters in fp32 as PEFT's autocast_adapter_dtype."""
    m = compare_with_peft("llama", method, model_dtype=dtype)
    adapter = [p for n, p in m.named_parameters() if p.requires_grad]
    assert adapter and all(p.dtype == torch.float32 for p in adapter)


@pytest.mark.parametrize("ac", AUTOCAST, ids=IDS.get)
def test_autocast_with_real_dropout_trains(ac):
    """p = 0.3: masks differ from peft's, so check dtypes as peft's and that every adapter
    weight gets a finite, nonzero gradient."""
    batch = make_batch("llama")
    outs = {}
    for lib in (peft, peft_fast):
        base = build_tiny_model("llama")
        m = lib.get_peft_model(base, lib.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear"))
        randomise(m)
        outs[lib] = step(m.train(), batch, ac)
    (lr, Lr, gr), (lf, Lf, gf) = outs[peft], outs[peft_fast]
    assert lf.dtype == lr.dtype and Lf.dtype == Lr.dtype and set(gf) == set(gr)
    for k, g in gf.items():
        assert g.dtype == gr[k].dtype and torch.isfinite(g).all() and g.abs().sum() > 0, k


def test_fp16_autocast_with_grad_scaler_trains_like_peft():
    """fp16 autocast + torch.amp.GradScaler + SGD for a few steps (SGD: weights move linearly in the
    gradients, so they stay comparable): the same losses and adapter weights as peft within fp16
    tolerance, and the scaler skips the same steps (a high init scale with quick growth makes some steps overflow)."""
    batch = make_batch("llama")
    runs = {}
    for lib in (peft, peft_fast):
        m = build(lib, "llama", "lora")
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 17, growth_interval=2)
        losses, scales = [], []
        for _ in range(8):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = m(**batch).loss
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
            scales.append(scaler.get_scale())
        runs[lib] = (losses, scales, {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
    (lr, sr, wr), (lf, sf, wf) = runs[peft], runs[peft_fast]
    assert sf == sr, f"GradScaler scales differ: {sf} vs peft's {sr}"
    assert any(b < a for a, b in zip(sr, sr[1:])), f"no overflowed (skipped) step to compare: {sr}"
    assert lf[-1] < lf[0], f"loss did not fall: {lf}"
    torch.testing.assert_close(torch.tensor(lf), torch.tensor(lr), rtol=1e-2, atol=1e-2)
    for k in wr:
        torch.testing.assert_close(wf[k], wr[k], rtol=2e-2, atol=2e-2 * max(1.0, wr[k].abs().max().item()), msg=k)


@pytest.mark.parametrize("ac", AUTOCAST, ids=IDS.get)
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_compile_fullgraph_under_autocast_matches_eager(method, ac):
    torch._dynamo.reset()
    batch = make_batch("llama")
    eager = build(peft_fast, "llama", method)
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager", fullgraph=False)
    le, Le, ge = step(eager, batch, ac)
    lc, Lc, gc = step(compiled, batch, ac)
    assert lc.dtype == le.dtype
    torch.testing.assert_close(lc, le, **tolerance(ac))
    gc = {k.removeprefix("_orig_mod."): v for k, v in gc.items()}
    assert set(gc) == set(ge)
    for k in ge:
        assert gc[k].dtype == ge[k].dtype == torch.float32
        torch.testing.assert_close(gc[k], ge[k], rtol=tolerance(ac)["rtol"],
                                   atol=tolerance(ac)["atol"] * max(1.0, ge[k].abs().max().item()), msg=k)


@pytest.mark.parametrize("ac", AUTOCAST, ids=IDS.get)
def test_mixed_adapter_batch_under_autocast_matches_peft(ac):
    """adapter_names batches (inference) under autocast: same dtype as peft, each row as accurate."""
    batch = make_batch("llama", batch=3)
    batch.pop("labels")
    names = ["default", "__base__", "b"]
    outs = {}
    for lib in (peft, peft_fast):
        m = build(lib, "llama", "lora")
        torch.manual_seed(5)
        m.add_adapter("b", lib.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "down_proj"]))
        randomise(m, seed=9)
        m.eval()
        with torch.no_grad():
            exact = copy.deepcopy(m).double()(**batch, adapter_names=names).logits
            with torch.autocast("cpu", dtype=ac):
                got = m(**batch, adapter_names=names).logits
        outs[lib] = (got, exact)
    (gr, er), (gf, ef) = outs[peft], outs[peft_fast]
    torch.testing.assert_close(ef, er)  # same weights in both libraries
    assert_as_accurate_as_peft(gf, gr, er, ac, "mixed-batch logits")


@pytest.mark.parametrize("ac", AUTOCAST, ids=IDS.get)
def test_trainer_bf16_or_fp16_end_to_end_matches_peft(ac, tmp_path):
    """transformers.Trainer(bf16=True / fp16=True) on CPU: peft_fast trains, its train losses follow
    peft's, and the saved adapter loads back in peft with the same outputs."""
    from transformers import Trainer, TrainingArguments

    if ac == torch.float16:
        pytest.importorskip("accelerate")
    batch = make_batch("llama", batch=8, seq=12)
    data = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    results = {}
    for lib in (peft, peft_fast):
        m = build(lib, "llama", "lora")
        args = TrainingArguments(
            output_dir=str(tmp_path / lib.__name__), per_device_train_batch_size=4, max_steps=4, learning_rate=5e-3,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
            bf16=ac == torch.bfloat16, fp16=ac == torch.float16, dataloader_num_workers=0, disable_tqdm=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = Trainer(model=m, args=args, train_dataset=data)
            trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        results[lib] = (losses, m)
    (lr, _), (lf, mf) = results[peft], results[peft_fast]
    assert len(lf) == len(lr) == 4 and all(map(lambda v: v == v, lf))
    torch.testing.assert_close(torch.tensor(lf), torch.tensor(lr), rtol=2e-2, atol=2e-2)
    mf.save_pretrained(tmp_path / "adapter")  # (mf's forward stays wrapped in accelerate's autocast)
    b = make_batch("llama")
    with torch.no_grad():
        logits = [lib.PeftModel.from_pretrained(build_tiny_model("llama"), tmp_path / "adapter").eval()(**b).logits
                  for lib in (peft, peft_fast)]
    torch.testing.assert_close(logits[1], logits[0], **tolerance(torch.float32))
    assert (logits[0] - build_tiny_model("llama")(**b).logits).abs().max() > 1e-3, "the adapter did not train"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama whose linear layers are whole 64-blocks wide (bitsandbytes' CPU 4-bit kernels
    misread other widths on CPUs with avx512_bf16, and peft runs them for the base product)."""
    import transformers

    d = tmp_path_factory.mktemp("tiny_llama_mp")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d)


def exact_dense_twin(qmodel, llama_dir, kind_method):
    """peft on an fp64 dense copy of a 4-bit peft model: each NF4 weight replaced by its exact
    dequantization (never bitsandbytes' CPU kernel, which rounds through bf16 on CPUs with
    avx512_bf16), the same adapter weights. The reference both libraries' errors are measured from."""
    from transformers import LlamaForCausalLM

    from peft_fast.quant import dequantize_nf4_ref, nf4_from_bnb

    dense = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float64)
    with torch.no_grad():
        for name, mod in qmodel.base_model.model.named_modules():
            if type(mod).__name__ == "Linear4bit" and type(mod).__module__.startswith("bitsandbytes"):
                target = dense.get_submodule(name.removesuffix(".base_layer"))
                target.weight.copy_(dequantize_nf4_ref(nf4_from_bnb(mod.weight), torch.float32).double())
    twin = peft.get_peft_model(dense, make_config(peft, "llama", kind_method))
    peft.set_peft_model_state_dict(twin, {k: v.double() for k, v in peft.get_peft_model_state_dict(qmodel).items()})
    return twin.train()


@pytest.mark.parametrize("ac", AUTOCAST, ids=IDS.get)
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=lambda d: "compute-" + IDS[d])
def test_qlora_under_autocast_parity_with_peft(llama_dir, method, compute, ac):
    """4-bit NF4 base (bitsandbytes), fp32 non-quantized weights as after
    prepare_model_for_kbit_training, under autocast: as accurate as peft against an exact fp64
    twin; the fused QLoRA op is the one used for LoRA."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from peft_fast.functional import qlora as fq

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                           bnb_4bit_use_double_quant=True)
    batch = make_batch("llama")
    runs, models = {}, {}
    for lib in (peft, peft_fast):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=q, dtype=torch.float32).train()
            torch.manual_seed(1)
            m = lib.get_peft_model(base, make_config(lib, "llama", method))
        randomise(m)
        calls = []
        real = fq.QLoraLinearFunction.apply
        fq.QLoraLinearFunction.apply = lambda *a: calls.append(1) or real(*a)
        try:
            runs[lib] = step(m.train(), batch, ac)
        finally:
            fq.QLoraLinearFunction.apply = real
        if lib is peft_fast and method == "lora":
            assert calls, "the fused QLoRA op was not used under autocast"
        models[lib] = m
    le, Le, ge = step(exact_dense_twin(models[peft], llama_dir, method), batch)
    (lr, Lr, gr), (lf, Lf, gf) = runs[peft], runs[peft_fast]
    # the adapters see x in the compute dtype (functional/qlora.py): bf16 compute under fp16 autocast
    # is held to bf16's tolerance
    tol_dtype = max((ac, compute), key=lambda d: tolerance(d)["atol"])
    assert_as_accurate_as_peft(lf, lr, le, tol_dtype, "logits")
    assert_as_accurate_as_peft(Lf, Lr, Le, tol_dtype, "loss")
    assert set(gf) == set(gr) and gr
    for k in gr:
        assert_as_accurate_as_peft(gf[k], gr[k], ge[k], tol_dtype, k)


def test_accelerate_mixed_precision_bf16_trains_like_peft():
    """accelerate's Accelerator(mixed_precision="bf16") on CPU (its autocast wrapper around the
    model's forward, accelerator.backward): the same losses as peft over a few SGD steps."""
    accelerate = pytest.importorskip("accelerate")
    batch = make_batch("llama")
    losses = {}
    for lib in (peft, peft_fast):
        accelerate.state.AcceleratorState._reset_state(True)
        acc = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
        m = build(lib, "llama", "dora")
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        m, opt = acc.prepare(m, opt)
        run = []
        for _ in range(3):
            opt.zero_grad()
            loss = m(**batch).loss
            acc.backward(loss)
            opt.step()
            run.append(loss.item())
        losses[lib] = run
    accelerate.state.AcceleratorState._reset_state(True)
    assert losses[peft_fast][-1] < losses[peft_fast][0]
    torch.testing.assert_close(torch.tensor(losses[peft_fast]), torch.tensor(losses[peft]), rtol=2e-2, atol=2e-2)
