"""What every adapter kind needs of a timm Vision Transformer, written once: its blocks, their
width, its classifier heads, and the class swap that gives a module an adapter's forward in
place (its parameters, their state-dict keys and its path stay)."""

from __future__ import annotations

from torch import nn

__all__ = ["BLOCK_PARTS", "vit_blocks", "block_dim", "classifier_heads", "Swapped", "swap_in", "swap_out"]

# Branch modules the block positions other than "post" rebuild the block from.
BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def vit_blocks(model: nn.Module) -> nn.Module:
    """model.blocks, checked to be a non-empty Sequential/ModuleList of timm ViT Blocks; TypeError
    naming what is not."""
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


def block_dim(block: nn.Module) -> int:
    """The width D of a block's tokens (its first LayerNorm's)."""
    norm = block.norm1
    shape = getattr(norm, "normalized_shape", None) or (getattr(norm, "weight", None).shape[-1],)
    return int(shape[-1])


def classifier_heads(model: nn.Module) -> list[nn.Module]:
    """The classifier modules that have parameters (distilled ViTs have two; a model made with
    num_classes=0 has none)."""
    heads = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    return [head for head in heads if isinstance(head, nn.Module) and any(True for _ in head.parameters())]


class Swapped:
    """Base of the mixins whose subclasses swap_in makes: put the mixin before a timm class in the
    MRO. Pickling (torch.save of a whole model, deepcopy) goes by the timm class, importable
    anywhere; the swapped subclass is rebuilt on load, in whatever process that is."""

    _fused_base: type  # the class the module had before swap_in
    swap_prefix = ""  # the swapped class is named swap_prefix + the timm class's name

    def __reduce_ex__(self, protocol):
        return _rebuild, (type(self).__mro__[1], self._fused_base), self.__getstate__()


_CLASSES: dict[tuple, type] = {}


def _swapped_class(mixin: type, base: type) -> type:
    if issubclass(base, mixin):
        return base
    key = (mixin, base)
    if key not in _CLASSES:
        name = mixin.swap_prefix + base.__name__
        _CLASSES[key] = type(name, (mixin, base), {"__module__": mixin.__module__, "_fused_base": base})
    return _CLASSES[key]


def _rebuild(mixin: type, base: type) -> nn.Module:
    cls = _swapped_class(mixin, base)
    return cls.__new__(cls)


def swap_in(module: nn.Module, mixin: type) -> None:
    """Give module the subclass (mixin, its class), made once per class; nothing if it has it."""
    module.__class__ = _swapped_class(mixin, type(module))


def swap_out(module: nn.Module) -> None:
    """Back to the class module had before swap_in."""
    module.__class__ = module._fused_base
