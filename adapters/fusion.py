"""The AdapterFusion kind (FusionConfig): an attention over bottleneck adapters that are already
in the model, one fusion module per block at the fused adapters' position.

AdapterFusion (Pfeiffer et al., EACL 2021) as the AdapterHub `adapters` library's "dynamic"
fusion computes it: every fused adapter reads the block's input x at its position, and

    a_i = scale_i * (act(x W_down_i^T + b_down_i) W_up_i^T + b_up_i)     (adapter i's branch, no skip)
    q = x W_q^T + b_q,   k_i = a_i W_k^T + b_k,   v_i = a_i W_v^T
    p = softmax_i(q . k_i / T),   out = residual + sum_i p_i v_i

with the same residual the bottleneck adapters get at that position. W_q and W_k start normal
(std 0.02) with zero biases, W_v as the identity with 1e-6 everywhere off the diagonal (the
library's init), so a fresh fusion averages the adapters' branches. There is no 1/sqrt(D) on the
scores, and no dropout on them (the library applies dropout there; here the fusion is
deterministic). The whole fusion is one call of the `adapter_fusion` op per block.

The fused adapters stay where they are and keep their own names: the fusion module stacks their
current weights on each forward (N * r * D values, never copied into the fusion's state) and
they are frozen while the fusion is active, as every non-active adapter is. Adapters of
different ranks are padded with zero rows (down) and zero columns (up) to the largest rank,
which changes nothing: act(0) = 0 for every activation the package has, and a zero column of
W_up adds nothing. They must share position and activation; norm=True (a LayerNorm on each
adapter's own input), mixtures, the two-slot "houlsby" position, adapters with their own
backbone LayerNorms (train_norms) and the other kinds are refused.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..kernels import adapter_fusion
from ..kernels.fusion.configs import MAX_ADAPTERS
from .config import AdapterConfig, ConfigDict, check_bool
from .kinds import AdapterKind, Built, kind_of, register_kind
from .modules import BottleneckAdapter
from .record import record_of
from .surgery import block_dim, vit_blocks

__all__ = ["FusionConfig", "AdapterFusion", "FusionKind", "fusion_regularization", "ANNEAL", "REGULARIZATION_WEIGHT"]

ANNEAL = "anneal"
ANNEAL_START = 50.0  # the library's schedule: T from 50, down by 50/1000 per training forward, to 1
ANNEAL_STEP = ANNEAL_START / 1000.0
REGULARIZATION_WEIGHT = 0.01  # the library's weight on sum ||I - W_v||_F^2


@dataclass(frozen=True)
class FusionConfig(ConfigDict):
    """An AdapterFusion over bottleneck adapters the model already holds.

    adapters: the names of the fused adapters, 1 to 16 distinct names; inject
    checks that each is a plain bottleneck adapter (AdapterConfig) of the model and that they
    share position and activation. temperature: a positive finite float T dividing the scores,
    or "anneal": T starts at 50 and falls by 0.05 per training-mode forward of each block's
    fusion to 1 (the library's schedule; the count is saved with the fusion; a changing T
    recompiles under torch.compile). train_head: the fusion owns a trainable copy of the
    classifier head, as the other kinds' adapters do.

    The fusion runs at its adapters' position (read from their configs at inject), so this
    config has no position of its own. Every field is checked at construction: a bad value
    raises a ValueError naming the field.
    """

    adapters: tuple
    temperature: Union[float, str] = 1.0
    train_head: bool = True

    def __post_init__(self):
        names = self.adapters
        if (isinstance(names, str) or not isinstance(names, (tuple, list)) or not names
                or not all(isinstance(n, str) and n.isidentifier() for n in names) or len(set(names)) != len(names)):
            raise ValueError(f"FusionConfig.adapters must be a non-empty list of distinct adapter names, got {names!r}")
        if len(names) > MAX_ADAPTERS:
            raise ValueError(f"FusionConfig.adapters must name 1 to {MAX_ADAPTERS} adapters (the fused op's limit), "
                             f"got {len(names)}")
        object.__setattr__(self, "adapters", tuple(names))
        temperature = self.temperature
        if temperature != ANNEAL:
            if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
                    or not (math.isfinite(temperature) and temperature > 0)):
                raise ValueError(f"FusionConfig.temperature must be a positive finite float or {ANNEAL!r}, got "
                                 f"{temperature!r}")
            object.__setattr__(self, "temperature", float(temperature))
        check_bool(self, "train_head")


class AdapterFusion(nn.Module):
    """One block's fusion over the bottleneck adapters `sources` (BottleneckAdapter modules of
    that block, referenced, not owned: their parameters are not this module's, and its state
    dict holds only its own).

    Parameters: w_query, w_key, w_value [D, D], b_query, b_key [D]. forward(x, residual) is
    residual + sum_i p_i v_i (module docstring), one `adapter_fusion` call; the sources run as in
    eval mode inside it (no dropout, no DropPath), whatever their mode.
    """

    def __init__(self, dim: int, sources: Sequence[BottleneckAdapter], names: Sequence[str], *,
                 temperature: Union[float, str] = 1.0, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        activations = {source.activation for source in sources}
        if len(activations) != 1:
            raise ValueError(f"the fused adapters must share one activation, got {sorted(activations)}")
        self.dim, self.names = dim, tuple(names)
        self.activation = activations.pop()
        self.rank = max(source.rank for source in sources)
        # A plain tuple, not submodules: the adapters stay in their own slots (and state dicts).
        self._sources = tuple(sources)
        self.w_query = nn.Parameter(torch.empty(dim, dim, **factory))
        self.b_query = nn.Parameter(torch.empty(dim, **factory))
        self.w_key = nn.Parameter(torch.empty(dim, dim, **factory))
        self.b_key = nn.Parameter(torch.empty(dim, **factory))
        self.w_value = nn.Parameter(torch.empty(dim, dim, **factory))
        self.anneal = temperature == ANNEAL
        self.temperature = None if self.anneal else float(temperature)
        if self.anneal:
            # Training forwards so far; saved with the fusion so a loaded one goes on from there.
            self.register_buffer("anneal_calls", torch.zeros((), dtype=torch.int64, device=device))
            self._calls, self._seen = 0, None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The library's init: query and key normal(0, 0.02) with zero biases; value the
        identity with 1e-6 off the diagonal (no noise), so a fresh fusion averages the branches."""
        with torch.no_grad():
            for weight, bias in ((self.w_query, self.b_query), (self.w_key, self.b_key)):
                nn.init.normal_(weight, std=0.02)
                nn.init.zeros_(bias)
            self.w_value.fill_(1e-6).fill_diagonal_(1.0)
        if self.anneal:
            self.anneal_calls.zero_()

    def extra_repr(self) -> str:
        ranks = "/".join(str(source.rank) for source in self._sources)
        temperature = ANNEAL if self.anneal else self.temperature
        return (f"dim={self.dim}, adapters={list(self.names)}, ranks={ranks}, activation={self.activation}, "
                f"temperature={temperature}")

    def current_temperature(self) -> float:
        """T for the next forward: the config's float, or the annealed value 50 - 0.05 * calls,
        at least 1. The count is cached on the host and read back from the buffer only when the
        buffer changed under it (load_adapters, load_state_dict, .to()), so no forward syncs."""
        if not self.anneal:
            return self.temperature
        calls = self.anneal_calls
        if self._seen != (id(calls), calls._version):
            self._calls, self._seen = int(calls), (id(calls), calls._version)
        return max(ANNEAL_START - ANNEAL_STEP * self._calls, 1.0)

    def stacked(self) -> tuple:
        """(w_down [N, R, D], b_down [N, R] or None, w_up [N, D, R], b_up [N, D] or None,
        scale [N, D] or None) from the sources' current parameters, R the largest rank: smaller
        ranks padded with zeros (exact, see the module docstring); a missing bias is zeros, a
        missing scale ones, a layer or constant scale broadcast over D."""
        sources, rank = self._sources, self.rank
        like = sources[0].down.weight
        w_down = torch.stack([F.pad(s.down.weight, (0, 0, 0, rank - s.rank)) for s in sources])
        w_up = torch.stack([F.pad(s.up.weight, (0, rank - s.rank)) for s in sources])
        b_down = b_up = scale = None
        if any(s.down.bias is not None for s in sources):
            b_down = torch.stack([F.pad(s.down.bias, (0, rank - s.rank)) if s.down.bias is not None
                                  else like.new_zeros(rank) for s in sources])
        if any(s.up.bias is not None for s in sources):
            b_up = torch.stack([s.up.bias if s.up.bias is not None else like.new_zeros(self.dim) for s in sources])
        if any(s.scale is not None for s in sources):
            scale = torch.stack([_scale_row(s.scale, self.dim, like) for s in sources])
        return w_down, b_down, w_up, b_up, scale

    def forward(self, x: torch.Tensor, residual=None, *, return_aux_loss: bool = False):
        """residual: None, a tensor shaped like x, or a sequence of such tensors (their sum), as
        for BottleneckAdapter. return_aux_loss: return (out, None), the form the blocks call."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"AdapterFusion(dim={self.dim}) got input of width {x.shape[-1]}")
        temperature = self.current_temperature()
        out = adapter_fusion(x, *self.stacked(), self.w_query, self.b_query, self.w_key, self.b_key, self.w_value,
                             activation=self.activation, residual=residual, temperature=temperature)
        if self.anneal and self.training:
            self._calls += 1
            self.anneal_calls.fill_(self._calls)
            self._seen = (id(self.anneal_calls), self.anneal_calls._version)
        return (out, None) if return_aux_loss else out


def _scale_row(scale, dim: int, like: torch.Tensor) -> torch.Tensor:
    """A BottleneckAdapter's scale as a [D] row: channel as is, layer and constants broadcast, None ones."""
    if scale is None:
        return like.new_ones(dim)
    if isinstance(scale, torch.Tensor):
        return scale.expand(dim)
    return like.new_full((dim,), float(scale))


