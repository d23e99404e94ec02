"""Dropout inside adapter_fusion: each adapter's act(h) dropped at rate p (mask column i * r + j of
the HIDDEN stream for adapter i's rank j), the dropped act feeding the keys, the values and so the
scores and y. The output and every gradient against the float64 reference evaluated with the same
seed (fp32, fp16, fp16 autocast; odd D and r; outputs poisoned with NaN), seeds (a seed repeats
bitwise, another differs), p = 0 (today's output, no seed drawn, kernels compiled without
dropout), launch counts, what is saved (the seed and nothing else new) and the argument checks.
Runs in Triton's interpreter on machines without CUDA."""

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from fused_adapters.kernels import adapter_fusion, reference
from fused_adapters.kernels.fusion import op as fusion_op
from fused_adapters.kernels.fusion import plan as fusion_plan
from helpers import DEVICE, TOLERANCE, LaunchCounter, poisoned_outputs, relative_error
from test_fusion_kernel import ARGUMENTS, make, wide

RATE = 0.3


def run(fn, case, dropout=RATE, seed=1234, temperature=1.0, activation="gelu"):
    """One call of fn (adapter_fusion or the reference) with dropout; the reference takes the seed
    as the int64 tensor the op makes of an int."""
    if fn is not adapter_fusion and isinstance(seed, int):
        seed = torch.tensor(seed, dtype=torch.int64, device=case["x"].device)
    return fn(*(case[name] for name in ARGUMENTS), activation=activation, residual=case["residual"],
              temperature=temperature, dropout=dropout, seed=seed)


def gradient_names(case):
    return [name for name, t in case.items() if t is not None and t.requires_grad]


def check(case, tolerance, grad_tolerance, dropout=RATE, seed=1234, activation="gelu", temperature=1.0):
    """Forward and every gradient against the float64 reference with the same rate and seed
    (b_key's gradient is zero in exact arithmetic: ~0 next to the others)."""
    y = run(adapter_fusion, case, dropout, seed, temperature, activation)
    assert y.dtype == case["x"].dtype
    names = gradient_names(case)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    got = torch.autograd.grad(y, [case[n] for n in names], grad_y)
    float64 = wide(case)
    expected = run(reference.adapter_fusion, float64, dropout, seed, temperature, activation)
    want = torch.autograd.grad(expected, [float64[n] for n in names], grad_y.double())
    errors = {"y": relative_error(y, expected)}
    scale_of_grads = max(w.norm().item() for n, w in zip(names, want) if n != "b_key")
    for name, grad, ref in zip(names, got, want):
        assert grad.dtype == case[name].dtype and grad.shape == case[name].shape, name
        if name == "b_key":
            assert grad.double().norm().item() <= 1e-3 * scale_of_grads, grad
            continue
        errors["d" + name] = relative_error(grad, ref)
    bad = {name: error for name, error in errors.items() if not error <= (tolerance if name == "y" else grad_tolerance)}
    assert not bad, f"relative errors over {tolerance} / {grad_tolerance}: {bad}"
    return y


# --------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapters,rank,dim", [(1, 5, 33), (2, 3, 45), (5, 7, 21)])
def test_matches_float64_fp32(monkeypatch, adapters, rank, dim):
    """Every gradient, the adapters' included: each reads the dropped act(h) or its mask. N r = 35
    takes two of the forward's dropout chunks (configs.DROPOUT_CHUNK_COLUMNS)."""
    with poisoned_outputs(monkeypatch):
        case = make(37, dim, rank, adapters, torch.float32, seed=adapters * 10 + rank, adapter_grads=True)
        y = check(case, TOLERANCE[torch.float32] * 5, 1e-4)
    # The mask mattered: without dropout the output is another one.
    without = run(adapter_fusion, case, dropout=0.0)
    assert relative_error(y, without) > 1e-2


def test_mask_columns_and_rate_in_the_scores(monkeypatch):
    """The scores launch alone: p [M, N] equals the reference's with the same seed, and the rate
    is that high (p 0.9 drops most units: the probabilities move far from p = 0's)."""
    case = make(41, 24, 3, 5, torch.float32, seed=21)
    seed = torch.tensor(99, dtype=torch.int64)
    folds = fusion_op.fold_weights(*(case[n].detach() for n in ("w_up", "b_up", "scale", "w_query", "b_query",
                                                                 "w_key", "b_key", "w_value")))

    def probs(rate):
        with poisoned_outputs(monkeypatch):
            launches = fusion_plan.scores(
                case["x"].detach(), case["w_down"].detach(), case["b_down"].detach(), folds["query_hidden"],
                folds["query_hidden_bias"].reshape(-1), folds["query_bias"], folds["query_bias_bias"], "gelu",
                torch.float32, 1.0, dropout=rate, seed=seed if rate > 0 else None)
            launches()
        return launches.buffers["probs"]

    float64 = wide(case)
    for rate in (0.3, 0.9):
        _, expected = reference.adapter_fusion_in_dtype(
            *(float64[name] for name in ARGUMENTS), activation="gelu", residual=[], temperature=1.0,
            dtype=torch.float64, autocast=False, dropout=rate, seed=seed)
        assert relative_error(probs(rate), expected) <= 1e-5
    assert relative_error(probs(0.9), probs(0.0)) > 1e-1


