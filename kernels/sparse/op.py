"""Sparse mixture of adapters: y = residual + scale * (row_scale * sum_j p_j * A_{e_j}(x)).

x has D columns, y has w_up's D_out (w_up [E, D_out, r]): D for an adapter, another width for a
width-changing mixture such as per-task LoRA branches on qkv (D_out = 3 D), fc1 or fc2.

Two forms share the kernels. `sparse_adapter` routes each row to its top-k experts by a learned
gate (logits = x W_gate^T + b_gate in fp32, ties to the lower expert index, p = softmax over the
k chosen logits); `routed_adapter` takes the experts and weights per row from the caller
(multi-task batches, per-image routing). The math is reference.sparse_adapter / routed_adapter.

Two designs run it (plan.choose_design picks by shape, a variant may force one):
- dense-masked (jit_dense.py; the `default` variant family): every expert's weights stacked,
  unselected experts zeroed after the activation; one launch forward, two backward; E*r up to 256.
- grouped (jit_grouped.py; the `grouped` variant): assignments sorted by expert, FLOPs
  proportional to k; gate, grouped and combine launches forward, three backward.

One pair of custom ops serves both designs (fused_adapters::sparse_forward and
sparse_backward, one node each for torch.compile): the forward returns everything either design
saves, the other's outputs empty. Which path runs, kernels or reference, is decided inside the
forward op by kernels/paths.py's rule; the reference path recomputes in its backward.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import paths, reference
from ..checks import check_sparse_arguments, epilogue_arguments
from ..customop import FusedOp, refuse_double_backward, wants_grad
from ..dropout import check_dropout, seed_tensor
from ..launch import (
    device_context, fold_rows, int32_columns, new_output, packed_grad_dtype, param_grad, reduce_partials, scale_grad,
    scale_mode,
)
from ..variants import Variant, pick, time_cuda
from . import plan
from .configs import DEFAULT_VARIANT, MAX_EXPERTS, VARIANTS_BY_NAME
from .plan import choose_design, grad_layout

__all__ = ["sparse_adapter", "routed_adapter", "routed_adapter_unchecked", "uses_kernels", "uses_dense_kernels",
           "sort_assignments", "forward_op", "backward_op"]


def _op_name(gated: bool) -> str:
    return "sparse_adapter" if gated else "routed_adapter"


def _dtypes(x, residual, compute_dtype, out_dtype, params) -> tuple:
    dtypes = (x.dtype, compute_dtype, out_dtype) + tuple(p.dtype for p in params if p is not None)
    return dtypes + ((residual.dtype,) if residual is not None else ())


def _dense_variant(name: str, pass_name: str, key, device, time_variant) -> Variant:
    """The dense design's variant: the op's variant= argument when given, else the one in force
    (use_variant / autotune, which times the dense variants only)."""
    chosen = VARIANTS_BY_NAME[name] if name else pick("sparse_adapter", pass_name, key, device, time_variant,
                                                       among=lambda variant: not variant.grouped)
    return DEFAULT_VARIANT if chosen.grouped else chosen


def sort_assignments(idx: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grouped design's sort of the assignments (row * k + slot) by expert: (order [M*k] int64,
    stable; counts [E] int64). [M*k] integers, no M x D bytes, and no device sync: the counts by
    index_add (torch.bincount reads the largest index back to the host on CUDA)."""
    flat = idx.reshape(-1)
    one = torch.ones((), dtype=torch.int64, device=idx.device).expand(flat.shape)  # no [M*k] ones written
    counts = torch.zeros(experts, dtype=torch.int64, device=idx.device).index_add_(0, flat, one)
    return torch.argsort(flat, stable=True), counts


def _reference(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, scale_value,
               terms, row_scale, top_k, activation, compute_dtype, autocast, dropout=0.0, input_dropout=0.0,
               seed=None):
    """(y, logits or None) of the reference, in the given compute dtype."""
    logits = None
    if w_gate is not None:
        logits = reference.gate_logits(x, w_gate, b_gate)
        expert_idx, expert_weight = reference.topk_routing(logits, top_k)
    scale_arg = scale if scale is not None else (None if scale_value == 1.0 else scale_value)
    y = reference.routed_in_dtype(x, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale_arg,
                                  activation=activation, residual=terms, row_scale=row_scale, dtype=compute_dtype,
                                  autocast=autocast, dropout=dropout, seed=seed, input_dropout=input_dropout)
    return y, logits


