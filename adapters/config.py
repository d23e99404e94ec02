"""The configs of the adapter kinds, each a frozen dataclass checked at construction, with one
to_dict/from_dict (the JSON of adapter_config.json):

- AdapterConfig: bottleneck adapters (and mixtures of them) in the blocks. Defaults are Adapter+
  (Steitz & Roth, "Adapters Strike Back", CVPR 2024): rank 8 after every block, channel-wise
  scale, Houlsby init, stochastic depth 0.1 on the adapter branch.
- LoraConfig: LoRA branches on the blocks' linears (adapters/lora.py).
- LosaConfig: a LoSA side network beside the frozen backbone (adapters/losa.py).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

from ..kernels.checks import MAX_RANK
from ..kernels.reference import ACTIVATIONS
from ..kernels.sparse.configs import MAX_EXPERTS

POSITIONS = ("post", "pre", "intermediate", "parallel", "pfeiffer", "houlsby")
INITS = ("houlsby", "lora", "bert")
SCALINGS = ("channel", "layer")
ROUTINGS = ("token", "sample")
BOOL_FIELDS = ("norm", "bias", "train_head", "train_norms", "noisy_gating")
# LoraConfig target name -> the linear's path inside a timm Block.
TARGET_PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
TARGETS = tuple(TARGET_PATHS)
LORA_INITS = ("lora", "gaussian")
LOSA_INITS = ("lora", "houlsby")


def check_rank(config, name: str = "rank") -> None:
    """config.<name> an int from 1 to MAX_RANK, stored as a plain int (JSON-safe)."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_RANK:
        raise ValueError(f"{type(config).__name__}.{name} must be an int from 1 to {MAX_RANK} (the fused kernels' "
                         f"limit), got {value!r}")
    object.__setattr__(config, name, int(value))


