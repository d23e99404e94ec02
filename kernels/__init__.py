"""Triton kernels, autograd ops and their plain-PyTorch references. No nn.Module here.

`bottleneck_adapter` is the fused bottleneck adapter; `reference` holds the spec of every op.
`list_variants`, `use_variant` and `autotune` name and choose the kernels' launch variants.
"""

from . import reference
from .bottleneck import bottleneck_adapter, uses_triton
from .reference import load_balancing_loss
from .variants import autotune, list_variants, tuned_variants, use_variant

__all__ = ["bottleneck_adapter", "reference", "uses_triton", "list_variants", "use_variant", "autotune",
           "tuned_variants", "load_balancing_loss"]
