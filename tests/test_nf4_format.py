"""peft_fast.quant: the NF4 weight format against bitsandbytes on CPU.

Quantization (packed bytes, absmax, nested absmax codes / offset / absmax2 / code2) and
dequantization must be bit-identical to bitsandbytes 0.50 for fp32/fp16/bf16, every block size
it accepts, odd sizes, all-zero blocks and values exactly on code midpoints; wrapping a bnb
layer must not copy; converting back must give bitsandbytes the same tensors.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from peft_fast.quant import (
    NF4_BLOCKSIZES,
    NF4_CODE,
    NF4Weight,
    create_dynamic_map,
    dequantize_blockwise8,
    dequantize_nf4_ref,
    nf4_from_bnb,
    quantize_blockwise8,
    quantize_nf4,
    to_bnb_params,
)

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

from bnb_helpers import layer_dequant_fp64  # noqa: E402
from conftest import assert_close  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # fp32 [15], where bnb switches codes


@contextlib.contextmanager
def bnb_eager():
    """bitsandbytes dequantizes odd-width weights through a torch.compile'd function; compiling
    costs seconds per shape, so most comparisons run it eagerly (same math, one mul and a cast).
    `test_dequant_matches_bnb_compiled_path` keeps the compiled path."""
    with torch.compiler.set_stance("force_eager"):
        yield


def make_weight(shape, dtype, seed=0, zero_rows=True):
    """Fresh weight with per-row scales spread over 4 decades (so the nested absmax spans a wide
    range) and, if possible, two all-zero rows (all-zero blocks for small block sizes)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape[0], 1, generator=g)) * 0.02
    if zero_rows and shape[0] > 4:
        w[2:4] = 0
    return w.to(dtype)


def bnb_quantize(W, blocksize, compress_statistics):
    return BF.quantize_4bit(W, blocksize=blocksize, compress_statistics=compress_statistics, quant_type="nf4")


