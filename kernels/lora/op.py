"""Fused LoRA linear: y = x W^T + b + s (x A^T) B^T, W [D_out, D_in] the frozen base weight,
A [r, D_in], B [D_out, r], s = alpha / r.

Two forms, chosen with kernels.use_variant("lora_linear", ...):

- "default": the base GEMM through F.linear (cuBLAS on a GPU), then the low-rank branch as one
  bottleneck_adapter launch with the GEMM's output as its residual. Forward: 1 GEMM + 1 Triton
  launch, and the base output [M, D_out] is written by the GEMM and read back by the branch.
- "single_launch": one Triton launch computes both. Each program owns a [BLOCK_ROWS, BLOCK_DIM]
  tile of y and walks D_in once, feeding every x tile to two dots: the GEMM accumulator
  x W^T and the rank-r accumulator h = x A^T; the epilogue adds s * h B^T and the bias. x is
  read once per column tile (from L2 after the first), nothing of [M, D_out] but y is written,
  and h costs padded-r / BLOCK_DIM extra FLOPs (rank padded to 16 for tl.dot: 12.5% with 128
  columns, 25% with the 64-column tiles small M gets). The programs of column tile 0 store
  h [M, r] for the backward.

  Backward, two launches (plan.py), no float atomics:
    1. the same kernel as a GEMM over D_out: dx = dy W + g A with g = s dy B accumulated on the
       side (dy read once per D_in column tile); the programs of column tile 0 store g [M, r];
    2. the bottleneck op's weights kernel (identity activation, no dx): dB = s dy^T h and
       dA = g^T x as deterministic per-chunk partial sums.
  With dropout the rank dot reads dropout(x) while the GEMM dot reads x; the backward draws the
  mask again from the seed: dx = dy W + (g A) * keep, dA = g^T dropout(x) (h is already of the
  dropped x). Each program draws the mask of every x tile it reads, so the Philox count is
  D_out / BLOCK_DIM per element of x (the default form draws each once).
  A base weight or bias that requires grad gets dW = dy^T x and db = sum(dy) from plain torch
  ops (LoRA freezes them; full fine-tuning has no reason to take this op).

  It takes ranks up to 64, dots on tensor cores (fp16, bf16, or fp32 with tf32 allowed) and a
  weight of fewer than 2^31 elements (its offsets are int32); other calls run the default form
  (see plan.single_launch_supported and the config tables). The backward follows the form its
  forward took, whatever variant is in force when it runs. On the reference path (kernels/
  paths.py's rule) the single-launch op computes the same math in plain PyTorch.

Which is faster is a GPU measurement (a Triton GEMM against cuBLAS, one launch against two),
so the default stays the two-launch form until the benchmark rows say otherwise; under
use_variant("lora_linear", "autotune") each new shape times both on CUDA and keeps the faster.

Dtypes as F.linear: under torch.autocast the dots run in autocast's dtype and y has it; without
autocast x, W and b must share a dtype (F.linear's rule) and A, B are cast to it in registers.
Each gradient has its input's dtype.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from .. import paths, reference
from ..bottleneck.op import _bottleneck
from ..checks import check_bottleneck_arguments, check_float_tensor, check_same_device
from ..customop import FusedOp, refuse_double_backward, wants_grad
from ..dropout import check_dropout, seed_tensor
from ..launch import device_context, input_precision, int32_columns, packed_grad_dtype, param_grad, reduce_partials
from ..variants import AUTOTUNE, Variant, current_variant, pick, time_cuda
from . import plan
from .configs import VARIANTS
from .plan import grad_layout, single_launch_supported

__all__ = ["lora_linear", "forward_op", "backward_op"]

OP = "lora_linear"


# --------------------------------------------------------------------------------------------
# The single-launch form's custom ops
# --------------------------------------------------------------------------------------------


def _dtypes(x, weight, bias, lora_a, lora_b, compute_dtype) -> tuple:
    return (x.dtype, compute_dtype) + tuple(t.dtype for t in (weight, bias, lora_a, lora_b) if t is not None)


def _forward_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                  lora_b: torch.Tensor, scale: float, compute_dtype: torch.dtype, save_hidden: bool,
                  dropout: float = 0.0, seed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D x [M, D_in]. y [M, D_out] in the compute dtype and h = dropout(x) A^T [M, r] (or [0, r]
    when not saved: always on the reference path, which recomputes). dropout: the rate on the
    branch's input, masks from the int64 tensor seed (kernels/dropout.py)."""
    rank = lora_a.shape[0]
    if paths.use_kernels(OP, x.device.type, _dtypes(x, weight, bias, lora_a, lora_b, compute_dtype), rank):
        x = int32_columns(x)
        with device_context(x):
            launches = plan.forward(x, weight.contiguous(), None if bias is None else bias.contiguous(),
                                    lora_a.contiguous(), lora_b.contiguous(), scale, compute_dtype, save_hidden,
                                    dropout=dropout, seed=seed)
            launches()
        return launches.buffers["y"], launches.buffers["hidden"]
    y = reference.lora_linear_in_dtype(x, weight, bias, lora_a, lora_b, scale, compute_dtype, dropout, seed)
    return y, x.new_empty((0, rank), dtype=compute_dtype)


