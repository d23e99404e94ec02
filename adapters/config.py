"""AdapterConfig: what an adapter is and where it sits. Defaults are Adapter+ (Steitz & Roth,
"Adapters Strike Back", CVPR 2024): rank 8 after every block, channel-wise scale, Houlsby init,
stochastic depth 0.1 on the adapter branch."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Union

from ..kernels.reference import ACTIVATIONS
from ..kernels.sparse import MAX_EXPERTS

POSITIONS = ("post", "pre", "intermediate", "parallel", "pfeiffer", "houlsby")
INITS = ("houlsby", "lora", "bert")
SCALINGS = ("channel", "layer")
ROUTINGS = ("token", "sample")


@dataclass(frozen=True)
class AdapterConfig:
    """How to build and place bottleneck adapters in a ViT.

    rank: bottleneck width r. position: post | pre | intermediate | parallel | pfeiffer |
    houlsby (formulas in the README). activation: gelu | gelu_tanh | relu | silu | identity.
    scaling: "channel" (a learned [D] scale, init 1), "layer" (one learned scalar, init 1),
    a float (a constant), or None (no scale). init: houlsby | lora | bert. drop_path:
    stochastic depth on the adapter branch (per sample, training only). dropout: inside the
    bottleneck, after the activation (runs the plain-PyTorch path when > 0). norm: a
    LayerNorm on the adapter's input. bias: biases in both projections. train_head: keep the
    classifier head trainable (and save it with the adapters).

    Mixture of adapters (experts > 1): each adapter becomes E experts of rank r and a learned
    gate that routes to top_k of them (SparseAdapter). routing: "token" gates every token on its
    own; "sample" gates each image on its class token (its mean token when the model has none)
    and routes all its tokens the same way. aux_loss_weight: the weight of the Switch
    load-balancing loss each sparse adapter records in training (model_aux_loss sums them).
    noisy_gating: in training, Gaussian noise with a learned softplus std is added to the logits
    before the top-k (as in MoE-Adapters4CL). dropout must be 0 with experts > 1.

    Frozen: an injected model keeps the config it was built from; derive variants with
    dataclasses.replace or the presets' keyword overrides.
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
    experts: int = 1
    top_k: int = 1
    routing: str = "token"
    aux_loss_weight: float = 0.01
    noisy_gating: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"AdapterConfig.rank must be a positive int, got {self.rank!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"AdapterConfig.position must be one of {POSITIONS}, got {self.position!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"AdapterConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.init not in INITS:
            raise ValueError(f"AdapterConfig.init must be one of {INITS}, got {self.init!r}")
        number = isinstance(self.scaling, numbers.Real) and not isinstance(self.scaling, bool)
        if number and math.isfinite(self.scaling):
            object.__setattr__(self, "scaling", float(self.scaling))  # plain float: JSON-safe
        elif not (self.scaling is None or self.scaling in SCALINGS):
            raise ValueError(
                f"AdapterConfig.scaling must be 'channel', 'layer', a finite float or None, got {self.scaling!r}"
            )
        for name in ("drop_path", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
                raise ValueError(f"AdapterConfig.{name} must be a float in [0, 1), got {value!r}")
        for name in ("experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AdapterConfig.{name} must be a positive int, got {value!r}")
        if self.experts > MAX_EXPERTS:
            raise ValueError(f"AdapterConfig.experts must be from 1 to {MAX_EXPERTS}, got {self.experts}")
        if self.top_k > self.experts:
            raise ValueError(f"AdapterConfig.top_k must be from 1 to experts ({self.experts}), got {self.top_k}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"AdapterConfig.routing must be one of {ROUTINGS}, got {self.routing!r}")
        weight = self.aux_loss_weight
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not (math.isfinite(weight)
                                                                                    and weight >= 0):
            raise ValueError(f"AdapterConfig.aux_loss_weight must be a finite float >= 0, got {weight!r}")
        object.__setattr__(self, "aux_loss_weight", float(weight))
        if not isinstance(self.noisy_gating, bool):
            raise ValueError(f"AdapterConfig.noisy_gating must be a bool, got {self.noisy_gating!r}")
        if self.experts > 1 and self.dropout > 0.0:
            raise ValueError("AdapterConfig.dropout must be 0 with experts > 1 (the mixture has no unfused path "
                             f"with dropout inside the experts), got {self.dropout}")

    @property
    def sparse(self) -> bool:
        """Whether the adapters are mixtures of experts (experts > 1)."""
        return self.experts > 1

    @classmethod
    def adapter_plus(cls, **overrides) -> "AdapterConfig":
        """Adapter+: the defaults."""
        return cls(**overrides)

    @classmethod
    def houlsby(cls, **overrides) -> "AdapterConfig":
        """Houlsby et al. 2019: adapters on both the attention and the MLP branch, no scale."""
        return cls(**{"position": "houlsby", "scaling": 1.0, **overrides})

    @classmethod
    def pfeiffer(cls, **overrides) -> "AdapterConfig":
        """Pfeiffer et al. 2021: after the block, LayerNorm inside the adapter, ReLU, no scale."""
        return cls(**{"position": "pfeiffer", "norm": True, "activation": "relu", "scaling": 1.0, **overrides})

    @classmethod
    def parallel(cls, **overrides) -> "AdapterConfig":
        """He et al. 2022: the adapter reads the MLP's input and adds to its output."""
        return cls(**{"position": "parallel", **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)
