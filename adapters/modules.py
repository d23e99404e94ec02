"""Adapters as nn.Modules, each computed by one fused op call: BottleneckAdapter (one
bottleneck) and SparseAdapter (a gated mixture of bottleneck experts). Several named bottleneck
adapters applied to one batch, each image with its own, are in adapters/routing.py."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..kernels import bottleneck_adapter, new_seed, reference, sparse_adapter
from ..kernels.sparse import routed_adapter_unchecked
from .config import AdapterConfig


def init_projections(init: str, w_down: torch.Tensor, b_down: Optional[torch.Tensor], w_up: torch.Tensor,
                     b_up: Optional[torch.Tensor]) -> None:
    """One bottleneck's weights (w_down [r, D], w_up [D, r]) initialized in place by `init`."""
    with torch.no_grad():
        if init == "houlsby":  # Houlsby et al. 2019, as Adapter+ uses it (std 0.01, cut at 2 std)
            for weight in (w_down, w_up):
                nn.init.trunc_normal_(weight, std=0.01, a=-0.02, b=0.02)
        elif init == "lora":  # down as nn.Linear's default, up zero: the adapter starts as identity
            nn.init.kaiming_uniform_(w_down, a=math.sqrt(5))
            if b_down is not None:
                bound = 1 / math.sqrt(w_down.shape[1])
                nn.init.uniform_(b_down, -bound, bound)
            nn.init.zeros_(w_up)
        else:  # bert
            for weight in (w_down, w_up):
                nn.init.normal_(weight, std=0.02)
        if b_down is not None and init != "lora":
            nn.init.zeros_(b_down)
        if b_up is not None:
            nn.init.zeros_(b_up)


def drop_path_scale(x: torch.Tensor, drop_path: float, training: bool) -> Optional[torch.Tensor]:
    """The per-row DropPath factor [M] for x [batch, ..., D] (one keep/drop draw per sample,
    divided by the keep probability), or None outside training."""
    if not training or drop_path == 0.0 or x.numel() == 0:
        return None
    keep = 1.0 - drop_path
    samples = x.shape[0] if x.dim() > 1 else 1
    rows_per_sample = x[0].numel() // x.shape[-1] if x.dim() > 1 else 1
    mask = torch.empty(samples, device=x.device, dtype=torch.float32).bernoulli_(keep).div_(keep)
    return mask.repeat_interleave(rows_per_sample)


def make_scale(scaling, dim: int, factory: dict):
    """The scale a config's `scaling` asks for: a [D] or [1] Parameter (init 1), a float, or None."""
    if scaling == "channel":
        return nn.Parameter(torch.ones(dim, **factory))
    if scaling == "layer":
        return nn.Parameter(torch.ones(1, **factory))
    return None if scaling is None else float(scaling)


def describe_scale(scale) -> str:
    if isinstance(scale, nn.Parameter):
        return "channel" if scale.numel() > 1 else "layer"
    return str(scale)


