"""Sparse mixture of adapters: y = residual + scale * (row_scale * sum_j p_j * A_{e_j}(x)).

Two forms share the kernels. `sparse_adapter` routes each row to its top-k experts by a learned
gate (logits = x W_gate^T + b_gate in fp32, ties to the lower expert index, p = softmax over the
k chosen logits); `routed_adapter` takes the experts and weights per row from the caller
(multi-task batches, per-image routing). The math is reference.sparse_adapter / routed_adapter.

Dense-masked design (the `default` variant family): the experts' weights are stacked,
W_down [E*r, D] and W_up [D, E*r] (read from the [E, r, D] and [E, D, r] parameters in place),
so a row's hidden layer is h = x W_down^T + b_down over all E*r columns at once (tensor cores),
and the routing weights, spread over each expert's r columns, zero the unselected experts after
the activation: u = (act(h) * p_columns) W_up^T + p B_up. That costs E/k times the FLOPs of the
chosen experts alone, free while E*r is small (the op stays memory-bound: at E = 8, r = 16,
D = 768 a row costs 2 x 128 x 768 multiply-adds for its 1536 bytes of fp16 x, 128 per byte,
below an H100's ~300 fp16 tensor-core FLOP per byte of DRAM bandwidth).

Forward: one launch, one program per tile of rows.
  1. One pass over D accumulates h for every expert and, for the gated form, the gate logits
     (fp32 operands, ieee: the numbers the reference's fp32 F.linear gives up to summation
     order, so a deliberate tie stays a tie).
  2. Top-k in registers: k rounds of "largest remaining logit, lowest index among equals"; the
     weights are the softmax over the chosen logits. The routed form builds the same dense
     [rows, E] weights from expert_idx/expert_weight (repeated experts add up).
  3. A second pass over D (its x reads hit L2) computes u with the epilogue (scale, row_scale,
     residual, cast) shared with the bottleneck op.
  Saved for backward: h [M, E*r] in the compute dtype and the dense weights [M, E] in fp32.

Backward: two launches, deterministic (no float atomics).
  1. One program per row tile: d act = (dy * row_scale * scale) W_up_stacked, a full reduction
     over D; from it dh (through the weights and act'), the gradient of each row's expert
     weights (d act . act summed per expert, plus the b_up term), and for the gated form the
     softmax backward to the logits (plus the logits' own gradient when the caller used them,
     e.g. in load_balancing_loss). Writes dh [M, E*r] and d logits (or d weights) [M, E], then
     walks D again for dx = dh W_down_stacked + d logits W_gate (+ dy when x is a residual
     term; those dy reads hit L2).
  2. A grid of (row chunk, D tile, block of stacked columns): fp32 partial sums of every
     parameter gradient over its chunk, reduced by torch afterwards (none to reduce with one
     chunk). Doing dx in launch 1 leaves this one free to split the E*r columns, so one chunk
     has enough programs where the partials (E*r x D x 2 fp32 per chunk, E times the
     bottleneck op's) would make more chunks expensive.

Grouped design (the `grouped` variant, sparse_grouped.py): assignments sorted by expert, FLOPs
proportional to k, more launches and bytes. choose_design picks between the two by shape.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton

from . import reference
from .checks import check_sparse_arguments, epilogue_arguments
from .launch import (
    TRITON_DTYPES, BlockConfig, Launch, device_context, dtype_group, input_precision, int32_columns, new_output,
    optional, packed_grad_dtype, plan_chunks, scale_mode, sm_count, takes_triton, variant_config, warn_reference,
)
from .sparse_grouped import MAX_GROUPED_RANK, grouped_backward, grouped_forward
from .sparse_kernels import _sparse_backward_input_kernel, _sparse_backward_weights_kernel, _sparse_forward_kernel
from .variants import Variant, current_variant, pick, register_variants, time_cuda

__all__ = ["sparse_adapter", "routed_adapter", "routed_adapter_unchecked", "MAX_EXPERTS", "MAX_DENSE_COLUMNS",
           "VARIANTS", "uses_dense_kernels", "uses_kernels", "choose_design"]

MAX_EXPERTS = 64
# The dense design keeps [rows, E*r] tiles and [D tile, E*r] accumulators in registers.
MAX_DENSE_COLUMNS = 256
MIN_BLOCK = 16


def block_columns(experts: int, rank: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(experts * rank))


def block_experts(experts: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(experts))


# --------------------------------------------------------------------------------------------
# Block configurations, keyed by (padded E*r, dtype group of the compute dtype): the largest tiles
# the compile check found with 0 spill bytes on sm_80 and sm_90, aligned and unaligned, for the
# configuration and every smaller block-rows variant (kernels/compile_check.py, --kernel
# sparse_forward sparse_backward_input sparse_backward_weights); num_stages 1 was what removed
# most spills. Many entries sit at 255 registers: recheck after any kernel change.
# --------------------------------------------------------------------------------------------

FORWARD_CONFIGS = {
    (16, "half"): BlockConfig("sparse_fwd_c16_half", 64, 32, 8, 2),
    (32, "half"): BlockConfig("sparse_fwd_c32_half", 64, 32, 8, 2),
    (64, "half"): BlockConfig("sparse_fwd_c64_half", 64, 32, 8, 2),
    (128, "half"): BlockConfig("sparse_fwd_c128_half", 64, 32, 8, 1),
    (256, "half"): BlockConfig("sparse_fwd_c256_half", 16, 32, 8, 1),
    (16, "fp32"): BlockConfig("sparse_fwd_c16_fp32", 32, 32, 8, 1),
    (32, "fp32"): BlockConfig("sparse_fwd_c32_fp32", 32, 32, 8, 1),
    (64, "fp32"): BlockConfig("sparse_fwd_c64_fp32", 32, 32, 8, 1),
    (128, "fp32"): BlockConfig("sparse_fwd_c128_fp32", 16, 16, 4, 1),
    (256, "fp32"): BlockConfig("sparse_fwd_c256_fp32", 16, 16, 8, 1),
}
BACKWARD_INPUT_CONFIGS = {
    (16, "half"): BlockConfig("sparse_bwd_input_c16_half", 64, 32, 8, 1),
    (32, "half"): BlockConfig("sparse_bwd_input_c32_half", 32, 32, 8, 2),
    (64, "half"): BlockConfig("sparse_bwd_input_c64_half", 16, 64, 8, 1),
    (128, "half"): BlockConfig("sparse_bwd_input_c128_half", 16, 32, 8, 1),
    (256, "half"): BlockConfig("sparse_bwd_input_c256_half", 16, 32, 16, 2),
    (16, "fp32"): BlockConfig("sparse_bwd_input_c16_fp32", 32, 64, 8, 2),
    # One stage: with two, sm_90 compiles the store_act form with an 8-byte stack frame.
    (32, "fp32"): BlockConfig("sparse_bwd_input_c32_fp32", 32, 64, 8, 1),
    (64, "fp32"): BlockConfig("sparse_bwd_input_c64_fp32", 16, 64, 8, 1),
    (128, "fp32"): BlockConfig("sparse_bwd_input_c128_fp32", 16, 16, 8, 2),
    (256, "fp32"): BlockConfig("sparse_bwd_input_c256_fp32", 16, 16, 8, 2),
}
# rank_tile: stacked columns per program. The weights launch has no M-sized axis to fill the
# GPU with but its row chunks, and every chunk writes E*r x D x 2 fp32 partials (786 KB at
# E = 8, r = 16, D = 768): splitting the stacked columns 4 ways gives 4x the programs per chunk,
# so 4x fewer chunks (and partials) fill the same SMs.
BACKWARD_WEIGHTS_CONFIGS = {
    (16, "half"): BlockConfig("sparse_bwd_weights_c16_half", 32, 32, 4, 1),
    (32, "half"): BlockConfig("sparse_bwd_weights_c32_half", 32, 32, 4, 2),
    (64, "half"): BlockConfig("sparse_bwd_weights_c64_half", 32, 32, 4, 2, rank_tile=32),
    (128, "half"): BlockConfig("sparse_bwd_weights_c128_half", 32, 32, 4, 2, rank_tile=32),
    (256, "half"): BlockConfig("sparse_bwd_weights_c256_half", 32, 32, 4, 2, rank_tile=32),
    (16, "fp32"): BlockConfig("sparse_bwd_weights_c16_fp32", 16, 32, 4, 1),
    (32, "fp32"): BlockConfig("sparse_bwd_weights_c32_fp32", 16, 32, 4, 1),
    (64, "fp32"): BlockConfig("sparse_bwd_weights_c64_fp32", 16, 32, 4, 1, rank_tile=32),
    (128, "fp32"): BlockConfig("sparse_bwd_weights_c128_fp32", 16, 32, 4, 1, rank_tile=32),
    (256, "fp32"): BlockConfig("sparse_bwd_weights_c256_fp32", 16, 32, 4, 1, rank_tile=32),
}


def block_config(table: dict, experts: int, rank: int, dtype: torch.dtype) -> BlockConfig:
    return table[(block_columns(experts, rank), dtype_group(dtype))]


# --------------------------------------------------------------------------------------------
# Variants (kernels.use_variant("sparse_adapter", name), or the ops' variant= argument)
# --------------------------------------------------------------------------------------------

VARIANTS = (
    Variant("default", "dense-masked, one forward launch: all experts' weights stacked, unselected experts "
                       "zeroed after the activation; block rows planned from M and the SM count; the "
                       "backward recomputes act(h) from h"),
    Variant("rows16", "dense-masked, 16 rows per program in the row-tile launches", block_rows=16),
    Variant("rows64", "dense-masked, 64 rows per program in the row-tile launches (the configuration's own "
                      "where fewer)", block_rows=64),
    Variant("store_act", "dense-masked; the backward's first launch also writes act(h) * weights [M, E*r] for "
                         "the second to read, instead of recomputing it", store_act=True),
    Variant("grouped", "grouped: assignments sorted by expert, each program one expert's tile (FLOPs "
                       "proportional to k); gate, grouped and combine launches forward, three backward; the "
                       "design for E*r > 256", grouped=True),
)
register_variants("sparse_adapter", VARIANTS)
DEFAULT_VARIANT = VARIANTS[0]
_VARIANTS_BY_NAME = {variant.name: variant for variant in VARIANTS}


def row_config(table: dict, experts: int, rank: int, dtype: torch.dtype, rows: int, sms: int,
               variant: Variant) -> BlockConfig:
    return variant_config(block_config(table, experts, rank, dtype), rows, sms, variant.block_rows)


def partials_size(experts: int, rank: int, dim: int, blocks: int = 1) -> int:
    """One chunk's partials [dw_up (E x D x r) | dw_down (E x r x D) | db_up (E x D) |
    db_down (E x r) | dw_gate (E x D) | db_gate (E) | dscale per stacked-column block
    (blocks x D)]; with blocks = 1, the packed gradients."""
    columns = experts * rank
    return 2 * columns * dim + 2 * experts * dim + columns + experts + blocks * dim



# --------------------------------------------------------------------------------------------
# Launch plans
# --------------------------------------------------------------------------------------------


def forward_launch(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, scale_value,
                   residual, add_input, row_scale, top_k, activation, compute_dtype, y, hidden, weights, logits,
                   variant: Variant = DEFAULT_VARIANT) -> Launch:
    """The forward launch for 2-D x [M, D] writing y [M, D]; hidden [M, E*r] and weights [M, E]
    when they have M rows (saved for backward), logits [M, E] when it has M rows."""
    rows, dim = x.shape
    experts, rank, _ = w_down.shape
    config = row_config(FORWARD_CONFIGS, experts, rank, compute_dtype, rows, sm_count(x.device), variant)
    gated = w_gate is not None
    save = hidden.shape[0] == rows
    args = dict(
        x_ptr=x, w_gate_ptr=optional(w_gate, x), b_gate_ptr=optional(b_gate, x),
        expert_idx_ptr=x if expert_idx is None else expert_idx,
        expert_weight_ptr=x if expert_weight is None else expert_weight,
        w_down_ptr=w_down.contiguous(), b_down_ptr=optional(b_down, x), w_up_ptr=w_up.contiguous(),
        b_up_ptr=optional(b_up, x), scale_ptr=optional(scale, x), residual_ptr=x if residual is None else residual,
        row_scale_ptr=optional(row_scale, x), y_ptr=y, hidden_ptr=hidden if save else y,
        weights_ptr=weights if save else y, logits_ptr=logits if logits.shape[0] == rows else y,
        rows=rows, dim=dim, rank=rank, experts=experts, scale_value=scale_value,
        stride_x_row=x.stride(0), stride_x_col=x.stride(1),
        stride_res_row=residual.stride(0) if residual is not None else 0,
        stride_res_col=residual.stride(1) if residual is not None else 0,
        stride_idx_row=expert_idx.stride(0) if expert_idx is not None else 0,
        stride_idx_col=expert_idx.stride(1) if expert_idx is not None else 0,
        stride_w_row=expert_weight.stride(0) if expert_weight is not None else 0,
        stride_w_col=expert_weight.stride(1) if expert_weight is not None else 0,
    )
    constexprs = dict(
        TOP_K=top_k, GATED=gated, ACTIVATION=activation, SCALE_MODE=scale_mode(scale),
        HAS_B_GATE=gated and b_gate is not None, HAS_B_DOWN=b_down is not None, HAS_B_UP=b_up is not None,
        HAS_RESIDUAL=residual is not None, ADD_INPUT=add_input, HAS_ROW_SCALE=row_scale is not None, SAVE=save,
        STORE_LOGITS=gated and logits.shape[0] == rows, COMPUTE_DTYPE=TRITON_DTYPES[compute_dtype],
        INPUT_PRECISION=input_precision(compute_dtype), BLOCK_ROWS=config.block_rows, BLOCK_DIM=config.block_dim,
        BLOCK_EXPERTS=block_experts(experts), BLOCK_COLUMNS=block_columns(experts, rank),
    )
    return Launch(_sparse_forward_kernel, (triton.cdiv(rows, config.block_rows),), args, constexprs, config)


def backward_launches(grad_y, grad_logits, x, hidden, weights, w_gate, w_down, w_up, b_up, scale, scale_value,
                      row_scale, activation, compute_dtype, add_grad_y, grad_hidden, grad_weights, act, grad_x,
                      grad_dtype=torch.float32, variant: Variant = DEFAULT_VARIANT):
    """The two backward launches and the partials buffer [chunks, partials_size] they fill.

    The first writes grad_hidden [M, E*r] (compute dtype), grad_weights [M, E] (fp32: d logits
    for the gated form, d weights for the routed form) and grad_x when it has M rows (plus dy
    with add_grad_y); act [M, E*r] too when it has M rows (store_act), else the second launch
    recomputes act(h) * weights. grad_logits: the logits output's own gradient [M, E], or None."""
    rows, dim = x.shape
    experts, rank, _ = w_down.shape
    sms = sm_count(x.device)
    input_config = row_config(BACKWARD_INPUT_CONFIGS, experts, rank, compute_dtype, rows, sms, variant)
    weights_config = block_config(BACKWARD_WEIGHTS_CONFIGS, experts, rank, compute_dtype)
    gated = w_gate is not None
    store_act = act.shape[0] == rows
    compute_dx = grad_x.shape[0] == rows
    mode = scale_mode(scale)
    precision = input_precision(compute_dtype)
    triton_dtype = TRITON_DTYPES[compute_dtype]
    scale_c, row_scale_c, b_up_c = optional(scale, x), optional(row_scale, x), optional(b_up, x)
    w_down, w_up = w_down.contiguous(), w_up.contiguous()
    padded_columns = block_columns(experts, rank)
    column_tile = weights_config.rank_tile or padded_columns

    row_tiles = triton.cdiv(rows, weights_config.block_rows)
    col_tiles = triton.cdiv(dim, weights_config.block_dim)
    blocks = triton.cdiv(experts * rank, column_tile)
    chunks = plan_chunks(rows, dim, row_tiles, col_tiles * blocks, sms, x.element_size(),
                         partials_size(experts, rank, dim, blocks))
    tiles_per_chunk = triton.cdiv(row_tiles, chunks)
    chunks = triton.cdiv(row_tiles, tiles_per_chunk)
    partials = new_output((chunks, partials_size(experts, rank, dim, blocks)),
                          grad_dtype if chunks == 1 else torch.float32, x.device)

    input_launch = Launch(
        _sparse_backward_input_kernel,
        (triton.cdiv(rows, input_config.block_rows),),
        dict(
            grad_y_ptr=grad_y, grad_logits_ptr=grad_logits if grad_logits is not None else grad_weights,
            hidden_ptr=hidden, weights_ptr=weights, w_gate_ptr=optional(w_gate, x), w_down_ptr=w_down,
            w_up_ptr=w_up, b_up_ptr=b_up_c, scale_ptr=scale_c, row_scale_ptr=row_scale_c,
            grad_hidden_ptr=grad_hidden, grad_weights_ptr=grad_weights, act_ptr=act if store_act else grad_hidden,
            grad_x_ptr=grad_x if compute_dx else grad_hidden,
            rows=rows, dim=dim, rank=rank, experts=experts, scale_value=scale_value,
            stride_g_row=grad_y.stride(0), stride_g_col=grad_y.stride(1),
        ),
        dict(
            GATED=gated, HAS_GRAD_LOGITS=gated and grad_logits is not None, ACTIVATION=activation, SCALE_MODE=mode,
            HAS_B_UP=b_up is not None, HAS_ROW_SCALE=row_scale is not None, STORE_ACT=store_act,
            COMPUTE_DX=compute_dx, ADD_GRAD_Y=compute_dx and add_grad_y, COMPUTE_DTYPE=triton_dtype,
            INPUT_PRECISION=precision, BLOCK_ROWS=input_config.block_rows, BLOCK_DIM=input_config.block_dim,
            BLOCK_EXPERTS=block_experts(experts), BLOCK_COLUMNS=padded_columns,
        ),
        input_config,
    )
    weights_launch = Launch(
        _sparse_backward_weights_kernel,
        (chunks, col_tiles, blocks),
        dict(
            grad_y_ptr=grad_y, x_ptr=x, hidden_ptr=hidden, act_ptr=act if store_act else hidden, weights_ptr=weights,
            grad_hidden_ptr=grad_hidden, grad_logits_ptr=grad_weights, w_up_ptr=w_up, b_up_ptr=b_up_c,
            scale_ptr=scale_c, row_scale_ptr=row_scale_c, partials_ptr=partials,
            rows=rows, dim=dim, rank=rank, experts=experts, scale_value=scale_value,
            tiles_per_chunk=tiles_per_chunk,
            stride_g_row=grad_y.stride(0), stride_g_col=grad_y.stride(1),
            stride_x_row=x.stride(0), stride_x_col=x.stride(1),
        ),
        dict(
            GATED=gated, ACTIVATION=activation, RECOMPUTE_ACT=not store_act, SCALE_MODE=mode,
            HAS_B_UP=b_up is not None, HAS_ROW_SCALE=row_scale is not None, COMPUTE_DTYPE=triton_dtype,
            INPUT_PRECISION=precision, BLOCK_ROWS=weights_config.block_rows, BLOCK_DIM=weights_config.block_dim,
            BLOCK_EXPERTS=block_experts(experts), BLOCK_COLUMNS=column_tile,
        ),
        weights_config,
    )
    return input_launch, weights_launch, partials


