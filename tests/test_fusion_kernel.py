"""adapter_fusion (AdapterFusion in rank space) against the float64 reference: forward and every
gradient (x, W_q, b_q, W_k, b_k, W_v, the residual; the adapters frozen and with gradients), N from
1 to 16, odd D and r, fp32 and fp16, fp16 autocast, outputs poisoned with NaN; and the structural
facts: launch counts, what is saved for backward (nothing N x M x D), bitwise determinism, the
custom ops' registration and errors that name the argument. Runs in Triton's interpreter on
machines without CUDA."""

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from fused_adapters.kernels import adapter_fusion, reference
from fused_adapters.kernels.fusion import op as fusion_op
from helpers import DEVICE, NO_CUDA_REASON, TOLERANCE, AtenRecorder, LaunchCounter, poisoned_outputs, relative_error

ADAPTER_PARAMS = ("w_down", "b_down", "w_up", "b_up", "scale")
FUSION_PARAMS = ("w_query", "b_query", "w_key", "b_key", "w_value")
ARGUMENTS = ("x",) + ADAPTER_PARAMS + FUSION_PARAMS


def make(rows, dim, rank, adapters, dtype, seed, *, scale="channel", adapter_grads=False, bias=True):
    """Leaf tensors of one call, never zeros; the fusion's weights drawn wider than BERT's init so
    that the probabilities are far from uniform (a test at std 0.02 would barely see the scores)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, grad=True):
        tensor = (torch.randn(*shape, generator=generator) * std).to(DEVICE, dtype)
        return tensor.requires_grad_(grad)

    case = dict(
        x=randn(rows, dim),
        w_down=randn(adapters, rank, dim, std=dim ** -0.5, grad=adapter_grads),
        b_down=randn(adapters, rank, std=0.5, grad=adapter_grads) if bias else None,
        w_up=randn(adapters, dim, rank, std=rank ** -0.5, grad=adapter_grads),
        b_up=randn(adapters, dim, std=0.5, grad=adapter_grads) if bias else None,
        scale={"channel": lambda: randn(adapters, dim, grad=adapter_grads),
               "adapter": lambda: randn(adapters, grad=adapter_grads), "none": lambda: None}[scale](),
        w_query=randn(dim, dim, std=dim ** -0.5), b_query=randn(dim, std=0.3) if bias else None,
        w_key=randn(dim, dim, std=dim ** -0.5), b_key=randn(dim, std=0.3) if bias else None,
        w_value=randn(dim, dim, std=dim ** -0.5), residual=randn(rows, dim),
    )
    return case


def run(fn, case, temperature=1.0, activation="gelu"):
    return fn(*(case[name] for name in ARGUMENTS), activation=activation, residual=case["residual"],
              temperature=temperature)


def wide(case):
    return {name: None if t is None else t.detach().double().requires_grad_(t.requires_grad)
            for name, t in case.items()}


def check(case, tolerance, grad_tolerance, temperature=1.0, activation="gelu", seed=0):
    """Forward and every gradient against the float64 reference. b_key's gradient is zero in
    exact arithmetic (q . b_k is the same for every adapter): both sides must be ~0 next to the
    other gradients' scale."""
    y = run(adapter_fusion, case, temperature, activation)
    assert y.dtype == case["x"].dtype  # x, the parameters and the residual share it here
    expected = run(reference.adapter_fusion, wide(case), temperature, activation)
    errors = {"y": relative_error(y, expected)}
    names = [name for name, t in case.items() if t is not None and t.requires_grad]
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    got = torch.autograd.grad(y, [case[n] for n in names], grad_y, allow_unused=True)
    float64 = wide(case)
    expected = run(reference.adapter_fusion, float64, temperature, activation)
    want = torch.autograd.grad(expected, [float64[n] for n in names], grad_y.double(), allow_unused=True)
    scale_of_grads = max(w.norm().item() for n, w in zip(names, want) if n != "b_key")
    for name, grad, ref in zip(names, got, want):
        assert grad is not None, f"d{name} is missing"
        assert grad.dtype == case[name].dtype and grad.shape == case[name].shape, name
        if name == "b_key":
            assert grad.double().norm().item() <= 1e-3 * scale_of_grads, grad
            continue
        errors["d" + name] = relative_error(grad, ref)
    bad = {name: error for name, error in errors.items() if not error <= (tolerance if name == "y" else grad_tolerance)}
    assert not bad, f"relative errors over {tolerance} / {grad_tolerance}: {bad}"
    return errors


