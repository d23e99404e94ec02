"""AdapterFusion in rank space: y = residual + sum_i p_i (a_i W_v^T), p = softmax_i(q . k_i / T),
over N frozen-or-not bottleneck adapters a_i that read the same x (reference.adapter_fusion is
the spec).

The eager form writes every a_i, k_i and v_i (3 N x M x D) and keeps them for backward. Here no
a_i is ever formed. With up_i = scale_i W_up_i and c_i = scale_i b_up_i, a_i = up_i act_i + c_i:

- scores: q . k_i = q^T W_k a_i + q . b_k, and q . b_k is the same for every i (it cancels in the
  softmax). q^T W_k a_i = (x Q_i^T + e_i) . act_i + x . f_i + o_i, with the [r, D] matrix
  Q_i = (W_k up_i)^T W_q, e_i = b_q W_k up_i, f_i = W_q^T W_k c_i and o_i = b_q . W_k c_i: weight-
  space products of N r x D (folded per call, like the scale). So the scores need act_i = act(x
  W_down_i^T + b_down_i) and two more projections of x: one kernel that reads x once from memory
  and writes only p [M, N] ("fusion_scores");
- mixing: sum_i p_i (a_i W_v^T) = sum_i p_i (act_i (W_v up_i)^T + W_v c_i) since the p_i sum to 1,
  which is the sparse mixture's routed form with every adapter chosen, weights p, up-projections
  W_v up_i and biases W_v c_i, and the residual in its epilogue: one launch.

Forward: two launches, no M x D intermediate, no D x D GEMM on M rows. Saved for backward: p
[M, N] here and the mixture's [M, N r] pre-activation and [M, N] weights. Backward: the
mixture's two launches give dx, d p and the folded weights' gradients; "fusion_scores_backward"
turns d p into the rank-space gradient [M, 2 N r + N]; one GEMM over it adds this share of dx
into the mixture's (beta = 1: no separate M x D add), another gives the stacked weights'
gradients; autograd carries the folds' gradients back to W_q, b_q, W_k, W_v and the adapters.
Every reduction is a GEMM or an in-order sum: deterministic. Both passes are one custom op each
(fused_adapters::fusion_forward and fusion_backward), so torch.compile sees one node.

Dropout on the adapters' act_i (the adapters' own dropout, reference.adapter_fusion's): a_i is
formed from the dropped act_i, so both uses of act_i read it: the scores kernel multiplies act_i
by the keep mask (HIDDEN stream, column i r + j of the row's [N r] hidden) before the dot with
g_i, and the mixture, the sparse kernels' routed form with every adapter, draws the same mask
for its expert i's columns. Their backwards draw it again from the seed (the one tensor added
to what is saved, 8 bytes); the launches stay the same.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .. import paths, reference
from ..checks import (
    check_activation, check_experts, check_float_tensor, check_residual, check_same_device, epilogue_arguments,
)
from ..customop import FusedOp, refuse_double_backward, wants_grad
from ..dropout import check_dropout, seed_tensor
from ..launch import device_context, int32_columns, packed_grad_dtype, param_grad
from ..sparse import op as sparse_op
from ..sparse.plan import grad_layout
from . import plan
from .configs import MAX_ADAPTERS, MAX_COLUMNS

__all__ = ["adapter_fusion", "uses_kernels", "fold_weights", "forward_op", "backward_op"]


# --------------------------------------------------------------------------------------------
# The custom ops (fused_adapters::fusion_forward and fusion_backward): scores, then mixture
# --------------------------------------------------------------------------------------------


def _forward_impl(
    x: torch.Tensor, w_down: torch.Tensor, b_down: Optional[torch.Tensor], value_up: torch.Tensor,
    value_bias: Optional[torch.Tensor], query_hidden: torch.Tensor, query_hidden_bias: torch.Tensor,
    query_bias: torch.Tensor, query_bias_bias: torch.Tensor, residual: Optional[torch.Tensor], add_input: bool,
    activation: str, compute_dtype: torch.dtype, out_dtype: torch.dtype, autocast: bool, temperature: float,
    save: bool, dropout: float = 0.0, seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """2-D x [M, D]: (y [M, D]; p [M, N] fp32; what the mixture saves for backward, its
    pre-activation [M, N r] and weights [M, N], 0 rows unless save). dropout: the rate on each
    adapter's act(h), its mask drawn from the int64 tensor seed (kernels/dropout.py)."""
    adapters = w_down.shape[0]
    x = int32_columns(x)
    with device_context(x):
        launches = plan.scores(x, w_down.contiguous(), b_down, query_hidden.contiguous(), query_hidden_bias,
                               query_bias.contiguous(), query_bias_bias, activation, compute_dtype, temperature,
                               dropout=dropout, seed=seed)
        launches()
    probs = launches.buffers["probs"]
    # The same rate and seed: the mixture's expert i draws the columns i r + j the scores drew.
    y, hidden, _, weights, *_ = sparse_op._forward_impl(
        x, None, None, _every(x, adapters), probs, w_down, b_down, value_up, value_bias, None, 1.0, residual,
        add_input, None, adapters, activation, compute_dtype, out_dtype, autocast, save, False, "dense", "",
        dropout=dropout, seed=seed)
    return y, probs, hidden, weights


