"""bottleneck_adapter under torch.autocast, as users train: dots in autocast's dtype, x and the
residual read in their own dtypes (no M x D cast copy), y in the dtype eager PyTorch gives the
same expression, each gradient in its input's dtype. On the CPU, fp16 autocast runs the kernels
in the interpreter; bf16 takes the reference there (the interpreter has no bf16)."""

import pytest
import torch

from fused_adapters.kernels import bottleneck_adapter, paths, reference, uses_triton
from helpers import (
    DEVICE, NO_CUDA_REASON, TOLERANCE, LaunchCounter, make_case, poisoned_outputs, reference_grads,
    relative_error,
)

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def residual_arg(case, kind):
    return {"none": None, "x": case.x, "tensor": case.residual, "pair": (case.residual, case.x)}[kind]


def check_autocast(case, kind, autocast_dtype, monkeypatch, device=DEVICE):
    """The op under autocast against the same expression in float64, and its dtypes against the
    reference under the same autocast."""
    residual = residual_arg(case, kind)
    launches = LaunchCounter()
    with poisoned_outputs(monkeypatch), launches.patch(monkeypatch):
        with torch.autocast(device, dtype=autocast_dtype):
            out = bottleneck_adapter(case.x, case.w_down, case.b_down, case.w_up, case.b_up, case.scale,
                                     activation=case.activation, residual=residual, row_scale=case.row_scale)
            expected_dtype = reference.bottleneck_adapter(
                case.x, case.w_down, case.b_down, case.w_up, case.b_up, case.scale, activation=case.activation,
                residual=residual, row_scale=case.row_scale).dtype
        assert out.dtype == expected_dtype, (out.dtype, expected_dtype)
        inputs = {name: t for name, t in case.differentiable().items() if name != "residual" or kind in ("tensor", "pair")}
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, list(inputs.values()), grad_out)
    ref_case = case.float64()
    ref_out = reference.bottleneck_adapter(
        ref_case.x, ref_case.w_down, ref_case.b_down, ref_case.w_up, ref_case.b_up, ref_case.scale,
        activation=case.activation, residual=residual_arg(ref_case, kind), row_scale=ref_case.row_scale)
    ref_inputs = {name: getattr(ref_case, name) for name in inputs}
    ref_grads = torch.autograd.grad(ref_out, list(ref_inputs.values()), grad_out.to(torch.float64))
    tolerance = TOLERANCE[autocast_dtype]
    errors = {"y": relative_error(out, ref_out)}
    for (name, tensor), grad, ref_grad in zip(inputs.items(), grads, ref_grads):
        assert grad.dtype == tensor.dtype, f"d{name} came back in {grad.dtype}, not {tensor.dtype}"
        if name == "scale" and tensor.numel() == 1:
            # A layer-wise scale's gradient is one sum over M x D products of both signs: its
            # rounding error is bounded against the sum of their magnitudes, not the (possibly
            # cancelling) sum itself.
            update = reference.bottleneck_adapter(ref_case.x, ref_case.w_down, ref_case.b_down, ref_case.w_up,
                                                  ref_case.b_up, None, activation=case.activation,
                                                  row_scale=ref_case.row_scale)
            magnitude = (grad_out.to(torch.float64) * update.detach()).abs().sum()
            errors["dscale"] = float((grad.double() - ref_grad).abs().sum() / magnitude.detach())
        else:
            errors["d" + name] = relative_error(grad, ref_grad)
    assert all(error <= tolerance for error in errors.values()), errors
    return launches.names