# --------------------------------------------------------------------------------------------
# The custom ops: both designs and the reference
# --------------------------------------------------------------------------------------------


def _forward_impl(
    x: torch.Tensor, w_gate: Optional[torch.Tensor], b_gate: Optional[torch.Tensor],
    expert_idx: Optional[torch.Tensor], expert_weight: Optional[torch.Tensor], w_down: torch.Tensor,
    b_down: Optional[torch.Tensor], w_up: torch.Tensor, b_up: Optional[torch.Tensor], scale: Optional[torch.Tensor],
    scale_value: float, residual: Optional[torch.Tensor], add_input: bool, row_scale: Optional[torch.Tensor],
    top_k: int, activation: str, compute_dtype: torch.dtype, out_dtype: torch.dtype, autocast: bool, save: bool,
    return_logits: bool, design: str, variant: str, dropout: float = 0.0, input_dropout: float = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """2-D x [M, D]; gated form when w_gate is given, routed (expert_idx, expert_weight [M, k])
    otherwise. Returns y [M, D_out]; what the design saves for backward (0 rows unless save, and on
    the reference path): hidden ([M, E*r] dense, [M*k, r] grouped by sorted position), idx
    [M, k] int32 (grouped), weights ([M, E] dense, [M, k] grouped), order [M*k] and counts [E]
    (grouped: the sort); logits [M, E] fp32 (0 rows unless return_logits). dropout: the rate on
    each expert's act(h); input_dropout: on x as the down projections read it; both masks drawn
    from the int64 tensor seed (kernels/dropout.py)."""
    rows, dim = x.shape
    experts, rank, _ = w_down.shape
    gated = w_gate is not None
    params = (w_gate, b_gate, expert_weight, w_down, b_down, w_up, b_up, scale)

    def no_sort():  # order and counts of a design that does not sort: distinct tensors (outputs may not alias)
        return x.new_empty((0,), dtype=torch.int64), x.new_empty((0,), dtype=torch.int64)

    if not paths.use_kernels(_op_name(gated), x.device.type, _dtypes(x, residual, compute_dtype, out_dtype, params),
                             rank):
        terms = ([x] if add_input else []) + ([residual] if residual is not None else [])
        y, logits = _reference(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale,
                               scale_value, terms, row_scale, top_k, activation, compute_dtype, autocast,
                               dropout, input_dropout, seed)
        logits = logits if return_logits else x.new_empty((0, experts), dtype=torch.float32)
        return (y.to(out_dtype).contiguous(), x.new_empty((0, rank), dtype=compute_dtype),
                x.new_empty((0, top_k), dtype=torch.int32), x.new_empty((0, top_k), dtype=torch.float32), *no_sort(),
                logits)
    x = int32_columns(x)
    residual = int32_columns(residual) if residual is not None else None
    epilogue = (scale, scale_value, residual, add_input, row_scale, activation, compute_dtype, out_dtype, save)
    with device_context(x):
        if design == "dense":
            def planned(chosen):
                return plan.forward(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale,
                                    scale_value, residual, add_input, row_scale, top_k, activation, compute_dtype,
                                    out_dtype, save, return_logits, chosen, dropout=dropout,
                                    input_dropout=input_dropout, seed=seed)

            def key():
                return (tuple(x.shape), x.stride(), x.dtype, tuple(w_down.shape), w_up.shape[1], gated, top_k,
                        scale_mode(scale), None if residual is None else (residual.dtype, residual.stride()),
                        row_scale is not None, add_input, activation, compute_dtype, out_dtype, save, return_logits,
                        dropout > 0.0, input_dropout > 0.0)

            launches = planned(_dense_variant(variant, "forward", key, x.device, lambda v: time_cuda(planned(v))))
            launches()
            out = launches.buffers
            return (out["y"], out["hidden"], x.new_empty((0, top_k), dtype=torch.int32), out["weights"], *no_sort(),
                    out["logits"])
        if gated:
            routing = plan.gate(x, w_gate, b_gate, top_k, return_logits)
            routing()
            idx, weights, logits = (routing.buffers[name] for name in ("idx", "weights", "logits"))
        else:  # [M, k] integers and weights: small copies, for the kernels' flat [M*k] reads
            idx = new_output(expert_idx.shape, torch.int32, x.device).copy_(expert_idx)
            weights = new_output(expert_weight.shape, torch.float32, x.device).copy_(expert_weight)
            logits = x.new_empty((0, experts), dtype=torch.float32)
        order, counts = sort_assignments(idx, experts)
        launches = plan.grouped_forward(x, idx, weights, order, counts, w_down, b_down, w_up, b_up, *epilogue,
                                        dropout=dropout, input_dropout=input_dropout, seed=seed)
        launches()
    hidden = launches.buffers["hidden"]
    return launches.buffers["y"], hidden, idx, weights, order, counts, logits


def _forward_fake(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, scale_value,
                  residual, add_input, row_scale, top_k, activation, compute_dtype, out_dtype, autocast, save,
                  return_logits, design, variant, dropout=0.0, input_dropout=0.0, seed=None):
    rows = x.shape[0]
    experts, rank, _ = w_down.shape
    params = (w_gate, b_gate, expert_weight, w_down, b_down, w_up, b_up, scale)
    kernels = paths.takes_triton(x.device.type, _dtypes(x, residual, compute_dtype, out_dtype, params), rank)
    grouped, saved = kernels and design == "grouped", save and kernels
    if grouped:
        hidden_shape, weights_shape = (rows * top_k if save else 0, rank), (rows, top_k)
    else:
        hidden_shape, weights_shape = (rows if saved else 0, experts * rank), (rows if saved else 0, experts)
    if not kernels:
        weights_shape = (0, top_k)
    return (x.new_empty((rows, w_up.shape[1]), dtype=out_dtype), x.new_empty(hidden_shape, dtype=compute_dtype),
            x.new_empty((rows if grouped else 0, top_k), dtype=torch.int32),
            x.new_empty(weights_shape, dtype=torch.float32),
            x.new_empty((rows * top_k if grouped else 0,), dtype=torch.int64),
            x.new_empty((experts if grouped else 0,), dtype=torch.int64),
            x.new_empty((rows if return_logits else 0, experts), dtype=torch.float32))


def _backward_impl(
    grad_y: torch.Tensor, grad_logits: Optional[torch.Tensor], x: torch.Tensor, w_gate: Optional[torch.Tensor],
    b_gate: Optional[torch.Tensor], expert_idx: Optional[torch.Tensor], expert_weight: Optional[torch.Tensor],
    w_down: torch.Tensor, b_down: Optional[torch.Tensor], w_up: torch.Tensor, b_up: Optional[torch.Tensor],
    scale: Optional[torch.Tensor], scale_value: float, row_scale: Optional[torch.Tensor], top_k: int, activation: str,
    compute_dtype: torch.dtype, autocast: bool, add_grad_y: bool, compute_dx: bool, hidden: torch.Tensor,
    idx: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, design: str, variant: str,
    dropout: float = 0.0, input_dropout: float = 0.0, seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx ([M, D] in x's dtype, or [0, D]; plus dy [M, D_out] when add_grad_y, which needs
    D_out = D), the packed parameter gradients (grad_layout, in packed_grad_dtype) and the routed
    form's d expert_weight [M, k] fp32 ([0, k] for the gated form). dropout, input_dropout, seed:
    the forward's; the masks are drawn again from the seed."""
    rows, dim = x.shape
    experts, rank, _ = w_down.shape
    dim_out = w_up.shape[1]
    gated = w_gate is not None
    grad_dtype = packed_grad_dtype(x, w_gate, b_gate, w_down, b_down, w_up, b_up, scale)
    layout = grad_layout(experts, rank, dim, dim_out)
    no_routing = x.new_empty((0, top_k), dtype=torch.float32)
    if rows == 0:
        return x.new_empty((0, dim)), torch.zeros(layout.size, dtype=grad_dtype, device=x.device), no_routing
    if hidden.shape[0] == 0:  # the forward took the reference: so does the backward
        return _reference_backward(grad_y, grad_logits, x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down,
                                   w_up, b_up, scale, scale_value, row_scale, top_k, activation, compute_dtype,
                                   autocast, add_grad_y, compute_dx, grad_dtype, dropout, input_dropout, seed)
    grad_y, x = int32_columns(grad_y), int32_columns(x)
    with device_context(x):
        if design == "dense":
            def planned(chosen):
                return plan.backward(grad_y, grad_logits, x, hidden, weights, w_gate, w_down, w_up, b_up, scale,
                                     scale_value, row_scale, activation, compute_dtype, add_grad_y, compute_dx,
                                     grad_dtype, chosen, dropout=dropout, input_dropout=input_dropout, seed=seed)

            def key():
                return (tuple(x.shape), x.stride(), grad_y.stride(), tuple(w_down.shape), w_up.shape[1], gated,
                        grad_logits is not None, scale_mode(scale), row_scale is not None, add_grad_y, compute_dx,
                        activation, compute_dtype, grad_dtype, dropout > 0.0, input_dropout > 0.0)

            launches = planned(_dense_variant(variant, "backward", key, x.device, lambda v: time_cuda(planned(v))))
            launches()
            blocks = launches.launches["sparse_backward_weights"].grid[2]
            packed = reduce_partials(launches.buffers["partials"], grad_dtype)
            # One dscale row per stacked-column block: fold them into the first.
            fold_rows(packed, layout.offset("scale"), blocks, dim_out)
            routing = no_routing
            if not gated:  # d weight of slot j = d weight of its expert (a repeated expert gets the same)
                routing = launches.buffers["grad_weights"].gather(1, expert_idx.long())
            return launches.buffers["grad_x"], packed[:layout.size], routing
        launches = plan.grouped_backward(grad_y, grad_logits, x, hidden, idx, weights, order, counts, w_gate, w_down,
                                         w_up, b_up, scale, scale_value, row_scale, activation, compute_dtype,
                                         add_grad_y, compute_dx, grad_dtype, dropout=dropout,
                                         input_dropout=input_dropout, seed=seed)
        launches()
    packed, gate_partials = launches.buffers["packed"], launches.buffers["gate_partials"]
    gate_start, scale_start = layout.offset("w_gate"), layout.offset("scale")
    # The gate's partials, summed over chunks in order (deterministic).
    packed[gate_start:scale_start] = reduce_partials(gate_partials, grad_dtype) if gated else 0
    # One dscale row per (expert, rank block): folded into the first, which ends the packed layout.
    fold_rows(packed, scale_start, (packed.numel() - scale_start) // dim_out, dim_out)
    return launches.buffers["grad_x"], packed[:layout.size], (no_routing if gated else launches.buffers["grad_weights"])


def _reference_backward(grad_y, grad_logits, x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up,
                        b_up, scale, scale_value, row_scale, top_k, activation, compute_dtype, autocast, add_grad_y,
                        compute_dx, grad_dtype, dropout=0.0, input_dropout=0.0, seed=None):
    """_backward_impl on the reference path: the reference forward again, differentiated by autograd."""
    experts, rank, dim = w_down.shape
    dim_out = w_up.shape[1]
    named = dict(x=x, w_gate=w_gate, b_gate=b_gate, expert_weight=expert_weight, w_down=w_down, b_down=b_down,
                 w_up=w_up, b_up=b_up, scale=scale)
    leaves = {name: t.detach().requires_grad_() for name, t in named.items() if t is not None}
    with torch.enable_grad():
        y, logits = _reference(leaves["x"], leaves.get("w_gate"), leaves.get("b_gate"), expert_idx,
                               leaves.get("expert_weight"), leaves["w_down"], leaves.get("b_down"), leaves["w_up"],
                               leaves.get("b_up"), leaves.get("scale"), scale_value, [], row_scale, top_k,
                               activation, compute_dtype, autocast, dropout, input_dropout, seed)
        outputs, grads = [y], [grad_y]
        if grad_logits is not None:
            outputs.append(logits)
            grads.append(grad_logits)
        found = dict(zip(leaves, torch.autograd.grad(outputs, list(leaves.values()), grads, allow_unused=True)))

    # Packed in fp32 (the kernels' partials), or in float64 for float64 calls: no rounding below
    # the gradients' own precision.
    pack = torch.float64 if grad_dtype == torch.float64 else torch.float32

    def flat(name, size):
        grad = found.get(name)
        grad = torch.zeros(size, device=x.device, dtype=pack) if grad is None else grad.reshape(-1).to(pack)
        return torch.cat([grad, grad.new_zeros(size - grad.numel())]) if grad.numel() < size else grad

    layout = grad_layout(experts, rank, dim, dim_out)
    packed = torch.cat([flat(name, size) for name, size in layout.fields]).to(grad_dtype)
    grad_x = found["x"] + grad_y if add_grad_y else found["x"]
    grad_x = grad_x.to(x.dtype).contiguous() if compute_dx else x.new_empty((0, dim))
    routing = found["expert_weight"].float() if expert_weight is not None else x.new_empty((0, top_k))
    return grad_x, packed, routing


def _backward_fake(grad_y, grad_logits, x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up,
                   scale, scale_value, row_scale, top_k, activation, compute_dtype, autocast, add_grad_y, compute_dx,
                   hidden, idx, weights, order, counts, design, variant, dropout=0.0, input_dropout=0.0, seed=None):
    experts, rank, dim = w_down.shape
    grad_dtype = packed_grad_dtype(x, w_gate, b_gate, w_down, b_down, w_up, b_up, scale)
    return (x.new_empty((x.shape[0] if compute_dx else 0, dim)),
            x.new_empty(grad_layout(experts, rank, dim, w_up.shape[1]).size, dtype=grad_dtype),
            x.new_empty((0 if w_gate is not None else x.shape[0], top_k), dtype=torch.float32))


_SAVED = ("x", "w_gate", "b_gate", "expert_idx", "expert_weight", "w_down", "b_down", "w_up", "b_up", "scale",
          "row_scale")


def _setup_context(ctx, inputs, output):
    _, hidden, idx, weights, order, counts, _ = output
    ctx.mark_non_differentiable(hidden, idx, weights, order, counts)
    ctx.set_materialize_grads(False)
    # x by reference, the parameters, and the design's own M x (E*r + E) or M*k x (r + 3) + E:
    # nothing M x D. With dropout, the 8-byte seed: the backward draws the mask again.
    ctx.save_for_backward(*(inputs[name] for name in _SAVED), hidden, idx, weights, order, counts, inputs["seed"])
    ctx.inputs = {name: inputs[name] for name in ("scale_value", "top_k", "activation", "compute_dtype", "autocast",
                                                  "add_input", "design", "variant", "out_dtype", "dropout",
                                                  "input_dropout")}
    ctx.residual_dtype = inputs["residual"].dtype if inputs["residual"] is not None else None


def _backward(ctx, needs, grad_y, grad_hidden, grad_idx, grad_weights, grad_order, grad_counts, grad_logits):
    saved = dict(zip(_SAVED + ("hidden", "idx", "weights", "order", "counts", "seed"), ctx.saved_tensors))
    x, w_gate, b_gate, w_down, b_down, w_up, b_up, scale = (
        saved[name] for name in ("x", "w_gate", "b_gate", "w_down", "b_down", "w_up", "b_up", "scale"))
    flags = ctx.inputs
    if grad_y is None and grad_logits is None:
        return {}
    op = _op_name(w_gate is not None)
    refuse_double_backward(op, op)
    if grad_y is None:  # only the logits were used (an auxiliary loss): dy [M, D_out] is zero
        grad_y = x.new_zeros((x.shape[0], w_up.shape[1]), dtype=flags["out_dtype"])
    grad_x, packed, grad_routing = backward_op(
        grad_y=grad_y, grad_logits=grad_logits, x=x, w_gate=w_gate, b_gate=b_gate, expert_idx=saved["expert_idx"],
        expert_weight=saved["expert_weight"], w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up, scale=scale,
        scale_value=flags["scale_value"], row_scale=saved["row_scale"], top_k=flags["top_k"],
        activation=flags["activation"], compute_dtype=flags["compute_dtype"], autocast=flags["autocast"],
        add_grad_y=flags["add_input"], compute_dx=needs["x"], hidden=saved["hidden"], idx=saved["idx"],
        weights=saved["weights"], order=saved["order"], counts=saved["counts"], design=flags["design"],
        variant=flags["variant"], dropout=flags["dropout"], input_dropout=flags["input_dropout"], seed=saved["seed"],
    )
    experts, rank, dim = w_down.shape
    split = grad_layout(experts, rank, dim, w_up.shape[1]).split(packed)
    expert_weight = saved["expert_weight"]
    return dict(
        x=grad_x, w_gate=param_grad(split["w_gate"], w_gate), b_gate=param_grad(split["b_gate"], b_gate),
        w_down=param_grad(split["w_down"], w_down), b_down=param_grad(split["b_down"], b_down),
        w_up=param_grad(split["w_up"], w_up), b_up=param_grad(split["b_up"], b_up),
        scale=scale_grad(split["scale"], scale), expert_weight=param_grad(grad_routing, expert_weight),
        residual=grad_y.to(ctx.residual_dtype) if ctx.residual_dtype is not None else None,
    )


backward_op = FusedOp("sparse_backward", _backward_impl, _backward_fake)
forward_op = FusedOp("sparse_forward", _forward_impl, _forward_fake, _setup_context, _backward)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def uses_kernels(x: torch.Tensor, experts: int, rank: int) -> bool:
    """Whether a sparse/routed call on x with E experts of rank r takes the Triton kernels here
    (CUDA, or the interpreter; rank up to 256) rather than the eager expert loop."""
    return paths.takes_triton(x.device.type, (x.dtype, reference.compute_dtype(x)), rank)


def uses_dense_kernels(x: torch.Tensor, experts: int, rank: int) -> bool:
    """Whether such a call takes the dense design's kernels (uses_kernels, and E*r up to
    MAX_DENSE_COLUMNS, without a grouped variant in force)."""
    return uses_kernels(x, experts, rank) and choose_design(experts, rank) == "dense"


def _check_variant(variant) -> str:
    if variant is None:
        return ""
    if not isinstance(variant, str) or variant not in VARIANTS_BY_NAME:
        raise ValueError(f"variant must be one of {sorted(VARIANTS_BY_NAME)} or None, got {variant!r}")
    return variant


def _run(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, top_k, activation,
         residual, row_scale, return_logits, variant, dropout, input_dropout, seed, check_range=True):
    """Both public forms after their checks: one call of the forward op."""
    scale_tensor, scale_value, terms = check_sparse_arguments(
        x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, activation, residual,
        row_scale, top_k, MAX_EXPERTS, check_range)
    variant = _check_variant(variant)
    dropout, input_dropout = check_dropout("dropout", dropout), check_dropout("input_dropout", input_dropout)
    seed = seed_tensor(seed, x.device) if dropout > 0.0 or input_dropout > 0.0 else None
    experts, rank, dim = w_down.shape
    dim_out = w_up.shape[1]
    compute_dtype = reference.compute_dtype(x)
    autocast = reference.autocasts(x)
    out_dtype = reference.output_dtype(compute_dtype, autocast, scale_tensor, terms)
    scale_tensor, scale_value, add_input, skip2d = epilogue_arguments(x, scale_tensor, scale_value, terms,
                                                                      out_dim=dim_out)
    if row_scale is not None:
        row_scale = row_scale.detach()
    if expert_idx is not None:
        top_k = expert_idx.shape[-1]
        # [M, k] views, read through their strides (the kernel takes any layout: no copy).
        expert_idx = expert_idx.reshape(-1, top_k)
        expert_weight = expert_weight.reshape(-1, top_k)
    save = wants_grad(x, w_gate, b_gate, expert_weight, w_down, b_down, w_up, b_up, scale_tensor, *terms)
    y, *_, logits = forward_op(
        x=x if x.dim() == 2 else x.reshape(-1, dim), w_gate=w_gate, b_gate=b_gate, expert_idx=expert_idx, expert_weight=expert_weight,
        w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up, scale=scale_tensor, scale_value=scale_value,
        residual=skip2d, add_input=add_input, row_scale=row_scale, top_k=top_k, activation=activation,
        compute_dtype=compute_dtype, out_dtype=out_dtype, autocast=autocast, save=save, return_logits=return_logits,
        design=choose_design(experts, rank, variant), variant=variant, dropout=dropout,
        input_dropout=input_dropout, seed=seed,
    )
    y = y if x.dim() == 2 else y.view(*x.shape[:-1], dim_out)
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
    dropout: float = 0.0,
    input_dropout: float = 0.0,
    seed=None,
):
    """Sparse top-k gated mixture of E bottleneck adapters:
    logits = x @ w_gate.T + b_gate (fp32), each row routed to its top_k experts (ties to the lower
    expert index; a NaN logit ranks first, as in torch.topk) with weights p = softmax over the
    chosen logits, and y = residual + scale * (row_scale[:, None] * sum_j p_j *
    (act(x @ w_down[e_j].T + b_down[e_j]) @ w_up[e_j].T + b_up[e_j])).

    x [..., D]; w_gate [E, D], b_gate [E] or None; w_down [E, r, D], b_down [E, r] or None,
    w_up [E, D_out, r], b_up [E, D_out] or None; E from 1 to 64. D_out is w_up's (D for an
    adapter; another width for a width-changing mixture, as bottleneck_adapter allows): y is
    [..., D_out], and scale ([D_out], one element, a float or None), residual ([..., D_out]) and
    row_scale are as in bottleneck_adapter, shared by the experts; x itself can be a residual term
    only where D_out = D. Returns y, or (y, logits) with return_logits: logits [M, E] fp32,
    differentiable (for load_balancing_loss).

    Gradients reach x, the gate (through the weights), every expert parameter, scale and the
    residual. CUDA tensors run the Triton kernels (the dense design, one launch forward and two
    backward, for E*r up to 256; the grouped design above), as does the interpreter under
    TRITON_INTERPRET=1; elsewhere, and where r > 256, the reference (kernels.backend(x) names the
    path; a CUDA call that falls back warns once). variant: one of
    list_variants("sparse_adapter") for this call's forward and backward (default: the one in
    force, see use_variant).

    dropout: inverted dropout at this rate on each chosen expert's act(h), inside the same
    launches: expert e's rank j of row m keeps or drops by element (m, e * r + j) of the mask of
    kernels.reference.dropout_factor (the hidden stream), so both designs drop the same units.
    input_dropout: on x as the experts' down projections read it (element (m, d) of the input
    stream, the same for a row's k experts), while the gate and a residual x read x undropped
    (the LoRA branch's dropout, as PEFT applies it). The masks come from Philox with `seed`
    (None: a fresh seed tensor drawn on x's device from torch's generator, so torch.manual_seed
    repeats a run; an int or an int64 tensor to choose one) and are drawn again in the backward,
    so nothing of them is saved. Pass 0 outside training (the kernels then compile without
    dropout).
    """
    return _run(x, w_gate, b_gate, None, None, w_down, b_down, w_up, b_up, scale, top_k, activation, residual,
                row_scale, bool(return_logits), variant, dropout, input_dropout, seed)


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
    dropout: float = 0.0,
    input_dropout: float = 0.0,
    seed=None,
) -> torch.Tensor:
    """The mixture with the routing given per row: expert_idx [M, k] (integers 0..E-1; a repeated
    expert adds its weights) and expert_weight [M, k] (differentiable) instead of a gate;
    otherwise as sparse_adapter (D_out included). Multi-task batches pass each row's task adapter
    with weight 1 (k = 1): per-task LoRA on a linear of D -> D_out is this form with identity
    activation, no biases, w_down the stacked A [T, r, D], w_up the stacked scaled B [T, D_out, r]
    and the base linear's output [..., D_out] as the residual. Per-image routing passes the same
    experts for all of an image's tokens.

    expert_idx is checked against E (one device sync on CUDA, skipped under torch.compile; the
    package's modules call routed_adapter_unchecked, whose indices are in range by construction).

    dropout, input_dropout, seed: as in sparse_adapter (the hidden mask's column of expert e's
    rank j is e * r + j, whatever slot names e). Per-task LoRA keeps PEFT's lora_dropout fused as
    input_dropout.
    """
    return _run(x, None, None, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, 0, activation,
                residual, row_scale, False, variant, dropout, input_dropout, seed)


def routed_adapter_unchecked(x, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale=None, *,
                             activation="gelu", residual=None, row_scale=None, variant=None, dropout=0.0,
                             input_dropout=0.0, seed=None) -> torch.Tensor:
    """routed_adapter for indices that are in range by construction (the package's modules: a
    top-k of the gate, a task index): every check but the one that reads expert_idx's values,
    so no device sync inside a model's forward."""
    return _run(x, None, None, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, 0, activation,
                residual, row_scale, False, variant, dropout, input_dropout, seed, check_range=False)
