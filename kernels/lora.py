"""Fused LoRA linear: y = x W^T + b + s (x A^T) B^T, W [D_out, D_in] the frozen base weight,
A [r, D_in], B [D_out, r], s = alpha / r.

Two forms, chosen with kernels.use_variant("lora_linear", ...):

- "default": the base GEMM through F.linear (cuBLAS on a GPU), then the low-rank branch as one
  bottleneck_adapter launch with the GEMM's output as its residual. Forward: 1 GEMM + 1 Triton
  launch, and the base output [M, D_out] is written by the GEMM and read back by the branch.
- "single_launch": one Triton launch computes both. Each program owns a [BLOCK_ROWS, BLOCK_COLS]
  tile of y and walks D_in once, feeding every x tile to two dots: the GEMM accumulator
  x W^T and the rank-r accumulator h = x A^T; the epilogue adds s * h B^T and the bias. x is
  read once per column tile (from L2 after the first), nothing of [M, D_out] but y is written,
  and h costs padded-r / BLOCK_COLS extra FLOPs (rank padded to 16 for tl.dot: 12.5% with 128
  columns, 25% with the 64-column tiles small M gets). The programs of column tile 0 store
  h [M, r] for the backward.

  Backward, two launches, no float atomics:
    1. the same kernel as a GEMM over D_out: dx = dy W + g A with g = s dy B accumulated on the
       side (dy read once per D_in column tile); the programs of column tile 0 store g [M, r];
    2. the bottleneck op's weights kernel (identity activation, no dx): dB = s dy^T h and
       dA = g^T x as deterministic per-chunk partial sums.
  A base weight or bias that requires grad gets dW = dy^T x and db = sum(dy) from plain torch
  ops (LoRA freezes them; full fine-tuning has no reason to take this op).

  It takes ranks up to 64, dots on tensor cores (fp16, bf16, or fp32 with tf32 allowed) and a
  weight of fewer than 2^31 elements (its offsets are int32); other calls run the default form
  (see single_launch_supported and the config tables). The backward follows the form its
  forward took, whatever variant is in force when it runs.

Which is faster is a GPU measurement (a Triton GEMM against cuBLAS, one launch against two),
so the default stays the two-launch form until the benchmark rows say otherwise; under
use_variant("lora_linear", "autotune") each new shape times both on CUDA and keeps the faster.

Dtypes as F.linear: under torch.autocast the dots run in autocast's dtype and y has it; without
autocast x, W and b must share a dtype (F.linear's rule) and A, B are cast to it in registers.
Each gradient has its input's dtype.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference
from .bottleneck import DEFAULT_VARIANT as BOTTLENECK_DEFAULT, backward_launches, bottleneck_adapter
from .checks import MAX_RANK, check_bottleneck_arguments, check_float_tensor, check_same_device
from .launch import (
    TRITON_DTYPES, Launch, device_context, dtype_group, input_precision, int32_columns, new_output,
    packed_grad_dtype, padded_rank, sm_count, takes_triton,
)
from .variants import AUTOTUNE, Variant, current_variant, pick, register_variants, time_cuda

__all__ = ["lora_linear", "GemmConfig", "LORA_LINEAR_CONFIGS", "LORA_LINEAR_UNALIGNED_CONFIGS", "VARIANTS",
           "lora_linear_launch", "plan_config", "single_launch_supported"]


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _lora_linear_kernel(
    x_ptr, weight_ptr, bias_ptr, down_ptr, up_ptr, y_ptr, hidden_ptr,
    rows, dim_in, dim_out, rank, hidden_scale, out_scale,
    stride_x_row, stride_x_col, stride_w_k, stride_w_n, stride_down_k, stride_down_r, stride_up_r, stride_up_n,
    HAS_BIAS: tl.constexpr, STORE_HIDDEN: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_RANK: tl.constexpr, GROUP_ROWS: tl.constexpr,
):
    # y[rows, cols] = x @ weight + out_scale * (hidden_scale * (x @ down)) @ up + bias, where
    # weight is the [K, N] operand (element (k, n) at k * stride_w_k + n * stride_w_n), down
    # [K, r] and up [r, N]. Forward: K = D_in, N = D_out, weight = W^T, down = A^T, up = B^T.
    # Backward input launch: x = dy, K = D_out, N = D_in, weight = W, down = B, up = A.
    #
    # Program order: GROUP_ROWS row tiles share each sweep over the column tiles, so the x rows
    # and the weight columns the concurrent programs read stay in L2 (as in Triton's matmul).
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(rows, BLOCK_ROWS)
    col_tiles = tl.cdiv(dim_out, BLOCK_COLS)
    per_group = GROUP_ROWS * col_tiles
    first_row_tile = (pid // per_group) * GROUP_ROWS
    group_rows = min(row_tiles - first_row_tile, GROUP_ROWS)
    pid_row = first_row_tile + (pid % per_group) % group_rows
    pid_col = (pid % per_group) // group_rows

    row_ids = pid_row * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_ids = row_ids.to(tl.int64)  # M * D may pass 2^31
    col_ids = pid_col * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = col_ids < dim_out
    rank_ids = tl.arange(0, BLOCK_RANK)
    rank_mask = rank_ids < rank
    dtype = COMPUTE_DTYPE

    # One pass over K feeds both dots; padded ranks load zero weights.
    acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    hidden = tl.zeros((BLOCK_ROWS, BLOCK_RANK), dtype=tl.float32)
    for k_start in range(0, dim_in, BLOCK_K):
        k_ids = k_start + tl.arange(0, BLOCK_K)
        k_mask = k_ids < dim_in
        x_tile = tl.load(
            x_ptr + row_ids[:, None] * stride_x_row + k_ids[None, :] * stride_x_col,
            mask=row_mask[:, None] & k_mask[None, :], other=0.0,
        ).to(dtype)
        weight_tile = tl.load(
            weight_ptr + k_ids[:, None] * stride_w_k + col_ids[None, :] * stride_w_n,
            mask=k_mask[:, None] & col_mask[None, :], other=0.0,
        ).to(dtype)
        down_tile = tl.load(
            down_ptr + k_ids[:, None] * stride_down_k + rank_ids[None, :] * stride_down_r,
            mask=k_mask[:, None] & rank_mask[None, :], other=0.0,
        ).to(dtype)
        acc = tl.dot(x_tile, weight_tile, acc, input_precision=INPUT_PRECISION)
        hidden = tl.dot(x_tile, down_tile, hidden, input_precision=INPUT_PRECISION)

    # Rounded to the compute dtype, as F.linear's output is; the backward reads this stored value.
    hidden = (hidden * hidden_scale).to(dtype)
    if STORE_HIDDEN:
        tl.store(hidden_ptr + row_ids[:, None] * rank + rank_ids[None, :], hidden,
                 mask=row_mask[:, None] & rank_mask[None, :] & (pid_col == 0))
    up_tile = tl.load(
        up_ptr + rank_ids[:, None] * stride_up_r + col_ids[None, :] * stride_up_n,
        mask=rank_mask[:, None] & col_mask[None, :], other=0.0,
    ).to(dtype)
    acc += out_scale * tl.dot(hidden, up_tile, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col_ids, mask=col_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    tl.store(y_ptr + row_ids[:, None] * dim_out + col_ids[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


# --------------------------------------------------------------------------------------------
# Block configurations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    name: str
    block_rows: int
    block_cols: int
    block_k: int
    num_warps: int
    num_stages: int
    group_rows: int = 8


# Keyed by (padded rank, dtype group of the compute dtype); each entry lists tiles from the
# largest to the smallest, and plan_config takes the largest whose grid fills the GPU. "fp32"
# means tf32 dots: fp32 without tf32 lowers both dots to FMAs, which spill at every tile tried
# from rank 32 up (64 x 64 x 32, rank 64: 1448 bytes on sm_90), and there cuBLAS's fp32 GEMM in
# the default form is the better kernel anyway. Ranks above 64 (wide hidden accumulators spill
# at 128 x 128 x 32 on sm_80) also take the default form: LoRA's ranks are 4 to 64.
#
# Every entry was compiled for sm_80 and sm_90 with compile_check (kernels lora_forward and
# lora_backward_input): no spills, MMA, vectorized loads, shared memory within sm_80's 163 KiB.
# Aligned launches (unit column stride, widths, row stride and pointers multiples of 16) take
# LORA_LINEAR_CONFIGS. Anything else takes LORA_LINEAR_UNALIGNED_CONFIGS: with no vectorized
# loads every element carries its own 64-bit address, and the aligned tiles spill there
# (64 x 64 x 64, rank 16, bf16, sm_80: 304 bytes); 64 x 64 x 16 does not.
MAX_SINGLE_LAUNCH_RANK = 64


def _configs(rank: int, group: str, tiles, suffix: str = "") -> list:
    return [GemmConfig(f"lora_r{rank}_{group}_{rows}x{cols}x{k}{suffix}", rows, cols, k, warps, stages)
            for rows, cols, k, warps, stages in tiles]


_RANKS = (16, 32, 64)
LORA_LINEAR_CONFIGS = {
    **{(rank, "half"): _configs(rank, "half", ((128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 4, 3)))
       for rank in _RANKS},
    **{(rank, "fp32"): _configs(rank, "fp32", ((64, 128, 32, 8, 2), (64, 64, 32, 4, 2), (32, 64, 32, 4, 2)))
       for rank in _RANKS},
}
LORA_LINEAR_UNALIGNED_CONFIGS = {
    **{(rank, "half"): _configs(rank, "half", ((64, 64, 16, 4, 2), (32, 32, 16, 4, 2)), "_unaligned")
       for rank in _RANKS},
    **{(rank, "fp32"): _configs(rank, "fp32", ((32, 32, 16, 4, 2),), "_unaligned") for rank in _RANKS},
}


def aligned(x: torch.Tensor, dim_out: int, *params: torch.Tensor) -> bool:
    """Whether a launch over x [M, K] writing [M, dim_out] is compiled with vectorized loads: unit
    column stride and everything the JIT specializes (widths, row stride, pointers) a multiple of 16."""
    return (x.stride(1) == 1 and x.stride(0) % 16 == 0 and x.shape[1] % 16 == 0 and dim_out % 16 == 0
            and all(t.data_ptr() % 16 == 0 for t in (x, *params)))


def plan_config(rank: int, compute_dtype: torch.dtype, rows: int, cols: int, sms: int,
                is_aligned: bool = True) -> GemmConfig:
    """The largest tile whose grid gives every SM a program (one full wave); the smallest tile
    when none does. ViT-B qkv at batch 2 (M 394, D_out 2304) on 132 SMs: 128 x 128 tiles give
    72 programs, 128 x 64 give 144."""
    table = LORA_LINEAR_CONFIGS if is_aligned else LORA_LINEAR_UNALIGNED_CONFIGS
    configs = table[(padded_rank(rank), dtype_group(compute_dtype))]
    for config in configs:
        if triton.cdiv(rows, config.block_rows) * triton.cdiv(cols, config.block_cols) >= sms:
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


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def lora_linear_launch(x, weight, weight_strides, bias, down, down_strides, up, up_strides, rank, hidden_scale,
                       out_scale, compute_dtype, y, hidden, config: Optional[GemmConfig] = None) -> Launch:
    """The kernel's launch for x [M, K] writing y [M, N] and, if hidden has M rows, hidden [M, r];
    the operands' (k, n) / (k, j) / (j, n) strides are given, so one kernel runs the forward
    (weight = W^T) and the backward's input launch (weight = W)."""
    rows, dim_in = x.shape
    dim_out = y.shape[1]
    if config is None:
        config = plan_config(rank, compute_dtype, rows, dim_out, sm_count(x.device),
                             aligned(x, dim_out, weight, down, up, y))
    store_hidden = hidden.shape[0] == rows
    args = dict(
        x_ptr=x, weight_ptr=weight, bias_ptr=bias if bias is not None else weight, down_ptr=down, up_ptr=up,
        y_ptr=y, hidden_ptr=hidden if store_hidden else y,
        rows=rows, dim_in=dim_in, dim_out=dim_out, rank=rank, hidden_scale=hidden_scale, out_scale=out_scale,
        stride_x_row=x.stride(0), stride_x_col=x.stride(1),
        stride_w_k=weight_strides[0], stride_w_n=weight_strides[1],
        stride_down_k=down_strides[0], stride_down_r=down_strides[1],
        stride_up_r=up_strides[0], stride_up_n=up_strides[1],
    )
    constexprs = dict(
        HAS_BIAS=bias is not None, STORE_HIDDEN=store_hidden, COMPUTE_DTYPE=TRITON_DTYPES[compute_dtype],
        INPUT_PRECISION=input_precision(compute_dtype), BLOCK_ROWS=config.block_rows,
        BLOCK_COLS=config.block_cols, BLOCK_K=config.block_k, BLOCK_RANK=padded_rank(rank),
        GROUP_ROWS=config.group_rows,
    )
    grid = (triton.cdiv(rows, config.block_rows) * triton.cdiv(dim_out, config.block_cols),)
    return Launch(_lora_linear_kernel, grid, args, constexprs, config)