def _every(x: torch.Tensor, adapters: int) -> torch.Tensor:
    """Every adapter in every row: [M, N] indices as a broadcast view of an [N] arange (no copy)."""
    return torch.arange(adapters, device=x.device).expand(x.shape[0], adapters)


def _forward_fake(x, w_down, b_down, value_up, value_bias, query_hidden, query_hidden_bias, query_bias,
                  query_bias_bias, residual, add_input, activation, compute_dtype, out_dtype, autocast, temperature,
                  save, dropout=0.0, seed=None):
    rows, dim = x.shape
    adapters, rank, _ = w_down.shape
    saved = rows if save else 0
    return (x.new_empty((rows, dim), dtype=out_dtype), x.new_empty((rows, adapters), dtype=torch.float32),
            x.new_empty((saved, adapters * rank), dtype=compute_dtype),
            x.new_empty((saved, adapters), dtype=torch.float32))


def _backward_impl(
    grad_y: torch.Tensor, x: torch.Tensor, probs: torch.Tensor, hidden: torch.Tensor, weights: torch.Tensor,
    w_down: torch.Tensor, b_down: Optional[torch.Tensor], value_up: torch.Tensor, value_bias: Optional[torch.Tensor],
    query_hidden: torch.Tensor, query_hidden_bias: torch.Tensor, query_bias: torch.Tensor, add_input: bool,
    activation: str, compute_dtype: torch.dtype, autocast: bool, temperature: float, compute_dx: bool,
    dropout: float = 0.0, seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [M, D] in x's dtype, dy included with add_input, or [0, D]; the mixture's packed
    parameter gradients (kernels/sparse/plan.grad_layout: w_down, b_down, value_up, value_bias);
    d [w_down | query_hidden | query_bias] [2 N r + N, D] fp32 and d of their biases [2 N r + N]
    fp32 from the scores). dropout, seed: the forward's; both parts draw the mask again."""
    rows, dim = x.shape
    adapters = w_down.shape[0]
    every = _every(x, adapters)
    # The mixture's backward: dx (with dy for a residual x), its weights' gradients and d p.
    grad_x, packed, grad_probs = sparse_op._backward_impl(
        grad_y, None, x, None, None, every, probs, w_down, b_down, value_up, value_bias, None, 1.0, None, adapters,
        activation, compute_dtype, autocast, add_input, True, hidden, every, weights, None, None, "dense", "",
        dropout=dropout, seed=seed)
    # The scores' backward: d p to the rank-space gradient, one launch; then this share of dx
    # added into the mixture's in the GEMM's own epilogue (beta = 1: no separate M x D add), and the
    # stacked weights' gradients. The GEMMs run in x's dtype: under autocast with fp32 x they read
    # x as it is (no M x D cast copy).
    gemm_dtype = x.dtype
    x = int32_columns(x)
    with device_context(x):
        launches = plan.scores_backward(x, probs, grad_probs, w_down.contiguous(), b_down, query_hidden.contiguous(),
                                        query_hidden_bias, activation, compute_dtype, temperature, gemm_dtype,
                                        dropout=dropout, seed=seed)
        launches()
    grad_rank = launches.buffers["grad_rank"]
    stacked = torch.cat([w_down.reshape(-1, dim), query_hidden.reshape(-1, dim), query_bias]).to(gemm_dtype)
    grad_x = grad_x.addmm_(grad_rank, stacked) if compute_dx else x.new_empty((0, dim))
    grad_weights = (grad_rank.t() @ x).float()
    return grad_x, packed, grad_weights, grad_rank.float().sum(0)


