"""The bottleneck adapter's launch plans: the one place that turns shapes, dtypes, flags and a
variant into Launch records and the buffers they write. The op runs these plans, the compile
check compiles them and the benchmark counts them.

Block rows and reduction chunks come from M and the GPU's SM count (launch.plan_block_rows and
launch.plan_chunks), so the grids fill the GPU while the weight-gradient partials stay a small
fraction of the bytes the backward must move anyway. What depends on shapes alone is worked out
once per shape (cached); a call only binds its tensors.
"""

from __future__ import annotations

import dataclasses
import functools
from types import MappingProxyType
from typing import Optional

import torch

from ..launch import (
    TRITON_DTYPES, BlockConfig, Launch, PackedLayout, Plan, cdiv, input_precision, new_output, optional,
    padded_rank, plan_chunks, scale_mode, sm_count, variant_config,
)
from ..dropout import keep_factor
from ..dropout import launch_args as dropout_args
from ..variants import Variant
from .configs import (
    BACKWARD_HIDDEN_COLUMN_MAJOR_CONFIGS, BACKWARD_HIDDEN_CONFIGS, BACKWARD_WEIGHTS_COLUMN_MAJOR_CONFIGS,
    BACKWARD_WEIGHTS_CONFIGS, BACKWARD_WEIGHTS_WIDE_CONFIGS, DEFAULT_VARIANT, FORWARD_CONFIGS, block_config,
)
from .jit import _backward_hidden_kernel, _backward_input_and_weights_kernel, _bottleneck_forward_kernel

__all__ = ["forward", "backward", "backward_weights", "grad_layout", "column_major_output", "new_like_x",
           "stores_act"]


def grad_layout(dim: int, rank: int, dim_out: int, rank_blocks: int = 1) -> PackedLayout:
    """The packed parameter gradients, and one row chunk's partials in the weights launch:
    [dw_up (D_out x r) | dw_down (r x D) | db_up (D_out) | db_down (r) | dscale per rank block
    (blocks x D_out)]. The kernel writes this layout (jit.py's epilogue of the weights kernel)."""
    return PackedLayout(("w_up", dim_out * rank), ("w_down", rank * dim), ("b_up", dim_out), ("b_down", rank),
                        ("scale", rank_blocks * dim_out))


def stores_act(rank: int, variant: Variant) -> bool:
    """Whether the backward's first launch writes act(h) [M, r] for the second to read: at ranks
    above 32 always (there the weights kernel spills when it recomputes act; compile check), and
    with the store_act variant. At ranks up to 32 recomputing it from h saves one M x r pass each
    way (rank 16, M = 768, D = 768: backward 1.407x -> 1.400x the floor)."""
    return padded_rank(rank) > 32 or variant.store_act


def column_major_output(x: torch.Tensor, dim_out: int) -> bool:
    """Whether y [M, D_out] (and dx [M, D]) is laid out column-major: when x [M, D] is and
    D_out = D, as torch's elementwise ops lay out their outputs like a dense input
    (torch.empty_like). A tensor whose token axis is last in memory, viewed as [(B, D), N] for a
    bottleneck over tokens, is such an x: its y (and, backward, its dx) then comes back in the
    same layout, so the next op reads it without a copy. Not where the column offsets would pass
    2^31 (the kernels keep them int32; launch.int32_columns copies such an x to row-major)."""
    rows, dim = x.shape
    # The stride test first: with a data-dependent M (torch.compile) it decides without M.
    return (dim_out == dim and dim > 1 and x.stride(0) == 1 and x.stride(1) == rows and rows > 1
            and rows * (dim - 1) < 2**31)


def new_like_x(x: torch.Tensor, dim_out: int, dtype: torch.dtype, rows: Optional[int] = None) -> torch.Tensor:
    """y [M, D_out] (or dx, dim_out = D), laid out as column_major_output says; rows: M (0 for an
    unwanted dx)."""
    rows = x.shape[0] if rows is None else rows
    if rows == x.shape[0] and column_major_output(x, dim_out):
        return new_output((dim_out, rows), dtype, x.device).t()
    return new_output((rows, dim_out), dtype, x.device)


def _sms(x: torch.Tensor, sms: Optional[int]) -> int:
    return sm_count(x.device) if sms is None else sms