def _forward_fake(x, weight, bias, lora_a, lora_b, scale, compute_dtype, save_hidden, dropout=0.0, seed=None):
    rows, rank = x.shape[0], lora_a.shape[0]
    kernels = paths.takes_triton(x.device.type, _dtypes(x, weight, bias, lora_a, lora_b, compute_dtype), rank)
    return (x.new_empty((rows, weight.shape[0]), dtype=compute_dtype),
            x.new_empty((rows if save_hidden and kernels else 0, rank), dtype=compute_dtype))


def _backward_impl(grad_y: torch.Tensor, x: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                   lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, compute_dtype: torch.dtype,
                   compute_dx: bool, compute_weights: bool, dropout: float = 0.0,
                   seed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dx ([M, D_in] in x's dtype, or [0, D_in]) and the packed [dB | dA] (grad_layout; zeros when
    not compute_weights). dropout, seed: the forward's; the mask is drawn again."""
    rows, dim_in = x.shape
    rank, dim_out = lora_a.shape[0], weight.shape[0]
    grad_dtype = packed_grad_dtype(x, lora_a, lora_b)
    size = grad_layout(dim_in, dim_out, rank).size
    if hidden.shape[0] == rows and rows > 0:  # the kernels' forward saved h: their backward
        grad_y, x = int32_columns(grad_y), int32_columns(x)
        with device_context(x):
            launches = plan.backward(grad_y, x, hidden, weight.contiguous(), lora_a.contiguous(),
                                     lora_b.contiguous(), scale, compute_dtype, compute_weights, grad_dtype,
                                     dropout=dropout, seed=seed)
            launches()
        grad_x = launches.buffers["grad_x"]
        return (grad_x if compute_dx else grad_x[:0]), reduce_partials(launches.buffers["partials"], grad_dtype)[:size]
    if rows == 0:
        return x.new_empty((0, dim_in)), torch.zeros(size, dtype=grad_dtype, device=x.device)
    grad_x, grad_a, grad_b = reference.lora_linear_backward(grad_y, x, weight, lora_a, lora_b, scale, compute_dtype,
                                                            dropout, seed)
    packed = torch.cat([grad_b.reshape(-1), grad_a.reshape(-1)]).to(grad_dtype)
    return (grad_x.to(x.dtype) if compute_dx else x.new_empty((0, dim_in))), packed


def _backward_fake(grad_y, x, hidden, weight, lora_a, lora_b, scale, compute_dtype, compute_dx, compute_weights,
                   dropout=0.0, seed=None):
    rank, dim_in = lora_a.shape
    return (x.new_empty((x.shape[0] if compute_dx else 0, dim_in)),
            x.new_empty(grad_layout(dim_in, weight.shape[0], rank).size, dtype=packed_grad_dtype(x, lora_a, lora_b)))


def _setup_context(ctx, inputs, output):
    _, hidden = output
    ctx.mark_non_differentiable(hidden)
    ctx.set_materialize_grads(False)
    # x by reference, the weights, and h [M, r]: nothing of M x D is copied. With dropout, the
    # 8-byte seed: the backward draws the mask again rather than saving it.
    ctx.save_for_backward(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"], hidden,
                          inputs["seed"])
    ctx.scale = inputs["scale"]
    ctx.compute_dtype = inputs["compute_dtype"]
    ctx.dropout = inputs["dropout"]


def _backward(ctx, needs, grad_y, grad_hidden):
    x, weight, bias, lora_a, lora_b, hidden, seed = ctx.saved_tensors
    if grad_y is None:
        return {}
    refuse_double_backward(OP, OP)
    grads = {}
    if needs["x"] or needs["lora_a"] or needs["lora_b"]:
        grad_x, packed = backward_op(
            grad_y=grad_y, x=x, hidden=hidden, weight=weight, lora_a=lora_a, lora_b=lora_b, scale=ctx.scale,
            compute_dtype=ctx.compute_dtype, compute_dx=needs["x"], compute_weights=needs["lora_a"] or needs["lora_b"],
            dropout=ctx.dropout, seed=seed,
        )
        split = grad_layout(x.shape[1], weight.shape[0], lora_a.shape[0]).split(packed)
        grads.update(x=grad_x, lora_a=param_grad(split["lora_a"], lora_a), lora_b=param_grad(split["lora_b"], lora_b))
    if needs["weight"]:  # not LoRA's case (W is frozen): plain torch, in the compute dtype as F.linear's
        dtype = ctx.compute_dtype
        grads["weight"] = (grad_y.to(dtype).t() @ x.to(dtype)).to(weight.dtype)
    if bias is not None and needs["bias"]:
        grads["bias"] = grad_y.float().sum(0).to(bias.dtype)
    return grads


backward_op = FusedOp("lora_linear_backward", _backward_impl, _backward_fake)
forward_op = FusedOp("lora_linear_forward", _forward_impl, _forward_fake, _setup_context, _backward)


# --------------------------------------------------------------------------------------------
# The public function: argument checks, the form, the call
# --------------------------------------------------------------------------------------------


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
    if lora_a.shape[0] == 0:
        raise ValueError("lora_a has rank 0 (shape [0, D_in]); LoRA needs rank >= 1")
    check_bottleneck_arguments(x, lora_a, None, lora_b, None, float(scale), "identity", None, None)
    if not reference.autocasts(x):
        # F.linear's rule: outside autocast x, weight and bias share one dtype.
        for name, tensor in (("weight", weight), ("bias", bias)):
            if tensor is not None and tensor.dtype != x.dtype:
                raise TypeError(f"{name} has dtype {tensor.dtype} but x has {x.dtype}; outside torch.autocast "
                                f"x, weight and bias must share a dtype (as for F.linear)")
    return float(scale)


def _two_launch(x, weight, bias, lora_a, lora_b, scale, dropout, seed):
    return _bottleneck(x, lora_a, None, lora_b, None, scale, "identity", F.linear(x, weight, bias), None, OP,
                       input_dropout=dropout, seed=seed)


def _single_launch(x, weight, bias, lora_a, lora_b, scale, compute_dtype, dropout, seed):
    save_hidden = wants_grad(x, weight, bias, lora_a, lora_b)
    y, _ = forward_op(x=x if x.dim() == 2 else x.reshape(-1, x.shape[-1]), weight=weight, bias=bias, lora_a=lora_a,
                      lora_b=lora_b, scale=scale, compute_dtype=compute_dtype, save_hidden=save_hidden,
                      dropout=dropout, seed=seed)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])


