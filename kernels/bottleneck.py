"""Fused bottleneck adapter: y = residual + scale * (row_scale * (act(x W_d^T + b_d) W_u^T + b_u)).

Forward: one Triton launch. Each program owns a tile of rows, accumulates the pre-activation
h = x W_d^T + b_d over D in fp32 registers, then walks D again for u = act(h) W_u^T with the
epilogue (bias, row_scale, scale, residual, cast) fused. No M x D intermediate is written; the
M x r pre-activation is stored only when a backward will need it.

Backward: two Triton launches, no float atomics.
  1. _backward_hidden_kernel, one program per row tile: dh = ((dy * row_scale * scale) W_u)
     * act'(h), a full reduction over D per row, so it has to finish before anything needs dh.
     It also writes act(h) [M, r], so the next kernel runs no transcendentals.
  2. _backward_input_and_weights_kernel, a grid of (row chunk, D tile, rank block): dx = dh W_d
     for its tile, and fp32 partial sums of every parameter gradient over its row chunk, kept
     in registers and written once. torch sums the partials over chunks afterwards, so the
     result does not depend on scheduling: the same inputs give bitwise the same gradients.
     Ranks above 64 (32 for fp32) are split over the third grid axis.

Saved for backward: x by reference, the parameters, and the fp32 pre-activation [M, r].

The functional entry point is `bottleneck_adapter`; it validates arguments and calls the
torch.library custom op `fused_adapters::bottleneck_forward`, whose autograd calls
`fused_adapters::bottleneck_backward`. torch.compile sees one node for each.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from . import reference

__all__ = [
    "bottleneck_adapter",
    "BlockConfig",
    "FORWARD_CONFIGS",
    "BACKWARD_HIDDEN_CONFIGS",
    "BACKWARD_WEIGHTS_CONFIGS",
    "MAX_RANK",
    "padded_rank",
    "uses_triton",
]

# tl.dot needs every dimension >= 16, and tl.arange a power of two.
MIN_BLOCK_RANK = 16
MAX_RANK = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _activation(h, ACTIVATION: tl.constexpr):
    """act(h) on an fp32 tile."""
    if ACTIVATION == "gelu":
        out = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 * (1 + tanh(z)) == sigmoid(2 z)
        out = h * tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
    elif ACTIVATION == "relu":
        out = tl.maximum(h, 0.0)
    elif ACTIVATION == "silu":
        out = h * tl.sigmoid(h)
    else:
        out = h
    return out


@triton.jit
def _activation_grad(h, ACTIVATION: tl.constexpr):
    """d act(h) / dh on an fp32 tile."""
    if ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        out = cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    elif ACTIVATION == "gelu_tanh":
        s = tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
        # d/dh sigmoid(2 z(h)) = 2 s (1 - s) z'(h), z' = sqrt(2/pi) (1 + 3 * 0.044715 h^2)
        out = s + h * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * h * h)
    elif ACTIVATION == "relu":
        out = tl.where(h > 0.0, 1.0, 0.0)
    elif ACTIVATION == "silu":
        s = tl.sigmoid(h)
        out = s * (1.0 + h * (1.0 - s))
    else:
        out = tl.full(h.shape, 1.0, tl.float32)
    return out


@triton.jit
def _bottleneck_forward_kernel(
    x_ptr, w_down_ptr, b_down_ptr, w_up_ptr, b_up_ptr, scale_ptr, residual_ptr, row_scale_ptr,
    y_ptr, hidden_ptr,
    rows, dim, rank, scale_value,
    stride_x_row, stride_x_col, stride_res_row, stride_res_col,
    ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_B_DOWN: tl.constexpr,
    HAS_B_UP: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    STORE_HIDDEN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_RANK: tl.constexpr,
):
    # This program's tile: rows [pid * BLOCK_ROWS, +BLOCK_ROWS), every column, every rank.
    pid = tl.program_id(0)
    row_ids = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_ids = row_ids.to(tl.int64)  # M * D may pass 2^31
    rank_ids = tl.arange(0, BLOCK_RANK)
    rank_mask = rank_ids < rank
    dtype = x_ptr.dtype.element_ty

    # h[BLOCK_ROWS, BLOCK_RANK] = x[rows, :] @ w_down.T; padded ranks load zero weights.
    hidden = tl.zeros((BLOCK_ROWS, BLOCK_RANK), dtype=tl.float32)
    for col_start in range(0, dim, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim
        x_tile = tl.load(
            x_ptr + row_ids[:, None] * stride_x_row + col_ids[None, :] * stride_x_col,
            mask=row_mask[:, None] & col_mask[None, :], other=0.0,
        )
        w_down_t = tl.load(
            w_down_ptr + rank_ids[None, :] * dim + col_ids[:, None],
            mask=col_mask[:, None] & rank_mask[None, :], other=0.0,
        ).to(dtype)
        hidden = tl.dot(x_tile, w_down_t, hidden, input_precision=INPUT_PRECISION)
    if HAS_B_DOWN:
        hidden += tl.load(b_down_ptr + rank_ids, mask=rank_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    if STORE_HIDDEN:
        tl.store(
            hidden_ptr + row_ids[:, None] * rank + rank_ids[None, :], hidden,
            mask=row_mask[:, None] & rank_mask[None, :],
        )
    # act(0) == 0 for every activation, so padded ranks stay zero. Rounded to x's dtype as
    # the eager module would, then fed to the second dot.
    act = _activation(hidden, ACTIVATION).to(dtype)

    if HAS_ROW_SCALE:
        row_scale = tl.load(row_scale_ptr + row_ids, mask=row_mask, other=0.0).to(tl.float32)
    if SCALE_MODE == "tensor":
        scalar_scale = tl.load(scale_ptr).to(tl.float32)

    # y[rows, cols] = residual + scale * (row_scale * (act @ w_up[cols].T + b_up[cols])), per D tile.
    for col_start in range(0, dim, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim
        tile_mask = row_mask[:, None] & col_mask[None, :]
        w_up_t = tl.load(
            w_up_ptr + col_ids[None, :] * rank + rank_ids[:, None],
            mask=rank_mask[:, None] & col_mask[None, :], other=0.0,
        ).to(dtype)
        update = tl.dot(act, w_up_t, input_precision=INPUT_PRECISION)
        if HAS_B_UP:
            update += tl.load(b_up_ptr + col_ids, mask=col_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
        if HAS_ROW_SCALE:
            update = update * row_scale[:, None]
        if SCALE_MODE == "channel":
            update = update * tl.load(scale_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        elif SCALE_MODE == "tensor":
            update = update * scalar_scale
        else:
            update = update * scale_value
        if HAS_RESIDUAL:
            update += tl.load(
                residual_ptr + row_ids[:, None] * stride_res_row + col_ids[None, :] * stride_res_col,
                mask=tile_mask, other=0.0,
            ).to(tl.float32)
        tl.store(y_ptr + row_ids[:, None] * dim + col_ids[None, :], update.to(dtype), mask=tile_mask)


@triton.jit
def _backward_hidden_kernel(
    grad_y_ptr, hidden_ptr, w_up_ptr, scale_ptr, row_scale_ptr, grad_hidden_ptr, act_ptr,
    rows, dim, rank, scale_value,
    stride_g_row, stride_g_col,
    ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_RANK: tl.constexpr,
):
    # This program's tile: dh[rows, :] and act(h)[rows, :] for rows [pid * BLOCK_ROWS, +BLOCK_ROWS).
    pid = tl.program_id(0)
    row_ids = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_ids = row_ids.to(tl.int64)
    rank_ids = tl.arange(0, BLOCK_RANK)
    rank_mask = rank_ids < rank
    dtype = w_up_ptr.dtype.element_ty  # the compute dtype (x's); the launcher casts w_up to it

    if HAS_ROW_SCALE:
        row_scale = tl.load(row_scale_ptr + row_ids, mask=row_mask, other=0.0).to(tl.float32)
    if SCALE_MODE == "tensor":
        scalar_scale = tl.load(scale_ptr).to(tl.float32)

    # d act = (dy * row_scale * scale) @ w_up, reduced over D.
    grad_act = tl.zeros((BLOCK_ROWS, BLOCK_RANK), dtype=tl.float32)
    for col_start in range(0, dim, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim
        grad_update = tl.load(
            grad_y_ptr + row_ids[:, None] * stride_g_row + col_ids[None, :] * stride_g_col,
            mask=row_mask[:, None] & col_mask[None, :], other=0.0,
        ).to(tl.float32)
        if HAS_ROW_SCALE:
            grad_update = grad_update * row_scale[:, None]
        if SCALE_MODE == "channel":
            grad_update = grad_update * tl.load(scale_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        elif SCALE_MODE == "tensor":
            grad_update = grad_update * scalar_scale
        else:
            grad_update = grad_update * scale_value
        w_up_tile = tl.load(
            w_up_ptr + col_ids[:, None] * rank + rank_ids[None, :],
            mask=col_mask[:, None] & rank_mask[None, :], other=0.0,
        )
        grad_act = tl.dot(grad_update.to(dtype), w_up_tile, grad_act, input_precision=INPUT_PRECISION)

    hidden_mask = row_mask[:, None] & rank_mask[None, :]
    hidden = tl.load(hidden_ptr + row_ids[:, None] * rank + rank_ids[None, :], mask=hidden_mask, other=0.0)
    grad_hidden = grad_act * _activation_grad(hidden, ACTIVATION)
    tl.store(grad_hidden_ptr + row_ids[:, None] * rank + rank_ids[None, :], grad_hidden, mask=hidden_mask)
    # act(h) for the weight gradients, so the next kernel runs no transcendentals: there Triton
    # hoisted gelu into the dot-operand layout, replicated across warps (compile check, rank 64,
    # bf16, sm_80: 3432 bytes of spills before, 0 after).
    tl.store(act_ptr + row_ids[:, None] * rank + rank_ids[None, :], _activation(hidden, ACTIVATION).to(dtype),
             mask=hidden_mask)


@triton.jit
def _backward_input_and_weights_kernel(
    grad_y_ptr, x_ptr, act_ptr, grad_hidden_ptr, w_down_ptr, w_up_ptr, b_up_ptr, scale_ptr,
    row_scale_ptr, grad_x_ptr, partials_ptr,
    rows, dim, rank, scale_value, tiles_per_chunk,
    stride_g_row, stride_g_col, stride_x_row, stride_x_col,
    SCALE_MODE: tl.constexpr, HAS_B_UP: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, COMPUTE_DX: tl.constexpr,
    SPLIT_RANK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_RANK: tl.constexpr,
):
    # This program's tile: columns [pid_col * BLOCK_DIM, +BLOCK_DIM) and ranks
    # [pid_rank * BLOCK_RANK, +BLOCK_RANK) of the parameter gradients, summed over the row tiles
    # [pid_chunk * tiles_per_chunk, +tiles_per_chunk); and, in the pid_rank == 0 programs, the
    # same columns of dx for those rows.
    pid_chunk = tl.program_id(0)
    pid_col = tl.program_id(1)
    pid_rank = tl.program_id(2)
    col_ids = pid_col * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    col_mask = col_ids < dim
    rank_ids = pid_rank * BLOCK_RANK + tl.arange(0, BLOCK_RANK)
    rank_mask = rank_ids < rank
    dtype = w_up_ptr.dtype.element_ty  # the compute dtype (x's); the launcher casts weights to it

    if COMPUTE_DX and not SPLIT_RANK:
        w_down_tile = tl.load(
            w_down_ptr + rank_ids[:, None] * dim + col_ids[None, :],
            mask=rank_mask[:, None] & col_mask[None, :], other=0.0,
        )

    # With g = dy * row_scale and u = act @ w_up.T + b_up, every gradient of the up side follows
    # from two sums over rows: ga = g.T @ act and gs = sum(g). dw_up = scale * ga,
    # db_up = scale * gs, dscale = rowsum(w_up * ga) + b_up * gs. So u is never recomputed and
    # the loop carries one [D, r] accumulator for the up side, not three.
    acc_ga = tl.zeros((BLOCK_DIM, BLOCK_RANK), dtype=tl.float32)
    acc_gs = tl.zeros((BLOCK_DIM,), dtype=tl.float32)
    acc_w_down = tl.zeros((BLOCK_RANK, BLOCK_DIM), dtype=tl.float32)
    acc_b_down = tl.zeros((BLOCK_RANK,), dtype=tl.float32)

    first_tile = pid_chunk * tiles_per_chunk
    for tile in range(first_tile, first_tile + tiles_per_chunk):
        row_ids = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = row_ids < rows
        row_ids = row_ids.to(tl.int64)
        tile_mask = row_mask[:, None] & col_mask[None, :]
        hidden_mask = row_mask[:, None] & rank_mask[None, :]

        grad_y = tl.load(
            grad_y_ptr + row_ids[:, None] * stride_g_row + col_ids[None, :] * stride_g_col,
            mask=tile_mask, other=0.0,
        )
        if HAS_ROW_SCALE:
            row_scale = tl.load(row_scale_ptr + row_ids, mask=row_mask, other=0.0).to(tl.float32)
            grad_y = (grad_y.to(tl.float32) * row_scale[:, None]).to(dtype)
        act = tl.load(act_ptr + row_ids[:, None] * rank + rank_ids[None, :], mask=hidden_mask, other=0.0)
        acc_ga = tl.dot(tl.trans(grad_y), act, acc_ga, input_precision=INPUT_PRECISION)
        acc_gs += tl.sum(grad_y.to(tl.float32), axis=0)

        grad_hidden = tl.load(
            grad_hidden_ptr + row_ids[:, None] * rank + rank_ids[None, :], mask=hidden_mask, other=0.0
        )
        acc_b_down += tl.sum(grad_hidden, axis=0)
        grad_hidden = grad_hidden.to(dtype)
        x_tile = tl.load(
            x_ptr + row_ids[:, None] * stride_x_row + col_ids[None, :] * stride_x_col, mask=tile_mask, other=0.0
        )
        acc_w_down = tl.dot(tl.trans(grad_hidden), x_tile, acc_w_down, input_precision=INPUT_PRECISION)
        if COMPUTE_DX:
            if SPLIT_RANK:
                # dx needs every rank: the pid_rank == 0 programs walk them in BLOCK_RANK steps.
                if pid_rank == 0:
                    grad_x = tl.zeros((BLOCK_ROWS, BLOCK_DIM), dtype=tl.float32)
                    for rank_start in range(0, rank, BLOCK_RANK):
                        step_ids = rank_start + tl.arange(0, BLOCK_RANK)
                        step_mask = step_ids < rank
                        step_grad_hidden = tl.load(
                            grad_hidden_ptr + row_ids[:, None] * rank + step_ids[None, :],
                            mask=row_mask[:, None] & step_mask[None, :], other=0.0,
                        ).to(dtype)
                        step_w_down = tl.load(
                            w_down_ptr + step_ids[:, None] * dim + col_ids[None, :],
                            mask=step_mask[:, None] & col_mask[None, :], other=0.0,
                        )
                        grad_x = tl.dot(step_grad_hidden, step_w_down, grad_x, input_precision=INPUT_PRECISION)
                    tl.store(grad_x_ptr + row_ids[:, None] * dim + col_ids[None, :], grad_x.to(dtype),
                             mask=tile_mask)
            else:
                grad_x = tl.dot(grad_hidden, w_down_tile, input_precision=INPUT_PRECISION)
                tl.store(grad_x_ptr + row_ids[:, None] * dim + col_ids[None, :], grad_x.to(dtype), mask=tile_mask)

    # Epilogue: turn (ga, gs) into the up-side gradients of this chunk and rank block.
    if SCALE_MODE == "channel":
        col_scale = tl.load(scale_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)
    elif SCALE_MODE == "tensor":
        col_scale = tl.full((BLOCK_DIM,), 1.0, tl.float32) * tl.load(scale_ptr).to(tl.float32)
    else:
        col_scale = tl.full((BLOCK_DIM,), 1.0, tl.float32) * scale_value
    up_mask = col_mask[:, None] & rank_mask[None, :]
    w_up_tile = tl.load(w_up_ptr + col_ids[:, None] * rank + rank_ids[None, :], mask=up_mask, other=0.0)
    grad_scale = tl.sum(w_up_tile.to(tl.float32) * acc_ga, axis=1)
    if HAS_B_UP:
        b_up_term = tl.load(b_up_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32) * acc_gs
        grad_scale += tl.where(pid_rank == 0, b_up_term, 0.0)

    # Partials of chunk c, in the layout of _partials_size:
    # [dw_up (D x r) | dw_down (r x D) | db_up (D) | dscale per rank block (blocks x D) | db_down (r)].
    rank_blocks = tl.num_programs(2)
    partial = partials_ptr + pid_chunk.to(tl.int64) * (2 * dim * rank + (1 + rank_blocks) * dim + rank)
    tl.store(partial + col_ids[:, None] * rank + rank_ids[None, :], acc_ga * col_scale[:, None], mask=up_mask)
    tl.store(
        partial + dim * rank + rank_ids[:, None] * dim + col_ids[None, :], acc_w_down,
        mask=rank_mask[:, None] & col_mask[None, :],
    )
    tl.store(partial + 2 * dim * rank + col_ids, acc_gs * col_scale, mask=col_mask & (pid_rank == 0))
    tl.store(partial + 2 * dim * rank + (1 + pid_rank) * dim + col_ids, grad_scale, mask=col_mask)
    tl.store(partial + 2 * dim * rank + (1 + rank_blocks) * dim + rank_ids, acc_b_down,
             mask=rank_mask & (pid_col == 0))


# --------------------------------------------------------------------------------------------
# Block configurations: a small named set per padded rank, so the compile check covers them all.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockConfig:
    name: str
    block_rows: int
    block_dim: int
    num_warps: int
    num_stages: int
    # Backward weights kernel only: ranks per program. Below the padded rank, the rank axis is
    # split over a third grid axis (the two [D, r] accumulators of rank 128+ do not fit in
    # registers). 0 means all of them.
    rank_tile: int = 0


def padded_rank(rank: int) -> int:
    """The rank tile: the next power of two, at least tl.dot's minimum of 16."""
    return max(MIN_BLOCK_RANK, triton.next_power_of_2(rank))


