"""Dropout inside the bottleneck kernels: the mask stream itself (the same numbers as Triton's
tl.rand, a keep rate of 1 - p), and bottleneck_adapter's hidden and input dropout: the output and
every gradient against the float64 reference evaluated with the kernel's mask, the same mask in
forward and backward, seeds, p = 0, launch counts and what is saved."""

import math

import pytest
import torch
import triton
import triton.language as tl
from torch.autograd.graph import saved_tensors_hooks

from fused_adapters.kernels import bottleneck_adapter, reference
from fused_adapters.kernels.dropout import dropout_factor
from helpers import (
    DEVICE, TOLERANCE, LaunchCounter, check_against_float64, force_reference, make_case, poisoned_outputs,
    relative_error,
)

HIDDEN, INPUT = reference.HIDDEN_STREAM, reference.INPUT_STREAM


@triton.jit
def _uniform_kernel(out_ptr, seed, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    # tl.rand itself, with the 64-bit offset row * 2^32 + col: Philox counter (col, row, 0, 0).
    row_ids = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_ids = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    offsets = (row_ids.to(tl.int64)[:, None] << 32) + col_ids[None, :]
    mask = (row_ids[:, None] < rows) & (col_ids[None, :] < cols)
    tl.store(out_ptr + row_ids[:, None] * cols + col_ids[None, :], tl.rand(seed, offsets), mask=mask)


@triton.jit
def _factor_kernel(out_ptr, seed_ptr, rows, cols, p, keep, STREAM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                   BLOCK_COLS: tl.constexpr):
    row_ids = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_ids = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (row_ids[:, None] < rows) & (col_ids[None, :] < cols)
    factor = dropout_factor(tl.load(seed_ptr), row_ids, col_ids, p, keep, STREAM)
    tl.store(out_ptr + row_ids[:, None] * cols + col_ids[None, :], factor, mask=mask)


def _grid(rows, cols):
    return (triton.cdiv(rows, 32), triton.cdiv(cols, 64))


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 12345, -7, 2**62 - 1])
def test_reference_stream_is_triton_rand(seed):
    # 317 x 331 = 104,927 elements: the torch Philox the reference path uses draws exactly the
    # numbers tl.rand draws for the same seed and counter (row in the high word, column in the low).
    rows, cols = 317, 331
    out = torch.full((rows, cols), float("nan"), device=DEVICE)
    _uniform_kernel[_grid(rows, cols)](out, seed, rows, cols, BLOCK_ROWS=32, BLOCK_COLS=64)
    expected = reference.dropout_uniform(torch.tensor(seed, device=DEVICE), rows, cols, HIDDEN)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("stream", [HIDDEN, INPUT])
def test_kernel_factor_equals_reference_factor(stream):
    rows, cols, p = 129, 77, 0.3
    seed = torch.tensor(987654321987, device=DEVICE)
    out = torch.full((rows, cols), float("nan"), device=DEVICE)
    _factor_kernel[_grid(rows, cols)](out, seed, rows, cols, p, 1 / (1 - p), STREAM=stream, BLOCK_ROWS=32,
                                      BLOCK_COLS=64)
    assert torch.equal(out, reference.dropout_factor(seed, rows, cols, stream, p))
    # The two streams are not the same mask.
    other = reference.dropout_factor(seed, rows, cols, 1 - stream, p)
    assert not torch.equal(out, other)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_within_four_sigma(p):
    rows, cols = 400, 300  # 120,000 elements
    factor = reference.dropout_factor(torch.tensor(42), rows, cols, HIDDEN, p)
    kept = (factor > 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / (rows * cols))
    assert abs(kept - (1 - p)) < 4 * sigma, (kept, 1 - p, sigma)
    assert torch.all((factor == 0) | (factor == torch.tensor(1 / (1 - p), dtype=torch.float32)))


# --------------------------------------------------------------------------------------------
# bottleneck_adapter with dropout
# --------------------------------------------------------------------------------------------


def _identity_case(rows, dim, dtype=torch.float32):
    """y = dropout_h(dropout_x(x) I) I: with w_down = w_up = I and identity activation the output
    is x times both masks, so the kernel's mask can be read off y."""
    x = torch.randn(rows, dim, device=DEVICE, dtype=dtype).abs() + 0.5
    eye = torch.eye(dim, device=DEVICE, dtype=dtype)
    return x, eye