# --------------------------------------------------------------------------------------------
# Runners: plan, pick the variant, launch
# --------------------------------------------------------------------------------------------


def _variant(name: str, pass_name: str, key, device, time_variant) -> Variant:
    """The dense design's variant: the op's variant= argument when given, else the one in force
    (use_variant / autotune, which times the dense variants only)."""
    chosen = _VARIANTS_BY_NAME[name] if name else pick("sparse_adapter", pass_name, key, device, time_variant,
                                                        among=lambda variant: not variant.grouped)
    return DEFAULT_VARIANT if chosen.grouped else chosen



def _forward_triton(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, scale_value,
                    residual, add_input, row_scale, top_k, activation, compute_dtype, out_dtype, save, return_logits,
                    variant):
    rows, dim = x.shape
    experts, rank, _ = w_down.shape
    y = new_output((rows, dim), out_dtype, x.device)
    hidden = new_output((rows if save else 0, experts * rank), compute_dtype, x.device)
    weights = new_output((rows if save else 0, experts), torch.float32, x.device)
    logits = new_output((rows if return_logits else 0, experts), torch.float32, x.device)
    if rows == 0:
        return y, hidden, weights, logits
    x = int32_columns(x)
    residual = int32_columns(residual) if residual is not None else None

    def plan(chosen):
        return forward_launch(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale,
                              scale_value, residual, add_input, row_scale, top_k, activation, compute_dtype, y,
                              hidden, weights, logits, chosen)

    with device_context(x):
        def key():
            return (tuple(x.shape), x.stride(), x.dtype, tuple(w_down.shape), w_gate is not None, top_k,
                    scale_mode(scale), None if residual is None else (residual.dtype, residual.stride()),
                    row_scale is not None, add_input, activation, compute_dtype, out_dtype, save, return_logits)

        chosen = _variant(variant, "forward", key, x.device, lambda v: time_cuda(plan(v)))
        plan(chosen)()
    return y, hidden, weights, logits