def dtype_group(dtype: torch.dtype) -> str:
    # fp32 dots without tf32 lower to FMAs, which need far more registers per tile than MMA.
    return "fp32" if dtype == torch.float32 else "half"


# Keyed by (padded rank, dtype group). Every entry was compiled for sm_80 and sm_90 with
# compile_check: the chosen tiles are the largest tried that have no spills in either
# specialization (aligned and unaligned); see kernels/compile_check.py for the table.
FORWARD_CONFIGS = {
    (16, "half"): BlockConfig("fwd_r16_half", 64, 64, 8, 2),
    (32, "half"): BlockConfig("fwd_r32_half", 64, 64, 8, 2),
    (64, "half"): BlockConfig("fwd_r64_half", 64, 64, 8, 2),
    (128, "half"): BlockConfig("fwd_r128_half", 64, 64, 8, 2),
    (256, "half"): BlockConfig("fwd_r256_half", 32, 32, 8, 2),
    (16, "fp32"): BlockConfig("fwd_r16_fp32", 32, 64, 8, 2),
    (32, "fp32"): BlockConfig("fwd_r32_fp32", 32, 64, 8, 2),
    (64, "fp32"): BlockConfig("fwd_r64_fp32", 32, 64, 8, 2),
    (128, "fp32"): BlockConfig("fwd_r128_fp32", 16, 64, 8, 2),
    (256, "fp32"): BlockConfig("fwd_r256_fp32", 16, 16, 4, 2),
}
BACKWARD_HIDDEN_CONFIGS = {
    (16, "half"): BlockConfig("bwd_hidden_r16_half", 64, 64, 8, 2),
    (32, "half"): BlockConfig("bwd_hidden_r32_half", 64, 64, 8, 2),
    (64, "half"): BlockConfig("bwd_hidden_r64_half", 64, 64, 8, 2),
    (128, "half"): BlockConfig("bwd_hidden_r128_half", 32, 64, 8, 2),
    (256, "half"): BlockConfig("bwd_hidden_r256_half", 16, 64, 8, 2),
    (16, "fp32"): BlockConfig("bwd_hidden_r16_fp32", 64, 64, 8, 2),
    (32, "fp32"): BlockConfig("bwd_hidden_r32_fp32", 64, 64, 8, 2),
    (64, "fp32"): BlockConfig("bwd_hidden_r64_fp32", 32, 64, 8, 2),
    (128, "fp32"): BlockConfig("bwd_hidden_r128_fp32", 32, 32, 8, 2),
    (256, "fp32"): BlockConfig("bwd_hidden_r256_fp32", 16, 32, 8, 2),
}
BACKWARD_WEIGHTS_CONFIGS = {
    (16, "half"): BlockConfig("bwd_weights_r16_half", 32, 64, 8, 2),
    (32, "half"): BlockConfig("bwd_weights_r32_half", 32, 64, 8, 2),
    (64, "half"): BlockConfig("bwd_weights_r64_half", 16, 32, 8, 2),
    (128, "half"): BlockConfig("bwd_weights_r128_half", 16, 32, 8, 2, rank_tile=64),
    (256, "half"): BlockConfig("bwd_weights_r256_half", 16, 32, 8, 2, rank_tile=64),
    (16, "fp32"): BlockConfig("bwd_weights_r16_fp32", 32, 32, 4, 2),
    (32, "fp32"): BlockConfig("bwd_weights_r32_fp32", 16, 32, 8, 2),
    (64, "fp32"): BlockConfig("bwd_weights_r64_fp32", 16, 32, 4, 2, rank_tile=32),
    (128, "fp32"): BlockConfig("bwd_weights_r128_fp32", 16, 32, 4, 2, rank_tile=32),
    (256, "fp32"): BlockConfig("bwd_weights_r256_fp32", 16, 32, 4, 2, rank_tile=32),
}


