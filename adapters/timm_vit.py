"""Model surgery for timm Vision Transformers: inject adapters into every block, switch between
named adapters, merge LoRA into the weights, delete adapters, freeze the backbone, build AdamW
parameter groups.

Each timm `Block` in `model.blocks` keeps its weights and its state-dict keys; inject adds a
ModuleDict `adapters` (name -> adapters of that name, one per adapted branch) and swaps the
block's class for a subclass whose forward applies the active adapter at its position (the
formulas in the README, as the Adapter+ code defines them). LoRA adapters (LoraConfig) swap
the class of the block's target linears instead (adapters/lora.py); LoSA adapters (LosaConfig)
swap the model's class, whose forward_features then feeds a side network (adapters/losa.py).
Every adapter is one call of the fused op; its residual argument carries the skip connection
(the base GEMM's output for LoRA).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch
from torch import nn

from ..kernels import backend
from . import owned
from .config import AdapterConfig
from .lora import LoraConfig, add_branches, lora_linears
from .losa import LosaConfig, LosaModelMixin, add_side_network, remove_side_network
from .modules import BottleneckAdapter, SparseAdapter, mixed_task_forward

__all__ = ["inject", "set_adapter", "disable_adapters", "param_groups", "trainable_parameters", "adapter_configs",
           "model_aux_loss", "task_routing", "merge_adapters", "unmerge_adapters", "merged_adapter",
           "delete_adapter"]

Config = Union[AdapterConfig, LoraConfig, LosaConfig]

# Branch modules the positions other than "post" rebuild the block from.
BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


class AdaptedBlockMixin:
    """Put before a timm Block class in the MRO; forward applies `self.active_adapter`."""

    active_adapter: Optional[str]
    adapters: nn.ModuleDict
    adapter_positions: dict
    _adapted_base: type  # the timm Block class this one extends

    def __reduce_ex__(self, protocol):
        # Pickle (torch.save of a whole model, deepcopy) by the base class, which is importable
        # anywhere; the adapted subclass is rebuilt on load, in whatever process that is.
        return _rebuild_adapted_block, (self._adapted_base,), self.__getstate__()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self.active_adapter
        if name is None:
            return super().forward(x, *args, **kwargs)
        position = self.adapter_positions[name]
        routing = getattr(self, "_task_routing", None)
        adapter = _TaskMix(self, *routing) if routing is not None else self.adapters[name]
        if position in ("post", "pfeiffer"):
            # x = block(x); x = x + A(x). The original forward, whatever its timm version.
            x = super().forward(x, *args, **kwargs)
            return adapter["block"](x, residual=x)
        attn_kwargs = _attention_kwargs(args, kwargs)
        attn = self.drop_path1(self.ls1(self.attn(self.norm1(x), **attn_kwargs)))
        if position == "pre":
            x = x + attn
            x = adapter["block"](x, residual=x)
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if position == "intermediate":
            x = x + attn
            y = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
            # x + y + A(y): the op reads x and y and adds them in its epilogue, and dy's share for
            # y joins dA/dy in one store, so the skip sum costs no kernel in either direction.
            return adapter["block"](y, residual=(x, y))
        if position == "houlsby":
            x = adapter["attn"](attn, residual=(x, attn))  # x + y + A_attn(y), y the attention branch
            y = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
            return adapter["block"](y, residual=(x, y))
        # parallel: y = x + attention branch, z = y + mlp branch(y), out = z + A(y)
        y = x + attn
        z = y + self.drop_path2(self.ls2(self.mlp(self.norm2(y))))
        return adapter["block"](y, residual=z)


class _TaskMix:
    """Stands in for a block's adapters under task_routing: slot -> a callable that runs each
    image through its own task's adapter of that slot (mixed_task_forward)."""

    def __init__(self, block, names, task_of_sample):
        self.block, self.names, self.task_of_sample = block, names, task_of_sample

    def __getitem__(self, slot):
        adapters = [self.block.adapters[name][slot] for name in self.names]

        def run(x, residual=None):
            if x.shape[0] != self.task_of_sample.shape[0]:
                raise ValueError(f"task_routing was given {self.task_of_sample.shape[0]} task names but the batch "
                                 f"has {x.shape[0]} images")
            return mixed_task_forward(adapters, self.task_of_sample, x, residual=residual)

        return run


