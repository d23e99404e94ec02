"""Bad input gets a ValueError or TypeError that names the argument, before any kernel runs."""

import warnings

import pytest
import torch

from fused_adapters.kernels import bottleneck_adapter, reference
from helpers import DEVICE, LaunchCounter

D, R, M = 12, 4, 10


def good():
    return dict(
        x=torch.randn(M, D, device=DEVICE),
        w_down=torch.randn(R, D, device=DEVICE),
        b_down=torch.randn(R, device=DEVICE),
        w_up=torch.randn(D, R, device=DEVICE),
        b_up=torch.randn(D, device=DEVICE),
        scale=torch.randn(D, device=DEVICE),
        residual=torch.randn(M, D, device=DEVICE),
        row_scale=torch.rand(M, device=DEVICE),
        activation="gelu",
    )


def call(args):
    args = dict(args)
    positional = [args.pop(k) for k in ("x", "w_down", "b_down", "w_up", "b_up", "scale")]
    return bottleneck_adapter(*positional, **args)


BAD = [
    ("x", [1, 2, 3], TypeError, "x must be a torch.Tensor"),
    ("x", torch.ones(M, D, dtype=torch.int64), TypeError, "x must be a floating-point"),
    ("x", torch.ones(M, D, dtype=torch.bool), TypeError, "x must be a floating-point"),
    ("x", torch.tensor(1.0), ValueError, "x must have shape"),
    ("x", torch.randn(M, 0), ValueError, "x must have shape"),
    ("w_down", torch.randn(R, D + 1), ValueError, f"x has D = {D}, w_down has D = {D + 1}"),
    ("w_down", torch.randn(D), ValueError, "w_down must have shape"),
    ("w_down", torch.randn(0, D), ValueError, "rank 0"),
    ("w_down", torch.randint(0, 3, (R, D)), TypeError, "w_down must be a floating-point"),
    ("w_up", torch.randn(R, D), ValueError, "w_up must have shape"),
    ("w_up", torch.randn(D, R + 1), ValueError, "w_up must have shape"),
    ("b_down", torch.randn(R + 1), ValueError, "b_down must have shape"),
    ("b_down", torch.ones(R, dtype=torch.int32), TypeError, "b_down must be a floating-point"),
    ("b_up", torch.randn(D - 1), ValueError, "b_up must have shape"),
    ("scale", torch.randn(D + 1), ValueError, "scale must be"),
    ("scale", torch.randn(2, D), ValueError, "scale must be"),
    ("scale", "0.5", TypeError, "scale must be a tensor, a float or None"),
    ("scale", True, TypeError, "scale must be a tensor, a float or None"),
    ("scale", torch.ones(D, dtype=torch.int64), TypeError, "scale must be a floating-point"),
    ("residual", torch.randn(M, D + 1), ValueError, "residual must have the output's shape"),
    ("residual", torch.ones(M, D, dtype=torch.int32), TypeError, "residual must be a floating-point"),
    ("residual", (torch.randn(M, D), torch.randn(M, D - 1)), ValueError, r"residual\[1\] must have the output's shape"),
    ("residual", (), TypeError, "residual must be a tensor"),
    ("residual", 1.0, TypeError, "residual must be a tensor"),
    ("residual", [torch.randn(M, D), "x"], TypeError, r"residual\[1\] must be a torch.Tensor"),
    ("row_scale", torch.rand(M + 1), ValueError, "row_scale must have shape"),
    ("row_scale", torch.rand(M, 1), ValueError, "row_scale must have shape"),
    ("row_scale", torch.ones(M, dtype=torch.bool), TypeError, "row_scale must be a floating-point"),
    ("activation", "tanh", ValueError, "activation must be one of"),
    ("activation", None, ValueError, "activation must be one of"),
    # A second device: meta stands in for a GPU on machines without one.
    ("w_down", torch.randn(R, D, device="meta"), ValueError, "w_down is on meta"),
    ("residual", torch.randn(M, D, device="meta"), ValueError, "residual is on meta"),
]


@pytest.mark.parametrize("name, value, error, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_argument_is_named(name, value, error, message):
    args = good()
    args[name] = _to_device(value)
    with pytest.raises(error, match=message):
        call(args)


def _to_device(value):
    if isinstance(value, torch.Tensor) and value.device.type != "meta":
        return value.to(DEVICE)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v) for v in value)
    return value


def test_rank_past_the_kernels_limit_runs_the_reference(monkeypatch):
    # One rule for every op and backend (kernels/paths.py): a rank above 256 runs the reference
    # (a CUDA call warns once: test_backend), where the kernels' paths used to raise and the CPU's
    # ran. The same input gets the same answer everywhere.
    args = good()
    args["w_down"] = torch.randn(257, D, device=DEVICE) * 0.1
    args["w_up"] = torch.randn(D, 257, device=DEVICE) * 0.1
    args["b_down"] = None
    counter = LaunchCounter()
    with counter.patch(monkeypatch), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CUDA fallback's warning
        y = call(args)
    assert counter.names == []
    positional = [args.pop(k) for k in ("x", "w_down", "b_down", "w_up", "b_up", "scale")]
    torch.testing.assert_close(y, reference.bottleneck_adapter(*positional, **args))


def test_good_arguments_pass():
    assert call(good()).shape == (M, D)


def test_double_backward_is_refused_at_the_first_backward():
    from helpers import make_case

    case = make_case((5, 12), rank=3)
    out = case.call(bottleneck_adapter)
    with pytest.raises(RuntimeError, match="bottleneck_adapter does not support double backward"):
        torch.autograd.grad(out.sum(), [case.x], create_graph=True)
    # A plain backward of the same graph still works.
    out = case.call(bottleneck_adapter)
    (grad_x,) = torch.autograd.grad(out.sum(), [case.x])
    assert torch.isfinite(grad_x).all()
