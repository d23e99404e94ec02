"""Dropout inside the kernels: the keep mask is a pure function of (seed, row, column, stream), so
a backward regenerates the forward's mask instead of saving it.

    u(seed, row, col, stream) = Philox4x32-10 with key (seed's low and high 32 bits) and counter
                                (col, row, stream, 0), its first word as a float in [0, 1)
                                (Triton's uint_to_uniform_float: the same stream tl.rand gives)
    keep = u > p,   factor = keep / (1 - p)

Streams: HIDDEN_STREAM for a bottleneck's activated hidden (column = rank index; expert e's
rank j of a mixture, or adapter e's of a fusion, is column e * r + j), INPUT_STREAM for the
LoRA branch's input x (column = input feature). Rows are the op's 2-D rows. The counter holds
row and column apiece, so no two elements of an op share one at any size.

The seed is an int64 tensor on the op's device, drawn from torch's generator for that device
(new_seed), so torch.manual_seed makes runs repeat, each call draws a fresh one, and nothing
syncs with the host: the kernels load it, the reference path (reference.dropout_factor) reads
it with tensor ops.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import HIDDEN_STREAM, INPUT_STREAM

__all__ = ["HIDDEN", "INPUT", "dropout_factor", "new_seed", "check_dropout", "seed_tensor", "keep_factor",
           "launch_args"]

# The streams as the kernels name them (reference.py defines them).
HIDDEN = tl.constexpr(HIDDEN_STREAM)
INPUT = tl.constexpr(INPUT_STREAM)


@triton.jit
def dropout_factor(seed, row_ids, col_ids, p, keep_factor_value, STREAM: tl.constexpr):
    """[rows, cols] fp32: keep_factor_value (1 / (1 - p)) where the element is kept, 0 where it is
    dropped. seed: the loaded int64 seed; row_ids [rows], col_ids [cols] (any int type)."""
    cols = (col_ids[None, :] + row_ids[:, None] * 0).to(tl.uint32)
    rows = (row_ids[:, None] + col_ids[None, :] * 0).to(tl.uint32)
    zero = cols * 0
    word, _, _, _ = tl.random.philox(seed, cols, rows, zero + STREAM, zero)
    uniform = tl.random.uint_to_uniform_float(word)
    return tl.where(uniform > p, keep_factor_value, 0.0)


def check_dropout(name: str, p) -> float:
    """p as a float in [0, 1); a ValueError naming the argument otherwise."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")
    return float(p)


def keep_factor(p: float) -> float:
    """1 / (1 - p), the factor kept elements are scaled by."""
    return 1.0 / (1.0 - p)


def new_seed(device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A fresh int64 seed tensor [] on `device`, drawn from `generator` (default: torch's default
    generator for that device). Drawn on the device: no host sync, and CUDA graph capture and
    torch.compile see an ordinary random op."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device, generator=generator)


def seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The op's seed argument as an int64 tensor [] on `device`: None draws a new one (new_seed), an
    int becomes a tensor, an int64 tensor with one element is used as it is (reshaped)."""
    if seed is None:
        return new_seed(device)
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"seed must be an int, an int64 tensor with one element or None, got a "
                             f"{seed.dtype} tensor of shape {tuple(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"seed must be on the input's device {device}, got {seed.device}")
        return seed.reshape(())
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -2**63 <= int(seed) < 2**63:
        raise ValueError(f"seed must be an int (64-bit), an int64 tensor with one element or None, got {seed!r}")
    return torch.tensor(int(seed), dtype=torch.int64, device=device)


def launch_args(seed: Optional[torch.Tensor], hidden_p: float = 0.0, input_p: float = 0.0, *,
                fallback: torch.Tensor) -> dict:
    """The dropout arguments of a kernel: seed_ptr (fallback, any tensor, where there is no seed),
    the rates and their keep factors (1 where the rate is 0: the kernel compiles without it)."""
    return dict(seed_ptr=fallback if seed is None else seed, dropout_p=hidden_p, dropout_keep=keep_factor(hidden_p),
                input_dropout_p=input_p, input_dropout_keep=keep_factor(input_p))