def forward_launch(x, weight, bias, lora_a, lora_b, scale, compute_dtype, y, hidden, config=None) -> Launch:
    """y = x W^T + b + s (x A^T) B^T: weight = W^T ((k, n) at n * D_in + k), down = A^T, up = B^T."""
    dim_in, rank = x.shape[1], lora_a.shape[0]
    return lora_linear_launch(x, weight, (1, dim_in), bias, lora_a, (1, dim_in), lora_b, (1, rank), rank, 1.0,
                              scale, compute_dtype, y, hidden, config)


def backward_input_launch(grad_y, weight, lora_a, lora_b, scale, compute_dtype, grad_x, grad_hidden,
                          config=None) -> Launch:
    """dx = dy W + g A with g = s dy B stored: weight = W ((k, n) at k * D_in + n), down = B, up = A."""
    dim_in, rank = weight.shape[1], lora_a.shape[0]
    return lora_linear_launch(grad_y, weight, (dim_in, 1), None, lora_b, (rank, 1), lora_a, (dim_in, 1), rank,
                              scale, 1.0, compute_dtype, grad_x, grad_hidden, config)


def backward_weights_launch(grad_y, x, hidden, grad_hidden, lora_a, lora_b, scale, compute_dtype, grad_dtype):
    """The bottleneck op's weights launch for the identity branch (no dx): dB = s dy^T h and
    dA = g^T x, with the fp32 partials buffer it fills. Identity: act(h) is h, so the saved h
    serves as the act buffer at every rank."""
    rows, dim = x.shape
    _, weights_launch, partials = backward_launches(
        grad_y, x, hidden, lora_a, lora_b, None, None, scale, None, "identity", compute_dtype, False,
        grad_hidden, hidden, x.new_empty((0, dim)), grad_dtype, BOTTLENECK_DEFAULT,
    )
    return weights_launch, partials


