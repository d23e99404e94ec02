"""Model surgery for timm Vision Transformers: inject adapters into every block, switch between
named adapters, freeze the backbone, build AdamW parameter groups.

Each timm `Block` in `model.blocks` keeps its weights and its state-dict keys; inject adds a
ModuleDict `adapters` (name -> adapters of that name, one per adapted branch) and swaps the
block's class for a subclass whose forward applies the active adapter at its position (the
formulas in the README, as the Adapter+ code defines them). Every adapter is one call of the
fused op; its residual argument carries the skip connection.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from .config import AdapterConfig
from .modules import BottleneckAdapter

__all__ = ["inject", "set_adapter", "disable_adapters", "param_groups", "trainable_parameters", "adapter_configs"]

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
        adapter = self.adapters[name]
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


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """The configs of the adapters injected into model, by name (empty if none)."""
    return getattr(model, "_fused_adapter_configs", {})


def inject(model: nn.Module, config: Optional[AdapterConfig] = None, name: str = "default",
           verbose: bool = True) -> nn.Module:
    """Add adapters named `name` to every block of a timm ViT, make them the active ones, freeze
    everything else (the head stays trainable when config.train_head), and return the model.

    With verbose, prints the trainable parameter count. Raises TypeError for models whose blocks
    are not timm Blocks, ValueError for a name already injected.
    """
    config = config if config is not None else AdapterConfig()
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"adapter name must be an identifier-like string, got {name!r}")
    blocks = _blocks(model)
    configs = dict(adapter_configs(model))
    if name in configs:
        raise ValueError(f"model already has adapters named {name!r}; pick another name")
    for block in blocks:
        dim = _block_dim(block)
        reference_param = next(block.parameters())
        factory = {"device": reference_param.device, "dtype": reference_param.dtype}

        norm_eps = getattr(block.norm1, "eps", 1e-6)

        def make():
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
    configs[name] = config
    model._fused_adapter_configs = configs
    set_adapter(model, name)
    if verbose:
        trainable, total = trainable_parameters(model)
        print(f"fused_adapters: injected {name!r} ({config.position}, rank {config.rank}): "
              f"trainable params {trainable:,} || all params {total:,} || trainable {100 * trainable / total:.3f}%")
    return model


def set_adapter(model: nn.Module, name: str) -> None:
    """Make the adapters named `name` the active, trainable ones; all other parameters are frozen
    except the head when that adapter's config trains it."""
    configs = adapter_configs(model)
    if name not in configs:
        raise ValueError(f"no adapters named {name!r}; injected: {sorted(configs)}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for block in _blocks(model):
        block.active_adapter = name
        block.adapters[name].requires_grad_(True)
    if configs[name].train_head:
        for parameter in head_parameters(model).values():
            parameter.requires_grad_(True)
    model._fused_active_adapter = name


def active_adapter(model: nn.Module) -> Optional[str]:
    return getattr(model, "_fused_active_adapter", None)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the bare backbone inside the block: `with disable_adapters(model): base = model(x)`."""
    blocks = _blocks(model)
    previous = [getattr(block, "active_adapter", None) for block in blocks]
    for block in blocks:
        if isinstance(block, AdaptedBlockMixin):
            block.active_adapter = None
    try:
        yield model
    finally:
        for block, name in zip(blocks, previous):
            if isinstance(block, AdaptedBlockMixin):
                block.active_adapter = name


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