def _backward_fake(grad_y, x, probs, hidden, weights, w_down, b_down, value_up, value_bias, query_hidden,
                   query_hidden_bias, query_bias, add_input, activation, compute_dtype, autocast, temperature,
                   compute_dx, dropout=0.0, seed=None):
    adapters, rank, dim = w_down.shape
    width = plan.rank_space_width(adapters, rank)
    grad_dtype = packed_grad_dtype(x, None, None, w_down, b_down, value_up, value_bias, None)
    return (x.new_empty((x.shape[0] if compute_dx else 0, dim)),
            x.new_empty(grad_layout(adapters, rank, dim).size, dtype=grad_dtype),
            x.new_empty((width, dim), dtype=torch.float32), x.new_empty((width,), dtype=torch.float32))


_SAVED = ("x", "w_down", "b_down", "value_up", "value_bias", "query_hidden", "query_hidden_bias", "query_bias",
          "seed")


def _setup_context(ctx, inputs, output):
    _, probs, hidden, weights = output
    ctx.mark_non_differentiable(probs, hidden, weights)
    ctx.set_materialize_grads(False)
    # x by reference, the parameter-sized folds, p [M, N], the mixture's [M, N r] and [M, N]:
    # nothing M x D, nothing N x M x D. With dropout, the 8-byte seed: the backward draws the
    # masks again rather than saving them.
    ctx.save_for_backward(*(inputs[name] for name in _SAVED), probs, hidden, weights)
    ctx.flags = {name: inputs[name] for name in ("add_input", "activation", "compute_dtype", "autocast",
                                                 "temperature", "dropout")}
    ctx.residual_dtype = inputs["residual"].dtype if inputs["residual"] is not None else None


def _backward(ctx, needs, grad_y, grad_probs, grad_hidden, grad_weights):
    if grad_y is None:
        return {}
    refuse_double_backward("adapter_fusion", "adapter_fusion")
    saved = dict(zip(_SAVED + ("probs", "hidden", "weights"), ctx.saved_tensors))
    grad_x, packed, grad_stacked, grad_biases = backward_op(grad_y=grad_y, compute_dx=needs["x"], **saved,
                                                            **ctx.flags)
    w_down, b_down = saved["w_down"], saved["b_down"]
    adapters, rank, dim = w_down.shape
    split = grad_layout(adapters, rank, dim).split(packed)
    columns = adapters * rank
    dw_down, dw_query_hidden, dw_query_bias = grad_stacked.split((columns, columns, adapters))
    db_down, db_query_hidden, db_query_bias = grad_biases.split((columns, columns, adapters))
    # w_down and b_down feed both launches: their two shares, summed.
    w_down_grad = (split["w_down"].float() + dw_down.reshape(-1)).view(w_down.shape).to(w_down.dtype)
    b_down_grad = None if b_down is None else (split["b_down"].float() + db_down).view(b_down.shape).to(b_down.dtype)
    value_up, value_bias = saved["value_up"], saved["value_bias"]
    query_hidden, query_hidden_bias = saved["query_hidden"], saved["query_hidden_bias"]
    return dict(
        x=grad_x, w_down=w_down_grad, b_down=b_down_grad,
        value_up=param_grad(split["w_up"], value_up), value_bias=param_grad(split["b_up"], value_bias),
        query_hidden=dw_query_hidden.view(query_hidden.shape).to(query_hidden.dtype),
        query_hidden_bias=db_query_hidden.to(query_hidden_bias.dtype),
        query_bias=dw_query_bias.to(saved["query_bias"].dtype), query_bias_bias=db_query_bias,
        residual=grad_y.to(ctx.residual_dtype) if ctx.residual_dtype is not None else None,
    )


backward_op = FusedOp("fusion_backward", _backward_impl, _backward_fake)
forward_op = FusedOp("fusion_forward", _forward_impl, _forward_fake, _setup_context, _backward)


# --------------------------------------------------------------------------------------------
# The weight-space folds and the public function
# --------------------------------------------------------------------------------------------


