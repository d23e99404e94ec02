"""Width-changing bottlenecks: w_up [D_out, r] with D_out != D (LoRA on a D -> 3D qkv, D -> 4D
fc1, 4D -> D fc2). Same op, same launches, same standards: against float64 with outputs
poisoned, every gradient, fp32 and fp16, autocast, split ranks and several row chunks, and
errors that name the argument."""

import pytest
import torch

from fused_adapters.kernels import bottleneck_adapter, reference
from fused_adapters.kernels.launch import launch_plan
from helpers import (
    DEVICE, TOLERANCE, LaunchCounter, make_case, poisoned_outputs, reference_grads, relative_error,
)


def check(case, dtype, tolerance=None):
    out = case.call(bottleneck_adapter)
    assert out.shape == (*case.x.shape[:-1], case.w_up.shape[0]) and out.dtype == case.x.dtype
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out)
    inputs = case.differentiable()
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out)
    ref_out, ref_grads = reference_grads(case, grad_out)
    errors = {"y": relative_error(out, ref_out)}
    for (name, tensor), grad in zip(inputs.items(), grads):
        assert grad.shape == tensor.shape and grad.dtype == tensor.dtype, name
        errors["d" + name] = relative_error(grad, ref_grads[name])
    tolerance = tolerance or TOLERANCE[dtype]
    assert all(e <= tolerance for e in errors.values()), errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape, dim_out, rank",
    [
        ((2, 9, 24), 72, 4),  # qkv: D -> 3D
        ((37, 48), 192, 8),  # fc1: D -> 4D
        ((37, 192), 48, 8),  # fc2: 4D -> D
        ((23, 45), 1, 3),  # one output column
        ((5, 1), 33, 2),  # D = 1
        ((31, 70), 129, 17),  # odd widths, rank pads to 32
    ],
)
def test_against_float64(shape, dim_out, rank, dtype, monkeypatch):
    with poisoned_outputs(monkeypatch):
        check(make_case(shape, rank=rank, dtype=dtype, dim_out=dim_out), dtype)


@pytest.mark.parametrize("scale", [None, "float", "one", "channel"])
@pytest.mark.parametrize("activation", ["identity", "gelu"])
def test_lora_form_and_scale_kinds(scale, activation, monkeypatch):
    # LoRA: identity activation, no biases, scale alpha / r, the base output as the residual.
    case = make_case((29, 40), rank=6, dim_out=120, bias=False, scale=scale, activation=activation)
    with poisoned_outputs(monkeypatch):
        check(case, torch.float32)


