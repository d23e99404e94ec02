"""Width-changing mixtures: w_up [E, D_out, r] with D_out != D, so y, dy, b_up, a channel scale and
the residual have D_out columns while x, dx, w_down and the gate keep D. The case it serves:
multi-task LoRA batches, each row with its own task's A_t [r, D] and B_t [D_out, r] on qkv
(D_out = 3 D), fc1 (4 D) or fc2 (D / 4): the routed form with identity activation, k = 1,
weight 1 and the base linear's output as the residual.

Same standards as the same-width tests: routed and gated forms, the dense and grouped designs,
forward and every gradient against float64 with fresh random inputs and every output buffer
poisoned with NaN, fp32, fp16 and fp16 autocast, launch counts, errors that name the argument,
the reference path, the fake implementations, and the compile check's cases."""

import functools
import os
import subprocess
import sys

import pytest
import torch

from fused_adapters.kernels import reference, routed_adapter, sparse_adapter, use_variant
from fused_adapters.kernels.sparse import op as sparse_op
from fused_adapters.kernels.sparse import plan as sparse_plan
from helpers import (
    DEVICE, TOLERANCE, LaunchCounter, check_against_float64, force_reference, poisoned_outputs, relative_error,
)

# Odd D and odd rank; D_out 3 D (qkv), 4 D (fc1) and 11 (narrower than D, odd).
DIM, RANK = 45, 5
QKV, FC1, NARROW = 3 * DIM, 4 * DIM, 11
DESIGNS = ["default", "grouped"]  # the variants naming the dense-masked and the grouped design