@pytest.mark.parametrize("adapters,rank,dim", [(1, 8, 32), (2, 5, 45), (5, 3, 33), (16, 3, 24), (16, 16, 20)])
@pytest.mark.parametrize("adapter_grads", [False, True])
def test_matches_float64_fp32(monkeypatch, adapters, rank, dim, adapter_grads):
    with poisoned_outputs(monkeypatch):
        case = make(37, dim, rank, adapters, torch.float32, seed=adapters * 100 + rank, adapter_grads=adapter_grads)
        check(case, TOLERANCE[torch.float32] * 5, 1e-4)


@pytest.mark.parametrize("scale", ["channel", "adapter", "none"])
@pytest.mark.parametrize("activation", ["gelu", "relu", "identity"])
def test_scale_kinds_activations_and_temperature(monkeypatch, scale, activation):
    with poisoned_outputs(monkeypatch):
        case = make(19, 40, 4, 3, torch.float32, seed=7, scale=scale, adapter_grads=True)
        check(case, TOLERANCE[torch.float32] * 5, 1e-4, temperature=2.5, activation=activation)


def test_without_biases(monkeypatch):
    with poisoned_outputs(monkeypatch):
        check(make(21, 24, 4, 3, torch.float32, seed=3, bias=False, adapter_grads=True),
              TOLERANCE[torch.float32] * 5, 1e-4)


@pytest.mark.parametrize("adapters,rank,dim", [(2, 8, 64), (5, 3, 45)])
def test_matches_float64_fp16(monkeypatch, adapters, rank, dim):
    with poisoned_outputs(monkeypatch):
        case = make(33, dim, rank, adapters, torch.float16, seed=11)
        check(case, 2e-2, 5e-2)


def test_fp16_autocast_matches_reference_under_autocast(monkeypatch):
    """fp32 tensors under torch.autocast(fp16): the dots in fp16, the scores and softmax in fp32,
    y in the reference's dtype (fp32 here: the residual is fp32), each gradient in its input's
    dtype; against float64 at fp16's tolerance, and against the reference under the same autocast."""
    case = make(29, 48, 4, 3, torch.float32, seed=5)
    with poisoned_outputs(monkeypatch), torch.autocast(DEVICE, dtype=torch.float16):
        y = run(adapter_fusion, case)
        eager = run(reference.adapter_fusion, case)
    assert y.dtype == eager.dtype == torch.float32
    expected = run(reference.adapter_fusion, wide(case))
    assert relative_error(y, expected) <= 2e-2
    assert relative_error(y, eager) <= 2e-2
    grads = torch.autograd.grad(y, [case["x"], case["w_query"], case["w_value"]], torch.ones_like(y))
    assert [g.dtype for g in grads] == [torch.float32] * 3
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_REASON)
def test_matches_float64_bf16():
    case = make(65, 64, 8, 4, torch.bfloat16, seed=13)
    check(case, 5e-2, 1e-1)


def test_above_the_kernels_width_takes_the_reference():
    """N * r > 256: the reference path, same answer."""
    case = make(9, 16, 17, 16, torch.float32, seed=2)
    assert not fusion_op.uses_kernels(case["x"], 16, 17)
    check(case, 1e-6, 1e-6)


def test_empty_batch_and_leading_dims():
    case = make(0, 16, 4, 2, torch.float32, seed=1)
    y = run(adapter_fusion, case)
    assert y.shape == (0, 16)
    case = make(12, 16, 4, 2, torch.float32, seed=1)
    x3 = case["x"].detach().view(3, 4, 16)
    flat = run(adapter_fusion, case)
    case3 = dict(case, x=x3, residual=case["residual"].detach().view(3, 4, 16))
    assert torch.equal(run(adapter_fusion, case3).view(12, 16), flat.detach())


def test_launches_and_host_ops(monkeypatch):
    """Forward: the scores launch and the mixture's launch, no aten op with M x D (or N x M x D)
    output around them. Backward: the mixture's two launches and the scores' one; around them
    one M x D op: the GEMM that adds the scores' share of dx into the mixture's in its epilogue
    (no separate add of the two shares)."""
    rows, dim, rank, adapters = 40, 48, 4, 3
    case = make(rows, dim, rank, adapters, torch.float32, seed=9)
    counter = LaunchCounter()
    with counter.patch(monkeypatch):
        with AtenRecorder(counter) as forward_ops:
            y = run(adapter_fusion, case)
        launches_forward = list(counter.names)
        counter.names.clear()
        grad_y = torch.ones_like(y)
        with AtenRecorder(counter) as backward_ops:
            y.backward(grad_y)
    assert launches_forward == ["_fusion_scores_kernel", "_sparse_forward_kernel"]
    assert sorted(counter.names) == sorted(["_sparse_backward_input_kernel", "_sparse_backward_weights_kernel",
                                            "_fusion_scores_backward_kernel"])

    views = {"view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "alias", "detach", "expand", "t",
             "transpose", "slice", "split", "split_with_sizes", "empty"}

    def big(ops):
        return [(name, shapes) for name, shapes in ops if name not in views and any(
            len(s) and s[0] == rows and s[-1] == dim or len(s) == 3 and s[0] == rows for s in shapes)]

    assert big(forward_ops.ops) == []
    names = sorted(name for name, _ in big(backward_ops.ops))
    assert names == ["addmm_"], big(backward_ops.ops)