@pytest.mark.parametrize("dim, dim_out", [(40, 30), (16, 64)])
@pytest.mark.slow
def test_split_ranks_and_several_row_chunks(dim, dim_out, monkeypatch):
    # rank 100 pads to 128: the weights launch splits it over rank blocks; the SM counts give
    # several row chunks, whose fp32 partials torch sums (D_out narrower and wider than D).
    from fused_adapters.kernels.bottleneck import plan

    rows = 600
    case = make_case((rows, dim), rank=100, dim_out=dim_out)
    with launch_plan(16):
        planned = plan.backward(
            torch.randn(rows, dim_out, device=DEVICE), case.x.detach(), torch.empty(rows, 100, device=DEVICE),
            case.w_down.detach(), case.w_up.detach(), None, None, 1.0, None, "gelu", torch.float32, False, True,
            torch.float32)
        weights_launch, partials = planned.launches["backward_weights"], planned.buffers["partials"]
        assert partials.shape[0] > 1 and weights_launch.grid[2] > 1  # several chunks, split ranks
        assert weights_launch.grid[1] == -(-max(dim, dim_out) // weights_launch.constexprs["BLOCK_DIM"])
        assert weights_launch.config.name.startswith("bwd_weights_wide")  # tiles that do not spill here
        assert weights_launch.constexprs["SAME_WIDTH"] is False
        with poisoned_outputs(monkeypatch):
            check(case, torch.float32)


def test_one_launch_forward_two_backward(monkeypatch):
    case = make_case((3, 41, 70), rank=6, dim_out=210)
    launches = LaunchCounter()
    with launches.patch(monkeypatch):
        out = case.call(bottleneck_adapter)
        assert launches.names == ["_bottleneck_forward_kernel"]
        launches.names = []
        torch.autograd.grad(out, list(case.differentiable().values()), torch.randn_like(out))
    assert launches.names == ["_backward_hidden_kernel", "_backward_input_and_weights_kernel"]


def test_fp16_autocast(monkeypatch):
    case = make_case((2, 13, 40), rank=8, dim_out=120, bias=False, scale="float", activation="identity")
    with poisoned_outputs(monkeypatch), torch.autocast(DEVICE, dtype=torch.float16):
        out = case.call(bottleneck_adapter)
        want_dtype = case.call(reference.bottleneck_adapter).dtype
    assert out.dtype == want_dtype == torch.float32  # fp32 residual stream: fp32 y, as eager gives
    ref_out, _ = reference_grads(case, torch.ones_like(out))
    assert relative_error(out, ref_out) <= TOLERANCE[torch.float16]
    grads = torch.autograd.grad(out.sum(), [case.x, case.w_up])
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_bad_widths_are_named():
    case = make_case((9, 16), rank=4, dim_out=48)
    args = (case.x, case.w_down, case.b_down, case.w_up, case.b_up)
    with pytest.raises(ValueError, match=r"b_up must have shape \[D_out\] = \[48\]"):
        bottleneck_adapter(*args[:4], torch.zeros(16), case.scale)
    with pytest.raises(ValueError, match=r"scale must be a \[D_out\] = \[48\]"):
        bottleneck_adapter(*args, torch.ones(16))
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(9, 48\)"):
        bottleneck_adapter(*args, case.scale, residual=case.x)  # x is no residual term when D_out != D
    with pytest.raises(ValueError, match=r"w_up must have shape \[D_out, rank\]"):
        bottleneck_adapter(*args[:3], torch.zeros(0, 4), None)


@pytest.mark.slow
def test_lora_branch_bytes():
    # LoRA on a ViT-B qkv (768 -> 2304) at batch 2 (M = 394), rank 8, fp16, launches planned for
    # 132 SMs. Floor: forward reads x and the base output and writes y; backward reads dy and x
    # and writes dx (the base output's gradient is dy itself). Forward is at the floor; backward
    # reads dy in both launches (dh needs whole rows of dy, dw_up and dscale its column tiles),
    # and dy is 3x the size of x here. Counted: forward 1.013x, backward 1.656x (at M = 1576:
    # 1.004x and 1.620x; fc1's 4x: 1.686x), against 1.40x when D_out = D.
    from fused_adapters.tools.byte_count import count_bytes

    rows, dim, dim_out, rank = 394, 768, 2304, 8
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).half().requires_grad_(True)

    x, base = randn(rows, dim), randn(rows, dim_out)
    w_down, w_up = randn(rank, dim, std=dim ** -0.5), randn(dim_out, rank, std=rank ** -0.5)
    with count_bytes(sm_count=132) as forward:
        y = bottleneck_adapter(x, w_down, None, w_up, None, 2.0, activation="identity", residual=base)
    grad = torch.randn(y.shape, generator=generator).half()
    with count_bytes(sm_count=132) as backward:
        torch.autograd.grad(y, [x, base, w_down, w_up], grad)
    assert forward.triton_launches == 1 and backward.triton_launches == 2
    forward_ratio = forward.total() / (2 * rows * (dim + 2 * dim_out))
    backward_ratio = backward.total() / (2 * rows * (dim_out + 2 * dim))
    print(f"LoRA qkv branch, M {rows}: forward {forward_ratio:.3f}x, backward {backward_ratio:.3f}x the floor")
    assert forward_ratio <= 1.03, forward.summary()
    assert backward_ratio <= 1.70, backward.summary()
