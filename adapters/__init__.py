"""Fused adapters as drop-in layers for timm Vision Transformers. No Triton code here: every
adapter calls the fused op in fused_adapters.kernels.

    model = timm.create_model("vit_base_patch16_224", num_classes=10)
    inject(model, AdapterConfig())          # Adapter+; freezes the backbone, head trainable
    save_adapters(model, "out/")
    load_adapters(fresh_model, "out/")
"""

from .config import POSITIONS, AdapterConfig
from .io import load_adapters, save_adapters
from .modules import BottleneckAdapter
from .timm_vit import (
    active_adapter,
    adapter_configs,
    disable_adapters,
    inject,
    param_groups,
    set_adapter,
    trainable_parameters,
)

__all__ = [
    "POSITIONS",
    "AdapterConfig",
    "BottleneckAdapter",
    "active_adapter",
    "adapter_configs",
    "disable_adapters",
    "inject",
    "load_adapters",
    "param_groups",
    "save_adapters",
    "set_adapter",
    "trainable_parameters",
]