class BottleneckAdapter(nn.Module):
    """out = residual + scale * drop_path(up(act(down(norm(x))))), one fused op call.

    Attributes: `down` (nn.Linear dim -> rank), `up` (nn.Linear rank -> dim), `scale` (an
    nn.Parameter for "channel" [D] or "layer" [1] scaling, a float for a constant, None for
    none), `norm` (nn.LayerNorm or None), `activation` (the name). DropPath is the op's
    row_scale: one keep/drop draw per sample (x.shape[0]), divided by the keep probability,
    in training mode only; it multiplies before the scale, as in Adapter+.

    dropout (training only) applies to the activated hidden inside the same fused launches: its
    mask comes from a seed drawn from torch's generator each forward and is drawn again in the
    backward (bottleneck_adapter's dropout). `fused=False` runs the plain-PyTorch reference
    instead; it draws the same DropPath mask and the same dropout seed from the same random
    state, so both paths agree under a fixed seed.
    """

    def __init__(
        self,
        dim: int,
        rank: int = 8,
        *,
        activation: str = "gelu",
        scaling: Union[str, float, None] = "channel",
        init: str = "houlsby",
        drop_path: float = 0.0,
        dropout: float = 0.0,
        norm: bool = False,
        norm_eps: float = 1e-6,
        bias: bool = True,
        fused: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        # The config validates every argument with a message naming it.
        config = AdapterConfig(rank=rank, activation=activation, scaling=scaling, init=init, drop_path=drop_path,
                               dropout=dropout, norm=norm, bias=bias)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"BottleneckAdapter dim must be a positive int, got {dim!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.rank = dim, rank
        self.activation = activation
        self.drop_path = float(drop_path)
        self.dropout = float(dropout)
        self.fused = fused
        # eps 1e-6 as timm's ViTs; inject passes the block's own norm eps.
        self.norm = nn.LayerNorm(dim, eps=norm_eps, **factory) if norm else None
        self.down = nn.Linear(dim, rank, bias=bias, **factory)
        self.up = nn.Linear(rank, dim, bias=bias, **factory)
        self.scale = make_scale(config.scaling, dim, factory)
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_projections(self.init, self.down.weight, self.down.bias, self.up.weight, self.up.bias)
        if isinstance(self.scale, nn.Parameter):
            nn.init.ones_(self.scale)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, rank={self.rank}, activation={self.activation}, scale={describe_scale(self.scale)}, "
                f"drop_path={self.drop_path}, dropout={self.dropout}")

    def drop_path_scale(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The per-row DropPath factor [M] for x [batch, ..., D], or None outside training."""
        return drop_path_scale(x, self.drop_path, self.training)

    def forward(self, x: torch.Tensor, residual=None, *, return_aux_loss: bool = False):
        """residual: None, a tensor shaped like x, or a sequence of such tensors (their sum); x
        itself may be one of them (see bottleneck_adapter). return_aux_loss: return (out, None),
        the form SparseAdapter returns its auxiliary loss in."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"BottleneckAdapter(dim={self.dim}) got input of width {x.shape[-1]}")
        row_scale = self.drop_path_scale(x)
        inputs = self.norm(x) if self.norm is not None else x
        dropout = self.dropout if self.training else 0.0
        fn = bottleneck_adapter if self.fused else reference.bottleneck_adapter
        out = fn(inputs, self.down.weight, self.down.bias, self.up.weight, self.up.bias, self.scale,
                 activation=self.activation, residual=residual, row_scale=row_scale, dropout=dropout,
                 seed=new_seed(x.device) if dropout > 0.0 else None)
        return (out, None) if return_aux_loss else out


class SparseAdapter(nn.Module):
    """out = residual + scale * drop_path(sum_j p_j * expert_{e_j}(norm(x))): a gated mixture of E
    bottleneck experts of rank r, top_k of them per token (routing="token") or per image
    (routing="sample", gated on its class token, or its mean token when class_token is False).
    One fused launch forward (sparse_adapter, or the routed form for sample routing and noisy
    gating, whose gate runs as small [rows, E] PyTorch ops first).

    Parameters: `gate` (nn.Linear dim -> experts; its logits are computed in fp32),
    `down_weight` [E, r, D], `down_bias` [E, r], `up_weight` [E, D, r], `up_bias` [E, D] (each
    expert initialized as a BottleneckAdapter with the same init), `scale` shared by the
    experts, `noise` (nn.Linear dim -> experts, zero init, only with noisy_gating), `norm`.
    dropout (training only): on every chosen expert's activated hidden, inside the same launch
    (sparse_adapter's dropout), with a seed drawn from torch's generator each forward.

    forward(x, residual, return_aux_loss=True) returns (out, aux_loss): in training with
    aux_loss_weight > 0 and autograd on, aux_loss_weight times the Switch load-balancing loss of
    this forward's routing (None otherwise); add it to the task loss. Inside an injected model
    the blocks collect them per forward and model_aux_loss sums those of the last forward.
    """

    def __init__(
        self,
        dim: int,
        rank: int = 8,
        experts: int = 4,
        top_k: int = 1,
        *,
        routing: str = "token",
        class_token: bool = True,
        activation: str = "gelu",
        scaling: Union[str, float, None] = "channel",
        init: str = "houlsby",
        drop_path: float = 0.0,
        norm: bool = False,
        norm_eps: float = 1e-6,
        bias: bool = True,
        aux_loss_weight: float = 0.01,
        noisy_gating: bool = False,
        dropout: float = 0.0,
        fused: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        # The config validates every argument with a message naming it.
        config = AdapterConfig(rank=rank, activation=activation, scaling=scaling, init=init, drop_path=drop_path,
                               dropout=dropout, norm=norm, bias=bias, experts=experts, top_k=top_k, routing=routing,
                               aux_loss_weight=aux_loss_weight, noisy_gating=noisy_gating)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"SparseAdapter dim must be a positive int, got {dim!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.rank, self.experts, self.top_k = dim, rank, experts, top_k
        self.routing, self.class_token = routing, bool(class_token)
        self.activation, self.init = activation, init
        self.drop_path = float(drop_path)
        self.dropout = float(dropout)
        self.aux_loss_weight = config.aux_loss_weight
        self.fused = fused
        self.norm = nn.LayerNorm(dim, eps=norm_eps, **factory) if norm else None
        self.gate = nn.Linear(dim, experts, **factory)
        self.noise = nn.Linear(dim, experts, bias=False, **factory) if noisy_gating else None
        self.down_weight = nn.Parameter(torch.empty(experts, rank, dim, **factory))
        self.down_bias = nn.Parameter(torch.empty(experts, rank, **factory)) if bias else None
        self.up_weight = nn.Parameter(torch.empty(experts, dim, rank, **factory))
        self.up_bias = nn.Parameter(torch.empty(experts, dim, **factory)) if bias else None
        self.scale = make_scale(config.scaling, dim, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for expert in range(self.experts):
            init_projections(self.init, self.down_weight[expert],
                             None if self.down_bias is None else self.down_bias[expert], self.up_weight[expert],
                             None if self.up_bias is None else self.up_bias[expert])
        with torch.no_grad():
            # Small random gate: near-uniform weights, no exact ties to pile tokens on expert 0.
            nn.init.normal_(self.gate.weight, std=0.02)
            nn.init.zeros_(self.gate.bias)
            if self.noise is not None:
                nn.init.zeros_(self.noise.weight)  # noise std starts at softplus(0) = 0.69
        if isinstance(self.scale, nn.Parameter):
            nn.init.ones_(self.scale)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, rank={self.rank}, experts={self.experts}, top_k={self.top_k}, "
                f"routing={self.routing}, activation={self.activation}, scale={describe_scale(self.scale)}, "
                f"drop_path={self.drop_path}, dropout={self.dropout}, noisy_gating={self.noise is not None}")

    def _routing_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """The rows the gate reads: every token, or one per image (class or mean token)."""
        if self.routing == "token" or inputs.dim() < 3:
            return inputs.reshape(-1, self.dim)
        pooled = inputs[:, 0] if self.class_token else inputs.mean(dim=1)
        return pooled.reshape(-1, self.dim)

    def forward(self, x: torch.Tensor, residual=None, *, return_aux_loss: bool = False):
        if x.shape[-1] != self.dim:
            raise ValueError(f"SparseAdapter(dim={self.dim}) got input of width {x.shape[-1]}")
        row_scale = drop_path_scale(x, self.drop_path, self.training)
        inputs = self.norm(x) if self.norm is not None else x
        experts = (self.down_weight, self.down_bias, self.up_weight, self.up_bias)
        dropout = self.dropout if self.training else 0.0  # on every expert's hidden, inside the kernels
        common = dict(activation=self.activation, residual=residual, row_scale=row_scale, dropout=dropout,
                      seed=new_seed(x.device) if dropout > 0.0 else None)
        want_loss = return_aux_loss and self.training and self.aux_loss_weight > 0 and torch.is_grad_enabled()
        noisy = self.noise is not None and self.training
        if self.routing == "token" and not noisy:
            fn = sparse_adapter if self.fused else reference.sparse_adapter
            out = fn(inputs, self.gate.weight, self.gate.bias, *experts, self.scale, top_k=self.top_k,
                     return_logits=want_loss, **common)
            out, logits = out if want_loss else (out, None)
        else:
            gate_rows = self._routing_inputs(inputs)
            logits = reference.gate_logits(gate_rows, self.gate.weight, self.gate.bias)
            if noisy:
                with torch.autocast(gate_rows.device.type, enabled=False):
                    std = nn.functional.softplus(nn.functional.linear(gate_rows.float(), self.noise.weight.float()))
                logits = logits + torch.randn_like(logits) * (std + 1e-2)
            expert_idx, expert_weight = reference.topk_routing(logits, self.top_k)
            if self.routing == "sample" and inputs.dim() >= 3:
                tokens = math.prod(inputs.shape[1:-1])  # inputs[0] does not exist in an empty batch
                expert_idx = expert_idx.repeat_interleave(tokens, dim=0)
                expert_weight = expert_weight.repeat_interleave(tokens, dim=0)
            fn = routed_adapter_unchecked if self.fused else reference.routed_adapter
            out = fn(inputs, expert_idx, expert_weight, *experts, self.scale, **common)
        if not return_aux_loss:
            return out
        return out, self.aux_loss_weight * reference.load_balancing_loss(logits, self.top_k) if want_loss else None