def _forward_triton(x, weight, bias, lora_a, lora_b, scale, compute_dtype, save_hidden):
    rows = x.shape[0]
    rank, dim_out = lora_a.shape[0], weight.shape[0]
    y = new_output((rows, dim_out), compute_dtype, x.device)
    hidden = new_output((rows if save_hidden else 0, rank), compute_dtype, x.device)
    if rows == 0:
        return y, hidden
    x = int32_columns(x)
    with device_context(x):
        forward_launch(x, weight.contiguous(), None if bias is None else bias.contiguous(), lora_a.contiguous(),
                       lora_b.contiguous(), scale, compute_dtype, y, hidden)()
    return y, hidden


def _backward_triton(grad_y, x, hidden, weight, lora_a, lora_b, scale, compute_dtype, compute_dx, compute_weights):
    rows, dim_in = x.shape
    rank, dim_out = lora_a.shape[0], weight.shape[0]
    grad_dtype = packed_grad_dtype(x, lora_a, lora_b)
    grad_x = new_output((rows, dim_in), x.dtype, x.device)
    if rows == 0:
        return grad_x, torch.zeros(_packed_size(dim_in, dim_out, rank), dtype=grad_dtype, device=x.device)
    grad_hidden = new_output((rows, rank), compute_dtype, x.device)
    grad_y, x = int32_columns(grad_y), int32_columns(x)
    lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
    with device_context(x):
        # dx's launch also writes g, which the weights launch reads; without dx wanted it still
        # runs for g (the dW-less LoRA layer of a frozen model's first block, whose input needs no
        # gradient, pays for one unused [M, D_in] write).
        backward_input_launch(grad_y, weight.contiguous(), lora_a, lora_b, scale, compute_dtype, grad_x,
                              grad_hidden)()
        if not compute_weights:  # A and B need no gradient (frozen, or a dx-only pass)
            return grad_x, torch.zeros(_packed_size(dim_in, dim_out, rank), dtype=grad_dtype, device=x.device)
        weights_launch, partials = backward_weights_launch(grad_y, x, hidden, grad_hidden, lora_a, lora_b, scale,
                                                           compute_dtype, grad_dtype)
        weights_launch()
    # One deterministic reduction over chunks (none with one chunk).
    totals = partials[0] if partials.shape[0] == 1 else partials.sum(dim=0).to(grad_dtype)
    return (grad_x if compute_dx else grad_x[:0]), totals[:_packed_size(dim_in, dim_out, rank)]


