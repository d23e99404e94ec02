"""The bottleneck kind (AdapterConfig): a BottleneckAdapter, or a SparseAdapter mixture, at one
position of every timm Block.

Each Block keeps its weights and its state-dict keys; inject adds a ModuleDict `adapters` (name ->
that adapter's slots: "block", and "attn" for houlsby) and swaps the block's class for a subclass
whose forward applies the adapter the model's record runs, at its config's position (the
formulas in the README, as the Adapter+ code defines them). Every adapter is one call of the
fused op; its residual argument carries the skip connection.
"""

from __future__ import annotations

import torch
from torch import nn

from . import routing as task_routing
from .config import AdapterConfig
from .kinds import AdapterKind, Built, register_kind
from .modules import BottleneckAdapter, SparseAdapter
from .surgery import Swapped, block_dim, swap_in, swap_out, vit_blocks

__all__ = ["AdaptedBlockMixin", "BottleneckKind"]


class AdaptedBlockMixin(Swapped):
    """Put before a timm Block class in the MRO; forward applies the adapter the record runs."""

    swap_prefix = "Adapted"
    adapters: nn.ModuleDict
    _fused_index: int  # the block's index in model.blocks (the aux-loss key)

    @property
    def active_adapter(self):
        """The name of this block's adapter the record runs, or None (read-only: set_adapter)."""
        name = self._fused_record.running
        return name if name in self.adapters else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        record = self._fused_record
        routing = record.routing
        if routing is not None and routing.names[0] in self.adapters:
            name = routing.names[0]
            adapter = task_routing.PerImageSlots(self.adapters, routing)
        else:  # no routing, or a routing of other kinds' adapters (LoRA's linears route themselves)
            name = record.running
            if name is None or name not in self.adapters:
                return super().forward(x, *args, **kwargs)
            adapter = _RecordingSlots(self.adapters[name], record, (self._fused_index, name))
        # A fusion's slots carry the position of the adapters it runs over (adapters/fusion.py).
        position = getattr(self.adapters[name], "position", None) or record.configs[name].position
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


class _RecordingSlots:
    """One adapter's slots; calling a slot runs it and puts its auxiliary loss (a mixture's, in
    training) into the record under (block index, name, slot), or takes the old one out."""

    def __init__(self, slots: nn.ModuleDict, record, key: tuple):
        self.slots, self.record, self.key = slots, record, key

    def __getitem__(self, slot: str):
        module = self.slots[slot]

        def run(x, residual=None):
            out, aux = module(x, residual=residual, return_aux_loss=True)
            self.record.put_aux(self.key + (slot,), aux)
            return out

        return run


def _attention_kwargs(args, kwargs) -> dict:
    # timm 1.0.x Block.forward signatures: (x), (x, attn_mask=None), (x, attn_mask=None,
    # is_causal=False). Whatever the caller passed goes to the attention, as timm's forward does.
    names = ("attn_mask", "is_causal")
    if len(args) > len(names):
        raise TypeError(f"adapted Block.forward takes at most {len(names)} positional extras, got {len(args)}")
    return {**dict(zip(names, args)), **kwargs}


def _make(model: nn.Module, block: nn.Module, config: AdapterConfig) -> nn.Module:
    dim = block_dim(block)
    reference_param = next(block.parameters())
    factory = {"device": reference_param.device, "dtype": reference_param.dtype}
    norm_eps = getattr(block.norm1, "eps", 1e-6)
    if config.sparse:
        class_token = getattr(model, "cls_token", None) is not None
        return SparseAdapter(
            dim, config.rank, config.experts, config.top_k, routing=config.routing, class_token=class_token,
            activation=config.activation, scaling=config.scaling, init=config.init, drop_path=config.drop_path,
            dropout=config.dropout, norm=config.norm, norm_eps=norm_eps, bias=config.bias,
            aux_loss_weight=config.aux_loss_weight,
            noisy_gating=config.noisy_gating, **factory,
        )
    return BottleneckAdapter(
        dim, config.rank, activation=config.activation, scaling=config.scaling, init=config.init,
        drop_path=config.drop_path, dropout=config.dropout, norm=config.norm, norm_eps=norm_eps, bias=config.bias,
        **factory,
    )


class BottleneckKind(AdapterKind):
    file_kind = "adapter"
    config_class = AdapterConfig
    noun = "a bottleneck adapter"

    def build(self, model, name, config, record) -> Built:
        blocks = vit_blocks(model)
        # houlsby: the attention-branch adapter first, so model.modules() lists them in block order.
        slots = [nn.ModuleDict({"attn": _make(model, block, config), "block": _make(model, block, config)})
                 if config.position == "houlsby" else nn.ModuleDict({"block": _make(model, block, config)})
                 for block in blocks]

        def attach():
            for index, (block, adapter) in enumerate(zip(blocks, slots)):
                if not isinstance(block, AdaptedBlockMixin):
                    swap_in(block, AdaptedBlockMixin)
                    block.adapters = nn.ModuleDict()
                    block._fused_record, block._fused_index = record, index
                block.adapters[name] = adapter

        return Built({f"blocks.{index}": adapter for index, adapter in enumerate(slots)}, attach)

    def modules(self, model, name) -> dict:
        return {f"blocks.{index}": block.adapters[name] for index, block in enumerate(model.blocks)
                if isinstance(block, AdaptedBlockMixin) and name in block.adapters}

    def remove(self, model, name) -> None:
        for block in model.blocks:
            if isinstance(block, AdaptedBlockMixin) and name in block.adapters:
                del block.adapters[name]
                if not len(block.adapters):
                    del block.adapters, block._fused_record, block._fused_index
                    swap_out(block)

    def summary(self, model, name, config) -> str:
        mixture = f", {config.experts} experts top-{config.top_k} by {config.routing}" if config.sparse else ""
        return f"{config.position}, rank {config.rank}{mixture}"

    def routing_fields(self, config) -> tuple:
        # One routed launch has one dropout rate.
        return ("position", "rank", "activation", "norm", "bias", "dropout")

    def routing_refusal(self, name, config):
        if config.sparse:
            return (f"task_routing mixes plain bottleneck adapters; {name!r} is a mixture of experts "
                    f"(experts = {config.experts}), which routes itself")
        return None

    def merge_refusal(self, name, config):
        return (f"cannot merge adapter {name!r}: it is a bottleneck adapter (position {config.position!r}, "
                f"activation {config.activation!r}), a branch with its own input and residual, not a low-rank "
                f"update of a linear's weight; only LoRA adapters merge")


register_kind(BottleneckKind())
