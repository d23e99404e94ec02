"""The bottleneck adapter's Triton kernels: y = residual + scale * (row_scale * (act(x W_d^T + b_d)
W_u^T + b_u)), forward in one launch, backward in two. plan.py makes their launches.

Forward (_bottleneck_forward_kernel): each program owns a tile of rows, accumulates the
pre-activation h = x W_d^T + b_d over D in fp32 registers, then walks D again for
u = act(h) W_u^T with the epilogue (bias, row_scale, scale, residual, cast) fused. No M x D
intermediate is written; the M x r pre-activation is stored (in the compute dtype) only when a
backward will need it.

Backward, no float atomics:
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

Dropout (kernels/dropout.py), compiled in only where asked (HIDDEN_DROPOUT, INPUT_DROPOUT): on
act(h) before the up projection, and on the x tile as the down projection reads it. Both
backward kernels draw the same masks again from the seed, for dh, for the dropped act the up
side's gradients read, and for dw_down = dh^T dropout(x) and dx's (dh W_d) * mask term.
"""

import triton
import triton.language as tl

from ..activations import activation as _activation
from ..activations import activation_grad as _activation_grad
from ..dropout import HIDDEN, INPUT, dropout_factor
from ..epilogue import epilogue, epilogue_scalars, scaled_grad