def assert_same_as_bnb(w: NF4Weight, packed, state, W):
    """Our NF4Weight holds exactly bitsandbytes' tensors for the same input."""
    assert w.shape == W.shape and w.dtype == W.dtype == state.dtype and w.blocksize == state.blocksize
    packed = packed.reshape(-1)
    assert torch.equal(w.packed, packed), f"packed differs in {(w.packed != packed).sum()} bytes"
    assert w.absmax.dtype == state.absmax.dtype and torch.equal(w.absmax, state.absmax), "absmax differs"
    assert torch.equal(w.code, state.code)
    assert w.double_quant == state.nested
    if state.nested:
        assert torch.equal(w.offset, state.offset), (w.offset, state.offset)
        assert torch.equal(w.absmax2, state.state2.absmax), "absmax2 differs"
        assert torch.equal(w.code2, state.state2.code)
        assert w.blocksize2 == state.state2.blocksize


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def test_code_tables_match_bnb():
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.shape == (16,)
    assert torch.equal(NF4_CODE, BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(create_dynamic_map(), BF.create_dynamic_map())


# --------------------------------------------------------------------------------------------
# Quantization and dequantization: bit-exact against bitsandbytes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress_statistics", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("blocksize", NF4_BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_and_dequantize_bit_exact(dtype, blocksize, compress_statistics):
    # (7, 9): odd total, a single partial block; (33, 65): odd total and a tail for every
    # block size; (96, 200): ~600 blocks of 32, i.e. several nested blocks of 256 and a tail
    for seed, shape in enumerate([(7, 9), (33, 65), (96, 200)]):
        W = make_weight(shape, dtype, seed)
        packed, state = bnb_quantize(W, blocksize, compress_statistics)
        w = quantize_nf4(W, blocksize=blocksize, compress_statistics=compress_statistics)
        assert_same_as_bnb(w, packed, state, W)
        with bnb_eager():
            ref = BF.dequantize_4bit(packed, state)
        out = dequantize_nf4_ref(w)
        assert out.dtype == dtype and out.shape == W.shape
        assert torch.equal(out, ref), f"{shape}: dequant differs in {(out != ref).sum()} elements"
        assert torch.equal(w.dequantize(), ref)
        if compress_statistics:
            true_absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
            assert torch.equal(w.true_absmax(), true_absmax)


def test_dequant_matches_bnb_compiled_path():
    # odd width: bitsandbytes' torch.compile'd fallback (its native kernel needs an even width)
    W = make_weight((6, 33), torch.bfloat16, seed=3)
    packed, state = bnb_quantize(W, 64, True)
    assert torch.equal(quantize_nf4(W, 64, True).dequantize(), BF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_other_out_dtype(dtype):
    W = make_weight((8, 40), torch.float32, seed=5)
    w = quantize_nf4(W, 32, True)
    fp32 = dequantize_nf4_ref(w, out_dtype=torch.float32)
    assert torch.equal(dequantize_nf4_ref(w, out_dtype=dtype), fp32.to(dtype))  # one cast from fp32
    packed, state = bnb_quantize(W, 32, True)
    state.dtype = dtype
    assert torch.equal(dequantize_nf4_ref(w, out_dtype=dtype), BF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("blocksize", [32, 64])
def test_values_on_code_midpoints(blocksize):
    """A value exactly on the midpoint of codes j and j+1 takes code j (the lower one)."""
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    values = torch.cat([MIDPOINTS, -MIDPOINTS, torch.nextafter(MIDPOINTS, up), torch.nextafter(MIDPOINTS, down)])
    # blocks of [scale, scale * values...] with power-of-two scales: absmax = scale exactly and
    # the scaled midpoints stay exact; the last block is a partial (tail) block
    chunks, mid_pos, pos = [], [], 0
    for i, start in enumerate(range(0, values.numel(), blocksize - 1)):
        scale = (1.0, 2.0, 0.5)[i % 3]
        chunk = values[start:start + blocksize - 1]
        chunks.append(torch.cat([torch.tensor([scale]), scale * chunk]))
        mid_pos += [(pos + 1 + k, start + k) for k in range(chunk.numel()) if start + k < 15]
        pos += chunk.numel() + 1
    W = torch.cat(chunks).reshape(1, -1)
    assert W.numel() % blocksize != 0
    packed, state = bnb_quantize(W, blocksize, False)
    w = quantize_nf4(W, blocksize)
    assert_same_as_bnb(w, packed, state, W)
    codes = torch.stack((w.packed >> 4, w.packed & 0xF), dim=1).reshape(-1)
    assert [codes[p].item() for p, _ in mid_pos] == [j for _, j in mid_pos] == list(range(15))


def test_tail_block_scaled_by_division_full_block_by_reciprocal():
    """bitsandbytes scales full blocks by x * (1 / absmax) but the trailing partial block by
    x / absmax; these differ by one ulp often enough to change a code. With absmax 3 the value
    below rounds to code 3 via the reciprocal and to code 4 via the division."""
    x = -1.019038200378418
    block = torch.zeros(64)
    block[0], block[1] = 3.0, x
    W = torch.cat([block, torch.tensor([3.0, x, 0.0])]).reshape(1, -1)  # [1, 67]: one full block + tail
    packed, state = bnb_quantize(W, 64, False)
    w = quantize_nf4(W, 64)
    assert_same_as_bnb(w, packed, state, W)
    codes = torch.stack((w.packed >> 4, w.packed & 0xF), dim=1).reshape(-1)
    assert codes[1].item() == 3 and codes[65].item() == 4


@pytest.mark.parametrize("compress_statistics", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("shape", [(2, 64), (1, 65), (1, 3), (4, 96)])
def test_all_zero_blocks(shape, compress_statistics):
    """All-zero full blocks store absmax 0; an all-zero tail stores the clamp 1e-38 (bnb quirk);
    zeros take code 7 (0.0), as does the pad nibble of an odd element count."""
    W = torch.zeros(shape)
    if shape == (4, 96):
        W[0, :5] = torch.tensor([0.5, -0.25, 1.0, 0.0, -1.0])  # one non-zero block among zero ones
    packed, state = bnb_quantize(W, 64, compress_statistics)
    w = quantize_nf4(W, 64, compress_statistics)
    assert_same_as_bnb(w, packed, state, W)
    with bnb_eager():
        assert torch.equal(w.dequantize(), BF.dequantize_4bit(packed, state))
    if shape == (1, 3):
        assert w.packed.tolist() == [0x77, 0x77]


def test_single_block_double_quant():
    # one block: absmax - mean is exactly 0, the nested block is all zero
    W = make_weight((4, 16), torch.float16, seed=7)
    packed, state = bnb_quantize(W, 64, True)
    w = quantize_nf4(W, 64, True)
    assert_same_as_bnb(w, packed, state, W)
    assert torch.equal(w.true_absmax(), BF.dequantize_blockwise(state.absmax, state.state2) + state.offset)


def test_blockwise8_matches_bnb_cpu_quantizer():
    """bitsandbytes' CPU 8-bit quantizer discretises x / absmax into 65536 bins and maps bins to
    codes through a table; reproduce it on random data and on values at every bin edge."""
    code = create_dynamic_map()
    g = torch.Generator().manual_seed(11)
    k = torch.arange(65536, dtype=torch.float32)
    edges = ((k + 0.5) * 2 / 65535 - 1).clamp(-1, 1)
    edges = torch.cat([edges, torch.nextafter(edges, torch.tensor(2.0)), torch.nextafter(edges, torch.tensor(-2.0))])
    edges = edges[torch.randperm(edges.numel(), generator=g)]
    edges = torch.nn.functional.pad(edges, (0, -edges.numel() % 255))
    edges = torch.cat([edges.view(-1, 255), torch.ones(edges.numel() // 255, 1)], dim=1).reshape(-1)  # absmax 1
    rand = torch.randn(3000, generator=g) * 1e-3
    rand[256:512] = 0  # an all-zero block
    for A in (edges, rand, rand[:77]):
        q_ref, state = BF.quantize_blockwise(A, blocksize=256)
        q, absmax = quantize_blockwise8(A, code, 256)
        assert torch.equal(q, q_ref), f"{(q != q_ref).sum()} codes differ"
        assert torch.equal(absmax, state.absmax)
        assert torch.equal(dequantize_blockwise8(q, absmax, code, 256), BF.dequantize_blockwise(q_ref, state))
    # the table is not "nearest code": it disagrees with an exact search on some bin-edge values
    q, absmax = quantize_blockwise8(edges, code, 256)
    nearest = (edges[:, None] - code[None]).abs().argmin(dim=1)
    assert (nearest != q.long()).any()


# --------------------------------------------------------------------------------------------
# Round trip accuracy
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress_statistics", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_error_bound(dtype, compress_statistics):
    """|w - dequant(w)| <= half the widest NF4 gap times the block absmax, plus the error of the
    8-bit absmax and the output rounding. On Gaussian weights of one scale the relative RMS
    error per block is about 0.1 (QLoRA's NF4); with scales spread over decades, double
    quantization can lose small blocks' absmax entirely, which only the first bound allows."""
    for seed, spread in ((13, True), (14, False)):
        W = make_weight((48, 80), dtype, seed, zero_rows=False) if spread else \
            (torch.randn(48, 80, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)
        w = quantize_nf4(W, 64, compress_statistics)
        out = w.dequantize().float().reshape(-1, 64)
        Wf = W.float().reshape(-1, 64)
        absmax = Wf.abs().amax(dim=1)
        half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max().item() / 2
        bound = half_gap * absmax + (w.true_absmax() - absmax).abs()  # [n_blocks]
        bound = bound[:, None] * (1 + 1e-6) + Wf.abs() * torch.finfo(dtype).eps
        assert ((Wf - out).abs() <= bound).all()
        if not spread:
            rel = (out - Wf).norm(dim=1) / Wf.norm(dim=1)
            assert rel.max() < 0.15, rel.max()


# --------------------------------------------------------------------------------------------
# Wrapping bitsandbytes layers (no copy) and converting back
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("compress_statistics", [False, True], ids=["plain", "double_quant"])
def test_nf4_from_bnb_linear4bit_no_copy(compress_statistics, quant_storage):
    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 72)
    layer = bnb.nn.Linear4bit(96, 72, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=compress_statistics, quant_storage=quant_storage)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # Params4bit quantizes when moved to a device
    assert layer.weight.bnb_quantized
    for obj in (layer, layer.weight):
        w = nf4_from_bnb(obj)
        assert w.packed.data_ptr() == layer.weight.data.data_ptr()
        assert w.packed.dtype == torch.uint8 and w.packed.shape == (96 * 72 // 2,)
        assert w.absmax is layer.weight.quant_state.absmax
        assert w.shape == (72, 96) and w.dtype == torch.float32 and w.double_quant == compress_statistics
    # the same bytes as quantizing the dense weight ourselves
    assert_same_as_bnb(quantize_nf4(dense.weight, 64, compress_statistics), layer.weight.data.view(torch.uint8),
                       layer.weight.quant_state, dense.weight)
    # the reference is an fp64 decode, not bitsandbytes' CPU kernel: on avx512 CPUs it misreads the
    # absmax of 96-wide rows (blocks of 64 cross rows)
    W64 = layer_dequant_fp64(layer)
    assert torch.equal(w.dequantize(), W64.float())
    x = torch.randn(3, 96)
    assert_close(torch.nn.functional.linear(x, w.dequantize(), layer.bias),
                 (x.double() @ W64.T + layer.bias.double()).float())


def test_nf4_from_transformers_bnb_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    dense = transformers.LlamaForCausalLM(cfg)
    dense.save_pretrained(tmp_path)
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=qcfg, device_map="cpu",
                                                          dtype=torch.float32)
    dense_mods, q_mods = dict(dense.named_modules()), dict(model.named_modules())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"):
        module, dense_w = q_mods[name], dense_mods[name].weight
        w = nf4_from_bnb(module)
        assert w.packed.data_ptr() == module.weight.data.data_ptr(), name
        assert w.double_quant and w.shape == dense_w.shape
        assert_same_as_bnb(quantize_nf4(dense_w, 64, True), module.weight.data, module.weight.quant_state, dense_w)
        assert torch.equal(w.dequantize(), layer_dequant_fp64(module).float()), name


@pytest.mark.parametrize("compress_statistics", [False, True], ids=["plain", "double_quant"])
def test_to_bnb_params_round_trip(compress_statistics):
    W = make_weight((40, 64), torch.bfloat16, seed=17)
    w = quantize_nf4(W, 64, compress_statistics)
    p = to_bnb_params(w)
    assert isinstance(p, bnb.nn.Params4bit) and p.bnb_quantized and p.quant_type == "nf4"
    assert p.data.data_ptr() == w.packed.data_ptr() and not p.requires_grad
    assert p.quant_state.shape == W.shape and p.quant_state.dtype == torch.bfloat16
    assert torch.equal(BF.dequantize_4bit(p.data, p.quant_state), w.dequantize())
    w2 = nf4_from_bnb(p)
    assert w2.packed.data_ptr() == w.packed.data_ptr() and torch.equal(w2.dequantize(), w.dequantize())
    # usable as a Linear4bit weight
    layer = bnb.nn.Linear4bit(64, 40, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").train()
    layer.weight = p
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert_close(layer(x), x @ w.dequantize().t())
    # PEFT's merge_and_unload requantization: Params4bit(merged, **weight.__dict__).to(device)
    merged = w.dequantize() + 0.01
    kwargs = {k: v for k, v in p.__dict__.items() if not k.startswith("_")}
    kwargs.update(bnb_quantized=False, requires_grad=False)
    kwargs.pop("data", None)
    requant = bnb.nn.Params4bit(merged, **kwargs).to("cpu")
    assert_same_as_bnb(quantize_nf4(merged, 64, compress_statistics), requant.data, requant.quant_state, merged)


def test_to_device_and_properties():
    w = quantize_nf4(make_weight((5, 13), torch.float16), 32, True)
    assert w.numel == 65 and w.n_blocks == 3 and w.double_quant and w.absmax.dtype == torch.uint8
    assert w.offset.shape == () and w.absmax2.shape == (1,) and w.code2.shape == (256,)
    moved = w.to("cpu")
    assert isinstance(moved, NF4Weight) and moved.packed.data_ptr() == w.packed.data_ptr()
    assert torch.equal(moved.dequantize(), w.dequantize())
    assert not quantize_nf4(make_weight((5, 13), torch.float16), 32).double_quant


# --------------------------------------------------------------------------------------------
# bitsandbytes is optional; errors name the bad value
# --------------------------------------------------------------------------------------------
def test_works_without_bitsandbytes():
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import torch\n"
        "from peft_fast.quant import quantize_nf4, to_bnb_params\n"
        "w = quantize_nf4(torch.randn(8, 24), 32, True)\n"
        "assert w.dequantize().shape == (8, 24)\n"
        "try:\n"
        "    to_bnb_params(w)\n"
        "except ImportError as e:\n"
        "    assert 'bitsandbytes' in str(e)\n"
        "else:\n"
        "    raise AssertionError('to_bnb_params imported a blocked bitsandbytes')\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("blocksize", [16, 48, 8192, "64"])
def test_error_unsupported_blocksize(blocksize):
    with pytest.raises(ValueError, match=f"blocksize {blocksize!r}"):
        quantize_nf4(torch.randn(4, 64), blocksize=blocksize)


@pytest.mark.parametrize("shape", [(64,), (2, 4, 64)])
def test_error_not_2d(shape):
    with pytest.raises(ValueError, match=r"2-D .*" + str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
        quantize_nf4(torch.randn(shape))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8], ids=str)
def test_error_unknown_dtype(dtype):
    with pytest.raises(ValueError, match=str(dtype)):
        quantize_nf4(torch.ones(4, 64).to(dtype))
    w = quantize_nf4(torch.randn(4, 64))
    with pytest.raises(ValueError, match=str(dtype)):
        dequantize_nf4_ref(w, out_dtype=dtype)


def test_error_from_bnb_fp4_and_unquantized():
    fp4 = bnb.nn.Linear4bit(64, 32, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match="'fp4'"):
        nf4_from_bnb(fp4)
    with pytest.raises(ValueError, match="'fp4'"):
        nf4_from_bnb(fp4.weight)
    fresh = bnb.nn.Linear4bit(64, 32, quant_type="nf4")  # not moved to a device: still fp32
    with pytest.raises(ValueError, match="not quantized"):
        nf4_from_bnb(fresh)
    with pytest.raises(ValueError, match="Linear"):
        nf4_from_bnb(torch.nn.Linear(64, 32))


def test_error_inconsistent_nf4weight():
    w = quantize_nf4(torch.randn(4, 64), 64)
    with pytest.raises(ValueError, match="packed bytes"):
        NF4Weight(packed=w.packed[:-1], absmax=w.absmax, shape=w.shape, dtype=w.dtype, blocksize=64, code=w.code)
    with pytest.raises(ValueError, match="absmax"):
        NF4Weight(packed=w.packed, absmax=w.absmax[:-1], shape=w.shape, dtype=w.dtype, blocksize=64, code=w.code)
    with pytest.raises(ValueError, match="blocksize 100"):
        NF4Weight(packed=w.packed, absmax=w.absmax, shape=w.shape, dtype=w.dtype, blocksize=100, code=w.code)
