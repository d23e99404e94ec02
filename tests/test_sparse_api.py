"""sparse_adapter / routed_adapter at the API edge: bad input raises a TypeError or ValueError
naming the argument (before any kernel runs), the torch.library registration passes opcheck,
torch.compile traces the ops with no graph break, and the reference path (no kernels here)
gives the reference's answer."""

import pytest
import torch

from fused_adapters.kernels import reference, routed_adapter, sparse_adapter
from fused_adapters.kernels.sparse import op as sparse
from helpers import DEVICE, TOLERANCE, force_reference, relative_error


def tensors(rows=6, dim=8, rank=2, experts=3, top_k=2, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE).requires_grad_(True)

    return dict(x=randn(rows, dim), w_gate=randn(experts, dim), b_gate=randn(experts),
                w_down=randn(experts, rank, dim), b_down=randn(experts, rank), w_up=randn(experts, dim, rank),
                b_up=randn(experts, dim), expert_idx=torch.randint(0, experts, (rows, top_k), generator=generator),
                expert_weight=randn(rows, top_k))


def gated(t, **overrides):
    args = dict(t, **overrides)
    top_k = args.pop("top_k", 2)
    return sparse_adapter(args["x"], args["w_gate"], args["b_gate"], args["w_down"], args["b_down"], args["w_up"],
                          args["b_up"], args.get("scale"), top_k=top_k, activation=args.get("activation", "gelu"),
                          variant=args.get("variant"))


def routed(t, **overrides):
    args = dict(t, **overrides)
    return routed_adapter(args["x"], args["expert_idx"], args["expert_weight"], args["w_down"], args["b_down"],
                          args["w_up"], args["b_up"], activation=args.get("activation", "gelu"))


@pytest.mark.parametrize("overrides, error, words", [
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=4), ValueError, "top_k"),
    (dict(top_k=2.0), ValueError, "top_k"),
    (dict(w_gate=torch.randn(4, 8)), ValueError, "w_gate"),
    (dict(b_gate=torch.randn(2)), ValueError, "b_gate"),
    (dict(w_down=torch.randn(3, 2, 9)), ValueError, "w_down"),
    (dict(w_down=torch.randn(2, 8)), ValueError, "w_down"),
    (dict(w_up=torch.randn(3, 8, 3)), ValueError, "w_up"),
    (dict(w_up=torch.randn(4, 8, 2)), ValueError, "w_up"),
    (dict(b_down=torch.randn(3, 3)), ValueError, "b_down"),
    (dict(b_up=torch.randn(3, 7)), ValueError, "b_up"),
    (dict(w_down=torch.randn(65, 1, 8), w_up=torch.randn(65, 8, 1), b_down=None, b_up=None,
          w_gate=torch.randn(65, 8), b_gate=None), ValueError, "experts"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(variant="grouped?"), ValueError, "variant"),
    (dict(x=torch.ones(6, 8, dtype=torch.int32)), TypeError, "x"),
    (dict(scale="big"), TypeError, "scale"),
])
def test_gated_errors_name_the_argument(overrides, error, words):
    with pytest.raises(error, match=words):
        gated(tensors(), **overrides)


@pytest.mark.parametrize("overrides, error, words", [
    (dict(expert_idx=torch.tensor([[0, 3]] * 6)), ValueError, "expert_idx must hold expert indices from 0 to 2"),
    (dict(expert_idx=torch.tensor([[0, -1]] * 6)), ValueError, "expert_idx"),
    (dict(expert_idx=torch.zeros(6, 2)), TypeError, "expert_idx must be an integer tensor"),
    (dict(expert_idx=[[0, 1]] * 6), TypeError, "expert_idx"),
    (dict(expert_idx=torch.zeros(5, 2, dtype=torch.long)), ValueError, "expert_idx must have shape"),
    (dict(expert_weight=torch.ones(6, 3)), ValueError, "expert_weight must have expert_idx's shape"),
    (dict(expert_weight=torch.ones(6, 2, dtype=torch.long)), TypeError, "expert_weight"),
    (dict(activation=None), ValueError, "activation"),
])
def test_routed_errors_name_the_argument(overrides, error, words):
    with pytest.raises(error, match=words):
        routed(tensors(), **overrides)


