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

Merging (LoraLinear.merge) folds s * B A into W in fp32 and keeps an exact copy of the
original W, so unmerging restores it bit for bit and disabled forwards still see it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import bottleneck_adapter, lora_linear, reference
from .config import check_bool, check_probability, check_rank

__all__ = ["LoraConfig", "LoraBranch", "LoraLinear", "TARGETS", "TARGET_PATHS"]

# Config target name -> the linear's path inside a timm Block.
TARGET_PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
TARGETS = tuple(TARGET_PATHS)
LORA_INITS = ("lora", "gaussian")


@dataclass(frozen=True)
class LoraConfig:
    """How to build LoRA branches on the linears of every ViT block.

    rank: r, an int from 1 to MAX_RANK (256, the fused kernels' limit). alpha: a positive
    finite float; the update is scaled by alpha / rank. targets: which linears of every block
    get a branch, a non-empty tuple of distinct names from "qkv" (attn.qkv), "proj"
    (attn.proj), "fc1" (mlp.fc1), "fc2" (mlp.fc2); kept in that order, so configs that name
    the same linears compare equal. dropout: on the branch's input only, in training (as
    PEFT), run as plain PyTorch ops when > 0. init: "lora" (A kaiming-uniform with a=sqrt(5),
    as nn.Linear and PEFT; B zero) or "gaussian" (A normal with std 1/rank; B zero).
    train_head: the adapter owns a trainable copy of the classifier head, as AdapterConfig's.

    Every field is checked at construction: a bad value raises a ValueError naming the field.
    """

    rank: int = 8
    alpha: float = 8.0
    targets: tuple = ("qkv",)
    dropout: float = 0.0
    init: str = "lora"
    train_head: bool = True

    def __post_init__(self):
        check_rank(self)
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"LoraConfig.alpha must be a positive finite float, got {alpha!r}")
        object.__setattr__(self, "alpha", float(alpha))
        targets = self.targets
        if (not isinstance(targets, (tuple, list)) or not targets
                or not all(isinstance(t, str) and t in TARGET_PATHS for t in targets)
                or len(set(targets)) != len(targets)):
            raise ValueError(f"LoraConfig.targets must be a non-empty tuple of distinct names from {TARGETS}, "
                             f"got {targets!r}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))
        check_probability(self, "dropout")
        if not isinstance(self.init, str) or self.init not in LORA_INITS:
            raise ValueError(f"LoraConfig.init must be one of {LORA_INITS}, got {self.init!r}")
        check_bool(self, "train_head")

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on the low-rank update."""
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["targets"] = list(self.targets)  # JSON has lists
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LoraConfig":
        """The config to_dict wrote; unknown fields raise a ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LoraConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)


class LoraBranch(nn.Module):
    """One named low-rank update of one linear: `lora_A` [rank, in_features], `lora_B`
    [out_features, rank], `scale` = alpha / rank. forward(x, base) returns base + scale *
    (x A^T) B^T as one fused op call; in training with dropout > 0, dropout(x) goes through
    plain PyTorch ops instead (the kernel has no dropout). `fused=False` forces that path."""

    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 8.0, *,
                 dropout: float = 0.0, init: str = "lora", fused: bool = True, device=None, dtype=None):
        super().__init__()
        LoraConfig(rank=rank, alpha=alpha, dropout=dropout, init=init)  # validates, naming the field
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha, self.scale = float(alpha), float(alpha) / rank
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
                f"alpha={self.alpha:g}, dropout={self.dropout}")

    def delta_weight(self) -> torch.Tensor:
        """scale * B A in fp32, the [out_features, in_features] update merging adds to W."""
        with torch.no_grad(), torch.autocast(self.lora_A.device.type, enabled=False):
            return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        common = dict(activation="identity", residual=base)
        if self.dropout > 0.0 and self.training:
            x = F.dropout(x, self.dropout, True)
            return reference.bottleneck_adapter(x, self.lora_A, None, self.lora_B, None, self.scale, **common)
        fn = bottleneck_adapter if self.fused else reference.bottleneck_adapter
        return fn(x, self.lora_A, None, self.lora_B, None, self.scale, **common)