@pytest.mark.parametrize("adapters,rank,dim", [(2, 8, 64), (5, 3, 45)])
def test_matches_float64_fp16(monkeypatch, adapters, rank, dim):
    with poisoned_outputs(monkeypatch):
        check(make(33, dim, rank, adapters, torch.float16, seed=11, adapter_grads=True), 2e-2, 5e-2)


def test_fp16_autocast_matches_reference_under_autocast(monkeypatch):
    """fp32 tensors under torch.autocast(fp16): y (fp32: the residual is) against the reference
    under the same autocast and against float64; every gradient in its input's dtype, against
    the reference's under the same autocast."""
    case = make(29, 48, 4, 3, torch.float32, seed=5, adapter_grads=True)
    names = gradient_names(case)
    with poisoned_outputs(monkeypatch), torch.autocast(DEVICE, dtype=torch.float16):
        y = run(adapter_fusion, case)
        eager = run(reference.adapter_fusion, case)
    assert y.dtype == eager.dtype == torch.float32
    assert relative_error(y, run(reference.adapter_fusion, wide(case))) <= 2e-2
    assert relative_error(y, eager) <= 2e-2
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(y, [case[n] for n in names], grad_y)
    want = torch.autograd.grad(eager, [case[n] for n in names], grad_y)
    for name, grad, ref in zip(names, got, want):
        assert grad.dtype == case[name].dtype, name
        if name != "b_key":
            assert relative_error(grad, ref) <= 5e-2, name


def test_reference_path_takes_the_same_mask():
    """N * r > 256 (the reference path): the reference's answer, with the same seed."""
    case = make(9, 16, 17, 16, torch.float32, seed=2, adapter_grads=True)
    assert not fusion_op.uses_kernels(case["x"], 16, 17)
    assert torch.equal(run(adapter_fusion, case), run(reference.adapter_fusion, case))
    check(case, 1e-6, 1e-6)


# --------------------------------------------------------------------------------------------
# Seeds and p = 0
# --------------------------------------------------------------------------------------------


def test_seed_repeats_bitwise_and_another_differs():
    case = make(40, 24, 4, 3, torch.float32, seed=8, adapter_grads=True)
    names = gradient_names(case)

    def outputs(seed):
        y = run(adapter_fusion, case, seed=seed)
        return (y.detach(),) + torch.autograd.grad(y, [case[n] for n in names], torch.ones_like(y))

    first, again = outputs(77), outputs(torch.tensor(77))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = outputs(78)
    assert relative_error(other[0], first[0]) > 1e-3
    # torch's generator draws the seed when none is given: manual_seed repeats the call.
    torch.manual_seed(5)
    drawn = run(adapter_fusion, case, seed=None).detach()
    torch.manual_seed(5)
    assert torch.equal(run(adapter_fusion, case, seed=None).detach(), drawn)


def test_rate_zero_is_todays_op():
    """p = 0: the output and gradients of a call without dropout, bitwise; no seed drawn from
    torch's generator (a given one is ignored); the kernels compile without dropout."""
    case = make(30, 24, 4, 3, torch.float32, seed=6, adapter_grads=True)
    names = gradient_names(case)

    def outputs(**dropout):
        y = fusion_op.adapter_fusion(*(case[name] for name in ARGUMENTS), residual=case["residual"], **dropout)
        return (y.detach(),) + torch.autograd.grad(y, [case[n] for n in names], torch.ones_like(y))

    state = torch.get_rng_state()
    today = outputs()
    assert all(torch.equal(a, b) for a, b in zip(today, outputs(dropout=0.0)))
    assert all(torch.equal(a, b) for a, b in zip(today, outputs(dropout=0.0, seed=3)))
    assert torch.equal(torch.get_rng_state(), state)
    x, w_down = case["x"].detach(), case["w_down"].detach()
    rank_space = torch.zeros(3 * 4 * 24).view(3, 4, 24)
    forward = fusion_plan.scores(x, w_down, None, rank_space, torch.zeros(12), torch.zeros(3, 24), torch.zeros(3),
                                 "gelu", torch.float32, 1.0, dropout=0.0)
    backward = fusion_plan.scores_backward(x, torch.zeros(30, 3), torch.zeros(30, 3), w_down, None, rank_space,
                                           torch.zeros(12), "gelu", torch.float32, 1.0, torch.float32, dropout=0.0)
    for launches in (forward, backward):
        (launch,) = launches.launches.values()
        assert launch.constexprs["HIDDEN_DROPOUT"] is False


