"""Plain-PyTorch versions of every op.

One source for three jobs: the spec (the README's math, line by line), the CPU path of the
public ops, and the eager baseline that the benchmarks time. Nothing here is fused or clever;
keep it that way.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "activation_fn",
    "activation_grad",
    "adapter_fusion",
    "adapter_fusion_in_dtype",
    "bottleneck_adapter",
    "bottleneck_adapter_backward",
    "bottleneck_hidden",
    "bottleneck_in_dtype",
    "autocasts",
    "compute_dtype",
    "dropout_factor",
    "dropout_uniform",
    "dropped",
    "gate_logits",
    "HIDDEN_STREAM",
    "INPUT_STREAM",
    "load_balancing_loss",
    "lora_linear",
    "lora_linear_backward",
    "lora_linear_in_dtype",
    "output_dtype",
    "residual_terms",
    "routed_adapter",
    "routed_in_dtype",
    "sparse_adapter",
    "topk_routing",
]


def _gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")


# The activations every op accepts, by name. gelu is the exact (erf) form, as in nn.GELU().
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "identity": lambda h: h,
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


# The dtypes autocast casts (float64 it leaves alone, as it does for F.linear).
AUTOCAST_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def autocasts(x: torch.Tensor) -> bool:
    """Whether torch.autocast casts x here: it is on for x's device and x's dtype is one it casts."""
    return x.dtype in AUTOCAST_INPUT_DTYPES and torch.is_autocast_enabled(x.device.type)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the dots run in: autocast's for x's device when autocast is on there, as
    F.linear would use; else x's own dtype."""
    if autocasts(x):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def residual_terms(residual) -> list:
    """The residual argument as a list of tensors: None, one tensor, or a sequence (their sum)."""
    if residual is None:
        return []
    if isinstance(residual, torch.Tensor):
        return [residual]
    return list(residual)


def output_dtype(dtype: torch.dtype, autocast: bool, scale, residuals) -> torch.dtype:
    """The dtype of y, as eager PyTorch promotes: the update comes out of F.linear in the compute
    dtype; under autocast a [D] or [1] scale multiplies it in its own dtype (autocast leaves
    mul alone; a 0-d tensor or a float does not promote); each residual term is added in its
    own dtype. Without autocast the parameters, a [D] or [1] scale included, are cast to x's
    dtype."""
    out = dtype
    if autocast and isinstance(scale, torch.Tensor) and scale.dim() > 0:
        out = torch.promote_types(out, scale.dtype)
    for term in residuals:
        out = torch.promote_types(out, term.dtype)
    return out


# --------------------------------------------------------------------------------------------
# Dropout: a keep mask that is a function of (seed, row, column, stream), so the kernels'
# backward regenerates it; this is its spec and the reference path's mask
# --------------------------------------------------------------------------------------------

HIDDEN_STREAM = 0  # a bottleneck's activated hidden: column = rank index (e * r + j for expert e)
INPUT_STREAM = 1   # the LoRA branch's input x: column = input feature

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32 bits of a * b for uint32 values a (int64 tensor) and b (an int), in
    int64 without overflow: a in 16-bit halves."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    hi_part, lo_part = a_hi * b, a_lo * b  # each < 2^48
    high = (hi_part + (lo_part >> 16)) >> 16
    low = (((hi_part & 0xFFFF) << 16) + lo_part) & _MASK32
    return high, low


def dropout_uniform(seed: torch.Tensor, rows: int, cols: int, stream: int, row_start: int = 0) -> torch.Tensor:
    """u [rows, cols] fp32 in [0, 1): Philox4x32-10 with key (seed's low and high 32 bits) and
    counter (col, row_start + row, stream, 0), its first word mapped to a float as Triton's
    uint_to_uniform_float does. The same numbers tl.rand draws. seed: an int64 tensor []."""
    device = seed.device
    col = torch.arange(cols, dtype=torch.int64, device=device)[None, :].expand(rows, cols)
    row = (torch.arange(rows, dtype=torch.int64, device=device)[:, None] + row_start).expand(rows, cols) & _MASK32
    c0, c1 = col & _MASK32, row
    c2 = torch.full_like(c0, stream)
    c3 = torch.zeros_like(c0)
    seed = seed.reshape(()).to(torch.int64)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    # uint_to_uniform_float: the word as int32, negatives folded by ~x, times (2^31 - 1)^-1 rounded.
    word = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    word = torch.where(word < 0, ~word, word).to(torch.int32)
    return word.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=device)


