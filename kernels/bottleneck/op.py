"""Fused bottleneck adapter: y = residual + scale * (row_scale * (act(x W_d^T + b_d) W_u^T + b_u)).

One Triton launch forward, two backward (jit.py; plan.py makes the launches). This file holds
the public function, the torch.library custom ops and their autograd.

Dtypes: the dots run in the compute dtype (autocast's under torch.autocast, as F.linear would,
else x's), with fp32 accumulation. x, the residual and the parameters are read in their own
dtypes and cast in registers, so autocast costs no M x D cast copy; y is stored in the dtype
eager PyTorch would give (reference.output_dtype).

Residual: a tensor, or a sum of tensors of which one may be x itself. x as a residual term is
read from the tile the program already walks, and its gradient (dy) is added in the store that
writes dx, so autograd runs no M x D add for the skip connection.

Saved for backward: x by reference, the parameters, and the pre-activation [M, r].

The functional entry point is `bottleneck_adapter`; it validates arguments and calls the custom
op `fused_adapters::bottleneck_forward`, whose autograd calls `fused_adapters::bottleneck_backward`
(torch.compile sees one node for each). Which path runs, kernels or reference, is decided inside
the custom op by kernels/paths.py's rule.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import paths, reference
from ..checks import check_bottleneck_arguments, epilogue_arguments
from ..customop import FusedOp, refuse_double_backward, wants_grad
from ..dropout import check_dropout, seed_tensor
from ..launch import (
    device_context, fold_rows, int32_columns, packed_grad_dtype, param_grad, reduce_partials, scale_grad, scale_mode,
)
from ..variants import pick, time_cuda
from . import plan
from .plan import column_major_output, grad_layout

__all__ = ["bottleneck_adapter", "forward_op", "backward_op"]


def _scale_arg(scale: Optional[torch.Tensor], scale_value: float):
    return scale if scale is not None else (None if scale_value == 1.0 else scale_value)


def _in_layout(tensor: torch.Tensor, column_major: bool) -> torch.Tensor:
    """A 2-D tensor in the layout the ops' fakes promise (a copy only where it is not already)."""
    if column_major:
        return tensor if tensor.stride() == (1, tensor.shape[0]) else tensor.t().contiguous().t()
    return tensor.contiguous()


def _forward_dtypes(x, residual, compute_dtype, out_dtype, params) -> tuple:
    # The parameters' dtypes count too: the weights kernel stores gradients in their dtype (no
    # bf16 stores in the interpreter: it truncates rather than rounds).
    dtypes = (x.dtype, compute_dtype, out_dtype) + tuple(p.dtype for p in params if p is not None)
    return dtypes + ((residual.dtype,) if residual is not None else ())


def _shape_key(x, w_down, w_up, scale, residual, row_scale) -> tuple:
    """What an autotuned choice is keyed by: shapes, strides, dtypes and which inputs exist."""
    return (tuple(x.shape), x.stride(), x.dtype, w_down.shape[0], w_up.shape[0], scale_mode(scale),
            None if residual is None else (residual.dtype, residual.stride()), row_scale is not None)


# --------------------------------------------------------------------------------------------
# The custom ops
# --------------------------------------------------------------------------------------------