def test_routed_accepts_leading_dims_like_x():
    t = tensors(rows=6)
    x3 = t["x"].reshape(2, 3, 8)
    y = routed_adapter(x3, t["expert_idx"].reshape(2, 3, 2), t["expert_weight"].reshape(2, 3, 2), t["w_down"],
                       t["b_down"], t["w_up"], t["b_up"])
    assert y.shape == (2, 3, 8)
    torch.testing.assert_close(y.reshape(6, 8), routed(t))


def test_reference_path_matches_the_reference(monkeypatch):
    # Where the kernels cannot run (a CPU without the interpreter, bf16 in the interpreter), the
    # ops run the eager expert loop inside their custom op, and its backward differentiates it.
    force_reference(monkeypatch)
    t = tensors(rows=10, dim=12, rank=3, experts=4)
    y, logits = sparse_adapter(t["x"], t["w_gate"], t["b_gate"], t["w_down"], t["b_down"], t["w_up"], t["b_up"],
                               0.5, top_k=2, residual=t["x"], return_logits=True)
    want, want_logits = reference.sparse_adapter(t["x"], t["w_gate"], t["b_gate"], t["w_down"], t["b_down"],
                                                 t["w_up"], t["b_up"], 0.5, top_k=2, residual=t["x"],
                                                 return_logits=True)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(logits, want_logits)
    names = ["x", "w_gate", "b_gate", "w_down", "b_down", "w_up", "b_up"]
    grads = [torch.randn_like(y), torch.randn_like(logits)]
    got = torch.autograd.grad([y, logits], [t[name] for name in names], grads)
    expected = torch.autograd.grad([want, want_logits], [t[name] for name in names], grads)
    for name, g, w in zip(names, got, expected):
        torch.testing.assert_close(g, w, msg=name)
    y, want = routed(t), reference.routed_adapter(t["x"], t["expert_idx"], t["expert_weight"], t["w_down"],
                                                  t["b_down"], t["w_up"], t["b_up"])
    names = ["x", "expert_weight", "w_down", "b_down", "w_up", "b_up"]
    for name, g, w in zip(names, torch.autograd.grad(y.sum(), [t[n] for n in names]),
                          torch.autograd.grad(want.sum(), [t[n] for n in names])):
        torch.testing.assert_close(g, w, msg=name)