@pytest.mark.parametrize("stream", ["dropout", "input_dropout"])
def test_op_mask_is_the_stream_and_keeps_one_minus_p(stream):
    p, rows, dim = 0.25, 800, 128  # 102,400 elements
    x, eye = _identity_case(rows, dim)
    seed = torch.tensor(2024, device=DEVICE)
    y = bottleneck_adapter(x, eye, None, eye, None, activation="identity", seed=seed, **{stream: p})
    factor = y / x
    expected = reference.dropout_factor(seed, rows, dim, HIDDEN if stream == "dropout" else INPUT, p)
    assert relative_error(factor, expected) < 1e-6
    kept = (factor > 0.5).double().mean().item()
    assert abs(kept - (1 - p)) < 4 * math.sqrt(p * (1 - p) / (rows * dim))


CASES = [
    # (shape, rank, activation, scale, residual, hidden p, input p)
    ((37, 45), 5, "gelu", "channel", "x", 0.3, 0.0),
    ((3, 13, 33), 3, "silu", "float", "other", 0.0, 0.2),
    ((2, 29, 70), 16, "gelu_tanh", "one", None, 0.1, 0.1),
    ((61, 24), 8, "relu", None, "both", 0.5, 0.0),
    ((19, 40), 64, "gelu", "channel", "x", 0.2, 0.3),  # rank > 32: the backward stores the dropped act
]


def _call(case, fn, residual_kind, **dropout):
    def call(op, t):
        residual = {"x": t["x"], "other": t.get("residual"), "both": (t.get("residual"), t["x"]),
                    None: None}[residual_kind]
        return op(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], t.get("scale", case.scale),
                  activation=case.activation, residual=residual, row_scale=case.row_scale, **dropout)
    return call


@pytest.mark.parametrize("shape,rank,activation,scale,residual,hidden_p,input_p", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_gradients_match_float64_reference_with_the_same_mask(
        monkeypatch, shape, rank, activation, scale, residual, hidden_p, input_p, dtype):
    case = make_case(shape, rank=rank, dtype=dtype, activation=activation, scale=scale)
    tensors = dict(x=case.x, w_down=case.w_down, b_down=case.b_down, w_up=case.w_up, b_up=case.b_up)
    if residual in ("other", "both"):
        tensors["residual"] = case.residual
    if isinstance(case.scale, torch.Tensor):
        tensors["scale"] = case.scale
    seed = torch.tensor(77 + rank, device=DEVICE)
    call = _call(case, None, residual, dropout=hidden_p, input_dropout=input_p, seed=seed)
    with poisoned_outputs(monkeypatch):
        check_against_float64(call, bottleneck_adapter, reference.bottleneck_adapter, tensors, TOLERANCE[dtype],
                              grad_tolerance=2 * TOLERANCE[dtype])


@pytest.mark.parametrize("hidden_p,input_p", [(0.3, 0.0), (0.0, 0.3), (0.2, 0.2)])
def test_fp16_autocast_matches_reference_under_autocast(hidden_p, input_p):
    case = make_case((3, 11, 40), rank=6, param_dtype=torch.float32)
    seed = torch.tensor(5, device=DEVICE)
    tensors = [case.x, case.w_down, case.b_down, case.w_up, case.b_up, case.scale, case.residual]

    def run(fn):
        with torch.autocast(DEVICE, dtype=torch.float16):
            y = fn(*tensors[:6], activation="gelu", residual=(tensors[6], tensors[0]), row_scale=case.row_scale,
                   dropout=hidden_p, input_dropout=input_p, seed=seed)
        return y, torch.autograd.grad(y, tensors, torch.ones_like(y))

    y, grads = run(bottleneck_adapter)
    y_ref, grads_ref = run(reference.bottleneck_adapter)
    assert y.dtype == y_ref.dtype == torch.float32
    assert relative_error(y, y_ref) < TOLERANCE[torch.float16]
    for got, want in zip(grads, grads_ref):
        assert got.dtype == want.dtype
        assert relative_error(got, want) < 2 * TOLERANCE[torch.float16]


def test_reference_path_equals_kernels(monkeypatch):
    case = make_case((2, 17, 36), rank=7)
    seed = torch.tensor(31, device=DEVICE)
    inputs = (case.x, case.w_down, case.b_down, case.w_up, case.b_up, case.scale)

    def run():
        y = bottleneck_adapter(*inputs, residual=case.x, dropout=0.3, input_dropout=0.2, seed=seed)
        return (y,) + torch.autograd.grad(y, inputs, torch.ones_like(y))

    kernels = run()
    force_reference(monkeypatch)
    for got, want in zip(run(), kernels):
        assert relative_error(got, want) < TOLERANCE[torch.float32]


def test_dropped_hidden_units_get_no_gradient():
    # One row, so db_down is that row's dh: zero exactly where the forward dropped the unit,
    # and the forward's kept units carry the 1 / (1 - p) of the reference's gradient.
    p, rank, dim = 0.5, 64, 48
    case = make_case((1, dim), rank=rank, activation="gelu", row_scale=False)
    for seed_value in range(3):
        seed = torch.tensor(seed_value, device=DEVICE)
        y = bottleneck_adapter(case.x, case.w_down, case.b_down, case.w_up, case.b_up, case.scale, dropout=p,
                               seed=seed)
        (grad_b_down,) = torch.autograd.grad(y, [case.b_down], torch.ones_like(y))
        keep = reference.dropout_factor(seed, 1, rank, HIDDEN, p)[0]
        assert torch.all(grad_b_down[keep == 0] == 0)
        assert torch.all(grad_b_down[keep > 0] != 0)


def test_dropped_input_elements_get_only_the_residual_gradient():
    p, rows, dim = 0.5, 9, 40
    case = make_case((rows, dim), rank=4, row_scale=False)
    seed = torch.tensor(3, device=DEVICE)
    y = bottleneck_adapter(case.x, case.w_down, case.b_down, case.w_up, case.b_up, case.scale, residual=case.x,
                           input_dropout=p, seed=seed)
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, [case.x], grad_y)
    keep = reference.dropout_factor(seed, rows, dim, INPUT, p)
    assert torch.equal(grad_x[keep == 0], grad_y[keep == 0])  # the residual's dy, nothing through the branch
    assert not torch.allclose(grad_x[keep > 0], grad_y[keep > 0])


