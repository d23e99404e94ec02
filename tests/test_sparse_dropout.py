"""Dropout inside the sparse mixture's kernels (sparse_adapter and routed_adapter, the dense-masked
and the grouped design): the output and every gradient against the float64 reference drawing the
same mask (expert e's rank j of row m is the hidden stream's element (m, e * r + j)), fp16 and fp16
autocast, both designs dropping the same units, seeds, p = 0, dropped units' gradients, launch
counts and what is saved for backward, the reference path, bad rates. The same for input_dropout
(x as the down projections read it; the gate and a residual x read x), whose reference is the
reference mixture on the input stream's dropout(x)."""

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from fused_adapters.kernels import reference, routed_adapter, sparse_adapter
from fused_adapters.kernels.sparse.op import routed_adapter_unchecked
from helpers import (
    DEVICE, TOLERANCE, LaunchCounter, check_against_float64, force_reference, poisoned_outputs, relative_error,
)
from test_sparse_kernel import PARAMS, call, check, float64, make

HIDDEN, INPUT = reference.HIDDEN_STREAM, reference.INPUT_STREAM

# The dense design (its default and its stored-act variant) and the grouped design.
DESIGNS = ["default", "store_act", "grouped"]


def fast_only(*fast):
    """Parameter sets, slow except those in `fast` (fast mode keeps one of each kind)."""
    def mark(*values):
        return values if values in fast else pytest.param(*values, marks=pytest.mark.slow)
    return mark


def seed_of(value: int) -> torch.Tensor:
    return torch.tensor(value, device=DEVICE)


def run(fn, case, *, routed, top_k=2, **options):
    """y and the gradients of every differentiable input for a fixed output gradient."""
    out, inputs = call(fn, case, routed=routed, top_k=top_k, **options)
    y = out if routed else out[0]
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
    return (y, *torch.autograd.grad(y, list(inputs.values()), grad_y))


# The reference mixture's input dropout: the experts' down projections read dropout(x) in the
# compute dtype, the gate and the residual terms x itself.
routed_reference = reference.routed_adapter
gated_reference = reference.sparse_adapter