def _backward_triton(grad_y, grad_logits, x, hidden, weights, w_gate, w_down, w_up, b_up, scale, scale_value,
                     row_scale, activation, compute_dtype, add_grad_y, compute_dx, grad_dtype, variant):
    rows, dim = x.shape
    experts, rank, _ = w_down.shape
    grad_x = new_output((rows if compute_dx else 0, dim), x.dtype, x.device)
    grad_weights = new_output((rows, experts), torch.float32, x.device)
    if rows == 0:
        return grad_x, torch.zeros(partials_size(experts, rank, dim), dtype=grad_dtype, device=x.device), grad_weights
    if hidden.shape[0] != rows:
        raise RuntimeError("sparse_adapter: backward without the saved hidden layer (the forward ran with save=False)")
    grad_hidden = new_output((rows, experts * rank), compute_dtype, x.device)
    grad_y, x = int32_columns(grad_y), int32_columns(x)

    def plan(chosen):
        act = new_output((rows if chosen.store_act else 0, experts * rank), compute_dtype, x.device)
        return backward_launches(grad_y, grad_logits, x, hidden, weights, w_gate, w_down, w_up, b_up, scale,
                                 scale_value, row_scale, activation, compute_dtype, add_grad_y, grad_hidden,
                                 grad_weights, act, grad_x, grad_dtype, chosen)

    def run(launches):
        launches[0]()
        launches[1]()

    with device_context(x):
        def key():
            return (tuple(x.shape), x.stride(), grad_y.stride(), tuple(w_down.shape), w_gate is not None,
                    grad_logits is not None, scale_mode(scale), row_scale is not None, add_grad_y, compute_dx,
                    activation, compute_dtype, grad_dtype)

        chosen = _variant(variant, "backward", key, x.device, lambda v: time_cuda(lambda: run(plan(v))))
        launches = plan(chosen)
        run(launches)
    partials = launches[2]
    # One deterministic reduction over chunks for every parameter gradient (none with one chunk).
    totals = partials[0] if partials.shape[0] == 1 else partials.sum(dim=0).to(grad_dtype)
    blocks = launches[1].grid[2]
    if blocks > 1:  # one dscale row per stacked-column block: fold them into the first
        scale_rows = totals[partials_size(experts, rank, dim) - dim:].view(blocks, dim)
        scale_rows[0] = scale_rows.float().sum(0).to(grad_dtype)
    return grad_x, totals[:partials_size(experts, rank, dim)], grad_weights


