"""Argument checks the ops share: a TypeError or ValueError that names the argument and says
what was expected, before any kernel runs."""

from __future__ import annotations

import numbers

import torch

from . import reference
from .launch import takes_triton

MAX_RANK = 256


def check_bottleneck_arguments(x, w_down, b_down, w_up, b_up, scale, activation, residual, row_scale):
    """Raise a TypeError/ValueError naming the argument; return (scale tensor or None, scale
    value, residual terms)."""
    check_float_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape [..., D] with D >= 1, got {tuple(x.shape)}")
    dim = x.shape[-1]
    rows = x.numel() // dim
    check_float_tensor("w_down", w_down)
    if w_down.dim() != 2:
        raise ValueError(f"w_down must have shape [rank, D] = [rank, {dim}], got {tuple(w_down.shape)}")
    if w_down.shape[1] != dim:
        raise ValueError(f"x has D = {dim}, w_down has D = {w_down.shape[1]}: w_down must have shape [rank, D] "
                         f"with D = x.shape[-1]")
    rank = w_down.shape[0]
    if rank == 0:
        raise ValueError("w_down has rank 0 (shape [0, D]); the bottleneck needs rank >= 1")
    if rank > MAX_RANK and takes_triton(x.device.type, (x.dtype, reference.compute_dtype(x))):
        raise ValueError(f"w_down has rank {rank}; the fused kernels support rank 1 to {MAX_RANK}")
    check_float_tensor("w_up", w_up)
    if tuple(w_up.shape) != (dim, rank):
        raise ValueError(f"w_up must have shape [D, rank] = [{dim}, {rank}], got {tuple(w_up.shape)}")
    if b_down is not None:
        check_float_tensor("b_down", b_down)
        if tuple(b_down.shape) != (rank,):
            raise ValueError(f"b_down must have shape [rank] = [{rank}], got {tuple(b_down.shape)}")
    if b_up is not None:
        check_float_tensor("b_up", b_up)
        if tuple(b_up.shape) != (dim,):
            raise ValueError(f"b_up must have shape [D] = [{dim}], got {tuple(b_up.shape)}")
    if not isinstance(activation, str) or activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(reference.ACTIVATIONS)}, got {activation!r}")
    terms = check_residual(x, residual)
    if row_scale is not None:
        check_float_tensor("row_scale", row_scale)
        if row_scale.dim() != 1 or row_scale.shape[0] != rows:
            raise ValueError(
                f"row_scale must have shape [M] = [{rows}] (one value per row of x), got {tuple(row_scale.shape)}"
            )
    scale_tensor, scale_value = None, 1.0
    if isinstance(scale, torch.Tensor):
        check_float_tensor("scale", scale)
        if scale.numel() != 1 and tuple(scale.shape) != (dim,):
            raise ValueError(
                f"scale must be a [D] = [{dim}] tensor, a one-element tensor, a float or None, "
                f"got shape {tuple(scale.shape)}"
            )
        scale_tensor = scale
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        scale_value = float(scale)
    elif scale is not None:
        raise TypeError(f"scale must be a tensor, a float or None, got {type(scale).__name__}")
    named = [("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up), ("scale", scale_tensor),
             ("row_scale", row_scale)]
    for name, tensor in named:
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}; put all tensors on one device")
    return scale_tensor, scale_value, terms


def check_residual(x, residual) -> list:
    if residual is None or isinstance(residual, torch.Tensor):
        terms, names = reference.residual_terms(residual), ["residual"]
    elif isinstance(residual, (tuple, list)) and len(residual) > 0:
        terms, names = list(residual), [f"residual[{i}]" for i in range(len(residual))]
    else:
        raise TypeError(f"residual must be a tensor shaped like x, a non-empty tuple or list of such tensors, or "
                        f"None; got {type(residual).__name__}{' (empty)' if isinstance(residual, (tuple, list)) else ''}")
    for name, term in zip(names, terms):
        check_float_tensor(name, term)
        if term.shape != x.shape:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(term.shape)}")
        if term.device != x.device:
            raise ValueError(f"{name} is on {term.device} but x is on {x.device}; put all tensors on one device")
    return terms


def check_float_tensor(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16 or float32), got {tensor.dtype}")