def check_input_dropout(case, dtype, *, routed, top_k=2, variant="default", **options):
    """check() with input dropout: the fused op against the composed float64 reference."""
    out, inputs = call(routed_adapter if routed else sparse_adapter, case, routed=routed, top_k=top_k,
                       variant=variant, **options)
    wide = float64(case)
    expected, wide_inputs = call(routed_reference if routed else gated_reference, wide, routed=routed, top_k=top_k,
                                 **options)
    outs, refs = ([out], [expected]) if routed else (list(out), list(expected))
    grads_out = [torch.randn(o.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE) for o in refs]
    for o, r in zip(outs, refs):
        assert relative_error(o, r) <= TOLERANCE[dtype]
    got = torch.autograd.grad(outs, list(inputs.values()), [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    want = torch.autograd.grad(refs, list(wide_inputs.values()), [g.double() for g in grads_out])
    for name, g, w in zip(inputs, got, want):
        assert g.dtype == inputs[name].dtype, name
        assert relative_error(g, w) <= 2 * TOLERANCE[dtype], (name, relative_error(g, w))


# --------------------------------------------------------------------------------------------
# Numerics: the float64 reference with the same mask
# --------------------------------------------------------------------------------------------


_GATED = fast_only(("default", torch.float16), ("store_act", torch.float32), ("grouped", torch.float32))


@pytest.mark.parametrize("design, dtype", [_GATED(d, t) for d in DESIGNS for t in (torch.float32, torch.float16)])
def test_gated_against_float64(design, dtype, monkeypatch):
    # Odd D and r; k = 2 of 5 experts, a bias everywhere, channel scale, residual, row scale.
    case = make(37, 45, 3, 5, dtype, seed=5)
    with poisoned_outputs(monkeypatch):
        check(case, dtype, routed=False, top_k=2, variant=design, dropout=0.3, seed=seed_of(101))


_ROUTED = fast_only(("default", torch.float32), ("grouped", torch.float16))


@pytest.mark.parametrize("design, dtype", [_ROUTED(d, t) for d in DESIGNS for t in (torch.float32, torch.float16)])
def test_routed_against_float64(design, dtype, monkeypatch):
    # k = 3 of 6 experts, row 0 naming one expert twice (both slots draw that expert's columns).
    case = make(41, 36, 5, 6, dtype, seed=9, top_k=3)
    with poisoned_outputs(monkeypatch):
        check(case, dtype, routed=True, variant=design, dropout=0.25, seed=seed_of(202), residual="x")


@pytest.mark.parametrize("design", ["default", "grouped"])
def test_multi_lora_form_against_float64(design, monkeypatch):
    # The multi-LoRA shape: one task per row (k = 1, weight 1), identity activation, no biases, a
    # width-changing up projection (D -> 3 D, as LoRA on qkv) and the base output as residual.
    rows, dim, rank, tasks = 30, 20, 4, 3
    generator = torch.Generator().manual_seed(8)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(DEVICE).requires_grad_()

    tensors = dict(x=randn(rows, dim), w_down=randn(tasks, rank, dim, std=dim ** -0.5),
                   w_up=randn(tasks, 3 * dim, rank, std=rank ** -0.5), residual=randn(rows, 3 * dim),
                   task=torch.randint(0, tasks, (rows, 1), generator=generator).to(DEVICE))
    seed = seed_of(7)

    def lora(fn, t):
        kwargs = dict(variant=design) if fn is routed_adapter else {}
        return fn(t["x"], t["task"], torch.ones(rows, 1, dtype=t["x"].dtype, device=DEVICE), t["w_down"], None,
                  t["w_up"], None, 0.5, activation="identity", residual=t["residual"], dropout=0.1, seed=seed,
                  **kwargs)

    with poisoned_outputs(monkeypatch):
        check_against_float64(lora, routed_adapter, reference.routed_adapter, tensors, TOLERANCE[torch.float32],
                              grad_tolerance=2 * TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float16, marks=pytest.mark.slow)])
def test_grouped_split_rank_blocks_against_float64(dtype, monkeypatch):
    # Rank 100: E*r = 300 runs the grouped design, whose weights launch splits the rank in two
    # blocks; each block draws its own ranks' columns of the mask.
    case = make(40, 24, 100, 3, dtype, seed=5)
    with poisoned_outputs(monkeypatch):
        check(case, dtype, routed=False, dropout=0.4, seed=seed_of(9))


_AUTOCAST = fast_only(("default", False), ("grouped", True))


@pytest.mark.parametrize("design, routed", [_AUTOCAST(d, r) for d in ("default", "grouped") for r in (False, True)])
def test_fp16_autocast_matches_reference_under_autocast(design, routed):
    # fp32 tensors under fp16 autocast: fp16 dots, the masks applied to the fp16 act and to x as
    # it is cast to fp16, y fp32 (the fp32 residual promotes), every gradient in its input's dtype.
    case = make(33, 40, 4, 6, torch.float32, seed=21)
    options = dict(routed=routed, residual="skip+x", dropout=0.3, input_dropout=0.2, seed=seed_of(55))
    with torch.autocast(DEVICE, dtype=torch.float16):
        got = run(routed_adapter if routed else sparse_adapter, case, variant=design, **options)
        want = run(routed_reference if routed else gated_reference, case, **options)
    assert got[0].dtype == want[0].dtype == torch.float32
    assert relative_error(got[0], want[0]) <= TOLERANCE[torch.float16]
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == w.dtype
        assert relative_error(g, w) <= 2 * TOLERANCE[torch.float16]


@pytest.mark.parametrize("routed", [False, True])
def test_reference_path_equals_kernels(routed, monkeypatch):
    case = make(29, 32, 4, 5, torch.float32, seed=13)
    options = dict(routed=routed, residual="x", dropout=0.3, input_dropout=0.2, seed=seed_of(31))
    kernels = run(routed_adapter if routed else sparse_adapter, case, **options)
    force_reference(monkeypatch)
    for got, want in zip(run(routed_adapter if routed else sparse_adapter, case, **options), kernels):
        assert relative_error(got, want) <= TOLERANCE[torch.float32]


