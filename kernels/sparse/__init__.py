"""The sparse mixture of adapters (gated and routed forms; dense-masked and grouped designs):
jit_dense.py and jit_grouped.py (the Triton kernels), configs.py (tile tables and variants),
plan.py (the launches and the choice of design), op.py (custom ops, autograd, the public
functions)."""

from .op import routed_adapter, routed_adapter_unchecked, sparse_adapter

__all__ = ["sparse_adapter", "routed_adapter", "routed_adapter_unchecked"]
