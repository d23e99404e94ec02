"""AdapterFusion: y = residual + sum_i p_i (a_i W_v^T), p = softmax_i(q . k_i / T) (reference.adapter_fusion)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference

__all__ = ["adapter_fusion"]


def adapter_fusion(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    w_query: torch.Tensor,
    b_query: Optional[torch.Tensor],
    w_key: torch.Tensor,
    b_key: Optional[torch.Tensor],
    w_value: torch.Tensor,
    *,
    activation: str = "gelu",
    residual=None,
    temperature: float = 1.0,
) -> torch.Tensor:
    return reference.adapter_fusion(x, w_down, b_down, w_up, b_up, scale, w_query, b_query, w_key, b_key, w_value,
                                    activation=activation, residual=residual, temperature=temperature)
