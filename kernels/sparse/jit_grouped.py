"""The Triton kernels of the sparse mixture's grouped design: the gate (logits, top-k, weights),
the grouped expert pass over assignments sorted by expert, the row combine with the epilogue,
and the backward's grouped input pass, row combine (dx, d logits) and weights pass. plan.py
makes their launches; op.py's docstring describes the design.

An assignment is one (row, slot) pair, numbered row * k + slot; `order` lists the assignments
sorted by expert (stable) and `counts` holds each expert's number of assignments. A grouped
program takes one tile of BLOCK_ROWS consecutive sorted assignments of one expert: expert e
owns tiles [sum_{e' < e} ceil(count_e' / BLOCK_ROWS), + ceil(count_e / BLOCK_ROWS)), so the
grid's size is bounded without reading the counts on the host (no device sync).

Widths: x, dx and their parts, w_down and w_gate have D columns; w_up [E, D_out, r], b_up,
scale, the residual, y, its parts and dy have D_out (= D for an adapter). SAME_WIDTH compiles
the D_out = D case with one width, as before width-changing mixtures existed. The combine
kernels walk one width only (the plan passes it as `dim`)."""

import triton
import triton.language as tl

from ..activations import activation as _activation
from ..activations import activation_grad as _activation_grad
from ..dropout import HIDDEN, INPUT, dropout_factor
from ..epilogue import epilogue, epilogue_scalars, scaled_grad


@triton.jit
def _expert_tile(pid, counts_ptr, experts, BLOCK_ROWS: tl.constexpr, BLOCK_EXPERTS: tl.constexpr):
    """(expert, sorted positions [BLOCK_ROWS] int64, mask) of grouped tile `pid`. Tiles past the
    last expert's get an empty mask (and expert E - 1, so that every address stays in bounds)."""
    expert_ids = tl.arange(0, BLOCK_EXPERTS)
    counts = tl.load(counts_ptr + expert_ids, mask=expert_ids < experts, other=0).to(tl.int32)
    tiles = (counts + BLOCK_ROWS - 1) // BLOCK_ROWS
    tile_end = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tile_end <= pid).to(tl.int32), axis=0)  # experts whose tiles all come before
    before = expert_ids < expert
    first_tile = tl.sum(tl.where(before, tiles, 0), axis=0)
    group_start = tl.sum(tl.where(before, counts, 0), axis=0)
    group_count = tl.sum(tl.where(expert_ids == expert, counts, 0), axis=0)  # 0 past the last expert
    offsets = (pid - first_tile) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    mask = offsets < group_count
    positions = group_start.to(tl.int64) + offsets
    return tl.minimum(expert, experts - 1).to(tl.int64), positions, mask


@triton.jit
def _expert_group(expert, counts_ptr, experts, BLOCK_EXPERTS: tl.constexpr):
    """(first sorted position, number of assignments) of `expert`."""
    expert_ids = tl.arange(0, BLOCK_EXPERTS)
    counts = tl.load(counts_ptr + expert_ids, mask=expert_ids < experts, other=0).to(tl.int32)
    group_start = tl.sum(tl.where(expert_ids < expert, counts, 0), axis=0)
    group_count = tl.sum(tl.where(expert_ids == expert, counts, 0), axis=0)
    return group_start, group_count