def _forward_impl(
    x: torch.Tensor, w_down: torch.Tensor, b_down: Optional[torch.Tensor], w_up: torch.Tensor,
    b_up: Optional[torch.Tensor], scale: Optional[torch.Tensor], scale_value: float,
    residual: Optional[torch.Tensor], add_input: bool, row_scale: Optional[torch.Tensor], activation: str,
    compute_dtype: torch.dtype, out_dtype: torch.dtype, autocast: bool, save_hidden: bool, op: str,
    dropout: float = 0.0, input_dropout: float = 0.0, seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D x [M, D]. Returns y [M, D_out] in out_dtype and the pre-activation [M, r] in the compute
    dtype (or [0, r] when not saved: always on the reference path, which recomputes). add_input:
    x itself is a residual term besides `residual`. op: the public op this call is part of (for
    its warnings and errors). dropout / input_dropout: rates on act(h) / on x as the down
    projection reads it, masks drawn from the int64 tensor seed (kernels/dropout.py)."""
    dtypes = _forward_dtypes(x, residual, compute_dtype, out_dtype, (w_down, b_down, w_up, b_up, scale))
    if paths.use_kernels(op, x.device.type, dtypes, w_down.shape[0]):
        x = int32_columns(x)
        if residual is not None:
            residual = int32_columns(residual)

        def planned(variant):
            return plan.forward(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, add_input, row_scale,
                                activation, compute_dtype, out_dtype, save_hidden, variant, dropout=dropout,
                                input_dropout=input_dropout, seed=seed)

        with device_context(x):
            def key():
                return (_shape_key(x, w_down, w_up, scale, residual, row_scale), add_input, activation,
                        compute_dtype, out_dtype, save_hidden, dropout > 0.0, input_dropout > 0.0)

            variant = pick("bottleneck_adapter", "forward", key, x.device, lambda v: time_cuda(planned(v)))
            launches = planned(variant)
            launches()
        return launches.buffers["y"], launches.buffers["hidden"]
    terms = ([x] if add_input else []) + ([residual] if residual is not None else [])
    y = reference.bottleneck_in_dtype(x, w_down, b_down, w_up, b_up, _scale_arg(scale, scale_value),
                                      activation=activation, residual=terms, row_scale=row_scale,
                                      dtype=compute_dtype, autocast=autocast, dropout=dropout,
                                      input_dropout=input_dropout, seed=seed)
    # In the layout the fake says (row-major unless column_major_output), whatever layout the
    # eager expression gave.
    y = _in_layout(y.to(out_dtype), column_major_output(x, w_up.shape[0]))
    return y, x.new_empty((0, w_down.shape[0]), dtype=compute_dtype)


def _forward_fake(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, add_input, row_scale, activation,
                  compute_dtype, out_dtype, autocast, save_hidden, op, dropout=0.0, input_dropout=0.0, seed=None):
    rows, dim_out = x.shape[0], w_up.shape[0]
    dtypes = _forward_dtypes(x, residual, compute_dtype, out_dtype, (w_down, b_down, w_up, b_up, scale))
    kernels = paths.takes_triton(x.device.type, dtypes, w_down.shape[0])
    y = x.new_empty((dim_out, rows), dtype=out_dtype).t() if column_major_output(x, dim_out) else \
        x.new_empty((rows, dim_out), dtype=out_dtype)
    return y, x.new_empty((rows if save_hidden and kernels else 0, w_down.shape[0]), dtype=compute_dtype)


def _backward_impl(
    grad_y: torch.Tensor, x: torch.Tensor, hidden: torch.Tensor, w_down: torch.Tensor,
    b_down: Optional[torch.Tensor], w_up: torch.Tensor, b_up: Optional[torch.Tensor],
    scale: Optional[torch.Tensor], scale_value: float, row_scale: Optional[torch.Tensor], activation: str,
    compute_dtype: torch.dtype, add_grad_y: bool, compute_dx: bool,
    dropout: float = 0.0, input_dropout: float = 0.0, seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx ([M, D] in x's dtype, laid out like x, or [0, D] when not wanted; plus dy when
    add_grad_y) and the packed parameter gradients (grad_layout, in packed_grad_dtype); one
    tensor for all of them, since a custom op's outputs may not alias."""
    rows, dim = x.shape
    rank, dim_out = w_down.shape[0], w_up.shape[0]
    grad_dtype = packed_grad_dtype(x, w_down, b_down, w_up, b_up, scale)
    # The kernels need the pre-activation the kernels' forward saved; a forward that took the
    # reference saved none, and its backward is the reference's too.
    if hidden.shape[0] == rows and rows > 0:
        grad_y, x = int32_columns(grad_y), int32_columns(x)

        def planned(variant):
            return plan.backward(grad_y, x, hidden, w_down, w_up, b_up, scale, scale_value, row_scale, activation,
                                 compute_dtype, add_grad_y, compute_dx, grad_dtype, variant, dropout=dropout,
                                 input_dropout=input_dropout, seed=seed)

        with device_context(x):
            def key():
                return (_shape_key(x, w_down, w_up, scale, None, row_scale), grad_y.stride(), add_grad_y, compute_dx,
                        activation, compute_dtype, grad_dtype, dropout > 0.0, input_dropout > 0.0)

            # Both launches write (never accumulate into) their outputs: timing reruns are harmless.
            variant = pick("bottleneck_adapter", "backward", key, x.device, lambda v: time_cuda(planned(v)))
            launches = planned(variant)
            launches()
        rank_blocks = launches.launches["backward_weights"].grid[2]
        packed = reduce_partials(launches.buffers["partials"], grad_dtype)
        layout = grad_layout(dim, rank, dim_out, rank_blocks)
        # Split ranks leave one dscale row per rank block: fold them into the first.
        fold_rows(packed, layout.offset("scale"), rank_blocks, dim_out)
        return launches.buffers["grad_x"], packed[:grad_layout(dim, rank, dim_out).size]
    if rows == 0:
        return x.new_empty((0, dim)), torch.zeros(grad_layout(dim, rank, dim_out).size, dtype=grad_dtype,
                                                  device=x.device)
    grad_x, grad_w_down, grad_b_down, grad_w_up, grad_b_up, grad_scale = reference.bottleneck_adapter_backward(
        grad_y, x, w_down, b_down, w_up, b_up, _scale_arg(scale, scale_value), activation=activation,
        row_scale=row_scale, dtype=compute_dtype, dropout=dropout, input_dropout=input_dropout, seed=seed,
    )
    packed = torch.cat([g.reshape(-1) for g in (grad_w_up, grad_w_down, grad_b_up, grad_b_down, grad_scale)])
    if compute_dx:
        grad_x = (grad_x + grad_y) if add_grad_y else grad_x
        grad_x = _in_layout(grad_x.to(x.dtype), column_major_output(x, dim))  # as the fake: like x
    else:
        grad_x = x.new_empty((0, dim))
    return grad_x, packed.to(grad_dtype)


def _backward_fake(grad_y, x, hidden, w_down, b_down, w_up, b_up, scale, scale_value, row_scale, activation,
                   compute_dtype, add_grad_y, compute_dx, dropout=0.0, input_dropout=0.0, seed=None):
    rank, dim = w_down.shape
    return (
        x.new_empty((dim, x.shape[0])).t() if compute_dx and column_major_output(x, dim) else
        x.new_empty((x.shape[0] if compute_dx else 0, dim)),
        x.new_empty(grad_layout(dim, rank, w_up.shape[0]).size,
                    dtype=packed_grad_dtype(x, w_down, b_down, w_up, b_up, scale)),
    )


def _setup_context(ctx, inputs, output):
    _, hidden = output
    ctx.mark_non_differentiable(hidden)
    ctx.set_materialize_grads(False)  # no M x r zeros for the hidden output's (absent) gradient
    # x by reference, the parameters, and the M x r pre-activation: nothing of M x D is copied.
    # With dropout, the 8-byte seed: the backward draws the masks again rather than saving them.
    ctx.save_for_backward(inputs["x"], inputs["w_down"], inputs["b_down"], inputs["w_up"], inputs["b_up"],
                          inputs["scale"], inputs["row_scale"], hidden, inputs["seed"])
    ctx.inputs = {name: inputs[name] for name in ("scale_value", "activation", "compute_dtype", "add_input", "op",
                                                  "dropout", "input_dropout")}
    ctx.residual_dtype = inputs["residual"].dtype if inputs["residual"] is not None else None


def _backward(ctx, needs, grad_y, grad_hidden):
    x, w_down, b_down, w_up, b_up, scale, row_scale, hidden, seed = ctx.saved_tensors
    if grad_y is None:
        return {}
    refuse_double_backward(ctx.inputs["op"], ctx.inputs["op"])
    grad_x, packed = backward_op(
        grad_y=grad_y, x=x, hidden=hidden, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up, scale=scale,
        scale_value=ctx.inputs["scale_value"], row_scale=row_scale, activation=ctx.inputs["activation"],
        compute_dtype=ctx.inputs["compute_dtype"], add_grad_y=ctx.inputs["add_input"], compute_dx=needs["x"],
        dropout=ctx.inputs["dropout"], input_dropout=ctx.inputs["input_dropout"], seed=seed,
    )
    rank, dim = w_down.shape
    grads = grad_layout(dim, rank, w_up.shape[0]).split(packed)
    residual_dtype = ctx.residual_dtype
    return dict(
        x=grad_x, w_down=param_grad(grads["w_down"], w_down), b_down=param_grad(grads["b_down"], b_down),
        w_up=param_grad(grads["w_up"], w_up), b_up=param_grad(grads["b_up"], b_up),
        scale=scale_grad(grads["scale"], scale),
        # The residual's gradient is dy itself (cast to the residual's dtype where y was promoted).
        residual=None if residual_dtype is None else grad_y if grad_y.dtype == residual_dtype else
        grad_y.to(residual_dtype),
    )


backward_op = FusedOp("bottleneck_backward", _backward_impl, _backward_fake)
forward_op = FusedOp("bottleneck_forward", _forward_impl, _forward_fake, _setup_context, _backward)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def bottleneck_adapter(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    scale: Union[torch.Tensor, float, None] = None,
    *,
    activation: str = "gelu",
    residual=None,
    row_scale: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
    input_dropout: float = 0.0,
    seed=None,
) -> torch.Tensor:
    """y = residual + scale * (row_scale[:, None] * (act(x @ w_down.T + b_down) @ w_up.T + b_up)).

    x: [..., D], any leading dims and strides, fp16/bf16/fp32 (float64 runs the reference).
    w_down [r, D], b_down [r] or None, w_up [D_out, r], b_up [D_out] or None: any float dtype.
    D_out = D is the adapter; any other D_out makes a width-changing bottleneck (LoRA on a D -> 3D
    qkv: identity activation, no biases, scale alpha / r, the base layer's output as residual).
    y is [..., D_out].
    scale: [D_out] (channel-wise), a one-element tensor (layer-wise), a Python float, or None (= 1).
    residual: None, a tensor shaped like y, or a sequence of such tensors whose sum is the
    residual; x itself may be one of them when D_out = D (`residual=x` for y = x + A(x),
    `residual=(skip, x)` for y = skip + x + A(x)), which costs no extra pass over memory in
    either direction.
    row_scale: [M] with M = x.numel() // D, a per-row constant (no gradient), or None.
    activation: gelu (erf), gelu_tanh, relu, silu or identity.

    dropout: inverted dropout at this rate on act(h), the hidden activation (the bottleneck
    adapter's dropout). input_dropout: on x as the down projection reads it, while a residual x
    is added undropped (the LoRA branch's dropout, as PEFT applies it). Both run inside the same
    launches: the masks come from Philox with `seed` (None: a fresh seed tensor drawn on x's
    device from torch's generator, so torch.manual_seed repeats a run; an int or an int64
    tensor to choose one) and are drawn again in the backward, so nothing of them is saved.
    Pass 0 outside training (the kernels then compile without dropout). The mask of element
    (row, col) is kernels.reference.dropout_factor's.

    Layout: y (and x's gradient) is laid out like x: row-major, or column-major when x's [M, D]
    view is and D_out = D (see plan.column_major_output).

    Dtypes: the dots run in autocast's dtype under torch.autocast (as F.linear would), else in
    x's dtype with the parameters cast to it; fp32 accumulation. y has the dtype eager PyTorch
    gives the same expression (reference.output_dtype); each gradient has its input's dtype.

    CUDA tensors run one fused Triton launch forward and two backward; CPU tensors run the
    plain-PyTorch reference unless TRITON_INTERPRET=1 was set before import, in which case the
    same kernels run in Triton's interpreter. Ranks above 256 run the reference everywhere (a
    CUDA call warns once): kernels.backend and kernels/paths.py state the rule.
    """
    return _bottleneck(x, w_down, b_down, w_up, b_up, scale, activation, residual, row_scale, "bottleneck_adapter",
                       dropout, input_dropout, seed)


def _bottleneck(x, w_down, b_down, w_up, b_up, scale, activation, residual, row_scale, op: str, dropout=0.0,
                input_dropout=0.0, seed=None) -> torch.Tensor:
    """bottleneck_adapter, as part of the public op `op` (itself, or lora_linear's branch)."""
    scale_tensor, scale_value, terms = check_bottleneck_arguments(x, w_down, b_down, w_up, b_up, scale, activation,
                                                                  residual, row_scale)
    dropout, input_dropout = check_dropout("dropout", dropout), check_dropout("input_dropout", input_dropout)
    seed = seed_tensor(seed, x.device) if dropout > 0.0 or input_dropout > 0.0 else None
    compute_dtype = reference.compute_dtype(x)
    autocast = reference.autocasts(x)
    out_dtype = reference.output_dtype(compute_dtype, autocast, scale_tensor, terms)
    scale_tensor, scale_value, add_input, skip2d = epilogue_arguments(x, scale_tensor, scale_value, terms,
                                                                      out_dim=w_up.shape[0])
    if row_scale is not None:
        row_scale = row_scale.detach()
    save_hidden = wants_grad(x, w_down, b_down, w_up, b_up, scale_tensor, *terms)
    # A 2-D x goes in as it is: a reshape is an autograd node each way, even as a no-op view.
    y, _ = forward_op(
        x=x if x.dim() == 2 else x.reshape(-1, x.shape[-1]), w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up, scale=scale_tensor,
        scale_value=scale_value, residual=skip2d, add_input=add_input, row_scale=row_scale, activation=activation,
        compute_dtype=compute_dtype, out_dtype=out_dtype, autocast=autocast, save_hidden=save_hidden, op=op,
        dropout=dropout, input_dropout=input_dropout, seed=seed,
    )
    return y if x.dim() == 2 else y.view(*x.shape[:-1], w_up.shape[0])