def _attention_kwargs(args, kwargs) -> dict:
    # timm 1.0.x Block.forward signatures: (x), (x, attn_mask=None), (x, attn_mask=None,
    # is_causal=False). Whatever the caller passed goes to the attention, as timm's forward does.
    names = ("attn_mask", "is_causal")
    if len(args) > len(names):
        raise TypeError(f"adapted Block.forward takes at most {len(names)} positional extras, got {len(args)}")
    return {**dict(zip(names, args)), **kwargs}


_ADAPTED_CLASSES: dict[type, type] = {}


def _adapted_class(block_class: type) -> type:
    """The subclass of block_class with the adapter forward, made once per class."""
    if issubclass(block_class, AdaptedBlockMixin):
        return block_class
    if block_class not in _ADAPTED_CLASSES:
        _ADAPTED_CLASSES[block_class] = type(
            f"Adapted{block_class.__name__}", (AdaptedBlockMixin, block_class),
            {"__module__": __name__, "_adapted_base": block_class},
        )
    return _ADAPTED_CLASSES[block_class]


def _rebuild_adapted_block(block_class: type) -> nn.Module:
    adapted = _adapted_class(block_class)
    return adapted.__new__(adapted)


def _blocks(model: nn.Module) -> nn.Sequential:
    from timm.models.vision_transformer import Block

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise TypeError(
            f"inject needs a timm Vision Transformer with a non-empty `blocks` Sequential/ModuleList; "
            f"{type(model).__name__} has {'no blocks' if blocks is None else type(blocks).__name__}"
        )
    for index, block in enumerate(blocks):
        if not isinstance(block, Block):
            raise TypeError(
                f"inject adapts timm.models.vision_transformer.Block; blocks[{index}] is "
                f"{type(block).__module__}.{type(block).__name__}"
            )
        missing = [part for part in BLOCK_PARTS if not hasattr(block, part)]
        if missing:
            raise TypeError(f"blocks[{index}] ({type(block).__name__}) lacks {missing}, which the adapters need")
    return blocks


def _block_dim(block: nn.Module) -> int:
    norm = block.norm1
    shape = getattr(norm, "normalized_shape", None) or (getattr(norm, "weight", None).shape[-1],)
    return int(shape[-1])


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The classifier's parameters by their names in the model (distilled models have two heads)."""
    heads = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    ids = {id(p) for head in heads if isinstance(head, nn.Module) for p in head.parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in ids}


def adapter_configs(model: nn.Module) -> dict[str, Config]:
    """The configs of the adapters injected into model, by name (empty if none)."""
    return getattr(model, "_fused_adapter_configs", {})


