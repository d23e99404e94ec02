"""The dense-masked sparse forward kernel (work in progress: forward only, no autograd yet)
against the float64 reference: odd shapes, k from 1 to E, deliberate ties, every epilogue
option, outputs poisoned with NaN. Runs in Triton's interpreter on machines without CUDA."""

import pytest
import torch

from fused_adapters.kernels import reference
from fused_adapters.kernels.sparse import sparse_forward
from helpers import DEVICE, TOLERANCE, relative_error


@pytest.fixture
def poisoned(monkeypatch):
    from fused_adapters.kernels import sparse

    monkeypatch.setattr(sparse, "new_output",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def make(rows, dim, rank, experts, dtype, seed, bias=True):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(DEVICE, dtype)

    return dict(
        x=randn(rows, dim), w_gate=randn(experts, dim, std=0.3), b_gate=randn(experts) if bias else None,
        w_down=randn(experts, rank, dim, std=dim ** -0.5), b_down=randn(experts, rank, std=0.5) if bias else None,
        w_up=randn(experts, dim, rank, std=rank ** -0.5), b_up=randn(experts, dim, std=0.5) if bias else None,
        scale=randn(dim), residual=randn(rows, dim),
        row_scale=(torch.rand(rows, generator=generator) + 0.5).to(DEVICE),
    )


def check(case, top_k, dtype, activation="gelu", add_input=False, scale="channel", residual=True, row_scale=True):
    scale_arg = {"channel": case["scale"], "float": 0.7, "none": None}[scale]
    residual_arg = case["residual"] if residual else None
    y = sparse_forward(case["x"], case["w_gate"], case["b_gate"], case["w_down"], case["b_down"], case["w_up"],
                       case["b_up"], scale_arg, top_k=top_k, activation=activation, residual=residual_arg,
                       add_input=add_input, row_scale=case["row_scale"] if row_scale else None)

    def wide(t):
        return t.double() if isinstance(t, torch.Tensor) else t

    terms = ([wide(case["x"])] if add_input else []) + ([wide(residual_arg)] if residual else [])
    expected = reference.sparse_adapter(
        wide(case["x"]), case["w_gate"].float(), None if case["b_gate"] is None else case["b_gate"].float(),
        wide(case["w_down"]), wide(case["b_down"]), wide(case["w_up"]), wide(case["b_up"]), wide(scale_arg),
        top_k=top_k, activation=activation, residual=terms or None,
        row_scale=wide(case["row_scale"]) if row_scale else None)
    assert y.shape == case["x"].shape
    error = relative_error(y, expected)
    assert error <= TOLERANCE[dtype], error
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("experts, top_k", [(1, 1), (5, 1), (5, 2), (5, 5), (8, 2), (16, 3)])
def test_against_float64(experts, top_k, dtype, poisoned):
    case = make(37, 45, 3, experts, dtype, seed=experts * 10 + top_k)
    check(case, top_k, dtype)


@pytest.mark.parametrize("shape", [(1, 1, 1), (70, 33, 5), (40, 96, 16)])
def test_odd_shapes(shape, poisoned):
    rows, dim, rank = shape
    case = make(rows, dim, rank, 4, torch.float32, seed=rows)
    check(case, 2, torch.float32)


@pytest.mark.parametrize("activation", sorted(reference.ACTIVATIONS))
def test_activations_and_epilogues(activation, poisoned):
    case = make(29, 40, 4, 6, torch.float32, seed=3, bias=activation != "relu")
    check(case, 2, torch.float32, activation=activation, add_input=True, scale="float", residual=False,
          row_scale=False)
    check(case, 3, torch.float32, activation=activation, scale="none")


def test_deliberate_ties_go_to_the_lower_expert(poisoned):
    # Experts 1 and 3 share a gate row and bias, so every row ties them; expert 1 must win
    # with k = 1, and both get half the weight with k = 2 when they lead.
    case = make(25, 32, 4, 5, torch.float32, seed=11)
    case["w_gate"][3] = case["w_gate"][1]
    case["b_gate"][3] = case["b_gate"][1]
    case["b_gate"][1] += 50.0
    case["b_gate"][3] += 50.0  # 1 and 3 lead on every row
    y1 = check(case, 1, torch.float32)
    only_one = dict(case, w_up=case["w_up"].clone())
    only_one["w_up"][3] = 0.0  # if expert 3 were picked, the output would change
    torch.testing.assert_close(check(only_one, 1, torch.float32), y1)
    check(case, 2, torch.float32)


def test_zero_rows():
    case = make(0, 16, 2, 3, torch.float32, seed=0)
    assert sparse_forward(case["x"], case["w_gate"], None, case["w_down"], None, case["w_up"], None,
                          top_k=2).shape == (0, 16)


def test_fp16_autocast_reads_fp32_tensors_in_place(poisoned):
    # fp32 x, parameters and residual under fp16 autocast: fp16 dots, fp32 gate, y promoted to fp32.
    case = make(33, 40, 4, 6, torch.float32, seed=21)
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = check(case, 2, torch.float16, add_input=True)
    assert y.dtype == torch.float32