# --------------------------------------------------------------------------------------------
# Input dropout: the reference mixture on dropout(x), the gate and the residual on x
# --------------------------------------------------------------------------------------------


_INPUT = fast_only(("default", False, torch.float32), ("store_act", True, torch.float16),
                   ("grouped", False, torch.float16), ("grouped", True, torch.float32))


@pytest.mark.parametrize("design, routed, dtype", [_INPUT(d, r, t) for d in DESIGNS for r in (False, True)
                                                   for t in (torch.float32, torch.float16)])
def test_input_dropout_against_float64(design, routed, dtype, monkeypatch):
    # Both dropouts at once, x a residual term too (its own gradient undropped), odd D and r.
    case = make(31, 37, 3, 5, dtype, seed=12, top_k=2)
    with poisoned_outputs(monkeypatch):
        check_input_dropout(case, dtype, routed=routed, variant=design, residual="skip+x", dropout=0.2,
                            input_dropout=0.3, seed=seed_of(303))


@pytest.mark.parametrize("design", ["default", "grouped"])
def test_multi_lora_input_dropout_against_float64(design, monkeypatch):
    # PEFT's lora_dropout on a multi-LoRA batch: one task per row, identity activation, no
    # biases, D -> 3 D, the base output as residual; the grouped k = 1 form writes dx directly.
    rows, dim, rank, tasks = 26, 20, 4, 3
    generator = torch.Generator().manual_seed(9)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(DEVICE).requires_grad_()

    tensors = dict(x=randn(rows, dim), w_down=randn(tasks, rank, dim, std=dim ** -0.5),
                   w_up=randn(tasks, 3 * dim, rank, std=rank ** -0.5), residual=randn(rows, 3 * dim),
                   task=torch.randint(0, tasks, (rows, 1), generator=generator).to(DEVICE))
    seed = seed_of(8)

    def lora(fn, t):
        kwargs = dict(variant=design) if fn is routed_adapter else {}
        return fn(t["x"], t["task"], torch.ones(rows, 1, dtype=t["x"].dtype, device=DEVICE), t["w_down"], None,
                  t["w_up"], None, 0.5, activation="identity", residual=t["residual"], input_dropout=0.25,
                  seed=seed, **kwargs)

    with poisoned_outputs(monkeypatch):
        check_against_float64(lora, routed_adapter, routed_reference, tensors, TOLERANCE[torch.float32],
                              grad_tolerance=2 * TOLERANCE[torch.float32])


@pytest.mark.parametrize("design, top_k", [("default", 2), ("grouped", 1), ("grouped", 2)])
def test_dropped_input_elements_get_only_the_residual_gradient(design, top_k):
    # Routed form (no gate) with x as the residual: where the input mask drops x[m, d], nothing
    # flows back through the experts, so dx there is dy itself, bit for bit.
    p, rows, dim = 0.5, 9, 40
    case = make(rows, dim, 4, 3, torch.float32, seed=10, top_k=top_k)
    seed = seed_of(3)
    y = routed_adapter(case["x"], case["expert_idx"], case["expert_weight"], *(case[n] for n in PARAMS),
                       residual=case["x"], variant=design, input_dropout=p, seed=seed)
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, [case["x"]], grad_y)
    keep = reference.dropout_factor(seed, rows, dim, INPUT, p)
    assert torch.equal(grad_x[keep == 0], grad_y[keep == 0])
    assert not torch.allclose(grad_x[keep > 0], grad_y[keep > 0])


