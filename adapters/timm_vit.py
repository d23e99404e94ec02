"""The public calls on a timm Vision Transformer's adapters: inject them, switch between named
adapters, disable them for a block, merge LoRA into the weights, delete them, freeze the
backbone, build AdamW parameter groups, sum the mixtures' auxiliary losses.

Every call goes through the adapter kind of the config it concerns (adapters/kinds.py: the
bottleneck kind in bottleneck.py, LoRA in lora.py, LoSA in losa.py) and through the model's one
record of what is injected, active and merged (adapters/record.py), which every adapted
forward reads. A call either does all it says or raises before changing anything: the record,
the tensors and the requires_grad flags stay as they were. Calls that change the adapters raise
inside `disable_adapters` and `task_routing` blocks, which put the model back as it was on exit.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional, Union

import torch
from torch import nn

from ..kernels import backend
from . import owned
from .config import AdapterConfig, LoraConfig, LosaConfig
from .kinds import kind_of
from .record import ATTRIBUTE, AdapterRecord, Frame, record_of, refuse_inside_frames
from .routing import task_routing
from .surgery import classifier_heads, vit_blocks

__all__ = ["inject", "set_adapter", "disable_adapters", "param_groups", "trainable_parameters", "adapter_configs",
           "model_aux_loss", "task_routing", "merge_adapters", "unmerge_adapters", "merged_adapter",
           "delete_adapter", "active_adapter", "adapter_summary", "adapter_state", "Injection"]

Config = Union[AdapterConfig, LoraConfig, LosaConfig]
logger = logging.getLogger("fused_adapters")


def adapter_configs(model: nn.Module) -> dict:
    """The configs of the adapters injected into model, by name, in injection order (a copy;
    empty if none)."""
    record = record_of(model)
    return dict(record.configs) if record is not None else {}


def active_adapter(model: nn.Module) -> Optional[str]:
    """The name set_adapter (or inject, load_adapters) made active, or None."""
    record = record_of(model)
    return record.active if record is not None else None


def merged_adapter(model: nn.Module) -> Optional[str]:
    """The name of the LoRA adapter merged into the base weights, or None."""
    record = record_of(model)
    return record.merged if record is not None else None


def inject(model: nn.Module, config: Optional[Config] = None, name: str = "default",
           verbose: bool = True) -> nn.Module:
    """Add adapters named `name` to a timm ViT, make them the active ones, freeze everything
    else, and return the model.

    config: an AdapterConfig (bottleneck adapters in every block; the default), a LoraConfig
    (LoRA branches on the blocks' target linears) or a LosaConfig (a side network on the frozen
    backbone's block features, which then runs without autograd; see adapters/losa.py). A model
    may hold every kind under different names; one name is active at a time.

    With config.train_head the adapter gets its own trainable copy of the classifier head (and
    with AdapterConfig.train_norms of every backbone LayerNorm), copied from the model's
    original: `set_adapter` switches those copies with the adapters, `disable_adapters` runs
    the originals. A merged LoRA adapter is unmerged first (the new adapter becomes active).
    The new modules take the model's train/eval mode.

    With verbose, logs (logger "fused_adapters", level INFO) what adapter_summary returns: the
    trainable parameter count and the path the kernels take. Raises TypeError for models whose
    blocks (or LoRA target linears) are not timm Blocks (nn.Linear), ValueError for a name
    already injected; either leaves the model as it was.
    """
    Injection(model, config, name).attach()
    if verbose:
        logger.info(adapter_summary(model, name))
    return model


class Injection:
    """inject in two steps. Injection(model, config, name) runs every check inject runs and builds
    the adapter's modules, without changing the model; state() is what adapter_state will return
    for it once attached (the tensors a saved copy must hold); attach() puts it in, makes it the
    active adapter and returns the model, and cannot fail. load_adapters checks a file against
    state() in between, so that a refused load leaves the model as it was."""

    def __init__(self, model: nn.Module, config: Optional[Config] = None, name: str = "default"):
        config = config if config is not None else AdapterConfig()
        kind = kind_of(config)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"adapter name must be an identifier-like string, got {name!r}")
        if hasattr(nn.ModuleDict(), name):  # adapters live in ModuleDicts keyed by name
            raise ValueError(f"adapter name {name!r} is an attribute of torch.nn.ModuleDict, which holds the "
                             f"adapters by name; pick another name")
        record = record_of(model)
        refuse_inside_frames(record, "inject")
        vit_blocks(model)
        if record is not None and name in record.configs:
            raise ValueError(f"model already has adapters named {name!r}; pick another name")
        self.model, self.config, self.name = model, config, name
        self.record = record if record is not None else AdapterRecord()
        self.paths = kind.owned_paths(model, config)
        self.built = kind.build(model, name, config, self.record)
        self._attached = False

    def state(self) -> dict:
        return {**_state(self.built.modules, {}, self.name), **owned.expected_state(self.model, self.paths)}

    def attach(self) -> nn.Module:
        """Attach what the kind built, the owned copies and the record entry; then set_adapter.
        A model's first adapter gives it the record, and the load_state_dict guard that lets each
        kind refuse a state dict before anything of it loads."""
        if self._attached:
            raise RuntimeError(f"adapter {self.name!r} was attached already")
        model, record, name = self.model, self.record, self.name
        if record_of(model) is None:
            setattr(model, ATTRIBUTE, record)
            model.register_load_state_dict_pre_hook(_check_load)
            model.register_state_dict_post_hook(_note_state)
        existing = {id(module) for module in model.modules()}
        self.built.attach()
        owned.add_owner(model, name, self.paths)
        for module in model.modules():  # new modules follow the model's train/eval mode
            if id(module) not in existing:
                module.training = model.training
        record.configs[name] = self.config
        _switch(model, record, name)
        self._attached = True
        return model


def adapter_state(model: nn.Module, name: str) -> dict:
    """The tensors of adapter `name` as save_adapters writes them: its kind's modules under their
    file prefixes ("blocks.0.block.down.weight", "blocks.0.attn.qkv.lora_A", "losa.channel.0.w_down")
    and its own modules (head, LayerNorms) under their module paths ("head.weight")."""
    config = _config_named(model, name)
    return _state(kind_of(config).modules(model, name), owned.owned_modules(model, name), name)


def _state(modules: dict, own: dict, name: str) -> dict:
    state = {}
    for prefix, module in modules.items():
        state.update({f"{prefix}.{key}": tensor for key, tensor in module.state_dict().items()})
    for path, module in own.items():
        for key, tensor in module.state_dict().items():
            if f"{path}.{key}" in state:
                raise RuntimeError(f"adapter {name!r}: its own module {path} and its adapters both have {key}")
            state[f"{path}.{key}"] = tensor
    return state


def _kinds(record: AdapterRecord) -> list:
    kinds = []
    for config in record.configs.values():
        kind = kind_of(config)
        if kind not in kinds:
            kinds.append(kind)
    return kinds


def _check_load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    record = record_of(module)
    if record is not None:
        for kind in _kinds(record):
            kind.check_load(module, state_dict, prefix, local_metadata)


def _note_state(module, state_dict, prefix, local_metadata):
    record = record_of(module)
    if record is not None:
        for kind in _kinds(record):
            local_metadata.update(kind.root_metadata(module))


def _drop_record(model: nn.Module) -> None:
    """The model's last adapter is gone: no record, no guard, the plain model."""
    delattr(model, ATTRIBUTE)
    for hooks, ours in ((model._load_state_dict_pre_hooks, _check_load), (model._state_dict_hooks, _note_state)):
        for key, hook in list(hooks.items()):
            if getattr(hook, "hook", hook) is ours:
                del hooks[key]


def adapter_summary(model: nn.Module, name: Optional[str] = None) -> str:
    """One line on adapter `name` (default: the active one): what it is, the path its kernels take
    for the model's parameters outside autocast (kernels.backend: "triton", "interpreter" or
    "reference"), and the model's trainable parameter count with what it is made of: the
    adapter's own parameters, its head and its LayerNorms (e.g. "165,984 adapter + 7,690 head")."""
    name = name if name is not None else active_adapter(model)
    config = _config_named(model, name)
    trainable, total = trainable_parameters(model)
    kernels = backend(next(vit_blocks(model)[0].parameters()))
    kind = kind_of(config)
    what = kind.summary(model, name, config)
    heads = set(owned.head_paths(model))
    counts = {"adapter": sum(p.numel() for module in kind.modules(model, name).values() for p in module.parameters()),
              "head": 0, "LayerNorm": 0}
    for path, module in owned.owned_modules(model, name).items():
        counts["head" if path in heads else "LayerNorm"] += sum(p.numel() for p in module.parameters())
    counted = " + ".join(f"{count:,} {part}" for part, count in counts.items() if count or part == "adapter")
    return (f"fused_adapters: injected {name!r} ({what}; kernels: {kernels}): trainable params {trainable:,} || "
            f"all params {total:,} || trainable {100 * trainable / total:.3f}% ({counted})")


def _config_named(model: nn.Module, name) -> Config:
    """The config of the adapters named `name`; ValueError naming the injected ones if none."""
    configs = adapter_configs(model)
    if name not in configs:
        raise ValueError(f"no adapters named {name!r}; injected: {sorted(configs)}")
    return configs[name]


def set_adapter(model: nn.Module, name: str) -> None:
    """Make the adapters named `name` the active, trainable ones, with their own head (and
    LayerNorms) in place where their config trains them; all other parameters are frozen, and
    adapters of the other names (of any kind) are inactive. If another LoRA adapter is
    merged it is unmerged first; `name` itself stays merged if it is."""
    _config_named(model, name)
    record = record_of(model)
    refuse_inside_frames(record, "set_adapter")
    _switch(model, record, name)


def _switch(model: nn.Module, record: AdapterRecord, name: Optional[str]) -> None:
    """Make `name` (None: none, the bare backbone) the active adapter: unmerge another merged one,
    put its owned copies in place, train its parameters only."""
    if record.merged is not None and record.merged != name:
        kind_of(record.configs[record.merged]).unmerge(model, record.merged)
        record.merged = None
    record.active = name
    record.aux.clear()
    owned.sync(model, record)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if name is not None:
        kind = kind_of(record.configs[name])
        for module in (*kind.modules(model, name).values(), *owned.owned_modules(model, name).values()):
            module.requires_grad_(True)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the original model inside the block (no adapters, the original head and LayerNorms,
    the original weights of a merged LoRA adapter): `with disable_adapters(model): base = model(x)`.
    active_adapter still names the active adapter, and requires_grad flags do not change. Calls
    that change the adapters raise inside the block."""
    record = record_of(model)
    if record is None:  # nothing to disable
        yield model
        return
    with owned.framed(model, record, Frame("disable_adapters")):
        yield model


def merge_adapters(model: nn.Module, name: Optional[str] = None) -> nn.Module:
    """Fold the active LoRA adapter (or `name`, made active first) into the weights of its
    target linears, W += scale * B A (scale alpha / rank, or alpha / sqrt(rank) with rsLoRA;
    summed in fp32, cast to W's dtype), so the forward runs plain linears and no adapter op. An exact copy of every original W is kept
    (one per target linear) so that `unmerge_adapters` restores it bit for bit and
    `disable_adapters` still runs the backbone. Merged weights are for inference: the LoRA
    parameters get no gradient until unmerged. A second merge of the same adapter does
    nothing; set_adapter to another name, inject, load_adapters into it and delete_adapter of
    it unmerge first. The state dict of a merged model holds the merged weights at the usual
    keys, and records in the state dict's metadata that it is merged: load_state_dict refuses
    to load weights into a merged linear, and a merged state dict into an unmerged one (either
    would leave weights that do not match the merge state), before loading anything. Raises
    ValueError with no active adapter or for a bottleneck or LoSA adapter, before changing
    anything."""
    record = record_of(model)
    target = name if name is not None else active_adapter(model)
    if target is None:
        raise ValueError("merge_adapters needs an active LoRA adapter; the model has none "
                         f"(injected: {sorted(adapter_configs(model))})")
    config = _config_named(model, target)
    refusal = kind_of(config).merge_refusal(target, config)
    if refusal is not None:
        raise ValueError(refusal)
    refuse_inside_frames(record, "merge_adapters")
    if record.active != target:
        _switch(model, record, target)
    if record.merged != target:
        kind_of(config).merge(model, target)
        record.merged = target
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Put back the exact original weights merge_adapters kept; the LoRA branch runs again
    (as the fused op). Does nothing when no adapter is merged."""
    record = record_of(model)
    if record is None or record.merged is None:
        return model
    refuse_inside_frames(record, "unmerge_adapters")
    kind_of(record.configs[record.merged]).unmerge(model, record.merged)
    record.merged = None
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove the adapters named `name` (any kind): their modules, their own head (and
    LayerNorm) copies and their config; a merged one is unmerged first. Deleting the active
    adapter leaves none active: the model runs the bare backbone, all frozen, until
    set_adapter; deleting another keeps the active one. Modules with no adapters left get
    their original timm classes back, so deleting every adapter restores the plain model (its
    modules, state-dict keys and outputs). An adapter another one runs over (the adapters of an
    AdapterFusion) is refused with a ValueError while that one is in the model."""
    configs = adapter_configs(model)
    if name not in configs:
        raise ValueError(f"no adapters named {name!r} to delete; injected: {sorted(configs)}")
    record = record_of(model)
    refuse_inside_frames(record, "delete_adapter")
    for other, other_config in configs.items():  # adapters that run over this one (a fusion) refuse
        refusal = None if other == name else kind_of(other_config).delete_refusal(other, other_config, name)
        if refusal is not None:
            raise ValueError(refusal)
    kind = kind_of(configs[name])
    if record.merged == name:
        kind.unmerge(model, name)
        record.merged = None
    kind.remove(model, name)
    owned.remove_owner(model, name)
    del record.configs[name]
    _switch(model, record, None if record.active == name else record.active)
    if not record.configs:
        _drop_record(model)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups as Adapter+ trains: weight decay on the projection matrices only; none on
    biases, scales, norms or any other 1-D parameter. Frozen parameters are left out."""
    decay, no_decay = [], []
    for _, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The classifier's parameters by their names in the model (distilled models have two heads)."""
    ids = {id(p) for head in classifier_heads(model) for p in head.parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in ids}


def model_aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of the auxiliary (load-balancing) losses the model's last forward produced (its
    running mixture adapters', in training, each already times its aux_loss_weight): add it to
    the task loss. A zero tensor when there are none (no mixture ran, eval mode, no grad, or
    the adapters changed since: set_adapter, disable_adapters, ...)."""
    record = record_of(model)
    losses = list(record.aux.values()) if record is not None else []
    if not losses:
        parameter = next(model.parameters(), None)
        return torch.zeros((), device=parameter.device if parameter is not None else None)
    return torch.stack([loss.float() for loss in losses]).sum()