def _unpack_param_grads(packed, w_gate, b_gate, w_down, b_down, w_up, b_up, scale):
    """(dw_gate, db_gate, dw_down, db_down, dw_up, db_up, dscale), each in its parameter's dtype."""
    experts, rank, dim = w_down.shape
    columns = experts * rank
    grad_w_up, grad_w_down, grad_b_up, grad_b_down, grad_w_gate, grad_b_gate, grad_scale = packed.split(
        [columns * dim, columns * dim, experts * dim, columns, experts * dim, experts, dim]
    )

    def cast(grad, param, shape):
        return None if param is None else grad.view(shape).to(param.dtype)

    if scale is None:
        grad_scale = None
    elif scale.numel() == 1:
        grad_scale = grad_scale.float().sum().reshape(scale.shape).to(scale.dtype)
    else:
        grad_scale = grad_scale.to(scale.dtype)
    return (cast(grad_w_gate, w_gate, (experts, dim)), cast(grad_b_gate, b_gate, (experts,)),
            cast(grad_w_down, w_down, (experts, rank, dim)), cast(grad_b_down, b_down, (experts, rank)),
            cast(grad_w_up, w_up, (experts, dim, rank)), cast(grad_b_up, b_up, (experts, dim)), grad_scale)


# --------------------------------------------------------------------------------------------
# torch.library ops: one graph node each for torch.compile
# --------------------------------------------------------------------------------------------


