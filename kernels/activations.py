"""Activations in Triton, on fp32 tiles: the forms reference.ACTIVATIONS names, and their
derivatives in closed form (reference.activation_grad is the same formulas in PyTorch)."""

import triton
import triton.language as tl


@triton.jit
def activation(h, ACTIVATION: tl.constexpr):
    """act(h) on an fp32 tile."""
    if ACTIVATION == "gelu":
        out = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 * (1 + tanh(z)) == sigmoid(2 z)
        out = h * tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
    elif ACTIVATION == "relu":
        out = tl.maximum(h, 0.0)
    elif ACTIVATION == "silu":
        out = h * tl.sigmoid(h)
    else:
        out = h
    return out


@triton.jit
def activation_grad(h, ACTIVATION: tl.constexpr):
    """d act(h) / dh on an fp32 tile."""
    if ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        out = cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    elif ACTIVATION == "gelu_tanh":
        s = tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
        # d/dh sigmoid(2 z(h)) = 2 s (1 - s) z'(h), z' = sqrt(2/pi) (1 + 3 * 0.044715 h^2)
        out = s + h * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * h * h)
    elif ACTIVATION == "relu":
        out = tl.where(h > 0.0, 1.0, 0.0)
    elif ACTIVATION == "silu":
        s = tl.sigmoid(h)
        out = s * (1.0 + h * (1.0 - s))
    else:
        out = tl.full(h.shape, 1.0, tl.float32)
    return out