def test_saves_nothing_n_by_m_by_d():
    """Saved for backward, by distinct storage: x itself (by reference), p [M, N] fp32, and the
    mixture's pre-activation [M, N r] and weights [M, N]; the rest is parameter-sized (the folds)
    or the broadcast adapter indices (an [N] arange)."""
    rows, dim, rank, adapters = 64, 32, 4, 5
    case = make(rows, dim, rank, adapters, torch.float32, seed=4)
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        run(adapter_fusion, case)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    x_storage = case["x"].untyped_storage().data_ptr()
    assert x_storage in storages
    row_sized = {t.untyped_storage().data_ptr() for t in saved if t.dim() >= 1 and t.shape[0] == rows}
    activations = sorted(nbytes for ptr, nbytes in storages.items() if ptr in row_sized - {x_storage}
                         and nbytes > adapters * 8)
    assert activations == sorted([rows * adapters * 4, rows * adapters * 4, rows * adapters * rank * 4])
    assert max(storages.values()) < adapters * rows * dim * 4


def test_backward_is_deterministic():
    case = make(70, 40, 4, 3, torch.float32, seed=8, adapter_grads=True)
    names = [name for name, t in case.items() if t is not None and t.requires_grad]

    def grads():
        y = run(adapter_fusion, case)
        return torch.autograd.grad(y, [case[n] for n in names], torch.ones_like(y))

    first, second = grads(), grads()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_custom_ops_pass_opcheck():
    case = make(20, 16, 4, 3, torch.float32, seed=6)
    folds = fusion_op.fold_weights(*(case[n].detach() for n in ("w_up", "b_up", "scale", "w_query", "b_query",
                                                                 "w_key", "b_key", "w_value")))
    inputs = (case["x"].detach().requires_grad_(), case["w_down"].detach(), case["b_down"].detach(),
              folds["value_up"].contiguous().requires_grad_(), folds["value_bias"], folds["query_hidden"],
              folds["query_hidden_bias"].reshape(-1), folds["query_bias"], folds["query_bias_bias"],
              case["residual"].detach(), True, "gelu", torch.float32, torch.float32, False, 1.0, True)
    torch.library.opcheck(torch.ops.fused_adapters.fusion_forward.default, inputs,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("change,match", [
    (dict(w_query=torch.zeros(3, 3)), "w_query must have shape"),
    (dict(b_key=torch.zeros(5)), "b_key must have shape"),
    (dict(scale=torch.zeros(2, 7)), "scale must be None"),
    (dict(w_up=torch.zeros(3, 16, 5)), "w_up must have shape"),
    (dict(w_down=torch.zeros(17, 2, 16), w_up=torch.zeros(17, 16, 2), b_down=None, b_up=None, scale=None),
     "takes 1 to 16"),
])
def test_errors_name_the_argument(change, match):
    case = make(4, 16, 4, 3, torch.float32, seed=0)
    case.update(change)
    with pytest.raises(ValueError, match=match):
        run(adapter_fusion, case)
    with pytest.raises(ValueError, match="temperature"):
        run(adapter_fusion, make(4, 16, 4, 3, torch.float32, seed=0), temperature=0.0)


@pytest.mark.slow
def test_compile_fullgraph_forward_and_backward():
    """torch.compile(fullgraph=True) of a block that calls adapter_fusion: one node for each custom
    op, no graph break; forward and gradients equal the eager call."""
    torch._dynamo.reset()
    case = make(18, 24, 4, 3, torch.float32, seed=12)

    def block(x, w_query, b_query, w_key, w_value, residual):
        y = adapter_fusion(torch.nn.functional.layer_norm(x, x.shape[-1:]), case["w_down"], case["b_down"],
                           case["w_up"], case["b_up"], case["scale"], w_query, b_query, w_key, case["b_key"], w_value,
                           residual=residual, temperature=1.5)
        return (y * 2).sum(-1)

    args = tuple(case[n] for n in ("x", "w_query", "b_query", "w_key", "w_value", "residual"))
    out = torch.compile(block, fullgraph=True)(*args)
    expected = block(*args)
    assert relative_error(out, expected) < 1e-5
    for got, want in zip(torch.autograd.grad(out.sum(), args), torch.autograd.grad(expected.sum(), args)):
        assert relative_error(got, want) < 1e-5
