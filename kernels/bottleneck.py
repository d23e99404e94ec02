"""Fused bottleneck adapter: y = residual + scale * (row_scale * (act(x W_d^T + b_d) W_u^T + b_u)).

Forward: one Triton launch. Each program owns a tile of rows, accumulates the pre-activation
h = x W_d^T + b_d over D in fp32 registers, then walks D again for u = act(h) W_u^T with the
epilogue (bias, row_scale, scale, residual, cast) fused. No M x D intermediate is written; the
M x r pre-activation is stored (in the compute dtype) only when a backward will need it.

Dtypes: the dots run in the compute dtype (autocast's under torch.autocast, as F.linear would,
else x's), with fp32 accumulation. x, the residual and the parameters are read in their own
dtypes and cast in registers, so autocast costs no M x D cast copy; y is stored in the dtype
eager PyTorch would give (reference.output_dtype).

Residual: a tensor, or a sum of tensors of which one may be x itself. x as a residual term is
read from the tile the program already walks, and its gradient (dy) is added in the store that
writes dx, so autograd runs no M x D add for the skip connection.

Backward: two Triton launches, no float atomics.
  1. _backward_hidden_kernel, one program per row tile: dh = ((dy * row_scale * scale) W_u)
     * act'(h), a full reduction over D per row, so it has to finish before anything needs dh.
     At ranks above 32 it also writes act(h) [M, r], so the next kernel runs no
     transcendentals; at smaller ranks the next kernel recomputes act from h.
  2. _backward_input_and_weights_kernel, a grid of (row chunk, D tile, rank block): dx = dh W_d
     (+ dy when x is a residual term) for its tile, and fp32 partial sums of every parameter
     gradient over its row chunk, kept in registers and written once. torch sums the partials
     over chunks afterwards (none to sum when there is one chunk), so the result does not
     depend on scheduling: the same inputs give bitwise the same gradients. Ranks above 64
     (32 for fp32) are split over the third grid axis.

Launch plans: block rows and reduction chunks are chosen from M and the GPU's SM count (see
plan_block_rows and plan_chunks), so the grids fill the GPU while the partials stay a small
fraction of the bytes the backward must move anyway.

Saved for backward: x by reference, the parameters, and the pre-activation [M, r].

The functional entry point is `bottleneck_adapter`; it validates arguments and calls the
torch.library custom op `fused_adapters::bottleneck_forward`, whose autograd calls
`fused_adapters::bottleneck_backward`. torch.compile sees one node for each.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from . import reference
from .activations import activation as _activation
from .epilogue import epilogue, epilogue_scalars
from .activations import activation_grad as _activation_grad
from .checks import MAX_RANK, check_bottleneck_arguments, check_float_tensor, epilogue_arguments
from .launch import (
    TRITON_DTYPES, BlockConfig, Launch, device_context, dtype_group, input_precision, int32_columns, new_output,
    kernel_path, optional, packed_grad_dtype, padded_rank, plan_chunks, scale_mode, sm_count, takes_triton,
    variant_config, warn_reference,
)
from .variants import Variant, pick, register_variants, time_cuda

__all__ = [
    "backend",
    "bottleneck_adapter",
    "BlockConfig",
    "FORWARD_CONFIGS",
    "BACKWARD_HIDDEN_CONFIGS",
    "BACKWARD_WEIGHTS_CONFIGS",
    "BACKWARD_WEIGHTS_WIDE_CONFIGS",
    "BACKWARD_HIDDEN_COLUMN_MAJOR_CONFIGS",
    "BACKWARD_WEIGHTS_COLUMN_MAJOR_CONFIGS",
    "MAX_RANK",
    "padded_rank",
    "uses_triton",
    "VARIANTS",
]



# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _bottleneck_forward_kernel(
    x_ptr, w_down_ptr, b_down_ptr, w_up_ptr, b_up_ptr, scale_ptr, residual_ptr, row_scale_ptr,
    y_ptr, hidden_ptr,
    rows, dim, dim_out, rank, scale_value,
    stride_x_row, stride_x_col, stride_res_row, stride_res_col, stride_y_row, stride_y_col,
    ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_B_DOWN: tl.constexpr,
    HAS_B_UP: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ADD_INPUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    STORE_HIDDEN: tl.constexpr, SAME_WIDTH: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_RANK: tl.constexpr,
):
    # This program's tile: rows [pid * BLOCK_ROWS, +BLOCK_ROWS), every column, every rank.
    # SAME_WIDTH (D_out = D, the adapter): the kernel compiled with one width, as before
    # width-changing bottlenecks existed, so their extra argument costs the adapter nothing.
    if SAME_WIDTH:
        dim_out = dim
    pid = tl.program_id(0)
    row_ids = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_ids = row_ids.to(tl.int64)  # M * D may pass 2^31
    rank_ids = tl.arange(0, BLOCK_RANK)
    rank_mask = rank_ids < rank
    dtype = COMPUTE_DTYPE

    # h[BLOCK_ROWS, BLOCK_RANK] = x[rows, :] @ w_down.T; padded ranks load zero weights.
    hidden = tl.zeros((BLOCK_ROWS, BLOCK_RANK), dtype=tl.float32)
    for col_start in range(0, dim, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim
        x_tile = tl.load(
            x_ptr + row_ids[:, None] * stride_x_row + col_ids[None, :] * stride_x_col,
            mask=row_mask[:, None] & col_mask[None, :], other=0.0,
        ).to(dtype)
        w_down_t = tl.load(
            w_down_ptr + rank_ids[None, :] * dim + col_ids[:, None],
            mask=col_mask[:, None] & rank_mask[None, :], other=0.0,
        ).to(dtype)
        hidden = tl.dot(x_tile, w_down_t, hidden, input_precision=INPUT_PRECISION)
    if HAS_B_DOWN:
        hidden += tl.load(b_down_ptr + rank_ids, mask=rank_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    # Rounded to the compute dtype, as F.linear's output is; the backward recomputes act from
    # this stored value, so forward and backward see the same pre-activation.
    hidden = hidden.to(dtype)
    if STORE_HIDDEN:
        tl.store(
            hidden_ptr + row_ids[:, None] * rank + rank_ids[None, :], hidden,
            mask=row_mask[:, None] & rank_mask[None, :],
        )
    # act(0) == 0 for every activation, so padded ranks stay zero.
    act = _activation(hidden.to(tl.float32), ACTIVATION).to(dtype)

    row_scale, scalar_scale = epilogue_scalars(row_scale_ptr, scale_ptr, row_ids, row_mask, scale_value, dtype,
                                               SCALE_MODE, HAS_ROW_SCALE, BLOCK_ROWS)

    # y[rows, cols] = residual + scale * (row_scale * (act @ w_up[cols].T + b_up[cols])), per
    # D_out tile (D_out = D but for width-changing bottlenecks such as LoRA on qkv or fc1).
    for col_start in range(0, dim_out, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim_out
        tile_mask = row_mask[:, None] & col_mask[None, :]
        w_up_t = tl.load(
            w_up_ptr + col_ids[None, :] * rank + rank_ids[:, None],
            mask=rank_mask[:, None] & col_mask[None, :], other=0.0,
        ).to(dtype)
        update = tl.dot(act, w_up_t, input_precision=INPUT_PRECISION)
        if HAS_B_UP:
            update += tl.load(b_up_ptr + col_ids, mask=col_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
        update = epilogue(update, x_ptr, residual_ptr, scale_ptr, row_ids, col_ids, col_mask, tile_mask, row_scale,
                          scalar_scale, stride_x_row, stride_x_col, stride_res_row, stride_res_col,
                          SCALE_MODE, HAS_ROW_SCALE, ADD_INPUT, HAS_RESIDUAL)
        tl.store(y_ptr + row_ids[:, None] * stride_y_row + col_ids[None, :] * stride_y_col,
                 update.to(y_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _backward_hidden_kernel(
    grad_y_ptr, hidden_ptr, w_up_ptr, scale_ptr, row_scale_ptr, grad_hidden_ptr, act_ptr,
    rows, dim, rank, scale_value,
    stride_g_row, stride_g_col,
    ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, STORE_ACT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_RANK: tl.constexpr,
):
    # This program's tile: dh[rows, :] and act(h)[rows, :] for rows [pid * BLOCK_ROWS, +BLOCK_ROWS).
    pid = tl.program_id(0)
    row_ids = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_ids = row_ids.to(tl.int64)
    rank_ids = tl.arange(0, BLOCK_RANK)
    rank_mask = rank_ids < rank
    dtype = COMPUTE_DTYPE

    if HAS_ROW_SCALE:
        row_scale = tl.load(row_scale_ptr + row_ids, mask=row_mask, other=0.0).to(dtype).to(tl.float32)
    if SCALE_MODE == "tensor":
        scalar_scale = tl.load(scale_ptr).to(tl.float32)

    # d act = (dy * row_scale * scale) @ w_up, reduced over D. The scales multiply dy in fp32
    # before it is rounded to the compute dtype, as eager autocast does (dy * scale, then the
    # cast): a large fp32 dy (loss scaling) times a small scale stays finite.
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
        ).to(dtype)
        grad_act = tl.dot(grad_update.to(dtype), w_up_tile, grad_act, input_precision=INPUT_PRECISION)

    hidden_mask = row_mask[:, None] & rank_mask[None, :]
    hidden = tl.load(hidden_ptr + row_ids[:, None] * rank + rank_ids[None, :], mask=hidden_mask,
                     other=0.0).to(tl.float32)
    grad_hidden = grad_act * _activation_grad(hidden, ACTIVATION)
    tl.store(grad_hidden_ptr + row_ids[:, None] * rank + rank_ids[None, :], grad_hidden.to(dtype), mask=hidden_mask)
    if STORE_ACT:
        # act(h) for the weight gradients at ranks above 32, so the next kernel runs no
        # transcendentals: there Triton hoisted gelu into the dot-operand layout, replicated
        # across warps (compile check, rank 64, bf16, sm_80: 3432 bytes of spills before, 0 after).
        tl.store(act_ptr + row_ids[:, None] * rank + rank_ids[None, :], _activation(hidden, ACTIVATION).to(dtype),
                 mask=hidden_mask)


@triton.jit
def _backward_input_and_weights_kernel(
    grad_y_ptr, x_ptr, act_ptr, grad_hidden_ptr, w_down_ptr, w_up_ptr, b_up_ptr, scale_ptr,
    row_scale_ptr, grad_x_ptr, partials_ptr,
    rows, dim, dim_out, rank, scale_value, tiles_per_chunk,
    stride_g_row, stride_g_col, stride_x_row, stride_x_col, stride_dx_row, stride_dx_col,
    ACTIVATION: tl.constexpr, RECOMPUTE_ACT: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_B_UP: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr, COMPUTE_DX: tl.constexpr, ADD_GRAD_Y: tl.constexpr, SPLIT_RANK: tl.constexpr,
    SAME_WIDTH: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_RANK: tl.constexpr,
):
    # This program's tile: columns [pid_col * BLOCK_DIM, +BLOCK_DIM) and ranks
    # [pid_rank * BLOCK_RANK, +BLOCK_RANK) of the parameter gradients, summed over the row tiles
    # [pid_chunk * tiles_per_chunk, +tiles_per_chunk); and, in the pid_rank == 0 programs, the
    # same columns of dx for those rows. The columns are x's (D: w_down, dx) and y's (D_out:
    # w_up, b_up, scale); the grid covers the wider of the two, and each side masks the other's
    # extra columns (D_out = D but for width-changing bottlenecks; SAME_WIDTH compiles that case
    # with one width and one mask).
    pid_chunk = tl.program_id(0)
    pid_col = tl.program_id(1)
    pid_rank = tl.program_id(2)
    col_ids = pid_col * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    col_mask = col_ids < dim
    if SAME_WIDTH:
        dim_out = dim
        out_mask = col_mask
    else:
        out_mask = col_ids < dim_out
    rank_ids = pid_rank * BLOCK_RANK + tl.arange(0, BLOCK_RANK)
    rank_mask = rank_ids < rank
    dtype = COMPUTE_DTYPE

    if COMPUTE_DX and not SPLIT_RANK:
        w_down_tile = tl.load(
            w_down_ptr + rank_ids[:, None] * dim + col_ids[None, :],
            mask=rank_mask[:, None] & col_mask[None, :], other=0.0,
        ).to(dtype)

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
            mask=row_mask[:, None] & out_mask[None, :], other=0.0,
        ).to(tl.float32)
        grad_update = grad_y
        if HAS_ROW_SCALE:
            row_scale = tl.load(row_scale_ptr + row_ids, mask=row_mask, other=0.0).to(dtype).to(tl.float32)
            grad_update = grad_update * row_scale[:, None]
        act = tl.load(act_ptr + row_ids[:, None] * rank + rank_ids[None, :], mask=hidden_mask, other=0.0)
        if RECOMPUTE_ACT:  # act_ptr holds the pre-activation: one M x r pass instead of two
            act = _activation(act.to(tl.float32), ACTIVATION).to(dtype)
        # Rounded before the channel scale, which the epilogue applies: dscale needs the unscaled
        # sum, and a second [D, r] accumulator would not fit. So under fp16 autocast a fp32 dy past
        # 65504 overflows dw_up/db_up/dscale where eager's dy * scale (scale < 1) would not.
        acc_ga = tl.dot(tl.trans(grad_update.to(dtype)), act, acc_ga, input_precision=INPUT_PRECISION)
        acc_gs += tl.sum(grad_update, axis=0)

        grad_hidden = tl.load(
            grad_hidden_ptr + row_ids[:, None] * rank + rank_ids[None, :], mask=hidden_mask, other=0.0
        )
        acc_b_down += tl.sum(grad_hidden.to(tl.float32), axis=0)
        x_tile = tl.load(
            x_ptr + row_ids[:, None] * stride_x_row + col_ids[None, :] * stride_x_col, mask=tile_mask, other=0.0
        ).to(dtype)
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
                        )
                        step_w_down = tl.load(
                            w_down_ptr + step_ids[:, None] * dim + col_ids[None, :],
                            mask=step_mask[:, None] & col_mask[None, :], other=0.0,
                        ).to(dtype)
                        grad_x = tl.dot(step_grad_hidden, step_w_down, grad_x, input_precision=INPUT_PRECISION)
                    if ADD_GRAD_Y:  # x is a residual term: its gradient dy joins dx in this store
                        grad_x += grad_y
                    tl.store(grad_x_ptr + row_ids[:, None] * stride_dx_row + col_ids[None, :] * stride_dx_col,
                             grad_x.to(grad_x_ptr.dtype.element_ty), mask=tile_mask)
            else:
                grad_x = tl.dot(grad_hidden, w_down_tile, input_precision=INPUT_PRECISION)
                if ADD_GRAD_Y:
                    grad_x += grad_y
                tl.store(grad_x_ptr + row_ids[:, None] * stride_dx_row + col_ids[None, :] * stride_dx_col,
                         grad_x.to(grad_x_ptr.dtype.element_ty), mask=tile_mask)

    # Epilogue: turn (ga, gs) into the up-side gradients of this chunk and rank block.
    if SCALE_MODE == "channel":
        col_scale = tl.load(scale_ptr + col_ids, mask=out_mask, other=0.0).to(tl.float32)
    elif SCALE_MODE == "tensor":
        col_scale = tl.full((BLOCK_DIM,), 1.0, tl.float32) * tl.load(scale_ptr).to(tl.float32)
    else:
        col_scale = tl.full((BLOCK_DIM,), 1.0, tl.float32) * scale_value
    up_mask = out_mask[:, None] & rank_mask[None, :]
    w_up_tile = tl.load(w_up_ptr + col_ids[:, None] * rank + rank_ids[None, :], mask=up_mask, other=0.0)
    grad_scale = tl.sum(w_up_tile.to(dtype).to(tl.float32) * acc_ga, axis=1)
    if HAS_B_UP:
        b_up_term = tl.load(b_up_ptr + col_ids, mask=out_mask, other=0.0).to(dtype).to(tl.float32) * acc_gs
        grad_scale += tl.where(pid_rank == 0, b_up_term, 0.0)

    # Partials of chunk c, in the layout of partials_size (in the parameters' dtype when there is
    # one chunk: then they are the gradients, and no cast pass follows): [dw_up (D_out x r) |
    # dw_down (r x D) | db_up (D_out) | db_down (r) | dscale per rank block (blocks x D_out)].
    rank_blocks = tl.num_programs(2)
    out_dtype = partials_ptr.dtype.element_ty
    params = (dim_out + dim) * rank
    partial = partials_ptr + pid_chunk.to(tl.int64) * (params + (1 + rank_blocks) * dim_out + rank)
    tl.store(partial + col_ids[:, None] * rank + rank_ids[None, :], (acc_ga * col_scale[:, None]).to(out_dtype),
             mask=up_mask)
    tl.store(
        partial + dim_out * rank + rank_ids[:, None] * dim + col_ids[None, :], acc_w_down.to(out_dtype),
        mask=rank_mask[:, None] & col_mask[None, :],
    )
    tl.store(partial + params + col_ids, (acc_gs * col_scale).to(out_dtype), mask=out_mask & (pid_rank == 0))
    tl.store(partial + params + dim_out + rank_ids, acc_b_down.to(out_dtype), mask=rank_mask & (pid_col == 0))
    tl.store(partial + params + dim_out + rank + pid_rank * dim_out + col_ids, grad_scale.to(out_dtype),
             mask=out_mask)


# --------------------------------------------------------------------------------------------
# Block configurations: a small named set per padded rank, so the compile check covers them all.
# --------------------------------------------------------------------------------------------


# Keyed by (padded rank, dtype group of the compute dtype). Every entry, and every smaller
# block-rows variant plan_block_rows may derive from it, was compiled for sm_80 and sm_90 with
# compile_check: the chosen tiles are the largest tried that have no spills in either
# specialization (aligned and unaligned); see kernels/compile_check.py for the table.
FORWARD_CONFIGS = {
    (16, "half"): BlockConfig("fwd_r16_half", 64, 64, 8, 2, wide_dim=128),
    (32, "half"): BlockConfig("fwd_r32_half", 64, 64, 8, 2, wide_dim=128),
    (64, "half"): BlockConfig("fwd_r64_half", 64, 64, 8, 2, wide_dim=128),
    (128, "half"): BlockConfig("fwd_r128_half", 64, 64, 8, 2),
    (256, "half"): BlockConfig("fwd_r256_half", 32, 32, 8, 2),
    (16, "fp32"): BlockConfig("fwd_r16_fp32", 32, 64, 8, 2),
    (32, "fp32"): BlockConfig("fwd_r32_fp32", 32, 64, 8, 2),
    (64, "fp32"): BlockConfig("fwd_r64_fp32", 32, 64, 8, 2),
    (128, "fp32"): BlockConfig("fwd_r128_fp32", 16, 64, 8, 2),
    (256, "fp32"): BlockConfig("fwd_r256_fp32", 16, 16, 4, 2),
}
BACKWARD_HIDDEN_CONFIGS = {
    (16, "half"): BlockConfig("bwd_hidden_r16_half", 64, 64, 8, 2, wide_dim=128),
    (32, "half"): BlockConfig("bwd_hidden_r32_half", 64, 64, 8, 2, wide_dim=128),
    (64, "half"): BlockConfig("bwd_hidden_r64_half", 64, 64, 8, 2, wide_dim=128),
    (128, "half"): BlockConfig("bwd_hidden_r128_half", 32, 64, 8, 2),
    (256, "half"): BlockConfig("bwd_hidden_r256_half", 16, 32, 8, 2),
    (16, "fp32"): BlockConfig("bwd_hidden_r16_fp32", 64, 64, 8, 2),
    (32, "fp32"): BlockConfig("bwd_hidden_r32_fp32", 64, 64, 8, 2),
    (64, "fp32"): BlockConfig("bwd_hidden_r64_fp32", 32, 64, 8, 2),
    (128, "fp32"): BlockConfig("bwd_hidden_r128_fp32", 32, 32, 8, 2),
    (256, "fp32"): BlockConfig("bwd_hidden_r256_fp32", 16, 32, 8, 2),
}
BACKWARD_WEIGHTS_CONFIGS = {
    # 16 columns per program at rank <= 16: 48 column tiles at D = 768, so 6 row chunks fill 132
    # SMs twice; with 32 columns it takes 11, and their partials cost 11% of a pass over x at
    # M = 6304, rank 8 (counted: backward 1.39x the floor with 16 columns).
    (16, "half"): BlockConfig("bwd_weights_r16_half", 32, 16, 4, 2),
    (32, "half"): BlockConfig("bwd_weights_r32_half", 32, 32, 4, 2),
    # Two rank blocks at rank 64: twice the programs per row chunk, so half the chunks (and
    # partials, 400 KB each at D = 768) fill the GPU.
    (64, "half"): BlockConfig("bwd_weights_r64_half", 16, 32, 8, 2, rank_tile=32),
    (128, "half"): BlockConfig("bwd_weights_r128_half", 16, 32, 8, 2, rank_tile=64),
    (256, "half"): BlockConfig("bwd_weights_r256_half", 16, 32, 8, 2, rank_tile=64),
    (16, "fp32"): BlockConfig("bwd_weights_r16_fp32", 16, 32, 4, 2),
    (32, "fp32"): BlockConfig("bwd_weights_r32_fp32", 16, 32, 4, 2),
    (64, "fp32"): BlockConfig("bwd_weights_r64_fp32", 16, 32, 4, 2, rank_tile=32),
    (128, "fp32"): BlockConfig("bwd_weights_r128_fp32", 16, 32, 4, 2, rank_tile=32),
    (256, "fp32"): BlockConfig("bwd_weights_r256_fp32", 16, 32, 4, 2, rank_tile=32),
}
# The weights launch of a width-changing bottleneck (D_out != D) carries a second column mask and
# width; these tiles compile without spills there (compile check, "backward_weights_wide").
BACKWARD_WEIGHTS_WIDE_CONFIGS = {
    (16, "half"): BlockConfig("bwd_weights_wide_r16_half", 32, 16, 4, 1),
    (32, "half"): BlockConfig("bwd_weights_wide_r32_half", 32, 16, 4, 2),
    (64, "half"): BlockConfig("bwd_weights_wide_r64_half", 16, 32, 4, 2, rank_tile=32),
    (128, "half"): BlockConfig("bwd_weights_wide_r128_half", 16, 32, 8, 2, rank_tile=64),
    (256, "half"): BlockConfig("bwd_weights_wide_r256_half", 16, 32, 8, 2, rank_tile=64),
    (16, "fp32"): BlockConfig("bwd_weights_wide_r16_fp32", 16, 32, 4, 2),
    (32, "fp32"): BlockConfig("bwd_weights_wide_r32_fp32", 16, 32, 4, 2),
    (64, "fp32"): BlockConfig("bwd_weights_wide_r64_fp32", 16, 16, 4, 2, rank_tile=32),
    (128, "fp32"): BlockConfig("bwd_weights_wide_r128_fp32", 16, 16, 4, 2, rank_tile=32),
    (256, "fp32"): BlockConfig("bwd_weights_wide_r256_fp32", 16, 16, 4, 2, rank_tile=32),
}


# Column-major x and dy (a bottleneck over the token axis of a token-major tensor, LoSA's token
# mixers): the tiles are contiguous along their rows, and these entries of the tables above
# spill there (compile check, backward_weights_column_major: bwd_weights_r32_half under
# autocast_bf16 on sm_80, 32 bytes; bwd_weights_r32_fp32 on sm_90, 8; backward_hidden_column_major:
# bwd_hidden_r64_fp32 on sm_80, unaligned, 8). These smaller tiles do not.
BACKWARD_WEIGHTS_COLUMN_MAJOR_CONFIGS = {
    **BACKWARD_WEIGHTS_CONFIGS,
    (16, "half"): BlockConfig("bwd_weights_r16_half_colmajor", 16, 32, 4, 2),
    (32, "half"): BlockConfig("bwd_weights_r32_half_colmajor", 16, 32, 4, 2),
    (32, "fp32"): BlockConfig("bwd_weights_r32_fp32_colmajor", 16, 16, 4, 2),
    (64, "fp32"): BlockConfig("bwd_weights_r64_fp32_colmajor", 16, 16, 4, 2, rank_tile=32),
    (128, "fp32"): BlockConfig("bwd_weights_r128_fp32_colmajor", 16, 16, 4, 2, rank_tile=32),
    (256, "fp32"): BlockConfig("bwd_weights_r256_fp32_colmajor", 16, 16, 4, 2, rank_tile=32),
}
BACKWARD_HIDDEN_COLUMN_MAJOR_CONFIGS = {
    **BACKWARD_HIDDEN_CONFIGS,
    (64, "fp32"): BlockConfig("bwd_hidden_r64_fp32_colmajor", 32, 32, 8, 2),
}


def block_config(table: dict, rank: int, dtype: torch.dtype) -> BlockConfig:
    return table[(padded_rank(rank), dtype_group(dtype))]


# --------------------------------------------------------------------------------------------
# Variants: named plans the caller may force (kernels.use_variant) and the benchmark compares.
# Each picks among the configurations and flags above, all of which the compile check covers.
# --------------------------------------------------------------------------------------------

VARIANTS = (
    Variant("default", "block rows planned from M and the SM count (the most rows that still give every SM "
                       "two programs); at ranks up to 32 the backward recomputes act(h) from h"),
    Variant("rows16", "16 rows per program in the row-tile launches: the most programs, smallest tiles",
            block_rows=16),
    Variant("rows32", "32 rows per program in the row-tile launches (the configuration's own where fewer)",
            block_rows=32),
    Variant("rows64", "64 rows per program in the row-tile launches (the configuration's own where fewer): "
                      "the fewest programs, largest tiles", block_rows=64),
    Variant("store_act", "planned block rows; at ranks up to 32 the backward's first launch also writes "
                         "act(h) [M, r] for the second to read, instead of recomputing it", store_act=True),
)
register_variants("bottleneck_adapter", VARIANTS)
DEFAULT_VARIANT = VARIANTS[0]


def row_config(table: dict, rank: int, dtype: torch.dtype, rows: int, sms: int, variant: Variant) -> BlockConfig:
    """A row-tile kernel's configuration: planned from M and the SM count, or the variant's rows."""
    return variant_config(block_config(table, rank, dtype), rows, sms, variant.block_rows)


# --------------------------------------------------------------------------------------------
# Launch plans: grids from M and the SM count
# --------------------------------------------------------------------------------------------

def partials_size(dim: int, rank: int, rank_blocks: int, dim_out: Optional[int] = None) -> int:
    """One chunk's partials: [dw_up (D_out x r) | dw_down (r x D) | db_up (D_out) | db_down (r) |
    dscale per rank block (blocks x D_out)]; D_out = D unless given."""
    dim_out = dim if dim_out is None else dim_out
    return (dim_out + dim) * rank + (1 + rank_blocks) * dim_out + rank


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def backend(tensor: torch.Tensor) -> str:
    """Which path the fused ops take, here and now, for `tensor` as their x argument
    (bottleneck_adapter, sparse_adapter, routed_adapter) at the ambient torch.autocast state:

    - "triton": the compiled Triton kernels (CUDA tensors in fp16, bf16 or fp32);
    - "interpreter": the same kernels in Triton's interpreter (TRITON_INTERPRET=1 was set before
      triton was imported; CPU or CUDA tensors in fp16 or fp32: the interpreter has no bf16);
    - "reference": the plain-PyTorch reference in kernels.reference (a CPU tensor without the
      interpreter; float64 anywhere; bf16, or a bf16 autocast, under the interpreter).

    The ops choose their path with the same rule (launch.reference_reason), given x's device, x's
    dtype and the compute dtype (autocast's, else x's); the call's other tensors count too, so a
    float64 parameter or residual (or, under the interpreter, a bf16 one) sends a call to the
    reference whatever this says, as does a sparse mixture's rank above 256 (see
    sparse.uses_kernels). A CUDA call that falls back to the reference warns once.
    Raises TypeError unless `tensor` is a floating-point torch.Tensor.
    """
    check_float_tensor("tensor", tensor)
    return kernel_path(tensor.device.type, (tensor.dtype, reference.compute_dtype(tensor)))


def uses_triton(x: torch.Tensor) -> bool:
    """Whether x takes the Triton kernels here (CUDA, or the interpreter under TRITON_INTERPRET=1),
    at the ambient autocast state, or the plain-PyTorch reference: backend(x) != "reference"."""
    return backend(x) != "reference"



def forward_launch(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, add_input, row_scale, activation,
                   compute_dtype, y, hidden, variant: Variant = DEFAULT_VARIANT):
    """The forward launch for 2-D x [M, D] writing y [M, D_out] (D_out = w_up.shape[0]) and, if
    hidden has M rows, hidden [M, r]."""
    rows, dim = x.shape
    rank, dim_out = w_down.shape[0], w_up.shape[0]
    config = row_config(FORWARD_CONFIGS, rank, compute_dtype, rows, sm_count(x.device), variant)
    store_hidden = hidden.shape[0] == rows
    args = dict(
        x_ptr=x, w_down_ptr=w_down.contiguous(), b_down_ptr=optional(b_down, x), w_up_ptr=w_up.contiguous(),
        b_up_ptr=optional(b_up, x), scale_ptr=optional(scale, x), residual_ptr=x if residual is None else residual,
        row_scale_ptr=optional(row_scale, x), y_ptr=y, hidden_ptr=hidden if store_hidden else y,
        rows=rows, dim=dim, dim_out=dim_out, rank=rank, scale_value=scale_value,
        stride_x_row=x.stride(0), stride_x_col=x.stride(1),
        stride_res_row=residual.stride(0) if residual is not None else 0,
        stride_res_col=residual.stride(1) if residual is not None else 0,
        stride_y_row=y.stride(0), stride_y_col=y.stride(1),
    )
    constexprs = dict(
        ACTIVATION=activation, SCALE_MODE=scale_mode(scale), HAS_B_DOWN=b_down is not None,
        HAS_B_UP=b_up is not None, HAS_RESIDUAL=residual is not None, ADD_INPUT=add_input,
        HAS_ROW_SCALE=row_scale is not None, STORE_HIDDEN=store_hidden, SAME_WIDTH=dim_out == dim,
        COMPUTE_DTYPE=TRITON_DTYPES[compute_dtype], INPUT_PRECISION=input_precision(compute_dtype),
        BLOCK_ROWS=config.block_rows, BLOCK_DIM=config.block_dim, BLOCK_RANK=padded_rank(rank),
    )
    grid = (triton.cdiv(rows, config.block_rows),)
    return Launch(_bottleneck_forward_kernel, grid, args, constexprs, config)


def backward_launches(grad_y, x, hidden, w_down, w_up, b_up, scale, scale_value, row_scale, activation,
                      compute_dtype, add_grad_y, grad_hidden, act, grad_x, grad_dtype=torch.float32,
                      variant: Variant = DEFAULT_VARIANT):
    """The two backward launches, and the fp32 partials buffer [chunks, partials size] they fill.

    grad_hidden and act [M, r] ([0, r] at ranks up to 32, where act is recomputed), in the compute
    dtype, are scratch the first launch fills for the second (act has M rows with the store_act
    variant too). grad_x has M rows when dx is wanted, else 0; with add_grad_y it gets dy added
    (x was a residual term). grad_dtype: the parameter gradients' dtype (see _grad_dtype).
    """
    rows, dim = x.shape
    rank, dim_out = w_down.shape[0], w_up.shape[0]
    block_rank = padded_rank(rank)
    sms = sm_count(x.device)
    column_major = column_major_output(x, dim)  # dx laid out like x: see the _COLUMN_MAJOR tables
    hidden_table = BACKWARD_HIDDEN_COLUMN_MAJOR_CONFIGS if column_major else BACKWARD_HIDDEN_CONFIGS
    hidden_config = row_config(hidden_table, rank, compute_dtype, rows, sms, variant)
    if dim_out != dim:
        weights_table = BACKWARD_WEIGHTS_WIDE_CONFIGS
    else:
        weights_table = BACKWARD_WEIGHTS_COLUMN_MAJOR_CONFIGS if column_major else BACKWARD_WEIGHTS_CONFIGS
    weights_config = block_config(weights_table, rank, compute_dtype)
    rank_tile = weights_config.rank_tile or block_rank
    mode = scale_mode(scale)
    precision = input_precision(compute_dtype)
    triton_dtype = TRITON_DTYPES[compute_dtype]
    scale_c = optional(scale, x)
    row_scale_c = optional(row_scale, x)
    w_down, w_up = w_down.contiguous(), w_up.contiguous()
    compute_dx = grad_x.shape[0] == rows
    # At ranks up to 32 the weights kernel recomputes act from the saved pre-activation (no
    # spills there): the first launch then writes no act, which saves one M x r pass each way
    # (rank 16, M = 768, D = 768: backward 1.407x -> 1.400x the floor).
    recompute_act = block_rank <= 32 and not variant.store_act

    row_tiles = triton.cdiv(rows, weights_config.block_rows)
    col_tiles = triton.cdiv(max(dim, dim_out), weights_config.block_dim)
    rank_blocks = triton.cdiv(rank, rank_tile)
    chunk_elements = partials_size(dim, rank, rank_blocks, dim_out)
    chunks = plan_chunks(rows, min(dim, dim_out), row_tiles, col_tiles * rank_blocks, sms, x.element_size(),
                         chunk_elements)
    tiles_per_chunk = triton.cdiv(row_tiles, chunks)
    chunks = triton.cdiv(row_tiles, tiles_per_chunk)
    # One chunk writes the gradients themselves, in their dtype; several write fp32 partials.
    partials_dtype = grad_dtype if chunks == 1 else torch.float32
    partials = new_output((chunks, chunk_elements), partials_dtype, x.device)

    hidden_launch = Launch(
        _backward_hidden_kernel,
        (triton.cdiv(rows, hidden_config.block_rows),),
        dict(
            grad_y_ptr=grad_y, hidden_ptr=hidden, w_up_ptr=w_up, scale_ptr=scale_c, row_scale_ptr=row_scale_c,
            grad_hidden_ptr=grad_hidden, act_ptr=grad_hidden if recompute_act else act,
            rows=rows, dim=dim_out, rank=rank, scale_value=scale_value,  # its D loop walks dy's columns
            stride_g_row=grad_y.stride(0), stride_g_col=grad_y.stride(1),
        ),
        dict(
            ACTIVATION=activation, SCALE_MODE=mode, HAS_ROW_SCALE=row_scale is not None,
            STORE_ACT=not recompute_act, COMPUTE_DTYPE=triton_dtype, INPUT_PRECISION=precision,
            BLOCK_ROWS=hidden_config.block_rows, BLOCK_DIM=hidden_config.block_dim, BLOCK_RANK=block_rank,
        ),
        hidden_config,
    )
    weights_launch = Launch(
        _backward_input_and_weights_kernel,
        (chunks, col_tiles, rank_blocks),
        dict(
            grad_y_ptr=grad_y, x_ptr=x, act_ptr=hidden if recompute_act else act, grad_hidden_ptr=grad_hidden,
            w_down_ptr=w_down,
            w_up_ptr=w_up, b_up_ptr=optional(b_up, x), scale_ptr=scale_c, row_scale_ptr=row_scale_c,
            grad_x_ptr=grad_x if compute_dx else grad_hidden, partials_ptr=partials,
            rows=rows, dim=dim, dim_out=dim_out, rank=rank, scale_value=scale_value, tiles_per_chunk=tiles_per_chunk,
            stride_g_row=grad_y.stride(0), stride_g_col=grad_y.stride(1),
            stride_x_row=x.stride(0), stride_x_col=x.stride(1),
            stride_dx_row=grad_x.stride(0) if compute_dx else dim, stride_dx_col=grad_x.stride(1) if compute_dx else 1,
        ),
        dict(
            ACTIVATION=activation, RECOMPUTE_ACT=recompute_act,
            SCALE_MODE=mode, HAS_B_UP=b_up is not None, HAS_ROW_SCALE=row_scale is not None,
            COMPUTE_DX=compute_dx, ADD_GRAD_Y=compute_dx and add_grad_y, SPLIT_RANK=rank_tile < block_rank,
            SAME_WIDTH=dim_out == dim, COMPUTE_DTYPE=triton_dtype, INPUT_PRECISION=precision,
            BLOCK_ROWS=weights_config.block_rows, BLOCK_DIM=weights_config.block_dim, BLOCK_RANK=rank_tile,
        ),
        weights_config,
    )
    return hidden_launch, weights_launch, partials


def column_major_output(x: torch.Tensor, dim_out: int) -> bool:
    """Whether y [M, D_out] (and dx [M, D]) is laid out column-major: when x [M, D] is and
    D_out = D, as torch's elementwise ops lay out their outputs like a dense input
    (torch.empty_like). A tensor whose token axis is last in memory, viewed as [(B, D), N] for a
    bottleneck over tokens, is such an x: its y (and, backward, its dx) then comes back in the
    same layout, so the next op reads it without a copy. Not where the column offsets would pass
    2^31 (the kernels keep them int32; int32_columns copies such an x to row-major)."""
    rows, dim = x.shape
    # The stride test first: with a data-dependent M (torch.compile) it decides without M.
    return (dim_out == dim and dim > 1 and x.stride(0) == 1 and x.stride(1) == rows and rows > 1
            and rows * (dim - 1) < 2**31)


def _new_y(x: torch.Tensor, dim_out: int, dtype: torch.dtype, rows: Optional[int] = None) -> torch.Tensor:
    """y [M, D_out] (or dx, dim_out = D), laid out as column_major_output says; rows: M (0 for
    an unwanted dx)."""
    rows = x.shape[0] if rows is None else rows
    if rows == x.shape[0] and column_major_output(x, dim_out):
        return new_output((dim_out, rows), dtype, x.device).t()
    return new_output((rows, dim_out), dtype, x.device)


def _in_layout(tensor: torch.Tensor, column_major: bool) -> torch.Tensor:
    """A 2-D tensor in the layout the ops' fakes promise (a copy only where it is not already)."""
    if column_major:
        return tensor if tensor.stride() == (1, tensor.shape[0]) else tensor.t().contiguous().t()
    return tensor.contiguous()


