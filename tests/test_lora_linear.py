"""The LoRA linear op, y = x W^T + b + s (x A^T) B^T, in both forms: the default (F.linear, then
the fused branch) and the single launch (one Triton kernel for the GEMM and the branch; backward
two). Against float64 with outputs poisoned, every gradient, odd shapes, several tiles, autocast,
launch counts, bytes, and errors that name the argument."""

import pytest
import torch

from fused_adapters.kernels import list_variants, lora_linear, reference, use_variant
from fused_adapters.kernels.launch import launch_plan
from fused_adapters.kernels.lora import plan as lora_plan
from fused_adapters.kernels.paths import is_interpreted
from helpers import (
    DEVICE, NO_CUDA_REASON, TOLERANCE, AtenRecorder, LaunchCounter, allow_tf32, poisoned_outputs, relative_error,
)

SINGLE = "single_launch"
NAMES = ("x", "weight", "bias", "lora_a", "lora_b")
# fp32 runs the single launch with tf32 dots: exact in the interpreter, about 1e-3 on a GPU.
FP32_TOLERANCE = TOLERANCE[torch.float32] if is_interpreted() else 5e-3


def make_inputs(shape, dim_out, rank, dtype, *, bias=True, base_grad=False, seed=0, param_dtype=None):
    generator = torch.Generator().manual_seed(seed)
    dim = shape[-1]
    param_dtype = param_dtype or dtype

    def randn(*size, std=1.0, dt=param_dtype):
        return (torch.randn(*size, generator=generator) * std).to(DEVICE, dt)

    x = randn(*shape, dt=dtype).requires_grad_()
    weight = randn(dim_out, dim, std=dim ** -0.5).requires_grad_(base_grad)
    b = randn(dim_out, std=0.1).requires_grad_(base_grad) if bias else None
    lora_a = randn(rank, dim, std=dim ** -0.5).requires_grad_()
    lora_b = randn(dim_out, rank, std=0.5).requires_grad_()  # B != 0: a zero B would hide the branch
    return x, weight, b, lora_a, lora_b


def run(inputs, scale, variant=SINGLE, grad_seed=1):
    """y and the gradients of every input that requires one, under the given variant."""
    with use_variant("lora_linear", variant):
        y = lora_linear(*inputs, scale)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return y, dict(zip([n for n, t in zip(NAMES, inputs) if t is not None and t.requires_grad],
                       torch.autograd.grad(y, wanted, grad_out))), grad_out


def float64_reference(inputs, scale, grad_out):
    inputs64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    y = reference.lora_linear(*inputs64, scale)
    wanted = [t for t in inputs64 if t is not None and t.requires_grad]
    names = [n for n, t in zip(NAMES, inputs64) if t is not None and t.requires_grad]
    return y, dict(zip(names, torch.autograd.grad(y, wanted, grad_out.double())))


def check(inputs, scale, tolerance, variant=SINGLE):
    y, grads, grad_out = run(inputs, scale, variant)
    ref_y, ref_grads = float64_reference(inputs, scale, grad_out)
    errors = {"y": relative_error(y, ref_y)}
    for name, grad in grads.items():
        tensor = inputs[NAMES.index(name)]
        assert grad.shape == tensor.shape and grad.dtype == tensor.dtype, name
        errors["d" + name] = relative_error(grad, ref_grads[name])
    assert all(error <= tolerance for error in errors.values()), errors
    return y


SHAPES = [
    ((2, 9, 24), 72, 4),  # qkv: D -> 3D
    ((37, 48), 192, 8),  # fc1: D -> 4D
    ((37, 192), 48, 8),  # fc2: 4D -> D
    ((31, 70), 129, 17),  # odd widths, rank pads to 32
    ((23, 45), 1, 3),  # one output column
    ((5, 1), 33, 2),  # D_in = 1
    ((19, 40), 40, 64),  # rank 64, the largest the single launch takes
]


BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE != "cuda", reason=NO_CUDA_REASON))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
@pytest.mark.parametrize("shape, dim_out, rank", SHAPES)
def test_single_launch_against_float64(shape, dim_out, rank, dtype, monkeypatch):
    inputs = make_inputs(shape, dim_out, rank, dtype, bias=rank % 2 == 0)
    with poisoned_outputs(monkeypatch), allow_tf32(True), LaunchCounter().patch(monkeypatch) as launches:
        y = check(inputs, 0.75, FP32_TOLERANCE if dtype == torch.float32 else TOLERANCE[dtype])
    assert y.shape == (*shape[:-1], dim_out) and y.dtype == dtype
    if DEVICE == "cuda" or is_interpreted():  # the kernels ran, not the default form
        assert launches.names[0] == "_lora_linear_kernel", launches.names