class LoraLinear(nn.Linear):
    """An nn.Linear with named LoRA branches (`lora`), the active one (`active_lora`, None for
    the bare linear) and the merged one (`merged_lora`). inject makes one from a block's
    nn.Linear in place (`adopt`), so its parameters, their keys and the module path stay.

    Merged, the forward is the plain F.linear on the merged weight; with no active branch it
    uses the original weight kept at merge (`lora_original`, a non-persistent buffer)."""

    lora: nn.ModuleDict
    active_lora: Optional[str]
    merged_lora: Optional[str]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_lora()

    def _init_lora(self) -> None:
        self.lora = nn.ModuleDict()
        self.active_lora = None
        self.merged_lora = None
        self.register_buffer("lora_original", None, persistent=False)

    @classmethod
    def adopt(cls, linear: nn.Linear) -> "LoraLinear":
        """Turn `linear` (exactly an nn.Linear, or already a LoraLinear) into a LoraLinear in place."""
        if isinstance(linear, cls):
            return linear
        if type(linear) is not nn.Linear:
            raise TypeError(f"LoRA adapts torch.nn.Linear layers; got {type(linear).__module__}."
                            f"{type(linear).__name__}")
        linear.__class__ = cls
        linear._init_lora()
        return linear

    def release(self) -> nn.Linear:
        """Back to a plain nn.Linear in place (no branches may be left)."""
        if len(self.lora) or self.merged_lora is not None:
            raise ValueError(f"release needs a LoraLinear without branches; it has {list(self.lora)}")
        del self.lora
        del self._buffers["lora_original"]
        del self.active_lora, self.merged_lora
        self.__class__ = nn.Linear
        return self

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, lora={list(self.lora)}, active={self.active_lora}, "
                f"merged={self.merged_lora}")

    def merge(self, name: str) -> None:
        """W += scale * B A of branch `name`, summed in fp32 and cast to W's dtype; the original W is kept."""
        if self.merged_lora is not None:
            raise ValueError(f"{self.merged_lora!r} is merged already; unmerge first")
        delta = self.lora[name].delta_weight()
        with torch.no_grad():
            self.lora_original = self.weight.detach().clone()
            self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        self.merged_lora = name

    def unmerge(self) -> None:
        """Put the original weight back exactly."""
        if self.merged_lora is None:
            return
        with torch.no_grad():
            self.weight.copy_(self.lora_original)
        self.lora_original = None
        self.merged_lora = None

    # A merged linear's weight is W + scale * B A, and its original W lives in a non-persistent
    # buffer: a state dict records the merge in its metadata (no extra key, so plain nn.Linear
    # checkpoints keep loading), and loading checks it against this linear's state.
    MERGED_METADATA = "fused_adapters_merged_lora"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if self.merged_lora is not None and metadata is not None and prefix[:-1] in metadata:
            metadata[prefix[:-1]][self.MERGED_METADATA] = self.merged_lora

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved = local_metadata.get(self.MERGED_METADATA)
        if self.merged_lora is not None and any(key.startswith(prefix) for key in state_dict):
            raise ValueError(f"state_dict: {prefix[:-1] or 'this linear'} has LoRA adapter {self.merged_lora!r} merged "
                             f"into its weight (merge_adapters); loaded weights would not match that merge and "
                             f"unmerging would bring back the old ones. Call unmerge_adapters(model) first")
        if saved is not None and self.merged_lora is None and prefix + "weight" in state_dict:
            raise ValueError(f"state_dict: its {prefix}weight has LoRA adapter {saved!r} merged into it (saved after "
                             f"merge_adapters); loaded here it would add that adapter twice, or keep it with the "
                             f"adapter off. Save the state dict unmerged (unmerge_adapters before state_dict())")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_lora
        if self.merged_lora is not None:
            return F.linear(x, self.weight if name == self.merged_lora else self.lora_original, self.bias)
        if name is None:
            return F.linear(x, self.weight, self.bias)
        branch = self.lora[name]
        if branch.fused and not (branch.dropout > 0.0 and branch.training):
            return lora_linear(x, self.weight, self.bias, branch.lora_A, branch.lora_B, branch.scale)
        return branch(x, F.linear(x, self.weight, self.bias))


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


def add_branches(blocks, name: str, config: LoraConfig) -> None:
    """Give the target linears of every block a LoraBranch named `name`."""
    linears = [target_linears(block, config.targets) for block in blocks]
    for index, found in enumerate(linears):  # check every block before changing any
        for target, linear in found.items():
            if not isinstance(linear, LoraLinear) and type(linear) is not nn.Linear:
                raise TypeError(f"LoRA adapts torch.nn.Linear layers; blocks[{index}].{TARGET_PATHS[target]} is "
                                f"{type(linear).__module__}.{type(linear).__name__}")
    for found in linears:
        for linear in found.values():
            linear = LoraLinear.adopt(linear)
            linear.lora[name] = LoraBranch(
                linear.in_features, linear.out_features, config.rank, config.alpha, dropout=config.dropout,
                init=config.init, device=linear.weight.device, dtype=linear.weight.dtype,
            )


def lora_linears(model: nn.Module) -> list[LoraLinear]:
    return [module for module in model.modules() if isinstance(module, LoraLinear)]