def _forward_triton(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, add_input, row_scale, activation,
                    compute_dtype, out_dtype, save_hidden):
    rows = x.shape[0]
    rank, dim_out = w_down.shape[0], w_up.shape[0]
    y = _new_y(x, dim_out, out_dtype)
    hidden = new_output((rows if save_hidden else 0, rank), compute_dtype, x.device)
    if rows == 0:
        return y, hidden
    if residual is not None:
        residual = int32_columns(residual)
    x = int32_columns(x)

    def plan(variant):
        return forward_launch(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, add_input, row_scale,
                              activation, compute_dtype, y, hidden, variant)

    with device_context(x):
        def key():
            return (_shape_key(x, w_down, w_up, scale, residual, row_scale), add_input, activation, compute_dtype,
                    out_dtype, save_hidden)

        variant = pick("bottleneck_adapter", "forward", key, x.device, lambda v: time_cuda(plan(v)))
        plan(variant)()
    return y, hidden


def _shape_key(x, w_down, w_up, scale, residual, row_scale) -> tuple:
    """What an autotuned choice is keyed by: shapes, strides, dtypes and which inputs exist."""
    return (tuple(x.shape), x.stride(), x.dtype, w_down.shape[0], w_up.shape[0], scale_mode(scale),
            None if residual is None else (residual.dtype, residual.stride()), row_scale is not None)


