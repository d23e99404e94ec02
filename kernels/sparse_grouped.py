"""Sparse mixture of adapters, grouped design (the `grouped` variant of sparse_adapter /
routed_adapter): FLOPs proportional to k, not E, for shapes where E*r is large.

Each (row, slot) pair is one assignment, numbered row * k + slot. The assignments are sorted by
expert (a stable argsort and a bincount of the [M*k] expert indices, as scattermoe and vLLM's
fused_moe sort theirs), and each grouped program takes a tile of one expert's sorted
assignments, so its dots use that expert's r columns only (tensor cores, rank padded to 16).

Forward:
  1. Gated form: the gate launch computes the logits (fp32, ieee, as the dense design does),
     the top-k (ties to the lower expert index) and the softmax weights of the k chosen, per row
     tile. The routed form takes the caller's experts and weights.
  2. The sort (torch: argsort, bincount; [M*k] integers, no M x D bytes, no device sync: the
     grid is bounded by ceil(M*k / tile) + E tiles and the extra programs find no work).
  3. The grouped launch: gather x's rows, h = x W_down[e]^T + b_down[e] (saved, [M*k, r]),
     then p * (act(h) W_up[e]^T + b_up[e]) per D tile. With k = 1 it applies the epilogue and
     writes y; otherwise it writes the weighted outputs [M*k, D] and
  4. the combine launch sums each row's k of them and applies the epilogue.
Backward (three launches; two for the routed form with k = 1):
  1. Grouped: d act = p dy W_up[e], d p = dy . u_e, dh (saved [M*k, r]), and dx's share
     dh W_down[e] (dx itself with k = 1).
  2. Combine: d logits through the softmax (gated form), and dx = the sum of the k shares +
     d logits W_gate (+ dy when x is a residual term).
  3. Weights: one program per (expert, D tile, rank block) sums its expert's gradients over the
     expert's sorted assignments in order and writes them (deterministic, no partials), plus, for the
     gated form, programs that sum d logits^T x over row chunks into fp32 partials.

What it costs against the dense design, counted with the byte counter (fp16, D = 768, M = 1576,
k = 2, 132 SMs): the gather reads x k times and the [M*k, D] parts are written and read once
each, so at E = 8, r = 16 the forward moves 4.13x the floor (dense: 1.18x) and the backward
3.26x (dense: 1.73x); at E = 16, r = 32, where only this design runs, 4.40x and 3.75x, against
37.4x and 66.6x for the eager expert loop. See the crossover rule in sparse.py (choose_design).
"""

from __future__ import annotations


import torch
import triton

from .launch import (
    PARTIALS_BUDGET, TRITON_DTYPES, BlockConfig, Launch, device_context, dtype_group, input_precision, int32_columns,
    new_output, optional, padded_rank, plan_block_rows, scale_mode,
)
from .sparse_grouped_kernels import (
    _grouped_backward_combine_kernel, _grouped_backward_input_kernel, _grouped_backward_weights_kernel,
    _grouped_combine_kernel, _grouped_forward_kernel, _sparse_gate_kernel,
)

__all__ = ["MAX_GROUPED_RANK", "gate_launch", "sort_assignments", "grouped_forward_launches",
           "grouped_backward_launches"]

MAX_GROUPED_RANK = 256
MIN_BLOCK = 16

# --------------------------------------------------------------------------------------------
# Block configurations. The grouped launches are keyed by (padded r, dtype group of the compute
# dtype); the gate and the combines (no rank axis) by the dtype group. Chosen with the compile
# check (kernels/compile_check.py --kernel grouped_...): 0 spill bytes on sm_80 and sm_90, every
# dtype, aligned and unaligned. rank_tile: at padded rank 128 and 256 the weights launch splits
# the rank axis over a third grid axis (its two fp32 [D tile, rank] accumulators spilled up to
# 6 KB at every whole-rank tile tried).
# 8 warps: the gathered, unaligned x and dy tiles spill at 4.
# --------------------------------------------------------------------------------------------

