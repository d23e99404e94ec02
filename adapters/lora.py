"""LoRA (Hu et al. 2021) on the linears of timm ViT blocks, each update one fused op call.

An adapted linear keeps its class's behaviour, its weights and its state-dict keys
(`blocks.0.attn.qkv.weight` stays): inject swaps its class for LoraLinear, an nn.Linear
subclass that adds a ModuleDict `lora` (adapter name -> LoraBranch) and runs

    y = F.linear(x, W, b) + (alpha / r) * (x A^T) B^T

through the kernels' lora_linear op: by default the frozen base GEMM followed by one
bottleneck_adapter call with the identity activation, whose residual argument carries the base
output; under kernels.use_variant("lora_linear", "single_launch") one Triton launch for both.
A is [r, D_in], B is [D_out, r] (zero at init, so a fresh adapter computes exactly what the
backbone did).

Merging (LoraLinear.merge_weight) folds s * B A into W in fp32 and keeps an exact copy of the
original W, so unmerging restores it bit for bit and disabled forwards still see it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import bottleneck_adapter, lora_linear, new_seed, reference
from .config import TARGET_PATHS, TARGETS, LoraConfig
from .kinds import AdapterKind, Built, register_kind
from .record import AdapterRecord
from .routing import mixed_lora_forward
from .surgery import vit_blocks

__all__ = ["LoraConfig", "LoraBranch", "LoraLinear", "LoraKind", "TARGETS", "TARGET_PATHS"]

MERGED_METADATA = "fused_adapters_merged_lora"  # state-dict metadata: the adapter merged into a weight


class LoraBranch(nn.Module):
    """One named low-rank update of one linear: `lora_A` [rank, in_features], `lora_B`
    [out_features, rank], `scale` = alpha / rank (alpha / sqrt(rank) with use_rslora).
    forward(x, base) returns base + scale * (dropout(x) A^T) B^T as one fused op call: dropout (in
    training) masks x as the kernel reads it for the down projection, from a seed drawn from
    torch's generator each forward, and base was computed from the undropped x, as in PEFT.
    `fused=False` runs the plain-PyTorch reference with the same seed draw."""

    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 8.0, *,
                 dropout: float = 0.0, init: str = "lora", use_rslora: bool = False, fused: bool = True, device=None,
                 dtype=None):
        super().__init__()
        config = LoraConfig(rank=rank, alpha=alpha, dropout=dropout, init=init, use_rslora=use_rslora)  # validates
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha, self.scale, self.use_rslora = float(alpha), config.scale, use_rslora
        self.dropout, self.init, self.fused = float(dropout), init, fused
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "lora":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.rank)
            nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, dropout={self.dropout}{', rslora' if self.use_rslora else ''}")

    def delta_weight(self) -> torch.Tensor:
        """scale * B A in fp32, the [out_features, in_features] update merging adds to W."""
        with torch.no_grad(), torch.autocast(self.lora_A.device.type, enabled=False):
            return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def active_dropout(self) -> float:
        """The dropout rate this forward applies: the configured one in training, else 0."""
        return self.dropout if self.training else 0.0

    def forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        dropout = self.active_dropout()
        fn = bottleneck_adapter if self.fused else reference.bottleneck_adapter
        return fn(x, self.lora_A, None, self.lora_B, None, self.scale, activation="identity", residual=base,
                  input_dropout=dropout, seed=new_seed(x.device) if dropout > 0.0 else None)


class LoraLinear(nn.Linear):
    """An nn.Linear with named LoRA branches (`lora`: name -> LoraBranch). inject makes one from a
    block's nn.Linear in place, so its parameters, their keys and the module path stay; which
    branch runs (`active_lora`) and which is merged into the weight (`merged_lora`) are read from
    the model's record, as every adapted module's are.

    Merged, the forward is the plain F.linear on the merged weight; with no active branch it
    uses the original weight kept at merge (`lora_original`, a non-persistent buffer)."""

    lora: nn.ModuleDict
    _fused_record: AdapterRecord

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_lora(AdapterRecord())

    def _init_lora(self, record: AdapterRecord) -> None:
        self.lora = nn.ModuleDict()
        self._fused_record = record
        self.register_buffer("lora_original", None, persistent=False)

    @property
    def active_lora(self) -> Optional[str]:
        name = self._fused_record.running
        return name if name in self.lora else None

    @property
    def merged_lora(self) -> Optional[str]:
        name = self._fused_record.merged
        return name if name in self.lora else None

    @classmethod
    def adopt(cls, linear: nn.Linear, record: AdapterRecord) -> "LoraLinear":
        """Turn `linear` (exactly an nn.Linear, or already a LoraLinear of this record) into a
        LoraLinear in place."""
        if isinstance(linear, cls):
            return linear
        linear.__class__ = cls
        linear._init_lora(record)
        return linear

    def release(self) -> nn.Linear:
        """Back to a plain nn.Linear in place (no branches may be left)."""
        if len(self.lora) or self.lora_original is not None:
            raise ValueError(f"release needs a LoraLinear without branches; it has {list(self.lora)}")
        del self.lora
        del self._buffers["lora_original"]
        del self._fused_record
        self.__class__ = nn.Linear
        return self

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, lora={list(self.lora)}, active={self.active_lora}, "
                f"merged={self.merged_lora}")

    def merge_weight(self, name: str) -> None:
        """W += scale * B A of branch `name`, summed in fp32 and cast to W's dtype; the original W is
        kept. The record says what is merged: LoraKind.merge calls this for every linear first."""
        if self.lora_original is not None:
            raise ValueError(f"{self.merged_lora!r} is merged already; unmerge first")
        delta = self.lora[name].delta_weight()
        with torch.no_grad():
            self.lora_original = self.weight.detach().clone()
            self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))

    def unmerge_weight(self) -> None:
        """Put the original weight back exactly."""
        if self.lora_original is None:
            return
        with torch.no_grad():
            self.weight.copy_(self.lora_original)
        self.lora_original = None

    # A merged linear's weight is W + scale * B A, and its original W lives in a non-persistent
    # buffer: a state dict records the merge in its metadata (no extra key, so plain nn.Linear
    # checkpoints keep loading), and loading checks it against this linear's state (the model's
    # load_state_dict checks every linear before anything loads: LoraKind.check_load).
    MERGED_METADATA = MERGED_METADATA

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if self.merged_lora is not None and metadata is not None and prefix[:-1] in metadata:
            metadata[prefix[:-1]][MERGED_METADATA] = self.merged_lora

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        _check_merge_state(self, prefix, state_dict, local_metadata.get(MERGED_METADATA))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        record = self._fused_record
        name, merged = record.running, record.merged
        routing = record.routing
        if routing is not None and routing.names[0] in self.lora:  # task_routing: each image its own branch
            weight = self.lora_original if merged is not None and merged in self.lora else self.weight
            branches = [self.lora[task] for task in routing.names]
            return mixed_lora_forward(branches, routing.task_of_sample, x, F.linear(x, weight, self.bias))
        if merged is not None and merged in self.lora:
            return F.linear(x, self.weight if name == merged else self.lora_original, self.bias)
        if name is None or name not in self.lora:
            return F.linear(x, self.weight, self.bias)
        branch = self.lora[name]
        if branch.fused:
            return lora_linear(x, self.weight, self.bias, branch.lora_A, branch.lora_B, branch.scale,
                               dropout=branch.active_dropout())
        return branch(x, F.linear(x, self.weight, self.bias))


def _check_merge_state(linear: LoraLinear, prefix: str, state_dict, saved: Optional[str]) -> None:
    """ValueError where loading state_dict's keys under prefix into linear would not match the merge
    state: weights into a merged linear, or a merged weight (saved names the adapter) into an
    unmerged one."""
    merged = linear.merged_lora
    if merged is not None and any(key.startswith(prefix) for key in state_dict):
        raise ValueError(f"state_dict: {prefix[:-1] or 'this linear'} has LoRA adapter {merged!r} merged into its "
                         f"weight (merge_adapters); loaded weights would not match that merge and unmerging would "
                         f"bring back the old ones. Call unmerge_adapters(model) first")
    if saved is not None and merged is None and prefix + "weight" in state_dict:
        raise ValueError(f"state_dict: its {prefix}weight has LoRA adapter {saved!r} merged into it (saved after "
                         f"merge_adapters); loaded here it would add that adapter twice, or keep it with the adapter "
                         f"off. Save the state dict unmerged (unmerge_adapters before state_dict())")


def target_linears(block: nn.Module, targets) -> dict[str, nn.Module]:
    """target name -> the block's module at that target's path; TypeError where it is missing."""
    found = {}
    for target in targets:
        path = TARGET_PATHS[target]
        try:
            found[target] = block.get_submodule(path)
        except AttributeError:
            raise TypeError(f"LoRA target {target!r} needs the block to have {path}; "
                            f"{type(block).__name__} has none") from None
    return found


def _adapted_linears(model: nn.Module) -> dict[str, LoraLinear]:
    """Module path -> LoraLinear, for every adapted target linear of the model's blocks."""
    found = {}
    for index, block in enumerate(model.blocks):
        for path in TARGET_PATHS.values():
            try:
                module = block.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(module, LoraLinear):
                found[f"blocks.{index}.{path}"] = module
    return found


