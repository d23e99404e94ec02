"""The Triton kernels of AdapterFusion's scores, in rank space (op.py's docstring derives them):
the forward writes the fusion probabilities p [M, N]; the backward writes the rank-space
gradient [d hidden | d query | d scores] that two GEMMs turn into dx and the weight gradients.

Per row tile they hold fp32 accumulators of the adapters' stacked pre-activations
h = x W_down^T [rows, N*r], the query of each hidden unit g = x W_query_hidden^T [rows, N*r] and
(forward) the query of each adapter's bias term t = x W_query_bias^T [rows, N]; the score of
adapter i is the sum over its r columns of act(h) * (g + b), plus t_i + b_i.

With dropout, act(h) is the dropped act(h) * keep (keep: 1 / (1 - p) or 0, the HIDDEN stream at
stacked column c = i * r + j, as the mixture kernel draws it for the same rows): the mask the
backward draws again from the seed, so nothing of it is saved.
"""

import triton
import triton.language as tl

from ..activations import activation as _activation
from ..activations import activation_grad as _activation_grad
from ..dropout import HIDDEN, dropout_factor


@triton.jit
def _adapter_columns(column_ids, column_mask, adapter_ids, rank, BLOCK_ADAPTERS: tl.constexpr):
    """[BLOCK_COLUMNS, BLOCK_ADAPTERS] fp32: 1 where stacked column c belongs to adapter i."""
    owner = tl.where(column_mask, column_ids // rank, BLOCK_ADAPTERS)
    return (owner[:, None] == adapter_ids[None, :]).to(tl.float32)


@triton.jit
def _projections(x_ptr, w_down_ptr, w_query_hidden_ptr, row_ids, row_mask, column_ids, column_mask, dim,
                 stride_x_row, stride_x_col, COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, COLUMNS: tl.constexpr):
    """x W_down^T and x W_query_hidden^T at the stacked columns column_ids, for one row tile (fp32,
    no biases): one sweep over D, every x tile feeding both dots."""
    dtype = COMPUTE_DTYPE
    hidden = tl.zeros((BLOCK_ROWS, COLUMNS), dtype=tl.float32)
    query = tl.zeros((BLOCK_ROWS, COLUMNS), dtype=tl.float32)
    for col_start in range(0, dim, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim
        x_tile = tl.load(
            x_ptr + row_ids[:, None] * stride_x_row + col_ids[None, :] * stride_x_col,
            mask=row_mask[:, None] & col_mask[None, :], other=0.0,
        ).to(dtype)
        # [D tile, columns] views of the [N*r, D] stacked weights.
        stacked_mask = col_mask[:, None] & column_mask[None, :]
        w_down_t = tl.load(w_down_ptr + column_ids[None, :] * dim + col_ids[:, None], mask=stacked_mask,
                           other=0.0).to(dtype)
        w_query_t = tl.load(w_query_hidden_ptr + column_ids[None, :] * dim + col_ids[:, None], mask=stacked_mask,
                            other=0.0).to(dtype)
        hidden = tl.dot(x_tile, w_down_t, hidden, input_precision=INPUT_PRECISION)
        query = tl.dot(x_tile, w_query_t, query, input_precision=INPUT_PRECISION)
    return hidden, query


@triton.jit
def _fusion_scores_kernel(
    x_ptr, w_down_ptr, b_down_ptr, w_query_hidden_ptr, b_query_hidden_ptr, w_query_bias_ptr, b_query_bias_ptr,
    probs_ptr, seed_ptr,
    rows, dim, rank, adapters, inv_temperature, dropout_p, dropout_keep,
    stride_x_row, stride_x_col,
    ACTIVATION: tl.constexpr, HAS_B_DOWN: tl.constexpr, HIDDEN_DROPOUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_ADAPTERS: tl.constexpr,
    BLOCK_COLUMNS: tl.constexpr, CHUNK_COLUMNS: tl.constexpr,
):
    # This program's tile: rows [pid * BLOCK_ROWS, +BLOCK_ROWS), every adapter: p [rows, N].
    pid = tl.program_id(0)
    row_ids = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_ids = row_ids.to(tl.int64)  # M * D may pass 2^31
    adapter_ids = tl.arange(0, BLOCK_ADAPTERS)
    adapter_mask = adapter_ids < adapters
    dtype = COMPUTE_DTYPE
    if HIDDEN_DROPOUT:
        seed = tl.load(seed_ptr)

    # The bias terms' queries x . f_i, one sweep over D.
    scores = tl.zeros((BLOCK_ROWS, BLOCK_ADAPTERS), dtype=tl.float32)
    for col_start in range(0, dim, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim
        x_tile = tl.load(x_ptr + row_ids[:, None] * stride_x_row + col_ids[None, :] * stride_x_col,
                         mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(dtype)
        w_bias_t = tl.load(w_query_bias_ptr + adapter_ids[None, :] * dim + col_ids[:, None],
                           mask=col_mask[:, None] & adapter_mask[None, :], other=0.0).to(dtype)
        scores = tl.dot(x_tile, w_bias_t, scores, input_precision=INPUT_PRECISION)
    scores += tl.load(b_query_bias_ptr + adapter_ids, mask=adapter_mask, other=0.0)[None, :]

    # The hidden units' terms, CHUNK_COLUMNS stacked columns (column c: rank c % r of adapter
    # c // r) at a time: two [rows, chunk] accumulators per sweep over D instead of two
    # [rows, N r] ones, which spilled 0.8-5 KB at N r = 256 at every tile tried on sm_80 and
    # sm_90. The later sweeps read x again from L2 (its row tile is BLOCK_ROWS x D).
    for chunk_start in tl.static_range(0, BLOCK_COLUMNS, CHUNK_COLUMNS):
        column_ids = chunk_start + tl.arange(0, CHUNK_COLUMNS)
        column_mask = column_ids < adapters * rank
        hidden, query = _projections(x_ptr, w_down_ptr, w_query_hidden_ptr, row_ids, row_mask, column_ids,
                                     column_mask, dim, stride_x_row, stride_x_col, COMPUTE_DTYPE, INPUT_PRECISION,
                                     BLOCK_ROWS, BLOCK_DIM, CHUNK_COLUMNS)
        if HAS_B_DOWN:
            hidden += tl.load(b_down_ptr + column_ids, mask=column_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
        # Rounded as F.linear's output is, and as the mixture kernel rounds the same pre-activation.
        act = _activation(hidden.to(dtype).to(tl.float32), ACTIVATION)
        if HIDDEN_DROPOUT:  # the scores read the dropped act(h) the mixture reads
            act = act * dropout_factor(seed, row_ids, column_ids, dropout_p, dropout_keep, HIDDEN)
        query += tl.load(b_query_hidden_ptr + column_ids, mask=column_mask, other=0.0)[None, :]
        # Each adapter's columns summed by a 0/1 matrix on tensor cores: "tf32x3" splits the fp32
        # products in three tf32 parts (about fp32's precision; the 0/1 matrix is exact).
        scores = tl.dot(act * query, _adapter_columns(column_ids, column_mask, adapter_ids, rank, BLOCK_ADAPTERS),
                        scores, input_precision="tf32x3")

    scores = tl.where(adapter_mask[None, :], scores * inv_temperature, float("-inf"))
    top = tl.max(scores, axis=1)
    probs = tl.exp(scores - top[:, None])
    probs = probs / tl.sum(probs, axis=1)[:, None]
    tl.store(probs_ptr + row_ids[:, None] * adapters + adapter_ids[None, :], probs,
             mask=row_mask[:, None] & adapter_mask[None, :])


@triton.jit
def _fusion_scores_backward_kernel(
    x_ptr, probs_ptr, grad_probs_ptr, w_down_ptr, b_down_ptr, w_query_hidden_ptr, b_query_hidden_ptr, grad_rank_ptr,
    seed_ptr,
    rows, dim, rank, adapters, inv_temperature, dropout_p, dropout_keep,
    stride_x_row, stride_x_col, stride_gp_row, stride_gp_col,
    ACTIVATION: tl.constexpr, HAS_B_DOWN: tl.constexpr, HIDDEN_DROPOUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_ADAPTERS: tl.constexpr,
    BLOCK_COLUMNS: tl.constexpr,
):
    # This program's tile: rows [pid * BLOCK_ROWS, +BLOCK_ROWS) of the rank-space gradient
    # [d hidden (N*r) | d query (N*r) | d scores (N)], recomputed from x (nothing N*r saved).
    pid = tl.program_id(0)
    row_ids = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_ids = row_ids.to(tl.int64)
    adapter_ids = tl.arange(0, BLOCK_ADAPTERS)
    adapter_mask = adapter_ids < adapters
    column_ids = tl.arange(0, BLOCK_COLUMNS)
    columns = adapters * rank
    column_mask = column_ids < columns
    dtype = COMPUTE_DTYPE

    hidden, query = _projections(x_ptr, w_down_ptr, w_query_hidden_ptr, row_ids, row_mask, column_ids, column_mask,
                                 dim, stride_x_row, stride_x_col, COMPUTE_DTYPE, INPUT_PRECISION, BLOCK_ROWS,
                                 BLOCK_DIM, BLOCK_COLUMNS)
    if HAS_B_DOWN:
        hidden += tl.load(b_down_ptr + column_ids, mask=column_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    hidden = hidden.to(dtype).to(tl.float32)
    query += tl.load(b_query_hidden_ptr + column_ids, mask=column_mask, other=0.0)[None, :]

    # The softmax's backward: ds_i = p_i (dp_i - sum_j p_j dp_j) / T.
    adapter_tile = row_mask[:, None] & adapter_mask[None, :]
    probs = tl.load(probs_ptr + row_ids[:, None] * adapters + adapter_ids[None, :], mask=adapter_tile, other=0.0)
    grad_probs = tl.load(grad_probs_ptr + row_ids[:, None] * stride_gp_row + adapter_ids[None, :] * stride_gp_col,
                         mask=adapter_tile, other=0.0).to(tl.float32)
    grad_scores = probs * (grad_probs - tl.sum(probs * grad_probs, axis=1)[:, None]) * inv_temperature
    # Each adapter's d score spread over its r columns (exact: one term per column).
    columns_of = _adapter_columns(column_ids, column_mask, adapter_ids, rank, BLOCK_ADAPTERS)
    column_grads = tl.dot(grad_scores, tl.trans(columns_of), input_precision="ieee")
    if HIDDEN_DROPOUT:  # the forward's mask from the same seed: a dropped unit passes no gradient
        column_grads = column_grads * dropout_factor(tl.load(seed_ptr), row_ids, column_ids, dropout_p, dropout_keep,
                                                     HIDDEN)
    grad_query = column_grads * _activation(hidden, ACTIVATION)
    grad_hidden = column_grads * query * _activation_grad(hidden, ACTIVATION)

    width = 2 * columns + adapters
    out = grad_rank_ptr + row_ids[:, None] * width
    out_ty = grad_rank_ptr.dtype.element_ty
    column_tile = row_mask[:, None] & column_mask[None, :]
    tl.store(out + column_ids[None, :], grad_hidden.to(out_ty), mask=column_tile)
    tl.store(out + columns + column_ids[None, :], grad_query.to(out_ty), mask=column_tile)
    tl.store(out + 2 * columns + adapter_ids[None, :], grad_scores.to(out_ty), mask=adapter_tile)