GATE_CONFIGS = {
    "half": BlockConfig("grouped_gate_half", 32, 32, 4, 2),
    "fp32": BlockConfig("grouped_gate_fp32", 32, 32, 4, 2),
}
COMBINE_CONFIGS = {
    "half": BlockConfig("grouped_combine_half", 16, 128, 4, 1),
    "fp32": BlockConfig("grouped_combine_fp32", 16, 64, 4, 1),
}
BACKWARD_COMBINE_CONFIGS = {
    "half": BlockConfig("grouped_bwd_combine_half", 16, 64, 4, 1),
    "fp32": BlockConfig("grouped_bwd_combine_fp32", 16, 64, 4, 1),
}
GROUPED_FORWARD_CONFIGS = {
    (16, "half"): BlockConfig("grouped_fwd_r16_half", 64, 64, 8, 2),
    (32, "half"): BlockConfig("grouped_fwd_r32_half", 64, 64, 8, 2),
    (64, "half"): BlockConfig("grouped_fwd_r64_half", 64, 32, 8, 2),
    (128, "half"): BlockConfig("grouped_fwd_r128_half", 32, 32, 8, 2),
    (256, "half"): BlockConfig("grouped_fwd_r256_half", 32, 16, 8, 1),
    (16, "fp32"): BlockConfig("grouped_fwd_r16_fp32", 64, 64, 8, 1),
    (32, "fp32"): BlockConfig("grouped_fwd_r32_fp32", 32, 32, 4, 1),
    (64, "fp32"): BlockConfig("grouped_fwd_r64_fp32", 32, 32, 4, 1),
    (128, "fp32"): BlockConfig("grouped_fwd_r128_fp32", 32, 32, 8, 2),
    (256, "fp32"): BlockConfig("grouped_fwd_r256_fp32", 16, 16, 4, 1),
}
GROUPED_BACKWARD_INPUT_CONFIGS = {
    (16, "half"): BlockConfig("grouped_bwd_input_r16_half", 64, 64, 8, 2),
    (32, "half"): BlockConfig("grouped_bwd_input_r32_half", 64, 64, 8, 2),
    (64, "half"): BlockConfig("grouped_bwd_input_r64_half", 64, 32, 8, 2),
    (128, "half"): BlockConfig("grouped_bwd_input_r128_half", 32, 32, 8, 2),
    (256, "half"): BlockConfig("grouped_bwd_input_r256_half", 16, 64, 8, 1),
    (16, "fp32"): BlockConfig("grouped_bwd_input_r16_fp32", 32, 32, 4, 1),
    (32, "fp32"): BlockConfig("grouped_bwd_input_r32_fp32", 32, 32, 4, 1),
    (64, "fp32"): BlockConfig("grouped_bwd_input_r64_fp32", 32, 32, 4, 1),
    (128, "fp32"): BlockConfig("grouped_bwd_input_r128_fp32", 32, 32, 8, 1),
    (256, "fp32"): BlockConfig("grouped_bwd_input_r256_fp32", 16, 16, 4, 1),
}
GROUPED_BACKWARD_WEIGHTS_CONFIGS = {
    (16, "half"): BlockConfig("grouped_bwd_weights_r16_half", 32, 64, 8, 2),
    (32, "half"): BlockConfig("grouped_bwd_weights_r32_half", 32, 64, 8, 2),
    (64, "half"): BlockConfig("grouped_bwd_weights_r64_half", 16, 64, 8, 2),
    (128, "half"): BlockConfig("grouped_bwd_weights_r128_half", 16, 64, 8, 2, rank_tile=64),
    (256, "half"): BlockConfig("grouped_bwd_weights_r256_half", 16, 64, 8, 2, rank_tile=64),
    (16, "fp32"): BlockConfig("grouped_bwd_weights_r16_fp32", 16, 32, 4, 1),
    (32, "fp32"): BlockConfig("grouped_bwd_weights_r32_fp32", 16, 32, 4, 1),
    (64, "fp32"): BlockConfig("grouped_bwd_weights_r64_fp32", 16, 32, 4, 1),
    (128, "fp32"): BlockConfig("grouped_bwd_weights_r128_fp32", 16, 32, 4, 1, rank_tile=64),
    (256, "fp32"): BlockConfig("grouped_bwd_weights_r256_fp32", 16, 32, 4, 1, rank_tile=64),
}


def block_experts(experts: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(experts))


def grouped_config(table: dict, rank: int, dtype: torch.dtype) -> BlockConfig:
    return table[(padded_rank(rank), dtype_group(dtype))]