def block_config(table: dict, rank: int, dtype: torch.dtype) -> BlockConfig:
    return table[(padded_rank(rank), dtype_group(dtype))]


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _is_interpreted() -> bool:
    # triton.jit returns an InterpretedFunction when TRITON_INTERPRET=1 was set before import.
    return not isinstance(_bottleneck_forward_kernel, triton.runtime.JITFunction)


def uses_triton(x: torch.Tensor) -> bool:
    """Whether x takes the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1) or the reference."""
    if x.dtype not in KERNEL_DTYPES:
        return False
    if x.device.type == "cuda":
        return True
    # The interpreter has no bf16 (tl.dot multiplies the raw bit patterns): bf16 on the CPU
    # takes the reference even under TRITON_INTERPRET=1, rather than a silently wrong answer.
    return x.device.type == "cpu" and _is_interpreted() and x.dtype != torch.bfloat16


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 dots follow torch's switch: tf32 tensor cores only when the user allowed them.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=None)
def _program_slots(device: torch.device) -> int:
    """How many programs the weight-gradient grid aims for: a few waves of the SMs."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one by one; a few chunks still exercise the reduction


def _scale_mode(scale: Optional[torch.Tensor]) -> str:
    if scale is None:
        return "value"
    return "tensor" if scale.numel() == 1 else "channel"


def _device_context(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else _NullContext()


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _new_output(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here: tests swap in NaN-filled buffers to prove
    that each element is written."""
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass
class Launch:
    """One kernel launch, fully described: the runtime calls it, the compile check compiles it."""

    kernel: object
    grid: tuple
    args: dict  # runtime arguments by name: tensors, ints, floats
    constexprs: dict
    config: BlockConfig

    def __call__(self) -> None:
        self.kernel[self.grid](
            **self.args, **self.constexprs, num_warps=self.config.num_warps, num_stages=self.config.num_stages
        )


