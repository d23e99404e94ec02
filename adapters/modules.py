"""BottleneckAdapter: one adapter as an nn.Module, computed by the fused op."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..kernels import bottleneck_adapter, reference
from .config import AdapterConfig


class BottleneckAdapter(nn.Module):
    """out = residual + scale * drop_path(up(act(down(norm(x))))), one fused op call.

    Attributes: `down` (nn.Linear dim -> rank), `up` (nn.Linear rank -> dim), `scale` (an
    nn.Parameter for "channel" [D] or "layer" [1] scaling, a float for a constant, None for
    none), `norm` (nn.LayerNorm or None), `activation` (the name). DropPath is the op's
    row_scale: one keep/drop draw per sample (x.shape[0]), divided by the keep probability,
    in training mode only; it multiplies before the scale, as in Adapter+.

    With dropout > 0 the bottleneck runs as plain PyTorch ops (dropout sits between the two
    projections, inside what the kernel fuses). `fused=False` forces that path too; it draws
    the same DropPath mask from the same random state, so both paths agree under a fixed seed.
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
        if config.scaling == "channel":
            self.scale = nn.Parameter(torch.ones(dim, **factory))
        elif config.scaling == "layer":
            self.scale = nn.Parameter(torch.ones(1, **factory))
        else:
            self.scale = None if config.scaling is None else float(config.scaling)
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "houlsby":  # Houlsby et al. 2019, as Adapter+ uses it (std 0.01, cut at 2 std)
            for linear in (self.down, self.up):
                nn.init.trunc_normal_(linear.weight, std=0.01, a=-0.02, b=0.02)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        elif self.init == "lora":  # down as nn.Linear's default, up zero: the adapter starts as identity
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            if self.down.bias is not None:
                bound = 1 / math.sqrt(self.dim)
                nn.init.uniform_(self.down.bias, -bound, bound)
            nn.init.zeros_(self.up.weight)
            if self.up.bias is not None:
                nn.init.zeros_(self.up.bias)
        else:  # bert
            for linear in (self.down, self.up):
                nn.init.normal_(linear.weight, std=0.02)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        if isinstance(self.scale, nn.Parameter):
            nn.init.ones_(self.scale)

    def extra_repr(self) -> str:
        scale = "channel" if isinstance(self.scale, nn.Parameter) and self.scale.numel() > 1 else (
            "layer" if isinstance(self.scale, nn.Parameter) else self.scale)
        return (f"dim={self.dim}, rank={self.rank}, activation={self.activation}, scale={scale}, "
                f"drop_path={self.drop_path}, dropout={self.dropout}")

    def drop_path_scale(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The per-row DropPath factor [M] for x [batch, ..., D], or None outside training."""
        if not self.training or self.drop_path == 0.0 or x.numel() == 0:
            return None
        keep = 1.0 - self.drop_path
        samples = x.shape[0] if x.dim() > 1 else 1
        rows_per_sample = x[0].numel() // x.shape[-1] if x.dim() > 1 else 1
        mask = torch.empty(samples, device=x.device, dtype=torch.float32).bernoulli_(keep).div_(keep)
        return mask.repeat_interleave(rows_per_sample)

    def forward(self, x: torch.Tensor, residual=None) -> torch.Tensor:
        """residual: None, a tensor shaped like x, or a sequence of such tensors (their sum); x
        itself may be one of them (see bottleneck_adapter)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"BottleneckAdapter(dim={self.dim}) got input of width {x.shape[-1]}")
        row_scale = self.drop_path_scale(x)
        inputs = self.norm(x) if self.norm is not None else x
        if self.dropout > 0.0 and self.training:
            return self._forward_unfused(inputs, residual, row_scale)
        fn = bottleneck_adapter if self.fused else reference.bottleneck_adapter
        return fn(inputs, self.down.weight, self.down.bias, self.up.weight, self.up.bias, self.scale,
                  activation=self.activation, residual=residual, row_scale=row_scale)

    def _forward_unfused(self, x, residual, row_scale):
        dtype = reference.compute_dtype(x)
        hidden = reference.bottleneck_hidden(x, self.down.weight, self.down.bias, dtype)
        act = nn.functional.dropout(reference.activation_fn(self.activation)(hidden), self.dropout, True)
        bias = None if self.up.bias is None else self.up.bias.to(dtype)
        update = nn.functional.linear(act, self.up.weight.to(dtype), bias)
        if row_scale is not None:
            update = update * row_scale.to(dtype).reshape(*x.shape[:-1], 1)
        if isinstance(self.scale, torch.Tensor):
            # Under autocast the scale multiplies in its own dtype, as in eager code and the op.
            update = update * (self.scale if torch.is_autocast_enabled(x.device.type) else self.scale.to(dtype))
        elif self.scale is not None:
            update = update * self.scale
        for term in reference.residual_terms(residual):
            update = term + update
        return update