class LoraKind(AdapterKind):
    """LoRA branches on the target linears of every block (LoraConfig)."""

    file_kind = "lora"
    config_class = LoraConfig
    noun = "a LoRA adapter"

    def build(self, model, name, config, record) -> Built:
        blocks = vit_blocks(model)
        linears = [target_linears(block, config.targets) for block in blocks]
        for index, found in enumerate(linears):  # check every block before building any
            for target, linear in found.items():
                if not isinstance(linear, LoraLinear) and type(linear) is not nn.Linear:
                    raise TypeError(f"LoRA adapts torch.nn.Linear layers; blocks[{index}].{TARGET_PATHS[target]} is "
                                    f"{type(linear).__module__}.{type(linear).__name__}")
        branches = {}
        for index, found in enumerate(linears):
            for target, linear in found.items():
                branches[f"blocks.{index}.{TARGET_PATHS[target]}"] = (linear, LoraBranch(
                    linear.in_features, linear.out_features, config.rank, config.alpha, dropout=config.dropout,
                    init=config.init, use_rslora=config.use_rslora, device=linear.weight.device,
                    dtype=linear.weight.dtype,
                ))

        def attach():
            for linear, branch in branches.values():
                LoraLinear.adopt(linear, record).lora[name] = branch

        return Built({path: branch for path, (_, branch) in branches.items()}, attach)

    def modules(self, model, name) -> dict:
        return {path: linear.lora[name] for path, linear in _adapted_linears(model).items() if name in linear.lora}

    def remove(self, model, name) -> None:
        for linear in _adapted_linears(model).values():
            if name in linear.lora:
                del linear.lora[name]
                if not len(linear.lora):
                    linear.release()

    def summary(self, model, name, config) -> str:
        rslora = " (rsLoRA: alpha / sqrt(rank))" if config.use_rslora else ""
        return f"LoRA on {'+'.join(config.targets)}, rank {config.rank}, alpha {config.alpha:g}{rslora}"

    def model_info(self, model, config) -> dict:
        return {"linears": _linear_shapes(model, config.targets)}

    def check_model_info(self, saved, current, source) -> None:
        for target, shape in saved.get("linears", {}).items():
            if target not in current["linears"]:
                raise ValueError(f"{source}: model.linears lists {target!r}, which its config's targets "
                                 f"{sorted(current['linears'])} do not name: the file was not written as one")
            if current["linears"][target] != shape:
                raise ValueError(f"LoRA adapters in {source} were saved for a model whose {TARGET_PATHS[target]} "
                                 f"weights are [out, in] = {shape}; this model's are {current['linears'][target]}")

    def routing_fields(self, config) -> tuple:
        return ("rank", "targets")

    def routing_refusal(self, name, config):
        return None

    def merge_refusal(self, name, config):
        return None

    def merge(self, model, name) -> None:
        for linear in _adapted_linears(model).values():
            if name in linear.lora:
                linear.merge_weight(name)

    def unmerge(self, model, name) -> None:
        for linear in _adapted_linears(model).values():
            linear.unmerge_weight()

    def check_load(self, model, state_dict, prefix, local_metadata) -> None:
        saved = local_metadata.get(MERGED_METADATA)
        metadata = getattr(state_dict, "_metadata", None) or {}
        for path, linear in _adapted_linears(model).items():
            at = f"{prefix}{path}"
            merged = saved.get(path) if isinstance(saved, dict) else metadata.get(at, {}).get(MERGED_METADATA)
            _check_merge_state(linear, at + ".", state_dict, merged)

    def root_metadata(self, model) -> dict:
        merged = {path: linear.merged_lora for path, linear in _adapted_linears(model).items()
                  if linear.merged_lora is not None}
        return {MERGED_METADATA: merged} if merged else {}


def _linear_shapes(model: nn.Module, targets) -> dict:
    """target -> [out, in] of that linear in every block ([out, in] of block 0 when all agree,
    else the list of every block's)."""
    shapes = {target: [] for target in targets}
    for block in vit_blocks(model):
        for target, module in target_linears(block, targets).items():
            weight = getattr(module, "weight", None)
            shapes[target].append(list(weight.shape) if isinstance(weight, torch.Tensor) else None)
    return {target: found[0] if all(s == found[0] for s in found) else found for target, found in shapes.items()}


register_kind(LoraKind())