def _backward_triton(grad_y, x, hidden, w_down, b_down, w_up, b_up, scale, scale_value, row_scale, activation,
                     compute_dtype, add_grad_y, compute_dx):
    rows, dim = x.shape
    rank, dim_out = w_down.shape[0], w_up.shape[0]
    packed_size = _packed_size(dim, rank, dim_out)
    grad_dtype = packed_grad_dtype(x, w_down, b_down, w_up, b_up, scale)
    grad_x = _new_y(x, dim, x.dtype, rows if compute_dx else 0)  # laid out like x
    if rows == 0:
        return grad_x, torch.zeros(packed_size, dtype=grad_dtype, device=x.device)
    if hidden.shape[0] != rows:
        raise RuntimeError("bottleneck_adapter: backward without the saved pre-activation (the forward ran with "
                           "save_hidden=False)")
    grad_hidden = new_output((rows, rank), compute_dtype, x.device)
    grad_y, x = int32_columns(grad_y), int32_columns(x)

    def plan(variant):
        store_act = padded_rank(rank) > 32 or variant.store_act
        act = new_output((rows if store_act else 0, rank), compute_dtype, x.device)
        return backward_launches(grad_y, x, hidden, w_down, w_up, b_up, scale, scale_value, row_scale, activation,
                                 compute_dtype, add_grad_y, grad_hidden, act, grad_x, grad_dtype, variant)

    def run(launches):
        hidden_launch, weights_launch, _ = launches
        hidden_launch()
        weights_launch()

    def time_variant(variant):
        # Both launches write (never accumulate into) their outputs, so timing reruns are harmless.
        launches = plan(variant)
        return time_cuda(lambda: run(launches))

    with device_context(x):
        def key():
            return (_shape_key(x, w_down, w_up, scale, None, row_scale), grad_y.stride(), add_grad_y, compute_dx,
                    activation, compute_dtype, grad_dtype)

        variant = pick("bottleneck_adapter", "backward", key, x.device, time_variant)
        launches = plan(variant)
        run(launches)
    hidden_launch, weights_launch, partials = launches
    # One deterministic reduction over chunks for all five gradients (none with one chunk).
    totals = partials[0] if partials.shape[0] == 1 else partials.sum(dim=0).to(grad_dtype)
    rank_blocks = weights_launch.grid[2]
    if rank_blocks > 1:  # split ranks left one dscale row per rank block: fold them into the first
        scale_rows = totals[packed_size - dim_out:].view(rank_blocks, dim_out)
        scale_rows[0] = scale_rows.float().sum(0).to(grad_dtype)
    return grad_x, totals[:packed_size]



