"""Triton kernels, autograd ops and their plain-PyTorch references. No nn.Module here.

`bottleneck_adapter` is the fused bottleneck adapter; `lora_linear` a LoRA-adapted linear (base GEMM
and low-rank branch); `sparse_adapter` and `routed_adapter` the sparse mixture of adapters (gated
top-k, or routed by the caller); `adapter_fusion` AdapterFusion, an attention over N bottleneck
adapters computed in rank space; `reference` holds the spec of every op. `list_variants`,
`use_variant` and `autotune` name and choose the kernels' launch variants. `backend(x)` says which
path ("triton", "interpreter" or "reference") the ops take for x. `new_seed(device)` draws the
seed tensor the ops' dropout masks come from (kernels/dropout.py).

Each op is a folder of four parts: jit.py (the Triton kernels), configs.py (tile tables and
variants), plan.py (the only code that turns shapes into launches) and op.py (custom ops,
autograd, the public function). What they share: paths.py (which path runs, the one fallback
rule), launch.py (the Launch and Plan records, tile configuration, SM-count planning),
customop.py (custom-op glue), checks.py, variants.py, epilogue.py, activations.py and dropout.py.
"""

from . import reference
from .bottleneck import bottleneck_adapter
from .dropout import new_seed
from .fusion import adapter_fusion
from .lora import lora_linear
from .paths import backend, uses_triton
from .reference import load_balancing_loss
from .sparse import routed_adapter, sparse_adapter
from .variants import autotune, list_variants, tuned_variants, use_variant

__all__ = ["bottleneck_adapter", "adapter_fusion", "lora_linear", "sparse_adapter", "routed_adapter", "reference", "backend",
           "uses_triton", "list_variants", "use_variant", "autotune", "tuned_variants", "load_balancing_loss", "new_seed"]