def check_probability(config, name: str) -> None:
    """config.<name> a float in [0, 1), stored as a plain float."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{type(config).__name__}.{name} must be a float in [0, 1), got {value!r}")
    object.__setattr__(config, name, float(value))


def check_bool(config, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, bool):
        raise ValueError(f"{type(config).__name__}.{name} must be a bool (True or False), got {value!r}")


class ConfigDict:
    """to_dict/from_dict for the config dataclasses: tuples become JSON lists and back (the
    constructor normalizes them); fields missing from the data (saved before they existed) take
    their defaults; unknown fields, or data that is not a dict, raise a ValueError."""

    def to_dict(self) -> dict:
        return {field.name: _jsonable(getattr(self, field.name)) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise ValueError(f"a {cls.__name__} is a JSON object of its fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
        return cls(**data)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class AdapterConfig(ConfigDict):
    """How to build and place bottleneck adapters in a ViT.

    rank: bottleneck width r, an int from 1 to MAX_RANK (256, the fused kernels' limit).
    position: post | pre | intermediate | parallel | pfeiffer | houlsby (formulas in the
    README). activation: gelu | gelu_tanh | relu | silu | identity.
    scaling: "channel" (a learned [D] scale, init 1), "layer" (one learned scalar, init 1),
    a float (a constant), or None (no scale). init: houlsby | lora | bert. drop_path:
    stochastic depth on the adapter branch (per sample, training only). dropout: inside the
    bottleneck, after the activation (training only; fused into the same kernels, every expert's
    hidden in a mixture). norm: a
    LayerNorm on the adapter's input. bias: biases in both projections. train_head: keep the
    classifier head trainable (and save it with the adapters). train_norms: when true, the
    backbone's LayerNorms train too (the official Houlsby experiment does this); they are saved
    and loaded with the adapter.

    Mixture of adapters (experts > 1): each adapter becomes E experts of rank r and a learned
    gate that routes to top_k of them (SparseAdapter). routing: "token" gates every token on its
    own; "sample" gates each image on its class token (its mean token when the model has none)
    and routes all its tokens the same way. aux_loss_weight: the weight of the Switch
    load-balancing loss each sparse adapter records in training (model_aux_loss sums them).
    noisy_gating: in training, Gaussian noise with a learned softplus std is added to the logits
    before the top-k (as in MoE-Adapters4CL).

    Every field is checked at construction: a bad value raises a ValueError naming the field.
    Frozen: an injected model keeps the config it was built from; derive variants with
    dataclasses.replace or the presets' keyword overrides.

    Presets (classmethods, keyword overrides win) follow the configs of the official Adapter+
    code: adapter_plus, houlsby, pfeiffer, parallel, adaptformer. Their official keys map as
    dim -> rank, config -> position, act_layer: true -> "gelu" (the ViT's own nn.GELU),
    norm_layer -> norm, scaling: learned -> "layer", train.train_ln -> train_norms. The backbone's
    stochastic depth (vit.drop_path: 0.1 there) is the timm model's drop_path_rate, not a field.
    """

    rank: int = 8
    position: str = "post"
    activation: str = "gelu"
    scaling: Union[str, float, None] = "channel"
    init: str = "houlsby"
    drop_path: float = 0.1
    dropout: float = 0.0
    norm: bool = False
    bias: bool = True
    train_head: bool = True
    train_norms: bool = False
    experts: int = 1
    top_k: int = 1
    routing: str = "token"
    aux_loss_weight: float = 0.01
    noisy_gating: bool = False

    def __post_init__(self):
        check_rank(self)
        if not isinstance(self.position, str) or self.position not in POSITIONS:
            raise ValueError(f"AdapterConfig.position must be one of {POSITIONS}, got {self.position!r}")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise ValueError(f"AdapterConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not isinstance(self.init, str) or self.init not in INITS:
            raise ValueError(f"AdapterConfig.init must be one of {INITS}, got {self.init!r}")
        number = isinstance(self.scaling, numbers.Real) and not isinstance(self.scaling, bool)
        if number and math.isfinite(self.scaling):
            object.__setattr__(self, "scaling", float(self.scaling))  # plain float: JSON-safe
        elif not (self.scaling is None or (isinstance(self.scaling, str) and self.scaling in SCALINGS)):
            raise ValueError(
                f"AdapterConfig.scaling must be 'channel', 'layer', a finite float or None, got {self.scaling!r}"
            )
        for name in ("drop_path", "dropout"):
            check_probability(self, name)
        for name in BOOL_FIELDS:
            check_bool(self, name)
        for name in ("experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"AdapterConfig.{name} must be a positive int, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.experts > MAX_EXPERTS:
            raise ValueError(f"AdapterConfig.experts must be from 1 to {MAX_EXPERTS}, got {self.experts}")
        if self.top_k > self.experts:
            raise ValueError(f"AdapterConfig.top_k must be from 1 to experts ({self.experts}), got {self.top_k}")
        if not isinstance(self.routing, str) or self.routing not in ROUTINGS:
            raise ValueError(f"AdapterConfig.routing must be one of {ROUTINGS}, got {self.routing!r}")
        weight = self.aux_loss_weight
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not (math.isfinite(weight)
                                                                                    and weight >= 0):
            raise ValueError(f"AdapterConfig.aux_loss_weight must be a finite float >= 0, got {weight!r}")
        object.__setattr__(self, "aux_loss_weight", float(weight))

    @property
    def sparse(self) -> bool:
        """Whether the adapters are mixtures of experts (experts > 1)."""
        return self.experts > 1

    @classmethod
    def adapter_plus(cls, **overrides) -> "AdapterConfig":
        """Adapter+ (Steitz & Roth 2024), the defaults: follows conf/adapter/adapter_plus.yaml (on
        conf/adapter/base_adapter.yaml) of the official Adapter+ code: rank 8 after the block
        (config: post), the ViT's GELU, a learned channel-wise scale, Houlsby init, no LayerNorm,
        biases, adapter drop path 0.1, no dropout."""
        return cls(**{"rank": 8, "position": "post", "activation": "gelu", "scaling": "channel", "init": "houlsby",
                      "drop_path": 0.1, "dropout": 0.0, "norm": False, "bias": True, **overrides})

    @classmethod
    def houlsby(cls, **overrides) -> "AdapterConfig":
        """Houlsby et al. 2019: follows conf/adapter/houlsby.yaml and the ablation config
        conf/experiment/ablations/other_configs/houlsby_dim8.yaml of the official Adapter+ code:
        adapters on both the attention and the MLP branch (config: houlsby, attn_adapter: true),
        rank 8, the ViT's GELU, no scale (scaling: 1.0), Houlsby init, no LayerNorm, biases,
        adapter drop path 0.1, and the backbone's LayerNorms trained too (train.train_ln: true,
        here train_norms=True). houlsby_dim4.yaml is houlsby(rank=4)."""
        return cls(**{"rank": 8, "position": "houlsby", "activation": "gelu", "scaling": 1.0, "init": "houlsby",
                      "drop_path": 0.1, "dropout": 0.0, "norm": False, "bias": True, "train_norms": True,
                      **overrides})

    @classmethod
    def pfeiffer(cls, **overrides) -> "AdapterConfig":
        """Pfeiffer et al. 2021: follows the ablation config
        conf/experiment/ablations/other_configs/pfeiffer.yaml of the official Adapter+ code: after
        the block with a LayerNorm on the adapter's input (config: pfeiffer, norm_layer: true),
        rank 8, the ViT's GELU (not ReLU), no scale (scaling: 1.0), BERT init, biases, adapter drop
        path 0.1. (conf/adapter/pfeiffer.yaml alone is the same but keeps base_adapter.yaml's
        Houlsby init: pfeiffer(init="houlsby").)"""
        return cls(**{"rank": 8, "position": "pfeiffer", "activation": "gelu", "scaling": 1.0, "init": "bert",
                      "drop_path": 0.1, "dropout": 0.0, "norm": True, "bias": True, **overrides})

    @classmethod
    def parallel(cls, **overrides) -> "AdapterConfig":
        """He et al. 2022: follows conf/adapter/parallel.yaml and the ablation config
        conf/experiment/ablations/position/parallel-adapter.yaml of the official Adapter+ code: the
        adapter reads the MLP's input and adds to the block's output (config: parallel), rank 8,
        the ViT's GELU, no scale (scaling: 1.0, no learned channel scale), Houlsby init, no
        LayerNorm, biases, adapter drop path 0.1."""
        return cls(**{"rank": 8, "position": "parallel", "activation": "gelu", "scaling": 1.0, "init": "houlsby",
                      "drop_path": 0.1, "dropout": 0.0, "norm": False, "bias": True, **overrides})

    @classmethod
    def adaptformer(cls, **overrides) -> "AdapterConfig":
        """AdaptFormer (Chen et al. 2022): follows the ablation config
        conf/experiment/ablations/other_configs/adaptformer.yaml of the official Adapter+ code:
        parallel to the MLP (config: parallel), rank 8, a constant scale 0.1, LoRA init (the up
        projection zero), no LayerNorm, and from the defaults it extends (adapter_plus.yaml on
        base_adapter.yaml) the ViT's GELU, biases and adapter drop path 0.1."""
        return cls(**{"rank": 8, "position": "parallel", "activation": "gelu", "scaling": 0.1, "init": "lora",
                      "drop_path": 0.1, "dropout": 0.0, "norm": False, "bias": True, **overrides})


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """LoRA's factor on B A: alpha / rank, or rsLoRA's alpha / sqrt(rank)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class LoraConfig(ConfigDict):
    """How to build LoRA branches on the linears of every ViT block.

    rank: r, an int from 1 to MAX_RANK (256, the fused kernels' limit). alpha: a positive
    finite float; the update is scaled by alpha / rank, or by alpha / sqrt(rank) with
    use_rslora (rank-stabilized LoRA, Kalajdzievski 2023, as PEFT's use_rslora). targets: which linears of every block
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
    use_rslora: bool = False

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
        check_bool(self, "use_rslora")

    @property
    def scale(self) -> float:
        """The factor on the low-rank update: alpha / rank, or alpha / sqrt(rank) with use_rslora."""
        return lora_scale(self.alpha, self.rank, self.use_rslora)


@dataclass(frozen=True)
class LosaConfig(ConfigDict):
    """How to build a LoSA side network on a timm ViT.

    channel_rank: the channel mixers' bottleneck rank (over D), 1..256. token_rank: the token
    mixers' rank (over the N tokens), 1..256. blocks: the indices of the backbone blocks whose
    outputs feed the side network, in increasing order (negative indices count from the end), or
    None for every block; the last one given is the feature the output refines. init: "lora"
    (down-projections kaiming-uniform, up-projections zero: the side network starts as the
    identity on the backbone's features) or "houlsby" (both truncated normal, std 0.01).
    drop_path: stochastic depth on every mixer's update, per image, in training. train_head: the
    adapter owns a trainable copy of the classifier head, as the other kinds'.

    Every field is checked at construction: a bad value raises a ValueError naming the field.
    """

    channel_rank: int = 16
    token_rank: int = 16
    blocks: Optional[tuple] = None
    init: str = "lora"
    drop_path: float = 0.1
    train_head: bool = True

    def __post_init__(self):
        check_rank(self, "channel_rank")
        check_rank(self, "token_rank")
        blocks = self.blocks
        if blocks is not None:
            if (not isinstance(blocks, (tuple, list)) or not blocks
                    or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)):
                raise ValueError(f"LosaConfig.blocks must be None or a non-empty tuple of block indices, got {blocks!r}")
            object.__setattr__(self, "blocks", tuple(int(b) for b in blocks))
        if not isinstance(self.init, str) or self.init not in LOSA_INITS:
            raise ValueError(f"LosaConfig.init must be one of {LOSA_INITS}, got {self.init!r}")
        check_probability(self, "drop_path")
        check_bool(self, "train_head")

    def block_indices(self, depth: int) -> tuple:
        """The fed blocks' indices in a model of `depth` blocks, increasing; ValueError if out of range."""
        if self.blocks is None:
            return tuple(range(depth))
        indices = [b + depth if b < 0 else b for b in self.blocks]
        if not all(0 <= b < depth for b in indices) or sorted(set(indices)) != indices:
            raise ValueError(f"LosaConfig.blocks {self.blocks} must name distinct blocks of this {depth}-block model "
                             f"in increasing order")
        return tuple(indices)
