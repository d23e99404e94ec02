"""The LoRA linear's single-launch plans: the one place that turns its shapes, dtypes and flags
into Launch records and buffers (the op runs them, the compile check compiles them, the
benchmark counts them). The default form's branch is a bottleneck op and plans as one."""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..bottleneck.configs import DEFAULT_VARIANT as BOTTLENECK_DEFAULT
from ..bottleneck.plan import backward_weights as bottleneck_backward_weights
from ..bottleneck.plan import grad_layout as bottleneck_grad_layout
from ..bottleneck.plan import stores_act
from ..dropout import keep_factor
from ..launch import (
    TRITON_DTYPES, BlockConfig, Launch, PackedLayout, Plan, cdiv, dtype_group, input_precision, new_output,
    padded_rank, sm_count,
)
from .configs import LORA_LINEAR_CONFIGS, LORA_LINEAR_UNALIGNED_CONFIGS, MAX_MASKED_OUTPUT_TILE, MAX_SINGLE_LAUNCH_RANK
from .jit import _lora_linear_kernel

__all__ = ["forward", "backward", "aligned", "gemm_config", "grad_layout", "masks_output", "single_launch_supported"]


def masks_output(config: BlockConfig) -> bool:
    """Whether a GEMM tile may draw a dropout mask over its output tile (the backward's input
    launch with dropout): tiles up to MAX_MASKED_OUTPUT_TILE elements."""
    return config.block_rows * config.block_dim <= MAX_MASKED_OUTPUT_TILE


def grad_layout(dim_in: int, dim_out: int, rank: int) -> PackedLayout:
    """[dB (D_out x r) | dA (r x D_in)]: the head of the bottleneck weights launch's partials
    (its w_up and w_down)."""
    return PackedLayout(("lora_b", dim_out * rank), ("lora_a", rank * dim_in))


def aligned(x: torch.Tensor, dim_out: int, *params: torch.Tensor) -> bool:
    """Whether a launch over x [M, K] writing [M, dim_out] is compiled with vectorized loads: unit
    column stride and everything the JIT specializes (widths, row stride, pointers) a multiple of 16."""
    return (x.stride(1) == 1 and x.stride(0) % 16 == 0 and x.shape[1] % 16 == 0 and dim_out % 16 == 0
            and all(t.data_ptr() % 16 == 0 for t in (x, *params)))


@functools.lru_cache(maxsize=4096)
def gemm_config(rank: int, compute_dtype: torch.dtype, rows: int, cols: int, sms: int,
                is_aligned: bool = True, masked_output: bool = False) -> BlockConfig:
    """The largest tile whose grid gives every SM a program (one full wave); the smallest tile
    when none does. ViT-B qkv at batch 2 (M 394, D_out 2304) on 132 SMs: 128 x 128 tiles give
    72 programs, 128 x 64 give 144. masked_output: the launch draws a dropout mask over its
    output tile (the backward's input launch with dropout), which caps the tile's size."""
    table = LORA_LINEAR_CONFIGS if is_aligned else LORA_LINEAR_UNALIGNED_CONFIGS
    configs = table[(padded_rank(rank), dtype_group(compute_dtype))]
    if masked_output:
        configs = [config for config in configs if masks_output(config)]
    for config in configs:
        if cdiv(rows, config.block_rows) * cdiv(cols, config.block_dim) >= sms:
            return config
    return configs[-1]


def single_launch_supported(rank: int, compute_dtype: torch.dtype, weight_elements: int = 0) -> Optional[str]:
    """Why the single-launch form cannot run this call (None when it can): it takes ranks up to
    64, dots on tensor cores (fp16, bf16, or fp32 with tf32 allowed) and a weight of fewer than
    2^31 elements (the kernel's weight offsets are int32, as its column offsets)."""
    if weight_elements >= 2**31:
        return f"a weight of {weight_elements} elements (>= 2^31)"
    if rank > MAX_SINGLE_LAUNCH_RANK:
        return f"rank {rank} > {MAX_SINGLE_LAUNCH_RANK}"
    if input_precision(compute_dtype) == "ieee":
        return "fp32 dots without tf32 (torch.backends.cuda.matmul.allow_tf32 is off)"
    return None