def dropout_factor(seed: torch.Tensor, rows: int, cols: int, stream: int, p: float,
                   row_start: int = 0) -> torch.Tensor:
    """[rows, cols] fp32: 1 / (1 - p) where dropout keeps the element (u > p), 0 where it drops
    it. The mask the kernels draw for the same seed, rows, columns and stream."""
    uniform = dropout_uniform(seed, rows, cols, stream, row_start)
    return torch.where(uniform > torch.tensor(p, dtype=torch.float32), 1.0 / (1.0 - p), 0.0).to(torch.float32)


def dropped(t: torch.Tensor, seed: Optional[torch.Tensor], p: float, stream: int, dtype: torch.dtype) -> torch.Tensor:
    """Dropout of 2-D t [M, C] in `dtype`: (t * factor) computed in fp32 (float64 for float64),
    rounded to dtype, as torch's dropout rounds. p = 0 (or no seed) returns t in dtype."""
    if p == 0.0 or seed is None:
        return t.to(dtype)
    factor = dropout_factor(seed, t.shape[0], t.shape[1], stream, p)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return (t.to(compute) * factor.to(compute)).to(dtype)


def bottleneck_hidden(x: torch.Tensor, w_down: torch.Tensor, b_down: Optional[torch.Tensor],
                      dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The pre-activation x @ w_down.T + b_down, computed in `dtype` (default: compute_dtype(x))."""
    dtype = dtype or compute_dtype(x)
    return F.linear(x.to(dtype), w_down.to(dtype), None if b_down is None else b_down.to(dtype))


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
    seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = residual + scale * (row_scale[:, None] * (act(x @ w_down.T + b_down) @ w_up.T + b_up)).

    The dots run in compute_dtype(x): autocast's dtype under torch.autocast, as F.linear would,
    else x's dtype, with the parameters cast to it. residual is None, a tensor shaped like x, or
    a sequence of such tensors whose sum is the residual (x itself may be one of them); y has
    output_dtype's promoted dtype. row_scale is a constant per row of x (rows = x.numel() // D),
    cast to the compute dtype, and takes no gradient.

    dropout: the rate on act(h) (HIDDEN_STREAM, column = rank index); input_dropout: on x as the
    down projection reads it (INPUT_STREAM, column = feature; a residual x stays undropped);
    both masks from dropout_factor with the int64 tensor `seed` (required when a rate is > 0).
    """
    dtype = compute_dtype(x)
    autocast = autocasts(x)
    return bottleneck_in_dtype(x, w_down, b_down, w_up, b_up, scale, activation=activation,
                               residual=residual_terms(residual), row_scale=row_scale, dtype=dtype,
                               autocast=autocast, dropout=dropout, input_dropout=input_dropout, seed=seed)


def bottleneck_in_dtype(x, w_down, b_down, w_up, b_up, scale, *, activation, residual, row_scale, dtype, autocast,
                        dropout=0.0, input_dropout=0.0, seed=None):
    """bottleneck_adapter with the compute dtype and the autocast promotion rule given, not read
    from the ambient autocast state (custom-op implementations run with it in any state).
    residual is a list of tensors."""
    with torch.autocast(x.device.type, enabled=False):  # every cast below is explicit
        rows = x.reshape(-1, x.shape[-1])
        hidden = bottleneck_hidden(dropped(rows, seed, input_dropout, INPUT_STREAM, dtype), w_down, b_down, dtype)
        act = dropped(activation_fn(activation)(hidden), seed, dropout, HIDDEN_STREAM, dtype)
        update = F.linear(act, w_up.to(dtype), None if b_up is None else b_up.to(dtype))
        return _epilogue(update.reshape(*x.shape[:-1], w_up.shape[0]), x, scale, residual, row_scale, dtype,
                         autocast)


def _epilogue(update, x, scale, residual, row_scale, dtype, autocast):
    """residual + scale * (row_scale[:, None] * update), with the promotion rules of
    output_dtype; update has x's leading dims, the output's width (D_out) and the compute dtype.
    Call with autocast disabled."""
    if row_scale is not None:
        update = update * row_scale.detach().to(dtype).reshape(*x.shape[:-1], 1)
    if isinstance(scale, torch.Tensor):
        # Without autocast a [D] or [1] scale is cast to the compute dtype like the other
        # parameters; a 0-d one multiplies as the float it stands for.
        update = update * (scale if autocast or scale.dim() == 0 else scale.to(dtype))
    elif scale is not None:
        update = update * scale
    if residual:
        skip = residual[0]
        for term in residual[1:]:
            skip = skip + term
        update = skip + update
    return update


# --------------------------------------------------------------------------------------------
# Sparse top-k mixture of adapters: E bottleneck adapters, k of them mixed per row
# --------------------------------------------------------------------------------------------


def gate_logits(x: torch.Tensor, w_gate: torch.Tensor, b_gate: Optional[torch.Tensor]) -> torch.Tensor:
    """logits [M, E] = x @ w_gate.T + b_gate in fp32, whatever x's dtype and the autocast state,
    for M = x.numel() // D rows."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.reshape(-1, x.shape[-1]).float(), w_gate.float(),
                        None if b_gate is None else b_gate.float())


def topk_routing(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_idx [M, k] (int64, by descending logit; ties go to the lower expert index) and
    expert_weight [M, k] (fp32): the softmax over the k chosen logits. Gradients reach the
    logits through the weights only; the choice itself is a constant."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= logits.shape[-1]:
        raise ValueError(f"top_k must be an int from 1 to the number of experts ({logits.shape[-1]}), got {top_k!r}")
    # A stable sort keeps equal logits in index order: the lower expert index wins a tie.
    expert_idx = torch.sort(logits.detach(), dim=-1, descending=True, stable=True).indices[..., :top_k]
    expert_weight = torch.softmax(logits.float().gather(-1, expert_idx), dim=-1)
    return expert_idx, expert_weight


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
    dropout: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    input_dropout: float = 0.0,
) -> torch.Tensor:
    """y = residual + scale * (row_scale[:, None] * u), u = sum_j expert_weight[:, j] *
    (act(x @ w_down[e_j].T + b_down[e_j]) @ w_up[e_j].T + b_up[e_j]) with e_j = expert_idx[:, j].

    x [..., D] (M rows), expert_idx [M, k] integer, expert_weight [M, k]; w_down [E, r, D],
    b_down [E, r] or None, w_up [E, D_out, r], b_up [E, D_out] or None, where D_out (w_up's
    width) may differ from D, as in bottleneck_adapter: per-task LoRA on a D -> D_out linear is
    this form with k = 1, weight 1, identity activation and the base output as the residual. y is
    [..., D_out]; scale ([D_out], one element, a float or None), residual ([..., D_out]; x itself
    only where D_out = D) and row_scale as in bottleneck_adapter, shared by the experts. The
    eager expert loop: each expert runs on the rows routed to it. Dtypes as bottleneck_adapter
    (the weights multiply in the compute dtype). dropout: on each expert's act(h) (HIDDEN_STREAM,
    expert e's rank j is column e * r + j of the row's [E * r] hidden), masks from `seed`.
    input_dropout: on x as the experts' down projections read it (INPUT_STREAM, the same mask
    for a row's k experts), in the compute dtype; a residual x is added undropped.
    """
    return routed_in_dtype(x, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, activation=activation,
                           residual=residual, row_scale=row_scale, dtype=compute_dtype(x), autocast=autocasts(x),
                           dropout=dropout, seed=seed, input_dropout=input_dropout)


def routed_in_dtype(x, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, *, activation, residual,
                    row_scale, dtype, autocast, dropout=0.0, seed=None, input_dropout=0.0):
    """routed_adapter with the compute dtype and the autocast promotion rule given, not read from
    the ambient autocast state (custom-op implementations run with it in any state)."""
    dim, dim_out = x.shape[-1], w_up.shape[1]
    act = activation_fn(activation)
    with torch.autocast(x.device.type, enabled=False):
        rows = x.reshape(-1, dim)
        if input_dropout > 0.0:
            rows = dropped(rows, seed, input_dropout, INPUT_STREAM, dtype)
        top_k = expert_idx.shape[-1]
        expert_idx = expert_idx.reshape(-1, top_k)
        expert_weight = expert_weight.reshape(-1, top_k)
        update = rows.new_zeros((rows.shape[0], dim_out), dtype=dtype)
        experts, rank = w_down.shape[0], w_down.shape[1]
        keep = None
        if dropout > 0.0:
            keep = dropout_factor(seed, rows.shape[0], experts * rank, HIDDEN_STREAM, dropout)
        for expert in range(experts):
            routed_rows, slots = (expert_idx == expert).nonzero(as_tuple=True)
            if routed_rows.numel() == 0:
                continue
            hidden = bottleneck_hidden(rows[routed_rows], w_down[expert], None if b_down is None else b_down[expert],
                                       dtype)
            activated = act(hidden)
            if keep is not None:
                compute = torch.float64 if dtype == torch.float64 else torch.float32
                activated = (activated.to(compute) * keep[routed_rows, expert * rank:(expert + 1) * rank].to(compute)
                             ).to(dtype)
            out = F.linear(activated, w_up[expert].to(dtype), None if b_up is None else b_up[expert].to(dtype))
            weight = expert_weight[routed_rows, slots].to(dtype)[:, None]
            update = update.index_add(0, routed_rows, out * weight)
        return _epilogue(update.reshape(*x.shape[:-1], dim_out), x, scale, residual_terms(residual), row_scale, dtype,
                         autocast)


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
    dropout: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    input_dropout: float = 0.0,
):
    """The gated form of routed_adapter: logits = x @ w_gate.T + b_gate (fp32, [M, E]; w_gate
    [E, D]), each row routed to its top_k experts (topk_routing) with the softmax over their
    logits as weights. The experts may change the width as in routed_adapter (w_up [E, D_out, r],
    y [..., D_out]). Returns y, or (y, logits) with return_logits (for load_balancing_loss)."""
    logits = gate_logits(x, w_gate, b_gate)
    expert_idx, expert_weight = topk_routing(logits, top_k)
    y = routed_adapter(x, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, activation=activation,
                       residual=residual, row_scale=row_scale, dropout=dropout, seed=seed,
                       input_dropout=input_dropout)
    return (y, logits) if return_logits else y


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, dropout: float = 0.0,
                seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = F.linear(x, weight, bias) + scale * (dropout(x) @ lora_a.T) @ lora_b.T, as eager PEFT
    computes a LoRA linear: three F.linear calls, a multiply and an add, under the ambient
    autocast state. dropout (the branch input's, INPUT_STREAM, column = input feature) in x's
    dtype, masks from `seed`; the base GEMM reads x undropped."""
    branch_x = x
    if dropout > 0.0:
        rows = x.reshape(-1, x.shape[-1])
        branch_x = dropped(rows, seed, dropout, INPUT_STREAM, x.dtype).reshape(x.shape)
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(branch_x, lora_a), lora_b)