@pytest.mark.parametrize("kind", ["none", "x", "tensor", "pair"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scale", ["channel", "float", "scalar", "one"])
def test_fp16_autocast_runs_the_kernels_and_matches_float64(kind, x_dtype, scale, monkeypatch):
    # fp32 parameters and residual stream (a model trained under autocast), or an fp16 x.
    case = make_case((2, 23, 40), rank=6, dtype=x_dtype, param_dtype=torch.float32, scale=scale)
    launches = check_autocast(case, kind, torch.float16, monkeypatch)
    assert launches == ["_bottleneck_forward_kernel", "_backward_hidden_kernel",
                        "_backward_input_and_weights_kernel"], launches


@pytest.mark.parametrize("kind", ["none", "x", "pair"])
def test_bf16_autocast(kind, monkeypatch):
    # On the CPU bf16 takes the reference; on CUDA the kernels.
    case = make_case((2, 23, 40), rank=6, param_dtype=torch.float32)
    launches = check_autocast(case, kind, torch.bfloat16, monkeypatch)
    assert bool(launches) == (DEVICE == "cuda")


@pytest.mark.parametrize("kind", ["x", "tensor", "pair"])
def test_residual_of_another_dtype_without_autocast(kind, monkeypatch):
    # fp16 x with an fp32 residual stream: y is promoted to fp32, as `residual + update` would be.
    case = make_case((31, 24), rank=4, dtype=torch.float16, param_dtype=torch.float32)
    case.residual = case.residual.detach().float().requires_grad_(True)
    residual = residual_arg(case, kind)
    with poisoned_outputs(monkeypatch):
        out = bottleneck_adapter(case.x, case.w_down, case.b_down, case.w_up, case.b_up, case.scale,
                                 residual=residual, row_scale=case.row_scale)
    expected = torch.float32 if kind != "x" else torch.float16
    assert out.dtype == expected
    ref_case = case.float64()
    ref = reference.bottleneck_adapter(ref_case.x, ref_case.w_down, ref_case.b_down, ref_case.w_up, ref_case.b_up,
                                       ref_case.scale, residual=residual_arg(ref_case, kind),
                                       row_scale=ref_case.row_scale)
    assert relative_error(out, ref) < TOLERANCE[torch.float16]
    out.float().sum().backward()
    assert case.x.grad.dtype == torch.float16
    if kind != "x":
        assert case.residual.grad.dtype == torch.float32


def test_forward_on_the_reference_keeps_its_backward_there():
    # A bf16 residual sends the forward to the reference in the interpreter (no bf16 there);
    # y is fp32 (fp16 x promoted by bf16), and the backward must not then take the kernels,
    # which need the pre-activation only the Triton forward saves.
    case = make_case((10, 16), rank=4, dtype=torch.float16, param_dtype=torch.float32)
    residual = torch.randn(10, 16, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    out = bottleneck_adapter(case.x, case.w_down, case.b_down, case.w_up, case.b_up, case.scale, residual=residual,
                             row_scale=case.row_scale)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert case.x.grad.dtype == torch.float16 and residual.grad.dtype == torch.bfloat16
    ref_case = case.float64()
    ref = reference.bottleneck_adapter(ref_case.x, ref_case.w_down, ref_case.b_down, ref_case.w_up, ref_case.b_up,
                                       ref_case.scale, residual=residual.detach().double(),
                                       row_scale=ref_case.row_scale)
    (ref_grad_x,) = torch.autograd.grad(ref.sum(), [ref_case.x])
    assert relative_error(case.x.grad, ref_grad_x) < TOLERANCE[torch.float16]


def dtype_of(autocast, x_dtype, scale, residual_dtypes, autocast_dtype=torch.float16):
    x = torch.randn(3, 8, dtype=x_dtype)
    w_down, w_up = torch.randn(2, 8), torch.randn(8, 2)
    residual = [torch.randn(3, 8, dtype=d) for d in residual_dtypes] or None
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast):
        fused = bottleneck_adapter(x, w_down, None, w_up, None, scale, residual=residual)
        eager = reference.bottleneck_adapter(x, w_down, None, w_up, None, scale, residual=residual)
    assert fused.dtype == eager.dtype
    return fused.dtype


def test_output_dtypes_follow_eager_promotion():
    f16, f32 = torch.float16, torch.float32
    channel, layer, zero_d = torch.ones(8), torch.ones(1), torch.tensor(1.0)
    # Under autocast: the update leaves F.linear in fp16; a [D] or [1] fp32 scale promotes it,
    # a 0-d one or a float does not; each residual term promotes.
    assert dtype_of(True, f32, None, []) == f16
    assert dtype_of(True, f32, 0.5, []) == f16
    assert dtype_of(True, f32, zero_d, []) == f16
    assert dtype_of(True, f32, channel, []) == f32
    assert dtype_of(True, f32, layer, []) == f32
    assert dtype_of(True, f16, None, [f32]) == f32
    assert dtype_of(True, f16, None, [f16, f16]) == f16
    assert dtype_of(True, f32, None, [f16], autocast_dtype=torch.bfloat16) == torch.float32
    # Without autocast the parameters (scale too) are cast to x's dtype; residuals promote.
    assert dtype_of(False, f16, channel, []) == f16
    assert dtype_of(False, f16, channel, [f32]) == f32
    assert dtype_of(False, f32, channel, [f16]) == f32


def test_autocast_reads_x_in_place(monkeypatch):
    # fp32 x under fp16 autocast: the kernels convert tiles in registers, so no M x D cast copy
    # (aten _to_copy) runs in the forward or the backward.
    from test_bottleneck_structure import ROWS, SHAPE, assert_no_full_size_work, run_traced

    case = make_case(SHAPE, rank=5, param_dtype=torch.float32)
    case.residual = None
    with torch.autocast(DEVICE, dtype=torch.float16):
        out, _, forward_launches, forward_ops, backward_launches, backward_ops = run_traced(
            case, monkeypatch, residual=case.x)
    assert len(forward_launches) == 1 and len(backward_launches) == 2
    assert_no_full_size_work(forward_ops, allowed_allocations=1)  # y
    assert_no_full_size_work(backward_ops, allowed_allocations=1)  # dx, dy folded in
    assert out.shape[0] * out.shape[1] * out.shape[2] == ROWS * out.shape[-1]


def test_bf16_never_reaches_the_interpreter(monkeypatch):
    # With TRITON_INTERPRET=1 every device runs the interpreter, CUDA tensors included: bf16 in
    # any role (x, the compute dtype, y, the residual) must take the reference there.
    monkeypatch.setattr(paths, "is_interpreted", lambda: True)
    for device in ("cpu", "cuda"):
        assert paths.takes_triton(device, (torch.float16, torch.float16))
        assert not paths.takes_triton(device, (torch.float32, torch.bfloat16))
        assert not paths.takes_triton(device, (torch.bfloat16,))
        assert not paths.takes_triton(device, (torch.float16, torch.float16, torch.float32, torch.bfloat16))
    monkeypatch.setattr(paths, "is_interpreted", lambda: False)
    assert paths.takes_triton("cuda", (torch.float32, torch.bfloat16))
    assert not paths.takes_triton("cpu", (torch.float32,))


def test_uses_triton_follows_autocast():
    x = torch.randn(4, 8, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert uses_triton(x) == (DEVICE == "cuda")
    with torch.autocast(DEVICE, dtype=torch.float16):
        assert uses_triton(x)


@pytest.mark.skipif(DEVICE != "cuda", reason=NO_CUDA_REASON)
@pytest.mark.parametrize("kind", ["none", "x", "tensor", "pair"])
@pytest.mark.parametrize("autocast_dtype", ["fp16", "bf16"])
def test_cuda_autocast(kind, autocast_dtype, monkeypatch):
    case = make_case((4, 197, 384), rank=8, param_dtype=torch.float32)
    assert check_autocast(case, kind, HALF[autocast_dtype], monkeypatch)


def test_bf16_parameters_take_the_reference_in_the_interpreter(monkeypatch):
    # The weights kernel stores gradients in the parameters' dtype, and the interpreter's bf16
    # stores truncate: bf16 parameters send the op to the reference there (on CUDA, the kernels).
    from fused_adapters.kernels.launch import launch_plan

    case = make_case((40, 24), rank=4, param_dtype=torch.bfloat16)
    launches = LaunchCounter()
    with launches.patch(monkeypatch), launch_plan(8):
        out = case.call(bottleneck_adapter)
        grads = torch.autograd.grad(out, [case.w_down, case.w_up], torch.ones_like(out))
    assert bool(launches.names) == (DEVICE == "cuda")
    _, ref_grads = reference_grads(case, torch.ones_like(out))
    assert relative_error(grads[0], ref_grads["w_down"]) < TOLERANCE[torch.bfloat16]
    assert relative_error(grads[1], ref_grads["w_up"]) < TOLERANCE[torch.bfloat16]


# dw_up, db_up and dscale overflow here by design (below); under the interpreter numpy says so.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning",
                            "ignore:invalid value encountered in matmul:RuntimeWarning")
def test_large_fp32_gradient_times_small_scale_stays_finite():
    # Loss scaling: dy of 1e5 (past fp16's range) into an fp32 y under fp16 autocast, with a
    # channel scale of 1e-3. As in eager autocast, dy * scale is formed in fp32 before the
    # rounding to fp16, so dx and dw_down (through dh) stay finite. dw_up, db_up and dscale
    # still overflow here (the weights kernel rounds dy * row_scale before the scale; see it).
    case = make_case((32, 32), rank=4, param_dtype=torch.float32, row_scale=False, residual=False)
    case.scale = torch.full((32,), 1e-3, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.float16):
        out = bottleneck_adapter(case.x, case.w_down, case.b_down, case.w_up, case.b_up, case.scale, residual=case.x)
    assert out.dtype == torch.float32
    grad_x, grad_w_down = torch.autograd.grad(out, [case.x, case.w_down], torch.full_like(out, 1e5))
    assert torch.isfinite(grad_x).all() and torch.isfinite(grad_w_down).all()


def test_one_element_scale_of_any_shape_is_layer_wise():
    for device_dtype in (torch.float64, torch.float32):  # the reference path and the kernels
        case = make_case((6, 8), rank=3, dtype=device_dtype, param_dtype=device_dtype, residual=False)
        scale = torch.full((1, 1, 1), 0.5, dtype=device_dtype, device=DEVICE, requires_grad=True)
        out = bottleneck_adapter(case.x, case.w_down, case.b_down, case.w_up, case.b_up, scale)
        assert out.shape == case.x.shape
        expected = reference.bottleneck_adapter(case.x, case.w_down, case.b_down, case.w_up, case.b_up, 0.5)
        assert relative_error(out, expected) < 1e-5
        (grad_scale,) = torch.autograd.grad(out.sum(), [scale])
        assert grad_scale.shape == (1, 1, 1)
