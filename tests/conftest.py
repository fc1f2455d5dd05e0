"""Shared test helpers: the per-dtype tolerance table, tiny offline models, batches.

Everything here runs offline and on CPU: models are built from small configs in code
(never downloaded), and `transformers` is imported only when a transformers model is
asked for, so tests that do not need it import fine without it.
"""
from __future__ import annotations

import os

# Never touch the network (model cards, hub look-ups) from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import copy
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# Tiny models are dominated by per-op overhead: several intra-op threads only add
# synchronisation, and under `pytest -n 2` (or beside other jobs) they oversubscribe the
# cores and make CPU tests up to 40x slower. One thread per process unless asked otherwise.
torch.set_num_threads(int(os.environ.get("PEFT_FAST_TEST_THREADS", "1")))

# --------------------------------------------------------------------------------------------
# Tolerances: the one table every test uses (DESIGN.md "Tests").
#
# `atol` is scaled by max(1, max|expected|) in `assert_close`, so it is effectively a
# bound relative to the tensor's scale for large tensors (logits, gradients) and an absolute
# bound for small ones. fp32 values allow for a different (fused) order of the same math.
# --------------------------------------------------------------------------------------------
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-8},
    torch.float32: {"atol": 2e-5, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """{'atol', 'rtol'} for `dtype` (integer and bool tensors must match exactly)."""
    if not dtype.is_floating_point:
        return {"atol": 0.0, "rtol": 0.0}
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for dtype {dtype}; add it to tests/conftest.py::TOLERANCES")
    return dict(TOLERANCES[dtype])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: Optional[torch.dtype] = None,
                 msg: str = "") -> None:
    """`torch.testing.assert_close` with the table's tolerance for `dtype` (default: the lower
    precision of the two tensors); atol is scaled by the reference magnitude."""
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if dtype is None:
        dtype = actual.dtype if TOLERANCES.get(actual.dtype, {"atol": 0})["atol"] >= \
            TOLERANCES.get(expected.dtype, {"atol": 0})["atol"] else expected.dtype
    tol = tolerance(dtype)
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() and dtype.is_floating_point else 1.0
    torch.testing.assert_close(
        actual.detach().to(expected.dtype), expected.detach(), atol=tol["atol"] * scale, rtol=tol["rtol"],
        msg=lambda m: f"{msg}\n{m}" if msg else m,
    )


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------
VOCAB = 96
NUM_LABELS = 3