class FusionSlots(nn.ModuleDict):
    """A block's slots for one fusion ({"block": AdapterFusion}), with the position the fused
    adapters run at: the adapted block reads it here, since a FusionConfig has none."""

    def __init__(self, fusion: AdapterFusion, position: str):
        super().__init__({"block": fusion})
        self.position = position


def fusion_refusal(name: str, config) -> Optional[str]:
    """Why the adapter `name` with `config` cannot be fused, or None if it can."""
    if not isinstance(config, AdapterConfig):
        return (f"cannot fuse adapter {name!r}: it is {kind_of(config).noun}; AdapterFusion fuses plain bottleneck "
                f"adapters (AdapterConfig)")
    if config.sparse:
        return (f"cannot fuse adapter {name!r}: it is a mixture of {config.experts} experts, which routes itself; "
                f"AdapterFusion fuses plain bottleneck adapters")
    if config.position == "houlsby":
        return (f"cannot fuse adapter {name!r}: position 'houlsby' has two adapters per block (attention and MLP "
                f"branch), and a fusion runs at one site")
    if config.norm:
        return (f"cannot fuse adapter {name!r}: it has norm=True, a LayerNorm on its own input, so the fused adapters "
                f"would not read the same x as each other and the fusion's query")
    if config.train_norms:
        return (f"cannot fuse adapter {name!r}: it trains its own copies of the backbone's LayerNorms "
                f"(train_norms=True), which do not run while the fusion is active")
    return None


