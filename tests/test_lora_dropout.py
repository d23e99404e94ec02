"""LoRA's dropout inside the fused LoRA linear, both forms: y = x W^T + b + s (dropout(x) A^T) B^T
with the base GEMM reading x undropped. Output and every gradient against the float64 reference
evaluated with the same seed (odd widths, 3-D x, fp16, fp16 autocast), the forms agreeing, seeds,
p = 0, the keep rate, dropped elements' gradients, launch counts, what is saved, and errors."""

import math

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from fused_adapters.kernels import lora_linear, reference, use_variant
from fused_adapters.kernels.lora import configs as lora_configs
from fused_adapters.kernels.lora import plan as lora_plan
from fused_adapters.kernels.paths import is_interpreted
from helpers import DEVICE, TOLERANCE, LaunchCounter, allow_tf32, force_reference, poisoned_outputs, relative_error

FORMS = ("default", "single_launch")
NAMES = ("x", "weight", "bias", "lora_a", "lora_b")
# fp32 runs the single launch with tf32 dots: exact in the interpreter, about 1e-3 on a GPU.
FP32_TOLERANCE = TOLERANCE[torch.float32] if is_interpreted() else 5e-3
KERNELS_RUN = DEVICE == "cuda" or is_interpreted()
FIRST_LAUNCH = {"default": "_bottleneck_forward_kernel", "single_launch": "_lora_linear_kernel"}


def make_inputs(shape, dim_out, rank, dtype, *, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    dim = shape[-1]

    def randn(*size, std=1.0, dt=dtype):
        return (torch.randn(*size, generator=generator) * std).to(DEVICE, dt)

    x = randn(*shape).requires_grad_()
    weight = randn(dim_out, dim, std=dim ** -0.5)
    b = randn(dim_out, std=0.1) if bias else None
    lora_a = randn(rank, dim, std=dim ** -0.5).requires_grad_()
    lora_b = randn(dim_out, rank, std=0.5).requires_grad_()  # B != 0: a zero B would hide the branch
    return x, weight, b, lora_a, lora_b


def seed_of(value):
    return torch.tensor(value, dtype=torch.int64, device=DEVICE)


def run(inputs, scale, form, dropout, seed, grad_seed=1):
    """y and the gradients of x, lora_a and lora_b under the form, with the output gradient used."""
    with use_variant("lora_linear", form):
        y = lora_linear(*inputs, scale, dropout=dropout, seed=seed)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    names = [n for n, t in zip(NAMES, inputs) if t is not None and t.requires_grad]
    return y, dict(zip(names, torch.autograd.grad(y, wanted, grad_out))), grad_out


def reference_run(inputs, scale, dropout, seed, grad_out, dtype=torch.float64):
    """reference.lora_linear on copies in `dtype` (under the ambient autocast), with its gradients."""
    copies = [None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad) for t in inputs]
    y = reference.lora_linear(*copies, scale, dropout=dropout, seed=seed)
    wanted = [t for t in copies if t is not None and t.requires_grad]
    names = [n for n, t in zip(NAMES, copies) if t is not None and t.requires_grad]
    return y, dict(zip(names, torch.autograd.grad(y, wanted, grad_out.to(y.dtype))))


def check(inputs, scale, form, dropout, seed, tolerance):
    y, grads, grad_out = run(inputs, scale, form, dropout, seed)
    ref_y, ref_grads = reference_run(inputs, scale, dropout, seed, grad_out)
    errors = {"y": relative_error(y, ref_y)}
    for name, grad in grads.items():
        tensor = inputs[NAMES.index(name)]
        assert grad.shape == tensor.shape and grad.dtype == tensor.dtype, name
        errors["d" + name] = relative_error(grad, ref_grads[name])
    assert all(error <= tolerance for error in errors.values()), errors
    return y, grads


