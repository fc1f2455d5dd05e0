"""Bad input gets a clear exception that names the offending value; unsafe files are refused;
nothing is half-written to disk when a save fails (DESIGN.md "Style")."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from torch import nn

import peft_fast
from peft_fast.tuners.tuners_utils import BaseTunerLayer


class TinyMLP(nn.Module):
    def __init__(self, width: int = 24):
        super().__init__()
        self.lin0 = nn.Linear(12, width)
        self.act = nn.Tanh()
        self.lin1 = nn.Linear(width, 20)
        self.lin2 = nn.Linear(20, 3)

    def forward(self, x):
        return self.lin2(self.act(self.lin1(self.act(self.lin0(x)))))


def mlp(seed: int = 0, width: int = 24) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(width).eval()


def lora(**kw) -> peft_fast.LoraConfig:
    kw.setdefault("target_modules", ["lin0", "lin1"])
    kw.setdefault("r", 4)
    kw.setdefault("init_lora_weights", False)
    return peft_fast.LoraConfig(**kw)


def lora_model(seed: int = 0, width: int = 24, **kw):
    base = mlp(seed, width)
    torch.manual_seed(seed + 1)
    return peft_fast.get_peft_model(base, lora(**kw))


def files_in(path) -> list[str]:
    return sorted(os.listdir(path))


# --------------------------------------------------------------------------------------------
# configs and targets
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["nope_proj"], ["lin0_typo", "also_missing"]])
def test_unknown_target_module_names_it(targets):
    with pytest.raises(ValueError, match=re.escape(targets[0])):
        peft_fast.get_peft_model(mlp(), lora(target_modules=targets))


def test_unknown_target_module_ia3_names_it():
    cfg = peft_fast.IA3Config(target_modules=["nope_proj"], feedforward_modules=[])
    with pytest.raises(ValueError, match="nope_proj"):
        peft_fast.get_peft_model(mlp(), cfg)


def test_unknown_target_regex_names_it():
    with pytest.raises(ValueError, match="blocks.*nope_mod"):
        peft_fast.get_peft_model(mlp(), lora(target_modules="blocks.*nope_mod"))


def test_failed_injection_leaves_model_untouched():
    base = mlp()
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError):
        peft_fast.get_peft_model(base, lora(target_modules=["nope_proj"]))
    assert not [m for m in base.modules() if isinstance(m, BaseTunerLayer)]
    assert list(base.state_dict()) == list(sd)


@pytest.mark.parametrize("r", [0, -3])
def test_rank_not_positive(r):
    with pytest.raises(ValueError, match=rf"`r`.*{r}"):
        peft_fast.LoraConfig(r=r)


def test_rank_pattern_zero_names_module():
    with pytest.raises(ValueError, match=r"lin1.*0"):
        peft_fast.LoraConfig(r=4, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 0})


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq", "corda", "not_an_init"])
def test_unsupported_init_lora_weights(init):
    with pytest.raises(NotImplementedError, match=re.escape(repr(init))):
        peft_fast.LoraConfig(init_lora_weights=init)


def test_bad_dropout_and_bias_name_the_value():
    with pytest.raises(ValueError, match="1.5"):
        peft_fast.LoraConfig(lora_dropout=1.5)
    with pytest.raises(ValueError, match="'everything'"):
        peft_fast.LoraConfig(bias="everything")


def test_bad_backend_env_names_it(monkeypatch):
    from peft_fast import ops

    monkeypatch.setenv("PEFT_FAST_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="cuda-please"):
        ops.backend_for(torch.zeros(1))


# --------------------------------------------------------------------------------------------
# adapter names
# --------------------------------------------------------------------------------------------
def test_set_adapter_missing_name():
    pm = lora_model()
    with pytest.raises(ValueError, match="nope"):
        pm.set_adapter("nope")
    assert pm.active_adapters == ["default"]
    with pytest.raises(ValueError, match="nope"):
        pm.base_model.set_adapter(["default", "nope"])
    # refused before any layer switched
    for m in pm.modules():
        if isinstance(m, BaseTunerLayer):
            assert m.active_adapters == ["default"]


def test_delete_adapter_missing_name():
    pm = lora_model()
    with pytest.raises(ValueError, match="nope"):
        pm.delete_adapter("nope")
    assert list(pm.peft_config) == ["default"]
    assert any(".default" in n for n, _ in pm.named_parameters())


def test_add_adapter_existing_name_and_weighted_missing_name():
    pm = lora_model()
    with pytest.raises(ValueError, match="default"):
        pm.add_adapter("default", lora())
    with pytest.raises(ValueError, match="nope"):
        pm.add_weighted_adapter(["default", "nope"], [1.0, 1.0], "mix", combination_type="cat")
    assert "mix" not in pm.peft_config


def test_adapter_names_length_mismatch():
    pm = lora_model()
    pm.eval()
    with pytest.raises(ValueError, match="2"):
        pm(torch.randn(3, 12), adapter_names=["default", "__base__"])
    with pytest.raises(ValueError, match="nope"):
        pm(torch.randn(2, 12), adapter_names=["default", "nope"])


def test_safe_merge_refuses_nan_and_keeps_weights():
    pm = lora_model()
    layer = pm.base_model.model.lin0
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="default"):
        pm.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0)
    assert not layer.merged


# --------------------------------------------------------------------------------------------
# loading checkpoints
# --------------------------------------------------------------------------------------------
def test_set_state_dict_shape_mismatch_names_key_and_shapes():
    pm = lora_model()
    sd = peft_fast.get_peft_model_state_dict(pm)
    key = next(k for k in sd if "lin1.lora_A" in k)
    bad = dict(sd)
    bad[key] = torch.zeros(7, 24)
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(ValueError) as exc:
        peft_fast.set_peft_model_state_dict(pm, bad)
    msg = str(exc.value)
    assert key in msg and "(7, 24)" in msg and "(4, 24)" in msg, msg
    # nothing was loaded
    for k, v in pm.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_from_pretrained_rank_mismatch_names_key_and_shapes(tmp_path):
    pm = lora_model()
    pm.save_pretrained(str(tmp_path))
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 8
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as exc:
        peft_fast.PeftModel.from_pretrained(mlp(), str(tmp_path))
    msg = str(exc.value)
    assert "lora_A" in msg or "lora_B" in msg, msg
    assert re.search(r"\(4, 12\)|\(4, 24\)|\(24, 4\)|\(20, 4\)", msg), msg
    assert re.search(r"\(8, 12\)|\(8, 24\)|\(24, 8\)|\(20, 8\)", msg), msg


def test_from_pretrained_other_base_model_names_key_and_shapes(tmp_path):
    lora_model(width=24).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError) as exc:
        peft_fast.PeftModel.from_pretrained(mlp(width=32), str(tmp_path))
    msg = str(exc.value)
    m = re.search(r"'([^']+)'", msg)
    assert m and ("lin0" in m.group(1) or "lin1" in m.group(1)), msg
    assert "24" in msg and "32" in msg, msg


def test_from_pretrained_without_config_names_path(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        peft_fast.PeftModel.from_pretrained(mlp(), str(tmp_path))


def test_unsupported_peft_type_names_it(tmp_path):
    pm = lora_model()
    pm.save_pretrained(str(tmp_path))
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["peft_type"] = "LOHA"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="LOHA"):
        peft_fast.PeftModel.from_pretrained(mlp(), str(tmp_path))


_UNPICKLED = []


def _record_unpickle(tag):
    _UNPICKLED.append(tag)
    return tag


class _Payload:
    """Unpickling this calls _record_unpickle: proof that arbitrary code would run."""

    def __reduce__(self):
        return (_record_unpickle, ("code ran",))


def test_bin_with_pickled_object_is_refused(tmp_path):
    pm = lora_model()
    pm.save_pretrained(str(tmp_path))
    sd = peft_fast.load_peft_weights(str(tmp_path))
    os.remove(tmp_path / "adapter_model.safetensors")
    evil = dict(sd)
    evil["payload"] = _Payload()
    torch.save(evil, tmp_path / "adapter_model.bin")
    _UNPICKLED.clear()
    with pytest.raises(Exception) as exc:
        peft_fast.load_peft_weights(str(tmp_path))
    assert "adapter_model.bin" in str(exc.value)
    with pytest.raises(Exception):
        peft_fast.PeftModel.from_pretrained(mlp(), str(tmp_path))
    assert _UNPICKLED == [], "torch.load ran pickled code: weights_only was not used"


def test_bin_with_plain_tensors_loads(tmp_path):
    pm = lora_model()
    pm.save_pretrained(str(tmp_path), safe_serialization=False)
    assert "adapter_model.bin" in files_in(tmp_path)
    assert "adapter_model.safetensors" not in files_in(tmp_path)
    loaded = peft_fast.PeftModel.from_pretrained(mlp(), str(tmp_path))
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pm(x))


def test_unknown_config_fields_warn_and_are_ignored(tmp_path):
    pm = lora_model()
    pm.save_pretrained(str(tmp_path))
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["field_from_the_future"] = {"x": 1}
    cfg["another_new_knob"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="field_from_the_future"):
        conf = peft_fast.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(conf, peft_fast.LoraConfig)
    assert not hasattr(conf, "field_from_the_future")
    with pytest.warns(UserWarning, match="another_new_knob"):
        loaded = peft_fast.PeftModel.from_pretrained(mlp(), str(tmp_path))
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pm(x))


# --------------------------------------------------------------------------------------------
# atomic saves
# --------------------------------------------------------------------------------------------
def _failing_writer(real_payload_bytes: int = 64):
    """Stand-in for a writer that dies half-way: leaves a truncated file at the path, then raises."""

    def fail(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x00" * real_payload_bytes)
        raise OSError("disk full (simulated)")

    return fail


def test_failed_safetensors_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    pm = lora_model()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_writer())
    out = tmp_path / "adapter"
    with pytest.raises(OSError, match="disk full"):
        pm.save_pretrained(str(out))
    leftovers = files_in(out) if out.exists() else []
    assert "adapter_model.safetensors" not in leftovers
    assert not [f for f in leftovers if "tmp" in f], leftovers
    assert leftovers == [], f"half-written adapter directory: {leftovers}"


def test_failed_save_keeps_previous_good_files(tmp_path, monkeypatch):
    import safetensors.torch

    pm = lora_model()
    pm.save_pretrained(str(tmp_path))
    before = {f: (tmp_path / f).read_bytes() for f in files_in(tmp_path)}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(before)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(1.0)
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_writer())
    with pytest.raises(OSError):
        pm.save_pretrained(str(tmp_path))
    assert files_in(tmp_path) == sorted(before), files_in(tmp_path)
    for f, data in before.items():
        assert (tmp_path / f).read_bytes() == data, f"{f} was modified by a failed save"
    monkeypatch.undo()
    sd = peft_fast.load_peft_weights(str(tmp_path))
    assert sd  # the old file still parses


def test_failed_bin_save_leaves_nothing(tmp_path, monkeypatch):
    pm = lora_model()
    monkeypatch.setattr(torch, "save", _failing_writer())
    with pytest.raises(OSError):
        pm.save_pretrained(str(tmp_path), safe_serialization=False)
    assert files_in(tmp_path) == []


def test_failed_config_write_leaves_no_temp_files(tmp_path, monkeypatch):
    """A config write that dies mid-way leaves neither a truncated adapter_config.json nor temp files."""
    cfg = lora()
    real_open = open

    def flaky_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and os.path.basename(str(path)).startswith(".tmp"):
            f.write("{ truncated")
            f.close()
            raise OSError("disk full (simulated)")
        return f

    monkeypatch.setattr("builtins.open", flaky_open)
    with pytest.raises(OSError):
        cfg.save_pretrained(str(tmp_path))
    monkeypatch.undo()
    assert files_in(tmp_path) == []


def test_package_imports_and_runs_without_triton():
    """Triton is optional: every kernel module imports without it, the CPU path runs, and asking
    for the Triton backend says what is missing."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, peft_fast\n"
        "from peft_fast import ops, ops_triton\n"
        "from peft_fast.triton_kernels import colsum, dora, fused_linear, lora, multi_lora, nf4\n"
        "assert not peft_fast.triton_kernels._triton.HAS_TRITON\n"
        "from peft_fast.functional import lora_linear\n"
        "y = lora_linear(torch.randn(3, 8), torch.randn(4, 8), None, [torch.randn(2, 8)], [torch.randn(4, 2)], [1.0], [0.1])\n"
        "assert y.shape == (3, 4)\n"
        "import os; os.environ['PEFT_FAST_BACKEND'] = 'triton'\n"
        "try:\n    ops.backend_for(torch.zeros(1))\nexcept RuntimeError as e:\n    assert 'triton is not installed' in str(e); print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
