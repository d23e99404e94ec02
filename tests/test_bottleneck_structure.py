"""What makes the op fused, as facts that hold on any machine: launch counts, no M x D
intermediates, no aten matmul, what is saved for backward, determinism, int64 offsets."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from fused_adapters.kernels import bottleneck_adapter, reference
from helpers import (
    DEVICE, TOLERANCE, AtenRecorder, LaunchCounter, allow_tf32, force_reference, make_case, poisoned_outputs,
    relative_error,
)

MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "mv", "addmv", "dot", "_scaled_mm", "convolution"}
ALLOCATING_OPS = {"empty", "empty_strided", "new_empty", "new_empty_strided", "full", "zeros", "ones"}
VIEW_OPS = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "alias", "detach", "expand", "slice",
    "select", "transpose", "t", "permute", "squeeze", "unsqueeze", "split", "split_with_sizes",
}

SHAPE, RANK = (3, 41, 70), 6  # M = 123 rows, D = 70
ROWS, DIM = 123, 70


def run_traced(case, monkeypatch, grad_out=None, **overrides):
    """Forward and backward, recording Triton launches and host-side aten ops for each."""
    launches = LaunchCounter()
    with launches.patch(monkeypatch):
        forward_ops = AtenRecorder(launches)
        with forward_ops:
            out = case.call(bottleneck_adapter, **overrides)
        forward_launches, launches.names = launches.names, []
        inputs = list(case.differentiable().values())
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        backward_ops = AtenRecorder(launches)
        with backward_ops:
            grads = torch.autograd.grad(out, inputs, grad_out)
        backward_launches = launches.names
    return out, grads, forward_launches, forward_ops.ops, backward_launches, backward_ops.ops


def assert_no_full_size_work(ops, allowed_allocations):
    """No aten matmul; no op materialises an M x D tensor except the allowed allocations."""
    full = ROWS * DIM
    assert not [name for name, _ in ops if name in MATMUL_OPS], f"aten matmul on the Triton path: {ops}"
    allocations = []
    for name, shapes in ops:
        big = [s for s in shapes if torch.Size(s).numel() >= full]
        if not big or name in VIEW_OPS:
            continue
        assert name in ALLOCATING_OPS, f"{name} produced an M x D tensor {big}: an intermediate pass"
        allocations.append((name, big))
    assert len(allocations) <= allowed_allocations, allocations


def test_forward_is_one_launch_and_backward_two(monkeypatch):
    case = make_case(SHAPE, rank=RANK)
    _, _, forward_launches, forward_ops, backward_launches, backward_ops = run_traced(case, monkeypatch)
    assert forward_launches == ["_bottleneck_forward_kernel"]
    assert backward_launches == ["_backward_hidden_kernel", "_backward_input_and_weights_kernel"]
    assert_no_full_size_work(forward_ops, allowed_allocations=1)  # y
    assert_no_full_size_work(backward_ops, allowed_allocations=1)  # dx


@pytest.mark.parametrize("residual", ["x", "skip_and_x"])
def test_x_as_residual_costs_no_extra_pass(residual, monkeypatch):
    # y = x + A(x) (post, pre) and y = skip + x + A(x) (intermediate, houlsby): the op reads x
    # as a residual term in its own tile loop and adds dy into the dx store, so neither the
    # forward nor the backward runs an M x D add, and autograd accumulates nothing into dx.
    case = make_case(SHAPE, rank=RANK, residual=residual != "x")
    arg = case.x if residual == "x" else (case.residual, case.x)
    out, grads, forward_launches, forward_ops, backward_launches, backward_ops = run_traced(
        case, monkeypatch, residual=arg)
    assert len(forward_launches) == 1 and len(backward_launches) == 2
    assert_no_full_size_work(forward_ops, allowed_allocations=1)  # y
    assert_no_full_size_work(backward_ops, allowed_allocations=1)  # dx, with dy in it
    names = list(case.differentiable())
    if residual == "skip_and_x":
        # The skip's gradient is dy itself, not a copy.
        grad_skip = grads[names.index("residual")]
        assert grad_skip.shape == out.shape


@pytest.mark.parametrize("rank", [100, 256])
def test_split_rank_backward_is_still_two_launches(rank, monkeypatch):
    # Ranks past the weights kernel's rank tile use a third grid axis, not more launches.
    case = make_case((40, 48), rank=rank)
    _, _, forward_launches, _, backward_launches, backward_ops = run_traced(case, monkeypatch)
    assert len(forward_launches) == 1 and len(backward_launches) == 2
    assert not [name for name, _ in backward_ops if name in MATMUL_OPS]


def test_frozen_input_skips_dx(monkeypatch):
    # A frozen backbone's first adapter: x needs no gradient, so no M x D buffer is written for it.
    case = make_case(SHAPE, rank=RANK)
    case.x.requires_grad_(False)
    case.residual.requires_grad_(False)
    _, _, _, _, backward_launches, backward_ops = run_traced(case, monkeypatch)
    assert len(backward_launches) == 2
    assert_no_full_size_work(backward_ops, allowed_allocations=0)


def test_expanded_gradient_is_not_copied(monkeypatch):
    # out.sum() hands backward a stride-0 expanded gradient; the kernels read it in place.
    case = make_case(SHAPE, rank=RANK)
    out = case.call(bottleneck_adapter)
    grad_out = torch.ones((), device=out.device).expand(out.shape)
    _, _, _, _, _, backward_ops = run_traced(case, monkeypatch, grad_out=grad_out)
    assert_no_full_size_work(backward_ops, allowed_allocations=1)


def test_saved_for_backward_is_x_by_reference_params_and_one_rank_sized_tensor():
    case = make_case(SHAPE, rank=RANK)
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = case.call(bottleneck_adapter)
    params = [case.w_down, case.b_down, case.w_up, case.b_up, case.scale]
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    x_storage = case.x.untyped_storage().data_ptr()
    x_saved, rank_sized, other = 0, 0, []
    for tensor in saved:
        storage = tensor.untyped_storage().data_ptr()
        if storage == x_storage:
            x_saved += 1
        elif storage in param_storages:
            continue
        elif tuple(tensor.shape) == (ROWS, RANK):
            rank_sized += 1
        elif tensor.numel() <= ROWS:  # row_scale: one value per row
            continue
        else:
            other.append(tuple(tensor.shape))
    assert x_saved == 1, "x must be saved by reference (no copy), once"
    assert rank_sized <= 1, "at most one M x r tensor may be saved"
    assert not other, f"saved tensors of other sizes: {other}"
    residual_storage = case.residual.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() != residual_storage for t in saved), "residual is not needed"
    out.sum().backward()


def test_backward_is_deterministic():
    torch.manual_seed(0)
    case = make_case((5, 67, 96), rank=12)
    out = case.call(bottleneck_adapter)
    grad_out = torch.randn_like(out)
    inputs = list(case.differentiable().values())
    first = torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
    second = torch.autograd.grad(out, inputs, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "two identical backward passes differ bitwise"


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.slow
def test_offsets_past_2_to_the_31(layout):
    # Views whose elements lie past 2^31 elements from the base pointer, in a 4 GiB virtual
    # storage of which only the touched pages become resident. rows: the row stride 2^30 + 8
    # fits in int32, so row * stride overflows unless the kernels widen rows to int64.
    # columns: a column-major layout with the same stride; the launcher copies it to row-major
    # rather than overflow int32 column offsets. Forward and backward, in a subprocess: an
    # overflow is an out-of-bounds read that may crash rather than fail.
    if torch.cuda.is_available():
        pytest.skip("the virtual-storage trick is for the interpreter; on CUDA it would need 4 GiB of GPU memory")
    script = textwrap.dedent(
        f"""
        import torch
        from fused_adapters.kernels import bottleneck_adapter, reference
        stride = 2**30 + 8
        if "{layout}" == "rows":
            rows, D, r = 3, 24, 4
            size, strides = 2 * stride + D, (stride, 1)
        else:
            rows, D, r = 24, 3, 4
            size, strides = (D - 1) * stride + rows, (1, stride)
        x = torch.empty(size, dtype=torch.float16).as_strided((rows, D), strides)
        x.copy_(torch.randn(rows, D))
        x.requires_grad_(True)
        w_down = (torch.randn(r, D) * 0.2).requires_grad_(True)
        w_up = (torch.randn(D, r) * 0.2).requires_grad_(True)
        y = bottleneck_adapter(x, w_down, None, w_up, None)
        grad = torch.randn(rows, D, dtype=torch.float16)
        grads = torch.autograd.grad(y, [x, w_down, w_up], grad)
        x64, wd64, wu64 = (t.detach().double().requires_grad_(True) for t in (x, w_down, w_up))
        ref = reference.bottleneck_adapter(x64, wd64, None, wu64, None)
        ref_grads = torch.autograd.grad(ref, [x64, wd64, wu64], grad.double())
        err = lambda a, b: float((a.detach().double() - b).norm() / b.norm())
        print("relative error", max([err(y, ref)] + [err(a, b) for a, b in zip(grads, ref_grads)]))
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"crashed (rc {result.returncode}): {result.stderr[-2000:]}"
    error = float(result.stdout.split("relative error")[-1])
    assert error < 5e-3, result.stdout


