"""Sparse top-k gated mixture of adapters, dense-masked design: work in progress.

Only the forward kernel is here so far; it is not wired into a public op, autograd or the
compile check yet, and nothing outside the tests calls it. The math is reference.sparse_adapter.

Forward, one launch, one program per tile of rows:
  1. One pass over D accumulates, in fp32 registers, h = x W_down_stacked^T for all E experts
     at once (W_down_stacked [E*r, D], tensor cores in the compute dtype) and the gate logits
     x W_gate^T (fp32 operands, ieee: the same numbers the reference's fp32 F.linear gives, up to
     summation order, so a deliberate tie stays a tie).
  2. Top-k over the logits in registers: k rounds of "largest remaining logit, lowest index
     among equals"; the weights are the softmax over the chosen logits.
  3. The weights are spread over each expert's r columns (a one-hot [E, E*r] dot, exact in
     fp32), act(h + b_down) is scaled by them, so unselected experts contribute zeros, and a
     second pass over D computes u = a W_up_stacked^T + weights B_up with the bottleneck epilogue.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from .activations import activation as _activation
from .epilogue import epilogue, epilogue_scalars
from .launch import TRITON_DTYPES, device_context, input_precision, new_output

MIN_BLOCK = 16


@triton.jit
def _sparse_forward_kernel(
    x_ptr, w_gate_ptr, b_gate_ptr, w_down_ptr, b_down_ptr, w_up_ptr, b_up_ptr, scale_ptr, residual_ptr,
    row_scale_ptr, y_ptr,
    rows, dim, rank, experts, scale_value,
    stride_x_row, stride_x_col, stride_res_row, stride_res_col,
    TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_B_GATE: tl.constexpr,
    HAS_B_DOWN: tl.constexpr, HAS_B_UP: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ADD_INPUT: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_EXPERTS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
):
    # This program's tile: rows [pid * BLOCK_ROWS, +BLOCK_ROWS), every expert, every column of D.
    pid = tl.program_id(0)
    row_ids = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_ids = row_ids.to(tl.int64)
    expert_ids = tl.arange(0, BLOCK_EXPERTS)
    expert_mask = expert_ids < experts
    # Stacked columns: column c belongs to expert c // rank.
    column_ids = tl.arange(0, BLOCK_COLUMNS)
    column_mask = column_ids < experts * rank
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
        hidden = tl.dot(x_tile.to(dtype), w_down_t, hidden, input_precision=INPUT_PRECISION)
        w_gate_t = tl.load(
            w_gate_ptr + expert_ids[None, :] * dim + col_ids[:, None],
            mask=col_mask[:, None] & expert_mask[None, :], other=0.0,
        ).to(tl.float32)
        logits = tl.dot(x_tile.to(tl.float32), w_gate_t, logits, input_precision="ieee")
    if HAS_B_GATE:
        logits += tl.load(b_gate_ptr + expert_ids, mask=expert_mask, other=0.0).to(tl.float32)[None, :]
    logits = tl.where(expert_mask[None, :], logits, float("-inf"))

    # Top-k: the largest remaining logit each round, the lowest expert index among equals.
    chosen = tl.zeros((BLOCK_ROWS, BLOCK_EXPERTS), dtype=tl.int1)
    top = tl.max(logits, axis=1)
    for _ in tl.static_range(TOP_K):
        remaining = tl.where(chosen, float("-inf"), logits)
        best = tl.max(remaining, axis=1)
        first = tl.min(tl.where(remaining == best[:, None], expert_ids[None, :], BLOCK_EXPERTS), axis=1)
        chosen = chosen | (expert_ids[None, :] == first[:, None])
    weights = tl.where(chosen, tl.exp(logits - top[:, None]), 0.0)
    weights = weights / tl.sum(weights, axis=1)[:, None]

    # Spread each expert's weight over its r stacked columns (exact: one term per column).
    owner = tl.where(column_mask, column_ids // rank, BLOCK_EXPERTS)
    one_hot = (expert_ids[:, None] == owner[None, :]).to(tl.float32)
    column_weights = tl.dot(weights, one_hot, input_precision="ieee")
    if HAS_B_DOWN:
        hidden += tl.load(b_down_ptr + column_ids, mask=column_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    hidden = hidden.to(dtype)  # rounded as F.linear's output is
    act = (_activation(hidden.to(tl.float32), ACTIVATION) * column_weights).to(dtype)

    row_scale, scalar_scale = epilogue_scalars(row_scale_ptr, scale_ptr, row_ids, row_mask, scale_value, dtype,
                                               SCALE_MODE, HAS_ROW_SCALE, BLOCK_ROWS)

    for col_start in range(0, dim, BLOCK_DIM):
        col_ids = col_start + tl.arange(0, BLOCK_DIM)
        col_mask = col_ids < dim
        tile_mask = row_mask[:, None] & col_mask[None, :]
        # w_up_ptr is W_up_stacked [D, E*r]: element (d, c) at d * E*r + c.
        w_up_t = tl.load(
            w_up_ptr + col_ids[None, :] * (experts * rank) + column_ids[:, None],
            mask=column_mask[:, None] & col_mask[None, :], other=0.0,
        ).to(dtype)
        update = tl.dot(act, w_up_t, input_precision=INPUT_PRECISION)
        if HAS_B_UP:
            b_up_tile = tl.load(
                b_up_ptr + expert_ids[:, None] * dim + col_ids[None, :],
                mask=expert_mask[:, None] & col_mask[None, :], other=0.0,
            ).to(dtype).to(tl.float32)
            update += tl.dot(weights, b_up_tile, input_precision="ieee")
        update = epilogue(update, x_ptr, residual_ptr, scale_ptr, row_ids, col_ids, col_mask, tile_mask, row_scale,
                          scalar_scale, stride_x_row, stride_x_col, stride_res_row, stride_res_col,
                          SCALE_MODE, HAS_ROW_SCALE, ADD_INPUT, HAS_RESIDUAL)
        tl.store(y_ptr + row_ids[:, None] * dim + col_ids[None, :], update.to(y_ptr.dtype.element_ty),
                 mask=tile_mask)


def sparse_forward(x: torch.Tensor, w_gate, b_gate, w_down, b_down, w_up, b_up, scale=None, *, top_k: int,
                   activation: str = "gelu", residual: Optional[torch.Tensor] = None, add_input: bool = False,
                   row_scale: Optional[torch.Tensor] = None, block_rows: int = 32,
                   block_dim: int = 32) -> torch.Tensor:
    """The forward launch on 2-D x [M, D], no autograd (work in progress: see the module
    docstring). scale: None, a float, a one-element tensor or [D]; y in the compute dtype
    promoted by the residual's (the bottleneck rules)."""
    rows, dim = x.shape
    experts, rank, _ = w_down.shape
    compute = reference.compute_dtype(x)
    autocast = x.dtype in reference.AUTOCAST_INPUT_DTYPES and torch.is_autocast_enabled(x.device.type)
    terms = ([x] if add_input else []) + ([residual] if residual is not None else [])
    out_dtype = reference.output_dtype(compute, autocast, scale, terms)
    y = new_output((rows, dim), out_dtype, x.device)
    if rows == 0:
        return y
    scale_mode = "value" if not isinstance(scale, torch.Tensor) else ("tensor" if scale.numel() == 1 else "channel")
    scale_value = float(scale) if isinstance(scale, (int, float)) else 1.0
    w_up_stacked = w_up.permute(1, 0, 2).reshape(dim, experts * rank).contiguous()

    def optional(tensor):
        return x if tensor is None else tensor.contiguous()

    grid = (triton.cdiv(rows, block_rows),)
    with device_context(x):
        _sparse_forward_kernel[grid](
            x, w_gate.contiguous(), optional(b_gate), w_down.reshape(experts * rank, dim).contiguous(),
            optional(None if b_down is None else b_down.reshape(-1)), w_up_stacked, optional(b_up),
            optional(scale if isinstance(scale, torch.Tensor) else None), x if residual is None else residual,
            optional(row_scale), y,
            rows, dim, rank, experts, scale_value,
            x.stride(0), x.stride(1), 0 if residual is None else residual.stride(0),
            0 if residual is None else residual.stride(1),
            TOP_K=top_k, ACTIVATION=activation, SCALE_MODE=scale_mode, HAS_B_GATE=b_gate is not None,
            HAS_B_DOWN=b_down is not None, HAS_B_UP=b_up is not None, HAS_RESIDUAL=residual is not None,
            ADD_INPUT=add_input, HAS_ROW_SCALE=row_scale is not None, COMPUTE_DTYPE=TRITON_DTYPES[compute],
            INPUT_PRECISION=input_precision(compute), BLOCK_ROWS=block_rows, BLOCK_DIM=block_dim,
            BLOCK_EXPERTS=max(MIN_BLOCK, triton.next_power_of_2(experts)),
            BLOCK_COLUMNS=max(MIN_BLOCK, triton.next_power_of_2(experts * rank)),
        )
    return y