def lora_linear_in_dtype(x, weight, bias, lora_a, lora_b, scale: float, dtype: torch.dtype, dropout: float = 0.0,
                         seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """lora_linear with every operand cast to `dtype` (the compute dtype), as autocast would cast
    them, whatever the ambient autocast state (custom-op implementations run in any state). 2-D x
    where dropout > 0 (dropout applied to x in its own dtype before the cast, as PEFT does)."""
    with torch.autocast(x.device.type, enabled=False):
        branch_x = dropped(x, seed, dropout, INPUT_STREAM, x.dtype).to(dtype) if dropout > 0.0 else x.to(dtype)
        x = x.to(dtype)
        base = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
        return base + scale * F.linear(F.linear(branch_x, lora_a.to(dtype)), lora_b.to(dtype))


def lora_linear_backward(grad_y, x, weight, lora_a, lora_b, scale: float, dtype: torch.dtype, dropout: float = 0.0,
                         seed: Optional[torch.Tensor] = None):
    """(dx, d lora_a, d lora_b) of lora_linear_in_dtype for the output gradient grad_y (2-D), in
    `dtype` as autograd computes them there: du = scale * dy, dh = du B, dB = du^T h,
    dA = dh^T x', dx = dy W + (dh A) * keep, with x' = dropout(x) and keep its mask (1 / (1 - p)
    or 0; 1 without dropout)."""
    with torch.autocast(x.device.type, enabled=False):
        keep = None
        if dropout > 0.0:
            keep = dropout_factor(seed, x.shape[0], x.shape[1], INPUT_STREAM, dropout)
            branch_x = dropped(x, seed, dropout, INPUT_STREAM, x.dtype).to(dtype)
        else:
            branch_x = x.to(dtype)
        grad_y = grad_y.to(dtype)
        hidden = F.linear(branch_x, lora_a.to(dtype))
        grad_update = grad_y * scale
        grad_hidden = grad_update @ lora_b.to(dtype)
        grad_branch = grad_hidden @ lora_a.to(dtype)
        if keep is not None:
            grad_branch = (grad_branch.float() * keep).to(dtype)
        grad_x = grad_y @ weight.to(dtype) + grad_branch
        return grad_x, grad_hidden.t() @ branch_x, grad_update.t() @ hidden


# --------------------------------------------------------------------------------------------
# AdapterFusion: an attention over N frozen bottleneck adapters at one site
# --------------------------------------------------------------------------------------------


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
    seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """AdapterFusion over N bottleneck adapters that read the same x [..., D] (M rows):

        a_i = scale_i * (act(x @ w_down[i].T + b_down[i]) @ w_up[i].T + b_up[i])    [M, D]
        q = x @ w_query.T + b_query,  k_i = a_i @ w_key.T + b_key,  v_i = a_i @ w_value.T
        p = softmax_i(q . k_i / temperature)                                          [M, N], fp32
        y = residual + sum_i p_i v_i

    w_down [N, r, D], b_down [N, r] or None, w_up [N, D, r], b_up [N, D] or None; scale [N, D]
    (channel-wise), [N] (one per adapter) or None; w_query, w_key, w_value [D, D], b_query and
    b_key [D] or None. The N x M x D way: every a_i, k_i and v_i is formed. The dots run in
    compute_dtype(x) as F.linear would under autocast; the scores are summed and the softmax
    taken in fp32; y has output_dtype's dtype (the compute dtype, promoted by the residual).
    dropout: on each adapter's act(h) (HIDDEN_STREAM, adapter i's rank j is column i * r + j of
    the row's [N * r] hidden), masks from `seed`.
    """
    y, _ = adapter_fusion_in_dtype(x, w_down, b_down, w_up, b_up, scale, w_query, b_query, w_key, b_key, w_value,
                                   activation=activation, residual=residual_terms(residual),
                                   temperature=temperature, dtype=compute_dtype(x), autocast=autocasts(x),
                                   dropout=dropout, seed=seed)
    return y


def adapter_fusion_in_dtype(x, w_down, b_down, w_up, b_up, scale, w_query, b_query, w_key, b_key, w_value, *,
                            activation, residual, temperature, dtype, autocast, dropout=0.0, seed=None):
    """adapter_fusion with the compute dtype and the autocast promotion rule given (residual a
    list of tensors); returns (y, p) with p [M, N] fp32."""
    dim = x.shape[-1]
    act = activation_fn(activation)

    def cast(t):
        return None if t is None else t.to(dtype)

    with torch.autocast(x.device.type, enabled=False):
        rows = x.reshape(-1, dim).to(dtype)
        branches = []
        rank = w_down.shape[1]
        keep = None
        if dropout > 0.0:
            keep = dropout_factor(seed, rows.shape[0], w_down.shape[0] * rank, HIDDEN_STREAM, dropout)
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        for i in range(w_down.shape[0]):
            activated = act(F.linear(rows, cast(w_down[i]), cast(None if b_down is None else b_down[i])))
            if keep is not None:
                activated = (activated.to(compute) * keep[:, i * rank:(i + 1) * rank].to(compute)).to(dtype)
            branch = F.linear(activated, cast(w_up[i]), cast(None if b_up is None else b_up[i]))
            if scale is not None:
                branch = branch * scale[i].to(dtype)
            branches.append(branch)
        adapters = torch.stack(branches, dim=1)                                # [M, N, D]
        query = F.linear(rows, cast(w_query), cast(b_query))                   # [M, D]
        key = F.linear(adapters, cast(w_key), cast(b_key))                     # [M, N, D]
        value = F.linear(adapters, cast(w_value))                              # [M, N, D]
        scores = (query.float()[:, None, :] * key.float()).sum(-1) / temperature
        probs = torch.softmax(scores, dim=-1)                                  # [M, N] fp32
        mixed = torch.matmul(probs.to(dtype)[:, None, :], value)[:, 0]         # [M, D]
        y = _epilogue(mixed.reshape(x.shape), x, None, residual, None, dtype, autocast)
        return y, probs


def load_balancing_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The Switch Transformer auxiliary loss for top-k routing: E * sum_e f_e * P_e, where f_e is
    the share of the M * k routed slots that go to expert e (a constant) and P_e the mean over
    rows of softmax(logits)[:, e]. 1.0 when both are uniform; it grows as routing collapses.
    logits: [..., E] with E >= 1 (the gate's logits, e.g. sparse_adapter's return_logits)."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point torch.Tensor [..., E], got "
                        f"{logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., E] with at least one expert (E >= 1), got "
                         f"{tuple(logits.shape)}")
    experts = logits.shape[-1]
    logits = logits.reshape(-1, experts).float()
    expert_idx, _ = topk_routing(logits, top_k)
    if logits.shape[0] == 0:
        return logits.sum()  # no rows, no imbalance (and a gradient of zeros, not NaN)
    share = torch.bincount(expert_idx.reshape(-1), minlength=experts).float() / max(expert_idx.numel(), 1)
    mean_probability = torch.softmax(logits, dim=-1).mean(dim=0)
    return experts * (share * mean_probability).sum()


