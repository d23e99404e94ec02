"""The plain-PyTorch sparse mixture of adapters (kernels/reference.py), the spec the fused
sparse kernels will be checked against: routing (order, ties, weights), the expert loop against
a per-row float64 formula, every gradient by finite differences, and the load-balancing loss
against hand counts."""

import math

import pytest
import torch

from fused_adapters.kernels import reference


def experts(num_experts, dim, rank, dtype=torch.float64, bias=True, generator=None):
    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * std).to(dtype).requires_grad_()

    return dict(
        w_down=randn(num_experts, rank, dim, std=dim ** -0.5),
        b_down=randn(num_experts, rank, std=0.5) if bias else None,
        w_up=randn(num_experts, dim, rank, std=rank ** -0.5),
        b_up=randn(num_experts, dim, std=0.5) if bias else None,
    )


def per_row(x, expert_idx, expert_weight, params, scale, residual, row_scale, activation="gelu"):
    """The math written row by row and slot by slot, in float64."""
    act = reference.activation_fn(activation)
    rows = []
    for m in range(x.shape[0]):
        u = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(expert_idx.shape[1]):
            e = int(expert_idx[m, j])
            h = params["w_down"][e] @ x[m] + (params["b_down"][e] if params["b_down"] is not None else 0)
            out = params["w_up"][e] @ act(h) + (params["b_up"][e] if params["b_up"] is not None else 0)
            u = u + expert_weight[m, j] * out
        rows.append(residual[m] + scale * (row_scale[m] * u))
    return torch.stack(rows)