class FusionKind(AdapterKind):
    file_kind = "fusion"
    config_class = FusionConfig
    noun = "an AdapterFusion"
    runs_over = "over adapters already injected"

    def fused_configs(self, record, name: str, config: FusionConfig) -> dict:
        """The fused adapters' configs by name, checked (ValueError naming the adapter and why)."""
        injected = dict(record.configs) if record is not None else {}
        configs = {}
        for source in config.adapters:
            if source not in injected:
                raise ValueError(f"fusion {name!r}: FusionConfig.adapters names {source!r}, which the model does not "
                                 f"have (injected: {sorted(injected)}); inject or load it before the fusion")
            refusal = fusion_refusal(source, injected[source])
            if refusal is not None:
                raise ValueError(f"fusion {name!r}: {refusal}")
            configs[source] = injected[source]
        for field in ("position", "activation"):
            values = {source: getattr(c, field) for source, c in configs.items()}
            if len(set(values.values())) > 1:
                raise ValueError(f"fusion {name!r}: the fused adapters must share one {field}, got {values}")
        return configs

    def build(self, model, name, config, record) -> Built:
        blocks = vit_blocks(model)
        position = next(iter(self.fused_configs(record, name, config).values())).position
        slots = []
        for block in blocks:
            sources = [block.adapters[source]["block"] for source in config.adapters]
            reference_param = next(block.parameters())
            fusion = AdapterFusion(block_dim(block), sources, config.adapters, temperature=config.temperature,
                                   device=reference_param.device, dtype=reference_param.dtype)
            slots.append(FusionSlots(fusion, position))

        def attach():
            for block, slot in zip(blocks, slots):
                block.adapters[name] = slot  # the fused adapters made these blocks adapted ones already

        return Built({f"blocks.{index}": slot for index, slot in enumerate(slots)}, attach)

    def modules(self, model, name) -> dict:
        return kind_of(AdapterConfig()).modules(model, name)

    def remove(self, model, name) -> None:
        kind_of(AdapterConfig()).remove(model, name)

    def summary(self, model, name, config) -> str:
        configs = adapter_configs_of(model)
        fused = ", ".join(f"{source} (rank {configs[source].rank})" for source in config.adapters)
        position = configs[config.adapters[0]].position
        return f"AdapterFusion over {fused} at {position}, temperature {config.temperature}"

    def model_info(self, model, config) -> dict:
        """The fused adapters' rank, position and activation (those the model has), so that a
        saved fusion refuses to load over other adapters of the same names."""
        configs = adapter_configs_of(model)
        return {"fused": {source: {"rank": configs[source].rank, "position": configs[source].position,
                                   "activation": configs[source].activation}
                          for source in config.adapters if isinstance(configs.get(source), AdapterConfig)}}

    def check_model_info(self, saved, current, source) -> None:
        for adapter, described in saved.get("fused", {}).items():
            here = current.get("fused", {}).get(adapter)
            if here is None:
                raise ValueError(f"the fusion in {source} runs over adapter {adapter!r} ({described}), which this "
                                 f"model does not have as a bottleneck adapter; load or inject it first")
            if here != described:
                raise ValueError(f"the fusion in {source} was trained over adapter {adapter!r} with {described}; this "
                                 f"model's {adapter!r} has {here}")

    def delete_refusal(self, name, config, deleted) -> Optional[str]:
        if deleted in config.adapters:
            return (f"cannot delete adapter {deleted!r}: fusion {name!r} runs over it "
                    f"(FusionConfig.adapters = {list(config.adapters)}); delete the fusion first")
        return None

    def merge_refusal(self, name, config):
        return (f"cannot merge adapter {name!r}: it is an AdapterFusion, an attention over bottleneck adapters, not a "
                f"low-rank update of a linear's weight; only LoRA adapters merge")


