"""torch.compile(fullgraph=True) traces peft_fast models with no graph break: every fused op
is one torch.library custom op with a fake implementation (CPU reference path here; the
Triton path is compiled in the `gpu` test)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peft_fast


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


CONFIGS = {
    "lora": lambda: peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights="gaussian"),
    "lora-dropout": lambda: peft_fast.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["up", "down"],
                                                 init_lora_weights="gaussian"),
    "dora": lambda: peft_fast.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["up", "down"],
                                         init_lora_weights="gaussian"),
    "ia3": lambda: peft_fast.IA3Config(target_modules=["up", "down"], feedforward_modules=["down"]),
}


def _model(method):
    torch.manual_seed(0)
    m = peft_fast.get_peft_model(MLP(), CONFIGS[method]())
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "ia3_l" in n or "magnitude" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape))
            elif "lora_B" in n:  # PEFT initialises B to zero: never compare on zeros
                p.normal_(0, 0.2)
    return m.train()


def _run(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    y.pow(2).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("method", list(CONFIGS))
def test_compile_fullgraph_matches_eager(method):
    torch._dynamo.reset()
    eager = _model(method)
    compiled_src = copy.deepcopy(eager)
    compiled = torch.compile(compiled_src, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 5, 24)
    if method == "lora-dropout":  # statistics only: both must run and produce gradients
        y, dx, grads = _run(compiled, x)
        assert torch.isfinite(y).all() and dx.abs().sum() > 0
        assert any("lora_A" in k for k in grads) and all(g.abs().sum() > 0 for g in grads.values())
        return
    ye, dxe, ge = _run(eager, x)
    yc, dxc, gc = _run(compiled, x)
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(dxc, dxe)
    assert set(gc) == set(ge) and ge
    for k in ge:
        torch.testing.assert_close(gc[k], ge[k], msg=k)


def test_compiled_graph_holds_the_custom_ops():
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        for mod in gm.modules():  # autograd.Function bodies are traced as sub-graphs
            if isinstance(mod, torch.fx.GraphModule):
                seen.extend(str(n.target) for n in mod.graph.nodes if n.op == "call_function")
        return gm.forward

    model = _model("lora")
    torch.compile(model, backend=backend, fullgraph=True)(torch.randn(2, 24))
    assert any("peft_fast.lora_fwd" in t for t in seen), seen