@pytest.mark.slow
def test_reference_path_is_one_node_under_torch_compile(monkeypatch):
    # The reference runs inside the custom op: torch.compile sees one node on every backend.
    force_reference(monkeypatch)
    torch._dynamo.reset()
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph

    t = tensors(rows=10, dim=12, rank=3, experts=4)
    compiled = torch.compile(lambda *args: sparse_adapter(*args, top_k=2), backend=backend, fullgraph=True)
    y = compiled(t["x"], t["w_gate"], t["b_gate"], t["w_down"], t["b_down"], t["w_up"], t["b_up"])
    torch.testing.assert_close(y, gated(t))
    targets = [str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"]
    assert sum("fused_adapters.sparse_forward" in target for target in targets) == 1, targets


def test_routed_checks_devices_before_reading_indices():
    # A routing on another device is named as such; its values are never read there first (a
    # meta tensor has none: .item() would fail with an unrelated error).
    t = tensors()
    with pytest.raises(ValueError, match="expert_idx is on meta but x is on"):
        routed(t, expert_idx=t["expert_idx"].to("meta"))


def test_load_balancing_loss_names_bad_logits():
    with pytest.raises(ValueError, match="logits must have shape"):
        reference.load_balancing_loss(torch.randn(5, 0), 1)
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        reference.load_balancing_loss(torch.ones(5, 3, dtype=torch.long), 1)


def forward_kwargs(t, gated_form=True, save=True, return_logits=True, design="dense"):
    """The forward custom op's inputs, by name: both residual forms (x itself and a tensor)."""
    return dict(
        x=t["x"].detach(), w_gate=t["w_gate"].detach() if gated_form else None,
        b_gate=t["b_gate"].detach() if gated_form else None, expert_idx=None if gated_form else t["expert_idx"],
        expert_weight=None if gated_form else t["expert_weight"].detach(), w_down=t["w_down"].detach(),
        b_down=t["b_down"].detach(), w_up=t["w_up"].detach(), b_up=t["b_up"].detach(), scale=None, scale_value=0.5,
        residual=t["x"].detach(), add_input=True, row_scale=None, top_k=2, activation="gelu",
        compute_dtype=torch.float32, out_dtype=torch.float32, autocast=False, save=save,
        return_logits=return_logits and gated_form, design=design, variant="",
    )


@pytest.mark.skipif(not sparse.uses_kernels(torch.empty(1, device=DEVICE), 3, 2),
                    reason="the sparse kernels do not run on this device")
@pytest.mark.parametrize("design", ["dense", "grouped"])
@pytest.mark.parametrize("gated_form", [True, False])
def test_opcheck(gated_form, design):
    # One pair of custom ops for both designs: each returns the outputs of its own design, the
    # other's empty.
    t = tensors(rows=9, dim=20, rank=3, experts=4)
    op = torch.ops.fused_adapters.sparse_forward.default
    kwargs = forward_kwargs(t, gated_form, design=design)
    torch.library.opcheck(op, (), kwargs, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(op, (), forward_kwargs(t, gated_form, save=False, return_logits=False, design=design),
                          test_utils=("test_schema", "test_faketensor"))
    y, hidden, idx, weights, order, counts, logits = op(**kwargs)
    backward_kwargs = dict(
        grad_y=torch.randn_like(y), grad_logits=torch.randn_like(logits) if gated_form else None,
        **{name: kwargs[name] for name in ("x", "w_gate", "b_gate", "expert_idx", "expert_weight", "w_down", "b_down",
                                           "w_up", "b_up", "scale", "scale_value", "row_scale", "top_k", "activation",
                                           "compute_dtype", "autocast", "design", "variant")},
        add_grad_y=True, compute_dx=True, hidden=hidden, idx=idx, weights=weights, order=order, counts=counts,
    )
    torch.library.opcheck(torch.ops.fused_adapters.sparse_backward.default, (), backward_kwargs,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
@pytest.mark.skipif(not sparse.uses_dense_kernels(torch.empty(1, device=DEVICE), 3, 2),
                    reason="the sparse kernels do not run on this device")
@pytest.mark.parametrize("variant", ["default", "grouped"])
def test_compile_fullgraph_forward_and_backward(variant):
    torch._dynamo.reset()
    t = tensors(rows=12, dim=16, rank=3, experts=4)

    def block(x, w_gate, b_gate, w_down, b_down, w_up, b_up):
        y, logits = sparse_adapter(torch.nn.functional.layer_norm(x, x.shape[-1:]), w_gate, b_gate, w_down, b_down,
                                   w_up, b_up, 0.5, top_k=2, residual=x, return_logits=True,
                                   variant=variant)
        return (y * 2).sum(-1).sum() + reference.load_balancing_loss(logits, 2)

    args = [t[name] for name in ("x", "w_gate", "b_gate", "w_down", "b_down", "w_up", "b_up")]
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(*args)
    expected = block(*args)
    assert relative_error(out, expected) < TOLERANCE[torch.float32]
    for got, want in zip(torch.autograd.grad(out, args), torch.autograd.grad(expected, args)):
        assert relative_error(got, want) < TOLERANCE[torch.float32]


def test_unchecked_routing_reads_no_index_values(monkeypatch):
    # The package's modules route with indices they made (top-k of a gate, task ids): the
    # unchecked entry runs every other check but never reads expert_idx (no device sync).
    t = tensors(rows=6, dim=8, rank=2, experts=3)
    expected = routed(t)

    def no_read(*args, **kwargs):
        raise AssertionError("expert_idx was read on the host")

    monkeypatch.setattr(torch, "aminmax", no_read)
    got = sparse.routed_adapter_unchecked(t["x"], t["expert_idx"], t["expert_weight"], t["w_down"], t["b_down"],
                                          t["w_up"], t["b_up"])
    torch.testing.assert_close(got, expected)
    with pytest.raises(AssertionError, match="read on the host"):
        routed(t)
    with pytest.raises(ValueError, match="expert_weight"):
        sparse.routed_adapter_unchecked(t["x"], t["expert_idx"], t["expert_weight"][:, :1], t["w_down"],
                                        t["b_down"], t["w_up"], t["b_up"])