# --------------------------------------------------------------------------------------------
# The mask: both designs, seeds, p = 0, dropped units
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("routed", [False, True])
def test_designs_drop_the_same_units(routed):
    case = make(25, 24, 3, 6, torch.float32, seed=17)
    options = dict(routed=routed, dropout=0.5, input_dropout=0.2, seed=seed_of(66))
    dense = run(routed_adapter if routed else sparse_adapter, case, variant="default", **options)
    grouped = run(routed_adapter if routed else sparse_adapter, case, variant="grouped", **options)
    # The designs round differently (the dense one weights act before the up projection), so
    # equal up to fp32 rounding; a different mask would be off by the dropped units' share.
    for d, g in zip(dense, grouped):
        assert relative_error(g, d) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("design", ["default", pytest.param("grouped", marks=pytest.mark.slow)])
def test_seeds_repeat_and_differ(design):
    case = make(23, 32, 4, 5, torch.float32, seed=2)
    args = (case["x"], case["w_gate"], case["b_gate"], *(case[n] for n in PARAMS))

    def gated(**kwargs):
        return sparse_adapter(*args, top_k=2, variant=design, dropout=0.4, **kwargs)

    same = [gated(seed=11) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    assert torch.equal(same[0], gated(seed=seed_of(11)))
    assert not torch.equal(same[0], gated(seed=12))
    # seed=None draws a new seed from torch's generator: calls differ, and manual_seed repeats them.
    torch.manual_seed(0)
    first = [gated() for _ in range(2)]
    torch.manual_seed(0)
    assert not torch.equal(first[0], first[1])
    assert torch.equal(first[0], gated())


@pytest.mark.parametrize("design", ["default", "grouped"])
@pytest.mark.parametrize("routed", [False, True])
def test_zero_rate_is_todays_op_and_draws_nothing(design, routed):
    case = make(23, 32, 4, 5, torch.float32, seed=3)
    fn = routed_adapter if routed else sparse_adapter
    today = run(fn, case, routed=routed, residual="x", variant=design)
    state = torch.random.get_rng_state()
    zero = run(fn, case, routed=routed, residual="x", variant=design, dropout=0.0, input_dropout=0.0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for got, want in zip(zero, today):
        assert torch.equal(got, want)


@pytest.mark.parametrize("design", ["default", "grouped"])
def test_dropped_units_get_no_gradient(design):
    # One row routed to experts 1 and 3 (weights 1): db_down[e] is that row's dh of expert e, and
    # column j of dw_up[e] is dy^T times its dropped act_j. Both are zero exactly where the mask
    # drops the unit and nonzero where it keeps it; the unrouted experts get nothing.
    p, experts, rank, dim = 0.5, 4, 16, 24
    case = make(1, dim, rank, experts, torch.float32, seed=6, top_k=2)
    with torch.no_grad():
        case["expert_idx"] = torch.tensor([[1, 3]], device=DEVICE)
        case["expert_weight"].fill_(1.0)
    for seed_value in range(3):
        seed = seed_of(seed_value)
        y = routed_adapter(case["x"], case["expert_idx"], case["expert_weight"], *(case[n] for n in PARAMS),
                           variant=design, dropout=p, seed=seed)
        grad_b_down, grad_w_up = torch.autograd.grad(y, [case["b_down"], case["w_up"]], torch.ones_like(y))
        keep = reference.dropout_factor(seed, 1, experts * rank, HIDDEN, p)[0].reshape(experts, rank)
        for expert in (1, 3):
            kept = keep[expert] > 0
            assert torch.all(grad_b_down[expert][~kept] == 0) and torch.all(grad_b_down[expert][kept] != 0)
            assert torch.all(grad_w_up[expert][:, ~kept] == 0) and torch.all(grad_w_up[expert][:, kept] != 0)
        for expert in (0, 2):
            assert torch.all(grad_b_down[expert] == 0) and torch.all(grad_w_up[expert] == 0)


def test_unchecked_form_takes_dropout():
    case = make(19, 16, 2, 3, torch.float32, seed=1, top_k=1)
    args = (case["x"], case["expert_idx"], case["expert_weight"], *(case[n] for n in PARAMS))
    seed = seed_of(4)
    assert torch.equal(routed_adapter_unchecked(*args, dropout=0.2, input_dropout=0.1, seed=seed),
                       routed_adapter(*args, dropout=0.2, input_dropout=0.1, seed=seed))


# --------------------------------------------------------------------------------------------
# Structure: launches and saved tensors as without dropout, bad rates
# --------------------------------------------------------------------------------------------


def _traced(case, **options):
    """(forward launches, backward launches, saved tensors) of one call and its backward."""
    routed = options.pop("routed")
    launches = LaunchCounter()
    saved = []
    with pytest.MonkeyPatch.context() as monkeypatch, launches.patch(monkeypatch):
        with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out, inputs = call(routed_adapter if routed else sparse_adapter, case, routed=routed, **options)
        forward, launches.names = launches.names, []
        y = out if routed else out[0]
        torch.autograd.grad(y, list(inputs.values()), torch.ones_like(y))
    return forward, launches.names, saved


_TRACED = fast_only(("default", False, 2), ("store_act", True, 2), ("grouped", True, 1))


@pytest.mark.parametrize("design, routed, top_k", [_TRACED(d, r, k) for d in DESIGNS
                                                   for r, k in ((False, 2), (True, 1), (True, 2))])
def test_launch_counts_and_saved_tensors_unchanged(design, routed, top_k):
    # The same launches forward and backward as without dropout, and the same saved tensors plus
    # one: the 8-byte seed (no mask, nothing M x anything more).
    case = make(24, 16, 4, 6, torch.float16, seed=8, top_k=top_k)
    options = dict(routed=routed, top_k=top_k, residual="x", variant=design)
    forward, backward, saved = _traced(case, **options)
    forward_p, backward_p, saved_p = _traced(case, dropout=0.2, input_dropout=0.1, **options)
    assert forward_p == forward and backward_p == backward
    if design != "grouped":
        assert forward == ["_sparse_forward_kernel"]
        assert backward == ["_sparse_backward_input_kernel", "_sparse_backward_weights_kernel"]
    shapes = sorted((tuple(t.shape), str(t.dtype)) for t in saved)
    shapes_p = sorted((tuple(t.shape), str(t.dtype)) for t in saved_p)
    seeds = [t for t in saved_p if t.dim() == 0 and t.dtype == torch.int64]
    assert len(seeds) == 1 and seeds[0].numel() * seeds[0].element_size() == 8
    shapes_p.remove(((), str(torch.int64)))
    assert shapes_p == shapes


@pytest.mark.parametrize("name", ["dropout", "input_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, "x", True])
@pytest.mark.parametrize("routed", [False, True])
def test_bad_rates_name_the_argument(name, value, routed):
    case = make(5, 8, 2, 3, torch.float32, seed=0)
    with pytest.raises(ValueError, match=f"^{name} "):
        call(routed_adapter if routed else sparse_adapter, case, routed=routed, **{name: value})


def test_bad_seed_names_the_argument():
    case = make(5, 8, 2, 3, torch.float32, seed=0)
    with pytest.raises(ValueError, match="seed"):
        call(sparse_adapter, case, routed=False, dropout=0.1, seed=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("design", ["default", "grouped"])
def test_compile_fullgraph_with_dropout(design):
    # The seed is drawn by a random op inside the graph (no host sync, no graph break).
    torch._dynamo.reset()
    case = make(18, 24, 4, 4, torch.float32, seed=14)
    args = (case["x"], case["w_gate"], case["b_gate"], *(case[n] for n in PARAMS))

    def block(x, w_gate, b_gate, w_down, b_down, w_up, b_up):
        return sparse_adapter(x, w_gate, b_gate, w_down, b_down, w_up, b_up, top_k=2, residual=x, variant=design,
                              dropout=0.1, input_dropout=0.1)

    out = torch.compile(block, fullgraph=True)(*args)
    grads = torch.autograd.grad(out.sum(), args)
    assert all(torch.isfinite(g).all() for g in grads)
    assert out.shape == case["x"].shape