def test_seeds_repeat_and_differ():
    case = make_case((23, 32), rank=4)
    args = (case.x, case.w_down, case.b_down, case.w_up, case.b_up, case.scale)
    same = [bottleneck_adapter(*args, dropout=0.4, seed=11) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    assert torch.equal(same[0], bottleneck_adapter(*args, dropout=0.4, seed=torch.tensor(11, device=DEVICE)))
    assert not torch.equal(same[0], bottleneck_adapter(*args, dropout=0.4, seed=12))
    # seed=None draws a new seed from torch's generator: calls differ, and manual_seed repeats them.
    torch.manual_seed(0)
    first = [bottleneck_adapter(*args, dropout=0.4) for _ in range(2)]
    torch.manual_seed(0)
    again = bottleneck_adapter(*args, dropout=0.4)
    assert not torch.equal(first[0], first[1])
    assert torch.equal(first[0], again)


def test_zero_rate_is_todays_op_and_draws_nothing():
    case = make_case((23, 32), rank=4)
    args = (case.x, case.w_down, case.b_down, case.w_up, case.b_up, case.scale)
    plain = bottleneck_adapter(*args, residual=case.x)
    state = torch.random.get_rng_state()
    assert torch.equal(bottleneck_adapter(*args, residual=case.x, dropout=0.0, input_dropout=0.0), plain)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_launch_counts_and_saved_tensors_unchanged(monkeypatch):
    rows, dim, rank = 57, 40, 6
    case = make_case((rows, dim), rank=rank)
    args = (case.x, case.w_down, case.b_down, case.w_up, case.b_up, case.scale)
    launches = LaunchCounter()
    saved = []
    with launches.patch(monkeypatch):
        with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = bottleneck_adapter(*args, residual=case.x, dropout=0.2, input_dropout=0.1)
        forward, launches.names = launches.names, []
        torch.autograd.grad(y, args, torch.ones_like(y))
    if DEVICE == "cpu" and not launches.names and not forward:
        pytest.skip("kernels not available here")
    assert forward == ["_bottleneck_forward_kernel"]
    assert launches.names == ["_backward_hidden_kernel", "_backward_input_and_weights_kernel"]
    # x by reference, the parameters, the M x r pre-activation and the 8-byte seed: no mask.
    params = {t.untyped_storage().data_ptr() for t in args}
    others = [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in params
              and t is not case.row_scale]
    assert sorted(others) == sorted([(), (rows, rank)]), others
    seed = [t for t in saved if t.dim() == 0]
    assert seed[0].dtype == torch.int64


@pytest.mark.parametrize("name", ["dropout", "input_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, "0.1", True])
def test_bad_rates_name_the_argument(name, value):
    case = make_case((5, 8), rank=2)
    with pytest.raises(ValueError, match=name):
        bottleneck_adapter(case.x, case.w_down, case.b_down, case.w_up, case.b_up, **{name: value})


@pytest.mark.parametrize("seed", [0.5, torch.tensor([1, 2]), torch.tensor(1, dtype=torch.int32), "7"])
def test_bad_seeds_name_the_argument(seed):
    case = make_case((5, 8), rank=2)
    with pytest.raises(ValueError, match="seed"):
        bottleneck_adapter(case.x, case.w_down, case.b_down, case.w_up, case.b_up, dropout=0.1, seed=seed)


@pytest.mark.slow
def test_compile_fullgraph_with_dropout():
    # The seed is drawn by a random op inside the graph (no host sync, no graph break).
    torch._dynamo.reset()
    case = make_case((2, 9, 24), rank=4)

    def block(x, w_down, b_down, w_up, b_up, scale):
        return bottleneck_adapter(x, w_down, b_down, w_up, b_up, scale, residual=x, dropout=0.1, input_dropout=0.1)

    args = (case.x, case.w_down, case.b_down, case.w_up, case.b_up, case.scale)
    out = torch.compile(block, fullgraph=True)(*args)
    grads = torch.autograd.grad(out.sum(), args)
    assert all(torch.isfinite(g).all() for g in grads)
    assert out.shape == case.x.shape


# --------------------------------------------------------------------------------------------
# The adapter modules: dropout inside the fused path in training, the same masks on the
# reference path (fused=False) from the same random state, none in eval
# --------------------------------------------------------------------------------------------


def _vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=32).to(DEVICE)


def _randomize(model):
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter) * 0.2)