def _forward_impl(
    x: torch.Tensor, w_gate: Optional[torch.Tensor], b_gate: Optional[torch.Tensor],
    expert_idx: Optional[torch.Tensor], expert_weight: Optional[torch.Tensor], w_down: torch.Tensor,
    b_down: Optional[torch.Tensor], w_up: torch.Tensor, b_up: Optional[torch.Tensor], scale: Optional[torch.Tensor],
    scale_value: float, residual: Optional[torch.Tensor], add_input: bool, row_scale: Optional[torch.Tensor],
    top_k: int, activation: str, compute_dtype: torch.dtype, out_dtype: torch.dtype, save: bool,
    return_logits: bool, variant: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """2-D x [M, D]. Returns y [M, D], and hidden [M, E*r] and weights [M, E] when saved (else 0
    rows), logits [M, E] when asked (else 0 rows). Gated form when w_gate is given, routed form
    (expert_idx, expert_weight [M, k]) otherwise."""
    return _forward_triton(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale,
                           scale_value, residual, add_input, row_scale, top_k, activation, compute_dtype, out_dtype,
                           save, return_logits, variant)


_forward_op = torch.library.custom_op("fused_adapters::sparse_forward", _forward_impl, mutates_args=())


@_forward_op.register_fake
def _forward_fake(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, scale_value,
                  residual, add_input, row_scale, top_k, activation, compute_dtype, out_dtype, save, return_logits,
                  variant):
    rows = x.shape[0]
    experts, rank, _ = w_down.shape
    return (x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty((rows if save else 0, experts * rank), dtype=compute_dtype),
            x.new_empty((rows if save else 0, experts), dtype=torch.float32),
            x.new_empty((rows if return_logits else 0, experts), dtype=torch.float32))


def _backward_impl(
    grad_y: torch.Tensor, grad_logits: Optional[torch.Tensor], x: torch.Tensor, hidden: torch.Tensor,
    weights: torch.Tensor, w_gate: Optional[torch.Tensor], w_down: torch.Tensor, w_up: torch.Tensor,
    b_up: Optional[torch.Tensor], scale: Optional[torch.Tensor], scale_value: float,
    row_scale: Optional[torch.Tensor], activation: str, compute_dtype: torch.dtype, add_grad_y: bool,
    compute_dx: bool, grad_dtype: torch.dtype, variant: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx ([M, D] in x's dtype, or [0, D]; plus dy when add_grad_y), the packed parameter
    gradients (partials_size, in grad_dtype) and grad_weights [M, E] fp32: d logits for the gated
    form, d weights per expert for the routed form."""
    return _backward_triton(grad_y, grad_logits, x, hidden, weights, w_gate, w_down, w_up, b_up, scale, scale_value,
                            row_scale, activation, compute_dtype, add_grad_y, compute_dx, grad_dtype, variant)


_backward_op = torch.library.custom_op("fused_adapters::sparse_backward", _backward_impl, mutates_args=())


@_backward_op.register_fake
def _backward_fake(grad_y, grad_logits, x, hidden, weights, w_gate, w_down, w_up, b_up, scale, scale_value,
                   row_scale, activation, compute_dtype, add_grad_y, compute_dx, grad_dtype, variant):
    experts, rank, dim = w_down.shape
    return (x.new_empty((x.shape[0] if compute_dx else 0, dim)),
            x.new_empty(partials_size(experts, rank, dim), dtype=grad_dtype),
            x.new_empty((x.shape[0], experts), dtype=torch.float32))


# Positions of the forward op's inputs, for needs_input_grad.
(_X, _W_GATE, _B_GATE, _EXPERT_IDX, _EXPERT_WEIGHT, _W_DOWN, _B_DOWN, _W_UP, _B_UP, _SCALE, _SCALE_VALUE, _RESIDUAL,
 _ADD_INPUT, _ROW_SCALE, _TOP_K, _ACTIVATION, _COMPUTE_DTYPE, _OUT_DTYPE, _SAVE, _RETURN_LOGITS,
 _VARIANT) = range(21)
_FORWARD_INPUTS = 21


def _setup_context(ctx, inputs, output):
    _, hidden, weights, _ = output
    ctx.mark_non_differentiable(hidden, weights)
    ctx.set_materialize_grads(False)
    # x by reference, the parameters, and M x (E*r + E) of the forward's own: nothing M x D.
    ctx.save_for_backward(inputs[_X], inputs[_W_GATE], inputs[_B_GATE], inputs[_EXPERT_IDX], inputs[_EXPERT_WEIGHT],
                          inputs[_W_DOWN], inputs[_B_DOWN], inputs[_W_UP], inputs[_B_UP], inputs[_SCALE],
                          inputs[_ROW_SCALE], hidden, weights)
    ctx.scale_value = inputs[_SCALE_VALUE]
    ctx.activation = inputs[_ACTIVATION]
    ctx.compute_dtype = inputs[_COMPUTE_DTYPE]
    ctx.out_dtype = inputs[_OUT_DTYPE]
    ctx.add_input = inputs[_ADD_INPUT]
    ctx.variant = inputs[_VARIANT]
    ctx.residual_dtype = inputs[_RESIDUAL].dtype if inputs[_RESIDUAL] is not None else None


def _backward(ctx, grad_y, grad_hidden, grad_weights, grad_logits):
    (x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, row_scale, hidden,
     weights) = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grad_y is None and grad_logits is None:
        return (None,) * len(needs)
    if torch.is_grad_enabled():
        raise RuntimeError(
            "sparse_adapter / routed_adapter do not support double backward (create_graph=True / higher-order "
            "gradients); run that computation with fused_adapters.kernels.reference"
        )
    if grad_y is None:  # only the logits were used (an auxiliary loss): dy is zero
        grad_y = x.new_zeros(x.shape, dtype=ctx.out_dtype)
    grad_dtype = packed_grad_dtype(x, w_gate, b_gate, w_down, b_down, w_up, b_up, scale)
    grad_x, packed, grad_routing = torch.ops.fused_adapters.sparse_backward(
        grad_y, grad_logits, x, hidden, weights, w_gate, w_down, w_up, b_up, scale, ctx.scale_value, row_scale,
        ctx.activation, ctx.compute_dtype, ctx.add_input, needs[_X], grad_dtype, ctx.variant,
    )
    param_grads = _unpack_param_grads(packed, w_gate, b_gate, w_down, b_down, w_up, b_up, scale)
    grads = [None] * _FORWARD_INPUTS
    grads[_X] = grad_x if needs[_X] else None
    for position, grad in zip((_W_GATE, _B_GATE, _W_DOWN, _B_DOWN, _W_UP, _B_UP, _SCALE), param_grads):
        grads[position] = grad if needs[position] else None
    if needs[_EXPERT_WEIGHT]:
        # d weight of slot j = d weight of its expert (a repeated expert gets the same gradient).
        grads[_EXPERT_WEIGHT] = grad_routing.gather(1, expert_idx.long()).to(expert_weight.dtype)
    grads[_RESIDUAL] = grad_y.to(ctx.residual_dtype) if needs[_RESIDUAL] else None
    return tuple(grads)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# The grouped design's ops: the same inputs; the routing ([M, k] experts and weights), the sort
# and the hidden layer by sorted position are what it saves.


def _grouped_forward_impl(
    x: torch.Tensor, w_gate: Optional[torch.Tensor], b_gate: Optional[torch.Tensor],
    expert_idx: Optional[torch.Tensor], expert_weight: Optional[torch.Tensor], w_down: torch.Tensor,
    b_down: Optional[torch.Tensor], w_up: torch.Tensor, b_up: Optional[torch.Tensor], scale: Optional[torch.Tensor],
    scale_value: float, residual: Optional[torch.Tensor], add_input: bool, row_scale: Optional[torch.Tensor],
    top_k: int, activation: str, compute_dtype: torch.dtype, out_dtype: torch.dtype, save: bool,
    return_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y [M, D], hidden [M*k, r] (0 rows unless save), idx [M, k] int32, weights [M, k] fp32,
    order [M*k] int64, counts [E] int64, logits [M, E] (0 rows unless asked)."""
    return grouped_forward(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale,
                           scale_value, residual, add_input, row_scale, top_k, activation, compute_dtype, out_dtype,
                           save, return_logits, sm_count(x.device))


_grouped_forward_op = torch.library.custom_op("fused_adapters::sparse_grouped_forward", _grouped_forward_impl,
                                              mutates_args=())


@_grouped_forward_op.register_fake
def _grouped_forward_fake(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale,
                          scale_value, residual, add_input, row_scale, top_k, activation, compute_dtype, out_dtype,
                          save, return_logits):
    rows = x.shape[0]
    experts, rank, _ = w_down.shape
    if expert_idx is not None:
        top_k = expert_idx.shape[1]
    return (x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty((rows * top_k if save else 0, rank), dtype=compute_dtype),
            x.new_empty((rows, top_k), dtype=torch.int32), x.new_empty((rows, top_k), dtype=torch.float32),
            x.new_empty((rows * top_k,), dtype=torch.int64), x.new_empty((experts,), dtype=torch.int64),
            x.new_empty((rows if return_logits else 0, experts), dtype=torch.float32))


def _grouped_backward_impl(
    grad_y: torch.Tensor, grad_logits: Optional[torch.Tensor], x: torch.Tensor, hidden: torch.Tensor,
    idx: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, counts: torch.Tensor,
    w_gate: Optional[torch.Tensor], w_down: torch.Tensor, w_up: torch.Tensor, b_up: Optional[torch.Tensor],
    scale: Optional[torch.Tensor], scale_value: float, row_scale: Optional[torch.Tensor], activation: str,
    compute_dtype: torch.dtype, add_grad_y: bool, compute_dx: bool, grad_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx ([M, D] or [0, D]), the packed parameter gradients (partials_size, grad_dtype) and
    d weights [M, k] fp32 (the routed form's expert_weight gradient)."""
    if hidden.shape[0] != x.shape[0] * idx.shape[1]:
        raise RuntimeError("sparse_adapter: backward without the saved hidden layer (the forward ran with save=False)")
    return grouped_backward(grad_y, grad_logits, x, hidden, idx, weights, order, counts, w_gate, w_down, w_up, b_up,
                            scale, scale_value, row_scale, activation, compute_dtype, add_grad_y, compute_dx,
                            grad_dtype, sm_count(x.device))


_grouped_backward_op = torch.library.custom_op("fused_adapters::sparse_grouped_backward", _grouped_backward_impl,
                                               mutates_args=())


@_grouped_backward_op.register_fake
def _grouped_backward_fake(grad_y, grad_logits, x, hidden, idx, weights, order, counts, w_gate, w_down, w_up, b_up,
                           scale, scale_value, row_scale, activation, compute_dtype, add_grad_y, compute_dx,
                           grad_dtype):
    experts, rank, dim = w_down.shape
    return (x.new_empty((x.shape[0] if compute_dx else 0, dim)),
            x.new_empty(partials_size(experts, rank, dim), dtype=grad_dtype),
            x.new_empty(idx.shape, dtype=torch.float32))


def _grouped_setup_context(ctx, inputs, output):
    _, hidden, idx, weights, order, counts, _ = output
    ctx.mark_non_differentiable(hidden, idx, weights, order, counts)
    ctx.set_materialize_grads(False)
    # x by reference, the parameters, M*k x (r + 3) + E of the forward's own: nothing M x D.
    ctx.save_for_backward(inputs[_X], inputs[_W_GATE], inputs[_B_GATE], inputs[_EXPERT_WEIGHT], inputs[_W_DOWN],
                          inputs[_B_DOWN], inputs[_W_UP], inputs[_B_UP], inputs[_SCALE], inputs[_ROW_SCALE], hidden,
                          idx, weights, order, counts)
    ctx.scale_value = inputs[_SCALE_VALUE]
    ctx.activation = inputs[_ACTIVATION]
    ctx.compute_dtype = inputs[_COMPUTE_DTYPE]
    ctx.out_dtype = inputs[_OUT_DTYPE]
    ctx.add_input = inputs[_ADD_INPUT]
    ctx.residual_dtype = inputs[_RESIDUAL].dtype if inputs[_RESIDUAL] is not None else None


def _grouped_backward(ctx, grad_y, grad_hidden, grad_idx, grad_weights, grad_order, grad_counts, grad_logits):
    (x, w_gate, b_gate, expert_weight, w_down, b_down, w_up, b_up, scale, row_scale, hidden, idx, weights, order,
     counts) = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grad_y is None and grad_logits is None:
        return (None,) * len(needs)
    if torch.is_grad_enabled():
        raise RuntimeError(
            "sparse_adapter / routed_adapter do not support double backward (create_graph=True / higher-order "
            "gradients); run that computation with fused_adapters.kernels.reference"
        )
    if grad_y is None:  # only the logits were used (an auxiliary loss): dy is zero
        grad_y = x.new_zeros(x.shape, dtype=ctx.out_dtype)
    grad_dtype = packed_grad_dtype(x, w_gate, b_gate, w_down, b_down, w_up, b_up, scale)
    grad_x, packed, grad_routing = torch.ops.fused_adapters.sparse_grouped_backward(
        grad_y, grad_logits, x, hidden, idx, weights, order, counts, w_gate, w_down, w_up, b_up, scale,
        ctx.scale_value, row_scale, ctx.activation, ctx.compute_dtype, ctx.add_input, needs[_X], grad_dtype,
    )
    param_grads = _unpack_param_grads(packed, w_gate, b_gate, w_down, b_down, w_up, b_up, scale)
    grads = [None] * (_FORWARD_INPUTS - 1)
    grads[_X] = grad_x if needs[_X] else None
    for position, grad in zip((_W_GATE, _B_GATE, _W_DOWN, _B_DOWN, _W_UP, _B_UP, _SCALE), param_grads):
        grads[position] = grad if needs[position] else None
    if needs[_EXPERT_WEIGHT]:
        grads[_EXPERT_WEIGHT] = grad_routing.to(expert_weight.dtype)
    grads[_RESIDUAL] = grad_y.to(ctx.residual_dtype) if needs[_RESIDUAL] else None
    return tuple(grads)


_grouped_forward_op.register_autograd(_grouped_backward, setup_context=_grouped_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def choose_design(experts: int, rank: int, variant: str = "") -> str:
    """"dense" or "grouped": the design a call with E experts of rank r runs.

    A variant given (variant=, or use_variant) decides, except that the dense design holds
    [rows, E*r] tiles in registers and so runs only where E*r <= MAX_DENSE_COLUMNS. Otherwise the
    rule is by shape: dense where it fits, grouped above. Counted bytes (fp16, D = 768,
    M = 1576, E = 8, r = 16, k = 2, 132 SMs): dense 1.18x the floor forward and 1.73x backward,
    grouped 4.13x and 3.26x (k gathers of x and an [M*k, D] round trip), while the dense design's
    extra FLOPs (E/k times the chosen experts') stay below the bytes' time up to E*r ~ 256 on an
    H100 (E*r multiply-adds per byte of x against ~300 fp16 tensor-core FLOP per byte of DRAM
    bandwidth). So the dense design wins wherever it fits.
    """
    name = variant or current_variant("sparse_adapter")
    grouped = name in _VARIANTS_BY_NAME and _VARIANTS_BY_NAME[name].grouped
    return "grouped" if grouped or experts * rank > MAX_DENSE_COLUMNS else "dense"


def uses_kernels(x: torch.Tensor, experts: int, rank: int) -> bool:
    """Whether a sparse/routed call on x with E experts of rank r takes the Triton kernels here
    (CUDA, or the interpreter; rank up to 256) rather than the eager expert loop."""
    return rank <= MAX_GROUPED_RANK and takes_triton(x.device.type, (x.dtype, reference.compute_dtype(x)))


def uses_dense_kernels(x: torch.Tensor, experts: int, rank: int) -> bool:
    """Whether such a call takes the dense design's kernels (uses_kernels, and E*r up to
    MAX_DENSE_COLUMNS, without a grouped variant in force)."""
    return uses_kernels(x, experts, rank) and choose_design(experts, rank) == "dense"


def _check_variant(variant) -> str:
    if variant is None:
        return ""
    if not isinstance(variant, str) or variant not in _VARIANTS_BY_NAME:
        raise ValueError(f"variant must be one of {sorted(_VARIANTS_BY_NAME)} or None, got {variant!r}")
    return variant


def _run(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, top_k, activation,
         residual, row_scale, return_logits, variant, check_range=True):
    """Both public forms after their checks: the kernels, or the reference where they cannot run."""
    scale_tensor, scale_value, terms = check_sparse_arguments(
        x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, activation, residual,
        row_scale, top_k, MAX_EXPERTS, check_range)
    variant = _check_variant(variant)
    experts, rank, dim = w_down.shape
    compute_dtype = reference.compute_dtype(x)
    autocast = x.dtype in reference.AUTOCAST_INPUT_DTYPES and torch.is_autocast_enabled(x.device.type)
    out_dtype = reference.output_dtype(compute_dtype, autocast, scale_tensor, terms)
    params = (w_gate, b_gate, expert_weight, w_down, b_down, w_up, b_up, scale_tensor)
    dtypes = (x.dtype, compute_dtype, out_dtype) + tuple(p.dtype for p in params if p is not None)
    dtypes += tuple(term.dtype for term in terms)
    if rank > MAX_GROUPED_RANK or not takes_triton(x.device.type, dtypes):
        too_large = f"rank {rank} > {MAX_GROUPED_RANK} (the kernels hold a rank tile in registers)"
        warn_reference("sparse_adapter" if w_gate is not None else "routed_adapter", x.device.type, dtypes,
                       reason=too_large if rank > MAX_GROUPED_RANK else None)
        scale_arg = scale_tensor if scale_tensor is not None else (None if scale_value == 1.0 else scale_value)
        if w_gate is not None:
            return reference.sparse_adapter(x, w_gate, b_gate, w_down, b_down, w_up, b_up, scale_arg, top_k=top_k,
                                            activation=activation, residual=residual, row_scale=row_scale,
                                            return_logits=return_logits)
        return reference.routed_adapter(x, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale_arg,
                                        activation=activation, residual=residual, row_scale=row_scale)

    scale_tensor, scale_value, add_input, skip2d = epilogue_arguments(x, scale_tensor, scale_value, terms)
    x2d = x.reshape(-1, dim)
    if row_scale is not None:
        row_scale = row_scale.detach()
    if expert_idx is not None:
        top_k = expert_idx.shape[-1]
        # [M, k] views, read through their strides (the kernel takes any layout: no copy).
        expert_idx = expert_idx.reshape(-1, top_k)
        expert_weight = expert_weight.reshape(-1, top_k)
    tensors = (x, w_gate, b_gate, expert_weight, w_down, b_down, w_up, b_up, scale_tensor, *terms)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if choose_design(experts, rank, variant) == "grouped":
        y, *_, logits = torch.ops.fused_adapters.sparse_grouped_forward(
            x2d, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale_tensor, scale_value,
            skip2d, add_input, row_scale, top_k, activation, compute_dtype, out_dtype, save, return_logits,
        )
    else:
        y, _, _, logits = torch.ops.fused_adapters.sparse_forward(
            x2d, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale_tensor, scale_value,
            skip2d, add_input, row_scale, top_k, activation, compute_dtype, out_dtype, save, return_logits, variant,
        )
    y = y.view(x.shape)
    return (y, logits) if return_logits else y


def sparse_adapter(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    b_gate: Optional[torch.Tensor],
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    scale: Union[torch.Tensor, float, None] = None,
    *,
    top_k: int,
    activation: str = "gelu",
    residual=None,
    row_scale: Optional[torch.Tensor] = None,
    return_logits: bool = False,
    variant: Optional[str] = None,
):
    """Sparse top-k gated mixture of E bottleneck adapters:
    logits = x @ w_gate.T + b_gate (fp32), each row routed to its top_k experts (ties to the lower
    expert index) with weights p = softmax over the chosen logits, and
    y = residual + scale * (row_scale[:, None] * sum_j p_j * (act(x @ w_down[e_j].T + b_down[e_j])
    @ w_up[e_j].T + b_up[e_j])).

    x [..., D]; w_gate [E, D], b_gate [E] or None; w_down [E, r, D], b_down [E, r] or None,
    w_up [E, D, r], b_up [E, D] or None; E from 1 to 64. scale, residual, row_scale and
    activation as in bottleneck_adapter (shared by the experts). Returns y, or (y, logits) with
    return_logits: logits [M, E] fp32, differentiable (for load_balancing_loss).

    Gradients reach x, the gate (through the weights), every expert parameter, scale and the
    residual. CUDA tensors run the Triton kernels (the dense design, one launch forward and two
    backward, for E*r up to 256; the grouped design above), as does the interpreter under
    TRITON_INTERPRET=1; elsewhere, and where r > 256, the eager expert loop of kernels.reference
    runs (kernels.backend(x) names the path; a CUDA call that falls back warns once). variant:
    one of list_variants("sparse_adapter") for this call's forward and backward (default: the
    one in force, see use_variant).
    """
    return _run(x, w_gate, b_gate, None, None, w_down, b_down, w_up, b_up, scale, top_k, activation, residual,
                row_scale, bool(return_logits), variant)


def routed_adapter(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    expert_weight: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    scale: Union[torch.Tensor, float, None] = None,
    *,
    activation: str = "gelu",
    residual=None,
    row_scale: Optional[torch.Tensor] = None,
    variant: Optional[str] = None,
) -> torch.Tensor:
    """The mixture with the routing given per row: expert_idx [M, k] (integers 0..E-1; a repeated
    expert adds its weights) and expert_weight [M, k] (differentiable) instead of a gate;
    otherwise as sparse_adapter. Multi-task batches pass each row's task adapter with weight 1
    (k = 1); per-image routing passes the same experts for all of an image's tokens.

    expert_idx is checked against E (one device sync on CUDA, skipped under torch.compile).
    """
    return _run(x, None, None, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, 0, activation,
                residual, row_scale, False, variant)


def routed_adapter_unchecked(x, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale=None, *,
                             activation="gelu", residual=None, row_scale=None, variant=None) -> torch.Tensor:
    """routed_adapter for indices that are in range by construction (the package's modules: a
    top-k of the gate, a task index): every check but the one that reads expert_idx's values,
    so no device sync inside a model's forward."""
    return _run(x, None, None, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, 0, activation,
                residual, row_scale, False, variant, check_range=False)
