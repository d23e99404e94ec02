"""The sparse mixture's launch plans, both designs: the one place that turns shapes, dtypes, flags
and a variant into Launch records and the buffers they write (the op runs them, the compile
check compiles them, the benchmark counts them), and the choice between the designs.

Dense: forward one launch, backward two (input, weights). Grouped: the gate launch (gated form),
then, after the runtime's sort of the assignments, the grouped launch and the combine launch
(k > 1) forward; the grouped input, combine and weights launches backward.

The output width D_out is w_up's (w_up [E, D_out, r]): D for an adapter, another width for a
width-changing mixture (per-task LoRA on qkv, fc1, fc2). The kernels compile the D_out = D case
as their SAME_WIDTH specialization, the code they ran before D_out existed.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..dropout import launch_args as dropout_args
from ..launch import (
    PARTIALS_BUDGET, TRITON_DTYPES, BlockConfig, Launch, PackedLayout, Plan, cdiv, dtype_group, input_precision,
    new_output, optional, padded_rank, plan_block_rows, plan_chunks, scale_mode, sm_count, variant_config,
)
from ..variants import Variant, current_variant
from .configs import (
    BACKWARD_COMBINE_CONFIGS, BACKWARD_INPUT_CONFIGS, BACKWARD_INPUT_WIDE_CONFIGS, BACKWARD_WEIGHTS_CONFIGS,
    BACKWARD_WEIGHTS_WIDE_CONFIGS, COMBINE_CONFIGS, DEFAULT_VARIANT, FORWARD_CONFIGS, GATE_CONFIGS,
    GROUPED_BACKWARD_INPUT_CONFIGS, GROUPED_BACKWARD_WEIGHTS_CONFIGS, GROUPED_BACKWARD_WEIGHTS_WIDE_CONFIGS,
    GROUPED_FORWARD_CONFIGS, GROUPED_FORWARD_WIDE_CONFIGS, MAX_DENSE_COLUMNS, VARIANTS_BY_NAME, block_columns,
    block_config, block_experts, grouped_config,
)
from .jit_dense import _sparse_backward_input_kernel, _sparse_backward_weights_kernel, _sparse_forward_kernel
from .jit_grouped import (
    _grouped_backward_combine_kernel, _grouped_backward_input_kernel, _grouped_backward_weights_kernel,
    _grouped_combine_kernel, _grouped_forward_kernel, _sparse_gate_kernel,
)

__all__ = ["choose_design", "grad_layout", "forward", "backward", "gate", "grouped_forward", "grouped_backward",
           "weights_rank_blocks", "gate_chunks"]


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
    grouped = name in VARIANTS_BY_NAME and VARIANTS_BY_NAME[name].grouped
    return "grouped" if grouped or experts * rank > MAX_DENSE_COLUMNS else "dense"


def grad_layout(experts: int, rank: int, dim: int, dim_out: Optional[int] = None,
                scale_rows: int = 1) -> PackedLayout:
    """The packed parameter gradients, and one chunk's partials of the dense weights launch
    (scale_rows: one dscale row per stacked-column block there; per (expert, rank block) in the
    grouped weights launch): [dw_up (E x D_out x r) | dw_down (E x r x D) | db_up (E x D_out) |
    db_down (E x r) | dw_gate (E x D) | db_gate (E) | dscale (scale_rows x D_out)], D_out = D
    unless given. The weights kernels write this layout."""
    columns = experts * rank
    dim_out = dim if dim_out is None else dim_out
    return PackedLayout(("w_up", columns * dim_out), ("w_down", columns * dim), ("b_up", experts * dim_out),
                        ("b_down", columns), ("w_gate", experts * dim), ("b_gate", experts),
                        ("scale", scale_rows * dim_out))


def _dim_out_argument(dim: int, dim_out: int) -> int:
    """The kernels' dim_out argument. Where D_out = D they compile as SAME_WIDTH and never read
    it: it goes as 1, which the JIT specializes into a constant (as it does every integer argument
    equal to 1), so the same-width kernels keep the parameter list they had before D_out existed
    and compile to the same machine code. (Passed as D, the extra parameter moved ptxas's register
    allocation: 13 of 324 fp16 compile cases by up to 12 registers, same code otherwise.)"""
    return 1 if dim_out == dim else dim_out


def _sms(x: torch.Tensor, sms: Optional[int]) -> int:
    return sm_count(x.device) if sms is None else sms


def _strides(tensor: Optional[torch.Tensor]) -> tuple:
    return (tensor.stride(0), tensor.stride(1)) if tensor is not None else (0, 0)


# --------------------------------------------------------------------------------------------
# Dense design
# --------------------------------------------------------------------------------------------


def forward(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, scale_value, residual,
            add_input, row_scale, top_k, activation, compute_dtype, out_dtype, save, return_logits,
            variant: Variant = DEFAULT_VARIANT, sms: Optional[int] = None, tile: Optional[BlockConfig] = None, *,
            dropout: float = 0.0, input_dropout: float = 0.0, seed: Optional[torch.Tensor] = None) -> Plan:
    """The dense forward of 2-D x [M, D], gated (w_gate given) or routed (expert_idx and
    expert_weight [M, k]): launch "sparse_forward"; buffers "y" [M, D_out], "hidden" [M, E*r] in
    the compute dtype and "weights" [M, E] fp32 (both [0, ...] unless save), "logits" [M, E] fp32
    ([0, E] unless return_logits). residual: [M, D_out] or None; add_input (x a residual term)
    needs D_out = D. dropout: the rate on each expert's act(h) (stacked column c is the mask's
    column); input_dropout: on x as the down projection reads it (the gate and a residual x read
    it undropped); both masks drawn from the int64 tensor seed (kernels/dropout.py)."""
    rows, dim = x.shape
    experts, rank, _ = w_down.shape
    dim_out = w_up.shape[1]
    dim_out_arg = _dim_out_argument(dim, dim_out)
    y = new_output((rows, dim_out), out_dtype, x.device)
    hidden = new_output((rows if save else 0, experts * rank), compute_dtype, x.device)
    weights = new_output((rows if save else 0, experts), torch.float32, x.device)
    logits = new_output((rows if return_logits else 0, experts), torch.float32, x.device)
    buffers = dict(y=y, hidden=hidden, weights=weights, logits=logits)
    if rows == 0:
        return Plan({}, buffers)
    config = tile or variant_config(block_config(FORWARD_CONFIGS, experts, rank, compute_dtype), rows, _sms(x, sms),
                                    variant.block_rows)
    gated = w_gate is not None
    stride_idx, stride_weight, stride_res = _strides(expert_idx), _strides(expert_weight), _strides(residual)
    args = dict(
        x_ptr=x, w_gate_ptr=optional(w_gate, x), b_gate_ptr=optional(b_gate, x),
        expert_idx_ptr=x if expert_idx is None else expert_idx,
        expert_weight_ptr=x if expert_weight is None else expert_weight,
        w_down_ptr=w_down.contiguous(), b_down_ptr=optional(b_down, x), w_up_ptr=w_up.contiguous(),
        b_up_ptr=optional(b_up, x), scale_ptr=optional(scale, x), residual_ptr=x if residual is None else residual,
        row_scale_ptr=optional(row_scale, x), y_ptr=y, hidden_ptr=hidden if save else y,
        weights_ptr=weights if save else y, logits_ptr=logits if return_logits else y,
        rows=rows, dim=dim, dim_out=dim_out_arg, rank=rank, experts=experts, scale_value=scale_value,
        stride_x_row=x.stride(0), stride_x_col=x.stride(1), stride_res_row=stride_res[0],
        stride_res_col=stride_res[1], stride_idx_row=stride_idx[0], stride_idx_col=stride_idx[1],
        stride_w_row=stride_weight[0], stride_w_col=stride_weight[1],
        **dropout_args(seed, dropout, input_dropout, fallback=x),
    )
    constexprs = dict(
        TOP_K=top_k, GATED=gated, ACTIVATION=activation, SCALE_MODE=scale_mode(scale),
        HAS_B_GATE=gated and b_gate is not None, HAS_B_DOWN=b_down is not None, HAS_B_UP=b_up is not None,
        HAS_RESIDUAL=residual is not None, ADD_INPUT=add_input, HAS_ROW_SCALE=row_scale is not None, SAVE=save,
        STORE_LOGITS=gated and return_logits, SAME_WIDTH=dim_out == dim, HIDDEN_DROPOUT=dropout > 0.0,
        INPUT_DROPOUT=input_dropout > 0.0, COMPUTE_DTYPE=TRITON_DTYPES[compute_dtype],
        INPUT_PRECISION=input_precision(compute_dtype), BLOCK_ROWS=config.block_rows, BLOCK_DIM=config.block_dim,
        BLOCK_EXPERTS=block_experts(experts), BLOCK_COLUMNS=block_columns(experts, rank),
    )
    launch = Launch(_sparse_forward_kernel, (cdiv(rows, config.block_rows),), args, constexprs, config)
    return Plan({"sparse_forward": launch}, buffers)


def backward(grad_y, grad_logits, x, hidden, weights, w_gate, w_down, w_up, b_up, scale, scale_value, row_scale,
             activation, compute_dtype, add_grad_y, compute_dx, grad_dtype, variant: Variant = DEFAULT_VARIANT,
             sms: Optional[int] = None, tiles: Optional[dict] = None, *, dropout: float = 0.0,
             input_dropout: float = 0.0, seed: Optional[torch.Tensor] = None) -> Plan:
    """The dense backward of x [M, D] given dy [M, D_out]: launches "sparse_backward_input" (dh,
    d logits for the gated form or d weights per expert for the routed form, dx) and
    "sparse_backward_weights" (partials of every parameter gradient). Buffers "grad_x" ([0, D]
    unless compute_dx; plus dy with add_grad_y, which needs D_out = D), "grad_weights" [M, E]
    fp32, "grad_hidden" [M, E*r], "act" (act(h) * weights [M, E*r] with the store_act variant,
    else [0, E*r]: the second launch recomputes it) and "partials" (grad_layout per row chunk,
    one dscale row per stacked-column block; fp32, or the gradients in grad_dtype with one
    chunk). grad_logits: the logits output's own gradient, or None. dropout, input_dropout, seed:
    the forward's; the masks are drawn again from the seed (nothing of them was saved)."""
    rows, dim = x.shape
    experts, rank, _ = w_down.shape
    dim_out = w_up.shape[1]
    dim_out_arg = _dim_out_argument(dim, dim_out)
    tiles = tiles or {}
    sms = _sms(x, sms)
    columns = experts * rank
    grad_x = new_output((rows if compute_dx else 0, dim), x.dtype, x.device)
    grad_weights = new_output((rows, experts), torch.float32, x.device)
    grad_hidden = new_output((rows, columns), compute_dtype, x.device)
    store_act = variant.store_act
    act = new_output((rows if store_act else 0, columns), compute_dtype, x.device)
    buffers = dict(grad_x=grad_x, grad_weights=grad_weights, grad_hidden=grad_hidden, act=act)
    if rows == 0:
        buffers["partials"] = torch.zeros((1, grad_layout(experts, rank, dim, dim_out).size), dtype=grad_dtype,
                                          device=x.device)
        return Plan({}, buffers)
    # A width-changing mixture's kernels are another specialization, with tiles of their own.
    input_table, weights_table = ((BACKWARD_INPUT_CONFIGS, BACKWARD_WEIGHTS_CONFIGS) if dim_out == dim else
                                  (BACKWARD_INPUT_WIDE_CONFIGS, BACKWARD_WEIGHTS_WIDE_CONFIGS))
    input_config = tiles.get("sparse_backward_input") or variant_config(
        block_config(input_table, experts, rank, compute_dtype), rows, sms, variant.block_rows)
    weights_config = tiles.get("sparse_backward_weights") or block_config(weights_table, experts, rank, compute_dtype)
    if input_dropout > 0.0 and variant.store_act:
        # One stage where the launch draws x's mask next to a stored act: with two, fp16 autocast
        # (E*r = 64, 128) spilled 32 and 56 bytes on sm_90; with one, 0 (247, 252 registers).
        weights_config = dataclasses.replace(weights_config, num_stages=1)
    gated = w_gate is not None
    mode = scale_mode(scale)
    precision = input_precision(compute_dtype)
    triton_dtype = TRITON_DTYPES[compute_dtype]
    scale_c, row_scale_c, b_up_c = optional(scale, x), optional(row_scale, x), optional(b_up, x)
    w_down, w_up = w_down.contiguous(), w_up.contiguous()
    column_tile = weights_config.rank_tile or block_columns(experts, rank)
    row_tiles = cdiv(rows, weights_config.block_rows)
    # The weights launch's column tiles cover x's D and dy's D_out columns (the wider of the two).
    col_tiles = cdiv(max(dim, dim_out), weights_config.block_dim)
    blocks = cdiv(columns, column_tile)
    layout = grad_layout(experts, rank, dim, dim_out, blocks)
    chunks = plan_chunks(rows, min(dim, dim_out), row_tiles, col_tiles * blocks, sms, x.element_size(), layout.size)
    tiles_per_chunk = cdiv(row_tiles, chunks)
    chunks = cdiv(row_tiles, tiles_per_chunk)
    buffers["partials"] = partials = new_output((chunks, layout.size), grad_dtype if chunks == 1 else torch.float32,
                                                x.device)
    input_launch = Launch(
        _sparse_backward_input_kernel, (cdiv(rows, input_config.block_rows),),
        dict(
            grad_y_ptr=grad_y, grad_logits_ptr=grad_logits if grad_logits is not None else grad_weights,
            hidden_ptr=hidden, weights_ptr=weights, w_gate_ptr=optional(w_gate, x), w_down_ptr=w_down,
            w_up_ptr=w_up, b_up_ptr=b_up_c, scale_ptr=scale_c, row_scale_ptr=row_scale_c,
            grad_hidden_ptr=grad_hidden, grad_weights_ptr=grad_weights, act_ptr=act if store_act else grad_hidden,
            grad_x_ptr=grad_x if compute_dx else grad_hidden,
            rows=rows, dim=dim, dim_out=dim_out_arg, rank=rank, experts=experts, scale_value=scale_value,
            stride_g_row=grad_y.stride(0), stride_g_col=grad_y.stride(1),
            **dropout_args(seed, dropout, input_dropout, fallback=x),
        ),
        dict(
            GATED=gated, HAS_GRAD_LOGITS=gated and grad_logits is not None, ACTIVATION=activation, SCALE_MODE=mode,
            HAS_B_UP=b_up is not None, HAS_ROW_SCALE=row_scale is not None, STORE_ACT=store_act,
            COMPUTE_DX=compute_dx, ADD_GRAD_Y=compute_dx and add_grad_y, SAME_WIDTH=dim_out == dim,
            HIDDEN_DROPOUT=dropout > 0.0, INPUT_DROPOUT=compute_dx and input_dropout > 0.0,
            COMPUTE_DTYPE=triton_dtype, INPUT_PRECISION=precision, BLOCK_ROWS=input_config.block_rows,
            BLOCK_DIM=input_config.block_dim,
            BLOCK_EXPERTS=block_experts(experts), BLOCK_COLUMNS=block_columns(experts, rank),
        ),
        input_config,
    )
    weights_launch = Launch(
        _sparse_backward_weights_kernel, (chunks, col_tiles, blocks),
        dict(
            grad_y_ptr=grad_y, x_ptr=x, hidden_ptr=hidden, act_ptr=act if store_act else hidden, weights_ptr=weights,
            grad_hidden_ptr=grad_hidden, grad_logits_ptr=grad_weights, w_up_ptr=w_up, b_up_ptr=b_up_c,
            scale_ptr=scale_c, row_scale_ptr=row_scale_c, partials_ptr=partials,
            rows=rows, dim=dim, dim_out=dim_out_arg, rank=rank, experts=experts, scale_value=scale_value,
            tiles_per_chunk=tiles_per_chunk,
            stride_g_row=grad_y.stride(0), stride_g_col=grad_y.stride(1),
            stride_x_row=x.stride(0), stride_x_col=x.stride(1),
            **dropout_args(seed, dropout, input_dropout, fallback=x),
        ),
        dict(
            GATED=gated, ACTIVATION=activation, RECOMPUTE_ACT=not store_act, SCALE_MODE=mode,
            HAS_B_UP=b_up is not None, HAS_ROW_SCALE=row_scale is not None, SAME_WIDTH=dim_out == dim,
            # A stored act is already dropped: only a recomputed one draws the mask again.
            HIDDEN_DROPOUT=dropout > 0.0 and not store_act, INPUT_DROPOUT=input_dropout > 0.0,
            COMPUTE_DTYPE=triton_dtype, INPUT_PRECISION=precision, BLOCK_ROWS=weights_config.block_rows,
            BLOCK_DIM=weights_config.block_dim,
            BLOCK_EXPERTS=block_experts(experts), BLOCK_COLUMNS=column_tile,
        ),
        weights_config,
    )
    return Plan({"sparse_backward_input": input_launch, "sparse_backward_weights": weights_launch}, buffers)


