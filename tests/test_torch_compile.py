"""The op is registered through torch.library: opcheck passes for both custom ops, and
torch.compile(fullgraph=True) traces a function that calls it with no graph break."""

import pytest
import torch

from fused_adapters.kernels import bottleneck_adapter, reference, uses_triton
from helpers import TOLERANCE, force_reference, make_case, relative_error


def op_inputs(case, save_hidden=True, add_input=False):
    """The forward custom op's inputs, by name."""
    dim = case.x.shape[-1]
    dtype = case.x.dtype
    return dict(
        x=case.x.reshape(-1, dim), w_down=case.w_down, b_down=case.b_down, w_up=case.w_up, b_up=case.b_up,
        scale=case.scale, scale_value=1.0, residual=case.residual.reshape(-1, dim), add_input=add_input,
        row_scale=case.row_scale, activation=case.activation, compute_dtype=dtype, out_dtype=dtype, autocast=False,
        save_hidden=save_hidden, op="bottleneck_adapter",
    )


@pytest.fixture(params=["triton", "reference"])
def path(request, monkeypatch):
    """Both CPU paths: the kernels (interpreter, or CUDA) and the plain-PyTorch reference."""
    if request.param == "reference":
        force_reference(monkeypatch)
    elif not uses_triton(torch.empty(1, device=make_case().x.device)):
        pytest.skip("kernels not available on this device")
    return request.param


def test_opcheck_forward_and_backward(path):
    case = make_case((2, 9, 20), rank=5)
    op = torch.ops.fused_adapters.bottleneck_forward.default
    torch.library.opcheck(op, (), op_inputs(case))
    torch.library.opcheck(op, (), op_inputs(case, save_hidden=False), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(op, (), op_inputs(case, add_input=True))
    out, hidden = op(**op_inputs(case))
    grad = torch.randn_like(out)
    backward_inputs = dict(
        grad_y=grad, x=case.x.detach().reshape(-1, 20), hidden=hidden, w_down=case.w_down.detach(),
        b_down=case.b_down.detach(), w_up=case.w_up.detach(), b_up=case.b_up.detach(), scale=case.scale.detach(),
        scale_value=1.0, row_scale=case.row_scale, activation="gelu", compute_dtype=torch.float32, add_grad_y=True,
        compute_dx=True,
    )
    torch.library.opcheck(torch.ops.fused_adapters.bottleneck_backward.default, (), backward_inputs,
                          test_utils=("test_schema", "test_faketensor"))


def test_opcheck_strided_inputs(path):
    # Fake and real outputs must agree on strides too: y is row-major even for a transposed residual.
    case = make_case((13, 20), rank=3)
    case.residual = torch.randn(20, 13, device=case.x.device).t().requires_grad_(True)
    case.x = torch.randn(13, 40, device=case.x.device)[:, ::2].requires_grad_(True)
    torch.library.opcheck(torch.ops.fused_adapters.bottleneck_forward.default, (), op_inputs(case),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.slow
def test_compile_fullgraph_forward_and_backward(path):
    torch._dynamo.reset()
    case = make_case((2, 9, 24), rank=4)

    def block(x, w_down, b_down, w_up, b_up, scale, residual):
        # The adapter inside surrounding ops, as in a ViT block.
        y = bottleneck_adapter(torch.nn.functional.layer_norm(x, x.shape[-1:]), w_down, b_down, w_up, b_up,
                               scale, residual=residual)
        return (y * 2).sum(-1)

    compiled = torch.compile(block, fullgraph=True)
    args = (case.x, case.w_down, case.b_down, case.w_up, case.b_up, case.scale, case.residual)
    out = compiled(*args)
    expected = block(*args)
    assert relative_error(out, expected) < TOLERANCE[torch.float32]
    grads = torch.autograd.grad(out.sum(), args)
    expected_grads = torch.autograd.grad(expected.sum(), args)
    for got, want in zip(grads, expected_grads):
        assert relative_error(got, want) < TOLERANCE[torch.float32]

    ref_case = case.float64()
    ref_out = (reference.bottleneck_adapter(
        torch.nn.functional.layer_norm(ref_case.x, (24,)), ref_case.w_down, ref_case.b_down, ref_case.w_up,
        ref_case.b_up, ref_case.scale, residual=ref_case.residual) * 2).sum(-1)
    assert relative_error(out, ref_out) < TOLERANCE[torch.float32]


@pytest.mark.slow
def test_float_scale_does_not_recompile_for_every_value(path):
    # A Python float scale is a graph input under torch.compile, not a constant baked into it:
    # after the first value (static) and the second (dynamic), new values reuse the graph.
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    case = make_case((2, 9, 24), rank=4)
    counter = CompileCounter()

    def adapter(x, scale):
        return bottleneck_adapter(x, case.w_down, case.b_down, case.w_up, case.b_up, scale, residual=x)

    compiled = torch.compile(adapter, backend=counter, fullgraph=True)
    for scale in (0.5, 0.7, 0.9, 1.3, -2.0):
        out = compiled(case.x, scale)
        assert relative_error(out, adapter(case.x, scale)) < TOLERANCE[torch.float32]
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 5 scale values"
    # bf16 x (the reference path here): the float still multiplies unrounded, as in eager.
    x16 = case.x.detach().bfloat16()
    for scale in (0.7, 0.9):
        assert torch.equal(compiled(x16, scale), adapter(x16, scale))