@triton.jit
def _sparse_gate_kernel(
    x_ptr, w_gate_ptr, b_gate_ptr, logits_ptr, idx_ptr, weights_ptr,
    rows, dim, experts, stride_x_row, stride_x_col,
    TOP_K: tl.constexpr, HAS_B_GATE: tl.constexpr, STORE_LOGITS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_EXPERTS: tl.constexpr,
):
    # This program's tile: rows [pid * BLOCK_ROWS, +BLOCK_ROWS): their logits [rows, E] (fp32,
    # ieee, as the dense design computes them), the chosen experts in descending order [rows, k]
    # (int32) and their softmax weights [rows, k] (fp32).
    pid = tl.program_id(0)
    row_ids = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_ids = row_ids.to(tl.int64)
    expert_ids = tl.arange(0, BLOCK_EXPERTS)
    expert_mask = expert_ids < experts
    logits = tl.zeros((BLOCK_ROWS, BLOCK_EXPERTS), dtype=tl.float32)
    for col_start in range(0, dim, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim
        x_tile = tl.load(x_ptr + row_ids[:, None] * stride_x_row + col_ids[None, :] * stride_x_col,
                         mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        w_gate_t = tl.load(w_gate_ptr + expert_ids[None, :] * dim + col_ids[:, None],
                           mask=col_mask[:, None] & expert_mask[None, :], other=0.0).to(tl.float32)
        logits = tl.dot(x_tile, w_gate_t, logits, input_precision="ieee")
    if HAS_B_GATE:
        logits += tl.load(b_gate_ptr + expert_ids, mask=expert_mask, other=0.0).to(tl.float32)[None, :]
    if STORE_LOGITS:
        tl.store(logits_ptr + row_ids[:, None] * experts + expert_ids[None, :], logits,
                 mask=row_mask[:, None] & expert_mask[None, :])
    logits = tl.where(expert_mask[None, :], logits, float("-inf"))
    top = tl.max(logits, axis=1)
    # Top-k: the largest remaining logit each round, the lowest expert index among equals; a NaN
    # logit ranks first, as torch.topk ranks it, so its row's weights come out NaN as the
    # reference's do (compared as NaN, it would never be chosen: a dead expert, silently). The
    # first walk finds the softmax denominator, the second (the same rounds) writes the slots.
    ranked = tl.where(logits != logits, float("inf"), logits)
    chosen = tl.zeros((BLOCK_ROWS, BLOCK_EXPERTS), dtype=tl.int1)
    for _ in tl.static_range(TOP_K):
        remaining = tl.where(chosen, float("-inf"), ranked)
        best = tl.max(remaining, axis=1)
        first = tl.min(tl.where(remaining == best[:, None], expert_ids[None, :], BLOCK_EXPERTS), axis=1)
        chosen = chosen | (expert_ids[None, :] == first[:, None])
    total = tl.sum(tl.where(chosen, tl.exp(logits - top[:, None]), 0.0), axis=1)
    chosen = tl.zeros((BLOCK_ROWS, BLOCK_EXPERTS), dtype=tl.int1)
    for slot in tl.static_range(TOP_K):
        remaining = tl.where(chosen, float("-inf"), ranked)
        best = tl.max(remaining, axis=1)
        first = tl.min(tl.where(remaining == best[:, None], expert_ids[None, :], BLOCK_EXPERTS), axis=1)
        chosen = chosen | (expert_ids[None, :] == first[:, None])
        tl.store(idx_ptr + row_ids * TOP_K + slot, first, mask=row_mask)
        tl.store(weights_ptr + row_ids * TOP_K + slot, tl.exp(best - top) / total, mask=row_mask)


@triton.jit
def _grouped_forward_kernel(
    x_ptr, order_ptr, counts_ptr, weights_ptr, w_down_ptr, b_down_ptr, w_up_ptr, b_up_ptr, scale_ptr,
    residual_ptr, row_scale_ptr, out_ptr, hidden_ptr, seed_ptr,
    dim, dim_out, rank, experts, scale_value, dropout_p, dropout_keep, input_dropout_p, input_dropout_keep,
    stride_x_row, stride_x_col, stride_res_row, stride_res_col,
    TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_B_DOWN: tl.constexpr,
    HAS_B_UP: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ADD_INPUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    SAVE: tl.constexpr, SINGLE: tl.constexpr, SAME_WIDTH: tl.constexpr, HIDDEN_DROPOUT: tl.constexpr,
    INPUT_DROPOUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_RANK: tl.constexpr, BLOCK_EXPERTS: tl.constexpr,
):
    # This program's tile: BLOCK_ROWS sorted assignments of one expert e, whose rows of x it
    # gathers: h = x W_down[e]^T + b_down[e] (saved by sorted position), then, per D_out tile,
    # p * (act(h) W_up[e]^T + b_up[e]). With k = 1 (SINGLE) each row has one assignment and
    # the epilogue writes y here; otherwise the weighted expert output goes to parts [M*k, D_out]
    # by assignment, for the row combine.
    if SAME_WIDTH:
        dim_out = dim
    expert, positions, mask = _expert_tile(tl.program_id(0), counts_ptr, experts, BLOCK_ROWS, BLOCK_EXPERTS)
    assignment = tl.load(order_ptr + positions, mask=mask, other=0).to(tl.int64)
    token = assignment // TOP_K
    dtype = COMPUTE_DTYPE
    weight = tl.load(weights_ptr + assignment, mask=mask, other=0.0).to(dtype).to(tl.float32)
    rank_ids = tl.arange(0, BLOCK_RANK)
    rank_mask = rank_ids < rank
    w_down_e = w_down_ptr + expert * rank * dim
    w_up_e = w_up_ptr + expert * dim_out * rank

    hidden = tl.zeros((BLOCK_ROWS, BLOCK_RANK), dtype=tl.float32)
    for col_start in range(0, dim, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim
        x_tile = tl.load(x_ptr + token[:, None] * stride_x_row + col_ids[None, :] * stride_x_col,
                         mask=mask[:, None] & col_mask[None, :], other=0.0)
        if INPUT_DROPOUT:  # the mask of (row, feature): each of a row's k experts reads the same dropout(x)
            # The seed loaded where a mask is drawn, not held across the loop (held: rank 256 fp16
            # spilled 8 bytes on sm_90 with both dropouts).
            x_tile = x_tile.to(tl.float32) * dropout_factor(tl.load(seed_ptr), token, col_ids, input_dropout_p,
                                                            input_dropout_keep, INPUT)
        w_down_t = tl.load(w_down_e + rank_ids[None, :] * dim + col_ids[:, None],
                           mask=col_mask[:, None] & rank_mask[None, :], other=0.0).to(dtype)
        hidden = tl.dot(x_tile.to(dtype), w_down_t, hidden, input_precision=INPUT_PRECISION)
    if HAS_B_DOWN:
        hidden += tl.load(b_down_ptr + expert * rank + rank_ids, mask=rank_mask, other=0.0).to(dtype).to(
            tl.float32)[None, :]
    hidden = hidden.to(dtype)  # rounded as F.linear's output is; the backward recomputes from it
    if SAVE:
        tl.store(hidden_ptr + positions[:, None] * rank + rank_ids[None, :], hidden,
                 mask=mask[:, None] & rank_mask[None, :])
    act = _activation(hidden.to(tl.float32), ACTIVATION).to(dtype)
    if HIDDEN_DROPOUT:  # the mask of (row, e * r + j), as the dense design draws it; not stored
        keep = dropout_factor(tl.load(seed_ptr), token, expert * rank + rank_ids, dropout_p, dropout_keep, HIDDEN)
        act = (act.to(tl.float32) * keep).to(dtype)
    if SINGLE:
        row_scale, scalar_scale = epilogue_scalars(row_scale_ptr, scale_ptr, token, mask, scale_value, dtype,
                                                   SCALE_MODE, HAS_ROW_SCALE, BLOCK_ROWS)

    for col_start in range(0, dim_out, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim_out
        tile_mask = mask[:, None] & col_mask[None, :]
        w_up_t = tl.load(w_up_e + col_ids[None, :] * rank + rank_ids[:, None],
                         mask=rank_mask[:, None] & col_mask[None, :], other=0.0).to(dtype)
        update = tl.dot(act, w_up_t, input_precision=INPUT_PRECISION)
        if HAS_B_UP:
            update += tl.load(b_up_ptr + expert * dim_out + col_ids, mask=col_mask, other=0.0).to(dtype).to(
                tl.float32)[None, :]
        # The expert's output in the compute dtype, times its weight (as the expert loop rounds them).
        update = (update.to(dtype).to(tl.float32) * weight[:, None]).to(dtype).to(tl.float32)
        if SINGLE:
            update = epilogue(update, x_ptr, residual_ptr, scale_ptr, token, col_ids, col_mask, tile_mask,
                              row_scale, scalar_scale, stride_x_row, stride_x_col, stride_res_row, stride_res_col,
                              SCALE_MODE, HAS_ROW_SCALE, ADD_INPUT, HAS_RESIDUAL)
            tl.store(out_ptr + token[:, None] * dim_out + col_ids[None, :], update.to(out_ptr.dtype.element_ty),
                     mask=tile_mask)
        else:
            tl.store(out_ptr + assignment[:, None] * dim_out + col_ids[None, :],
                     update.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _grouped_combine_kernel(
    parts_ptr, x_ptr, scale_ptr, residual_ptr, row_scale_ptr, y_ptr,
    rows, dim, scale_value, stride_x_row, stride_x_col, stride_res_row, stride_res_col,
    TOP_K: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ADD_INPUT: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr,
):
    # This program's tile: rows [pid_row * BLOCK_ROWS, +BLOCK_ROWS) x columns [pid_col * BLOCK_DIM,
    # +BLOCK_DIM): u = the sum of the rows' k weighted expert outputs, then the epilogue.
    row_ids = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_ids = row_ids.to(tl.int64)
    col_ids = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    col_mask = col_ids < dim
    tile_mask = row_mask[:, None] & col_mask[None, :]
    update = tl.zeros((BLOCK_ROWS, BLOCK_DIM), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        update += tl.load(parts_ptr + (row_ids * TOP_K + slot)[:, None] * dim + col_ids[None, :], mask=tile_mask,
                          other=0.0).to(tl.float32)
    update = update.to(COMPUTE_DTYPE).to(tl.float32)  # the mixed output in the compute dtype
    row_scale, scalar_scale = epilogue_scalars(row_scale_ptr, scale_ptr, row_ids, row_mask, scale_value,
                                               COMPUTE_DTYPE, SCALE_MODE, HAS_ROW_SCALE, BLOCK_ROWS)
    update = epilogue(update, x_ptr, residual_ptr, scale_ptr, row_ids, col_ids, col_mask, tile_mask, row_scale,
                      scalar_scale, stride_x_row, stride_x_col, stride_res_row, stride_res_col,
                      SCALE_MODE, HAS_ROW_SCALE, ADD_INPUT, HAS_RESIDUAL)
    tl.store(y_ptr + row_ids[:, None] * dim + col_ids[None, :], update.to(y_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _grouped_backward_input_kernel(
    grad_y_ptr, order_ptr, counts_ptr, weights_ptr, hidden_ptr, w_down_ptr, w_up_ptr, b_up_ptr, scale_ptr,
    row_scale_ptr, grad_hidden_ptr, grad_weights_ptr, out_ptr, seed_ptr,
    dim, dim_out, rank, experts, scale_value, dropout_p, dropout_keep, input_dropout_p, input_dropout_keep,
    stride_g_row, stride_g_col,
    TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_B_UP: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr, SINGLE: tl.constexpr, COMPUTE_DX: tl.constexpr, ADD_GRAD_Y: tl.constexpr,
    SAME_WIDTH: tl.constexpr, HIDDEN_DROPOUT: tl.constexpr, INPUT_DROPOUT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_RANK: tl.constexpr, BLOCK_EXPERTS: tl.constexpr,
):
    # This program's tile: BLOCK_ROWS sorted assignments of one expert e. With g = dy * row_scale
    # * scale of each assignment's row: d act = p g W_up[e] and d p = g . (act W_up[e]^T + b_up[e])
    # (reduced over D_out), dh = d act * act'(h) (saved by sorted position for the weights pass),
    # then dx's share dh W_down[e] per D tile: dx itself with k = 1 (SINGLE, plus dy when x is a
    # residual term), else parts [M*k, D] by assignment for the row combine.
    if SAME_WIDTH:
        dim_out = dim
    expert, positions, mask = _expert_tile(tl.program_id(0), counts_ptr, experts, BLOCK_ROWS, BLOCK_EXPERTS)
    assignment = tl.load(order_ptr + positions, mask=mask, other=0).to(tl.int64)
    token = assignment // TOP_K
    dtype = COMPUTE_DTYPE
    weight = tl.load(weights_ptr + assignment, mask=mask, other=0.0).to(dtype).to(tl.float32)
    rank_ids = tl.arange(0, BLOCK_RANK)
    rank_mask = rank_ids < rank
    w_down_e = w_down_ptr + expert * rank * dim
    w_up_e = w_up_ptr + expert * dim_out * rank
    row_scale, scalar_scale = epilogue_scalars(row_scale_ptr, scale_ptr, token, mask, scale_value, dtype,
                                               SCALE_MODE, HAS_ROW_SCALE, BLOCK_ROWS)
    if HIDDEN_DROPOUT or INPUT_DROPOUT:
        seed = tl.load(seed_ptr)

    grad_act = tl.zeros((BLOCK_ROWS, BLOCK_RANK), dtype=tl.float32)
    grad_weight = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for col_start in range(0, dim_out, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim_out
        grad = scaled_grad(grad_y_ptr, scale_ptr, token, mask, col_ids, col_mask, row_scale, scalar_scale,
                           stride_g_row, stride_g_col, SCALE_MODE, HAS_ROW_SCALE)
        w_up_tile = tl.load(w_up_e + col_ids[:, None] * rank + rank_ids[None, :],
                            mask=col_mask[:, None] & rank_mask[None, :], other=0.0).to(dtype)
        grad_act = tl.dot(grad.to(dtype), w_up_tile, grad_act, input_precision=INPUT_PRECISION)
        if HAS_B_UP:
            b_up_tile = tl.load(b_up_ptr + expert * dim_out + col_ids, mask=col_mask, other=0.0).to(dtype).to(
                tl.float32)
            grad_weight += tl.sum(grad * b_up_tile[None, :], axis=1)

    hidden_mask = mask[:, None] & rank_mask[None, :]
    hidden = tl.load(hidden_ptr + positions[:, None] * rank + rank_ids[None, :], mask=hidden_mask,
                     other=0.0).to(tl.float32)
    act = _activation(hidden, ACTIVATION).to(dtype).to(tl.float32)
    if HIDDEN_DROPOUT:
        # The forward's mask, from the same seed: d p sees the dropped act the forward rounded,
        # and d act reaches h only through kept units (scaled by 1 / (1 - p)): a dropped unit's dh is 0.
        keep = dropout_factor(seed, token, expert * rank + rank_ids, dropout_p, dropout_keep, HIDDEN)
        act = (act * keep).to(dtype).to(tl.float32)
    grad_weight += tl.sum(grad_act * act, axis=1)
    tl.store(grad_weights_ptr + assignment, grad_weight, mask=mask)
    if HIDDEN_DROPOUT:
        grad_act = grad_act * keep
    grad_hidden = (grad_act * weight[:, None] * _activation_grad(hidden, ACTIVATION)).to(dtype)
    tl.store(grad_hidden_ptr + positions[:, None] * rank + rank_ids[None, :], grad_hidden, mask=hidden_mask)

    if COMPUTE_DX:
        for col_start in range(0, dim, BLOCK_DIM):
            col_ids = col_start + tl.arange(0, BLOCK_DIM)
            col_mask = col_ids < dim
            tile_mask = mask[:, None] & col_mask[None, :]
            w_down_tile = tl.load(w_down_e + rank_ids[:, None] * dim + col_ids[None, :],
                                  mask=rank_mask[:, None] & col_mask[None, :], other=0.0).to(dtype)
            grad_x = tl.dot(grad_hidden, w_down_tile, input_precision=INPUT_PRECISION)
            if INPUT_DROPOUT:  # the down projection read dropout(x): this share of dx takes the mask
                grad_x = grad_x * dropout_factor(seed, token, col_ids, input_dropout_p, input_dropout_keep, INPUT)
            if SINGLE:
                if ADD_GRAD_Y:  # x is a residual term: its gradient dy joins dx in this store
                    grad_x += tl.load(grad_y_ptr + token[:, None] * stride_g_row + col_ids[None, :] * stride_g_col,
                                      mask=tile_mask, other=0.0).to(tl.float32)
                tl.store(out_ptr + token[:, None] * dim + col_ids[None, :], grad_x.to(out_ptr.dtype.element_ty),
                         mask=tile_mask)
            else:
                tl.store(out_ptr + assignment[:, None] * dim + col_ids[None, :],
                         grad_x.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _grouped_backward_combine_kernel(
    grad_y_ptr, grad_logits_ptr, parts_ptr, idx_ptr, weights_ptr, grad_weights_ptr, w_gate_ptr, grad_gate_ptr,
    grad_x_ptr, rows, dim, experts, stride_g_row, stride_g_col,
    TOP_K: tl.constexpr, GATED: tl.constexpr, HAS_GRAD_LOGITS: tl.constexpr, COMPUTE_DX: tl.constexpr,
    ADD_GRAD_Y: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_EXPERTS: tl.constexpr,
):
    # This program's tile: rows [pid * BLOCK_ROWS, +BLOCK_ROWS). Gated form: d logits [rows, E]
    # from the slots' d p through the softmax over the chosen logits (plus the logits' own
    # gradient), written for the weights pass. Then dx = the sum of the rows' k shares +
    # d logits W_gate (+ dy when x is a residual term), per D tile.
    row_ids = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_ids = row_ids.to(tl.int64)
    expert_ids = tl.arange(0, BLOCK_EXPERTS)
    expert_mask = expert_ids < experts
    expert_tile_mask = row_mask[:, None] & expert_mask[None, :]
    if GATED:
        weighted = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        for slot in tl.static_range(TOP_K):
            weighted += (tl.load(weights_ptr + row_ids * TOP_K + slot, mask=row_mask, other=0.0)
                         * tl.load(grad_weights_ptr + row_ids * TOP_K + slot, mask=row_mask, other=0.0))
        # d logit_e = p_e (d p_e - sum_j p_j d p_j) for the chosen experts, 0 for the others.
        grad_logits = tl.zeros((BLOCK_ROWS, BLOCK_EXPERTS), dtype=tl.float32)
        for slot in tl.static_range(TOP_K):
            slot_expert = tl.load(idx_ptr + row_ids * TOP_K + slot, mask=row_mask, other=-1)
            slot_weight = tl.load(weights_ptr + row_ids * TOP_K + slot, mask=row_mask, other=0.0)
            slot_grad = tl.load(grad_weights_ptr + row_ids * TOP_K + slot, mask=row_mask, other=0.0)
            grad_logits += tl.where(expert_ids[None, :] == slot_expert[:, None],
                                    (slot_weight * (slot_grad - weighted))[:, None], 0.0)
        if HAS_GRAD_LOGITS:
            grad_logits += tl.load(grad_logits_ptr + row_ids[:, None] * experts + expert_ids[None, :],
                                   mask=expert_tile_mask, other=0.0).to(tl.float32)
        tl.store(grad_gate_ptr + row_ids[:, None] * experts + expert_ids[None, :], grad_logits,
                 mask=expert_tile_mask)
    if COMPUTE_DX:
        for col_start in range(0, dim, BLOCK_DIM):
            col_ids = col_start + tl.arange(0, BLOCK_DIM)
            col_mask = col_ids < dim
            tile_mask = row_mask[:, None] & col_mask[None, :]
            grad_x = tl.zeros((BLOCK_ROWS, BLOCK_DIM), dtype=tl.float32)
            for slot in tl.static_range(TOP_K):
                grad_x += tl.load(parts_ptr + (row_ids * TOP_K + slot)[:, None] * dim + col_ids[None, :],
                                  mask=tile_mask, other=0.0).to(tl.float32)
            if GATED:  # the gate is fp32: its share of dx is exact fp32
                w_gate_tile = tl.load(w_gate_ptr + expert_ids[:, None] * dim + col_ids[None, :],
                                      mask=expert_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
                grad_x = tl.dot(grad_logits, w_gate_tile, grad_x, input_precision="ieee")
            if ADD_GRAD_Y:
                grad_x += tl.load(grad_y_ptr + row_ids[:, None] * stride_g_row + col_ids[None, :] * stride_g_col,
                                  mask=tile_mask, other=0.0).to(tl.float32)
            tl.store(grad_x_ptr + row_ids[:, None] * dim + col_ids[None, :], grad_x.to(grad_x_ptr.dtype.element_ty),
                     mask=tile_mask)


@triton.jit
def _grouped_backward_weights_kernel(
    grad_y_ptr, x_ptr, order_ptr, counts_ptr, weights_ptr, hidden_ptr, grad_hidden_ptr, grad_gate_ptr,
    w_up_ptr, b_up_ptr, scale_ptr, row_scale_ptr, packed_ptr, gate_partials_ptr, seed_ptr,
    rows, dim, dim_out, rank, experts, scale_value, rows_per_gate_chunk, dropout_p, dropout_keep, input_dropout_p,
    input_dropout_keep, stride_g_row, stride_g_col, stride_x_row, stride_x_col,
    TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_B_UP: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr, SAME_WIDTH: tl.constexpr, HIDDEN_DROPOUT: tl.constexpr,
    INPUT_DROPOUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_RANK: tl.constexpr, BLOCK_EXPERTS: tl.constexpr,
):
    # Programs (e < E, D tile, rank block): expert e's gradients for columns [pid_col *
    # BLOCK_DIM, +BLOCK_DIM) and ranks [pid_rank * BLOCK_RANK, +BLOCK_RANK), summed in order over
    # its sorted assignments: each is owned by one program, so they are written to the packed
    # gradients directly (no partials, deterministic); its share of dscale goes to its own row.
    # Programs (E + c, D tile, rank block 0), gated form only: the gate's gradients
    # d logits^T x over row chunk c, as fp32 partials that torch sums. The column tiles are x's
    # (D: w_down, the gate) and dy's (D_out: w_up, b_up, scale); the grid covers the wider, each
    # side masks the other's extra columns (SAME_WIDTH: one width and one mask).
    pid_group = tl.program_id(0)
    pid_rank = tl.program_id(2)
    first_rank_block = pid_rank == 0
    col_ids = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    col_mask = col_ids < dim
    gate_program = first_rank_block
    if SAME_WIDTH:
        dim_out = dim
        out_mask = col_mask
    else:
        out_mask = col_ids < dim_out
        # The gate's share is x's columns: its programs on tiles past D have nothing to do.
        gate_program = gate_program & (tl.program_id(1) * BLOCK_DIM < dim)
    first_col_tile = tl.program_id(1) == 0
    dtype = COMPUTE_DTYPE
    if pid_group < experts:
        expert = pid_group.to(tl.int64)
        group_start, group_count = _expert_group(pid_group, counts_ptr, experts, BLOCK_EXPERTS)
        rank_ids = pid_rank * BLOCK_RANK + tl.arange(0, BLOCK_RANK)
        rank_mask = rank_ids < rank
        # With g = dy * row_scale and the expert's weighted output p (act W_up^T + b_up):
        # ga = g^T (p act) and gp = g^T p give dw_up = scale * ga, db_up = scale * gp and this
        # expert's share of dscale, rowsum(W_up[e] * ga) + b_up[e] * gp.
        acc_ga = tl.zeros((BLOCK_DIM, BLOCK_RANK), dtype=tl.float32)
        acc_gp = tl.zeros((BLOCK_DIM,), dtype=tl.float32)
        acc_w_down = tl.zeros((BLOCK_RANK, BLOCK_DIM), dtype=tl.float32)
        acc_b_down = tl.zeros((BLOCK_RANK,), dtype=tl.float32)
        if HIDDEN_DROPOUT or INPUT_DROPOUT:
            seed = tl.load(seed_ptr)
        for start in range(0, group_count, BLOCK_ROWS):
            offsets = start + tl.arange(0, BLOCK_ROWS)
            mask = offsets < group_count
            positions = group_start.to(tl.int64) + offsets
            assignment = tl.load(order_ptr + positions, mask=mask, other=0).to(tl.int64)
            token = assignment // TOP_K
            weight = tl.load(weights_ptr + assignment, mask=mask, other=0.0).to(dtype).to(tl.float32)
            tile_mask = mask[:, None] & col_mask[None, :]
            hidden_mask = mask[:, None] & rank_mask[None, :]
            grad = tl.load(grad_y_ptr + token[:, None] * stride_g_row + col_ids[None, :] * stride_g_col,
                           mask=mask[:, None] & out_mask[None, :], other=0.0).to(tl.float32)
            if HAS_ROW_SCALE:
                row_scale = tl.load(row_scale_ptr + token, mask=mask, other=0.0).to(dtype).to(tl.float32)
                grad = grad * row_scale[:, None]
            hidden = tl.load(hidden_ptr + positions[:, None] * rank + rank_ids[None, :], mask=hidden_mask,
                             other=0.0).to(tl.float32)
            act = _activation(hidden, ACTIVATION).to(dtype).to(tl.float32)
            if HIDDEN_DROPOUT:  # dw_up = g^T (p dropout(act)): the forward's mask and rounding
                act = (act * dropout_factor(seed, token, expert * rank + rank_ids, dropout_p, dropout_keep,
                                            HIDDEN)).to(dtype).to(tl.float32)
            act = (act * weight[:, None]).to(dtype)
            acc_ga = tl.dot(tl.trans(grad.to(dtype)), act, acc_ga, input_precision=INPUT_PRECISION)
            acc_gp += tl.sum(grad * weight[:, None], axis=0)
            grad_hidden = tl.load(grad_hidden_ptr + positions[:, None] * rank + rank_ids[None, :],
                                  mask=hidden_mask, other=0.0)
            acc_b_down += tl.sum(grad_hidden.to(tl.float32), axis=0)
            x_tile = tl.load(x_ptr + token[:, None] * stride_x_row + col_ids[None, :] * stride_x_col,
                             mask=tile_mask, other=0.0)
            if INPUT_DROPOUT:  # dw_down = dh^T dropout(x): the forward's mask (the gate's programs read x)
                x_tile = x_tile.to(tl.float32) * dropout_factor(seed, token, col_ids, input_dropout_p,
                                                                input_dropout_keep, INPUT)
            acc_w_down = tl.dot(tl.trans(grad_hidden), x_tile.to(dtype), acc_w_down,
                                input_precision=INPUT_PRECISION)

        if SCALE_MODE == "channel":
            col_scale = tl.load(scale_ptr + col_ids, mask=out_mask, other=0.0).to(tl.float32)
        elif SCALE_MODE == "tensor":
            col_scale = tl.full((BLOCK_DIM,), 1.0, tl.float32) * tl.load(scale_ptr).to(tl.float32)
        else:
            col_scale = tl.full((BLOCK_DIM,), 1.0, tl.float32) * scale_value
        up_mask = out_mask[:, None] & rank_mask[None, :]
        w_up_tile = tl.load(w_up_ptr + expert * dim_out * rank + col_ids[:, None] * rank + rank_ids[None, :],
                            mask=up_mask, other=0.0)
        grad_scale = tl.sum(w_up_tile.to(dtype).to(tl.float32) * acc_ga, axis=1)
        if HAS_B_UP:
            b_up_tile = tl.load(b_up_ptr + expert * dim_out + col_ids, mask=out_mask & first_rank_block, other=0.0)
            grad_scale += b_up_tile.to(dtype).to(tl.float32) * acc_gp

        # The packed layout of plan.grad_layout with one dscale row per (expert, rank block):
        # [dw_up (E x D_out x r) | dw_down (E x r x D) | db_up (E x D_out) | db_down (E x r) |
        #  dw_gate (E x D) | db_gate (E) | dscale (E x blocks x D_out)]; the gate's two are filled
        # from its partials.
        out_dtype = packed_ptr.dtype.element_ty
        columns = experts * rank
        packed = packed_ptr
        tl.store(packed + expert * dim_out * rank + col_ids[:, None] * rank + rank_ids[None, :],
                 (acc_ga * col_scale[:, None]).to(out_dtype), mask=up_mask)
        packed += columns * dim_out
        tl.store(packed + expert * rank * dim + rank_ids[:, None] * dim + col_ids[None, :], acc_w_down.to(out_dtype),
                 mask=rank_mask[:, None] & col_mask[None, :])
        packed += columns * dim
        tl.store(packed + expert * dim_out + col_ids, (acc_gp * col_scale).to(out_dtype),
                 mask=out_mask & first_rank_block)
        packed += experts * dim_out
        tl.store(packed + expert * rank + rank_ids, acc_b_down.to(out_dtype), mask=rank_mask & first_col_tile)
        packed += columns + experts * dim + experts
        tl.store(packed + (expert * tl.num_programs(2) + pid_rank) * dim_out + col_ids, grad_scale.to(out_dtype),
                 mask=out_mask)
    elif gate_program:
        chunk = pid_group - experts
        expert_ids = tl.arange(0, BLOCK_EXPERTS)
        expert_mask = expert_ids < experts
        acc_w_gate = tl.zeros((BLOCK_EXPERTS, BLOCK_DIM), dtype=tl.float32)
        acc_b_gate = tl.zeros((BLOCK_EXPERTS,), dtype=tl.float32)
        first_row = chunk * rows_per_gate_chunk
        for start in range(first_row, first_row + rows_per_gate_chunk, BLOCK_ROWS):
            row_ids = start + tl.arange(0, BLOCK_ROWS)
            row_mask = (row_ids < rows) & (row_ids < first_row + rows_per_gate_chunk)
            row_ids = row_ids.to(tl.int64)
            grad_logits = tl.load(grad_gate_ptr + row_ids[:, None] * experts + expert_ids[None, :],
                                  mask=row_mask[:, None] & expert_mask[None, :], other=0.0)
            x_tile = tl.load(x_ptr + row_ids[:, None] * stride_x_row + col_ids[None, :] * stride_x_col,
                             mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
            acc_w_gate = tl.dot(tl.trans(grad_logits), x_tile, acc_w_gate, input_precision="ieee")
            acc_b_gate += tl.sum(grad_logits, axis=0)
        partial = gate_partials_ptr + chunk.to(tl.int64) * (experts * dim + experts)
        tl.store(partial + expert_ids[:, None] * dim + col_ids[None, :], acc_w_gate,
                 mask=expert_mask[:, None] & col_mask[None, :])
        tl.store(partial + experts * dim + expert_ids, acc_b_gate, mask=expert_mask & first_col_tile)
