"""Argument checks the ops share: a TypeError or ValueError that names the argument and says
what was expected, before any kernel runs."""

from __future__ import annotations

import numbers

import torch

from . import reference

# The largest rank (per expert for the sparse mixture) the kernels take; above it every op runs
# the reference (kernels/paths.py), and the adapters' configs refuse it.
MAX_RANK = 256


# The checks depend on what a key of the arguments captures (types, shapes, dtypes, devices,
# flags, which residual terms are x): they run once per key (about 13 us a call on 2 CPU cores,
# the key about 5). The values a call reads besides (a float scale, the routing's range) are
# read every call.
_PASSED: set = set()
_MAX_PASSED = 4096


def _meta(value):
    return (value.shape, value.dtype, value.device) if isinstance(value, torch.Tensor) else type(value)


def _key(x, residual, *values):
    """The arguments' key, or None where one cannot be made (an unhashable argument)."""
    if residual is None or isinstance(residual, torch.Tensor):
        terms = (_meta(residual), residual is x)
    elif isinstance(residual, (tuple, list)):
        terms = (type(residual),) + tuple((_meta(term), term is x) for term in residual)
    else:
        terms = type(residual)
    key = (terms,) + tuple(_meta(value) if not isinstance(value, str) else value for value in values)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _checked(key, check) -> None:
    """Run check() unless this key passed before."""
    if key is not None and key in _PASSED:
        return
    check()
    if key is not None:
        if len(_PASSED) >= _MAX_PASSED:
            _PASSED.clear()
        _PASSED.add(key)


def _epilogue_parts(scale, residual):
    """(scale tensor or None, scale value, residual terms) of checked arguments."""
    terms = reference.residual_terms(residual) if residual is None or isinstance(residual, torch.Tensor) \
        else list(residual)
    if isinstance(scale, torch.Tensor):
        return scale, 1.0, terms
    return None, 1.0 if scale is None else float(scale), terms


def check_bottleneck_arguments(x, w_down, b_down, w_up, b_up, scale, activation, residual, row_scale):
    """Raise a TypeError/ValueError naming the argument; return (scale tensor or None, scale
    value, residual terms)."""
    key = _key(x, residual, "bottleneck", x, w_down, b_down, w_up, b_up, scale, activation, row_scale)
    _checked(key, lambda: _check_bottleneck_arguments(x, w_down, b_down, w_up, b_up, scale, activation, residual,
                                                      row_scale))
    return _epilogue_parts(scale, residual)


