"""Fused adapters as drop-in layers for timm Vision Transformers. No Triton code here: every
adapter calls the fused op in fused_adapters.kernels.

    model = timm.create_model("vit_base_patch16_224", num_classes=10)
    inject(model, AdapterConfig())          # Adapter+; freezes the backbone, head trainable
    save_adapters(model, "out/")
    load_adapters(fresh_model, "out/")

    inject(model, AdapterConfig(experts=8, top_k=2), name="moa")   # a sparse mixture per block
    loss = criterion(model(x), y) + model_aux_loss(model)
    with task_routing(model, ["cars", "birds", ...]):             # one adapter per image
        logits = model(images)
"""

from .config import POSITIONS, AdapterConfig
from .io import load_adapters, save_adapters
from .modules import BottleneckAdapter, SparseAdapter
from .timm_vit import (
    active_adapter,
    adapter_configs,
    disable_adapters,
    inject,
    model_aux_loss,
    param_groups,
    set_adapter,
    task_routing,
    trainable_parameters,
)

__all__ = [
    "POSITIONS",
    "AdapterConfig",
    "BottleneckAdapter",
    "SparseAdapter",
    "active_adapter",
    "adapter_configs",
    "disable_adapters",
    "inject",
    "load_adapters",
    "model_aux_loss",
    "param_groups",
    "save_adapters",
    "set_adapter",
    "task_routing",
    "trainable_parameters",
]
