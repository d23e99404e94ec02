"""Triton kernels, autograd ops and their plain-PyTorch references. No nn.Module here.

`bottleneck_adapter` is the fused bottleneck adapter; `lora_linear` a LoRA-adapted linear (base GEMM
and low-rank branch); `sparse_adapter` and `routed_adapter` the
sparse mixture of adapters (gated top-k, or routed by the caller); `reference` holds the spec of every op.
`list_variants`, `use_variant` and `autotune` name and choose the kernels' launch variants.
`backend(x)` says which path ("triton", "interpreter" or "reference") the ops take for x.
"""

from . import reference, sparse
from .bottleneck import backend, bottleneck_adapter, uses_triton
from .lora import lora_linear
from .reference import load_balancing_loss
from .sparse import routed_adapter, sparse_adapter
from .variants import autotune, list_variants, tuned_variants, use_variant

__all__ = ["bottleneck_adapter", "reference", "backend", "uses_triton", "list_variants", "use_variant", "autotune",
           "tuned_variants", "load_balancing_loss", "sparse_adapter", "routed_adapter", "sparse",
           "lora_linear"]
