"""Parity with Hugging Face PEFT on tiny real models (DESIGN.md "Tests": same config, same
initial weights -> same outputs, same gradients, same saved files).

Every case builds one base model, deep-copies it twice, seeds the RNG identically and wraps
one copy with `peft.get_peft_model` and the other with `peft_fast.get_peft_model` (each with
its own config class, built from the same keyword arguments). Then:

- structure: parameter names, shapes, dtypes, state-dict keys, adapter layer classes, the
  set of trainable parameters;
- initial weights: bit-identical (same RNG use when the adapters are created);
- outputs and loss gradients of every trainable parameter, after the same random
  perturbation of all adapter weights (so LoRA's B != 0, IA3's l != 1 and DoRA's magnitude
  != ||W||: nothing is compared on zeros), within the tolerance table of conftest.py;
- checkpoints: identical safetensors keys, shapes and values and the same adapter_config.json
  keys in both directions; each library loads the other's files and reproduces its outputs.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import peft_fast  # noqa: E402
from peft_fast.tuners.tuners_utils import BaseTunerLayer as FastTunerLayer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from conftest import assert_close, build_tiny_model, forward_with_loss, make_batch, tolerance  # noqa: E402

from peft.tuners.tuners_utils import BaseTunerLayer as RefTunerLayer  # noqa: E402

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM", "custom": None}
LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
GPT2_LORA = dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
CUSTOM_ALL = ["emb", "conv1d", "conv2d", "pointwise", "lin"]


@dataclass
class Case:
    """One parity scenario. `steps` run on both models after get_peft_model, in order:
    ("add", name, kwargs) -> add_adapter under a fresh seed; ("set", name) -> set_adapter;
    ("set_many", [names]) -> base_model.set_adapter([...]) (several active adapters)."""

    id: str
    model: str
    kwargs: dict
    method: str = "lora"
    steps: tuple = ()
    dtype: torch.dtype = torch.float32
    seed: int = 0
    checkpoint: bool = False  # also run the checkpoint cross-compat tests
    task_type: Optional[str] = field(default="auto")

    def task(self) -> Optional[str]:
        return TASK[self.model] if self.task_type == "auto" else self.task_type

    def train_mode_ok(self) -> bool:
        """Gradients are compared in train mode unless adapter dropout would make it random."""
        ps = [self.kwargs.get("lora_dropout", 0.0)] + [s[2].get("lora_dropout", 0.0) for s in self.steps if s[0] == "add"]
        return all(p == 0.0 for p in ps)


def lora(id, model, checkpoint=False, steps=(), dtype=torch.float32, seed=0, **kwargs):
    return Case(id, model, kwargs, "lora", steps, dtype, seed, checkpoint)


def ia3(id, model, checkpoint=False, steps=(), seed=0, **kwargs):
    return Case(id, model, kwargs, "ia3", steps, torch.float32, seed, checkpoint)


CASES = [
    # ---- LoRA: targeting ----------------------------------------------------------------------
    lora("llama-lora-list", "llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], checkpoint=True),
    lora("llama-lora-regex", "llama", r=4, lora_alpha=8,
         target_modules=r"model\.layers\.\d+\.(self_attn\.k_proj|mlp\.(gate_proj|down_proj))", checkpoint=True),
    lora("llama-lora-all-linear", "llama", r=3, lora_alpha=6, target_modules="all-linear", checkpoint=True),
    lora("gpt2-lora-conv1d", "gpt2", r=4, lora_alpha=8, checkpoint=True, **GPT2_LORA),
    lora("gpt2-lora-all-linear", "gpt2", r=2, lora_alpha=4, target_modules="all-linear", fan_in_fan_out=True),
    lora("bert-seqcls-lora", "bert", r=4, lora_alpha=8, target_modules=["query", "value"], checkpoint=True),
    lora("t5-lora", "t5", r=4, lora_alpha=8, target_modules=["q", "v", "wi", "wo"], checkpoint=True),
    lora("t5-lora-all-linear", "t5", r=2, lora_alpha=2, target_modules="all-linear"),
    lora("custom-lora-conv-emb-linear", "custom", r=3, lora_alpha=6, target_modules=CUSTOM_ALL,
         modules_to_save=["head"], checkpoint=True),
    Case("llama-lora-no-task-type", "llama", dict(r=2, lora_alpha=4, target_modules=["o_proj"]), checkpoint=True,
         task_type=None),
    # ---- LoRA: options -------------------------------------------------------------------------
    lora("llama-rslora", "llama", r=4, lora_alpha=16, use_rslora=True, target_modules=LLAMA_ATTN, checkpoint=True),
    lora("llama-rank-alpha-pattern", "llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
         rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"down_proj": 3, "q_proj": 32},
         checkpoint=True),
    lora("custom-rank-alpha-pattern", "custom", r=2, lora_alpha=4, target_modules=CUSTOM_ALL,
         rank_pattern={"conv2d": 5, "emb": 1}, alpha_pattern={"lin": 7}),
    lora("gpt2-bias-all", "gpt2", r=4, lora_alpha=8, bias="all", checkpoint=True, **GPT2_LORA),
    lora("bert-bias-lora-only", "bert", r=4, lora_alpha=8, bias="lora_only",
         target_modules=["query", "value", "dense"], checkpoint=True),
    lora("custom-bias-all", "custom", r=2, lora_alpha=4, bias="all", target_modules=["conv1d", "conv2d", "lin"]),
    lora("bert-lora-bias", "bert", r=4, lora_alpha=8, lora_bias=True, target_modules=["query", "value"],
         checkpoint=True),
    lora("llama-dropout", "llama", r=4, lora_alpha=8, lora_dropout=0.3, target_modules=LLAMA_ATTN),
    lora("llama-init-false", "llama", r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "up_proj"]),
    lora("gpt2-init-false", "gpt2", r=4, lora_alpha=8, init_lora_weights=False, **GPT2_LORA),
    lora("custom-init-false", "custom", r=3, lora_alpha=3, init_lora_weights=False, target_modules=CUSTOM_ALL),
    lora("llama-init-gaussian", "llama", r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=LLAMA_ATTN),
    # ---- DoRA ----------------------------------------------------------------------------------
    lora("llama-dora", "llama", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"],
         checkpoint=True),
    lora("gpt2-dora-conv1d", "gpt2", r=4, lora_alpha=8, use_dora=True, checkpoint=True, **GPT2_LORA),
    lora("bert-seqcls-dora", "bert", r=4, lora_alpha=8, use_dora=True, target_modules=["query", "value", "dense"]),
    lora("custom-dora-conv2d-conv1d-linear", "custom", r=3, lora_alpha=6, use_dora=True,
         target_modules=["conv1d", "conv2d", "pointwise", "lin"], checkpoint=True),
    lora("llama-dora-init-false", "llama", r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
         target_modules=["q_proj", "down_proj"]),
    lora("llama-dora-dropout", "llama", r=4, lora_alpha=8, use_dora=True, lora_dropout=0.2,
         target_modules=["k_proj", "o_proj"]),
    # ---- IA3 -----------------------------------------------------------------------------------
    ia3("llama-ia3", "llama", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
        checkpoint=True),
    ia3("llama-ia3-init-false", "llama", init_ia3_weights=False, target_modules=["q_proj", "up_proj", "down_proj"],
        feedforward_modules=["up_proj", "down_proj"]),
    ia3("gpt2-ia3-conv1d", "gpt2", target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
        fan_in_fan_out=True, checkpoint=True),
    ia3("bert-seqcls-ia3", "bert", target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
    ia3("t5-ia3", "t5", target_modules=["k", "v", "wo"], feedforward_modules=["wo"], checkpoint=True),
    ia3("custom-ia3-conv2d-linear", "custom", target_modules=["conv2d", "pointwise", "lin"],
        feedforward_modules=["lin", "pointwise"], checkpoint=True),
    # ---- several adapters ----------------------------------------------------------------------
    lora("llama-two-adapters-switch", "llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
         steps=(("add", "other", dict(r=2, lora_alpha=5, target_modules=["v_proj", "up_proj"])), ("set", "other")),
         checkpoint=True),
    lora("llama-two-adapters-active", "llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
         steps=(("add", "other", dict(r=2, lora_alpha=5, target_modules=["v_proj", "up_proj"])),
                ("set_many", ["default", "other"])), checkpoint=True),
    lora("gpt2-two-adapters-active-init-false", "gpt2", r=4, lora_alpha=8, init_lora_weights=False, **GPT2_LORA,
         steps=(("add", "other", dict(r=3, lora_alpha=3, init_lora_weights=False, use_rslora=True, **GPT2_LORA)),
                ("set_many", ["default", "other"]))),
    lora("custom-two-adapters-active", "custom", r=3, lora_alpha=6, target_modules=CUSTOM_ALL,
         steps=(("add", "other", dict(r=2, lora_alpha=2, target_modules=["emb", "conv2d", "lin"])),
                ("set_many", ["other", "default"])), checkpoint=True),
    lora("llama-two-dora-adapters-active", "llama", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"],
         steps=(("add", "other", dict(r=2, lora_alpha=4, use_dora=True, target_modules=["v_proj"])),
                ("set_many", ["default", "other"]))),
    lora("gpt2-two-adapters-dropout", "gpt2", r=4, lora_alpha=8, lora_dropout=0.2, **GPT2_LORA,
         steps=(("add", "other", dict(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["c_attn"],
                                      fan_in_fan_out=True)),
                ("set_many", ["default", "other"]))),
    lora("custom-dora-dropout", "custom", r=3, lora_alpha=6, use_dora=True, lora_dropout=0.25,
         target_modules=["conv1d", "conv2d", "lin"]),
    lora("custom-two-dora-adapters-active", "custom", r=3, lora_alpha=6, use_dora=True,
         target_modules=["conv2d", "lin"],
         steps=(("add", "other", dict(r=2, lora_alpha=4, use_dora=True, target_modules=["conv2d", "lin"])),
                ("set_many", ["default", "other"]))),
    lora("llama-lora-then-dora-active", "llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
         steps=(("add", "other", dict(r=2, lora_alpha=4, use_dora=True, target_modules=["v_proj"])),
                ("set_many", ["default", "other"]))),
    lora("bert-seqcls-two-adapters-switch", "bert", r=4, lora_alpha=8, target_modules=["query", "value"],
         steps=(("add", "other", dict(r=2, lora_alpha=4, target_modules=["key"], task_type="SEQ_CLS")),
                ("set", "other")), checkpoint=True),
    ia3("llama-ia3-two-adapters-active", "llama", target_modules=["k_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        steps=(("add", "other", dict(init_ia3_weights=False, target_modules=["k_proj", "v_proj"],
                                     feedforward_modules=[])),
               ("set_many", ["default", "other"]))),
    # ---- low precision -------------------------------------------------------------------------
    lora("llama-lora-bf16", "llama", r=4, lora_alpha=8, target_modules=LLAMA_ATTN + ["up_proj"],
         dtype=torch.bfloat16, checkpoint=True),
]
CKPT_CASES = [c for c in CASES if c.checkpoint]


def _ids(c: Case) -> str:
    return c.id


# --------------------------------------------------------------------------------------------
# Building both models
# --------------------------------------------------------------------------------------------
def make_config(lib, method: str, kwargs: dict, task_type: Optional[str]):
    cls = lib.LoraConfig if method == "lora" else lib.IA3Config
    kw = copy.deepcopy(kwargs)
    if task_type is not None:
        kw.setdefault("task_type", task_type)
    return cls(**kw)


def apply_step(lib, model, case: Case, step: tuple, seed: int) -> None:
    kind = step[0]
    if kind == "add":
        torch.manual_seed(seed)
        model.add_adapter(step[1], make_config(lib, case.method, step[2], case.task()))
    elif kind == "set":
        model.set_adapter(step[1])
    elif kind == "set_many":
        model.base_model.set_adapter(list(step[1]))
    else:
        raise ValueError(step)


def build_pair(case: Case):
    """(base model, peft model, peft_fast model), built identically with the same seeds."""
    base = build_tiny_model(case.model, case.dtype)
    out = []
    for lib in (peft, peft_fast):
        torch.manual_seed(case.seed)
        model = lib.get_peft_model(copy.deepcopy(base), make_config(lib, case.method, case.kwargs, case.task()))
        for i, step in enumerate(case.steps):
            apply_step(lib, model, case, step, seed=case.seed + 1 + i)
        out.append(model)
    return base, out[0], out[1]


def _lora_multi(case: Case) -> bool:
    """Several plain LoRA adapters (mixed-adapter batches refuse DoRA in both libraries)."""
    adds = [s[2] for s in case.steps if s[0] == "add"]
    return case.method == "lora" and bool(adds) and not any(kw.get("use_dora") for kw in [case.kwargs] + adds)


def _is_adapter_param(name: str) -> bool:
    return any(t in name for t in (".lora_", ".ia3_l.", ".modules_to_save."))


def perturb_identically(ref, fast, seed: int = 4321) -> None:
    """Add the same noise to every adapter / trainable tensor of both models, so that no
    comparison happens at LoRA's B = 0, IA3's l = 1 or DoRA's m = ||W||."""
    g = torch.Generator().manual_seed(seed)
    fast_params = dict(fast.named_parameters())
    with torch.no_grad():
        for name, p in sorted(ref.named_parameters()):
            if not (p.requires_grad or _is_adapter_param(name)):
                continue
            scale = 0.1 * p.float().abs().mean().item() + 0.05
            noise = torch.randn(p.shape, generator=g) * scale
            p.add_(noise.to(p.dtype))
            fast_params[name].add_(noise.to(fast_params[name].dtype))