def _gemm_launch(x, weight, weight_strides, bias, down, down_strides, up, up_strides, rank, hidden_scale, out_scale,
                 compute_dtype, y, hidden, sms: Optional[int], tile: Optional[BlockConfig], dropout: float = 0.0,
                 seed: Optional[torch.Tensor] = None, drop_output: bool = False) -> Launch:
    """The kernel's launch for x [M, K] writing y [M, N] and, if hidden has M rows, hidden [M, r];
    the operands' (k, n) / (k, j) / (j, n) strides are given, so one kernel runs the forward
    (weight = W^T) and the backward's input launch (weight = W). dropout > 0 masks the rank dot's
    input x (element (row, k)), or with drop_output the up dot's result (element (row, n))."""
    rows, dim_in = x.shape
    dim_out = y.shape[1]
    config = tile or gemm_config(rank, compute_dtype, rows, dim_out, sm_count(x.device) if sms is None else sms,
                                 aligned(x, dim_out, weight, down, up, y), dropout > 0.0 and drop_output)
    store_hidden = hidden.shape[0] == rows
    args = dict(
        x_ptr=x, weight_ptr=weight, bias_ptr=bias if bias is not None else weight, down_ptr=down, up_ptr=up,
        y_ptr=y, hidden_ptr=hidden if store_hidden else y, seed_ptr=y if seed is None else seed,
        rows=rows, dim_in=dim_in, dim_out=dim_out, rank=rank, hidden_scale=hidden_scale, out_scale=out_scale,
        dropout_p=dropout, dropout_keep=keep_factor(dropout),
        stride_x_row=x.stride(0), stride_x_col=x.stride(1),
        stride_w_k=weight_strides[0], stride_w_n=weight_strides[1],
        stride_down_k=down_strides[0], stride_down_r=down_strides[1],
        stride_up_r=up_strides[0], stride_up_n=up_strides[1],
    )
    constexprs = dict(
        HAS_BIAS=bias is not None, STORE_HIDDEN=store_hidden, DROP_DOWN_INPUT=dropout > 0.0 and not drop_output,
        DROP_UP_OUTPUT=dropout > 0.0 and drop_output, COMPUTE_DTYPE=TRITON_DTYPES[compute_dtype],
        INPUT_PRECISION=input_precision(compute_dtype), BLOCK_ROWS=config.block_rows,
        BLOCK_DIM=config.block_dim, BLOCK_K=config.block_k, BLOCK_RANK=padded_rank(rank),
        GROUP_ROWS=config.group_rows,
    )
    grid = (cdiv(rows, config.block_rows) * cdiv(dim_out, config.block_dim),)
    return Launch(_lora_linear_kernel, grid, args, constexprs, config)


def forward(x, weight, bias, lora_a, lora_b, scale, compute_dtype, save_hidden, sms: Optional[int] = None,
            tile: Optional[BlockConfig] = None, *, dropout: float = 0.0, seed: Optional[torch.Tensor] = None) -> Plan:
    """y = x W^T + b + s (x' A^T) B^T for 2-D x [M, D_in] (contiguous W, A, B): launch "forward"
    (weight = W^T, down = A^T, up = B^T), buffers "y" [M, D_out] and "hidden" h = x' A^T [M, r]
    in the compute dtype ([0, r] unless save_hidden; the programs of column tile 0 store it).
    x' = dropout(x) at rate `dropout` with masks from the int64 tensor seed (kernels/dropout.py's
    INPUT stream), x itself without dropout; the base GEMM reads x undropped."""
    rows, dim_in = x.shape
    rank, dim_out = lora_a.shape[0], weight.shape[0]
    y = new_output((rows, dim_out), compute_dtype, x.device)
    hidden = new_output((rows if save_hidden else 0, rank), compute_dtype, x.device)
    buffers = dict(y=y, hidden=hidden)
    if rows == 0:
        return Plan({}, buffers)
    launch = _gemm_launch(x, weight, (1, dim_in), bias, lora_a, (1, dim_in), lora_b, (1, rank), rank, 1.0, scale,
                          compute_dtype, y, hidden, sms, tile, dropout, seed)
    return Plan({"forward": launch}, buffers)


def backward(grad_y, x, hidden, weight, lora_a, lora_b, scale, compute_dtype, compute_weights, grad_dtype,
             sms: Optional[int] = None, tiles: Optional[dict] = None, *, dropout: float = 0.0,
             seed: Optional[torch.Tensor] = None) -> Plan:
    """The backward, two launches: "backward_input", the same kernel as a GEMM over D_out
    (dx = dy W + g A, g = s dy B stored: weight = W, down = B, up = A), and, with
    compute_weights, "backward_weights", the bottleneck op's weights launch for the identity
    branch without dx (dB = s dy^T h, dA = g^T x; act(h) is h). Buffers "grad_x" [M, D_in],
    "grad_hidden" (g, [M, r]) and "partials" (the bottleneck weights layout per row chunk, whose
    head is grad_layout). dx is always written: the weights launch reads g, which the input
    launch computes (a frozen first block's LoRA layer pays for one unused [M, D_in] write).
    dropout, seed: the forward's; both launches draw its mask again (dx = dy W + (g A) * keep,
    dA = g^T dropout(x); the saved h is already of the dropped x)."""
    rows, dim_in = x.shape
    rank, dim_out = lora_a.shape[0], weight.shape[0]
    tiles = tiles or {}
    grad_x = new_output((rows, dim_in), x.dtype, x.device)
    grad_hidden = new_output((rows, rank), compute_dtype, x.device)
    if rows == 0 or not compute_weights:
        partials = torch.zeros((1, bottleneck_grad_layout(dim_in, rank, dim_out).size), dtype=grad_dtype,
                               device=x.device)
    launches = {}
    if rows:
        launches["backward_input"] = _gemm_launch(
            grad_y, weight, (dim_in, 1), None, lora_b, (rank, 1), lora_a, (dim_in, 1), rank, scale, 1.0,
            compute_dtype, grad_x, grad_hidden, sms, tiles.get("backward_input"), dropout, seed, drop_output=True)
        if compute_weights:
            # act(h) is h: the saved h serves as the act buffer, read as the bottleneck plan reads it.
            launches["backward_weights"], partials = bottleneck_backward_weights(
                grad_y, x, hidden, not stores_act(rank, BOTTLENECK_DEFAULT), grad_hidden, lora_a, lora_b, None,
                None, scale, None, "identity", compute_dtype, x.new_empty((0, dim_in)), False, grad_dtype, sms,
                tiles.get("backward_weights"), input_dropout=dropout, seed=seed)
    return Plan(launches, dict(grad_x=grad_x, grad_hidden=grad_hidden, partials=partials))