def grouped_tiles(assignments: int, experts: int, block_rows: int) -> int:
    """An upper bound of sum_e ceil(count_e / block_rows) that needs no counts: the grid size."""
    return triton.cdiv(assignments, block_rows) + experts if assignments else 0


def packed_size(experts: int, rank: int, dim: int, rank_blocks: int = 1) -> int:
    """The grouped backward's packed gradients: sparse.partials_size with one dscale row per
    (expert, rank block) of the weights launch."""
    columns = experts * rank
    return 2 * columns * dim + 2 * experts * dim + columns + experts + experts * rank_blocks * dim


def weights_rank_blocks(rank: int, dtype: torch.dtype) -> int:
    """The weights launch's rank blocks: its configuration's rank tile splits the rank axis over
    the grid where two fp32 [D tile, rank] accumulators would not fit in registers."""
    config = grouped_config(GROUPED_BACKWARD_WEIGHTS_CONFIGS, rank, dtype)
    return triton.cdiv(padded_rank(rank), config.rank_tile or padded_rank(rank))


# --------------------------------------------------------------------------------------------
# Launch plans
# --------------------------------------------------------------------------------------------


def gate_launch(x, w_gate, b_gate, top_k, logits, idx, weights, sms: int) -> Launch:
    """The gate launch for x [M, D]: idx [M, k] int32 and weights [M, k] fp32, and logits [M, E]
    when it has M rows."""
    rows, dim = x.shape
    experts = w_gate.shape[0]
    config = plan_block_rows(GATE_CONFIGS[dtype_group(x.dtype)], rows, sms)
    store_logits = logits.shape[0] == rows
    return Launch(
        _sparse_gate_kernel, (triton.cdiv(rows, config.block_rows),),
        dict(x_ptr=x, w_gate_ptr=w_gate.contiguous(), b_gate_ptr=optional(b_gate, x),
             logits_ptr=logits if store_logits else weights, idx_ptr=idx, weights_ptr=weights,
             rows=rows, dim=dim, experts=experts, stride_x_row=x.stride(0), stride_x_col=x.stride(1)),
        dict(TOP_K=top_k, HAS_B_GATE=b_gate is not None, STORE_LOGITS=store_logits, BLOCK_ROWS=config.block_rows,
             BLOCK_DIM=config.block_dim, BLOCK_EXPERTS=block_experts(experts)),
        config,
    )