SHAPES = [
    ((2, 9, 24), 72, 4),  # 3-D x, qkv: D -> 3D
    ((31, 70), 129, 17),  # odd widths, rank pads to 32
    ((23, 45), 33, 3),  # odd everything
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, dim_out, rank", SHAPES)
def test_forward_and_gradients_match_float64_reference(shape, dim_out, rank, dtype, form, monkeypatch):
    inputs = make_inputs(shape, dim_out, rank, dtype, bias=rank % 2 == 0)
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else TOLERANCE[dtype]
    with poisoned_outputs(monkeypatch), allow_tf32(True), LaunchCounter().patch(monkeypatch) as launches:
        y, _ = check(inputs, 0.75, form, 0.3, seed_of(1234), tolerance)
    assert y.shape == (*shape[:-1], dim_out) and y.dtype == dtype
    if KERNELS_RUN:  # the form's kernels ran, not the reference
        assert launches.names[0] == FIRST_LAUNCH[form], launches.names


@pytest.mark.parametrize("form", FORMS)
def test_fp16_autocast_matches_reference_under_autocast(form, monkeypatch):
    # fp32 storage, fp16 dots: dropout in x's dtype (fp32), then the cast, as PEFT under autocast.
    inputs = make_inputs((2, 13, 48), 144, 8, torch.float32)
    seed = seed_of(77)
    with poisoned_outputs(monkeypatch), torch.autocast(DEVICE, dtype=torch.float16), \
            LaunchCounter().patch(monkeypatch) as launches:
        y, grads, grad_out = run(inputs, 1.0, form, 0.25, seed)
        eager_y, eager_grads = reference_run(inputs, 1.0, 0.25, seed, grad_out, torch.float32)
    if KERNELS_RUN:
        assert launches.names[0] == FIRST_LAUNCH[form], launches.names
    assert y.dtype == eager_y.dtype == torch.float16
    assert relative_error(y, eager_y) <= TOLERANCE[torch.float16]
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        assert relative_error(grad, eager_grads[name]) <= TOLERANCE[torch.float16], name


def test_forms_agree_for_the_same_seed(monkeypatch):
    inputs = make_inputs((3, 11, 32), 96, 8, torch.float32)
    with allow_tf32(True), LaunchCounter().patch(monkeypatch) as launches:
        y_default, grads_default, _ = run(inputs, 0.5, "default", 0.4, seed_of(5))
        y_single, grads_single, _ = run(inputs, 0.5, "single_launch", 0.4, seed_of(5))
    if KERNELS_RUN:
        assert "_lora_linear_kernel" in launches.names
    assert relative_error(y_single, y_default) <= FP32_TOLERANCE
    for name in grads_default:
        assert relative_error(grads_single[name], grads_default[name]) <= FP32_TOLERANCE, name
    # Each form's output differs from the undropped one: the mask was applied in both.
    plain = run(inputs, 0.5, "default", 0.0, None)[0]
    assert relative_error(y_default, plain) > 1e-3 and relative_error(y_single, plain) > 1e-3


@pytest.mark.parametrize("form", FORMS)
def test_seeds_repeat_and_differ(form):
    inputs = [t.detach() if t is not None else None for t in make_inputs((17, 40), 24, 4, torch.float16)]

    def call(seed):
        with use_variant("lora_linear", form):
            return lora_linear(*inputs, 0.5, dropout=0.5, seed=seed)

    assert torch.equal(call(7), call(7))
    assert torch.equal(call(7), call(seed_of(7)))
    assert not torch.equal(call(7), call(8))
    # None draws a fresh seed from torch's generator: torch.manual_seed repeats it.
    assert not torch.equal(call(None), call(None))
    torch.manual_seed(3)
    first = call(None)
    torch.manual_seed(3)
    assert torch.equal(first, call(None))


@pytest.mark.parametrize("form", FORMS)
def test_zero_rate_is_todays_op_and_draws_nothing(form):
    inputs = make_inputs((2, 7, 32), 48, 4, torch.float16)
    with use_variant("lora_linear", form):
        plain = lora_linear(*inputs, 0.5)
        grads = torch.autograd.grad(plain, [inputs[0], inputs[3], inputs[4]], torch.ones_like(plain))
        state = torch.random.get_rng_state()
        y = lora_linear(*inputs, 0.5, dropout=0.0)
        assert torch.equal(torch.random.get_rng_state(), state)
        zero_grads = torch.autograd.grad(y, [inputs[0], inputs[3], inputs[4]], torch.ones_like(y))
    assert torch.equal(y, plain)
    assert all(torch.equal(a, b) for a, b in zip(grads, zero_grads))


def _branch_mask(form, rows, dim, p, seed):
    """The keep mask the form applied, read back from dx with W = 0: dx = (g A) * keep, which is
    exactly 0 where an element was dropped (g A is nonzero elsewhere)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=generator).to(DEVICE, torch.float16).requires_grad_()
    weight = torch.zeros(16, dim, dtype=torch.float16, device=DEVICE)
    lora_a = (torch.randn(4, dim, generator=generator) * dim ** -0.5).to(DEVICE, torch.float16)
    lora_b = torch.randn(16, 4, generator=generator).to(DEVICE, torch.float16)
    with use_variant("lora_linear", form):
        y = lora_linear(x, weight, None, lora_a, lora_b, 1.0, dropout=p, seed=seed)
    (grad_x,) = torch.autograd.grad(y, [x], torch.randn(y.shape, generator=generator).to(y))
    return grad_x != 0


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_keep_rate_within_four_sigma(form):
    # 320 x 320 = 102,400 elements: the kept count is Binomial(n, 1 - p), the mask is
    # reference.dropout_factor's for element (row, feature).
    rows, dim, p = 320, 320, 0.3
    seed = seed_of(2024)
    kept = _branch_mask(form, rows, dim, p, seed)
    n = kept.numel()
    assert abs(kept.sum().item() - n * (1 - p)) <= 4 * math.sqrt(n * p * (1 - p))
    expected = reference.dropout_factor(seed, rows, dim, reference.INPUT_STREAM, p) != 0
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("form", FORMS)
def test_mask_is_the_reference_stream(form):
    # The small form of the keep-rate test: the mask element (row, feature) is the stream's.
    seed = seed_of(99)
    kept = _branch_mask(form, 37, 48, 0.5, seed)
    assert torch.equal(kept, reference.dropout_factor(seed, 37, 48, reference.INPUT_STREAM, 0.5) != 0)


@pytest.mark.parametrize("form", FORMS)
def test_dropped_elements_get_only_the_base_gradient(form):
    inputs = make_inputs((29, 40), 56, 8, torch.float32)
    seed = seed_of(31)
    with allow_tf32(True):
        y, grads, grad_out = run(inputs, 0.5, form, 0.5, seed)
    dropped = reference.dropout_factor(seed, 29, 40, reference.INPUT_STREAM, 0.5) == 0
    assert 0 < dropped.sum() < dropped.numel()
    base = grad_out.double() @ inputs[1].double()
    grad_x = grads["x"].double()
    assert relative_error(grad_x[dropped], base[dropped]) <= FP32_TOLERANCE
    # Kept elements get the branch term as well.
    assert relative_error(grad_x[~dropped], base[~dropped]) > 1e-2


@pytest.mark.skipif(not KERNELS_RUN, reason="counts Triton launches")
@pytest.mark.parametrize("form", FORMS)
def test_launch_counts_and_saved_tensors_unchanged(form, monkeypatch):
    inputs = make_inputs((2, 17, 32), 96, 8, torch.float16)
    rows, rank = 34, 8

    counter = LaunchCounter()

    def launches_and_saved(dropout):
        saved = []
        counter.names = []
        with use_variant("lora_linear", form):
            with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                y = lora_linear(*inputs, 0.5, dropout=dropout, seed=3 if dropout else None)
            forward, counter.names = counter.names, []
            torch.autograd.grad(y, [inputs[0], inputs[3], inputs[4]], torch.ones_like(y))
        return forward, counter.names, saved

    with counter.patch(monkeypatch):
        plain_forward, plain_backward, plain_saved = launches_and_saved(0.0)
        forward, backward, saved = launches_and_saved(0.2)
    assert forward == plain_forward and backward == plain_backward
    if form == "single_launch":
        assert forward == ["_lora_linear_kernel"]
        assert backward == ["_lora_linear_kernel", "_backward_input_and_weights_kernel"]
    # The same tensors as without dropout (x by reference, the weights, h [M, r]), plus the 8-byte seed.
    shapes = sorted(tuple(t.shape) for t in plain_saved)
    assert sorted(tuple(t.shape) for t in saved) == sorted(shapes + [()])
    assert (rows, rank) in shapes
    (seed,) = [t for t in saved if t.dim() == 0]
    assert seed.dtype == torch.int64


def test_masked_backward_input_launch_takes_smaller_tiles():
    # The backward's input launch draws the mask over its output tile: it takes no tile above
    # MAX_MASKED_OUTPUT_TILE (128 x 128 spills there); the forward and the launch without
    # dropout keep the whole table. ViT-B qkv, M = 3152, fp16, 132 SMs.
    rows, dim, dim_out, rank = 3152, 768, 2304, 16
    x = torch.empty(rows, dim, dtype=torch.float16)
    weight = torch.empty(dim_out, dim, dtype=torch.float16)
    lora_a, lora_b = torch.empty(rank, dim, dtype=torch.float16), torch.empty(dim_out, rank, dtype=torch.float16)
    seed = seed_of(0).cpu()
    sizes = {}
    for dropout in (0.0, 0.1):
        forward = lora_plan.forward(x, weight, None, lora_a, lora_b, 0.5, torch.float16, True, sms=132,
                                    dropout=dropout, seed=seed if dropout else None).launches["forward"]
        backward = lora_plan.backward(torch.empty(rows, dim_out, dtype=torch.float16), x,
                                      torch.empty(rows, rank, dtype=torch.float16), weight, lora_a, lora_b, 0.5,
                                      torch.float16, True, torch.float16, sms=132, dropout=dropout,
                                      seed=seed if dropout else None).launches["backward_input"]
        sizes[dropout] = [(launch.config.block_rows, launch.config.block_dim) for launch in (forward, backward)]
        assert forward.constexprs["DROP_DOWN_INPUT"] == (dropout > 0) and not forward.constexprs["DROP_UP_OUTPUT"]
        assert backward.constexprs["DROP_UP_OUTPUT"] == (dropout > 0) and not backward.constexprs["DROP_DOWN_INPUT"]
    assert sizes[0.0] == [(128, 128), (128, 128)]
    assert sizes[0.1] == [(128, 128), (128, 64)]
    assert lora_configs.MAX_MASKED_OUTPUT_TILE == 128 * 64


@pytest.mark.parametrize("form", FORMS)
def test_reference_path_equals_kernels(form, monkeypatch):
    # CPU without the interpreter (and float64 anywhere) runs the reference in the form's op:
    # the same mask and math.
    inputs = make_inputs((21, 32), 40, 4, torch.float32)
    seed = seed_of(8)
    with allow_tf32(True):
        y, grads, _ = run(inputs, 0.5, form, 0.3, seed)
        force_reference(monkeypatch)
        ref_y, ref_grads, _ = run(inputs, 0.5, form, 0.3, seed)
    assert relative_error(y, ref_y) <= FP32_TOLERANCE
    for name in grads:
        assert relative_error(grads[name], ref_grads[name]) <= FP32_TOLERANCE, name
    inputs64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    y64, grads64, grad_out = run(inputs64, 0.5, form, 0.3, seed)
    want_y, want_grads = reference_run(inputs64, 0.5, 0.3, seed, grad_out)
    torch.testing.assert_close(y64, want_y)
    for name in grads64:
        torch.testing.assert_close(grads64[name], want_grads[name])


@pytest.mark.parametrize("value", [-0.1, 1.0, "0.1", True, None])
def test_bad_rates_name_the_argument(value):
    inputs = make_inputs((5, 8), 12, 2, torch.float32)
    with pytest.raises(ValueError, match="dropout must be a probability"):
        lora_linear(*inputs, 0.5, dropout=value)


@pytest.mark.parametrize("seed", [1.5, torch.tensor([1, 2]), torch.tensor(1.0)])
def test_bad_seeds_name_the_argument(seed):
    inputs = make_inputs((5, 8), 12, 2, torch.float32)
    with pytest.raises(ValueError, match="seed must be"):
        lora_linear(*inputs, 0.5, dropout=0.1, seed=seed)


@pytest.mark.slow
def test_compile_fullgraph_with_dropout(monkeypatch):
    # The seed tensor is one more input of the single launch's ops: a fullgraph compile computes
    # what the eager call does for the same seed.
    torch._dynamo.reset()
    inputs = make_inputs((2, 9, 32), 96, 8, torch.float16)
    seed = seed_of(21)

    def linear(*args):
        return lora_linear(*args, 0.5, dropout=0.2, seed=seed)

    with use_variant("lora_linear", "single_launch"):
        compiled = torch.compile(linear, fullgraph=True)
        y = compiled(*inputs)
        grads = torch.autograd.grad(y.float().sum(), [inputs[0], inputs[3], inputs[4]])
        eager = linear(*inputs)
        eager_grads = torch.autograd.grad(eager.float().sum(), [inputs[0], inputs[3], inputs[4]])
    assert relative_error(y, eager) <= TOLERANCE[torch.float16]
    for grad, eager_grad in zip(grads, eager_grads):
        assert relative_error(grad, eager_grad) <= TOLERANCE[torch.float16]