def _packed_size(dim: int, rank: int, dim_out: int) -> int:
    """[dw_up (D_out x r) | dw_down (r x D) | db_up (D_out) | db_down (r) | dscale per channel (D_out)]."""
    return (dim_out + dim) * rank + 2 * dim_out + rank


def _unpack_param_grads(packed, w_down, b_down, w_up, b_up, scale):
    """Views into the packed [dw_up | dw_down | db_up | db_down | dscale per channel] vector, each
    cast to its parameter's dtype (and the scale's channels summed for a layer-wise scale)."""
    rank, dim = w_down.shape
    dim_out = w_up.shape[0]
    grad_w_up, grad_w_down, grad_b_up, grad_b_down, grad_scale = packed.split(
        [dim_out * rank, rank * dim, dim_out, rank, dim_out]
    )
    grad_w_up = grad_w_up.view(dim_out, rank).to(w_up.dtype)
    grad_w_down = grad_w_down.view(rank, dim).to(w_down.dtype)
    grad_b_up = grad_b_up.to(b_up.dtype) if b_up is not None else None
    grad_b_down = grad_b_down.to(b_down.dtype) if b_down is not None else None
    if scale is None:
        grad_scale = None
    elif scale.numel() == 1:
        grad_scale = grad_scale.float().sum().reshape(scale.shape).to(scale.dtype)
    else:
        grad_scale = grad_scale.to(scale.dtype)
    return grad_w_down, grad_b_down, grad_w_up, grad_b_up, grad_scale