def fold_weights(w_up, b_up, scale, w_query, b_query, w_key, b_key, w_value) -> dict:
    """The weight-space products the two launches read (see the module docstring), differentiable:
    "value_up" [N, D, r] = W_v up_i, "value_bias" [N, D] = W_v c_i (or None), "query_hidden"
    [N, r, D] = Q_i, "query_hidden_bias" [N, r] = e_i, "query_bias" [N, D] = f_i,
    "query_bias_bias" [N] = o_i (plus b_q . b_k, the same for every adapter: it cancels in the
    softmax and gives b_k its zero gradient).

    Three GEMMs, each reading one D x D weight once ([up | c] stacked as D x (N r + N) columns), in
    the weights' dtype when they share one (fp32 or fp16/bf16 master weights: no D x D cast copy;
    the products accumulate in fp32 inside the GEMM), else fp32; autocast off. None costs D^3: at
    N = 8, r = 8, D = 768 they are ~0.1 GFLOP."""
    dtypes = {t.dtype for t in (w_up, w_query, w_key, w_value)}
    fold = dtypes.pop() if len(dtypes) == 1 else torch.float32
    adapters, dim, rank = w_up.shape
    columns = adapters * rank
    with torch.autocast(w_up.device.type, enabled=False):
        up = w_up.to(fold)
        bias = None if b_up is None else b_up.to(fold)
        if scale is not None:
            scale = scale.to(fold)
            up = up * (scale[:, :, None] if scale.dim() == 2 else scale[:, None, None])
            bias = None if bias is None else bias * (scale if scale.dim() == 2 else scale[:, None])
        # [D, N r (+ N)]: column (i, j) is up_i's column j; then one column per c_i.
        stacked = up.permute(1, 0, 2).reshape(dim, columns)
        if bias is not None:
            stacked = torch.cat([stacked, bias.t()], dim=1)
        keyed = w_key.to(fold) @ stacked                                   # W_k [up | c]
        queried = keyed.t() @ w_query.to(fold)                             # [N r (+ N), D]
        valued = w_value.to(fold) @ stacked                                # W_v [up | c]
        folds = dict(value_up=valued[:, :columns].reshape(dim, adapters, rank).permute(1, 0, 2),
                     value_bias=None if bias is None else valued[:, columns:].t(),
                     query_hidden=queried[:columns].reshape(adapters, rank, dim))
        b_query = None if b_query is None else b_query.to(fold)
        projected = None if b_query is None else b_query @ keyed             # [N r (+ N)]
        folds["query_hidden_bias"] = (up.new_zeros((adapters, rank)) if projected is None
                                      else projected[:columns].reshape(adapters, rank))
        folds["query_bias"] = queried[columns:] if bias is not None else up.new_zeros((adapters, dim))
        folds["query_bias_bias"] = (projected[columns:] if projected is not None and bias is not None
                                    else up.new_zeros((adapters,)))
        if b_query is not None and b_key is not None:
            folds["query_bias_bias"] = folds["query_bias_bias"] + b_query @ b_key.to(fold)
        return folds


def uses_kernels(x: torch.Tensor, adapters: int, rank: int) -> bool:
    """Whether adapter_fusion on x with N adapters of rank r takes the Triton kernels here (CUDA or
    the interpreter, N * r <= 256) rather than the reference."""
    return (adapters * rank <= MAX_COLUMNS
            and paths.takes_triton(x.device.type, (x.dtype, reference.compute_dtype(x)), rank))


