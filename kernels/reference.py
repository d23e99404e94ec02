"""Plain-PyTorch versions of every op.

One source for three jobs: the spec (DESIGN.md's math, line by line), the CPU path of the
public ops, and the eager baseline that the benchmarks time. Nothing here is fused or clever;
keep it that way.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "activation_fn",
    "activation_grad",
    "bottleneck_adapter",
    "bottleneck_adapter_backward",
    "bottleneck_hidden",
]


def _gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")


# The activations every op accepts, by name. gelu is the exact (erf) form, as in nn.GELU().
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "identity": lambda h: h,
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


def bottleneck_hidden(x: torch.Tensor, w_down: torch.Tensor, b_down: Optional[torch.Tensor]) -> torch.Tensor:
    """The pre-activation x @ w_down.T + b_down, computed in x's dtype."""
    dtype = x.dtype
    return F.linear(x, w_down.to(dtype), None if b_down is None else b_down.to(dtype))


def bottleneck_adapter(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    scale: Union[torch.Tensor, float, None] = None,
    *,
    activation: str = "gelu",
    residual: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = residual + scale * (row_scale[:, None] * (act(x @ w_down.T + b_down) @ w_up.T + b_up)).

    Parameters are cast to x's dtype (autocast style); the result has x's dtype. row_scale is
    a constant per row of x (rows = x.numel() // D) and takes no gradient.
    """
    dtype = x.dtype
    hidden = bottleneck_hidden(x, w_down, b_down)
    update = F.linear(activation_fn(activation)(hidden), w_up.to(dtype), None if b_up is None else b_up.to(dtype))
    if row_scale is not None:
        update = update * row_scale.detach().to(dtype).reshape(*x.shape[:-1], 1)
    if scale is not None:
        update = update * (scale.to(dtype) if isinstance(scale, torch.Tensor) else scale)
    if residual is not None:
        update = residual + update
    return update



def activation_grad(name: str, h: torch.Tensor) -> torch.Tensor:
    """d act(h) / dh in closed form, the same formulas the kernels use."""
    if name == "gelu":
        return 0.5 * (1.0 + torch.erf(h * math.sqrt(0.5))) + h * torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
    if name == "gelu_tanh":
        inner_grad = math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * h * h)
        s = torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (h + 0.044715 * h * h * h))
        return s + 2.0 * h * s * (1.0 - s) * inner_grad
    if name == "relu":
        return (h > 0).to(h.dtype)
    if name == "silu":
        s = torch.sigmoid(h)
        return s * (1.0 + h * (1.0 - s))
    if name == "identity":
        return torch.ones_like(h)
    activation_fn(name)  # raises the error that names the choices
    raise AssertionError("unreachable")


def bottleneck_adapter_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    scale: Union[torch.Tensor, float, None] = None,
    *,
    activation: str = "gelu",
    row_scale: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, ...]:
    """The backward of bottleneck_adapter by hand, on 2-D x [M, D] and grad_y [M, D].

    Returns (dx, dw_down, db_down, dw_up, db_up, dscale) in float32 (float64 for float64 x),
    with dscale per channel [D] whatever the kind of scale; the residual's gradient is grad_y.
    This is the spec of the backward kernels and the CPU path's backward (a custom op's
    implementation runs below autograd, so it cannot differentiate the forward).
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(compute)
    w_down, w_up = w_down.to(compute), w_up.to(compute)
    hidden = F.linear(x, w_down, None if b_down is None else b_down.to(compute))
    act = activation_fn(activation)(hidden)
    grad = grad_y.to(compute)
    if row_scale is not None:
        grad = grad * row_scale.to(compute)[:, None]
    update = F.linear(act, w_up, None if b_up is None else b_up.to(compute))
    grad_scale = (grad * update).sum(0)
    if scale is not None:
        grad = grad * (scale.to(compute).reshape(-1) if isinstance(scale, torch.Tensor) else scale)
    grad_hidden = (grad @ w_up) * activation_grad(activation, hidden)
    return (
        grad_hidden @ w_down,
        grad_hidden.T @ x,
        grad_hidden.sum(0),
        grad.T @ act,
        grad.sum(0),
        grad_scale,
    )