def adapter_configs_of(model: nn.Module) -> dict:
    record = record_of(model)
    return dict(record.configs) if record is not None else {}


def fusion_modules(model: nn.Module, name: Optional[str] = None) -> list:
    """The AdapterFusion modules (one per block) of the fusion `name` (default: the active
    adapter); ValueError naming the model's fusions when it is not one."""
    configs = adapter_configs_of(model)
    target = name if name is not None else (record_of(model).active if configs else None)
    if not isinstance(configs.get(target), FusionConfig):
        fusions = sorted(n for n, c in configs.items() if isinstance(c, FusionConfig))
        what = "the active adapter" if name is None else "name"
        raise ValueError(f"fusion_regularization needs an AdapterFusion; {what} is {target!r} (the model's fusions: "
                         f"{fusions})")
    return [slots["block"] for slots in FusionKind().modules(model, target).values()]


def fusion_regularization(model: nn.Module, name: Optional[str] = None,
                          weight: float = REGULARIZATION_WEIGHT) -> torch.Tensor:
    """weight * sum over the fusion's blocks of ||I - W_v||_F^2 (weight 0.01, the library's):
    keeps the value projections near the identity, so the fusion mixes the adapters' own
    outputs. A differentiable fp32 scalar; add it to the task loss while training the fusion.
    name: the fusion (default: the active adapter, which must be one)."""
    total = None
    for fusion in fusion_modules(model, name):
        value = fusion.w_value.float()
        eye = torch.eye(value.shape[0], device=value.device, dtype=value.dtype)
        term = (eye - value).pow(2).sum()
        total = term if total is None else total + term
    return weight * total


register_kind(FusionKind())