class TinyConvNet(nn.Module):
    """A small custom model with every layer type LoRA supports: Embedding, Conv1d, Conv2d, Linear.

    input_ids [B, T] -> logits [B, T, VOCAB]
    """

    def __init__(self, vocab: int = VOCAB, dim: int = 16, channels: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.conv1d = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.conv2d = nn.Conv2d(1, channels, kernel_size=3, padding=1)
        self.pointwise = nn.Conv2d(channels, channels, kernel_size=1)
        self.lin = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.emb(input_ids)  # [B, T, D]
        h = torch.tanh(self.conv1d(h.transpose(1, 2)))  # [B, D, T]
        h = torch.tanh(self.conv2d(h.unsqueeze(1)))  # [B, C, D, T]
        h = self.pointwise(h).mean(1)  # [B, D, T]
        h = torch.tanh(self.lin(h.transpose(1, 2)))  # [B, T, D]
        return self.head(h)


MODEL_KINDS = ("llama", "gpt2", "bert", "t5", "custom")


def build_tiny_model(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny model of `kind` (see MODEL_KINDS), in eval mode, with every
    dropout of the base model at 0 so train-mode forwards are deterministic."""
    torch.manual_seed(seed)
    if kind == "custom":
        model = TinyConvNet()
    else:
        transformers = pytest.importorskip("transformers")
        if kind == "llama":
            cfg = transformers.LlamaConfig(
                vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                attention_dropout=0.0, tie_word_embeddings=False,
            )
            model = transformers.LlamaForCausalLM(cfg)
        elif kind == "gpt2":
            cfg = transformers.GPT2Config(
                vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
            )
            model = transformers.GPT2LMHeadModel(cfg)
        elif kind == "bert":
            cfg = transformers.BertConfig(
                vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=96, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, num_labels=NUM_LABELS,
            )
            model = transformers.BertForSequenceClassification(cfg)
        elif kind == "t5":
            cfg = transformers.T5Config(
                vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2,
                num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                relative_attention_num_buckets=8,
            )
            model = transformers.T5ForConditionalGeneration(cfg)
        else:
            raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    return model.to(dtype).eval()


def make_batch(kind: str, batch: int = 2, seq: int = 8, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Model inputs (with labels) for `kind`; fresh random tokens, avoiding the pad id 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    if kind == "bert":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, NUM_LABELS, (batch,), generator=g)}
    if kind == "t5":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(1, VOCAB, (batch, seq // 2), generator=g)}
    if kind == "custom":
        return {"input_ids": ids, "labels": torch.randint(0, VOCAB, (batch, seq), generator=g)}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def forward_with_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss) for any tiny model or PEFT wrapper of one."""
    out = model(**batch)
    if isinstance(out, torch.Tensor):  # the custom model returns logits only
        logits = out
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        return logits, loss
    return out.logits, out.loss


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


@pytest.fixture
def tiny_model_factory():
    """`factory(kind, dtype=torch.float32, seed=0)` -> a fresh tiny model."""
    return build_tiny_model


# --------------------------------------------------------------------------------------------
# Markers: `gpu` tests skip without CUDA; `interp` tests need TRITON_INTERPRET=1 set before
# triton is imported, so `make test` runs them in a second pytest process with it set.
# --------------------------------------------------------------------------------------------
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_configure(config):
    """PEFT_FAST_TEST_AVX512BF16=0|1: run the whole suite as on a CPU without (AMD, older Intel)
    or with avx512_bf16 (Sapphire Rapids+), whatever this CPU is: bitsandbytes' Linear4bit decides
    whether to repack its weight for its bf16 CPU kernel from `has_avx512bf16()` (CI runs on either)."""
    want = os.environ.get("PEFT_FAST_TEST_AVX512BF16")
    if want is None:
        return
    try:
        import bitsandbytes.nn.modules as bnb_modules
    except ImportError:
        return
    bnb_modules.has_avx512bf16 = (lambda: True) if want == "1" else (lambda: False)


def pytest_collection_modifyitems(config, items):
    try:
        import triton  # noqa: F401
        has_triton = True
    except ImportError:
        has_triton = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 and triton (make test runs them that way)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "interp" in item.keywords and not (INTERPRETING and has_triton):
            item.add_marker(skip_interp)


def assert_kernel_close(out: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor, msg: str = "") -> None:
    """DESIGN.md rule for matmul-like kernels: |out - ref64| <= 2 |same_dtype - ref64| + atol
    elementwise-max-wise, where `same_dtype` is the same math done by torch in the kernel's dtype."""
    assert out.shape == ref64.shape, f"{msg}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out.float()).all(), f"{msg}: non-finite values (unwritten tile?)"
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    base = (same_dtype.double() - ref64).abs().max().item() if out.numel() else 0.0
    atol = tolerance(out.dtype)["atol"] * max(1.0, ref64.abs().max().item() if out.numel() else 1.0)
    assert err <= 2 * base + atol, f"{msg}: max error {err:.3e} > 2 x torch's {base:.3e} + {atol:.1e}"


@pytest.fixture
def peft_alias():
    """`import peft` gives peft_fast during the test (`peft_fast.install_as_peft()`), real peft after it."""
    import peft_fast

    peft_fast.install_as_peft()
    try:
        yield
    finally:
        peft_fast.uninstall_as_peft()
