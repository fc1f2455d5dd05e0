"""Layer L2: one torch.autograd.Function per fused op, backward derived in its docstring."""
from .dora import dora_linear
from .ia3 import ia3_linear
from .lora import lora_linear
from .qlora import qlora_linear

__all__ = ["lora_linear", "dora_linear", "ia3_linear", "qlora_linear"]
