"""AdapterFusion over N bottleneck adapters, computed in rank space (op.py: the folds, the custom
ops and the public function; jit.py: the scores kernel; configs.py and plan.py: its launches)."""

from .op import adapter_fusion

__all__ = ["adapter_fusion"]