def _takes_single_launch(lora_a, weight, compute_dtype) -> bool:
    return single_launch_supported(lora_a.shape[0], compute_dtype, weight.numel()) is None


def _variant(x, weight, bias, lora_a, lora_b, scale, compute_dtype, dropout, seed) -> Variant:
    name = current_variant(OP)
    if name != AUTOTUNE or torch.compiler.is_compiling():  # nothing is timed while torch.compile traces
        return next(v for v in VARIANTS if v.name == (name if name != AUTOTUNE else "default"))
    tensors = (x, weight, bias, lora_a, lora_b)

    def key():
        return (tuple(x.shape), x.stride(), tuple(weight.shape), lora_a.shape[0], compute_dtype,
                input_precision(compute_dtype), torch.is_grad_enabled(), dropout > 0.0,
                tuple(None if t is None else (t.dtype, t.requires_grad) for t in tensors))

    def time_variant(variant):
        # Forward, plus the backward when one will follow: the two forms differ in both. On
        # detached copies, so no real gradient accumulates; and with saved-tensor hooks of its
        # own, so that an enclosing activation checkpoint does not record the timing runs.
        inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
        backward = wants_grad(*inputs)

        def run():
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), \
                    torch.set_grad_enabled(backward):
                y = _run(variant, *inputs, scale, compute_dtype, dropout, seed)
                if backward:
                    y.backward(torch.ones_like(y))
        return time_cuda(run)

    def runs(variant):  # a variant that would run the default form is not timed
        return not variant.single_launch or (
            _takes_single_launch(lora_a, weight, compute_dtype)
            and paths.takes_triton(x.device.type, _dtypes(x, weight, bias, lora_a, lora_b, compute_dtype)))

    return pick(OP, "forward", key, x.device, time_variant, among=runs)


