"""The Triton kernels of the sparse mixture of adapters (dense-masked design): the forward, and
the backward's row-tile launch (dh, d logits or d weights, dx) and weights launch (partials of
every parameter gradient). plan.py makes their launches; op.py's docstring describes the
design.

Widths: x, dx, w_down and w_gate have D columns; w_up [E, D_out, r], b_up, scale, the residual,
y and dy have D_out (= D for an adapter; 3 D for LoRA on a ViT's qkv). SAME_WIDTH compiles the
D_out = D case with one width, exactly as the kernels were before width-changing mixtures, so
their extra argument costs the adapter nothing."""

import triton
import triton.language as tl

from ..activations import activation as _activation
from ..activations import activation_grad as _activation_grad
from ..dropout import HIDDEN, INPUT, dropout_factor
from ..epilogue import epilogue, epilogue_scalars, scaled_grad


@triton.jit
def _expert_one_hot(column_ids, column_mask, expert_ids, rank, BLOCK_EXPERTS: tl.constexpr):
    """[BLOCK_EXPERTS, BLOCK_COLUMNS] fp32: 1 where stacked column c belongs to expert e."""
    owner = tl.where(column_mask, column_ids // rank, BLOCK_EXPERTS)
    return (expert_ids[:, None] == owner[None, :]).to(tl.float32)


@triton.jit
def _sparse_forward_kernel(
    x_ptr, w_gate_ptr, b_gate_ptr, expert_idx_ptr, expert_weight_ptr, w_down_ptr, b_down_ptr, w_up_ptr, b_up_ptr,
    scale_ptr, residual_ptr, row_scale_ptr, y_ptr, hidden_ptr, weights_ptr, logits_ptr, seed_ptr,
    rows, dim, dim_out, rank, experts, scale_value, dropout_p, dropout_keep, input_dropout_p, input_dropout_keep,
    stride_x_row, stride_x_col, stride_res_row, stride_res_col, stride_idx_row, stride_idx_col, stride_w_row,
    stride_w_col,
    TOP_K: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr,
    HAS_B_GATE: tl.constexpr, HAS_B_DOWN: tl.constexpr, HAS_B_UP: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ADD_INPUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, SAVE: tl.constexpr, STORE_LOGITS: tl.constexpr,
    SAME_WIDTH: tl.constexpr, HIDDEN_DROPOUT: tl.constexpr, INPUT_DROPOUT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_EXPERTS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
):
    # This program's tile: rows [pid * BLOCK_ROWS, +BLOCK_ROWS), every expert, every column of D
    # (x, the gate, h) and then of D_out (y).
    if SAME_WIDTH:
        dim_out = dim
    pid = tl.program_id(0)
    row_ids = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_ids = row_ids.to(tl.int64)  # M * D may pass 2^31
    expert_ids = tl.arange(0, BLOCK_EXPERTS)
    expert_mask = expert_ids < experts
    # Stacked columns: column c is rank c % r of expert c // r.
    column_ids = tl.arange(0, BLOCK_COLUMNS)
    column_mask = column_ids < experts * rank
    # W_up [E, D_out, r] read as W_up_stacked [D_out, E*r]: element (d, c) at
    # (c // r) * D_out * r + d * r + c % r.
    up_columns = (column_ids // rank) * dim_out * rank + column_ids % rank
    dtype = COMPUTE_DTYPE

    hidden = tl.zeros((BLOCK_ROWS, BLOCK_COLUMNS), dtype=tl.float32)
    logits = tl.zeros((BLOCK_ROWS, BLOCK_EXPERTS), dtype=tl.float32)
    for col_start in range(0, dim, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim
        x_tile = tl.load(
            x_ptr + row_ids[:, None] * stride_x_row + col_ids[None, :] * stride_x_col,
            mask=row_mask[:, None] & col_mask[None, :], other=0.0,
        )
        w_down_t = tl.load(
            w_down_ptr + column_ids[None, :] * dim + col_ids[:, None],
            mask=col_mask[:, None] & column_mask[None, :], other=0.0,
        ).to(dtype)
        down_x = x_tile
        if INPUT_DROPOUT:  # the down projection reads dropout(x); the gate and the epilogue's x term do not
            # The seed loaded where a mask is drawn, not held across the loop: held, the routed fp16
            # forward (E*r = 128, 32 rows, sm_90) spilled 16 bytes with both dropouts.
            down_x = x_tile.to(tl.float32) * dropout_factor(tl.load(seed_ptr), row_ids, col_ids, input_dropout_p,
                                                            input_dropout_keep, INPUT)
        hidden = tl.dot(down_x.to(dtype), w_down_t, hidden, input_precision=INPUT_PRECISION)
        if GATED:
            w_gate_t = tl.load(
                w_gate_ptr + expert_ids[None, :] * dim + col_ids[:, None],
                mask=col_mask[:, None] & expert_mask[None, :], other=0.0,
            ).to(tl.float32)
            logits = tl.dot(x_tile.to(tl.float32), w_gate_t, logits, input_precision="ieee")

    if GATED:
        if HAS_B_GATE:
            logits += tl.load(b_gate_ptr + expert_ids, mask=expert_mask, other=0.0).to(tl.float32)[None, :]
        if STORE_LOGITS:
            tl.store(logits_ptr + row_ids[:, None] * experts + expert_ids[None, :], logits,
                     mask=row_mask[:, None] & expert_mask[None, :])
        logits = tl.where(expert_mask[None, :], logits, float("-inf"))
        # Top-k: the largest remaining logit each round, the lowest expert index among equals; a
        # NaN logit ranks first, as torch.topk ranks it, so its row's weights (and y) come out NaN
        # as the reference's do (compared as NaN, it would never be chosen: a dead expert).
        ranked = tl.where(logits != logits, float("inf"), logits)
        chosen = tl.zeros((BLOCK_ROWS, BLOCK_EXPERTS), dtype=tl.int1)
        top = tl.max(logits, axis=1)
        for _ in tl.static_range(TOP_K):
            remaining = tl.where(chosen, float("-inf"), ranked)
            best = tl.max(remaining, axis=1)
            first = tl.min(tl.where(remaining == best[:, None], expert_ids[None, :], BLOCK_EXPERTS), axis=1)
            chosen = chosen | (expert_ids[None, :] == first[:, None])
        weights = tl.where(chosen, tl.exp(logits - top[:, None]), 0.0)
        weights = weights / tl.sum(weights, axis=1)[:, None]
    else:
        # The caller's experts and weights, as dense [rows, E] weights (a repeated expert adds up;
        # an index outside 0..E-1, which the Python side rejects, would match no expert).
        weights = tl.zeros((BLOCK_ROWS, BLOCK_EXPERTS), dtype=tl.float32)
        for slot in tl.static_range(TOP_K):
            slot_expert = tl.load(expert_idx_ptr + row_ids * stride_idx_row + slot * stride_idx_col, mask=row_mask,
                                  other=-1)
            slot_weight = tl.load(expert_weight_ptr + row_ids * stride_w_row + slot * stride_w_col, mask=row_mask,
                                  other=0.0)
            weights += tl.where(expert_ids[None, :] == slot_expert[:, None].to(tl.int32),
                                slot_weight.to(tl.float32)[:, None], 0.0)
    if SAVE:
        tl.store(weights_ptr + row_ids[:, None] * experts + expert_ids[None, :], weights,
                 mask=row_mask[:, None] & expert_mask[None, :])
    # The weights multiply in the compute dtype, as the reference's expert loop does.
    weights = weights.to(dtype).to(tl.float32)

    # Spread each expert's weight over its r stacked columns (exact: one term per column).
    one_hot = _expert_one_hot(column_ids, column_mask, expert_ids, rank, BLOCK_EXPERTS)
    column_weights = tl.dot(weights, one_hot, input_precision="ieee")
    if HAS_B_DOWN:
        hidden += tl.load(b_down_ptr + column_ids, mask=column_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    hidden = hidden.to(dtype)  # rounded as F.linear's output is; the backward recomputes from it
    if SAVE:
        tl.store(hidden_ptr + row_ids[:, None] * (experts * rank) + column_ids[None, :], hidden,
                 mask=row_mask[:, None] & column_mask[None, :])
    act = _activation(hidden.to(tl.float32), ACTIVATION)
    if HIDDEN_DROPOUT:  # stacked column c is the mask's column e * r + j; the backward draws it again
        act = act * dropout_factor(tl.load(seed_ptr), row_ids, column_ids, dropout_p, dropout_keep, HIDDEN)
    act = (act * column_weights).to(dtype)

    row_scale, scalar_scale = epilogue_scalars(row_scale_ptr, scale_ptr, row_ids, row_mask, scale_value, dtype,
                                               SCALE_MODE, HAS_ROW_SCALE, BLOCK_ROWS)

    # y[rows, cols] per D_out tile; x is a residual term (ADD_INPUT) only where D_out = D.
    for col_start in range(0, dim_out, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim_out
        tile_mask = row_mask[:, None] & col_mask[None, :]
        w_up_t = tl.load(
            w_up_ptr + up_columns[:, None] + col_ids[None, :] * rank,
            mask=column_mask[:, None] & col_mask[None, :], other=0.0,
        ).to(dtype)
        update = tl.dot(act, w_up_t, input_precision=INPUT_PRECISION)
        if HAS_B_UP:
            b_up_tile = tl.load(
                b_up_ptr + expert_ids[:, None] * dim_out + col_ids[None, :],
                mask=expert_mask[:, None] & col_mask[None, :], other=0.0,
            ).to(dtype).to(tl.float32)
            update += tl.dot(weights, b_up_tile, input_precision="ieee")
        update = epilogue(update, x_ptr, residual_ptr, scale_ptr, row_ids, col_ids, col_mask, tile_mask, row_scale,
                          scalar_scale, stride_x_row, stride_x_col, stride_res_row, stride_res_col,
                          SCALE_MODE, HAS_ROW_SCALE, ADD_INPUT, HAS_RESIDUAL)
        tl.store(y_ptr + row_ids[:, None] * dim_out + col_ids[None, :], update.to(y_ptr.dtype.element_ty),
                 mask=tile_mask)


@triton.jit
def _sparse_backward_input_kernel(
    grad_y_ptr, grad_logits_ptr, hidden_ptr, weights_ptr, w_gate_ptr, w_down_ptr, w_up_ptr, b_up_ptr, scale_ptr,
    row_scale_ptr, grad_hidden_ptr, grad_weights_ptr, act_ptr, grad_x_ptr, seed_ptr,
    rows, dim, dim_out, rank, experts, scale_value, dropout_p, dropout_keep, input_dropout_p, input_dropout_keep,
    stride_g_row, stride_g_col,
    GATED: tl.constexpr, HAS_GRAD_LOGITS: tl.constexpr, ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr,
    HAS_B_UP: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, STORE_ACT: tl.constexpr, COMPUTE_DX: tl.constexpr,
    ADD_GRAD_Y: tl.constexpr, SAME_WIDTH: tl.constexpr, HIDDEN_DROPOUT: tl.constexpr, INPUT_DROPOUT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_EXPERTS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
):
    # This program's tile: rows [pid * BLOCK_ROWS, +BLOCK_ROWS): their dh [rows, E*r], d logits
    # (or d weights) [rows, E], and dx [rows, D]; the first walk is over dy's D_out columns.
    if SAME_WIDTH:
        dim_out = dim
    pid = tl.program_id(0)
    row_ids = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_ids = row_ids.to(tl.int64)
    expert_ids = tl.arange(0, BLOCK_EXPERTS)
    expert_mask = expert_ids < experts
    column_ids = tl.arange(0, BLOCK_COLUMNS)
    column_mask = column_ids < experts * rank
    up_columns = (column_ids // rank) * dim_out * rank + column_ids % rank
    dtype = COMPUTE_DTYPE
    if HIDDEN_DROPOUT or INPUT_DROPOUT:
        seed = tl.load(seed_ptr)

    row_scale, scalar_scale = epilogue_scalars(row_scale_ptr, scale_ptr, row_ids, row_mask, scale_value, dtype,
                                               SCALE_MODE, HAS_ROW_SCALE, BLOCK_ROWS)

    # g = dy * row_scale * scale (fp32, then rounded as eager autocast rounds dy * scale);
    # d act = g W_up_stacked and the b_up part of d weights, g B_up^T, reduced over D_out.
    grad_act = tl.zeros((BLOCK_ROWS, BLOCK_COLUMNS), dtype=tl.float32)
    grad_weights = tl.zeros((BLOCK_ROWS, BLOCK_EXPERTS), dtype=tl.float32)
    for col_start in range(0, dim_out, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim_out
        grad_update = scaled_grad(grad_y_ptr, scale_ptr, row_ids, row_mask, col_ids, col_mask, row_scale,
                                  scalar_scale, stride_g_row, stride_g_col, SCALE_MODE, HAS_ROW_SCALE)
        w_up_tile = tl.load(
            w_up_ptr + col_ids[:, None] * rank + up_columns[None, :],
            mask=col_mask[:, None] & column_mask[None, :], other=0.0,
        ).to(dtype)
        grad_act = tl.dot(grad_update.to(dtype), w_up_tile, grad_act, input_precision=INPUT_PRECISION)
        if HAS_B_UP:
            b_up_t = tl.load(
                b_up_ptr + expert_ids[None, :] * dim_out + col_ids[:, None],
                mask=col_mask[:, None] & expert_mask[None, :], other=0.0,
            ).to(dtype).to(tl.float32)
            grad_weights = tl.dot(grad_update, b_up_t, grad_weights, input_precision="ieee")

    hidden_mask = row_mask[:, None] & column_mask[None, :]
    expert_tile_mask = row_mask[:, None] & expert_mask[None, :]
    hidden = tl.load(hidden_ptr + row_ids[:, None] * (experts * rank) + column_ids[None, :], mask=hidden_mask,
                     other=0.0).to(tl.float32)
    weights = tl.load(weights_ptr + row_ids[:, None] * experts + expert_ids[None, :], mask=expert_tile_mask,
                      other=0.0)
    one_hot = _expert_one_hot(column_ids, column_mask, expert_ids, rank, BLOCK_EXPERTS)
    column_weights = tl.dot(weights.to(dtype).to(tl.float32), one_hot, input_precision="ieee")
    act = _activation(hidden, ACTIVATION)
    if HIDDEN_DROPOUT:
        # The forward's mask, from the same seed: d act reaches h (and d weight) only through kept
        # units, scaled by 1 / (1 - p), so a dropped unit's dh is 0. act itself stays undropped:
        # grad_act * act below then carries the factor once, as d weight = d a . dropout(act) does.
        keep = dropout_factor(seed, row_ids, column_ids, dropout_p, dropout_keep, HIDDEN)
        grad_act = grad_act * keep
    if STORE_ACT:  # stored first, so that act(h) is not live across dh (fp32 E*r = 256 spilled)
        up_input = act
        if HIDDEN_DROPOUT:  # the up projection's input: the dropped act, as the forward formed it
            up_input = act * keep
        tl.store(act_ptr + row_ids[:, None] * (experts * rank) + column_ids[None, :],
                 (up_input * column_weights).to(dtype), mask=hidden_mask)
    # d weight_e = sum over expert e's columns of d act * act (+ the b_up term above).
    grad_weights = tl.dot(grad_act * act, tl.trans(one_hot), grad_weights, input_precision="ieee")
    grad_hidden = (grad_act * column_weights * _activation_grad(hidden, ACTIVATION)).to(dtype)
    tl.store(grad_hidden_ptr + row_ids[:, None] * (experts * rank) + column_ids[None, :], grad_hidden,
             mask=hidden_mask)
    if GATED:
        # Softmax over the chosen logits: d logit_e = p_e (d p_e - sum_j p_j d p_j); zero for the
        # unchosen experts, whose weight is 0 (the choice itself has no gradient).
        grad_weights = weights * (grad_weights - tl.sum(weights * grad_weights, axis=1)[:, None])
        if HAS_GRAD_LOGITS:
            grad_weights += tl.load(grad_logits_ptr + row_ids[:, None] * experts + expert_ids[None, :],
                                    mask=expert_tile_mask, other=0.0).to(tl.float32)
    tl.store(grad_weights_ptr + row_ids[:, None] * experts + expert_ids[None, :], grad_weights,
             mask=expert_tile_mask)

    # dx = dh W_down_stacked + d logits W_gate (+ dy when x is a residual term, so D_out = D), per
    # D tile: a second walk over D while the rows' dh is in registers (its dy reads hit L2).
    if COMPUTE_DX:
        for col_start in range(0, dim, BLOCK_DIM):
            col_ids = col_start + tl.arange(0, BLOCK_DIM)
            col_mask = col_ids < dim
            tile_mask = row_mask[:, None] & col_mask[None, :]
            w_down_tile = tl.load(w_down_ptr + column_ids[:, None] * dim + col_ids[None, :],
                                  mask=column_mask[:, None] & col_mask[None, :], other=0.0).to(dtype)
            grad_x = tl.dot(grad_hidden, w_down_tile, input_precision=INPUT_PRECISION)
            if INPUT_DROPOUT:  # the down projection read dropout(x): its share of dx takes the mask
                grad_x = grad_x * dropout_factor(seed, row_ids, col_ids, input_dropout_p, input_dropout_keep, INPUT)
            if GATED:  # the gate is fp32: its share of dx is exact fp32
                w_gate_tile = tl.load(w_gate_ptr + expert_ids[:, None] * dim + col_ids[None, :],
                                      mask=expert_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
                grad_x = tl.dot(grad_weights, w_gate_tile, grad_x, input_precision="ieee")
            if ADD_GRAD_Y:  # x is a residual term: its gradient dy joins dx in this store
                grad_x += tl.load(grad_y_ptr + row_ids[:, None] * stride_g_row + col_ids[None, :] * stride_g_col,
                                  mask=tile_mask, other=0.0).to(tl.float32)
            tl.store(grad_x_ptr + row_ids[:, None] * dim + col_ids[None, :], grad_x.to(grad_x_ptr.dtype.element_ty),
                     mask=tile_mask)


@triton.jit
def _sparse_backward_weights_kernel(
    grad_y_ptr, x_ptr, hidden_ptr, act_ptr, weights_ptr, grad_hidden_ptr, grad_logits_ptr,
    w_up_ptr, b_up_ptr, scale_ptr, row_scale_ptr, partials_ptr, seed_ptr,
    rows, dim, dim_out, rank, experts, scale_value, tiles_per_chunk, dropout_p, dropout_keep, input_dropout_p,
    input_dropout_keep, stride_g_row, stride_g_col, stride_x_row, stride_x_col,
    GATED: tl.constexpr, ACTIVATION: tl.constexpr, RECOMPUTE_ACT: tl.constexpr, SCALE_MODE: tl.constexpr,
    HAS_B_UP: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, SAME_WIDTH: tl.constexpr, HIDDEN_DROPOUT: tl.constexpr,
    INPUT_DROPOUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_EXPERTS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
):
    # This program's tile: columns [pid_col * BLOCK_DIM, +BLOCK_DIM) and stacked columns
    # [pid_block * BLOCK_COLUMNS, +BLOCK_COLUMNS) of the expert weights' gradients, summed over
    # the row tiles [pid_chunk * tiles_per_chunk, +tiles_per_chunk); the per-expert gradients
    # (b_up, and the gate's) in the pid_block == 0 programs. The columns are x's (D: w_down,
    # w_gate) and dy's (D_out: w_up, b_up, scale); the grid covers the wider of the two, and each
    # side masks the other's extra columns (SAME_WIDTH: one width and one mask).
    pid_chunk = tl.program_id(0)
    pid_col = tl.program_id(1)
    pid_block = tl.program_id(2)
    col_ids = pid_col * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    col_mask = col_ids < dim
    if SAME_WIDTH:
        dim_out = dim
        out_mask = col_mask
    else:
        out_mask = col_ids < dim_out
    expert_ids = tl.arange(0, BLOCK_EXPERTS)
    expert_mask = expert_ids < experts
    columns = experts * rank
    column_ids = pid_block * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    column_mask = column_ids < columns
    up_columns = (column_ids // rank) * dim_out * rank + column_ids % rank
    first_block = pid_block == 0
    dtype = COMPUTE_DTYPE
    if RECOMPUTE_ACT:
        one_hot = _expert_one_hot(column_ids, column_mask, expert_ids, rank, BLOCK_EXPERTS)
    # HIDDEN_DROPOUT only with RECOMPUTE_ACT (a stored act is already dropped).
    if HIDDEN_DROPOUT or INPUT_DROPOUT:
        seed = tl.load(seed_ptr)

    # With g = dy * row_scale and u = a W_up_stacked^T + p B_up (a = act(h) * p per column):
    # ga = g^T a and gp = g^T p give dw_up = scale * ga, db_up = scale * gp^T and
    # dscale = rowsum(W_up_stacked * ga) + rowsum(B_up^T * gp), so u is never recomputed.
    acc_ga = tl.zeros((BLOCK_DIM, BLOCK_COLUMNS), dtype=tl.float32)
    acc_gp = tl.zeros((BLOCK_DIM, BLOCK_EXPERTS), dtype=tl.float32)
    acc_w_down = tl.zeros((BLOCK_COLUMNS, BLOCK_DIM), dtype=tl.float32)
    acc_b_down = tl.zeros((BLOCK_COLUMNS,), dtype=tl.float32)
    acc_w_gate = tl.zeros((BLOCK_EXPERTS, BLOCK_DIM), dtype=tl.float32)
    acc_b_gate = tl.zeros((BLOCK_EXPERTS,), dtype=tl.float32)

    first_tile = pid_chunk * tiles_per_chunk
    for tile in range(first_tile, first_tile + tiles_per_chunk):
        row_ids = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = row_ids < rows
        row_ids = row_ids.to(tl.int64)
        tile_mask = row_mask[:, None] & col_mask[None, :]
        hidden_mask = row_mask[:, None] & column_mask[None, :]
        expert_tile_mask = row_mask[:, None] & expert_mask[None, :]

        grad_update = tl.load(
            grad_y_ptr + row_ids[:, None] * stride_g_row + col_ids[None, :] * stride_g_col,
            mask=row_mask[:, None] & out_mask[None, :], other=0.0,
        ).to(tl.float32)
        if HAS_ROW_SCALE:
            row_scale = tl.load(row_scale_ptr + row_ids, mask=row_mask, other=0.0).to(dtype).to(tl.float32)
            grad_update = grad_update * row_scale[:, None]
        if RECOMPUTE_ACT or HAS_B_UP:
            weights = tl.load(weights_ptr + row_ids[:, None] * experts + expert_ids[None, :],
                              mask=expert_tile_mask, other=0.0).to(dtype).to(tl.float32)
        if RECOMPUTE_ACT:
            hidden = tl.load(hidden_ptr + row_ids[:, None] * columns + column_ids[None, :], mask=hidden_mask,
                             other=0.0).to(tl.float32)
            column_weights = tl.dot(weights, one_hot, input_precision="ieee")
            act = _activation(hidden, ACTIVATION)
            if HIDDEN_DROPOUT:  # dw_up = g^T dropout(act) p: the forward's mask, drawn again
                act = act * dropout_factor(seed, row_ids, column_ids, dropout_p, dropout_keep, HIDDEN)
            act = (act * column_weights).to(dtype)
        else:
            act = tl.load(act_ptr + row_ids[:, None] * columns + column_ids[None, :], mask=hidden_mask, other=0.0)
        acc_ga = tl.dot(tl.trans(grad_update.to(dtype)), act, acc_ga, input_precision=INPUT_PRECISION)
        grad_hidden = tl.load(grad_hidden_ptr + row_ids[:, None] * columns + column_ids[None, :],
                              mask=hidden_mask, other=0.0)
        acc_b_down += tl.sum(grad_hidden.to(tl.float32), axis=0)
        x_tile = tl.load(
            x_ptr + row_ids[:, None] * stride_x_row + col_ids[None, :] * stride_x_col, mask=tile_mask, other=0.0
        )
        down_x = x_tile
        if INPUT_DROPOUT:  # dw_down = dh^T dropout(x), the forward's mask; the gate read x itself
            down_x = x_tile.to(tl.float32) * dropout_factor(seed, row_ids, col_ids, input_dropout_p,
                                                            input_dropout_keep, INPUT)
        acc_w_down = tl.dot(tl.trans(grad_hidden), down_x.to(dtype), acc_w_down, input_precision=INPUT_PRECISION)
        if first_block:
            if HAS_B_UP:
                acc_gp = tl.dot(tl.trans(grad_update), weights, acc_gp, input_precision="ieee")
            if GATED:
                grad_logits = tl.load(grad_logits_ptr + row_ids[:, None] * experts + expert_ids[None, :],
                                      mask=expert_tile_mask, other=0.0)
                acc_w_gate = tl.dot(tl.trans(grad_logits), x_tile.to(tl.float32), acc_w_gate,
                                    input_precision="ieee")
                acc_b_gate += tl.sum(grad_logits, axis=0)

    # Epilogue: this chunk's share of every parameter gradient, for this tile.
    if SCALE_MODE == "channel":
        col_scale = tl.load(scale_ptr + col_ids, mask=out_mask, other=0.0).to(tl.float32)
    elif SCALE_MODE == "tensor":
        col_scale = tl.full((BLOCK_DIM,), 1.0, tl.float32) * tl.load(scale_ptr).to(tl.float32)
    else:
        col_scale = tl.full((BLOCK_DIM,), 1.0, tl.float32) * scale_value
    up_mask = out_mask[:, None] & column_mask[None, :]
    w_up_tile = tl.load(w_up_ptr + col_ids[:, None] * rank + up_columns[None, :], mask=up_mask, other=0.0)
    grad_scale = tl.sum(w_up_tile.to(dtype).to(tl.float32) * acc_ga, axis=1)
    b_up_mask = out_mask[:, None] & expert_mask[None, :]
    if HAS_B_UP:
        b_up_t = tl.load(b_up_ptr + expert_ids[None, :] * dim_out + col_ids[:, None], mask=b_up_mask, other=0.0)
        grad_scale += tl.sum(b_up_t.to(dtype).to(tl.float32) * acc_gp, axis=1)  # zero outside block 0

    # Partials of chunk c, in the layout of plan.grad_layout (the gradients themselves, in their
    # dtype, when there is one chunk): [dw_up (E x D_out x r) | dw_down (E*r x D) | db_up
    # (E x D_out) | db_down (E*r) | dw_gate (E x D) | db_gate (E) | dscale per stacked-column
    # block (blocks x D_out)].
    out_dtype = partials_ptr.dtype.element_ty
    blocks = tl.num_programs(2)
    if SAME_WIDTH:  # the same-width kernel's arithmetic, as it was before D_out existed
        partial = partials_ptr + pid_chunk.to(tl.int64) * (2 * columns * dim + 2 * experts * dim + columns + experts
                                                            + blocks * dim)
    else:
        partial = partials_ptr + pid_chunk.to(tl.int64) * ((columns + experts) * (dim + dim_out) + columns + experts
                                                            + blocks * dim_out)
    tl.store(partial + up_columns[None, :] + col_ids[:, None] * rank, (acc_ga * col_scale[:, None]).to(out_dtype),
             mask=up_mask)
    partial += columns * dim_out
    tl.store(partial + column_ids[:, None] * dim + col_ids[None, :], acc_w_down.to(out_dtype),
             mask=column_mask[:, None] & col_mask[None, :])
    partial += columns * dim
    tl.store(partial + expert_ids[None, :] * dim_out + col_ids[:, None], (acc_gp * col_scale[:, None]).to(out_dtype),
             mask=b_up_mask & first_block)
    partial += experts * dim_out
    tl.store(partial + column_ids, acc_b_down.to(out_dtype), mask=column_mask & (pid_col == 0))
    partial += columns
    tl.store(partial + expert_ids[:, None] * dim + col_ids[None, :], acc_w_gate.to(out_dtype),
             mask=expert_mask[:, None] & col_mask[None, :] & first_block)
    partial += experts * dim
    tl.store(partial + expert_ids, acc_b_gate.to(out_dtype), mask=expert_mask & (pid_col == 0) & first_block)
    partial += experts
    tl.store(partial + pid_block * dim_out + col_ids, grad_scale.to(out_dtype), mask=out_mask)