def _check_bottleneck_arguments(x, w_down, b_down, w_up, b_up, scale, activation, residual, row_scale):
    check_float_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape [..., D] with D >= 1, got {tuple(x.shape)}")
    dim = x.shape[-1]
    check_float_tensor("w_down", w_down)
    if w_down.dim() != 2:
        raise ValueError(f"w_down must have shape [rank, D] = [rank, {dim}], got {tuple(w_down.shape)}")
    if w_down.shape[1] != dim:
        raise ValueError(f"x has D = {dim}, w_down has D = {w_down.shape[1]}: w_down must have shape [rank, D] "
                         f"with D = x.shape[-1]")
    rank = w_down.shape[0]
    if rank == 0:
        raise ValueError("w_down has rank 0 (shape [0, D]); the bottleneck needs rank >= 1")
    check_float_tensor("w_up", w_up)
    if w_up.dim() != 2 or w_up.shape[1] != rank or w_up.shape[0] == 0:
        raise ValueError(f"w_up must have shape [D_out, rank] = [D_out, {rank}] with D_out >= 1 (D_out = D = {dim} "
                         f"for an adapter), got {tuple(w_up.shape)}")
    dim_out = w_up.shape[0]
    if b_down is not None:
        check_float_tensor("b_down", b_down)
        if tuple(b_down.shape) != (rank,):
            raise ValueError(f"b_down must have shape [rank] = [{rank}], got {tuple(b_down.shape)}")
    if b_up is not None:
        check_float_tensor("b_up", b_up)
        if tuple(b_up.shape) != (dim_out,):
            raise ValueError(f"b_up must have shape [D_out] = [{dim_out}] (w_up's rows), got {tuple(b_up.shape)}")
    check_activation(activation)
    check_epilogue_arguments(x, scale, residual, row_scale, out_dim=dim_out)
    check_same_device(x, [("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up)])


def check_epilogue_arguments(x, scale, residual, row_scale, out_dim=None):
    """The arguments every op's epilogue takes (scale, residual, row_scale), checked against x
    and the output width out_dim (default x's D); returns (scale tensor or None, scale value,
    residual terms)."""
    rows = x.numel() // x.shape[-1]
    dim = x.shape[-1] if out_dim is None else out_dim
    terms = check_residual(x, residual, dim)
    if row_scale is not None:
        check_float_tensor("row_scale", row_scale)
        if row_scale.dim() != 1 or row_scale.shape[0] != rows:
            raise ValueError(
                f"row_scale must have shape [M] = [{rows}] (one value per row of x), got {tuple(row_scale.shape)}"
            )
    scale_tensor, scale_value = None, 1.0
    if isinstance(scale, torch.Tensor):
        check_float_tensor("scale", scale)
        if scale.numel() != 1 and tuple(scale.shape) != (dim,):
            raise ValueError(
                f"scale must be a [{'D' if out_dim is None else 'D_out'}] = [{dim}] tensor, a one-element tensor, "
                f"a float or None, got shape {tuple(scale.shape)}"
            )
        scale_tensor = scale
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        scale_value = float(scale)
    elif scale is not None:
        raise TypeError(f"scale must be a tensor, a float or None, got {type(scale).__name__}")
    check_same_device(x, [("scale", scale_tensor), ("row_scale", row_scale)])
    return scale_tensor, scale_value, terms


def check_same_device(x, named) -> None:
    for name, tensor in named:
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}; put all tensors on one device")


def epilogue_arguments(x, scale_tensor, scale_value, terms, out_dim=None):
    """What the kernels' epilogue takes, from checked arguments: (scale tensor or None, scale
    value, add_input, skip). x as a residual term is read and differentiated inside the kernels
    (add_input); any other terms are one tensor to them (two or more are summed here first),
    returned 2-D as `skip` ([M, D_out] or None; D_out = out_dim, default x's D)."""
    dim = x.shape[-1] if out_dim is None else out_dim
    add_input = any(term is x for term in terms)
    others = list(terms)
    if add_input:
        others.pop(next(i for i, term in enumerate(others) if term is x))
    skip = None
    for term in others:
        skip = term if skip is None else skip + term
    if scale_tensor is not None and scale_tensor.dim() > 1:
        scale_tensor = scale_tensor.reshape(1)  # a one-element scale of any shape is layer-wise
    if scale_tensor is None and scale_value != 1.0 and torch.compiler.is_compiling():
        # A Python float reaches the op as a constant, and torch.compile would recompile for
        # every new value; a 0-d tensor is a graph input (and, 0-d, promotes nothing).
        scale_tensor, scale_value = x.new_full((), scale_value, dtype=torch.float32), 1.0
    return scale_tensor, scale_value, add_input, skip.reshape(-1, dim) if skip is not None else None
def check_residual(x, residual, out_dim=None) -> list:
    """The residual terms, each shaped like the output: x's leading dims and out_dim (default
    x's D) columns."""
    shape = x.shape if out_dim is None else (*x.shape[:-1], out_dim)
    if residual is None or isinstance(residual, torch.Tensor):
        terms, names = reference.residual_terms(residual), ["residual"]
    elif isinstance(residual, (tuple, list)) and len(residual) > 0:
        terms, names = list(residual), [f"residual[{i}]" for i in range(len(residual))]
    else:
        raise TypeError(f"residual must be a tensor shaped like the output (x's, unless D_out != D), a non-empty tuple or list of such tensors, or "
                        f"None; got {type(residual).__name__}{' (empty)' if isinstance(residual, (tuple, list)) else ''}")
    for name, term in zip(names, terms):
        check_float_tensor(name, term)
        if term.shape != shape:
            # x itself as a term (the op adds its input) needs D_out = D: say so.
            hint = f"; x itself is a residual term only where D_out = D (here D = {x.shape[-1]})" if term is x else ""
            raise ValueError(f"{name} must have the output's shape {tuple(shape)} (x's leading dims, "
                             f"{'D' if out_dim is None else 'D_out'} = {shape[-1]}), got {tuple(term.shape)}{hint}")
        if term.device != x.device:
            raise ValueError(f"{name} is on {term.device} but x is on {x.device}; put all tensors on one device")
    return terms


def check_float_tensor(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16 or float32), got {tensor.dtype}")


def check_activation(activation) -> None:
    if not isinstance(activation, str) or activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(reference.ACTIVATIONS)}, got {activation!r}")


def check_experts(x, w_down, b_down, w_up, b_up, any_width: bool = False) -> tuple[int, int]:
    """The stacked expert parameters against x: w_down [E, r, D], b_down [E, r] or None,
    w_up [E, D, r], b_up [E, D] or None; with any_width, w_up [E, D_out, r] and b_up [E, D_out]
    for any D_out >= 1 (a width-changing mixture; D_out read from w_up). Returns (E, r)."""
    dim = x.shape[-1]
    check_float_tensor("w_down", w_down)
    if w_down.dim() != 3 or w_down.shape[2] != dim:
        raise ValueError(f"w_down must have shape [experts, rank, D] = [E, r, {dim}], got {tuple(w_down.shape)}")
    experts, rank = w_down.shape[0], w_down.shape[1]
    if experts == 0 or rank == 0:
        raise ValueError(f"w_down must have at least one expert and rank >= 1, got shape {tuple(w_down.shape)}")
    check_float_tensor("w_up", w_up)
    if any_width:
        if w_up.dim() != 3 or w_up.shape[0] != experts or w_up.shape[2] != rank or w_up.shape[1] == 0:
            raise ValueError(f"w_up must have shape [experts, D_out, rank] = [{experts}, D_out, {rank}] with "
                             f"D_out >= 1 (D_out = D = {dim} for an adapter; w_down is {tuple(w_down.shape)}), got "
                             f"{tuple(w_up.shape)}")
    elif tuple(w_up.shape) != (experts, dim, rank):
        raise ValueError(f"w_up must have shape [experts, D, rank] = [{experts}, {dim}, {rank}] (w_down is "
                         f"{tuple(w_down.shape)}), got {tuple(w_up.shape)}")
    dim_out = w_up.shape[1]
    if b_down is not None:
        check_float_tensor("b_down", b_down)
        if tuple(b_down.shape) != (experts, rank):
            raise ValueError(f"b_down must have shape [experts, rank] = [{experts}, {rank}], got "
                             f"{tuple(b_down.shape)}")
    if b_up is not None:
        check_float_tensor("b_up", b_up)
        if tuple(b_up.shape) != (experts, dim_out):
            width = "D" if dim_out == dim else "D_out"
            raise ValueError(f"b_up must have shape [experts, {width}] = [{experts}, {dim_out}]"
                             f"{' (D_out: w_up.shape[1])' if width == 'D_out' else ''}, got {tuple(b_up.shape)}")
    for name, width in (("w_down", dim), ("w_up", dim_out)):
        if experts * max(rank, 1) * width >= 2**31:
            raise ValueError(f"{name} has {experts} x {rank} x {width} elements; the kernels index the expert "
                             f"parameters with 32-bit offsets (fewer than 2^31 elements)")
    return experts, rank


def check_sparse_arguments(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale,
                           activation, residual, row_scale, top_k, max_experts, check_range=True):
    """The gated form (w_gate given, top_k an int) or the routed form (expert_idx and
    expert_weight given; check_range=False skips reading expert_idx's values, for callers whose
    indices are in range by construction). Raise a TypeError/ValueError naming the argument; return
    (scale tensor or None, scale value, residual terms)."""
    top_k_key = top_k if isinstance(top_k, int) else type(top_k)
    key = _key(x, residual, "sparse", x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale,
               activation, row_scale, max_experts, str(top_k_key))
    _checked(key, lambda: _check_sparse_arguments(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up,
                                                  b_up, scale, activation, residual, row_scale, top_k, max_experts))
    if w_gate is None and check_range and expert_idx.numel() > 0 and expert_idx.device.type != "meta" \
            and not torch.compiler.is_compiling():
        # One device sync on CUDA: the price of an error instead of silently dropped rows.
        experts = w_down.shape[0]
        low, high = torch.aminmax(expert_idx)
        if int(low) < 0 or int(high) >= experts:
            raise ValueError(f"expert_idx must hold expert indices from 0 to {experts - 1}, got values from "
                             f"{int(low)} to {int(high)}")
    return _epilogue_parts(scale, residual)


def _check_sparse_arguments(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale,
                            activation, residual, row_scale, top_k, max_experts):
    check_float_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape [..., D] with D >= 1, got {tuple(x.shape)}")
    dim = x.shape[-1]
    rows = x.numel() // dim
    experts, _ = check_experts(x, w_down, b_down, w_up, b_up, any_width=True)
    dim_out = w_up.shape[1]
    if experts > max_experts:
        raise ValueError(f"w_down has {experts} experts; the sparse kernels support 1 to {max_experts}")
    named = [("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up)]
    if w_gate is not None:
        check_float_tensor("w_gate", w_gate)
        if tuple(w_gate.shape) != (experts, dim):
            raise ValueError(f"w_gate must have shape [experts, D] = [{experts}, {dim}], got {tuple(w_gate.shape)}")
        if b_gate is not None:
            check_float_tensor("b_gate", b_gate)
            if tuple(b_gate.shape) != (experts,):
                raise ValueError(f"b_gate must have shape [experts] = [{experts}], got {tuple(b_gate.shape)}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be an int from 1 to the number of experts ({experts}), got {top_k!r}")
        named += [("w_gate", w_gate), ("b_gate", b_gate)]
    else:
        if not isinstance(expert_idx, torch.Tensor):
            raise TypeError(f"expert_idx must be a torch.Tensor of integer expert indices, got "
                            f"{type(expert_idx).__name__}")
        if expert_idx.is_floating_point() or expert_idx.is_complex() or expert_idx.dtype == torch.bool:
            raise TypeError(f"expert_idx must be an integer tensor (int64 or int32), got {expert_idx.dtype}")
        matches_rows = expert_idx.dim() == 2 and expert_idx.shape[0] == rows
        matches_x = expert_idx.dim() == x.dim() and expert_idx.shape[:-1] == x.shape[:-1]
        if not (matches_rows or matches_x) or expert_idx.shape[-1] == 0:
            raise ValueError(f"expert_idx must have shape [M, k] = [{rows}, k] (one row per row of x) or "
                             f"[*x.shape[:-1], k], with k >= 1; got {tuple(expert_idx.shape)}")
        check_float_tensor("expert_weight", expert_weight)
        if expert_weight.shape != expert_idx.shape:
            raise ValueError(f"expert_weight must have expert_idx's shape {tuple(expert_idx.shape)}, got "
                             f"{tuple(expert_weight.shape)}")
        named += [("expert_idx", expert_idx), ("expert_weight", expert_weight)]
    check_activation(activation)
    check_same_device(x, named)  # before the range check reads a value: a wrong device is the clearer error
    # The output's width: a same-width mixture's errors say D, a width-changing one's D_out.
    check_epilogue_arguments(x, scale, residual, row_scale, out_dim=None if dim_out == dim else dim_out)