def inject(model: nn.Module, config: Optional[Config] = None, name: str = "default",
           verbose: bool = True) -> nn.Module:
    """Add adapters named `name` to every block of a timm ViT, make them the active ones, freeze
    everything else, and return the model.

    config: an AdapterConfig (bottleneck adapters in the blocks; the default), a LoraConfig
    (LoRA branches on the blocks' target linears) or a LosaConfig (a side network on the frozen
    backbone's block features, which then runs without autograd; see adapters/losa.py). A model
    may hold every kind under different names; one name is active at a time.

    With config.train_head the adapter gets its own trainable copy of the classifier head (and
    with AdapterConfig.train_norms of every backbone LayerNorm), copied from the model's
    original: `set_adapter` switches those copies with the adapters, `disable_adapters` runs
    the originals. A merged LoRA adapter is unmerged first (the new adapter becomes active).
    The new modules take the model's train/eval mode.

    With verbose, prints the trainable parameter count and the path the adapters' kernels take
    for the model's parameters outside autocast (kernels.backend: "triton", "interpreter" or
    "reference"). Raises TypeError for models whose blocks (or LoRA target linears) are not
    timm Blocks (nn.Linear), ValueError for a name already injected.
    """
    config = config if config is not None else AdapterConfig()
    if not isinstance(config, (AdapterConfig, LoraConfig, LosaConfig)):
        raise TypeError(f"config must be an AdapterConfig, a LoraConfig or a LosaConfig, got {type(config).__name__}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"adapter name must be an identifier-like string, got {name!r}")
    if hasattr(nn.ModuleDict(), name):  # adapters live in ModuleDicts keyed by name
        raise ValueError(f"adapter name {name!r} is an attribute of torch.nn.ModuleDict, which holds the adapters "
                         f"by name; pick another name")
    blocks = _blocks(model)
    configs = dict(adapter_configs(model))
    if name in configs:
        raise ValueError(f"model already has adapters named {name!r}; pick another name")
    existing = {id(module) for module in model.modules()}
    if isinstance(config, LoraConfig):
        add_branches(blocks, name, config)
    elif isinstance(config, LosaConfig):
        add_side_network(model, blocks, name, config, _block_dim(blocks[0]))
    else:
        _add_bottlenecks(model, blocks, name, config)
    owned.add_owner(model, name, _paths_to_own(model, config))
    for module in model.modules():  # new modules follow the model's train/eval mode
        if id(module) not in existing:
            module.training = model.training
    configs[name] = config
    model._fused_adapter_configs = configs
    set_adapter(model, name)
    if verbose:
        trainable, total = trainable_parameters(model)
        path = backend(next(_blocks(model)[0].parameters()))
        if isinstance(config, LoraConfig):
            what = f"LoRA on {'+'.join(config.targets)}, rank {config.rank}, alpha {config.alpha:g}"
        elif isinstance(config, LosaConfig):
            what = (f"LoSA side network on {len(model.losa[name].blocks)} blocks, channel rank {config.channel_rank}, "
                    f"token rank {config.token_rank}")
        else:
            mixture = f", {config.experts} experts top-{config.top_k} by {config.routing}" if config.sparse else ""
            what = f"{config.position}, rank {config.rank}{mixture}"
        print(f"fused_adapters: injected {name!r} ({what}; kernels: {path}): "
              f"trainable params {trainable:,} || all params {total:,} || trainable {100 * trainable / total:.3f}%")
    return model


def _add_bottlenecks(model: nn.Module, blocks, name: str, config: AdapterConfig) -> None:
    for block in blocks:
        dim = _block_dim(block)
        reference_param = next(block.parameters())
        factory = {"device": reference_param.device, "dtype": reference_param.dtype}

        norm_eps = getattr(block.norm1, "eps", 1e-6)
        class_token = getattr(model, "cls_token", None) is not None

        def make():
            if config.sparse:
                return SparseAdapter(
                    dim, config.rank, config.experts, config.top_k, routing=config.routing, class_token=class_token,
                    activation=config.activation, scaling=config.scaling, init=config.init,
                    drop_path=config.drop_path, norm=config.norm, norm_eps=norm_eps, bias=config.bias,
                    aux_loss_weight=config.aux_loss_weight, noisy_gating=config.noisy_gating, **factory,
                )
            return BottleneckAdapter(
                dim, config.rank, activation=config.activation, scaling=config.scaling, init=config.init,
                drop_path=config.drop_path, dropout=config.dropout, norm=config.norm, norm_eps=norm_eps,
                bias=config.bias, **factory,
            )

        # houlsby: the attention-branch adapter first, so model.modules() lists them in block order.
        slots = {"attn": make(), "block": make()} if config.position == "houlsby" else {"block": make()}
        if not isinstance(block, AdaptedBlockMixin):
            block.__class__ = _adapted_class(type(block))
            block.adapters = nn.ModuleDict()
            block.adapter_positions = {}
        block.adapters[name] = nn.ModuleDict(slots)
        block.adapter_positions[name] = config.position


def _paths_to_own(model: nn.Module, config: Config) -> list[str]:
    paths = owned.head_paths(model) if config.train_head else []
    if getattr(config, "train_norms", False):
        paths += owned.norm_paths(model)
    return paths


def set_adapter(model: nn.Module, name: str) -> None:
    """Make the adapters named `name` the active, trainable ones, with their own head (and
    LayerNorms) in place where their config trains them; all other parameters are frozen, and
    adapters of the other names (of any kind) are inactive. If another LoRA adapter is
    merged it is unmerged first; `name` itself stays merged if it is."""
    _config_named(model, name)
    _activate(model, name)


def _config_named(model: nn.Module, name: str) -> Config:
    """The config of the adapters named `name`; ValueError naming the injected ones if none."""
    configs = adapter_configs(model)
    if name not in configs:
        raise ValueError(f"no adapters named {name!r}; injected: {sorted(configs)}")
    return configs[name]


def _activate(model: nn.Module, name: Optional[str]) -> None:
    """set_adapter, or for None: no active adapter (the bare backbone, everything frozen)."""
    merged = merged_adapter(model)
    if merged is not None and merged != name:
        unmerge_adapters(model)
    config = adapter_configs(model)[name] if name is not None else None
    lora = isinstance(config, LoraConfig)
    owned.install(model, name)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for block in _blocks(model):
        if isinstance(block, AdaptedBlockMixin):
            block.active_adapter = name if name in block.adapters and isinstance(config, AdapterConfig) else None
            if block.active_adapter is not None:
                block.adapters[name].requires_grad_(True)
    for linear in lora_linears(model):
        linear.active_lora = name if lora and name in linear.lora else None
        if linear.active_lora is not None:
            linear.lora[name].requires_grad_(True)
    if isinstance(model, LosaModelMixin):
        model._fused_active_losa = name if isinstance(config, LosaConfig) else None
        if model._fused_active_losa is not None:
            model.losa[name].requires_grad_(True)
    if name is not None:
        for module in owned.owned_modules(model, name).values():
            module.requires_grad_(True)
    model._fused_active_adapter = name


def active_adapter(model: nn.Module) -> Optional[str]:
    return getattr(model, "_fused_active_adapter", None)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the original model inside the block (no adapters, the original head and LayerNorms,
    the original weights of a merged LoRA adapter): `with disable_adapters(model): base = model(x)`."""
    blocks = _blocks(model)
    previous = [getattr(block, "active_adapter", None) for block in blocks]
    linears = lora_linears(model)
    previous_lora = [linear.active_lora for linear in linears]
    previous_losa = getattr(model, "_fused_active_losa", None)
    for block in blocks:
        if isinstance(block, AdaptedBlockMixin):
            block.active_adapter = None
    for linear in linears:
        linear.active_lora = None
    if isinstance(model, LosaModelMixin):
        model._fused_active_losa = None
    modules = owned.install(model, None)
    try:
        yield model
    finally:
        owned.restore(model, modules)
        if isinstance(model, LosaModelMixin):
            model._fused_active_losa = previous_losa
        for block, name in zip(blocks, previous):
            if isinstance(block, AdaptedBlockMixin):
                block.active_adapter = name
        for linear, name in zip(linears, previous_lora):
            linear.active_lora = name


def merged_adapter(model: nn.Module) -> Optional[str]:
    """The name of the LoRA adapter merged into the base weights, or None."""
    return getattr(model, "_fused_merged_adapter", None)


def merge_adapters(model: nn.Module, name: Optional[str] = None) -> nn.Module:
    """Fold the active LoRA adapter (or `name`, made active first) into the weights of its
    target linears, W += (alpha / rank) * B A (summed in fp32, cast to W's dtype), so the
    forward runs plain linears and no adapter op. An exact copy of every original W is kept
    (one per target linear) so that `unmerge_adapters` restores it bit for bit and
    `disable_adapters` still runs the backbone. Merged weights are for inference: the LoRA
    parameters get no gradient until unmerged. A second merge of the same adapter does
    nothing; set_adapter to another name, inject, load_adapters into it and delete_adapter of
    it unmerge first. The state dict of a merged model holds the merged weights at the usual
    keys, and records in the state dict's metadata that it is merged: load_state_dict refuses
    to load weights into a merged linear, and a merged state dict into an unmerged one (either
    would leave weights that do not match the merge state). Raises ValueError with no active
    adapter or for a bottleneck or LoSA adapter, before changing anything."""
    target = name if name is not None else active_adapter(model)
    if target is None:
        raise ValueError("merge_adapters needs an active LoRA adapter; the model has none "
                         f"(injected: {sorted(adapter_configs(model))})")
    config = _config_named(model, target)
    if isinstance(config, LosaConfig):
        raise ValueError(f"cannot merge adapter {target!r}: it is a LoSA side network, a network of its own beside the "
                         f"backbone, not a low-rank update of a linear's weight; only LoRA adapters merge")
    if not isinstance(config, LoraConfig):
        raise ValueError(f"cannot merge adapter {target!r}: it is a bottleneck adapter (position {config.position!r}, "
                         f"activation {config.activation!r}), a branch with its own input and residual, not a "
                         f"low-rank update of a linear's weight; only LoRA adapters merge")
    if name is not None:  # checked first: a refused merge leaves the model as it was
        set_adapter(model, name)
    name = target
    if merged_adapter(model) == name:
        return model
    for linear in lora_linears(model):
        if name in linear.lora:
            linear.merge(name)
    model._fused_merged_adapter = name
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Put back the exact original weights merge_adapters kept; the LoRA branch runs again
    (as the fused op). Does nothing when no adapter is merged."""
    for linear in lora_linears(model):
        linear.unmerge()
    model._fused_merged_adapter = None
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove the adapters named `name` (any kind): their modules, their own head (and
    LayerNorm) copies and their config; a merged one is unmerged first. Deleting the active
    adapter leaves none active: the model runs the bare backbone, all frozen, until
    set_adapter; deleting another keeps the active one. Blocks and linears with no adapters
    left get their original timm classes back, so deleting every adapter restores the plain
    model (its modules, state-dict keys and outputs)."""
    configs = dict(adapter_configs(model))
    if name not in configs:
        raise ValueError(f"no adapters named {name!r} to delete; injected: {sorted(configs)}")
    if merged_adapter(model) == name:
        unmerge_adapters(model)
    active = active_adapter(model)
    for block in _blocks(model):
        if isinstance(block, AdaptedBlockMixin) and name in block.adapters:
            del block.adapters[name]
            del block.adapter_positions[name]
            if not len(block.adapters):
                del block.adapters
                del block.adapter_positions, block.active_adapter
                block.__dict__.pop("_task_routing", None)
                block.__class__ = block._adapted_base
    for linear in lora_linears(model):
        if name in linear.lora:
            del linear.lora[name]
            if linear.active_lora == name:
                linear.active_lora = None
            if not len(linear.lora):
                linear.release()
    if isinstance(model, LosaModelMixin) and name in model.losa:
        remove_side_network(model, name)
    owned.remove_owner(model, name)
    del configs[name]
    model._fused_adapter_configs = configs
    _activate(model, None if active == name else active)
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


def model_aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of the auxiliary (load-balancing) losses the active sparse adapters recorded in
    the model's last training forward, each already times its aux_loss_weight: add it to the
    task loss. A zero tensor when there are none (no sparse adapters, eval mode, no grad)."""
    losses = [module.aux_loss for module in model.modules()
              if isinstance(module, SparseAdapter) and module.aux_loss is not None]
    if not losses:
        parameter = next(model.parameters(), None)
        return torch.zeros((), device=parameter.device if parameter is not None else None)
    return torch.stack([loss.float() for loss in losses]).sum()


@contextlib.contextmanager
def task_routing(model: nn.Module, names_per_image) -> Iterator[nn.Module]:
    """Run a batch in which each image uses its own named adapters, all in one launch per adapter
    slot: `with task_routing(model, ["cars", "birds", "cars", ...]): logits = model(images)`.

    names_per_image: one adapter name per image of the batch (or a tensor of indices into the
    sorted distinct names). The named adapters must be plain bottleneck adapters (experts = 1; no LoRA
    or LoSA; an active LoSA side network is off inside the block)
    of one position, rank, activation, norm and bias; their scales may differ. Each image is
    classified by its own task's head where that task owns one (train_head; the heads must give
    outputs of one shape), by the original head otherwise, and likewise for the LayerNorms of
    tasks with train_norms. Inside the block every named adapter's parameters and own modules
    train (gradients reach each image's own ones); their previous requires_grad flags come back
    on exit.
    """
    configs = adapter_configs(model)
    if isinstance(names_per_image, str) or not hasattr(names_per_image, "__len__") or len(names_per_image) == 0:
        raise ValueError("names_per_image must be a non-empty sequence of adapter names, one per image")
    names = sorted(set(names_per_image))
    unknown = [name for name in names if name not in configs]
    if unknown:
        raise ValueError(f"no adapters named {unknown}; injected: {sorted(configs)}")
    for name in names:
        if isinstance(configs[name], (LoraConfig, LosaConfig)):
            kind = "a LoRA adapter" if isinstance(configs[name], LoraConfig) else "a LoSA side network"
            raise ValueError(f"task_routing mixes bottleneck adapters; {name!r} is {kind} (set_adapter runs "
                             f"it, one name per batch)")
    first = configs[names[0]]
    for name in names:
        config = configs[name]
        if config.sparse:
            raise ValueError(f"task_routing mixes plain bottleneck adapters; {name!r} is a mixture of experts "
                             f"(experts = {config.experts}), which routes itself")
        if config.dropout > 0:
            raise ValueError(f"task_routing runs the fused op, which has no dropout inside the bottleneck; "
                             f"{name!r} has dropout {config.dropout}")
        for field in ("position", "rank", "activation", "norm", "bias"):
            if getattr(config, field) != getattr(first, field):
                raise ValueError(f"task_routing needs adapters of one {field}: {names[0]!r} has "
                                 f"{getattr(first, field)!r}, {name!r} has {getattr(config, field)!r}")
    index = {name: i for i, name in enumerate(names)}
    task_of_sample = torch.tensor([index[name] for name in names_per_image], dtype=torch.long)
    blocks = _blocks(model)
    parameters = [p for block in blocks for name in names for p in block.adapters[name].parameters()]
    copies = [owned.owned_modules(model, name) for name in names]
    parameters += [p for own in copies for module in own.values() for p in module.parameters()]
    flags = [p.requires_grad for p in parameters]
    previous = [(getattr(block, "active_adapter", None), getattr(block, "_task_routing", None)) for block in blocks]
    linears = lora_linears(model)
    previous_lora = [linear.active_lora for linear in linears]
    for linear in linears:  # the base weights only (the originals of a merged LoRA adapter)
        linear.active_lora = None
    previous_losa = getattr(model, "_fused_active_losa", None)
    if isinstance(model, LosaModelMixin):  # the backbone's own forward, whatever LoSA adapter was active
        model._fused_active_losa = None
    modules = owned.install(model, None)
    for key, path in owned.owned_paths(model).items():
        if any(path in own for own in copies):
            per_task = [own.get(path, getattr(model, owned.BASE)[key]) for own in copies]
            owned.set_module(model, path, owned.PerImage(per_task, task_of_sample, path))
    for block in blocks:
        block.active_adapter = names[0]
        block._task_routing = (names, task_of_sample)
    for parameter in parameters:
        parameter.requires_grad_(True)
    try:
        yield model
    finally:
        owned.restore(model, modules)
        for block, (active, routing) in zip(blocks, previous):
            block.active_adapter = active
            block._task_routing = routing
        for linear, name in zip(linears, previous_lora):
            linear.active_lora = name
        if isinstance(model, LosaModelMixin):
            model._fused_active_losa = previous_losa
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)