def _packed_size(dim_in: int, dim_out: int, rank: int) -> int:
    """[dB (D_out x r) | dA (r x D_in)], the head of the bottleneck weights launch's partials."""
    return (dim_out + dim_in) * rank


# --------------------------------------------------------------------------------------------
# torch.library ops: one graph node each for torch.compile
# --------------------------------------------------------------------------------------------


def _forward_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                  lora_b: torch.Tensor, scale: float, compute_dtype: torch.dtype,
                  save_hidden: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D x [M, D_in]. y [M, D_out] in the compute dtype and h = x A^T [M, r] (or [0, r] when
    not saved). lora_linear sends only calls that take the Triton path here."""
    return _forward_triton(x, weight, bias, lora_a, lora_b, scale, compute_dtype, save_hidden)


_forward_op = torch.library.custom_op("fused_adapters::lora_linear_forward", _forward_impl, mutates_args=())


@_forward_op.register_fake
def _forward_fake(x, weight, bias, lora_a, lora_b, scale, compute_dtype, save_hidden):
    rows = x.shape[0]
    return (x.new_empty((rows, weight.shape[0]), dtype=compute_dtype),
            x.new_empty((rows if save_hidden else 0, lora_a.shape[0]), dtype=compute_dtype))


def _backward_impl(grad_y: torch.Tensor, x: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                   lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, compute_dtype: torch.dtype,
                   compute_dx: bool, compute_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """dx ([M, D_in] in x's dtype, or [0, D_in]) and the packed [dB | dA] (zeros when not
    compute_weights)."""
    return _backward_triton(grad_y, x, hidden, weight, lora_a, lora_b, scale, compute_dtype, compute_dx,
                            compute_weights)


_backward_op = torch.library.custom_op("fused_adapters::lora_linear_backward", _backward_impl, mutates_args=())


@_backward_op.register_fake
def _backward_fake(grad_y, x, hidden, weight, lora_a, lora_b, scale, compute_dtype, compute_dx, compute_weights):
    rank, dim_in = lora_a.shape
    return (x.new_empty((x.shape[0] if compute_dx else 0, dim_in)),
            x.new_empty(_packed_size(dim_in, weight.shape[0], rank), dtype=packed_grad_dtype(x, lora_a, lora_b)))


_X, _WEIGHT, _BIAS, _LORA_A, _LORA_B = range(5)
_FORWARD_INPUTS = 8


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, compute_dtype, _ = inputs
    _, hidden = output
    ctx.mark_non_differentiable(hidden)
    ctx.set_materialize_grads(False)
    # x by reference, the weights, and h [M, r]: nothing of M x D is copied.
    ctx.save_for_backward(x, weight, bias, lora_a, lora_b, hidden)
    ctx.scale = scale
    ctx.compute_dtype = compute_dtype


def _backward(ctx, grad_y, grad_hidden):
    x, weight, bias, lora_a, lora_b, hidden = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grad_y is None:
        return (None,) * len(needs)
    if torch.is_grad_enabled():
        raise RuntimeError(
            "lora_linear does not support double backward (create_graph=True / higher-order gradients); "
            "run that computation with fused_adapters.kernels.reference.lora_linear"
        )
    grads = [None] * _FORWARD_INPUTS
    if needs[_X] or needs[_LORA_A] or needs[_LORA_B]:
        grad_x, packed = torch.ops.fused_adapters.lora_linear_backward(
            grad_y, x, hidden, weight, lora_a, lora_b, ctx.scale, ctx.compute_dtype, needs[_X],
            needs[_LORA_A] or needs[_LORA_B],
        )
        rank, dim_in = lora_a.shape
        grad_b, grad_a = packed.split([weight.shape[0] * rank, rank * dim_in])
        grads[_X] = grad_x if needs[_X] else None
        grads[_LORA_A] = grad_a.view(rank, dim_in).to(lora_a.dtype) if needs[_LORA_A] else None
        grads[_LORA_B] = grad_b.view(weight.shape[0], rank).to(lora_b.dtype) if needs[_LORA_B] else None
    if needs[_WEIGHT]:  # not LoRA's case (W is frozen): plain torch, in the compute dtype as F.linear's
        dtype = ctx.compute_dtype
        grads[_WEIGHT] = (grad_y.to(dtype).t() @ x.to(dtype)).to(weight.dtype)
    if bias is not None and needs[_BIAS]:
        grads[_BIAS] = grad_y.float().sum(0).to(bias.dtype)
    return tuple(grads)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Variants and the public API
# --------------------------------------------------------------------------------------------


VARIANTS = (
    Variant("default", "the base GEMM through F.linear (cuBLAS on a GPU), then the low-rank branch as one fused "
                       "bottleneck launch with the GEMM's output as its residual"),
    Variant("single_launch", "base GEMM and low-rank branch in one Triton launch (x read once per column tile, "
                             "no [M, D_out] intermediate); backward 2 launches", single_launch=True),
)
register_variants("lora_linear", VARIANTS)


def _check_arguments(x, weight, bias, lora_a, lora_b, scale) -> float:
    check_float_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape [..., D_in] with D_in >= 1, got {tuple(x.shape)}")
    dim_in = x.shape[-1]
    check_float_tensor("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != dim_in or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [D_out, D_in] = [D_out, {dim_in}] with D_out >= 1 "
                         f"(D_in = x.shape[-1]), got {tuple(weight.shape)}")
    dim_out = weight.shape[0]
    if bias is not None:
        check_float_tensor("bias", bias)
        if tuple(bias.shape) != (dim_out,):
            raise ValueError(f"bias must have shape [D_out] = [{dim_out}] (weight's rows), got {tuple(bias.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float (alpha / rank), got {type(scale).__name__}")
    # A and B as the bottleneck op checks w_down and w_up, with B's rows tied to weight's.
    check_float_tensor("lora_a", lora_a)
    if lora_a.dim() != 2 or lora_a.shape[1] != dim_in:
        raise ValueError(f"lora_a must have shape [rank, D_in] = [rank, {dim_in}], got {tuple(lora_a.shape)}")
    check_float_tensor("lora_b", lora_b)
    if lora_b.dim() != 2 or lora_b.shape != (dim_out, lora_a.shape[0]):
        raise ValueError(f"lora_b must have shape [D_out, rank] = [{dim_out}, {lora_a.shape[0]}] (weight's rows, "
                         f"lora_a's rank), got {tuple(lora_b.shape)}")
    check_same_device(x, [("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)])
    rank = lora_a.shape[0]
    if rank == 0 or (rank > MAX_RANK and takes_triton(x.device.type, (x.dtype, reference.compute_dtype(x)))):
        raise ValueError(f"lora_a has rank {rank}; the fused kernels support rank 1 to {MAX_RANK}")
    check_bottleneck_arguments(x, lora_a, None, lora_b, None, float(scale), "identity", None, None)
    compute = reference.compute_dtype(x)
    autocast = x.dtype in reference.AUTOCAST_INPUT_DTYPES and torch.is_autocast_enabled(x.device.type)
    if not autocast:
        # F.linear's rule: outside autocast x, weight and bias share one dtype.
        for name, tensor in (("weight", weight), ("bias", bias)):
            if tensor is not None and tensor.dtype != compute:
                raise TypeError(f"{name} has dtype {tensor.dtype} but x has {x.dtype}; outside torch.autocast "
                                f"x, weight and bias must share a dtype (as for F.linear)")
    return float(scale)


def _two_launch(x, weight, bias, lora_a, lora_b, scale):
    return bottleneck_adapter(x, lora_a, None, lora_b, None, scale, activation="identity",
                              residual=F.linear(x, weight, bias))


def _single_launch(x, weight, bias, lora_a, lora_b, scale, compute_dtype):
    tensors = (x, weight, bias, lora_a, lora_b)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, _ = torch.ops.fused_adapters.lora_linear_forward(
        x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scale, compute_dtype, needs_grad,
    )
    return y.view(*x.shape[:-1], weight.shape[0])


def _takes_single_launch(x, weight, bias, lora_a, lora_b, compute_dtype) -> bool:
    dtypes = (x.dtype, compute_dtype) + tuple(t.dtype for t in (weight, bias, lora_a, lora_b) if t is not None)
    return takes_triton(x.device.type, dtypes) and single_launch_supported(
        lora_a.shape[0], compute_dtype, weight.numel()) is None


def _variant(x, weight, bias, lora_a, lora_b, scale, compute_dtype) -> Variant:
    name = current_variant("lora_linear")
    if torch.compiler.is_compiling():  # nothing is timed while torch.compile traces
        return next(v for v in VARIANTS if v.name == (name if name != AUTOTUNE else "default"))
    tensors = (x, weight, bias, lora_a, lora_b)

    def key():
        return (tuple(x.shape), x.stride(), tuple(weight.shape), lora_a.shape[0], compute_dtype,
                input_precision(compute_dtype), torch.is_grad_enabled(),
                tuple(None if t is None else (t.dtype, t.requires_grad) for t in tensors))

    def time_variant(variant):
        # Forward, plus the backward when one will follow: the two forms differ in both. On
        # detached copies, so no real gradient accumulates; and with saved-tensor hooks of its
        # own, so that an enclosing activation checkpoint does not record the timing runs.
        inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
        wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)

        def run():
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), \
                    torch.set_grad_enabled(wants_grad):
                y = _run(variant, *inputs, scale, compute_dtype)
                if wants_grad:
                    y.backward(torch.ones_like(y))
        return time_cuda(run)

    def runs(variant):  # a variant that would fall back to the default form is not timed
        return not variant.single_launch or _takes_single_launch(x, weight, bias, lora_a, lora_b, compute_dtype)

    return pick("lora_linear", "forward", key, x.device, time_variant, among=runs)


def _run(variant, x, weight, bias, lora_a, lora_b, scale, compute_dtype):
    if variant.single_launch and _takes_single_launch(x, weight, bias, lora_a, lora_b, compute_dtype):
        return _single_launch(x, weight, bias, lora_a, lora_b, scale, compute_dtype)
    return _two_launch(x, weight, bias, lora_a, lora_b, scale)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """y = F.linear(x, weight, bias) + scale * (x @ lora_a.T) @ lora_b.T, a LoRA-adapted linear.

    x: [..., D_in]; weight [D_out, D_in] and bias [D_out] or None (the frozen base layer);
    lora_a [r, D_in], lora_b [D_out, r]; scale: a float (alpha / r). y is [..., D_out].

    Dtypes as F.linear: under torch.autocast the dots run in autocast's dtype and y has it;
    outside it x, weight and bias must share a dtype (lora_a and lora_b are cast to it). Each
    gradient has its input's dtype; weight and bias get gradients too if they require them.

    Runs the form that kernels.use_variant("lora_linear", name) selects: "default" (F.linear,
    then the fused low-rank branch: the base output is the branch's residual), or
    "single_launch" (one Triton launch for both; see the module docstring; ranks up to 64,
    fp16/bf16 dots or fp32 with tf32 allowed, else the default form runs). Calls that do not
    take the Triton kernels (CPU without TRITON_INTERPRET=1, float64, bf16 in the interpreter)
    run the default form, whose branch then runs the plain-PyTorch reference.
    """
    scale = _check_arguments(x, weight, bias, lora_a, lora_b, scale)
    compute_dtype = reference.compute_dtype(x)
    variant = _variant(x, weight, bias, lora_a, lora_b, scale, compute_dtype)
    return _run(variant, x, weight, bias, lora_a, lora_b, scale, compute_dtype)