def _run(variant, x, weight, bias, lora_a, lora_b, scale, compute_dtype, dropout=0.0, seed=None):
    if variant.single_launch and _takes_single_launch(lora_a, weight, compute_dtype):
        return _single_launch(x, weight, bias, lora_a, lora_b, scale, compute_dtype, dropout, seed)
    return _two_launch(x, weight, bias, lora_a, lora_b, scale, dropout, seed)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    dropout: float = 0.0,
    seed=None,
) -> torch.Tensor:
    """y = F.linear(x, weight, bias) + scale * (dropout(x) @ lora_a.T) @ lora_b.T, a LoRA-adapted
    linear.

    x: [..., D_in]; weight [D_out, D_in] and bias [D_out] or None (the frozen base layer);
    lora_a [r, D_in], lora_b [D_out, r]; scale: a float (alpha / r). y is [..., D_out].

    Dtypes as F.linear: under torch.autocast the dots run in autocast's dtype and y has it;
    outside it x, weight and bias must share a dtype (lora_a and lora_b are cast to it). Each
    gradient has its input's dtype; weight and bias get gradients too if they require them.

    dropout: inverted dropout at this rate on the branch's input (PEFT's lora_dropout), applied
    in x's dtype before the cast to the compute dtype, while the base layer reads x undropped.
    It runs inside the same launches in both forms: the mask comes from Philox with `seed` (None:
    a fresh seed tensor drawn on x's device from torch's generator, so torch.manual_seed repeats
    a run; an int or an int64 tensor to choose one) and is drawn again in the backward, so
    nothing of it is saved; a dropped element's gradient is dy W alone. The same seed gives the
    same mask in both forms. Pass 0 outside training (the kernels then compile without dropout).
    The mask of element (row, feature) of x's [M, D_in] view is kernels.reference.dropout_factor's
    (INPUT_STREAM).

    Runs the form that kernels.use_variant("lora_linear", name) selects: "default" (F.linear,
    then the fused low-rank branch: the base output is the branch's residual), or
    "single_launch" (one Triton launch for both; see the module docstring; ranks up to 64,
    fp16/bf16 dots or fp32 with tf32 allowed, else the default form runs). Calls that do not
    take the Triton kernels (CPU without TRITON_INTERPRET=1, float64, bf16 in the interpreter,
    rank above 256) run the same math in plain PyTorch inside the form's op.
    """
    scale = _check_arguments(x, weight, bias, lora_a, lora_b, scale)
    dropout = check_dropout("dropout", dropout)
    seed = seed_tensor(seed, x.device) if dropout > 0.0 else None
    compute_dtype = reference.compute_dtype(x)
    variant = _variant(x, weight, bias, lora_a, lora_b, scale, compute_dtype, dropout, seed)
    return _run(variant, x, weight, bias, lora_a, lora_b, scale, compute_dtype, dropout, seed)