@pytest.mark.slow
def test_many_tiles_and_several_row_chunks(monkeypatch):
    # Planned for 4 SMs: M = 300 and D_out = 200 in the unaligned 32 x 32 tiles give 10 row
    # tiles by 7 column tiles, so the grouped program order runs a full group of 8 row tiles and
    # a partial one (only column tile 0 stores h and g: the NaN poison shows an unwritten row),
    # and the weights launch splits M into several chunks whose fp32 partials torch sums.
    # Strided x (column stride 2) reads through its strides.
    inputs = make_inputs((300, 40), 200, 5, torch.float32)
    with poisoned_outputs(monkeypatch), allow_tf32(True), launch_plan(4), \
            LaunchCounter().patch(monkeypatch) as launches:
        config = lora_plan.gemm_config(5, torch.float32, 300, 200, 4, lora_plan.aligned(inputs[0], 200))
        assert (-(-300 // config.block_rows), -(-200 // config.block_dim)) == (10, 7) and config.group_rows == 8
        partials = lora_plan.backward(
            torch.empty(300, 200), inputs[0].detach(), torch.empty(300, 5), inputs[1].detach(), inputs[3].detach(),
            inputs[4].detach(), 2.0, torch.float32, True, torch.float32).buffers["partials"]
        assert partials.shape[0] > 1  # several row chunks
        check(inputs, 2.0, FP32_TOLERANCE)
        wide = torch.randn(300, 80, generator=torch.Generator().manual_seed(3)).to(inputs[0])
        strided = wide[:, ::2].requires_grad_()
        check((strided,) + inputs[1:], 2.0, FP32_TOLERANCE)
    assert launches.names.count("_lora_linear_kernel") == 4, launches.names


def kernels_ran(names) -> bool:
    """Whether the single launch's kernel ran (wherever kernels run at all)."""
    return "_lora_linear_kernel" in names or (DEVICE == "cpu" and not is_interpreted())


def test_base_weight_and_bias_gradients(monkeypatch):
    # LoRA freezes W and b; if they do require grad they get dW = dy^T x and db = sum(dy).
    inputs = make_inputs((21, 32), 48, 4, torch.float32, base_grad=True)
    with poisoned_outputs(monkeypatch), allow_tf32(True), LaunchCounter().patch(monkeypatch) as launches:
        check(inputs, 0.5, FP32_TOLERANCE)
    assert kernels_ran(launches.names)
    # Only dx wanted: the weights launch does not run.
    frozen = [t.detach() if t is not None else None for t in inputs]
    x = inputs[0]
    with use_variant("lora_linear", SINGLE), allow_tf32(True), LaunchCounter().patch(monkeypatch) as launches:
        y = lora_linear(x, *frozen[1:], 0.5)
        y.backward(torch.ones_like(y))
    if kernels_ran(launches.names) and launches.names:
        assert launches.names == ["_lora_linear_kernel", "_lora_linear_kernel"], launches.names


def test_forms_agree_and_variants_are_listed(monkeypatch):
    assert set(list_variants("lora_linear")) == {"default", SINGLE}
    inputs = make_inputs((3, 11, 32), 96, 8, torch.float32)
    with allow_tf32(True), LaunchCounter().patch(monkeypatch) as launches:
        y_default, grads_default, _ = run(inputs, 0.5, "default")
        assert "_lora_linear_kernel" not in launches.names
        y_single, grads_single, _ = run(inputs, 0.5, SINGLE)
        assert kernels_ran(launches.names)
    assert relative_error(y_single, y_default) <= FP32_TOLERANCE
    for name in grads_default:
        assert relative_error(grads_single[name], grads_default[name]) <= FP32_TOLERANCE, name


@pytest.mark.skipif(DEVICE == "cpu" and not is_interpreted(), reason="counts Triton launches")
def test_launch_counts(monkeypatch):
    # Single launch: forward one Triton launch and no aten matmul; backward two launches.
    # Default: F.linear's GEMM, then the branch's one launch.
    inputs = make_inputs((2, 17, 32), 96, 8, torch.float16)
    counter = LaunchCounter()
    with counter.patch(monkeypatch), use_variant("lora_linear", SINGLE):
        with AtenRecorder(counter) as recorder:
            y = lora_linear(*inputs, 0.5)
        assert counter.names == ["_lora_linear_kernel"]
        assert not [op for op, _ in recorder.ops if op in ("mm", "addmm", "matmul", "linear", "bmm")], recorder.ops
        counter.names.clear()
        y.backward(torch.ones_like(y))
        assert counter.names == ["_lora_linear_kernel", "_backward_input_and_weights_kernel"], counter.names
        counter.names.clear()
        with use_variant("lora_linear", "default"):
            lora_linear(*inputs, 0.5)
        assert counter.names == ["_bottleneck_forward_kernel"]


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
def test_autocast(dtype, monkeypatch):
    # fp32 storage, fp16 (bf16 on CUDA) dots: y in that dtype as F.linear gives it, each gradient
    # in its input's dtype.
    inputs = make_inputs((2, 13, 48), 144, 8, torch.float32)
    with poisoned_outputs(monkeypatch), torch.autocast(DEVICE, dtype=dtype), \
            LaunchCounter().patch(monkeypatch) as launches:
        y, grads, grad_out = run(inputs, 1.0)
        eager = reference.lora_linear(*inputs, 1.0)
    assert kernels_ran(launches.names)
    assert y.dtype == eager.dtype == dtype
    ref_y, ref_grads = float64_reference(inputs, 1.0, grad_out)
    assert relative_error(y, ref_y) <= TOLERANCE[dtype]
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert relative_error(grad, ref_grads[name]) <= TOLERANCE[dtype], name


@pytest.mark.skipif(DEVICE == "cpu" and not is_interpreted(), reason="counts Triton launches")
def test_unsupported_calls_take_the_default_form(monkeypatch):
    # The single launch takes ranks up to 64 and tensor-core dots: fp32 without tf32 and rank 65
    # run the default form (the bottleneck kernel for the branch), with the same result.
    with LaunchCounter().patch(monkeypatch) as counter:
        for rank, tf32 in ((8, False), (65, True)):
            inputs = make_inputs((9, 32), 48, rank, torch.float32)
            counter.names.clear()
            with allow_tf32(tf32):
                check(inputs, 0.5, FP32_TOLERANCE)
            assert "_lora_linear_kernel" not in counter.names and "_bottleneck_forward_kernel" in counter.names
    assert lora_plan.single_launch_supported(65, torch.float16) == "rank 65 > 64"
    with allow_tf32(False):
        assert "tf32" in lora_plan.single_launch_supported(8, torch.float32)


def test_no_grad_saves_nothing_and_empty_rows():
    inputs = [t.detach() if t is not None else None for t in make_inputs((0, 32), 48, 4, torch.float16)]
    with use_variant("lora_linear", SINGLE):
        assert lora_linear(*inputs, 0.5).shape == (0, 48)
    inputs = make_inputs((6, 32), 48, 4, torch.float16)
    with torch.no_grad(), use_variant("lora_linear", SINGLE):
        y = lora_linear(*inputs, 0.5)
    assert y.grad_fn is None and torch.isfinite(y).all()


def test_bad_arguments_are_named():
    x, weight, b, lora_a, lora_b = make_inputs((4, 16), 32, 4, torch.float32)
    cases = [
        (dict(weight=weight[:, :8]), ValueError, "weight must have shape"),
        (dict(bias=b[:5]), ValueError, "bias must have shape"),
        (dict(lora_a=lora_a[:, :8]), ValueError, "lora_a must have shape"),
        (dict(lora_b=lora_b[:, :3]), ValueError, "lora_b must have shape"),
        (dict(lora_b=lora_b[:16]), ValueError, "lora_b must have shape"),
        (dict(scale="2"), TypeError, "scale must be a float"),
        (dict(weight=weight.half()), TypeError, "weight has dtype"),
        (dict(x=x.long()), TypeError, "x must be a floating-point tensor"),
        (dict(lora_a=torch.zeros(0, 16), lora_b=torch.zeros(32, 0)), ValueError, "lora_a has rank 0"),
    ]
    for overrides, error, message in cases:
        arguments = dict(x=x, weight=weight, bias=b, lora_a=lora_a, lora_b=lora_b, scale=0.5)
        arguments.update(overrides)
        with pytest.raises(error, match=message):
            lora_linear(*arguments.values())


@pytest.mark.parametrize("form", ["default", SINGLE])
def test_double_backward_names_lora_linear(form):
    # Each op names itself: the default form's branch is a bottleneck op inside lora_linear.
    inputs = make_inputs((5, 16), 24, 4, torch.float32)
    with use_variant("lora_linear", form):
        y = lora_linear(*inputs, 0.5)
    with pytest.raises(RuntimeError, match="lora_linear does not support double backward") as raised:
        torch.autograd.grad(y.sum(), [inputs[0]], create_graph=True)
    assert "bottleneck_adapter" not in str(raised.value)


def test_rank_past_the_kernels_limit_runs_the_reference(monkeypatch):
    # One rule for every op and backend (kernels/paths.py): rank 300 runs the reference, in
    # either form (the kernels' paths used to raise), with the reference's answer.
    inputs = make_inputs((4, 16), 32, 300, torch.float32)
    for form in ("default", SINGLE):
        with LaunchCounter().patch(monkeypatch) as launches, use_variant("lora_linear", form):
            y = lora_linear(*inputs, 0.5)
        assert launches.names == []
        torch.testing.assert_close(y, reference.lora_linear(*inputs, 0.5))


@pytest.mark.slow
def test_single_launch_bytes_against_the_default_form():
    # ViT-B qkv, fp16, M = 394 on a 132-SM plan: the single launch reads x and W once, writes y
    # once (no [M, D_out] base output written and read back): within 5% of the floor, and below
    # the default form's count (F.linear plus the branch launch).
    pytest.importorskip("numpy")
    if not is_interpreted():
        pytest.skip("counts bytes in Triton's interpreter")
    from fused_adapters.tools.byte_count import count_bytes

    rows, dim, dim_out, rank = 394, 768, 2304, 8
    inputs = [t.detach() for t in make_inputs((rows, dim), dim_out, rank, torch.float16)]
    item = 2
    floor = (rows * dim + rows * dim_out + dim_out * dim) * item  # read x, W; write y
    totals = {}
    for variant in ("default", SINGLE):
        with count_bytes(132) as report, use_variant("lora_linear", variant):
            lora_linear(*inputs, 0.5)
        totals[variant] = report.total()
    assert totals[SINGLE] <= 1.05 * floor, (totals, floor)
    assert totals[SINGLE] < 0.75 * totals["default"], totals


@pytest.mark.slow
def test_torch_compile_fullgraph(monkeypatch):
    # The single launch is one graph node forward and one backward: a fullgraph compile traces
    # it (the fake implementations give the shapes) and computes what the eager call does.
    torch._dynamo.reset()
    inputs = make_inputs((2, 9, 32), 96, 8, torch.float16)

    def linear(*args):
        return lora_linear(*args, 0.5)

    with use_variant("lora_linear", SINGLE), LaunchCounter().patch(monkeypatch) as launches:
        compiled = torch.compile(linear, fullgraph=True)
        y = compiled(*inputs)
        grads = torch.autograd.grad(y.float().sum(), [inputs[0], inputs[3], inputs[4]])
        eager = linear(*inputs)
        eager_grads = torch.autograd.grad(eager.float().sum(), [inputs[0], inputs[3], inputs[4]])
    assert relative_error(y, eager) <= TOLERANCE[torch.float16]
    for grad, eager_grad in zip(grads, eager_grads):
        assert relative_error(grad, eager_grad) <= TOLERANCE[torch.float16]
    if DEVICE == "cuda" or is_interpreted():
        assert launches.names.count("_lora_linear_kernel") == 4  # forward and dx's launch, twice


def test_expanded_output_gradient(monkeypatch):
    # y.sum().backward() hands the backward a dy expanded from one element (strides 0, 0, 0):
    # the launches read it through its strides, with the unaligned tiles.
    inputs = make_inputs((3, 7, 32), 80, 8, torch.float16)
    seen = []

    def record(grad):
        seen.append(grad.stride())

    with poisoned_outputs(monkeypatch), use_variant("lora_linear", SINGLE), \
            LaunchCounter().patch(monkeypatch) as launches:
        y = lora_linear(*inputs, 0.5)
        y.register_hook(record)
        grads = torch.autograd.grad(y.sum(), [inputs[0], inputs[3], inputs[4]])
    assert seen == [(0, 0, 0)] and kernels_ran(launches.names)
    _, ref_grads = float64_reference(inputs, 0.5, torch.ones(y.shape, dtype=torch.float64))
    for grad, name in zip(grads, ("x", "lora_a", "lora_b")):
        assert relative_error(grad, ref_grads[name]) <= TOLERANCE[torch.float16], name