def _assert_same_value(actual: torch.Tensor, expected: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    """Bit-identical for sampled tensors (same RNG use as PEFT). DoRA's magnitude is computed,
    not sampled: peft_fast takes ||W + sBA|| from the factored form (||W||^2 + cross terms),
    so it may differ from PEFT's direct norm by rounding; it gets the tolerance table."""
    if "lora_magnitude_vector" in name:
        assert_close(actual, expected, dtype=dtype, msg=f"value of {name}")
    else:
        assert torch.equal(actual, expected), f"value of {name} differs from peft"


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return forward_with_loss(model, batch)[0]


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _tuner_layers(model, layer_cls) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, layer_cls)}


# --------------------------------------------------------------------------------------------
# Structure and initial weights
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_structure_and_initial_weights_match_peft(case):
    _, ref, fast = build_pair(case)
    ref_p, fast_p = dict(ref.named_parameters()), dict(fast.named_parameters())

    assert sorted(fast_p) == sorted(ref_p), (
        f"parameter names differ: only in peft_fast {sorted(set(fast_p) - set(ref_p))}, "
        f"only in peft {sorted(set(ref_p) - set(fast_p))}"
    )
    assert sorted(fast.state_dict()) == sorted(ref.state_dict())
    assert _tuner_layers(fast, FastTunerLayer) == _tuner_layers(ref, RefTunerLayer)
    for name, p in ref_p.items():
        q = fast_p[name]
        assert q.shape == p.shape and q.dtype == p.dtype, f"{name}: {q.shape}/{q.dtype} vs peft {p.shape}/{p.dtype}"
        _assert_same_value(q, p, name, case.dtype)

    trainable = _trainable(ref)
    assert _trainable(fast) == trainable, (
        f"trainable sets differ: only in peft_fast {sorted(_trainable(fast) - trainable)}, "
        f"only in peft {sorted(trainable - _trainable(fast))}"
    )
    assert any(_is_adapter_param(n) for n in trainable), "no adapter parameter is trainable"
    assert fast.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert fast.active_adapters == ref.active_adapters
    if case.task() == "SEQ_CLS":
        assert any(".classifier.modules_to_save." in n for n in trainable)