def _set_fused(model, fused):
    for module in model.modules():
        if hasattr(module, "fused") and hasattr(module, "dropout"):
            module.fused = fused


def _fused_and_reference(model, run):
    torch.manual_seed(7)
    fused = run()
    _set_fused(model, False)
    torch.manual_seed(7)
    unfused = run()
    torch.manual_seed(8)
    other = run()
    _set_fused(model, True)
    return fused, unfused, other


def test_mixture_adapter_dropout_inside_the_kernel(monkeypatch):
    from fused_adapters.adapters import AdapterConfig, inject

    model = inject(_vit(), AdapterConfig(experts=4, top_k=2, dropout=0.3, drop_path=0.0), verbose=False)
    _randomize(model)
    model.train()
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    with LaunchCounter().patch(monkeypatch) as launches, torch.no_grad():
        fused, unfused, other = _fused_and_reference(model, lambda: model(images))
    assert launches.names.count("_sparse_forward_kernel") == len(model.blocks)
    assert relative_error(fused, unfused) < 1e-5
    assert relative_error(fused, other) > 1e-4
    with torch.no_grad():
        evaluated = model.eval()(images)
        assert torch.equal(evaluated, model(images))  # eval: no dropout, no randomness


def test_task_routing_of_bottleneck_adapters_with_dropout(monkeypatch):
    from fused_adapters.adapters import AdapterConfig, inject, task_routing

    model = _vit()
    for name in ("cars", "birds"):
        inject(model, AdapterConfig(dropout=0.2, drop_path=0.0), name=name, verbose=False)
    _randomize(model)
    model.train()
    images = torch.randn(3, 3, 32, 32, device=DEVICE)
    with torch.no_grad(), task_routing(model, ["cars", "birds", "cars"]):
        with LaunchCounter().patch(monkeypatch) as launches:
            fused, unfused, other = _fused_and_reference(model, lambda: model(images))
    assert launches.names.count("_sparse_forward_kernel") == len(model.blocks)
    assert relative_error(fused, unfused) < 1e-5
    assert relative_error(fused, other) > 1e-4
    # One routed launch has one rate: adapters of other rates are not routed together.
    inject(model, AdapterConfig(dropout=0.1, drop_path=0.0), name="dogs", verbose=False)
    with pytest.raises(ValueError, match="dropout"):
        with task_routing(model, ["cars", "dogs", "cars"]):
            model(images)