def activation_grad(name: str, h: torch.Tensor) -> torch.Tensor:
    """d act(h) / dh in closed form, the same formulas the kernels use."""
    if name == "gelu":
        return 0.5 * (1.0 + torch.erf(h * math.sqrt(0.5))) + h * torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
    if name == "gelu_tanh":
        inner_grad = math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * h * h)
        s = torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (h + 0.044715 * h * h * h))
        return s + 2.0 * h * s * (1.0 - s) * inner_grad
    if name == "relu":
        return (h > 0).to(h.dtype)
    if name == "silu":
        s = torch.sigmoid(h)
        return s * (1.0 + h * (1.0 - s))
    if name == "identity":
        return torch.ones_like(h)
    activation_fn(name)  # raises the error that names the choices
    raise AssertionError("unreachable")


def bottleneck_adapter_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    scale: Union[torch.Tensor, float, None] = None,
    *,
    activation: str = "gelu",
    row_scale: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
    dropout: float = 0.0,
    input_dropout: float = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, ...]:
    """The backward of bottleneck_adapter by hand, on 2-D x [M, D] and grad_y [M, D].

    Every dot's operands are rounded to `dtype` (the forward's compute dtype; default x's) and
    multiplied in fp32, where the pre-activation, act, the scaled grad_y and dh are rounded
    too: the rounding points of the kernels (and of F.linear's backward under autocast).
    Returns (dx, dw_down, db_down, dw_up, db_up, dscale) in float32 (float64 for float64 x),
    with dscale per channel [D] whatever the kind of scale; the residual's gradient is grad_y.
    This is the spec of the backward kernels and the CPU path's backward (a custom op's
    implementation runs below autograd, so it cannot differentiate the forward). dropout,
    input_dropout, seed: the forward's; the masks are drawn again from the seed.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    dtype = dtype or x.dtype

    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).to(compute)

    rows, dim = x.shape
    with torch.autocast(x.device.type, enabled=False):  # explicit dtypes whatever the caller's autocast
        input_keep = hidden_keep = None
        if input_dropout > 0.0:
            input_keep = dropout_factor(seed, rows, dim, INPUT_STREAM, input_dropout).to(compute)
            x = (x.to(compute) * input_keep).to(dtype).to(compute)
        else:
            x = rounded(x)
        w_down, w_up = rounded(w_down), rounded(w_up)
        hidden = rounded(F.linear(x, w_down, None if b_down is None else rounded(b_down)))
        act = rounded(activation_fn(activation)(hidden))
        if dropout > 0.0:
            hidden_keep = dropout_factor(seed, rows, w_down.shape[0], HIDDEN_STREAM, dropout).to(compute)
            act = rounded(act * hidden_keep)
        grad = grad_y.to(compute)
        if row_scale is not None:
            grad = grad * rounded(row_scale)[:, None]
        update = F.linear(act, w_up, None if b_up is None else rounded(b_up))
        grad_scale = (grad * update).sum(0)
        if scale is not None:
            grad = grad * (scale.to(compute).reshape(-1) if isinstance(scale, torch.Tensor) else scale)
        grad = rounded(grad)
        grad_act = grad @ w_up
        if hidden_keep is not None:
            grad_act = grad_act * hidden_keep
        grad_hidden = rounded(grad_act * activation_grad(activation, hidden))
        grad_x = grad_hidden @ w_down
        return (
            grad_x if input_keep is None else grad_x * input_keep,
            grad_hidden.T @ x,
            grad_hidden.sum(0),
            grad.T @ act,
            grad.sum(0),
            grad_scale,
        )