def test_routing_order_ties_and_weights():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, -1.0, 5.0, 4.0]])
    expert_idx, expert_weight = reference.topk_routing(logits, 2)
    # Descending logits; equal logits go to the lower expert index.
    assert expert_idx.tolist() == [[1, 2], [0, 1], [2, 3]]
    assert expert_idx.dtype == torch.int64 and expert_weight.dtype == torch.float32
    torch.testing.assert_close(expert_weight[0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(expert_weight[2], torch.softmax(torch.tensor([5.0, 4.0]), 0))
    idx_one, weight_one = reference.topk_routing(logits, 1)
    assert idx_one.tolist() == [[1], [0], [2]] and weight_one.eq(1).all()
    idx_all, weight_all = reference.topk_routing(logits, 4)
    assert idx_all.tolist()[1] == [0, 1, 2, 3] and idx_all.tolist()[2] == [2, 3, 0, 1]
    torch.testing.assert_close(weight_all.sum(-1), torch.ones(3))


@pytest.mark.parametrize("top_k", [0, 5, True, 1.5, None])
def test_bad_top_k_names_the_argument(top_k):
    with pytest.raises(ValueError, match=r"top_k must be an int from 1 to the number of experts \(4\)"):
        reference.topk_routing(torch.zeros(3, 4), top_k)


@pytest.mark.parametrize("top_k", [1, 2, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_routed_against_the_per_row_formula(top_k, bias):
    generator = torch.Generator().manual_seed(top_k + 10 * bias)
    rows, dim, rank, num_experts = 13, 10, 3, 5
    x = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    params = experts(num_experts, dim, rank, bias=bias, generator=generator)
    expert_idx = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(rows)])
    expert_idx[0, :] = 3  # the routed form may name one expert twice: its output counts twice
    expert_weight = torch.rand(rows, top_k, generator=generator, dtype=torch.float64)
    scale = torch.randn(dim, generator=generator, dtype=torch.float64)
    residual = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    row_scale = torch.rand(rows, generator=generator, dtype=torch.float64) + 0.5
    y = reference.routed_adapter(x, expert_idx, expert_weight, *params.values(), scale, residual=residual,
                                 row_scale=row_scale)
    expected = per_row(x, expert_idx, expert_weight, params, scale, residual, row_scale)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_sparse_is_routed_with_top_k_of_the_gate():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 12, generator=generator, dtype=torch.float64)  # any leading dims
    params = experts(6, 12, 4, generator=generator)
    w_gate, b_gate = torch.randn(6, 12, generator=generator), torch.randn(6, generator=generator)
    y, logits = reference.sparse_adapter(x, w_gate, b_gate, *params.values(), 0.5, top_k=2, residual=x,
                                         return_logits=True)
    assert logits.dtype == torch.float32 and logits.shape == (14, 6)
    torch.testing.assert_close(logits, (x.reshape(14, 12).float() @ w_gate.T + b_gate))
    expert_idx, expert_weight = reference.topk_routing(logits, 2)
    routed = reference.routed_adapter(x, expert_idx, expert_weight, *params.values(), 0.5, residual=x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, routed)


def test_every_gradient_by_finite_differences():
    generator = torch.Generator().manual_seed(7)
    rows, dim, rank, num_experts, top_k = 5, 4, 2, 3, 2
    x = torch.randn(rows, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    params = experts(num_experts, dim, rank, generator=generator)
    expert_idx = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(rows)])
    expert_weight = torch.rand(rows, top_k, generator=generator, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(dim, generator=generator, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(rows, dim, generator=generator, dtype=torch.float64, requires_grad=True)

    def routed(x, expert_weight, w_down, b_down, w_up, b_up, scale, residual):
        return reference.routed_adapter(x, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale,
                                        residual=residual)

    assert torch.autograd.gradcheck(routed, (x, expert_weight, *params.values(), scale, residual))

    # The gate's parameters get gradients through the weights (softmax over the chosen logits);
    # logits far apart keep the choice fixed under the finite-difference steps.
    w_gate = (torch.randn(num_experts, dim, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    b_gate = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64, requires_grad=True)

    def gated(x, w_gate, b_gate):
        return reference.sparse_adapter(x, w_gate, b_gate, *params.values(), scale, top_k=top_k)

    # logits are fp32 by definition: compare the analytic gradient with differences in fp32's
    # precision rather than float64's.
    assert torch.autograd.gradcheck(gated, (x, w_gate, b_gate), eps=1e-3, atol=1e-3, rtol=1e-2)


def test_dtypes_follow_the_bottleneck_rules():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(9, 16, generator=generator)
    params = experts(4, 16, 8, dtype=torch.float32, generator=generator)
    w_gate = torch.randn(4, 16, generator=generator)
    scale = torch.ones(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = reference.sparse_adapter(x, w_gate, None, *params.values(), scale, top_k=2, residual=x)
        no_residual = reference.sparse_adapter(x, w_gate, None, *params.values(), 0.5, top_k=2)
    # fp32 residual stream under bf16 autocast: y is fp32; without a residual or [D] scale, bf16.
    assert y.dtype == torch.float32 and no_residual.dtype == torch.bfloat16
    half = reference.sparse_adapter(x.half(), w_gate, None, *params.values(), 0.5, top_k=2)
    assert half.dtype == torch.float16


def test_load_balancing_loss_against_hand_counts():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]], requires_grad=True)
    loss = reference.load_balancing_loss(logits, 1)
    # Routed slots: expert 0 takes 3 of 4, expert 1 one: f = (0.75, 0.25).
    p_high = math.exp(2) / (math.exp(2) + 1)
    mean_probability = ((3 * p_high + (1 - p_high)) / 4, (3 * (1 - p_high) + p_high) / 4)
    expected = 2 * (0.75 * mean_probability[0] + 0.25 * mean_probability[1])
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # f is a constant: the gradient is E * sum_e f_e * dP_e / dlogits.
    loss.backward()
    probabilities = torch.softmax(logits.detach(), -1)
    weights = torch.tensor([0.75, 0.25])
    expected_grad = torch.stack([2 * probabilities[m] * (weights - (weights * probabilities[m]).sum()) / 4
                                 for m in range(4)])
    torch.testing.assert_close(logits.grad, expected_grad)
    # Uniform routing and probabilities give 1; with k = E every slot is used once per row.
    balanced = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert reference.load_balancing_loss(torch.zeros(4, 3), 3).item() == pytest.approx(1.0)
    assert reference.load_balancing_loss(balanced, 1).item() == pytest.approx(1.0)
    assert reference.load_balancing_loss(torch.zeros(0, 3), 1).item() == 0.0


def test_routed_rows_with_no_expert_get_the_residual_only():
    # An expert no row routes to costs nothing and changes nothing.
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    params = experts(4, 8, 2, generator=generator)
    expert_idx = torch.zeros(6, 1, dtype=torch.int64)
    y = reference.routed_adapter(x, expert_idx, torch.ones(6, 1, dtype=torch.float64), *params.values(),
                                 residual=x)
    single = {k: v[0] for k, v in params.items()}
    torch.testing.assert_close(y, reference.bottleneck_adapter(x, single["w_down"], single["b_down"], single["w_up"],
                                                               single["b_up"], residual=x))


@pytest.mark.parametrize("gated", [False, True], ids=["routed", "gated"])
def test_float64_op_gradients_keep_float64_precision(gated):
    # The op's float64 path (the reference, differentiated inside the custom op) packs the
    # parameter gradients: packed in fp32 they lost 1e-7 of their precision.
    from fused_adapters.kernels import routed_adapter, sparse_adapter

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(9, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    params = experts(3, 12, 4, generator=generator)
    w_gate = torch.randn(3, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    if gated:
        y = sparse_adapter(x, w_gate, None, *params.values(), 0.7, top_k=2)
        want = reference.sparse_adapter(x, w_gate, None, *params.values(), 0.7, top_k=2)
    else:
        idx = torch.randint(0, 3, (9, 2), generator=generator)
        weight = torch.rand(9, 2, generator=generator, dtype=torch.float64).requires_grad_()
        y = routed_adapter(x, idx, weight, *params.values(), 0.7)
        want = reference.routed_adapter(x, idx, weight, *params.values(), 0.7)
    leaves = [x, *params.values()] + ([w_gate] if gated else [])
    grad_y = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad(y, leaves, grad_y)
    expected = torch.autograd.grad(want, leaves, grad_y)
    for a, b in zip(got, expected):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