# --------------------------------------------------------------------------------------------
# Outputs and gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_outputs_match_peft(case):
    base, ref, fast = build_pair(case)
    batch = make_batch(case.model)
    ref.eval(), fast.eval()
    # as initialised (LoRA's default init is a no-op on the outputs, IA3's too)
    assert_close(_logits(fast, batch), _logits(ref, batch), dtype=case.dtype, msg="outputs at init")

    perturb_identically(ref, fast)
    out_ref, out_fast = _logits(ref, batch), _logits(fast, batch)
    assert_close(out_fast, out_ref, dtype=case.dtype, msg="outputs after perturbation")
    # guard against a vacuous comparison: the adapters must actually change the outputs
    out_base = _logits(base, batch)
    moved = (out_ref.float() - out_base.float()).abs().max().item()
    assert moved > 10 * tolerance(case.dtype)["atol"], f"adapters barely change the outputs ({moved:.2e})"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gradients_match_peft(case):
    _, ref, fast = build_pair(case)
    perturb_identically(ref, fast)
    batch = make_batch(case.model, seed=77)
    train = case.train_mode_ok()
    losses = []
    for model in (ref, fast):
        model.train(train)
        model.zero_grad(set_to_none=True)
        _, loss = forward_with_loss(model, batch)
        loss.backward()
        losses.append(loss)
    assert_close(losses[1], losses[0], dtype=case.dtype, msg="loss")

    ref_p, fast_p = dict(ref.named_parameters()), dict(fast.named_parameters())
    trainable = sorted(_trainable(ref))
    assert sorted(_trainable(fast)) == trainable
    nonzero = 0
    for name in trainable:
        g_ref, g_fast = ref_p[name].grad, fast_p[name].grad
        assert (g_ref is None) == (g_fast is None), f"{name}: grad is None in one library only"
        if g_ref is None:
            continue
        assert g_fast.dtype == g_ref.dtype, f"{name}: grad dtype {g_fast.dtype} vs peft {g_ref.dtype}"
        assert_close(g_fast, g_ref, dtype=case.dtype, msg=f"grad of {name}")
        nonzero += int(g_ref.abs().max().item() > 0)
    assert nonzero > 0, "every gradient is zero: the comparison would be vacuous"
    # frozen parameters stay without gradients
    for name, p in fast_p.items():
        if name not in trainable:
            assert p.grad is None, f"frozen {name} got a gradient"


