"""The LoRA linear's single-launch Triton kernel: y = x W^T + b + s (x A^T) B^T in one GEMM with a
rank-r side product (plan.py makes its launches; op.py documents the two forms).

Each program owns a [BLOCK_ROWS, BLOCK_DIM] tile of y and walks D_in once, feeding every x tile to
two dots: the GEMM accumulator x W^T and the rank-r accumulator h = x A^T; the epilogue adds
s * h B^T and the bias. The same kernel runs the backward's input launch as a GEMM over D_out:
dx = dy W + g A with g = s dy B accumulated on the side.

With LoRA's dropout (rate p on the branch's input, kernels/dropout.py's INPUT stream, element
(row, input feature)) the forward feeds the x tile undropped to the GEMM dot and dropped to the
rank dot; the backward's input launch multiplies its g A term by the same mask, which it draws
again from the seed at (row, output column) since there the output columns are the input features.
"""

import triton
import triton.language as tl

from ..dropout import INPUT, dropout_factor


@triton.jit
def _lora_linear_kernel(
    x_ptr, weight_ptr, bias_ptr, down_ptr, up_ptr, y_ptr, hidden_ptr, seed_ptr,
    rows, dim_in, dim_out, rank, hidden_scale, out_scale, dropout_p, dropout_keep,
    stride_x_row, stride_x_col, stride_w_k, stride_w_n, stride_down_k, stride_down_r, stride_up_r, stride_up_n,
    HAS_BIAS: tl.constexpr, STORE_HIDDEN: tl.constexpr, DROP_DOWN_INPUT: tl.constexpr,
    DROP_UP_OUTPUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_RANK: tl.constexpr, GROUP_ROWS: tl.constexpr,
):
    # y[rows, cols] = x @ weight + out_scale * (hidden_scale * (x @ down)) @ up + bias, where
    # weight is the [K, N] operand (element (k, n) at k * stride_w_k + n * stride_w_n), down
    # [K, r] and up [r, N]. Forward: K = D_in, N = D_out, weight = W^T, down = A^T, up = B^T.
    # Backward input launch: x = dy, K = D_out, N = D_in, weight = W, down = B, up = A.
    # DROP_DOWN_INPUT: the rank dot reads dropout(x), mask element (row, k) (the forward);
    # DROP_UP_OUTPUT: the up dot's result is masked at (row, n) (the backward's (g A) * keep).
    #
    # Program order: GROUP_ROWS row tiles share each sweep over the column tiles, so the x rows
    # and the weight columns the concurrent programs read stay in L2 (as in Triton's matmul).
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(rows, BLOCK_ROWS)
    col_tiles = tl.cdiv(dim_out, BLOCK_DIM)
    per_group = GROUP_ROWS * col_tiles
    first_row_tile = (pid // per_group) * GROUP_ROWS
    group_rows = min(row_tiles - first_row_tile, GROUP_ROWS)
    pid_row = first_row_tile + (pid % per_group) % group_rows
    pid_col = (pid % per_group) // group_rows

    row_ids = pid_row * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_ids = row_ids.to(tl.int64)  # M * D may pass 2^31
    col_ids = pid_col * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    col_mask = col_ids < dim_out
    rank_ids = tl.arange(0, BLOCK_RANK)
    rank_mask = rank_ids < rank
    dtype = COMPUTE_DTYPE
    if DROP_DOWN_INPUT or DROP_UP_OUTPUT:
        seed = tl.load(seed_ptr)

    # One pass over K feeds both dots; padded ranks load zero weights.
    acc = tl.zeros((BLOCK_ROWS, BLOCK_DIM), dtype=tl.float32)
    hidden = tl.zeros((BLOCK_ROWS, BLOCK_RANK), dtype=tl.float32)
    for k_start in range(0, dim_in, BLOCK_K):
        k_ids = k_start + tl.arange(0, BLOCK_K)
        k_mask = k_ids < dim_in
        x_stored = tl.load(
            x_ptr + row_ids[:, None] * stride_x_row + k_ids[None, :] * stride_x_col,
            mask=row_mask[:, None] & k_mask[None, :], other=0.0,
        )
        x_tile = x_stored.to(dtype)
        branch_tile = x_tile
        if DROP_DOWN_INPUT:  # in x's dtype before the cast, as dropout applied to x rounds it
            branch_tile = (x_stored.to(tl.float32) * dropout_factor(seed, row_ids, k_ids, dropout_p, dropout_keep,
                                                                    INPUT)).to(x_ptr.dtype.element_ty).to(dtype)
        weight_tile = tl.load(
            weight_ptr + k_ids[:, None] * stride_w_k + col_ids[None, :] * stride_w_n,
            mask=k_mask[:, None] & col_mask[None, :], other=0.0,
        ).to(dtype)
        down_tile = tl.load(
            down_ptr + k_ids[:, None] * stride_down_k + rank_ids[None, :] * stride_down_r,
            mask=k_mask[:, None] & rank_mask[None, :], other=0.0,
        ).to(dtype)
        acc = tl.dot(x_tile, weight_tile, acc, input_precision=INPUT_PRECISION)
        hidden = tl.dot(branch_tile, down_tile, hidden, input_precision=INPUT_PRECISION)

    # Rounded to the compute dtype, as F.linear's output is; the backward reads this stored value.
    hidden = (hidden * hidden_scale).to(dtype)
    if STORE_HIDDEN:
        tl.store(hidden_ptr + row_ids[:, None] * rank + rank_ids[None, :], hidden,
                 mask=row_mask[:, None] & rank_mask[None, :] & (pid_col == 0))
    up_tile = tl.load(
        up_ptr + rank_ids[:, None] * stride_up_r + col_ids[None, :] * stride_up_n,
        mask=rank_mask[:, None] & col_mask[None, :], other=0.0,
    ).to(dtype)
    branch = tl.dot(hidden, up_tile, input_precision=INPUT_PRECISION)
    if DROP_UP_OUTPUT:  # a dropped input element's gradient gets no branch term
        branch = branch * dropout_factor(seed, row_ids, col_ids, dropout_p, dropout_keep, INPUT)
    acc += out_scale * branch
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col_ids, mask=col_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    tl.store(y_ptr + row_ids[:, None] * dim_out + col_ids[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])