# --------------------------------------------------------------------------------------------
# Structure and arguments
# --------------------------------------------------------------------------------------------


def test_launch_counts_unchanged(monkeypatch):
    """Two launches forward and three backward, with dropout as without."""
    case = make(40, 48, 4, 3, torch.float32, seed=9)
    counter = LaunchCounter()
    with counter.patch(monkeypatch):
        y = run(adapter_fusion, case)
        forward = list(counter.names)
        counter.names.clear()
        y.backward(torch.ones_like(y))
    assert forward == ["_fusion_scores_kernel", "_sparse_forward_kernel"]
    assert sorted(counter.names) == sorted(["_sparse_backward_input_kernel", "_sparse_backward_weights_kernel",
                                            "_fusion_scores_backward_kernel"])


def test_saves_only_the_seed_more():
    """Saved for backward, by distinct storage: what a call without dropout saves, plus the
    8-byte seed."""
    case = make(64, 32, 4, 5, torch.float32, seed=4)

    def saved_storages(dropout):
        saved = []
        with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            run(adapter_fusion, case, dropout=dropout)
        return sorted((t.untyped_storage().nbytes(), t.dtype, tuple(t.shape)) for t in saved)

    without, with_dropout = saved_storages(0.0), saved_storages(RATE)
    for entry in without:
        with_dropout.remove(entry)
    assert with_dropout == [(8, torch.int64, ())]


def test_custom_ops_pass_opcheck_with_dropout():
    """The forward op's schema, fake and autograd registration with the rate and seed arguments."""
    case = make(20, 16, 4, 3, torch.float32, seed=6)
    folds = fusion_op.fold_weights(*(case[n].detach() for n in ("w_up", "b_up", "scale", "w_query", "b_query",
                                                                 "w_key", "b_key", "w_value")))
    inputs = (case["x"].detach().requires_grad_(), case["w_down"].detach(), case["b_down"].detach(),
              folds["value_up"].contiguous().requires_grad_(), folds["value_bias"], folds["query_hidden"],
              folds["query_hidden_bias"].reshape(-1), folds["query_bias"], folds["query_bias_bias"],
              case["residual"].detach(), True, "gelu", torch.float32, torch.float32, False, 1.0, True, RATE,
              torch.tensor(17, dtype=torch.int64))
    torch.library.opcheck(torch.ops.fused_adapters.fusion_forward.default, inputs,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("rate", [-0.1, 1.0, "x", float("nan"), True])
def test_bad_rate_names_dropout(rate):
    case = make(4, 16, 4, 3, torch.float32, seed=0)
    with pytest.raises(ValueError, match="dropout"):
        run(adapter_fusion, case, dropout=rate)


def test_bad_seed_names_seed():
    case = make(4, 16, 4, 3, torch.float32, seed=0)
    with pytest.raises(ValueError, match="seed"):
        run(adapter_fusion, case, seed=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="seed"):
        run(adapter_fusion, case, seed=1.5)


@pytest.mark.slow
def test_compile_fullgraph_with_dropout():
    """torch.compile(fullgraph=True) of a call with dropout and a given seed: no graph break, and
    the forward and gradients of the eager call (the same mask)."""
    torch._dynamo.reset()
    case = make(18, 24, 4, 3, torch.float32, seed=12)

    def block(x, w_query, w_value, residual):
        y = adapter_fusion(x, case["w_down"], case["b_down"], case["w_up"], case["b_up"], case["scale"], w_query,
                           case["b_query"], case["w_key"], case["b_key"], w_value, residual=residual, dropout=RATE,
                           seed=31)
        return (y * 2).sum(-1)

    args = tuple(case[n] for n in ("x", "w_query", "w_value", "residual"))
    out = torch.compile(block, fullgraph=True)(*args)
    expected = block(*args)
    assert relative_error(out, expected) < 1e-5
    for got, want in zip(torch.autograd.grad(out.sum(), args), torch.autograd.grad(expected.sum(), args)):
        assert relative_error(got, want) < 1e-5