def _dropout_through_torch(case: Case) -> bool:
    """Adapter dropout in train mode where peft_fast draws it with torch's own dropout (DoRA).

    Plain LoRA's fused path draws its own 16-bit masks (triton_kernels/lora.py, p quantised to
    1/65536, by design since ead14c1), so its masks cannot equal PEFT's for a seed; its keep
    rate, scaling and unbiasedness are tested in test_refs_autograd.py instead."""
    adds = [s[2] for s in case.steps if s[0] == "add"]
    kws = [kw for kw in [case.kwargs] + adds if kw.get("lora_dropout", 0.0) > 0]
    return bool(kws) and all(kw.get("use_dora") for kw in kws)


@pytest.mark.parametrize("case", [c for c in CASES if _dropout_through_torch(c)], ids=_ids)
def test_train_mode_dropout_matches_peft(case):
    """With DoRA's dropout active (train mode) and the same seed before each forward, both
    libraries draw the same masks, so outputs and gradients still match."""
    _, ref, fast = build_pair(case)
    perturb_identically(ref, fast)
    batch = make_batch(case.model, seed=11)
    results = []
    for model in (ref, fast):
        model.train()
        torch.manual_seed(2024)
        logits, loss = forward_with_loss(model, batch)
        loss.backward()
        results.append((logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (l_ref, loss_ref, g_ref), (l_fast, loss_fast, g_fast) = results
    # dropout really was active: the train-mode output differs from the eval-mode one
    ref.eval()
    assert (_logits(ref, batch) - l_ref).abs().max() > 1e-3
    assert_close(l_fast, l_ref, dtype=case.dtype, msg="train-mode outputs with dropout")
    assert_close(loss_fast, loss_ref, dtype=case.dtype, msg="train-mode loss with dropout")
    assert sorted(g_fast) == sorted(g_ref)
    for n, g in g_ref.items():
        assert (g is None) == (g_fast[n] is None), n
        if g is not None:
            assert_close(g_fast[n], g, dtype=case.dtype, msg=f"grad of {n} (train mode, dropout)")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def _adapter_dirs(root: str, case: Case) -> dict[str, str]:
    """adapter name -> directory, in PEFT's layout ('default' at the root, others in sub-folders)."""
    names = ["default"] + [s[1] for s in case.steps if s[0] == "add"]
    return {n: root if n == "default" else os.path.join(root, n) for n in names}


def _save_both(case: Case, tmp_path):
    base, ref, fast = build_pair(case)
    perturb_identically(ref, fast)
    ref_dir, fast_dir = str(tmp_path / "saved_by_peft"), str(tmp_path / "saved_by_peft_fast")
    ref.save_pretrained(ref_dir)
    fast.save_pretrained(fast_dir)
    return base, ref, fast, ref_dir, fast_dir


def _load_into(lib, base, root: str, case: Case):
    """Load every adapter of `case` from `root` with `lib`, and activate them as in the case."""
    model = lib.PeftModel.from_pretrained(copy.deepcopy(base), root)
    for step in case.steps:
        if step[0] == "add":
            model.load_adapter(os.path.join(root, step[1]), adapter_name=step[1])
        elif step[0] == "set":
            model.set_adapter(step[1])
        elif step[0] == "set_many":
            model.base_model.set_adapter(list(step[1]))
    return model.eval()


def _normalise_config(d: dict) -> dict:
    # target_modules & co. are sets in memory: their JSON list order is not meaningful
    return {k: sorted(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else v for k, v in d.items()}


@pytest.mark.parametrize("case", CKPT_CASES, ids=_ids)
def test_saved_files_match_peft(case, tmp_path):
    _, _, _, ref_dir, fast_dir = _save_both(case, tmp_path)
    for name, ref_sub in _adapter_dirs(ref_dir, case).items():
        fast_sub = _adapter_dirs(fast_dir, case)[name]
        sd_ref = load_file(os.path.join(ref_sub, "adapter_model.safetensors"))
        sd_fast = load_file(os.path.join(fast_sub, "adapter_model.safetensors"))
        assert sorted(sd_fast) == sorted(sd_ref), (
            f"[{name}] safetensors keys: only in peft_fast {sorted(set(sd_fast) - set(sd_ref))}, "
            f"only in peft {sorted(set(sd_ref) - set(sd_fast))}"
        )
        for k, v in sd_ref.items():
            assert sd_fast[k].shape == v.shape and sd_fast[k].dtype == v.dtype, f"[{name}] {k}"
            _assert_same_value(sd_fast[k], v, f"[{name}] {k}", case.dtype)

        with open(os.path.join(ref_sub, "adapter_config.json")) as f:
            cfg_ref = json.load(f)
        with open(os.path.join(fast_sub, "adapter_config.json")) as f:
            cfg_fast = json.load(f)
        assert sorted(cfg_fast) == sorted(cfg_ref), (
            f"[{name}] adapter_config.json keys: only in peft_fast {sorted(set(cfg_fast) - set(cfg_ref))}, "
            f"only in peft {sorted(set(cfg_ref) - set(cfg_fast))}"
        )
        ignore = {"peft_version", "auto_mapping"}  # auto_mapping: see test_adapter_config_auto_mapping_matches_peft
        n_ref, n_fast = _normalise_config(cfg_ref), _normalise_config(cfg_fast)
        diff = {k: (n_fast[k], n_ref[k]) for k in n_ref if k not in ignore and n_fast[k] != n_ref[k]}
        assert not diff, f"[{name}] adapter_config.json values differ (peft_fast, peft): {diff}"

        # peft reads the config peft_fast wrote without complaints about unknown fields
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = peft.PeftConfig.from_pretrained(fast_sub)
        assert type(cfg).__name__ == type(make_config(peft, case.method, case.kwargs, None)).__name__
        unexpected = [str(w.message) for w in caught if "nexpected" in str(w.message)]
        assert not unexpected, unexpected


@pytest.mark.parametrize("case", CKPT_CASES, ids=_ids)
def test_peft_checkpoint_loads_in_peft_fast(case, tmp_path):
    base, ref, _, ref_dir, _ = _save_both(case, tmp_path)
    batch = make_batch(case.model)
    ref.eval()
    loaded = _load_into(peft_fast, base, ref_dir, case)
    assert isinstance(loaded, peft_fast.PeftModel)
    assert loaded.active_adapters == ref.active_adapters
    assert_close(_logits(loaded, batch), _logits(ref, batch), dtype=case.dtype, msg="peft -> peft_fast outputs")


@pytest.mark.parametrize("case", CKPT_CASES, ids=_ids)
def test_peft_fast_checkpoint_loads_in_peft(case, tmp_path):
    base, _, fast, _, fast_dir = _save_both(case, tmp_path)
    batch = make_batch(case.model)
    fast.eval()
    loaded = _load_into(peft, base, fast_dir, case)
    assert loaded.active_adapters == fast.active_adapters
    assert_close(_logits(loaded, batch), _logits(fast, batch), dtype=case.dtype, msg="peft_fast -> peft outputs")


@pytest.mark.parametrize("case", [c for c in CKPT_CASES if c.task() is None], ids=_ids)
def test_adapter_config_auto_mapping_matches_peft(case, tmp_path):
    """Without a task type, PEFT records the base model class in `auto_mapping` (what
    AutoPeftModel.from_pretrained uses to rebuild a custom base model)."""
    _, _, _, ref_dir, fast_dir = _save_both(case, tmp_path)
    for name, ref_sub in _adapter_dirs(ref_dir, case).items():
        with open(os.path.join(ref_sub, "adapter_config.json")) as f:
            expected = json.load(f)["auto_mapping"]
        with open(os.path.join(_adapter_dirs(fast_dir, case)[name], "adapter_config.json")) as f:
            actual = json.load(f)["auto_mapping"]
        assert expected is not None
        assert actual == expected, f"[{name}] auto_mapping: peft_fast wrote {actual!r}, peft writes {expected!r}"


def _assert_same_files(dir_a: str, dir_b: str, dtype: torch.dtype, what: str) -> None:
    sd_a = load_file(os.path.join(dir_a, "adapter_model.safetensors"))
    sd_b = load_file(os.path.join(dir_b, "adapter_model.safetensors"))
    assert sorted(sd_a) == sorted(sd_b), f"{what}: keys {sorted(set(sd_a) ^ set(sd_b))} differ"
    for k, v in sd_b.items():
        assert sd_a[k].shape == v.shape and sd_a[k].dtype == v.dtype, f"{what}: {k}"
        _assert_same_value(sd_a[k], v, f"{what}: {k}", dtype)


@pytest.mark.parametrize("case", CKPT_CASES, ids=_ids)
def test_checkpoint_round_trip_through_the_other_library(case, tmp_path):
    """peft file -> peft_fast -> file == the peft file, and peft_fast file -> peft -> file ==
    the peft_fast file (no key renamed, dropped, added or reshaped on the way)."""
    base, _, _, ref_dir, fast_dir = _save_both(case, tmp_path)
    for lib, src, name in ((peft_fast, ref_dir, "peft->peft_fast"), (peft, fast_dir, "peft_fast->peft")):
        out = str(tmp_path / f"resaved_{name}")
        _load_into(lib, base, src, case).save_pretrained(out)
        for adapter, sub in _adapter_dirs(src, case).items():
            _assert_same_files(_adapter_dirs(out, case)[adapter], sub, case.dtype, f"{name} [{adapter}]")


@pytest.mark.parametrize("case", CKPT_CASES, ids=_ids)
def test_trainable_after_loading_matches_peft(case, tmp_path):
    """from_pretrained(is_trainable=True) of the same files gives the same trainable set and gradients."""
    base, _, _, ref_dir, _ = _save_both(case, tmp_path)
    batch = make_batch(case.model, seed=5)
    models = []
    for lib in (peft, peft_fast):
        m = lib.PeftModel.from_pretrained(copy.deepcopy(base), ref_dir, is_trainable=True)
        m.train(case.train_mode_ok())
        forward_with_loss(m, batch)[1].backward()
        models.append(m)
    ref, fast = models
    assert _trainable(fast) == _trainable(ref)
    fast_p = dict(fast.named_parameters())
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert_close(fast_p[n].grad, p.grad, dtype=case.dtype, msg=f"grad of {n} after loading")


# --------------------------------------------------------------------------------------------
# Merging and mixed-adapter batches
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_merge_and_unload_matches_peft(case):
    _, ref, fast = build_pair(case)
    perturb_identically(ref, fast)
    batch = make_batch(case.model)
    ref.eval(), fast.eval()
    expected = _logits(ref, batch)
    ref_merged, fast_merged = ref.merge_and_unload(), fast.merge_and_unload()
    assert type(fast_merged) is type(ref_merged)
    sd_ref, sd_fast = ref_merged.state_dict(), fast_merged.state_dict()
    assert sorted(sd_fast) == sorted(sd_ref)
    for k, v in sd_ref.items():
        assert_close(sd_fast[k], v, dtype=case.dtype, msg=f"merged {k}")
    # merging keeps the function (within the tolerance of the model dtype)
    assert_close(_logits(fast_merged, batch), expected, dtype=case.dtype, msg="merged outputs vs peft unmerged")


@pytest.mark.parametrize("case", [c for c in CASES if _lora_multi(c)], ids=_ids)
def test_mixed_adapter_batch_matches_peft(case):
    """forward(..., adapter_names=[...]): each row uses its own adapter (or none)."""
    _, ref, fast = build_pair(case)
    perturb_identically(ref, fast)
    ref.eval(), fast.eval()
    batch = {k: v for k, v in make_batch(case.model, batch=3).items() if k != "labels"}
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        out_ref = ref(**batch, adapter_names=names)
        out_fast = fast(**batch, adapter_names=names)
    out_ref = out_ref if isinstance(out_ref, torch.Tensor) else out_ref.logits
    out_fast = out_fast if isinstance(out_fast, torch.Tensor) else out_fast.logits
    assert_close(out_fast, out_ref, dtype=case.dtype, msg="mixed-adapter batch")