def test_fp32_dots_follow_allow_tf32():
    from fused_adapters.kernels.bottleneck import plan

    x = torch.randn(20, 32)
    w_down, w_up = torch.randn(4, 32), torch.randn(32, 4)

    def precision():
        launch = plan.forward(x, w_down, None, w_up, None, None, 1.0, None, False, None, "gelu", torch.float32,
                              torch.float32, False).launches["forward"]
        return launch.constexprs["INPUT_PRECISION"]

    with allow_tf32(False):
        assert precision() == "ieee"
    with allow_tf32(True):
        assert precision() == "tf32"


@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_column_major_x_gives_column_major_y(path, monkeypatch):
    # y is laid out like x (torch.empty_like's rule): a tensor stored token-major, [N, B, D],
    # viewed as [(B, D), N] for a bottleneck over its tokens, is column-major; so is y, and
    # permuting it back gives the [N, B, D] layout again with no copy. Values are the
    # reference's, and opcheck's fake agrees with the real layout.
    if path == "reference":
        force_reference(monkeypatch)
    tokens, batch, dim, rank = 13, 3, 24, 4
    generator = torch.Generator().manual_seed(5)
    state = torch.randn(tokens, batch, dim, generator=generator).to(DEVICE).requires_grad_()
    w_down, w_up = (torch.randn(rank, tokens, generator=generator) * 0.3).to(DEVICE), \
        (torch.randn(tokens, rank, generator=generator) * 0.3).to(DEVICE)
    view = state.permute(1, 2, 0)  # [B, D, N]: the token axis last, rows (b, d) with stride 1
    with poisoned_outputs(monkeypatch):
        y = bottleneck_adapter(view, w_down, None, w_up, None, 0.5, residual=view)
    assert y.shape == view.shape and y.stride() == view.stride()
    back = y.permute(2, 0, 1)
    assert back.is_contiguous()
    expected = reference.bottleneck_adapter(view.detach().double(), w_down.double(), None, w_up.double(), None, 0.5,
                                            residual=view.detach().double())
    assert relative_error(y, expected) < TOLERANCE[torch.float32]
    y.backward(torch.ones_like(y))
    assert state.grad.shape == state.shape and torch.isfinite(state.grad).all()
    x2d = view.reshape(-1, tokens)
    inputs = dict(x=x2d.detach(), w_down=w_down, b_down=None, w_up=w_up, b_up=None, scale=None, scale_value=0.5,
                  residual=None, add_input=True, row_scale=None, activation="gelu", compute_dtype=torch.float32,
                  out_dtype=torch.float32, autocast=False, save_hidden=True, op="bottleneck_adapter")
    torch.library.opcheck(torch.ops.fused_adapters.bottleneck_forward.default, (), inputs,
                          test_utils=("test_schema", "test_faketensor"))
    # Row-major x, and D_out != D, keep row-major y.
    w_down_d, w_up_d = torch.randn(rank, dim).to(DEVICE), torch.randn(dim, rank).to(DEVICE)
    assert bottleneck_adapter(state.detach(), w_down_d, None, w_up_d, None).is_contiguous()
    assert bottleneck_adapter(view.detach(), w_down, None, torch.randn(5, rank).to(DEVICE), None).is_contiguous()