def _or(tensor: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """A small (parameter-sized) tensor made contiguous, or a stand-in pointer for an absent one
    that the kernel's constexpr flag keeps unread. M x D tensors never go through here: the
    kernels take their strides."""
    return fallback if tensor is None else tensor.contiguous()


def _int32_columns(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels widen row offsets to int64 but keep column offsets in int32 (registers: every
    element of a tile carries one). A layout whose column offsets pass 2^31 (column-major with
    M * D >= 2^31) is copied to row-major instead of overflowing."""
    if tensor.shape[1] > 0 and abs(tensor.stride(1)) * (tensor.shape[1] - 1) >= 2**31:
        return tensor.contiguous()
    return tensor


def forward_launch(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, row_scale, activation, y, hidden):
    """The forward launch for 2-D x [M, D] writing y [M, D] and, if hidden has M rows, hidden [M, r]."""
    rows, dim = x.shape
    rank = w_down.shape[0]
    block_rank = padded_rank(rank)
    config = block_config(FORWARD_CONFIGS, rank, x.dtype)
    store_hidden = hidden.shape[0] == rows
    args = dict(
        x_ptr=x, w_down_ptr=w_down.contiguous(), b_down_ptr=_or(b_down, x), w_up_ptr=w_up.contiguous(),
        b_up_ptr=_or(b_up, x), scale_ptr=_or(scale, x), residual_ptr=x if residual is None else residual,
        row_scale_ptr=_or(row_scale, x), y_ptr=y, hidden_ptr=hidden if store_hidden else y,
        rows=rows, dim=dim, rank=rank, scale_value=scale_value,
        stride_x_row=x.stride(0), stride_x_col=x.stride(1),
        stride_res_row=residual.stride(0) if residual is not None else 0,
        stride_res_col=residual.stride(1) if residual is not None else 0,
    )
    constexprs = dict(
        ACTIVATION=activation, SCALE_MODE=_scale_mode(scale), HAS_B_DOWN=b_down is not None,
        HAS_B_UP=b_up is not None, HAS_RESIDUAL=residual is not None, HAS_ROW_SCALE=row_scale is not None,
        STORE_HIDDEN=store_hidden, INPUT_PRECISION=_input_precision(x.dtype),
        BLOCK_ROWS=config.block_rows, BLOCK_DIM=config.block_dim, BLOCK_RANK=block_rank,
    )
    grid = (triton.cdiv(rows, config.block_rows),)
    return Launch(_bottleneck_forward_kernel, grid, args, constexprs, config)


def backward_launches(grad_y, x, hidden, w_down, w_up, b_up, scale, scale_value, row_scale, activation,
                      grad_hidden, act, grad_x):
    """The two backward launches, and the fp32 partials buffer [chunks, packed size] they fill.

    w_down, w_up and b_up must already be contiguous in x's dtype (the dots run in it). grad_hidden [M, r]
    fp32 and act [M, r] in x's dtype are scratch the first launch fills for the second. grad_x
    has M rows when dx is wanted, else 0.
    """
    rows, dim = x.shape
    rank = w_down.shape[0]
    block_rank = padded_rank(rank)
    hidden_config = block_config(BACKWARD_HIDDEN_CONFIGS, rank, x.dtype)
    weights_config = block_config(BACKWARD_WEIGHTS_CONFIGS, rank, x.dtype)
    rank_tile = weights_config.rank_tile or block_rank
    mode = _scale_mode(scale)
    precision = _input_precision(x.dtype)
    scale_c = _or(scale, x)
    row_scale_c = _or(row_scale, x)
    compute_dx = grad_x.shape[0] == rows

    row_tiles = triton.cdiv(rows, weights_config.block_rows)
    col_tiles = triton.cdiv(dim, weights_config.block_dim)
    rank_blocks = triton.cdiv(rank, rank_tile)
    chunks = max(1, min(row_tiles, triton.cdiv(_program_slots(x.device), col_tiles * rank_blocks)))
    tiles_per_chunk = triton.cdiv(row_tiles, chunks)
    chunks = triton.cdiv(row_tiles, tiles_per_chunk)
    partials = _new_output((chunks, _partials_size(dim, rank, rank_blocks)), torch.float32, x.device)

    hidden_launch = Launch(
        _backward_hidden_kernel,
        (triton.cdiv(rows, hidden_config.block_rows),),
        dict(
            grad_y_ptr=grad_y, hidden_ptr=hidden, w_up_ptr=w_up, scale_ptr=scale_c, row_scale_ptr=row_scale_c,
            grad_hidden_ptr=grad_hidden, act_ptr=act, rows=rows, dim=dim, rank=rank, scale_value=scale_value,
            stride_g_row=grad_y.stride(0), stride_g_col=grad_y.stride(1),
        ),
        dict(
            ACTIVATION=activation, SCALE_MODE=mode, HAS_ROW_SCALE=row_scale is not None, INPUT_PRECISION=precision,
            BLOCK_ROWS=hidden_config.block_rows, BLOCK_DIM=hidden_config.block_dim, BLOCK_RANK=block_rank,
        ),
        hidden_config,
    )
    weights_launch = Launch(
        _backward_input_and_weights_kernel,
        (chunks, col_tiles, rank_blocks),
        dict(
            grad_y_ptr=grad_y, x_ptr=x, act_ptr=act, grad_hidden_ptr=grad_hidden, w_down_ptr=w_down,
            w_up_ptr=w_up, b_up_ptr=_or(b_up, x), scale_ptr=scale_c, row_scale_ptr=row_scale_c,
            grad_x_ptr=grad_x if compute_dx else grad_hidden, partials_ptr=partials,
            rows=rows, dim=dim, rank=rank, scale_value=scale_value, tiles_per_chunk=tiles_per_chunk,
            stride_g_row=grad_y.stride(0), stride_g_col=grad_y.stride(1),
            stride_x_row=x.stride(0), stride_x_col=x.stride(1),
        ),
        dict(
            SCALE_MODE=mode, HAS_B_UP=b_up is not None, HAS_ROW_SCALE=row_scale is not None,
            COMPUTE_DX=compute_dx, SPLIT_RANK=rank_tile < block_rank, INPUT_PRECISION=precision,
            BLOCK_ROWS=weights_config.block_rows, BLOCK_DIM=weights_config.block_dim, BLOCK_RANK=rank_tile,
        ),
        weights_config,
    )
    return hidden_launch, weights_launch, partials


def _forward_triton(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, row_scale, activation, save_hidden):
    rows, dim = x.shape
    rank = w_down.shape[0]
    y = _new_output((rows, dim), x.dtype, x.device)
    hidden = _new_output((rows if save_hidden else 0, rank), torch.float32, x.device)
    if rows == 0:
        return y, hidden
    if residual is not None:
        residual = _int32_columns(residual)
    launch = forward_launch(_int32_columns(x), w_down, b_down, w_up, b_up, scale, scale_value, residual, row_scale,
                            activation, y, hidden)
    with _device_context(x):
        launch()
    return y, hidden


def _backward_triton(grad_y, x, hidden, w_down, b_down, w_up, b_up, scale, scale_value, row_scale, activation,
                     compute_dx):
    rows, dim = x.shape
    rank = w_down.shape[0]
    dtype = x.dtype
    grad_x = _new_output((rows if compute_dx else 0, dim), dtype, x.device)
    if rows == 0:
        return grad_x, torch.zeros(_packed_size(dim, rank), dtype=torch.float32, device=x.device)
    if hidden.shape[0] != rows:
        raise RuntimeError("bottleneck_adapter: backward without the saved pre-activation (the forward ran with "
                           "save_hidden=False)")
    grad_hidden = _new_output((rows, rank), torch.float32, x.device)
    act = _new_output((rows, rank), dtype, x.device)
    # The dots run in x's dtype (autocast style); casting r x D weights costs nothing next to M x D.
    hidden_launch, weights_launch, partials = backward_launches(
        _int32_columns(grad_y), _int32_columns(x), hidden, w_down.to(dtype).contiguous(),
        w_up.to(dtype).contiguous(), None if b_up is None else b_up.to(dtype), scale,
        scale_value, row_scale, activation, grad_hidden, act, grad_x,
    )
    with _device_context(x):
        hidden_launch()
        weights_launch()
    # One deterministic reduction over chunks for all five gradients; _unpack_param_grads views it.
    totals = partials.sum(dim=0)
    rank_blocks = weights_launch.grid[2]
    if rank_blocks > 1:  # split ranks left one dscale row per rank block: fold them
        head, scale_rows, grad_b_down = totals.split([2 * dim * rank + dim, rank_blocks * dim, rank])
        totals = torch.cat([head, scale_rows.view(rank_blocks, dim).sum(0), grad_b_down])
    return grad_x, totals


def _packed_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32 partials for the kernels; float64 input (reference path) keeps float64 throughout.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _packed_size(dim: int, rank: int) -> int:
    """[dw_up (D x r) | dw_down (r x D) | db_up (D) | dscale per channel (D) | db_down (r)]."""
    return 2 * dim * rank + 2 * dim + rank


def _partials_size(dim: int, rank: int, rank_blocks: int) -> int:
    """One chunk's partials: the packed layout, with one dscale row per rank block."""
    return 2 * dim * rank + (1 + rank_blocks) * dim + rank


def _unpack_param_grads(packed, w_down, b_down, w_up, b_up, scale):
    """Views into the fp32 [dw_up | dw_down | db_up | dscale per channel | db_down] vector, each
    cast to its parameter's dtype (and the scale's channels summed for a layer-wise scale)."""
    rank, dim = w_down.shape
    grad_w_up, grad_w_down, grad_b_up, grad_scale, grad_b_down = packed.split(
        [dim * rank, rank * dim, dim, dim, rank]
    )
    grad_w_up = grad_w_up.view(dim, rank).to(w_up.dtype)
    grad_w_down = grad_w_down.view(rank, dim).to(w_down.dtype)
    grad_b_up = grad_b_up.to(b_up.dtype) if b_up is not None else None
    grad_b_down = grad_b_down.to(b_down.dtype) if b_down is not None else None
    if scale is None:
        grad_scale = None
    elif scale.numel() == 1:
        grad_scale = grad_scale.sum().reshape(scale.shape).to(scale.dtype)
    else:
        grad_scale = grad_scale.to(scale.dtype)
    return grad_w_down, grad_b_down, grad_w_up, grad_b_up, grad_scale


# --------------------------------------------------------------------------------------------
# torch.library ops: one graph node each for torch.compile
# --------------------------------------------------------------------------------------------


def _scale_arg(scale: Optional[torch.Tensor], scale_value: float):
    return scale if scale is not None else (None if scale_value == 1.0 else scale_value)


def _forward_impl(
    x: torch.Tensor, w_down: torch.Tensor, b_down: Optional[torch.Tensor], w_up: torch.Tensor,
    b_up: Optional[torch.Tensor], scale: Optional[torch.Tensor], scale_value: float,
    residual: Optional[torch.Tensor], row_scale: Optional[torch.Tensor], activation: str, save_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D x [M, D]. Returns y [M, D] and the fp32 pre-activation [M, r] (or [0, r] when not saved)."""
    if uses_triton(x):
        return _forward_triton(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, row_scale,
                               activation, save_hidden)
    y = reference.bottleneck_adapter(x, w_down, b_down, w_up, b_up, _scale_arg(scale, scale_value),
                                     activation=activation, residual=residual, row_scale=row_scale)
    # Row-major like the fake says (a transposed residual would make `residual + u` column-major).
    # The reference path recomputes in backward and saves nothing of its own.
    return y.contiguous(), x.new_empty((0, w_down.shape[0]), dtype=torch.float32)


_forward_op = torch.library.custom_op("fused_adapters::bottleneck_forward", _forward_impl, mutates_args=())


@_forward_op.register_fake
def _forward_fake(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, row_scale, activation, save_hidden):
    rows = x.shape[0]
    hidden_rows = rows if (save_hidden and uses_triton(x)) else 0
    return x.new_empty(x.shape), x.new_empty((hidden_rows, w_down.shape[0]), dtype=torch.float32)


def _backward_impl(
    grad_y: torch.Tensor, x: torch.Tensor, hidden: torch.Tensor, w_down: torch.Tensor,
    b_down: Optional[torch.Tensor], w_up: torch.Tensor, b_up: Optional[torch.Tensor],
    scale: Optional[torch.Tensor], scale_value: float, row_scale: Optional[torch.Tensor], activation: str,
    compute_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx ([M, D], or [0, D] when not wanted) and the packed fp32 parameter gradients (see
    _unpack_param_grads); one tensor for all of them, since a custom op's outputs may not alias."""
    if uses_triton(x):
        return _backward_triton(grad_y, x, hidden, w_down, b_down, w_up, b_up, scale, scale_value, row_scale,
                                activation, compute_dx)
    return _backward_reference(grad_y, x, w_down, b_down, w_up, b_up, scale, scale_value, row_scale, activation,
                               compute_dx)


def _backward_reference(grad_y, x, w_down, b_down, w_up, b_up, scale, scale_value, row_scale, activation, compute_dx):
    grad_x, grad_w_down, grad_b_down, grad_w_up, grad_b_up, grad_scale = reference.bottleneck_adapter_backward(
        grad_y, x, w_down, b_down, w_up, b_up, _scale_arg(scale, scale_value), activation=activation,
        row_scale=row_scale,
    )
    packed = torch.cat([g.reshape(-1) for g in (grad_w_up, grad_w_down, grad_b_up, grad_scale, grad_b_down)])
    grad_x = grad_x.to(x.dtype) if compute_dx else x.new_empty((0, x.shape[1]))
    return grad_x, packed.to(_packed_dtype(x))


_backward_op = torch.library.custom_op("fused_adapters::bottleneck_backward", _backward_impl, mutates_args=())


@_backward_op.register_fake
def _backward_fake(grad_y, x, hidden, w_down, b_down, w_up, b_up, scale, scale_value, row_scale, activation,
                   compute_dx):
    rank, dim = w_down.shape
    return (
        x.new_empty((x.shape[0] if compute_dx else 0, dim)),
        x.new_empty(_packed_size(dim, rank), dtype=_packed_dtype(x)),
    )


def _setup_context(ctx, inputs, output):
    x, w_down, b_down, w_up, b_up, scale, scale_value, residual, row_scale, activation, save_hidden = inputs
    _, hidden = output
    ctx.mark_non_differentiable(hidden)
    ctx.set_materialize_grads(False)  # no M x r zeros for the hidden output's (absent) gradient
    # x by reference, the parameters, and the M x r pre-activation: nothing of M x D is copied.
    ctx.save_for_backward(x, w_down, b_down, w_up, b_up, scale, row_scale, hidden)
    ctx.scale_value = scale_value
    ctx.activation = activation
    ctx.has_residual = residual is not None


def _backward(ctx, grad_y, grad_hidden):
    x, w_down, b_down, w_up, b_up, scale, row_scale, hidden = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grad_y is None:
        return (None,) * len(needs)
    grad_x, packed = torch.ops.fused_adapters.bottleneck_backward(
        grad_y, x, hidden, w_down, b_down, w_up, b_up, scale, ctx.scale_value, row_scale, ctx.activation, needs[0]
    )
    grad_w_down, grad_b_down, grad_w_up, grad_b_up, grad_scale = _unpack_param_grads(
        packed, w_down, b_down, w_up, b_up, scale
    )
    return (
        grad_x if needs[0] else None,
        grad_w_down if needs[1] else None,
        grad_b_down if needs[2] else None,
        grad_w_up if needs[3] else None,
        grad_b_up if needs[4] else None,
        grad_scale if needs[5] else None,
        None,
        grad_y if needs[7] else None,
        None,
        None,
        None,
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


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

    x: [..., D], any leading dims and strides, fp16/bf16/fp32 (float64 runs the reference).
    w_down [r, D], b_down [r] or None, w_up [D, r], b_up [D] or None: any float dtype; the
    math runs in x's dtype with fp32 accumulation, and gradients come back in each
    parameter's own dtype. scale: [D] (channel-wise), a one-element tensor (layer-wise), a
    Python float, or None (= 1). residual: shaped like x, or None. row_scale: [M] with
    M = x.numel() // D, a per-row constant (no gradient), or None. activation: gelu (erf),
    gelu_tanh, relu, silu or identity.

    CUDA tensors run one fused Triton launch forward and two backward; CPU tensors run the
    plain-PyTorch reference unless TRITON_INTERPRET=1 was set before import, in which case the
    same kernels run in Triton's interpreter.
    """
    scale_tensor, scale_value = _check_arguments(x, w_down, b_down, w_up, b_up, scale, activation, residual, row_scale)
    dim = x.shape[-1]
    x2d = x.reshape(-1, dim)
    residual2d = residual.reshape(-1, dim) if residual is not None else None
    if row_scale is not None:
        row_scale = row_scale.detach()
    tensors = (x, w_down, b_down, w_up, b_up, scale_tensor, residual)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, _ = torch.ops.fused_adapters.bottleneck_forward(
        x2d, w_down, b_down, w_up, b_up, scale_tensor, scale_value, residual2d, row_scale, activation, needs_grad
    )
    return y.view(x.shape)


def _check_arguments(x, w_down, b_down, w_up, b_up, scale, activation, residual, row_scale):
    """Raise a TypeError/ValueError naming the argument; return (scale tensor or None, scale value)."""
    _check_float_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape [..., D] with D >= 1, got {tuple(x.shape)}")
    dim = x.shape[-1]
    rows = x.numel() // dim
    _check_float_tensor("w_down", w_down)
    if w_down.dim() != 2 or w_down.shape[1] != dim:
        raise ValueError(f"w_down must have shape [rank, D] = [rank, {dim}], got {tuple(w_down.shape)}")
    rank = w_down.shape[0]
    if rank == 0:
        raise ValueError("w_down has rank 0 (shape [0, D]); the bottleneck needs rank >= 1")
    if rank > MAX_RANK and uses_triton(x):
        raise ValueError(f"w_down has rank {rank}; the fused kernels support rank 1 to {MAX_RANK}")
    _check_float_tensor("w_up", w_up)
    if tuple(w_up.shape) != (dim, rank):
        raise ValueError(f"w_up must have shape [D, rank] = [{dim}, {rank}], got {tuple(w_up.shape)}")
    if b_down is not None:
        _check_float_tensor("b_down", b_down)
        if tuple(b_down.shape) != (rank,):
            raise ValueError(f"b_down must have shape [rank] = [{rank}], got {tuple(b_down.shape)}")
    if b_up is not None:
        _check_float_tensor("b_up", b_up)
        if tuple(b_up.shape) != (dim,):
            raise ValueError(f"b_up must have shape [D] = [{dim}], got {tuple(b_up.shape)}")
    if not isinstance(activation, str) or activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(reference.ACTIVATIONS)}, got {activation!r}")
    if residual is not None:
        _check_float_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    if row_scale is not None:
        _check_float_tensor("row_scale", row_scale)
        if row_scale.dim() != 1 or row_scale.shape[0] != rows:
            raise ValueError(
                f"row_scale must have shape [M] = [{rows}] (one value per row of x), got {tuple(row_scale.shape)}"
            )
    scale_tensor, scale_value = None, 1.0
    if isinstance(scale, torch.Tensor):
        _check_float_tensor("scale", scale)
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
    for name, tensor in (("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up),
                         ("scale", scale_tensor), ("residual", residual), ("row_scale", row_scale)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}; put all tensors on one device")
    return scale_tensor, scale_value


def _check_float_tensor(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16 or float32), got {tensor.dtype}")
