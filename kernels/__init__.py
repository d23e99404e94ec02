"""Triton kernels, autograd ops and their plain-PyTorch references. No nn.Module here.

`bottleneck_adapter` is the fused bottleneck adapter; `reference` holds the spec of every op.
"""

from . import reference
from .bottleneck import bottleneck_adapter, uses_triton

__all__ = ["bottleneck_adapter", "reference", "uses_triton"]