# --------------------------------------------------------------------------------------------
# Forward: one launch
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _forward_tiles(rows: int, rank: int, same_width: bool, compute_dtype: torch.dtype, precision: str, flags: tuple,
                   variant: Variant, sms: int, tile: Optional[BlockConfig]):
    """(config, grid, constexprs) of the forward launch: what depends on shapes and flags only."""
    config = tile or variant_config(block_config(FORWARD_CONFIGS, rank, compute_dtype), rows, sms, variant.block_rows)
    (activation, mode, has_b_down, has_b_up, has_residual, add_input, has_row_scale, store_hidden, hidden_dropout,
     input_dropout) = flags
    if input_dropout and padded_rank(rank) >= 128:
        # The x tile's mask (four Philox words a lane while it is drawn) beside a [rows, 128+]
        # accumulator: half-width x tiles keep the forward from spilling (compile check, sm_90,
        # unaligned D: fwd_r128_half 8 bytes, fwd_r256_half_rows16 16 bytes before, 0 after).
        config = dataclasses.replace(config, name=config.name + "_masked_x", block_dim=config.block_dim // 2)
    # Read-only: every call with this key shares it.
    constexprs = MappingProxyType(dict(
        ACTIVATION=activation, SCALE_MODE=mode, HAS_B_DOWN=has_b_down, HAS_B_UP=has_b_up, HAS_RESIDUAL=has_residual,
        ADD_INPUT=add_input, HAS_ROW_SCALE=has_row_scale, STORE_HIDDEN=store_hidden, SAME_WIDTH=same_width,
        HIDDEN_DROPOUT=hidden_dropout, INPUT_DROPOUT=input_dropout,
        COMPUTE_DTYPE=TRITON_DTYPES[compute_dtype], INPUT_PRECISION=precision,
        BLOCK_ROWS=config.block_rows, BLOCK_DIM=config.block_dim, BLOCK_RANK=padded_rank(rank),
    ))
    return config, (cdiv(rows, config.block_rows),), constexprs


def forward(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, add_input, row_scale, activation,
            compute_dtype, out_dtype, save_hidden, variant: Variant = DEFAULT_VARIANT, sms: Optional[int] = None,
            tile: Optional[BlockConfig] = None, *, dropout: float = 0.0, input_dropout: float = 0.0,
            seed: Optional[torch.Tensor] = None) -> Plan:
    """The forward of 2-D x [M, D]: launch "forward", buffers "y" [M, D_out] (laid out like x) and
    "hidden" [M, r] in the compute dtype ([0, r] unless save_hidden). residual: [M, D_out] or
    None; add_input: x is a residual term too. tile: this tile instead of the planned one (the
    compile check's cases). dropout: the rate on act(h); input_dropout: on x as the down
    projection reads it; seed: the int64 seed tensor both masks come from (kernels/dropout.py)."""
    rows, dim = x.shape
    rank, dim_out = w_down.shape[0], w_up.shape[0]
    y = new_like_x(x, dim_out, out_dtype)
    hidden = new_output((rows if save_hidden else 0, rank), compute_dtype, x.device)
    buffers = dict(y=y, hidden=hidden)
    if rows == 0:
        return Plan({}, buffers)
    flags = (activation, scale_mode(scale), b_down is not None, b_up is not None, residual is not None, add_input,
             row_scale is not None, save_hidden, dropout > 0.0, input_dropout > 0.0)
    # The precision follows torch's tf32 switch, read at each call.
    config, grid, constexprs = _forward_tiles(rows, rank, dim_out == dim, compute_dtype, input_precision(compute_dtype),
                                              flags, variant, _sms(x, sms), tile)
    args = dict(
        x_ptr=x, w_down_ptr=w_down.contiguous(), b_down_ptr=optional(b_down, x), w_up_ptr=w_up.contiguous(),
        b_up_ptr=optional(b_up, x), scale_ptr=optional(scale, x), residual_ptr=x if residual is None else residual,
        row_scale_ptr=optional(row_scale, x), y_ptr=y, hidden_ptr=hidden if save_hidden else y,
        rows=rows, dim=dim, dim_out=dim_out, rank=rank, scale_value=scale_value,
        stride_x_row=x.stride(0), stride_x_col=x.stride(1),
        stride_res_row=residual.stride(0) if residual is not None else 0,
        stride_res_col=residual.stride(1) if residual is not None else 0,
        stride_y_row=y.stride(0), stride_y_col=y.stride(1), **dropout_args(seed, dropout, input_dropout, fallback=x),
    )
    return Plan({"forward": Launch(_bottleneck_forward_kernel, grid, args, constexprs, config)}, buffers)


# --------------------------------------------------------------------------------------------
# Backward: two launches, and the partials the second fills
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _weights_tiles(rows: int, dim: int, dim_out: int, rank: int, itemsize: int, table_name: str,
                   compute_dtype: torch.dtype, precision: str, flags: tuple, sms: int, tile: Optional[BlockConfig]):
    """(config, grid (chunks, column tiles, rank blocks), tiles per chunk, constexprs) of the
    weights launch."""
    config = tile or block_config(_WEIGHTS_TABLES[table_name], rank, compute_dtype)
    block_rank = padded_rank(rank)
    rank_tile = config.rank_tile or block_rank
    rank_blocks = cdiv(rank, rank_tile)
    row_tiles = cdiv(rows, config.block_rows)
    col_tiles = cdiv(max(dim, dim_out), config.block_dim)
    chunks = plan_chunks(rows, min(dim, dim_out), row_tiles, col_tiles * rank_blocks, sms, itemsize,
                         grad_layout(dim, rank, dim_out, rank_blocks).size)
    tiles_per_chunk = cdiv(row_tiles, chunks)
    activation, recompute_act, mode, has_b_up, has_row_scale, compute_dx, add_grad_y, hidden_dropout, input_dropout = flags
    constexprs = MappingProxyType(dict(
        ACTIVATION=activation, RECOMPUTE_ACT=recompute_act, SCALE_MODE=mode, HAS_B_UP=has_b_up,
        HAS_ROW_SCALE=has_row_scale, COMPUTE_DX=compute_dx, ADD_GRAD_Y=compute_dx and add_grad_y,
        SPLIT_RANK=rank_tile < block_rank, SAME_WIDTH=dim_out == dim,
        # A stored act is already dropped: only a recomputed one draws the hidden mask again.
        HIDDEN_DROPOUT=hidden_dropout and recompute_act, INPUT_DROPOUT=input_dropout,
        COMPUTE_DTYPE=TRITON_DTYPES[compute_dtype],
        INPUT_PRECISION=precision, BLOCK_ROWS=config.block_rows, BLOCK_DIM=config.block_dim, BLOCK_RANK=rank_tile,
    ))
    return config, (cdiv(row_tiles, tiles_per_chunk), col_tiles, rank_blocks), tiles_per_chunk, constexprs


_WEIGHTS_TABLES = {"default": BACKWARD_WEIGHTS_CONFIGS, "wide": BACKWARD_WEIGHTS_WIDE_CONFIGS,
                   "column_major": BACKWARD_WEIGHTS_COLUMN_MAJOR_CONFIGS}


def backward_weights(grad_y, x, act, recompute_act, grad_hidden, w_down, w_up, b_up, scale, scale_value, row_scale,
                     activation, compute_dtype, grad_x, add_grad_y, grad_dtype, sms: Optional[int] = None,
                     tile: Optional[BlockConfig] = None, *, dropout: float = 0.0, input_dropout: float = 0.0,
                     seed: Optional[torch.Tensor] = None) -> tuple[Launch, torch.Tensor]:
    """The weights launch (dx too when grad_x has M rows, plus dy with add_grad_y) and the
    partials buffer [chunks, grad_layout size] it fills: fp32 partial sums per row chunk, or,
    with one chunk, the gradients themselves in grad_dtype. act: act(h) [M, r] (dropped where
    the forward dropped it), or with recompute_act the pre-activation h to recompute it from.
    grad_hidden: dh [M, r]. dropout, input_dropout, seed: the forward's (see forward)."""
    rows, dim = x.shape
    rank, dim_out = w_down.shape[0], w_up.shape[0]
    compute_dx = grad_x.shape[0] == rows
    if dim_out != dim:  # a second width and column mask: tiles of their own
        table_name = "wide"
    else:  # dx laid out like x: column-major tiles where x is
        table_name = "column_major" if column_major_output(x, dim) else "default"
    flags = (activation, recompute_act, scale_mode(scale), b_up is not None, row_scale is not None, compute_dx,
             add_grad_y, dropout > 0.0, input_dropout > 0.0)
    config, grid, tiles_per_chunk, constexprs = _weights_tiles(
        rows, dim, dim_out, rank, x.element_size(), table_name, compute_dtype, input_precision(compute_dtype), flags,
        _sms(x, sms), tile)
    chunks, _, rank_blocks = grid
    partials = new_output((chunks, grad_layout(dim, rank, dim_out, rank_blocks).size),
                          grad_dtype if chunks == 1 else torch.float32, x.device)
    args = dict(
        grad_y_ptr=grad_y, x_ptr=x, act_ptr=act, grad_hidden_ptr=grad_hidden, w_down_ptr=w_down.contiguous(),
        w_up_ptr=w_up.contiguous(), b_up_ptr=optional(b_up, x), scale_ptr=optional(scale, x),
        row_scale_ptr=optional(row_scale, x), grad_x_ptr=grad_x if compute_dx else grad_hidden, partials_ptr=partials,
        rows=rows, dim=dim, dim_out=dim_out, rank=rank, scale_value=scale_value, tiles_per_chunk=tiles_per_chunk,
        stride_g_row=grad_y.stride(0), stride_g_col=grad_y.stride(1),
        stride_x_row=x.stride(0), stride_x_col=x.stride(1),
        stride_dx_row=grad_x.stride(0) if compute_dx else dim, stride_dx_col=grad_x.stride(1) if compute_dx else 1,
        **dropout_args(seed, dropout, input_dropout, fallback=x),
    )
    return Launch(_backward_input_and_weights_kernel, grid, args, constexprs, config), partials


@functools.lru_cache(maxsize=4096)
def _hidden_tiles(rows: int, rank: int, column_major: bool, compute_dtype: torch.dtype, precision: str, flags: tuple,
                  variant: Variant, sms: int, tile: Optional[BlockConfig]):
    """(config, grid, constexprs) of the backward's first launch. dx is laid out like x:
    column-major tiles where x is."""
    table = BACKWARD_HIDDEN_COLUMN_MAJOR_CONFIGS if column_major else BACKWARD_HIDDEN_CONFIGS
    config = tile or variant_config(block_config(table, rank, compute_dtype), rows, sms, variant.block_rows)
    activation, mode, has_row_scale, store_act, hidden_dropout = flags
    constexprs = MappingProxyType(dict(
        ACTIVATION=activation, SCALE_MODE=mode, HAS_ROW_SCALE=has_row_scale, STORE_ACT=store_act,
        HIDDEN_DROPOUT=hidden_dropout,
        COMPUTE_DTYPE=TRITON_DTYPES[compute_dtype], INPUT_PRECISION=precision,
        BLOCK_ROWS=config.block_rows, BLOCK_DIM=config.block_dim, BLOCK_RANK=padded_rank(rank),
    ))
    return config, (cdiv(rows, config.block_rows),), constexprs


def backward(grad_y, x, hidden, w_down, w_up, b_up, scale, scale_value, row_scale, activation, compute_dtype,
             add_grad_y, compute_dx, grad_dtype, variant: Variant = DEFAULT_VARIANT, sms: Optional[int] = None,
             tiles: Optional[dict] = None, *, dropout: float = 0.0, input_dropout: float = 0.0,
             seed: Optional[torch.Tensor] = None) -> Plan:
    """The backward of the forward's 2-D x [M, D] given dy [M, D_out] and the saved pre-activation
    hidden [M, r]: launches "backward_hidden" and "backward_weights"; buffers "grad_x" (laid out
    like x; [0, D] unless compute_dx; plus dy with add_grad_y, x having been a residual term),
    "grad_hidden" and "act" (the first launch's scratch for the second: act has M rows only where
    stores_act) and "partials" (grad_layout per row chunk; see backward_weights). grad_dtype: the
    parameter gradients' dtype. tiles: {"backward_hidden" / "backward_weights": tile} instead of
    the planned ones. dropout, input_dropout, seed: the forward's; the masks are drawn again
    from the seed, so nothing of them was saved."""
    rows, dim = x.shape
    rank, dim_out = w_down.shape[0], w_up.shape[0]
    tiles = tiles or {}
    sms = _sms(x, sms)
    grad_x = new_like_x(x, dim, x.dtype, rows if compute_dx else 0)
    grad_hidden = new_output((rows, rank), compute_dtype, x.device)
    store_act = stores_act(rank, variant)
    act = new_output((rows if store_act else 0, rank), compute_dtype, x.device)
    if rows == 0:
        partials = torch.zeros((1, grad_layout(dim, rank, dim_out).size), dtype=grad_dtype, device=x.device)
        return Plan({}, dict(grad_x=grad_x, grad_hidden=grad_hidden, act=act, partials=partials))
    config, grid, constexprs = _hidden_tiles(
        rows, rank, column_major_output(x, dim), compute_dtype, input_precision(compute_dtype),
        (activation, scale_mode(scale), row_scale is not None, store_act, dropout > 0.0), variant, sms,
        tiles.get("backward_hidden"))
    args = dict(
        grad_y_ptr=grad_y, hidden_ptr=hidden, w_up_ptr=w_up.contiguous(), scale_ptr=optional(scale, x),
        row_scale_ptr=optional(row_scale, x), grad_hidden_ptr=grad_hidden, act_ptr=act if store_act else grad_hidden,
        rows=rows, dim=dim_out, rank=rank, scale_value=scale_value,  # its D loop walks dy's columns
        stride_g_row=grad_y.stride(0), stride_g_col=grad_y.stride(1), seed_ptr=hidden if seed is None else seed,
        dropout_p=dropout, dropout_keep=keep_factor(dropout),
    )
    hidden_launch = Launch(_backward_hidden_kernel, grid, args, constexprs, config)
    weights_launch, partials = backward_weights(
        grad_y, x, act if store_act else hidden, not store_act, grad_hidden, w_down, w_up, b_up, scale, scale_value,
        row_scale, activation, compute_dtype, grad_x, add_grad_y, grad_dtype, sms, tiles.get("backward_weights"),
        dropout=dropout, input_dropout=input_dropout, seed=seed)
    return Plan({"backward_hidden": hidden_launch, "backward_weights": weights_launch},
                dict(grad_x=grad_x, grad_hidden=grad_hidden, act=act, partials=partials))
