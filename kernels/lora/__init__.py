"""The fused LoRA linear op, in four parts: jit.py (the single-launch Triton kernel), configs.py
(tile tables and the two forms), plan.py (the launches), op.py (custom ops, autograd, the public
function)."""

from .op import lora_linear

__all__ = ["lora_linear"]
