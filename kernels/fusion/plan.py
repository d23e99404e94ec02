"""AdapterFusion's launch plans: the one place that turns shapes, dtypes and flags into the scores
kernels' Launch records and the buffers they write (the op runs them, the compile check compiles
them, the benchmark counts them). Forward: "fusion_scores"; backward: "fusion_scores_backward".
The mixing runs as the sparse mixture's routed launches (kernels/sparse/plan.py). With dropout
both launches draw the HIDDEN mask from the seed tensor (kernels/dropout.py); at rate 0 they
compile without it."""

from __future__ import annotations

from typing import Optional

import torch

from ..dropout import keep_factor
from ..launch import TRITON_DTYPES, BlockConfig, Launch, Plan, cdiv, input_precision, new_output, optional, sm_count
from ..launch import variant_config
from .configs import (
    CHUNK_COLUMNS, DROPOUT_CHUNK_COLUMNS, SCORES_BACKWARD_CONFIGS, SCORES_CONFIGS, block_adapters, block_columns,
    block_config,
)
from .jit import _fusion_scores_backward_kernel, _fusion_scores_kernel

__all__ = ["scores", "scores_backward", "rank_space_width"]


def rank_space_width(adapters: int, rank: int) -> int:
    """Columns of the backward's rank-space gradient: [d hidden (N*r) | d query (N*r) | d scores (N)]."""
    return 2 * adapters * rank + adapters


def _common(x, w_down, compute_dtype, config, temperature, dropout, seed):
    adapters, rank, dim = w_down.shape
    constexprs = dict(
        HIDDEN_DROPOUT=dropout > 0.0, COMPUTE_DTYPE=TRITON_DTYPES[compute_dtype],
        INPUT_PRECISION=input_precision(compute_dtype), BLOCK_ROWS=config.block_rows, BLOCK_DIM=config.block_dim,
        BLOCK_ADAPTERS=block_adapters(adapters), BLOCK_COLUMNS=block_columns(adapters, rank),
    )
    # Without dropout seed_ptr is never read: x stands in for it.
    args = dict(rows=x.shape[0], dim=dim, rank=rank, adapters=adapters, inv_temperature=1.0 / temperature,
                stride_x_row=x.stride(0), stride_x_col=x.stride(1), seed_ptr=x if seed is None else seed,
                dropout_p=dropout, dropout_keep=keep_factor(dropout))
    return args, constexprs


def scores(x, w_down, b_down, w_query_hidden, b_query_hidden, w_query_bias, b_query_bias, activation, compute_dtype,
           temperature, sms: Optional[int] = None, tile: Optional[BlockConfig] = None, *, dropout: float = 0.0,
           seed: Optional[torch.Tensor] = None) -> Plan:
    """The fusion probabilities of 2-D x [M, D]: launch "fusion_scores"; buffer "probs" [M, N] fp32.
    w_down, w_query_hidden [N, r, D] (or [N*r, D]) contiguous, b_down and b_query_hidden [N*r],
    w_query_bias [N, D], b_query_bias [N] (the folds: fp32, or the weights' dtype where they share
    one; the kernel adds the biases in fp32). dropout: the rate on each adapter's act(h), its
    mask drawn from seed (an int64 tensor [], needed where dropout > 0)."""
    rows = x.shape[0]
    adapters = w_query_bias.shape[0]
    probs = new_output((rows, adapters), torch.float32, x.device)
    if rows == 0:
        return Plan({}, dict(probs=probs))
    config = tile or variant_config(block_config(SCORES_CONFIGS, adapters, w_down.shape[-2], compute_dtype), rows,
                                    sm_count(x.device) if sms is None else sms, 0)
    args, constexprs = _common(x, w_down, compute_dtype, config, temperature, dropout, seed)
    args = dict(x_ptr=x, w_down_ptr=w_down, b_down_ptr=optional(b_down, x), w_query_hidden_ptr=w_query_hidden,
                b_query_hidden_ptr=b_query_hidden, w_query_bias_ptr=w_query_bias, b_query_bias_ptr=b_query_bias,
                probs_ptr=probs, **args)
    chunk = DROPOUT_CHUNK_COLUMNS if dropout > 0.0 else CHUNK_COLUMNS
    constexprs = dict(ACTIVATION=activation, HAS_B_DOWN=b_down is not None,
                      CHUNK_COLUMNS=min(constexprs["BLOCK_COLUMNS"], chunk), **constexprs)
    launch = Launch(_fusion_scores_kernel, (cdiv(rows, config.block_rows),), args, constexprs, config)
    return Plan({"fusion_scores": launch}, dict(probs=probs))


def scores_backward(x, probs, grad_probs, w_down, b_down, w_query_hidden, b_query_hidden, activation,
                    compute_dtype, temperature, grad_dtype, sms: Optional[int] = None,
                    tile: Optional[BlockConfig] = None, *, dropout: float = 0.0,
                    seed: Optional[torch.Tensor] = None) -> Plan:
    """The rank-space gradient of the scores: launch "fusion_scores_backward"; buffer "grad_rank"
    [M, 2 N r + N] in grad_dtype (the dtype of the GEMMs that read it). dropout, seed: the
    forward's (see scores); the mask is drawn again from the seed."""
    rows = x.shape[0]
    adapters, rank, _ = w_down.shape
    grad_rank = new_output((rows, rank_space_width(adapters, rank)), grad_dtype, x.device)
    if rows == 0:
        return Plan({}, dict(grad_rank=grad_rank))
    config = tile or variant_config(block_config(SCORES_BACKWARD_CONFIGS, adapters, rank, compute_dtype), rows,
                                    sm_count(x.device) if sms is None else sms, 0)
    args, constexprs = _common(x, w_down, compute_dtype, config, temperature, dropout, seed)
    args = dict(x_ptr=x, probs_ptr=probs, grad_probs_ptr=grad_probs, w_down_ptr=w_down,
                b_down_ptr=optional(b_down, x), w_query_hidden_ptr=w_query_hidden, b_query_hidden_ptr=b_query_hidden,
                grad_rank_ptr=grad_rank, stride_gp_row=grad_probs.stride(0),
                stride_gp_col=grad_probs.stride(1), **args)
    constexprs = dict(ACTIVATION=activation, HAS_B_DOWN=b_down is not None, **constexprs)
    launch = Launch(_fusion_scores_backward_kernel, (cdiv(rows, config.block_rows),), args, constexprs, config)
    return Plan({"fusion_scores_backward": launch}, dict(grad_rank=grad_rank))
