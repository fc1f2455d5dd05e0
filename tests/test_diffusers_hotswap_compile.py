"""diffusers' compiled-model hotswap on peft_fast (through `peft_fast.install_as_peft()`):
`enable_lora_hotswap(target_rank=...)`, load an adapter, `torch.compile` the UNet, then
`load_lora_adapter(..., hotswap=True)` with an adapter of another rank and alpha: no recompilation
(`torch._dynamo.config.error_on_recompile`), and the outputs of real peft doing the same.

Kept apart from test_diffusers_integration.py because compiling takes a few seconds.
"""
from __future__ import annotations

import pytest
import torch

from tests.test_diffusers_integration import (ATTN, SAFE_NAME, alias, check_layers, differs, fill_adapters, is_fast,
                                              run_unet, unet)

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def test_compiled_unet_hotswap_without_recompile(tmp_path):
    with alias(False) as p:  # two adapters of different ranks and alphas, saved by real peft
        for name, r, alpha in (("one", 2, 8), ("two", 4, 3)):
            m = unet()
            m.add_adapter(p.LoraConfig(r=r, lora_alpha=alpha, target_modules=ATTN + ["conv1"]), adapter_name="h")
            fill_adapters(m)
            m.save_lora_adapter(str(tmp_path / name), adapter_name="h")

    def scenario(peft):
        fresh = unet()
        fresh.load_lora_adapter(str(tmp_path / "two"), weight_name=SAFE_NAME, adapter_name="x", prefix=None)
        out = {"two_fresh": run_unet(fresh)}
        m = unet()
        m.enable_lora_hotswap(target_rank=4)
        m.load_lora_adapter(str(tmp_path / "one"), weight_name=SAFE_NAME, adapter_name="x", prefix=None)
        check_layers(m, peft, is_fast(peft), n_min=30)
        out["one_eager"] = run_unet(m)
        torch._dynamo.reset()
        compiled = torch.compile(m, backend="aot_eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            out["one_compiled"] = run_unet(compiled)
            m.load_lora_adapter(str(tmp_path / "two"), weight_name=SAFE_NAME, adapter_name="x", prefix=None,
                                hotswap=True)
            out["two_compiled"] = run_unet(compiled)
        torch._dynamo.reset()
        return out

    with alias(False) as p:
        real = scenario(p)
    with alias(True) as p:
        fast = scenario(p)
    for key in real:
        torch.testing.assert_close(fast[key], real[key], atol=2e-5, rtol=1e-4, msg=key)
    torch.testing.assert_close(fast["one_compiled"], fast["one_eager"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast["two_compiled"], fast["two_fresh"], atol=1e-5, rtol=1e-5)
    assert differs(fast["one_compiled"], fast["two_compiled"])