def make(rows, dim, dim_out, rank, experts, dtype=torch.float32, *, seed, top_k=1, bias=True, lead=()):
    """Leaf tensors of one call, both forms: x [*lead, rows, D], the gate (fp32), a random routing
    (top_k experts per row; row 0 names one expert twice when k > 1), the experts with D_out-wide
    up-projections, every kind of scale, a residual [..., D_out] and row_scale."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, dt=dtype, grad=True):
        return (torch.randn(shape, generator=generator) * std).to(DEVICE, dt).requires_grad_(grad)

    count = rows
    for size in lead:
        count *= size
    expert_idx = torch.randint(0, experts, (count, top_k), generator=generator)
    if count and top_k > 1:
        expert_idx[0, 1] = expert_idx[0, 0]
    return dict(
        x=randn(*lead, rows, dim), w_gate=randn(experts, dim, std=0.3, dt=torch.float32),
        b_gate=randn(experts, dt=torch.float32) if bias else None,
        expert_idx=expert_idx.reshape(*lead, rows, top_k).to(DEVICE),
        expert_weight=randn(*lead, rows, top_k, dt=torch.float32),
        w_down=randn(experts, rank, dim, std=dim ** -0.5), b_down=randn(experts, rank, std=0.5) if bias else None,
        w_up=randn(experts, dim_out, rank, std=rank ** -0.5), b_up=randn(experts, dim_out, std=0.5) if bias else None,
        channel=randn(dim_out), scalar=randn(), residual=randn(*lead, rows, dim_out),
        row_scale=(torch.rand(count, generator=generator) + 0.5).to(DEVICE),
    )


def inputs(case, *, routed, scale="channel", residual=True, row_scale=True):
    """The tensors one call reads, by name (those that require grad are differentiated)."""
    names = ["x", "w_down", "b_down", "w_up", "b_up"] + (["expert_idx", "expert_weight"] if routed else
                                                         ["w_gate", "b_gate"])
    names += [scale] if scale in ("channel", "scalar") else []
    names += ["residual"] if residual else []
    names += ["row_scale"] if row_scale else []
    return {name: case[name] for name in names if case[name] is not None}


def caller(*, routed, top_k=1, scale="channel", activation="gelu"):
    """call(fn, tensors) for check_against_float64: fn is routed_adapter or sparse_adapter (or
    their reference, or a partial with variant=); y must come out [..., D_out]."""
    def call(fn, t):
        scale_arg = {"channel": t.get("channel"), "scalar": t.get("scalar"), "float": 0.7, None: None}[scale]
        experts = [t["w_down"], t.get("b_down"), t["w_up"], t.get("b_up")]
        kwargs = dict(activation=activation, residual=t.get("residual"), row_scale=t.get("row_scale"))
        if routed:
            y = fn(t["x"], t["expert_idx"], t["expert_weight"], *experts, scale_arg, **kwargs)
        else:
            y = fn(t["x"], t["w_gate"], t.get("b_gate"), *experts, scale_arg, top_k=top_k, **kwargs)
        assert y.shape == (*t["x"].shape[:-1], t["w_up"].shape[1])
        return y
    return call


def check(case, dtype, *, routed, design, top_k=1, scale="channel", residual=True, row_scale=True,
          activation="gelu"):
    """Forward and every gradient of the fused op (the design's variant) against the float64
    reference; fp16 gradients sum rounded products over rows: twice the forward's bound."""
    tensors = inputs(case, routed=routed, scale=scale, residual=residual, row_scale=row_scale)
    fused = functools.partial(routed_adapter if routed else sparse_adapter, variant=design)
    call = caller(routed=routed, top_k=top_k, scale=scale, activation=activation)
    return check_against_float64(call, fused, reference.routed_adapter if routed else reference.sparse_adapter,
                                 tensors, TOLERANCE[dtype], 2 * TOLERANCE[dtype])


# --------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("design", DESIGNS)
# Fast mode keeps one wider and one narrower output, a single expert and k = 2 with a repeat.
@pytest.mark.parametrize("dim_out, experts, top_k", [
    (QKV, 4, 2), (NARROW, 1, 1),
    pytest.param(FC1, 8, 1, marks=pytest.mark.slow), pytest.param(QKV, 1, 1, marks=pytest.mark.slow),
    pytest.param(NARROW, 6, 2, marks=pytest.mark.slow),
])
def test_routed_against_float64(dim_out, experts, top_k, design, monkeypatch):
    case = make(23, DIM, dim_out, RANK, experts, seed=dim_out + experts + top_k, top_k=top_k)
    with poisoned_outputs(monkeypatch):
        check(case, torch.float32, routed=True, design=design)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("dim_out, experts, top_k", [
    (FC1, 5, 2),
    pytest.param(QKV, 8, 3, marks=pytest.mark.slow), pytest.param(NARROW, 3, 1, marks=pytest.mark.slow),
    pytest.param(QKV, 1, 1, marks=pytest.mark.slow),
])
def test_gated_against_float64(dim_out, experts, top_k, design, monkeypatch):
    case = make(21, DIM, dim_out, RANK, experts, seed=2 * dim_out + experts, top_k=top_k)
    with poisoned_outputs(monkeypatch):
        check(case, torch.float32, routed=False, design=design, top_k=top_k)


@pytest.mark.parametrize("design, dim_out", [
    ("default", QKV), ("grouped", NARROW),
    pytest.param("default", FC1, marks=pytest.mark.slow), pytest.param("default", NARROW, marks=pytest.mark.slow),
    pytest.param("grouped", QKV, marks=pytest.mark.slow), pytest.param("grouped", FC1, marks=pytest.mark.slow),
])
def test_multi_task_lora_form(design, dim_out, monkeypatch):
    # Per-task LoRA on a D -> D_out linear: task t's A_t and alpha / r * B_t stacked as the
    # experts, identity activation, no biases, k = 1, weight 1, the base output as the residual;
    # x with leading dims [B, N, D], one task per image.
    tasks, images, tokens = 3, 2, 7
    case = make(tokens, DIM, dim_out, RANK, tasks, seed=dim_out, bias=False, lead=(images,))
    task_of_image = torch.tensor([2, 0])
    case["expert_idx"] = task_of_image[:, None, None].expand(images, tokens, 1).to(DEVICE)
    case["expert_weight"] = torch.ones(images, tokens, 1, device=DEVICE, requires_grad=True)
    with poisoned_outputs(monkeypatch):
        check(case, torch.float32, routed=True, design=design, scale="float", row_scale=False, activation="identity")


@pytest.mark.parametrize("scale", [None, "float", "scalar", "channel"])
@pytest.mark.parametrize("design", ["default", pytest.param("grouped", marks=pytest.mark.slow)])
def test_scale_kinds_and_epilogues(scale, design, monkeypatch):
    # Every kind of scale, with the other epilogue options varied along: a residual or none,
    # row_scale or none, identity or gelu, biases or none.
    index = [None, "float", "scalar", "channel"].index(scale)
    case = make(19, DIM, QKV if index % 2 else NARROW, RANK, 4, seed=40 + index, top_k=2, bias=index != 1)
    with poisoned_outputs(monkeypatch):
        check(case, torch.float32, routed=True, design=design, top_k=2, scale=scale, residual=index < 2,
              row_scale=index % 3 == 0, activation="identity" if index % 2 else "gelu")
        check(case, torch.float32, routed=False, design=design, top_k=2, scale=scale, residual=index >= 2,
              row_scale=index % 3 != 0, activation="gelu" if index % 2 else "identity")


@pytest.mark.parametrize("routed, design, dim_out", [
    (True, "default", QKV), (False, "grouped", NARROW),
    pytest.param(True, "grouped", FC1, marks=pytest.mark.slow),
    pytest.param(False, "default", FC1, marks=pytest.mark.slow),
])
def test_fp16(routed, design, dim_out, monkeypatch):
    case = make(27, DIM, dim_out, RANK, 4, torch.float16, seed=dim_out + routed, top_k=2)
    with poisoned_outputs(monkeypatch):
        check(case, torch.float16, routed=routed, design=design, top_k=2)


@pytest.mark.parametrize("routed, design", [(True, "default"), pytest.param(False, "grouped", marks=pytest.mark.slow)])
def test_fp16_autocast(routed, design, monkeypatch):
    # fp32 tensors under fp16 autocast: fp16 dots, fp32 y (the fp32 residual and the fp32 channel
    # scale promote it, as eager does), every gradient in its input's dtype; without either, y
    # comes out fp16.
    case = make(17, DIM, QKV, RANK, 3, torch.float32, seed=5 + routed, top_k=2)
    with poisoned_outputs(monkeypatch), torch.autocast(DEVICE, dtype=torch.float16):
        check(case, torch.float16, routed=routed, design=design, top_k=2)
        tensors = inputs(case, routed=routed, scale="float", residual=False)
        y = caller(routed=routed, top_k=2, scale="float")(functools.partial(
            routed_adapter if routed else sparse_adapter, variant=design), tensors)
        assert y.dtype == torch.float16 and y.shape == (17, QKV)


def test_weights_launch_in_row_chunks_and_column_blocks(monkeypatch):
    # The dense weights launch with its fp32 partials over 3 row chunks (summed by torch) and
    # E*r = 72 split into 3 stacked-column blocks (their dscale rows folded), D_out wider and
    # narrower than D: the partials' layout has D_out-wide dw_up, db_up and dscale.
    monkeypatch.setattr(sparse_plan, "plan_chunks", lambda *args: 3)
    original = sparse_plan.backward
    grids = []

    def backward(*args, **kwargs):
        planned = original(*args, **kwargs)
        grids.append(planned.launches["sparse_backward_weights"].grid)
        return planned

    monkeypatch.setattr(sparse_plan, "backward", backward)
    for dim_out, routed in ((QKV, True), (NARROW, False)):
        case = make(70, DIM, dim_out, 9, 8, seed=dim_out, top_k=2)
        with poisoned_outputs(monkeypatch):
            check(case, torch.float32, routed=routed, design="default", top_k=2,
                  scale="scalar" if routed else "channel")
        chunks, col_tiles, blocks = grids[-1]
        assert chunks == 3 and blocks == 3
        assert col_tiles == -(-max(DIM, dim_out) // 32)  # the fp32 weights tile is 32 columns wide


def test_grouped_gate_partials_and_split_ranks(monkeypatch):
    # The grouped weights launch: the gate's partials over 3 row chunks with column tiles that
    # pass D (D_out = 3 D: the gate's programs there write nothing), and rank 100 split into two
    # rank blocks (E*r = 300: grouped whatever the variant), D_out narrower than D.
    monkeypatch.setattr(sparse_plan, "gate_chunks", lambda *args: 3)
    with poisoned_outputs(monkeypatch):
        check(make(31, DIM, QKV, RANK, 6, seed=17, top_k=2), torch.float32, routed=False, design="grouped", top_k=2)
        assert sparse_plan.weights_rank_blocks(100, torch.float32) == 2
        check(make(24, 24, 7, 100, 3, seed=5), torch.float32, routed=True, design="default", scale="scalar")


def test_use_variant_forces_the_grouped_design(monkeypatch):
    case = make(13, DIM, QKV, RANK, 4, seed=3)
    launches = LaunchCounter()
    call = caller(routed=True)
    with launches.patch(monkeypatch), use_variant("sparse_adapter", "grouped"), poisoned_outputs(monkeypatch):
        check_against_float64(call, routed_adapter, reference.routed_adapter, inputs(case, routed=True),
                              TOLERANCE[torch.float32], 2 * TOLERANCE[torch.float32])
    assert "_grouped_forward_kernel" in launches.names and "_sparse_forward_kernel" not in launches.names


def test_zero_rows():
    case = make(0, DIM, QKV, RANK, 3, seed=0)
    y = routed_adapter(case["x"], case["expert_idx"], case["expert_weight"], case["w_down"], None, case["w_up"], None,
                       case["channel"])
    assert y.shape == (0, QKV)
    y.sum().backward()
    assert case["w_up"].grad.shape == case["w_up"].shape and case["w_up"].grad.abs().sum() == 0


@pytest.mark.parametrize("design", DESIGNS)
def test_logits_alone_reach_the_gate(design):
    # Only the logits are used (an auxiliary loss): the backward starts from a zero dy of D_out
    # columns.
    case = make(15, DIM, QKV, RANK, 4, seed=8)
    experts = [case[name] for name in ("w_down", "b_down", "w_up", "b_up")]
    _, logits = sparse_adapter(case["x"], case["w_gate"], case["b_gate"], *experts, top_k=2, return_logits=True,
                               variant=design)
    _, want = reference.sparse_adapter(case["x"], case["w_gate"], case["b_gate"], *experts, top_k=2,
                                       return_logits=True)
    names = ["w_gate", "x", "w_up"]
    got = torch.autograd.grad(reference.load_balancing_loss(logits, 2), [case[n] for n in names], allow_unused=True)
    expected = torch.autograd.grad(reference.load_balancing_loss(want, 2), [case[n] for n in names],
                                   allow_unused=True)
    for name, g, w in zip(names, got, expected):
        assert g is not None and g.shape == case[name].shape, name
        if w is None:  # w_up: no part in the logits, a zero gradient
            assert g.abs().sum() == 0, name
        else:
            assert relative_error(g, w) <= TOLERANCE[torch.float32], name


def test_reference_path(monkeypatch):
    # Where the kernels cannot run, the ops run the reference inside their custom op; its
    # backward packs the D_out-wide gradients in the same layout.
    force_reference(monkeypatch)
    case = make(11, DIM, FC1, RANK, 3, seed=9, top_k=2)
    for routed in (True, False):
        tensors = inputs(case, routed=routed)
        call = caller(routed=routed, top_k=2)
        check_against_float64(call, routed_adapter if routed else sparse_adapter,
                              reference.routed_adapter if routed else reference.sparse_adapter, tensors,
                              TOLERANCE[torch.float32])


@pytest.mark.parametrize("design", ["dense", "grouped"])
@pytest.mark.parametrize("gated", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_opcheck(gated, design):
    # The fake implementations give y [M, D_out] and the packed gradients' D_out-wide layout.
    case = {name: t.detach() if isinstance(t, torch.Tensor) else t
            for name, t in make(9, 20, 50, 3, 4, seed=1, top_k=2).items()}
    kwargs = dict(
        x=case["x"], w_gate=case["w_gate"] if gated else None, b_gate=case["b_gate"] if gated else None,
        expert_idx=None if gated else case["expert_idx"], expert_weight=None if gated else case["expert_weight"],
        w_down=case["w_down"], b_down=case["b_down"], w_up=case["w_up"], b_up=case["b_up"], scale=case["channel"],
        scale_value=1.0, residual=case["residual"], add_input=False, row_scale=None, top_k=2, activation="gelu",
        compute_dtype=torch.float32, out_dtype=torch.float32, autocast=False, save=True, return_logits=gated,
        design=design, variant="",
    )
    forward = torch.ops.fused_adapters.sparse_forward.default
    torch.library.opcheck(forward, (), kwargs, test_utils=("test_schema", "test_faketensor"))
    y, hidden, idx, weights, order, counts, logits = forward(**kwargs)
    assert y.shape == (9, 50)
    backward_kwargs = dict(
        grad_y=torch.randn_like(y), grad_logits=torch.randn_like(logits) if gated else None,
        **{name: kwargs[name] for name in ("x", "w_gate", "b_gate", "expert_idx", "expert_weight", "w_down", "b_down",
                                           "w_up", "b_up", "scale", "scale_value", "row_scale", "top_k", "activation",
                                           "compute_dtype", "autocast", "design", "variant")},
        add_grad_y=False, compute_dx=True, hidden=hidden, idx=idx, weights=weights, order=order, counts=counts,
    )
    torch.library.opcheck(torch.ops.fused_adapters.sparse_backward.default, (), backward_kwargs,
                          test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------------------------
# Structure: launches, what is saved, the same-width specialization
# --------------------------------------------------------------------------------------------


LAUNCHES = {
    # (design, routed, k): (forward launches, backward launches); as for D_out = D.
    ("default", True, 1): (["_sparse_forward_kernel"],
                           ["_sparse_backward_input_kernel", "_sparse_backward_weights_kernel"]),
    ("default", False, 2): (["_sparse_forward_kernel"],
                            ["_sparse_backward_input_kernel", "_sparse_backward_weights_kernel"]),
    ("grouped", True, 1): (["_grouped_forward_kernel"],
                           ["_grouped_backward_input_kernel", "_grouped_backward_weights_kernel"]),
    ("grouped", False, 2): (["_sparse_gate_kernel", "_grouped_forward_kernel", "_grouped_combine_kernel"],
                            ["_grouped_backward_input_kernel", "_grouped_backward_combine_kernel",
                             "_grouped_backward_weights_kernel"]),
}


@pytest.mark.parametrize("design, routed, top_k", sorted(LAUNCHES))
def test_launch_counts_and_specialization(design, routed, top_k, monkeypatch):
    case = make(16, 24, 72, 4, 4, seed=2, top_k=top_k)
    counter = LaunchCounter()
    flags = []
    original = sparse_plan.Launch.__call__

    def launch(self):
        flags.append(self.constexprs.get("SAME_WIDTH"))
        return original(self)

    monkeypatch.setattr(sparse_plan.Launch, "__call__", launch)
    tensors = inputs(case, routed=routed)
    with counter.patch(monkeypatch):
        y = caller(routed=routed, top_k=top_k)(functools.partial(
            routed_adapter if routed else sparse_adapter, variant=design), tensors)
        forward = list(counter.names)
        torch.autograd.grad(y, [t for t in tensors.values() if t.requires_grad], torch.ones_like(y))
    assert (forward, counter.names[len(forward):]) == LAUNCHES[(design, routed, top_k)]
    # Every launch with both widths is the width-changing specialization; the gate and the
    # combines (one width) have no such flag.
    assert set(flags) <= {False, None} and False in flags


def test_same_width_plans_keep_the_same_width_specialization():
    # D_out = D compiles as before width-changing mixtures: SAME_WIDTH on in every launch that
    # has both widths, and the packed gradients' layout unchanged.
    rows, dim, experts, rank = 300, 64, 4, 8
    x = torch.empty(rows, dim)
    w_down, w_up = torch.empty(experts, rank, dim), torch.empty(experts, dim, rank)
    hidden, weights = torch.empty(rows, experts * rank), torch.empty(rows, experts)
    idx, order = torch.zeros(rows, 2, dtype=torch.int32), torch.arange(rows * 2)
    counts = torch.full((experts,), rows * 2 // experts)
    plans = [
        sparse_plan.forward(x, None, None, idx, weights[:, :2], w_down, None, w_up, None, None, 1.0, None, True, None,
                            2, "gelu", torch.float32, torch.float32, True, False),
        sparse_plan.backward(x, None, x, hidden, weights, None, w_down, w_up, None, None, 1.0, None, "gelu",
                             torch.float32, True, True, torch.float32),
        sparse_plan.grouped_forward(x, idx, weights[:, :2], order, counts, w_down, None, w_up, None, None, 1.0, None,
                                    True, None, "gelu", torch.float32, torch.float32, True),
        sparse_plan.grouped_backward(x, None, x, torch.empty(rows * 2, rank), idx, weights[:, :2], order, counts, None,
                                     w_down, w_up, None, None, 1.0, None, "gelu", torch.float32, True, True,
                                     torch.float32),
    ]
    launches = [launch for plan in plans for launch in plan.launches.values()]
    both = [launch for launch in launches if "SAME_WIDTH" in launch.constexprs]
    assert len(both) == 6 and all(launch.constexprs["SAME_WIDTH"] is True for launch in both)
    # dim_out, unread there, goes as 1: the JIT specializes it away, leaving the parameter list
    # (and so the machine code) the kernels had before D_out existed.
    assert all(launch.args["dim_out"] == 1 for launch in both)
    assert sparse_plan.grad_layout(experts, rank, dim).size == sparse_plan.grad_layout(experts, rank, dim, dim).size
    assert plans[1].buffers["partials"].shape[1] == sparse_plan.grad_layout(
        experts, rank, dim, scale_rows=plans[1].launches["sparse_backward_weights"].grid[2]).size


def test_saves_no_m_by_d_out_tensor():
    # What backward keeps is x by reference and the design's own [M, E*r] and [M, E]: neither the
    # residual nor y (both [M, D_out]).
    rows, experts, rank = 40, 4, 3
    case = make(rows, DIM, QKV, rank, experts, seed=4)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        caller(routed=True)(routed_adapter, inputs(case, routed=True))
    big = [t for t in saved if t.numel() >= rows * DIM]
    assert len(big) == 1 and big[0].data_ptr() == case["x"].data_ptr()


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_errors_name_the_argument_and_the_expected_shape():
    case = make(9, 16, 48, 4, 3, seed=0)
    x, idx, weight, w_down, b_down, w_up, b_up = (case[name] for name in (
        "x", "expert_idx", "expert_weight", "w_down", "b_down", "w_up", "b_up"))

    def routed(**change):
        args = dict(w_up=w_up, b_up=b_up, scale=case["channel"], residual=None)
        args.update(change)
        return routed_adapter(x, idx, weight, w_down, b_down, args["w_up"], args["b_up"], args["scale"],
                              residual=args["residual"])

    with pytest.raises(ValueError, match=r"w_up must have shape \[experts, D_out, rank\] = \[3, D_out, 4\]"):
        routed(w_up=torch.zeros(3, 48, 5))
    with pytest.raises(ValueError, match=r"w_up must have shape \[experts, D_out, rank\]"):
        routed(w_up=torch.zeros(3, 0, 4), b_up=None, scale=None)
    with pytest.raises(ValueError, match=r"w_up must have shape"):
        routed(w_up=torch.zeros(2, 48, 4))
    with pytest.raises(ValueError, match=r"b_up must have shape \[experts, D_out\] = \[3, 48\]"):
        routed(b_up=torch.zeros(3, 16))
    with pytest.raises(ValueError, match=r"scale must be a \[D_out\] = \[48\] tensor"):
        routed(scale=torch.ones(16))
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(9, 48\)"):
        routed(residual=torch.zeros(9, 16))
    # x as the residual (the op adds its input) needs D_out = D: named, with the reason.
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(9, 48\).*x itself .* D_out = D"):
        routed(residual=x)
    with pytest.raises(ValueError, match=r"residual\[1\] must have the output's shape"):
        routed(residual=(case["residual"], x))
    with pytest.raises(ValueError, match=r"b_up must have shape \[experts, D_out\] = \[3, 48\]"):
        sparse_adapter(x, case["w_gate"], None, w_down, None, w_up, torch.zeros(3, 47), top_k=2)
    # The same checks in the same words where D_out = D.
    with pytest.raises(ValueError, match=r"b_up must have shape \[experts, D\] = \[3, 16\]"):
        routed(w_up=torch.zeros(3, 16, 4), b_up=torch.zeros(3, 48), scale=None)
    with pytest.raises(ValueError, match=r"scale must be a \[D\] = \[16\] tensor"):
        routed(w_up=torch.zeros(3, 16, 4), b_up=None, scale=torch.ones(48))


def test_adapter_fusion_keeps_same_width_adapters():
    # AdapterFusion mixes adapters that read and write the same h: its check still wants D.
    from fused_adapters.kernels.checks import check_experts

    x = torch.empty(5, 16)
    with pytest.raises(ValueError, match=r"w_up must have shape \[experts, D, rank\] = \[2, 16, 3\]"):
        check_experts(x, torch.empty(2, 3, 16), None, torch.empty(2, 48, 3), None)
    assert check_experts(x, torch.empty(2, 3, 16), None, torch.empty(2, 48, 3), None, any_width=True) == (2, 3)


# --------------------------------------------------------------------------------------------
# Compile check cases and bytes
# --------------------------------------------------------------------------------------------


def test_wide_compile_cases_cover_every_configuration():
    # Built without a compiler: the width-changing specializations of the three dense kernels at
    # every configuration of their tables (block-rows variants included, both forward forms, both
    # backward act modes), D_out = 3 D, SAME_WIDTH off and x no residual term, and in the
    # unaligned scenario the narrow form D_out = D // 4; the same-width cases keep SAME_WIDTH on.
    from fused_adapters.kernels.launch import row_variants
    from fused_adapters.kernels.sparse import configs
    from fused_adapters.tools.compile_cases import (
        ARCHS, DTYPES, SCENARIOS, SPARSE_WIDE_FACTOR, SPARSE_WIDE_KERNELS, _cases, build_launches,
    )

    cases = list(_cases(ARCHS, DTYPES, SCENARIOS, SPARSE_WIDE_KERNELS))
    same = list(_cases(ARCHS, DTYPES, SCENARIOS, [kernel.removesuffix("_wide") for kernel in SPARSE_WIDE_KERNELS]))
    assert len([case for case in cases if not case[8]]) == len(same)
    assert {case[4] for case in cases if case[8]} == {"unaligned"}  # the narrow form
    for kernel, table, same_table in (
            ("sparse_forward_wide", configs.FORWARD_CONFIGS, configs.FORWARD_CONFIGS),
            ("sparse_backward_input_wide", configs.BACKWARD_INPUT_WIDE_CONFIGS, configs.BACKWARD_INPUT_CONFIGS),
            ("sparse_backward_weights_wide", configs.BACKWARD_WEIGHTS_WIDE_CONFIGS, configs.BACKWARD_WEIGHTS_CONFIGS)):
        names = {case[5].name for case in cases if case[0] == kernel}
        fixed_rows = kernel == "sparse_backward_weights_wide"  # its block rows are the configuration's
        assert names == {v.name for c in table.values() for v in ([c] if fixed_rows else row_variants(c))}, kernel
        # The wide tables are the same-width ones but for entries of their own.
        assert table.keys() == same_table.keys()
        assert all(table[key] is same_table[key] or "_wide_" in table[key].name for key in table)
    assert any(case[7] for case in cases if case[0] == "sparse_forward_wide")  # the routed form
    assert {case[6] for case in cases if case[0] != "sparse_forward_wide"} == {False, True}  # store_act
    for scenario in SCENARIOS:
        for kernel in SPARSE_WIDE_KERNELS:
            launch = build_launches(kernel, 64, "float16", scenario)
            assert launch.constexprs["SAME_WIDTH"] is False
            assert launch.args["dim_out"] == SPARSE_WIDE_FACTOR * launch.args["dim"]
            assert not launch.constexprs.get("ADD_INPUT") and not launch.constexprs.get("ADD_GRAD_Y")
            narrow = build_launches(kernel, 64, "float16", scenario, None, False, False, True)
            assert narrow.args["dim_out"] == narrow.args["dim"] // 4 and narrow.constexprs["SAME_WIDTH"] is False
            same_width = build_launches(kernel.removesuffix("_wide"), 64, "float16", scenario)
            assert same_width.constexprs["SAME_WIDTH"] is True and same_width.config is launch.config
        weights = build_launches("sparse_backward_weights_wide", 64, "float16", scenario)
        assert weights.grid[1] == -(-weights.args["dim_out"] // weights.constexprs["BLOCK_DIM"])
        assert build_launches("sparse_forward_wide", 64, "float16", scenario, routed=True).constexprs["GATED"] is False
        # The plan picks the wide table's own entries where it has them.
        assert build_launches("sparse_backward_weights_wide", 16, "float16", scenario).config.name == \
            "sparse_bwd_weights_wide_c16_half"
        assert build_launches("sparse_backward_weights", 16, "float16", scenario).config.name == \
            "sparse_bwd_weights_c16_half"


def test_grouped_wide_compile_cases_cover_every_configuration():
    # The grouped kernels with both widths, likewise: every configuration of their (wide) tables,
    # the k = 1 forms, D_out = 3 D, SAME_WIDTH off, x no residual term.
    from fused_adapters.kernels.sparse import configs
    from fused_adapters.tools.compile_cases import (
        ARCHS, DTYPES, GROUPED_WIDE_KERNELS, SCENARIOS, SPARSE_WIDE_FACTOR, _cases, build_launches,
    )

    cases = list(_cases(ARCHS, DTYPES, SCENARIOS, GROUPED_WIDE_KERNELS))
    same = list(_cases(ARCHS, DTYPES, SCENARIOS, [kernel.removesuffix("_wide") for kernel in GROUPED_WIDE_KERNELS]))
    assert len(cases) == len(same)
    for kernel, table, same_table in (
            ("grouped_forward_wide", configs.GROUPED_FORWARD_WIDE_CONFIGS, configs.GROUPED_FORWARD_CONFIGS),
            ("grouped_backward_input_wide", configs.GROUPED_BACKWARD_INPUT_CONFIGS,
             configs.GROUPED_BACKWARD_INPUT_CONFIGS),
            ("grouped_backward_weights_wide", configs.GROUPED_BACKWARD_WEIGHTS_WIDE_CONFIGS,
             configs.GROUPED_BACKWARD_WEIGHTS_CONFIGS)):
        assert {case[5].name for case in cases if case[0] == kernel} == {c.name for c in table.values()}, kernel
        assert table.keys() == same_table.keys()
        assert all(table[key] is same_table[key] or "_wide_" in table[key].name for key in table)
    assert {case[0] for case in cases if case[8]} == {"grouped_forward_wide", "grouped_backward_input_wide"}
    for scenario in SCENARIOS:
        for kernel in GROUPED_WIDE_KERNELS:
            for single in ((False, True) if "weights" not in kernel else (False,)):
                launch = build_launches(kernel, 16, "float16", scenario, single=single)
                assert launch.constexprs["SAME_WIDTH"] is False
                assert launch.args["dim_out"] == SPARSE_WIDE_FACTOR * launch.args["dim"]
                assert not launch.constexprs.get("ADD_INPUT") and not launch.constexprs.get("ADD_GRAD_Y")
                assert build_launches(kernel.removesuffix("_wide"), 16, "float16", scenario,
                                      single=single).constexprs["SAME_WIDTH"] is True
        weights = build_launches("grouped_backward_weights_wide", 16, "float32", scenario)
        assert weights.config.name == "grouped_bwd_weights_wide_r16_fp32"  # the wide table's own entry
        assert weights.grid[1] == -(-weights.args["dim_out"] // weights.constexprs["BLOCK_DIM"])


def _environment_without_interpreter():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compile the real kernels, not the interpreter's
    return env


@pytest.mark.slow
def test_wide_kernels_compile_without_spills():
    # The smallest configurations of the three dense width-changing specializations, and the
    # grouped forward's (k = 2 and k = 1), fp16 on sm_90, aligned, through the CLI: each compiles
    # to a cubin with tensor-core dots, no spills and vectorized loads (the full runs: --kernel
    # sparse_forward_wide sparse_backward_input_wide sparse_backward_weights_wide, and
    # grouped_forward_wide grouped_backward_input_wide grouped_backward_weights_wide).
    result = subprocess.run(
        [sys.executable, "-m", "fused_adapters.tools.compile_check",
         "--kernel", "sparse_forward_wide", "sparse_backward_input_wide", "sparse_backward_weights_wide",
         "grouped_forward_wide",
         "--config", "sparse_fwd_c16_half_rows16", "sparse_bwd_input_c16_half_rows16",
         "sparse_bwd_weights_wide_c16_half", "grouped_fwd_r16_half", "--dtype", "float16", "--arch", "90",
         "--scenario", "aligned", "--jobs", "2"],
        capture_output=True, text=True, env=_environment_without_interpreter(), timeout=300,
    )
    table = result.stdout
    assert result.returncode == 0, f"compile check failed:\n{table[-6000:]}\n{result.stderr[-3000:]}"
    rows = [line.split() for line in table.splitlines() if line.startswith(("sparse_", "grouped_"))]
    assert {(row[0], row[1]) for row in rows} == {
        ("sparse_forward_wide", "sparse_fwd_c16_half_rows16"),
        ("sparse_forward_wide", "sparse_fwd_c16_half_rows16+routed"),
        ("sparse_backward_input_wide", "sparse_bwd_input_c16_half_rows16"),
        ("sparse_backward_input_wide", "sparse_bwd_input_c16_half_rows16+store_act"),
        ("sparse_backward_weights_wide", "sparse_bwd_weights_wide_c16_half"),
        ("sparse_backward_weights_wide", "sparse_bwd_weights_wide_c16_half+store_act"),
        ("grouped_forward_wide", "grouped_fwd_r16_half"), ("grouped_forward_wide", "grouped_fwd_r16_half+k1"),
    }, table
    for row in rows:
        assert int(row[5]) > 0 and row[6] == row[7] == "0" and row[9] in ("mma.sync", "wgmma"), row


@pytest.mark.slow
def test_multi_task_lora_bytes():
    # Per-task LoRA on a ViT-B qkv (768 -> 2304) at batch 2 (M = 394), 8 tasks of rank 8, one per
    # row, fp16, launches planned for 132 SMs, the dense design. Floor: forward reads x and the
    # base output and writes y; backward reads dy and x and writes dx (the base output's gradient
    # is dy itself). Counted: forward 1.109x (every task's A and B are read: 9% of the floor
    # here), backward 2.074x (dy, 3x the size of x, read by both launches as in the single LoRA
    # branch's 1.656x, and every task's dA and dB written); at M = 1576: 1.039x and 1.782x. The
    # grouped design: 1.099x and 2.028x.
    from fused_adapters.tools.byte_count import count_bytes

    rows, dim, dim_out, rank, tasks = 394, 768, 2304, 8, 8
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).half().requires_grad_(True)

    x, base = randn(rows, dim), randn(rows, dim_out)
    w_down, w_up = randn(tasks, rank, dim, std=dim ** -0.5), randn(tasks, dim_out, rank, std=rank ** -0.5)
    task = torch.randint(0, tasks, (rows, 1), generator=generator)
    weight = torch.ones(rows, 1)
    with count_bytes(sm_count=132) as forward:
        y = sparse_op.routed_adapter_unchecked(x, task, weight, w_down, None, w_up, None, 2.0,
                                               activation="identity", residual=base)
    grad = torch.randn(y.shape, generator=generator).half()
    with count_bytes(sm_count=132) as backward:
        torch.autograd.grad(y, [x, base, w_down, w_up], grad)
    assert forward.triton_launches == 1 and backward.triton_launches == 2
    forward_ratio = forward.total() / (2 * rows * (dim + 2 * dim_out))
    backward_ratio = backward.total() / (2 * rows * (dim_out + 2 * dim))
    print(f"multi-task LoRA qkv, M {rows}: forward {forward.total()} B ({forward_ratio:.3f}x the floor), "
          f"backward {backward.total()} B ({backward_ratio:.3f}x)")
    assert forward_ratio <= 1.12, forward.summary()
    assert backward_ratio <= 2.10, backward.summary()
