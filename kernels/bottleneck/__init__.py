"""The fused bottleneck adapter op, in four parts: jit.py (the Triton kernels), configs.py (tile
tables and variants), plan.py (the launches), op.py (custom ops, autograd, the public function)."""

from .op import bottleneck_adapter

__all__ = ["bottleneck_adapter"]