# --------------------------------------------------------------------------------------------
# torch.library ops: one graph node each for torch.compile
# --------------------------------------------------------------------------------------------


def _scale_arg(scale: Optional[torch.Tensor], scale_value: float):
    return scale if scale is not None else (None if scale_value == 1.0 else scale_value)


def _forward_dtypes(x, residual, compute_dtype, out_dtype, params) -> tuple:
    # The parameters' dtypes count too: the weights kernel stores gradients in their dtype (no
    # bf16 stores in the interpreter: it truncates rather than rounds).
    dtypes = (x.dtype, compute_dtype, out_dtype) + tuple(p.dtype for p in params if p is not None)
    return dtypes + ((residual.dtype,) if residual is not None else ())


def _forward_takes_triton(x, residual, compute_dtype, out_dtype, params) -> bool:
    return takes_triton(x.device.type, _forward_dtypes(x, residual, compute_dtype, out_dtype, params))


def _forward_impl(
    x: torch.Tensor, w_down: torch.Tensor, b_down: Optional[torch.Tensor], w_up: torch.Tensor,
    b_up: Optional[torch.Tensor], scale: Optional[torch.Tensor], scale_value: float,
    residual: Optional[torch.Tensor], add_input: bool, row_scale: Optional[torch.Tensor], activation: str,
    compute_dtype: torch.dtype, out_dtype: torch.dtype, autocast: bool, save_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D x [M, D]. Returns y [M, D_out] in out_dtype and the pre-activation [M, r] in the compute
    dtype (or [0, r] when not saved). add_input: x itself is a residual term besides `residual`."""
    dtypes = _forward_dtypes(x, residual, compute_dtype, out_dtype, (w_down, b_down, w_up, b_up, scale))
    if takes_triton(x.device.type, dtypes):
        return _forward_triton(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, add_input, row_scale,
                               activation, compute_dtype, out_dtype, save_hidden)
    warn_reference("bottleneck_adapter", x.device.type, dtypes)
    terms = ([x] if add_input else []) + ([residual] if residual is not None else [])
    y = reference.bottleneck_in_dtype(x, w_down, b_down, w_up, b_up, _scale_arg(scale, scale_value),
                                      activation=activation, residual=terms, row_scale=row_scale,
                                      dtype=compute_dtype, autocast=autocast)
    # In the layout the fake says (row-major unless column_major_output), whatever layout the
    # eager expression gave. The reference path recomputes in backward and saves nothing of its own.
    y = _in_layout(y.to(out_dtype), column_major_output(x, w_up.shape[0]))
    return y, x.new_empty((0, w_down.shape[0]), dtype=compute_dtype)


_forward_op = torch.library.custom_op("fused_adapters::bottleneck_forward", _forward_impl, mutates_args=())


@_forward_op.register_fake
def _forward_fake(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, add_input, row_scale, activation,
                  compute_dtype, out_dtype, autocast, save_hidden):
    rows = x.shape[0]
    triton_path = _forward_takes_triton(x, residual, compute_dtype, out_dtype, (w_down, b_down, w_up, b_up, scale))
    hidden_rows = rows if (save_hidden and triton_path) else 0
    dim_out = w_up.shape[0]
    y = x.new_empty((dim_out, rows), dtype=out_dtype).t() if column_major_output(x, dim_out) else \
        x.new_empty((rows, dim_out), dtype=out_dtype)
    return (y,
            x.new_empty((hidden_rows, w_down.shape[0]), dtype=compute_dtype))


def _backward_impl(
    grad_y: torch.Tensor, x: torch.Tensor, hidden: torch.Tensor, w_down: torch.Tensor,
    b_down: Optional[torch.Tensor], w_up: torch.Tensor, b_up: Optional[torch.Tensor],
    scale: Optional[torch.Tensor], scale_value: float, row_scale: Optional[torch.Tensor], activation: str,
    compute_dtype: torch.dtype, add_grad_y: bool, compute_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx ([M, D] in x's dtype, or [0, D] when not wanted; plus dy when add_grad_y) and the
    packed parameter gradients (see _unpack_param_grads, _grad_dtype); one tensor for all of
    them, since a custom op's outputs may not alias."""
    # The kernels need the pre-activation the Triton forward saved; a forward that took the
    # reference (e.g. a bf16 residual in the interpreter) saved none, and its backward is the
    # reference's too.
    saved = hidden.shape[0] == x.shape[0]
    if saved and takes_triton(x.device.type, (x.dtype, compute_dtype, grad_y.dtype)):
        return _backward_triton(grad_y, x, hidden, w_down, b_down, w_up, b_up, scale, scale_value, row_scale,
                                activation, compute_dtype, add_grad_y, compute_dx)
    grad_x, grad_w_down, grad_b_down, grad_w_up, grad_b_up, grad_scale = reference.bottleneck_adapter_backward(
        grad_y, x, w_down, b_down, w_up, b_up, _scale_arg(scale, scale_value), activation=activation,
        row_scale=row_scale, dtype=compute_dtype,
    )
    packed = torch.cat([g.reshape(-1) for g in (grad_w_up, grad_w_down, grad_b_up, grad_b_down, grad_scale)])
    if compute_dx:
        grad_x = (grad_x + grad_y) if add_grad_y else grad_x
        grad_x = _in_layout(grad_x.to(x.dtype), column_major_output(x, x.shape[1]))  # as the fake: like x
    else:
        grad_x = x.new_empty((0, x.shape[1]))
    return grad_x, packed.to(packed_grad_dtype(x, w_down, b_down, w_up, b_up, scale))


_backward_op = torch.library.custom_op("fused_adapters::bottleneck_backward", _backward_impl, mutates_args=())


@_backward_op.register_fake
def _backward_fake(grad_y, x, hidden, w_down, b_down, w_up, b_up, scale, scale_value, row_scale, activation,
                   compute_dtype, add_grad_y, compute_dx):
    rank, dim = w_down.shape
    return (
        x.new_empty((dim, x.shape[0])).t() if compute_dx and column_major_output(x, dim) else
        x.new_empty((x.shape[0] if compute_dx else 0, dim)),
        x.new_empty(_packed_size(dim, rank, w_up.shape[0]), dtype=packed_grad_dtype(x, w_down, b_down, w_up, b_up,
                                                                                    scale)),
    )


# Positions of the forward op's inputs, for needs_input_grad.
_X, _W_DOWN, _B_DOWN, _W_UP, _B_UP, _SCALE, _RESIDUAL = 0, 1, 2, 3, 4, 5, 7
_FORWARD_INPUTS = 15


def _setup_context(ctx, inputs, output):
    (x, w_down, b_down, w_up, b_up, scale, scale_value, residual, add_input, row_scale, activation, compute_dtype,
     _, _, _) = inputs
    _, hidden = output
    ctx.mark_non_differentiable(hidden)
    ctx.set_materialize_grads(False)  # no M x r zeros for the hidden output's (absent) gradient
    # x by reference, the parameters, and the M x r pre-activation: nothing of M x D is copied.
    ctx.save_for_backward(x, w_down, b_down, w_up, b_up, scale, row_scale, hidden)
    ctx.scale_value = scale_value
    ctx.activation = activation
    ctx.compute_dtype = compute_dtype
    ctx.add_input = add_input
    ctx.residual_dtype = residual.dtype if residual is not None else None


def _backward(ctx, grad_y, grad_hidden):
    x, w_down, b_down, w_up, b_up, scale, row_scale, hidden = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grad_y is None:
        return (None,) * len(needs)
    if torch.is_grad_enabled():
        # Autograd runs a backward with grad mode on only for create_graph=True. The hand-written
        # backward kernels have no backward of their own: say so now, not at the second backward.
        raise RuntimeError(
            "bottleneck_adapter does not support double backward (create_graph=True / higher-order "
            "gradients); run that computation with fused_adapters.kernels.reference.bottleneck_adapter"
        )
    grad_x, packed = torch.ops.fused_adapters.bottleneck_backward(
        grad_y, x, hidden, w_down, b_down, w_up, b_up, scale, ctx.scale_value, row_scale, ctx.activation,
        ctx.compute_dtype, ctx.add_input, needs[_X],
    )
    grad_w_down, grad_b_down, grad_w_up, grad_b_up, grad_scale = _unpack_param_grads(
        packed, w_down, b_down, w_up, b_up, scale
    )
    grads = [None] * _FORWARD_INPUTS
    grads[_X] = grad_x if needs[_X] else None
    grads[_W_DOWN] = grad_w_down if needs[_W_DOWN] else None
    grads[_B_DOWN] = grad_b_down if needs[_B_DOWN] else None
    grads[_W_UP] = grad_w_up if needs[_W_UP] else None
    grads[_B_UP] = grad_b_up if needs[_B_UP] else None
    grads[_SCALE] = grad_scale if needs[_SCALE] else None
    # The residual's gradient is dy itself (cast to the residual's dtype where y was promoted).
    grads[_RESIDUAL] = grad_y.to(ctx.residual_dtype) if needs[_RESIDUAL] else None
    return tuple(grads)


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
    residual=None,
    row_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = residual + scale * (row_scale[:, None] * (act(x @ w_down.T + b_down) @ w_up.T + b_up)).

    x: [..., D], any leading dims and strides, fp16/bf16/fp32 (float64 runs the reference).
    w_down [r, D], b_down [r] or None, w_up [D_out, r], b_up [D_out] or None: any float dtype.
    D_out = D is the adapter; any other D_out makes a width-changing bottleneck (LoRA on a D -> 3D
    qkv: identity activation, no biases, scale alpha / r, the base layer's output as residual).
    y is [..., D_out].
    scale: [D_out] (channel-wise), a one-element tensor (layer-wise), a Python float, or None (= 1).
    residual: None, a tensor shaped like y, or a sequence of such tensors whose sum is the
    residual; x itself may be one of them when D_out = D (`residual=x` for y = x + A(x),
    `residual=(skip, x)` for y = skip + x + A(x)), which costs no extra pass over memory in
    either direction.
    row_scale: [M] with M = x.numel() // D, a per-row constant (no gradient), or None.
    activation: gelu (erf), gelu_tanh, relu, silu or identity.

    Layout: y (and x's gradient) is laid out like x: row-major, or column-major when x's [M, D]
    view is and D_out = D (see column_major_output).

    Dtypes: the dots run in autocast's dtype under torch.autocast (as F.linear would), else in
    x's dtype with the parameters cast to it; fp32 accumulation. y has the dtype eager PyTorch
    gives the same expression (reference.output_dtype); each gradient has its input's dtype.

    CUDA tensors run one fused Triton launch forward and two backward; CPU tensors run the
    plain-PyTorch reference unless TRITON_INTERPRET=1 was set before import, in which case the
    same kernels run in Triton's interpreter.
    """
    scale_tensor, scale_value, terms = check_bottleneck_arguments(x, w_down, b_down, w_up, b_up, scale, activation, residual,
                                                        row_scale)
    dim = x.shape[-1]
    compute_dtype = reference.compute_dtype(x)
    autocast = x.dtype in reference.AUTOCAST_INPUT_DTYPES and torch.is_autocast_enabled(x.device.type)
    out_dtype = reference.output_dtype(compute_dtype, autocast, scale_tensor, terms)
    scale_tensor, scale_value, add_input, skip2d = epilogue_arguments(x, scale_tensor, scale_value, terms,
                                                                      out_dim=w_up.shape[0])
    x2d = x.reshape(-1, dim)
    if row_scale is not None:
        row_scale = row_scale.detach()
    tensors = (x, w_down, b_down, w_up, b_up, scale_tensor, *terms)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, _ = torch.ops.fused_adapters.bottleneck_forward(
        x2d, w_down, b_down, w_up, b_up, scale_tensor, scale_value, skip2d, add_input, row_scale, activation,
        compute_dtype, out_dtype, autocast, needs_grad,
    )
    return y.view(*x.shape[:-1], w_up.shape[0])