# --------------------------------------------------------------------------------------------
# Grouped design
# --------------------------------------------------------------------------------------------


def grouped_tiles(assignments: int, experts: int, block_rows: int) -> int:
    """An upper bound of sum_e ceil(count_e / block_rows) that needs no counts: the grid size."""
    return cdiv(assignments, block_rows) + experts if assignments else 0


def weights_rank_blocks(rank: int, dtype: torch.dtype, tile: Optional[BlockConfig] = None) -> int:
    """The grouped weights launch's rank blocks: its configuration's rank tile splits the rank
    axis over the grid where two fp32 [D tile, rank] accumulators would not fit in registers."""
    config = tile or grouped_config(GROUPED_BACKWARD_WEIGHTS_CONFIGS, rank, dtype)
    return cdiv(padded_rank(rank), config.rank_tile or padded_rank(rank))


def gate_chunks(rows: int, dim: int, experts: int, top_k: int, itemsize: int, block_rows: int) -> int:
    """Row chunks of the gate's share of the grouped weights launch: about as many rows per
    program as an expert program has assignments (M*k/E), while the fp32 partials (E x (D + 1)
    per chunk, written and read) cost at most PARTIALS_BUDGET of one pass over x."""
    balanced = cdiv(rows, max(block_rows, cdiv(rows * top_k, experts)))
    budget = int(PARTIALS_BUDGET * rows * dim * itemsize // (2 * 4 * experts * (dim + 1)))
    return max(1, min(balanced, budget))


def gate(x, w_gate, b_gate, top_k, return_logits, sms: Optional[int] = None,
         tile: Optional[BlockConfig] = None) -> Plan:
    """The grouped design's gate for x [M, D]: launch "grouped_gate"; buffers "idx" [M, k] int32
    (the chosen experts in descending order), "weights" [M, k] fp32 (their softmax) and "logits"
    [M, E] fp32 ([0, E] unless return_logits)."""
    rows, dim = x.shape
    experts = w_gate.shape[0]
    idx = new_output((rows, top_k), torch.int32, x.device)
    weights = new_output((rows, top_k), torch.float32, x.device)
    logits = new_output((rows if return_logits else 0, experts), torch.float32, x.device)
    buffers = dict(idx=idx, weights=weights, logits=logits)
    if rows == 0:
        return Plan({}, buffers)
    config = tile or plan_block_rows(GATE_CONFIGS[dtype_group(x.dtype)], rows, _sms(x, sms))
    launch = Launch(
        _sparse_gate_kernel, (cdiv(rows, config.block_rows),),
        dict(x_ptr=x, w_gate_ptr=w_gate.contiguous(), b_gate_ptr=optional(b_gate, x),
             logits_ptr=logits if return_logits else weights, idx_ptr=idx, weights_ptr=weights,
             rows=rows, dim=dim, experts=experts, stride_x_row=x.stride(0), stride_x_col=x.stride(1)),
        dict(TOP_K=top_k, HAS_B_GATE=b_gate is not None, STORE_LOGITS=return_logits, BLOCK_ROWS=config.block_rows,
             BLOCK_DIM=config.block_dim, BLOCK_EXPERTS=block_experts(experts)),
        config,
    )
    return Plan({"grouped_gate": launch}, buffers)


def grouped_forward(x, idx, weights, order, counts, w_down, b_down, w_up, b_up, scale, scale_value, residual,
                    add_input, row_scale, activation, compute_dtype, out_dtype, save,
                    tiles: Optional[dict] = None, *, dropout: float = 0.0, input_dropout: float = 0.0,
                    seed: Optional[torch.Tensor] = None) -> Plan:
    """The grouped forward given the routing (idx, weights [M, k]) and its sort (order [M*k],
    counts [E]): launch "grouped_forward" (gather, h, p * u per assignment; with k = 1 the
    epilogue and y too) and, with k > 1, "grouped_combine" (each row's k parts, the epilogue).
    Buffers "y" [M, D_out], "hidden" [M*k, r] by sorted position ([0, r] unless save) and "parts"
    [M*k, D_out] in the compute dtype ([0, D_out] with k = 1). residual: [M, D_out] or None;
    add_input needs D_out = D. dropout, input_dropout, seed: as in forward (assignment (row, e)
    draws the hidden mask's columns e * r to e * r + r - 1 of its row: the dense design's mask)."""
    rows, dim = x.shape
    top_k = idx.shape[1]
    experts, rank, _ = w_down.shape
    dim_out = w_up.shape[1]
    dim_out_arg = _dim_out_argument(dim, dim_out)
    tiles = tiles or {}
    single = top_k == 1
    y = new_output((rows, dim_out), out_dtype, x.device)
    hidden = new_output((rows * top_k if save else 0, rank), compute_dtype, x.device)
    parts = new_output((0 if single else rows * top_k, dim_out), compute_dtype, x.device)
    buffers = dict(y=y, hidden=hidden, parts=parts)
    if rows == 0:
        return Plan({}, buffers)
    # A width-changing mixture's kernel is another specialization, with tiles of its own.
    table = GROUPED_FORWARD_CONFIGS if dim_out == dim else GROUPED_FORWARD_WIDE_CONFIGS
    config = tiles.get("grouped_forward") or grouped_config(table, rank, compute_dtype)
    res_strides = _strides(residual)
    epilogue_args = dict(
        scale_ptr=optional(scale, x), residual_ptr=x if residual is None else residual,
        row_scale_ptr=optional(row_scale, x), scale_value=scale_value, stride_x_row=x.stride(0),
        stride_x_col=x.stride(1), stride_res_row=res_strides[0], stride_res_col=res_strides[1],
    )
    epilogue_flags = dict(SCALE_MODE=scale_mode(scale), HAS_RESIDUAL=residual is not None, ADD_INPUT=add_input,
                          HAS_ROW_SCALE=row_scale is not None, COMPUTE_DTYPE=TRITON_DTYPES[compute_dtype])
    launches = {"grouped_forward": Launch(
        _grouped_forward_kernel, (grouped_tiles(rows * top_k, experts, config.block_rows),),
        dict(x_ptr=x, order_ptr=order, counts_ptr=counts, weights_ptr=weights, w_down_ptr=w_down.contiguous(),
             b_down_ptr=optional(b_down, x), w_up_ptr=w_up.contiguous(), b_up_ptr=optional(b_up, x),
             out_ptr=y if single else parts, hidden_ptr=hidden if save else y, dim=dim, dim_out=dim_out_arg, rank=rank,
             experts=experts, **epilogue_args, **dropout_args(seed, dropout, input_dropout, fallback=x)),
        dict(TOP_K=top_k, ACTIVATION=activation, HAS_B_DOWN=b_down is not None, HAS_B_UP=b_up is not None,
             SAVE=save, SINGLE=single, SAME_WIDTH=dim_out == dim, HIDDEN_DROPOUT=dropout > 0.0,
             INPUT_DROPOUT=input_dropout > 0.0, INPUT_PRECISION=input_precision(compute_dtype),
             BLOCK_ROWS=config.block_rows, BLOCK_DIM=config.block_dim, BLOCK_RANK=padded_rank(rank),
             BLOCK_EXPERTS=block_experts(experts), **epilogue_flags),
        config,
    )}
    if not single:
        combine_config = tiles.get("grouped_combine") or COMBINE_CONFIGS[dtype_group(compute_dtype)]
        # The combine walks y's columns: its `dim` is D_out.
        launches["grouped_combine"] = Launch(
            _grouped_combine_kernel,
            (cdiv(rows, combine_config.block_rows), cdiv(dim_out, combine_config.block_dim)),
            dict(parts_ptr=parts, x_ptr=x, y_ptr=y, rows=rows, dim=dim_out, **epilogue_args),
            dict(TOP_K=top_k, BLOCK_ROWS=combine_config.block_rows, BLOCK_DIM=combine_config.block_dim,
                 **epilogue_flags),
            combine_config,
        )
    return Plan(launches, buffers)


def grouped_backward(grad_y, grad_logits, x, hidden, idx, weights, order, counts, w_gate, w_down, w_up, b_up, scale,
                     scale_value, row_scale, activation, compute_dtype, add_grad_y, compute_dx, grad_dtype,
                     tiles: Optional[dict] = None, *, dropout: float = 0.0, input_dropout: float = 0.0,
                     seed: Optional[torch.Tensor] = None) -> Plan:
    """The grouped backward: launches "grouped_backward_input" (d act, d p, dh, and each
    assignment's share of dx: dx itself for the routed form with k = 1), "grouped_backward_combine"
    (the gated form, or dx with k > 1: d logits through the softmax, dx = the shares + d logits
    W_gate, + dy with add_grad_y) and "grouped_backward_weights" (each expert's gradients over
    its sorted assignments, written directly in order: deterministic; plus, gated, the gate's
    partials over row chunks). Buffers "grad_x", "grad_weights" [M, k] fp32 (d p), "grad_hidden"
    [M*k, r], "parts" [M*k, D] (dx's shares), "grad_gate" [M, E] (d logits), "packed"
    (grad_layout with one dscale row per (expert, rank block), in grad_dtype) and
    "gate_partials" [chunks, E*D + E]. grad_y: [M, D_out]; add_grad_y needs D_out = D. dropout,
    input_dropout, seed: the forward's; the input and weights launches draw the masks again."""
    rows, dim = x.shape
    top_k = idx.shape[1]
    experts, rank, _ = w_down.shape
    dim_out = w_up.shape[1]
    dim_out_arg = _dim_out_argument(dim, dim_out)
    tiles = tiles or {}
    gated = w_gate is not None
    single = top_k == 1 and not gated
    weights_table = GROUPED_BACKWARD_WEIGHTS_CONFIGS if dim_out == dim else GROUPED_BACKWARD_WEIGHTS_WIDE_CONFIGS
    weights_config = tiles.get("grouped_backward_weights") or grouped_config(weights_table, rank, compute_dtype)
    rank_blocks = weights_rank_blocks(rank, compute_dtype, weights_config)
    chunks = gate_chunks(rows, dim, experts, top_k, x.element_size(), weights_config.block_rows) if gated else 0
    buffers = dict(
        grad_x=new_output((rows if compute_dx else 0, dim), x.dtype, x.device),
        grad_weights=new_output((rows, top_k), torch.float32, x.device),
        grad_hidden=new_output((rows * top_k, rank), compute_dtype, x.device),
        parts=new_output((rows * top_k if compute_dx and not single else 0, dim), compute_dtype, x.device),
        grad_gate=new_output((rows if gated else 0, experts), torch.float32, x.device),
        packed=new_output((grad_layout(experts, rank, dim, dim_out, experts * rank_blocks).size,), grad_dtype,
                          x.device),
        gate_partials=new_output((chunks, experts * dim + experts), torch.float32, x.device),
    )
    if rows == 0:
        buffers["packed"].zero_()
        return Plan({}, buffers)
    grad_x, grad_weights, grad_hidden, parts, grad_gate = (
        buffers[name] for name in ("grad_x", "grad_weights", "grad_hidden", "parts", "grad_gate"))
    precision = input_precision(compute_dtype)
    triton_dtype = TRITON_DTYPES[compute_dtype]
    mode = scale_mode(scale)
    scale_c, row_scale_c, b_up_c = optional(scale, x), optional(row_scale, x), optional(b_up, x)
    w_down, w_up = w_down.contiguous(), w_up.contiguous()
    input_config = tiles.get("grouped_backward_input") or grouped_config(GROUPED_BACKWARD_INPUT_CONFIGS, rank,
                                                                         compute_dtype)
    launches = {"grouped_backward_input": Launch(
        _grouped_backward_input_kernel, (grouped_tiles(rows * top_k, experts, input_config.block_rows),),
        dict(grad_y_ptr=grad_y, order_ptr=order, counts_ptr=counts, weights_ptr=weights, hidden_ptr=hidden,
             w_down_ptr=w_down, w_up_ptr=w_up, b_up_ptr=b_up_c, scale_ptr=scale_c, row_scale_ptr=row_scale_c,
             grad_hidden_ptr=grad_hidden, grad_weights_ptr=grad_weights,
             out_ptr=grad_x if single else parts, dim=dim, dim_out=dim_out_arg, rank=rank, experts=experts,
             scale_value=scale_value, stride_g_row=grad_y.stride(0), stride_g_col=grad_y.stride(1),
             **dropout_args(seed, dropout, input_dropout, fallback=x)),
        dict(TOP_K=top_k, ACTIVATION=activation, SCALE_MODE=mode, HAS_B_UP=b_up is not None,
             HAS_ROW_SCALE=row_scale is not None, SINGLE=single, COMPUTE_DX=compute_dx,
             ADD_GRAD_Y=single and add_grad_y, SAME_WIDTH=dim_out == dim, HIDDEN_DROPOUT=dropout > 0.0,
             INPUT_DROPOUT=compute_dx and input_dropout > 0.0, COMPUTE_DTYPE=triton_dtype,
             INPUT_PRECISION=precision, BLOCK_ROWS=input_config.block_rows, BLOCK_DIM=input_config.block_dim,
             BLOCK_RANK=padded_rank(rank), BLOCK_EXPERTS=block_experts(experts)),
        input_config,
    )}
    if gated or (compute_dx and not single):
        combine_config = tiles.get("grouped_backward_combine") or BACKWARD_COMBINE_CONFIGS[dtype_group(compute_dtype)]
        launches["grouped_backward_combine"] = Launch(
            _grouped_backward_combine_kernel, (cdiv(rows, combine_config.block_rows),),
            dict(grad_y_ptr=grad_y, grad_logits_ptr=grad_logits if grad_logits is not None else grad_weights,
                 parts_ptr=parts, idx_ptr=idx, weights_ptr=weights, grad_weights_ptr=grad_weights,
                 w_gate_ptr=optional(w_gate, x), grad_gate_ptr=grad_gate, grad_x_ptr=grad_x,
                 rows=rows, dim=dim, experts=experts, stride_g_row=grad_y.stride(0), stride_g_col=grad_y.stride(1)),
            dict(TOP_K=top_k, GATED=gated, HAS_GRAD_LOGITS=gated and grad_logits is not None, COMPUTE_DX=compute_dx,
                 ADD_GRAD_Y=compute_dx and add_grad_y, BLOCK_ROWS=combine_config.block_rows,
                 BLOCK_DIM=combine_config.block_dim, BLOCK_EXPERTS=block_experts(experts)),
            combine_config,
        )
    # Its column tiles cover x's D and dy's D_out columns (the wider of the two).
    launches["grouped_backward_weights"] = Launch(
        _grouped_backward_weights_kernel,
        (experts + chunks, cdiv(max(dim, dim_out), weights_config.block_dim), rank_blocks),
        dict(grad_y_ptr=grad_y, x_ptr=x, order_ptr=order, counts_ptr=counts, weights_ptr=weights,
             hidden_ptr=hidden, grad_hidden_ptr=grad_hidden, grad_gate_ptr=grad_gate, w_up_ptr=w_up, b_up_ptr=b_up_c,
             scale_ptr=scale_c, row_scale_ptr=row_scale_c, packed_ptr=buffers["packed"],
             gate_partials_ptr=buffers["gate_partials"], rows=rows, dim=dim, dim_out=dim_out_arg, rank=rank,
             experts=experts, scale_value=scale_value, rows_per_gate_chunk=cdiv(rows, chunks) if chunks else 0,
             stride_g_row=grad_y.stride(0), stride_g_col=grad_y.stride(1), stride_x_row=x.stride(0),
             stride_x_col=x.stride(1), **dropout_args(seed, dropout, input_dropout, fallback=x)),
        dict(TOP_K=top_k, ACTIVATION=activation, SCALE_MODE=mode, HAS_B_UP=b_up is not None,
             HAS_ROW_SCALE=row_scale is not None, SAME_WIDTH=dim_out == dim, HIDDEN_DROPOUT=dropout > 0.0,
             INPUT_DROPOUT=input_dropout > 0.0, COMPUTE_DTYPE=triton_dtype,
             INPUT_PRECISION=precision, BLOCK_ROWS=weights_config.block_rows, BLOCK_DIM=weights_config.block_dim,
             BLOCK_RANK=weights_config.rank_tile or padded_rank(rank), BLOCK_EXPERTS=block_experts(experts)),
        weights_config,
    )
    return Plan(launches, buffers)