def _check_arguments(x, w_down, b_down, w_up, b_up, scale, w_query, b_query, w_key, b_key, w_value, activation,
                     residual, temperature) -> list:
    check_float_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape [..., D] with D >= 1, got {tuple(x.shape)}")
    dim = x.shape[-1]
    adapters, _ = check_experts(x, w_down, b_down, w_up, b_up)
    if adapters > MAX_ADAPTERS:
        raise ValueError(f"w_down stacks {adapters} adapters; adapter_fusion takes 1 to {MAX_ADAPTERS}")
    if scale is not None:
        check_float_tensor("scale", scale)
        if tuple(scale.shape) not in ((adapters,), (adapters, dim)):
            raise ValueError(f"scale must be None, [N] = [{adapters}] (one per adapter) or [N, D] = [{adapters}, {dim}] "
                             f"(channel-wise), got {tuple(scale.shape)}")
    for name, weight in (("w_query", w_query), ("w_key", w_key), ("w_value", w_value)):
        check_float_tensor(name, weight)
        if tuple(weight.shape) != (dim, dim):
            raise ValueError(f"{name} must have shape [D, D] = [{dim}, {dim}], got {tuple(weight.shape)}")
    for name, bias in (("b_query", b_query), ("b_key", b_key)):
        if bias is not None:
            check_float_tensor(name, bias)
            if tuple(bias.shape) != (dim,):
                raise ValueError(f"{name} must have shape [D] = [{dim}] or be None, got {tuple(bias.shape)}")
    check_activation(activation)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
    check_same_device(x, (("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up), ("scale", scale),
                          ("w_query", w_query), ("b_query", b_query), ("w_key", w_key), ("b_key", b_key),
                          ("w_value", w_value)))
    return check_residual(x, residual)


def adapter_fusion(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    w_query: torch.Tensor,
    b_query: Optional[torch.Tensor],
    w_key: torch.Tensor,
    b_key: Optional[torch.Tensor],
    w_value: torch.Tensor,
    *,
    activation: str = "gelu",
    residual=None,
    temperature: float = 1.0,
    dropout: float = 0.0,
    seed=None,
) -> torch.Tensor:
    """AdapterFusion over N bottleneck adapters that read x [..., D]:
    a_i = scale_i * (act(x @ w_down[i].T + b_down[i]) @ w_up[i].T + b_up[i]),
    q = x @ w_query.T + b_query, k_i = a_i @ w_key.T + b_key, v_i = a_i @ w_value.T,
    p = softmax_i(q . k_i / temperature) and y = residual + sum_i p_i v_i.

    w_down [N, r, D], b_down [N, r] or None, w_up [N, D, r], b_up [N, D] or None (N from 1 to
    16); scale [N, D] (channel-wise), [N] or None; w_query, w_key, w_value [D, D]; b_query, b_key
    [D] or None; residual None, a tensor shaped like x, or a sequence of them (summed).

    Computed in rank space (this module's docstring): the fusion probabilities in one launch,
    the mixture (with W_v and the residual folded in) in one more; nothing N x M x D is formed or
    saved. Gradients reach x, every weight (the adapters' too, when they require it) and the
    residual; b_key's is zero, as it is in exact arithmetic (q . b_k is the same for every
    adapter). Dtypes as bottleneck_adapter: dots in the autocast dtype under torch.autocast, the
    scores and the softmax in fp32. CUDA tensors and the interpreter run the kernels for
    N * r <= 256; elsewhere the reference.

    dropout: inverted dropout at this rate on each adapter's act(h) (the adapters' own dropout),
    which every use of a_i then reads: the keys, the values and so the scores and y. It runs
    inside the same launches: the mask comes from Philox with `seed` (None: a fresh seed tensor
    drawn on x's device from torch's generator, so torch.manual_seed repeats a run; an int or an
    int64 tensor to choose one) and is drawn again in the backward, so nothing of it is saved.
    Pass 0 outside training (the kernels then compile without dropout). Adapter i's rank j in
    row m is element (m, i * r + j) of kernels.reference.dropout_factor's [M, N r] mask.
    """
    terms = _check_arguments(x, w_down, b_down, w_up, b_up, scale, w_query, b_query, w_key, b_key, w_value,
                             activation, residual, temperature)
    dropout = check_dropout("dropout", dropout)
    seed = seed_tensor(seed, x.device) if dropout > 0.0 else None
    adapters, rank, dim = w_down.shape
    compute_dtype = reference.compute_dtype(x)
    params = (w_down, b_down, w_up, b_up, scale, w_query, b_query, w_key, b_key, w_value)
    dtypes = (x.dtype, compute_dtype) + tuple(p.dtype for p in params if p is not None) + tuple(t.dtype for t in terms)
    if adapters * rank > MAX_COLUMNS or not paths.use_kernels("adapter_fusion", x.device.type, dtypes, rank):
        return reference.adapter_fusion(x, w_down, b_down, w_up, b_up, scale, w_query, b_query, w_key, b_key,
                                        w_value, activation=activation, residual=residual, temperature=temperature,
                                        dropout=dropout, seed=seed)
    folds = fold_weights(w_up, b_up, scale, w_query, b_query, w_key, b_key, w_value)
    autocast = reference.autocasts(x)
    out_dtype = reference.output_dtype(compute_dtype, autocast, None, terms)
    _, _, add_input, skip = epilogue_arguments(x, None, 1.0, terms)
    save = wants_grad(x, w_down, b_down, *folds.values(), *terms)
    y, *_ = forward_op(
        x=x.reshape(-1, dim), w_down=w_down, b_down=b_down, value_up=folds["value_up"], value_bias=folds["value_bias"],
        query_hidden=folds["query_hidden"], query_hidden_bias=folds["query_hidden_bias"].reshape(-1),
        query_bias=folds["query_bias"], query_bias_bias=folds["query_bias_bias"], residual=skip, add_input=add_input,
        activation=activation, compute_dtype=compute_dtype, out_dtype=out_dtype, autocast=autocast,
        temperature=float(temperature), save=save, dropout=dropout, seed=seed)
    return y.view(x.shape)
