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

    inject(model, LoraConfig(rank=8, targets=("qkv",)), name="lora")  # LoRA on the blocks' linears
    merge_adapters(model)                    # fold it into the weights; unmerge_adapters restores them
    delete_adapter(model, "moa")

    inject(model, LosaConfig(), name="side")  # a side network; the backbone runs without autograd
    features = losa_features(model, images)  # once; then losa_logits(model, features) per epoch

Each kind of adapter is one AdapterKind class in its own file (bottleneck.py, lora.py, losa.py),
registered with register_kind; the public calls dispatch through it. What a model holds, which
adapter is active and which is merged live in one record per model (record.py), read by every
adapted module's forward and changed only by the public calls; a refused call leaves the record,
the tensors and the requires_grad flags as they were.
"""

# The kinds register themselves on import (kinds.register_kind): one file each.
from . import bottleneck, fusion, lora, losa  # noqa: F401
from .config import POSITIONS, AdapterConfig, LoraConfig, LosaConfig
from .continual import I2IResult, evaluate_tasks, i2i_initialize
from .fusion import AdapterFusion, FusionConfig, fusion_regularization
from .io import load_adapters, save_adapters
from .kinds import AdapterKind, register_kind
from .lora import LoraBranch, LoraLinear
from .losa import LosaSideNetwork, losa_features, losa_logits
from .modules import BottleneckAdapter, SparseAdapter
from .timm_vit import (
    Injection,
    active_adapter,
    adapter_configs,
    adapter_state,
    adapter_summary,
    delete_adapter,
    disable_adapters,
    inject,
    merge_adapters,
    merged_adapter,
    model_aux_loss,
    param_groups,
    set_adapter,
    task_routing,
    trainable_parameters,
    unmerge_adapters,
)

__all__ = [
    "POSITIONS",
    "AdapterConfig",
    "AdapterFusion",
    "AdapterKind",
    "BottleneckAdapter",
    "FusionConfig",
    "I2IResult",
    "Injection",
    "LoraBranch",
    "LoraConfig",
    "LoraLinear",
    "LosaConfig",
    "LosaSideNetwork",
    "SparseAdapter",
    "active_adapter",
    "adapter_configs",
    "adapter_state",
    "adapter_summary",
    "delete_adapter",
    "disable_adapters",
    "evaluate_tasks",
    "fusion_regularization",
    "i2i_initialize",
    "inject",
    "load_adapters",
    "losa_features",
    "losa_logits",
    "merge_adapters",
    "merged_adapter",
    "model_aux_loss",
    "param_groups",
    "register_kind",
    "save_adapters",
    "set_adapter",
    "task_routing",
    "trainable_parameters",
    "unmerge_adapters",
]