def sort_assignments(idx: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [M*k] int64: the assignments sorted by expert, stable; counts [E] int64)."""
    flat = idx.reshape(-1)
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=experts)


def grouped_forward_launches(x, idx, weights, order, counts, w_down, b_down, w_up, b_up, scale, scale_value,
                             residual, add_input, row_scale, activation, compute_dtype, y, hidden, parts):
    """The grouped launch, and the combine launch (None with k = 1, where the grouped launch
    writes y). hidden [M*k, r] when it has rows (saved for backward); parts [M*k, D] with k > 1."""
    rows, dim = x.shape
    top_k = idx.shape[1]
    experts, rank, _ = w_down.shape
    single = top_k == 1
    group = dtype_group(compute_dtype)
    config = grouped_config(GROUPED_FORWARD_CONFIGS, rank, compute_dtype)
    save = hidden.shape[0] > 0
    epilogue_args = dict(
        scale_ptr=optional(scale, x), residual_ptr=x if residual is None else residual,
        row_scale_ptr=optional(row_scale, x), scale_value=scale_value,
        stride_x_row=x.stride(0), stride_x_col=x.stride(1),
        stride_res_row=residual.stride(0) if residual is not None else 0,
        stride_res_col=residual.stride(1) if residual is not None else 0,
    )
    epilogue_flags = dict(SCALE_MODE=scale_mode(scale), HAS_RESIDUAL=residual is not None, ADD_INPUT=add_input,
                          HAS_ROW_SCALE=row_scale is not None, COMPUTE_DTYPE=TRITON_DTYPES[compute_dtype])
    grouped = Launch(
        _grouped_forward_kernel, (grouped_tiles(rows * top_k, experts, config.block_rows),),
        dict(x_ptr=x, order_ptr=order, counts_ptr=counts, weights_ptr=weights, w_down_ptr=w_down.contiguous(),
             b_down_ptr=optional(b_down, x), w_up_ptr=w_up.contiguous(), b_up_ptr=optional(b_up, x),
             out_ptr=y if single else parts, hidden_ptr=hidden if save else y, dim=dim, rank=rank, experts=experts,
             **epilogue_args),
        dict(TOP_K=top_k, ACTIVATION=activation, HAS_B_DOWN=b_down is not None, HAS_B_UP=b_up is not None,
             SAVE=save, SINGLE=single, INPUT_PRECISION=input_precision(compute_dtype),
             BLOCK_ROWS=config.block_rows, BLOCK_DIM=config.block_dim, BLOCK_RANK=padded_rank(rank),
             BLOCK_EXPERTS=block_experts(experts), **epilogue_flags),
        config,
    )
    if single:
        return grouped, None
    combine_config = COMBINE_CONFIGS[group]
    combine = Launch(
        _grouped_combine_kernel,
        (triton.cdiv(rows, combine_config.block_rows), triton.cdiv(dim, combine_config.block_dim)),
        dict(parts_ptr=parts, x_ptr=x, y_ptr=y, rows=rows, dim=dim, **epilogue_args),
        dict(TOP_K=top_k, BLOCK_ROWS=combine_config.block_rows, BLOCK_DIM=combine_config.block_dim,
             **epilogue_flags),
        combine_config,
    )
    return grouped, combine


def gate_chunks(rows: int, dim: int, experts: int, top_k: int, itemsize: int, block_rows: int) -> int:
    """Row chunks of the gate's share of the weights launch: about as many rows per program as
    an expert program has assignments (M*k/E), while the fp32 partials (E x (D + 1) per chunk,
    written and read) cost at most PARTIALS_BUDGET of one pass over x."""
    balanced = triton.cdiv(rows, max(block_rows, triton.cdiv(rows * top_k, experts)))
    budget = int(PARTIALS_BUDGET * rows * dim * itemsize // (2 * 4 * experts * (dim + 1)))
    return max(1, min(balanced, budget))


def grouped_backward_launches(grad_y, grad_logits, x, hidden, idx, weights, order, counts, w_gate, w_down, w_up,
                              b_up, scale, scale_value, row_scale, activation, compute_dtype, add_grad_y, grad_x,
                              grad_weights, grad_hidden, parts, grad_gate, packed, gate_partials):
    """The grouped input launch, the combine launch (None for the routed form with k = 1 or
    without dx) and the weights launch. grad_gate [M, E] (d logits) and gate_partials
    [chunks, E*D + E] for the gated form; parts [M*k, D] when the combine runs with dx."""
    rows, dim = x.shape
    top_k = idx.shape[1]
    experts, rank, _ = w_down.shape
    gated = w_gate is not None
    compute_dx = grad_x.shape[0] == rows
    single = top_k == 1 and not gated
    group = dtype_group(compute_dtype)
    precision = input_precision(compute_dtype)
    triton_dtype = TRITON_DTYPES[compute_dtype]
    mode = scale_mode(scale)
    scale_c, row_scale_c, b_up_c = optional(scale, x), optional(row_scale, x), optional(b_up, x)
    w_down, w_up = w_down.contiguous(), w_up.contiguous()
    input_config = grouped_config(GROUPED_BACKWARD_INPUT_CONFIGS, rank, compute_dtype)
    grouped = Launch(
        _grouped_backward_input_kernel, (grouped_tiles(rows * top_k, experts, input_config.block_rows),),
        dict(grad_y_ptr=grad_y, order_ptr=order, counts_ptr=counts, weights_ptr=weights, hidden_ptr=hidden,
             w_down_ptr=w_down, w_up_ptr=w_up, b_up_ptr=b_up_c, scale_ptr=scale_c, row_scale_ptr=row_scale_c,
             grad_hidden_ptr=grad_hidden, grad_weights_ptr=grad_weights,
             out_ptr=grad_x if single else parts, dim=dim, rank=rank, experts=experts, scale_value=scale_value,
             stride_g_row=grad_y.stride(0), stride_g_col=grad_y.stride(1)),
        dict(TOP_K=top_k, ACTIVATION=activation, SCALE_MODE=mode, HAS_B_UP=b_up is not None,
             HAS_ROW_SCALE=row_scale is not None, SINGLE=single, COMPUTE_DX=compute_dx,
             ADD_GRAD_Y=single and add_grad_y, COMPUTE_DTYPE=triton_dtype, INPUT_PRECISION=precision,
             BLOCK_ROWS=input_config.block_rows, BLOCK_DIM=input_config.block_dim, BLOCK_RANK=padded_rank(rank),
             BLOCK_EXPERTS=block_experts(experts)),
        input_config,
    )
    combine = None
    if gated or (compute_dx and not single):
        combine_config = BACKWARD_COMBINE_CONFIGS[group]
        combine = Launch(
            _grouped_backward_combine_kernel, (triton.cdiv(rows, combine_config.block_rows),),
            dict(grad_y_ptr=grad_y, grad_logits_ptr=grad_logits if grad_logits is not None else grad_weights,
                 parts_ptr=parts, idx_ptr=idx, weights_ptr=weights, grad_weights_ptr=grad_weights,
                 w_gate_ptr=optional(w_gate, x), grad_gate_ptr=grad_gate, grad_x_ptr=grad_x,
                 rows=rows, dim=dim, experts=experts, stride_g_row=grad_y.stride(0), stride_g_col=grad_y.stride(1)),
            dict(TOP_K=top_k, GATED=gated, HAS_GRAD_LOGITS=gated and grad_logits is not None, COMPUTE_DX=compute_dx,
                 ADD_GRAD_Y=compute_dx and add_grad_y, BLOCK_ROWS=combine_config.block_rows,
                 BLOCK_DIM=combine_config.block_dim, BLOCK_EXPERTS=block_experts(experts)),
            combine_config,
        )
    weights_config = grouped_config(GROUPED_BACKWARD_WEIGHTS_CONFIGS, rank, compute_dtype)
    chunks = gate_partials.shape[0] if gated else 0
    rank_tile = weights_config.rank_tile or padded_rank(rank)
    weights_launch = Launch(
        _grouped_backward_weights_kernel,
        (experts + chunks, triton.cdiv(dim, weights_config.block_dim), weights_rank_blocks(rank, compute_dtype)),
        dict(grad_y_ptr=grad_y, x_ptr=x, order_ptr=order, counts_ptr=counts, weights_ptr=weights,
             hidden_ptr=hidden, grad_hidden_ptr=grad_hidden, grad_gate_ptr=grad_gate, w_up_ptr=w_up, b_up_ptr=b_up_c,
             scale_ptr=scale_c, row_scale_ptr=row_scale_c, packed_ptr=packed, gate_partials_ptr=gate_partials,
             rows=rows, dim=dim, rank=rank, experts=experts, scale_value=scale_value,
             rows_per_gate_chunk=triton.cdiv(rows, chunks) if chunks else 0,
             stride_g_row=grad_y.stride(0), stride_g_col=grad_y.stride(1), stride_x_row=x.stride(0),
             stride_x_col=x.stride(1)),
        dict(TOP_K=top_k, ACTIVATION=activation, SCALE_MODE=mode, HAS_B_UP=b_up is not None,
             HAS_ROW_SCALE=row_scale is not None, COMPUTE_DTYPE=triton_dtype, INPUT_PRECISION=precision,
             BLOCK_ROWS=weights_config.block_rows, BLOCK_DIM=weights_config.block_dim,
             BLOCK_RANK=rank_tile, BLOCK_EXPERTS=block_experts(experts)),
        weights_config,
    )
    return grouped, combine, weights_launch


# --------------------------------------------------------------------------------------------
# Runners (the torch.library ops of sparse.py call these)
# --------------------------------------------------------------------------------------------


def grouped_forward(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, scale_value,
                    residual, add_input, row_scale, top_k, activation, compute_dtype, out_dtype, save,
                    return_logits, sms: int):
    """2-D x [M, D]. Returns y [M, D]; hidden [M*k, r] by sorted position (0 rows unless save);
    idx [M, k] int32 and weights [M, k] fp32 (the routing); order [M*k] and counts [E] (the
    sort); logits [M, E] when asked (else 0 rows)."""
    rows, dim = x.shape
    experts, rank, _ = w_down.shape
    gated = w_gate is not None
    if not gated:
        top_k = expert_idx.shape[1]
    y = new_output((rows, dim), out_dtype, x.device)
    hidden = new_output((rows * top_k if save else 0, rank), compute_dtype, x.device)
    logits = new_output((rows if return_logits else 0, experts), torch.float32, x.device)
    if rows == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=x.device)
        return (y, hidden, torch.zeros((0, top_k), dtype=torch.int32, device=x.device),
                torch.zeros((0, top_k), dtype=torch.float32, device=x.device), empty,
                torch.zeros(experts, dtype=torch.int64, device=x.device), logits)
    x = int32_columns(x)
    residual = int32_columns(residual) if residual is not None else None
    with device_context(x):
        if gated:
            idx = new_output((rows, top_k), torch.int32, x.device)
            weights = new_output((rows, top_k), torch.float32, x.device)
            gate_launch(x, w_gate, b_gate, top_k, logits, idx, weights, sms)()
        else:  # [M, k] integers and weights: small copies, for the kernels' flat [M*k] reads
            idx = new_output((rows, top_k), torch.int32, x.device).copy_(expert_idx)
            weights = new_output((rows, top_k), torch.float32, x.device).copy_(expert_weight)
        order, counts = sort_assignments(idx, experts)
        parts = new_output((rows * top_k if top_k > 1 else 0, dim), compute_dtype, x.device)
        for launch in grouped_forward_launches(x, idx, weights, order, counts, w_down, b_down, w_up, b_up, scale,
                                               scale_value, residual, add_input, row_scale, activation,
                                               compute_dtype, y, hidden, parts):
            if launch is not None:
                launch()
    return y, hidden, idx, weights, order, counts, logits


def grouped_backward(grad_y, grad_logits, x, hidden, idx, weights, order, counts, w_gate, w_down, w_up, b_up, scale,
                     scale_value, row_scale, activation, compute_dtype, add_grad_y, compute_dx, grad_dtype,
                     sms: int):
    """dx ([M, D] in x's dtype, or [0, D]), the packed parameter gradients (sparse.partials_size
    of one block, in grad_dtype) and d weights [M, k] fp32 (the routed form's gradient)."""
    rows, dim = x.shape
    experts, rank, _ = w_down.shape
    top_k = idx.shape[1]
    gated = w_gate is not None
    grad_x = new_output((rows if compute_dx else 0, dim), x.dtype, x.device)
    grad_weights = new_output((rows, top_k), torch.float32, x.device)
    rank_blocks = weights_rank_blocks(rank, compute_dtype)
    packed = new_output((packed_size(experts, rank, dim, rank_blocks),), grad_dtype, x.device)
    columns = experts * rank
    gate_start = 2 * columns * dim + experts * dim + columns
    scale_start = gate_start + experts * dim + experts
    if rows == 0:
        packed.zero_()
        return grad_x, packed[:scale_start + dim], grad_weights
    grad_y, x = int32_columns(grad_y), int32_columns(x)
    single = top_k == 1 and not gated
    grad_hidden = new_output((rows * top_k, rank), compute_dtype, x.device)
    parts = new_output((rows * top_k if compute_dx and not single else 0, dim), compute_dtype, x.device)
    grad_gate = new_output((rows if gated else 0, experts), torch.float32, x.device)
    weights_block_rows = grouped_config(GROUPED_BACKWARD_WEIGHTS_CONFIGS, rank, compute_dtype).block_rows
    chunks = gate_chunks(rows, dim, experts, top_k, x.element_size(), weights_block_rows) if gated else 0
    gate_partials = new_output((chunks, experts * dim + experts), torch.float32, x.device)
    with device_context(x):
        for launch in grouped_backward_launches(grad_y, grad_logits, x, hidden, idx, weights, order, counts, w_gate,
                                                w_down, w_up, b_up, scale, scale_value, row_scale, activation,
                                                compute_dtype, add_grad_y, grad_x, grad_weights, grad_hidden, parts,
                                                grad_gate, packed, gate_partials):
            if launch is not None:
                launch()
    if gated:  # the gate's partials, summed over chunks in order (deterministic)
        packed[gate_start:scale_start] = gate_partials.sum(dim=0).to(grad_dtype)
    else:
        packed[gate_start:scale_start] = 0
    # One dscale row per (expert, rank block): folded into the first, which ends the packed layout.
    scale_rows = packed[scale_start:].view(experts * rank_blocks, dim)
    scale_rows[0] = scale_rows.float().sum(0).to(grad_dtype)
    return grad_x, packed[:scale_start + dim], grad_weights