@triton.jit
def _bottleneck_forward_kernel(
    x_ptr, w_down_ptr, b_down_ptr, w_up_ptr, b_up_ptr, scale_ptr, residual_ptr, row_scale_ptr,
    y_ptr, hidden_ptr, seed_ptr,
    rows, dim, dim_out, rank, scale_value, dropout_p, dropout_keep, input_dropout_p, input_dropout_keep,
    stride_x_row, stride_x_col, stride_res_row, stride_res_col, stride_y_row, stride_y_col,
    ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_B_DOWN: tl.constexpr,
    HAS_B_UP: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ADD_INPUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    STORE_HIDDEN: tl.constexpr, SAME_WIDTH: tl.constexpr, HIDDEN_DROPOUT: tl.constexpr, INPUT_DROPOUT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
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
    if HIDDEN_DROPOUT or INPUT_DROPOUT:
        seed = tl.load(seed_ptr)

    # h[BLOCK_ROWS, BLOCK_RANK] = x[rows, :] @ w_down.T; padded ranks load zero weights.
    hidden = tl.zeros((BLOCK_ROWS, BLOCK_RANK), dtype=tl.float32)
    for col_start in range(0, dim, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim
        x_tile = tl.load(
            x_ptr + row_ids[:, None] * stride_x_row + col_ids[None, :] * stride_x_col,
            mask=row_mask[:, None] & col_mask[None, :], other=0.0,
        )
        if INPUT_DROPOUT:  # the down projection reads dropout(x); the epilogue's x term does not
            x_tile = x_tile.to(tl.float32) * dropout_factor(seed, row_ids, col_ids, input_dropout_p,
                                                            input_dropout_keep, INPUT)
        x_tile = x_tile.to(dtype)
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
    if HIDDEN_DROPOUT:  # regenerated from the seed in the backward: no mask is stored
        act = (act.to(tl.float32) * dropout_factor(seed, row_ids, rank_ids, dropout_p, dropout_keep, HIDDEN)).to(dtype)

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
    grad_y_ptr, hidden_ptr, w_up_ptr, scale_ptr, row_scale_ptr, grad_hidden_ptr, act_ptr, seed_ptr,
    rows, dim, rank, scale_value, dropout_p, dropout_keep,
    stride_g_row, stride_g_col,
    ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, STORE_ACT: tl.constexpr,
    HIDDEN_DROPOUT: tl.constexpr,
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

    row_scale, scalar_scale = epilogue_scalars(row_scale_ptr, scale_ptr, row_ids, row_mask, scale_value, dtype,
                                               SCALE_MODE, HAS_ROW_SCALE, BLOCK_ROWS)

    # d act = (dy * row_scale * scale) @ w_up, reduced over D.
    grad_act = tl.zeros((BLOCK_ROWS, BLOCK_RANK), dtype=tl.float32)
    for col_start in range(0, dim, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim
        grad_update = scaled_grad(grad_y_ptr, scale_ptr, row_ids, row_mask, col_ids, col_mask, row_scale,
                                  scalar_scale, stride_g_row, stride_g_col, SCALE_MODE, HAS_ROW_SCALE)
        w_up_tile = tl.load(
            w_up_ptr + col_ids[:, None] * rank + rank_ids[None, :],
            mask=col_mask[:, None] & rank_mask[None, :], other=0.0,
        ).to(dtype)
        grad_act = tl.dot(grad_update.to(dtype), w_up_tile, grad_act, input_precision=INPUT_PRECISION)

    hidden_mask = row_mask[:, None] & rank_mask[None, :]
    hidden = tl.load(hidden_ptr + row_ids[:, None] * rank + rank_ids[None, :], mask=hidden_mask,
                     other=0.0).to(tl.float32)
    if HIDDEN_DROPOUT:  # the forward's mask, from the same seed: the gradient of a dropped unit is 0
        keep = dropout_factor(tl.load(seed_ptr), row_ids, rank_ids, dropout_p, dropout_keep, HIDDEN)
        grad_act = grad_act * keep
    grad_hidden = grad_act * _activation_grad(hidden, ACTIVATION)
    tl.store(grad_hidden_ptr + row_ids[:, None] * rank + rank_ids[None, :], grad_hidden.to(dtype), mask=hidden_mask)
    if STORE_ACT:
        # act(h) for the weight gradients at ranks above 32, so the next kernel runs no
        # transcendentals: there Triton hoisted gelu into the dot-operand layout, replicated
        # across warps (compile check, rank 64, bf16, sm_80: 3432 bytes of spills before, 0 after).
        act = _activation(hidden, ACTIVATION).to(dtype)
        if HIDDEN_DROPOUT:  # the up projection's input was dropout(act), rounded as the forward rounds it
            act = (act.to(tl.float32) * keep).to(dtype)
        tl.store(act_ptr + row_ids[:, None] * rank + rank_ids[None, :], act, mask=hidden_mask)


@triton.jit
def _backward_input_and_weights_kernel(
    grad_y_ptr, x_ptr, act_ptr, grad_hidden_ptr, w_down_ptr, w_up_ptr, b_up_ptr, scale_ptr,
    row_scale_ptr, grad_x_ptr, partials_ptr, seed_ptr,
    rows, dim, dim_out, rank, scale_value, tiles_per_chunk, dropout_p, dropout_keep, input_dropout_p,
    input_dropout_keep,
    stride_g_row, stride_g_col, stride_x_row, stride_x_col, stride_dx_row, stride_dx_col,
    ACTIVATION: tl.constexpr, RECOMPUTE_ACT: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_B_UP: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr, COMPUTE_DX: tl.constexpr, ADD_GRAD_Y: tl.constexpr, SPLIT_RANK: tl.constexpr,
    SAME_WIDTH: tl.constexpr, HIDDEN_DROPOUT: tl.constexpr, INPUT_DROPOUT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
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
    # HIDDEN_DROPOUT only with RECOMPUTE_ACT (a stored act is already dropped).
    if HIDDEN_DROPOUT or INPUT_DROPOUT:
        seed = tl.load(seed_ptr)

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
            if HIDDEN_DROPOUT:
                act = (act.to(tl.float32) * dropout_factor(seed, row_ids, rank_ids, dropout_p, dropout_keep,
                                                           HIDDEN)).to(dtype)
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
        )
        if INPUT_DROPOUT:  # dw_down = dh^T dropout(x), and dx = (dh w_down) * mask: the forward's mask
            keep_x = dropout_factor(seed, row_ids, col_ids, input_dropout_p, input_dropout_keep, INPUT)
            x_tile = x_tile.to(tl.float32) * keep_x
        x_tile = x_tile.to(dtype)
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
                    if INPUT_DROPOUT:
                        grad_x = grad_x * keep_x
                    if ADD_GRAD_Y:  # x is a residual term: its gradient dy joins dx in this store
                        grad_x += grad_y
                    tl.store(grad_x_ptr + row_ids[:, None] * stride_dx_row + col_ids[None, :] * stride_dx_col,
                             grad_x.to(grad_x_ptr.dtype.element_ty), mask=tile_mask)
            else:
                grad_x = tl.dot(grad_hidden, w_down_tile, input_precision=INPUT_PRECISION)
                if INPUT_DROPOUT:
                    grad_x = grad_x * keep_x
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

    # Partials of chunk c, in the layout of plan.grad_layout (in the parameters' dtype when there is
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
