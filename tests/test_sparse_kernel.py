"""sparse_adapter and routed_adapter (the fused sparse mixture of adapters) against the float64
reference: forward and every gradient (the logits' own gradient included), fp32 and fp16, odd
shapes, k = 1 and k = E, deliberate ties, repeated experts in the routed form, every epilogue
option, every variant, outputs poisoned with NaN; and the structural facts: launch counts, no
M x D aten op around the launches, bitwise determinism, what is saved for backward. Runs in
Triton's interpreter on machines without CUDA. The numerics tests run both designs: the dense-masked
default and the grouped variant (assignments sorted by expert)."""

import pytest
import torch

from fused_adapters.kernels import list_variants, reference, routed_adapter, sparse_adapter, use_variant
from fused_adapters.kernels.sparse import op as sparse_op
from fused_adapters.kernels.sparse import plan as sparse_plan
from fused_adapters.kernels.launch import launch_plan
from helpers import DEVICE, NO_CUDA_REASON, TOLERANCE, AtenRecorder, LaunchCounter, relative_error

PARAMS = ("w_down", "b_down", "w_up", "b_up")


def poison(shape, dtype, device):
    """A buffer whose every element is wrong until written: NaN, or for integers an expert index
    far out of range."""
    return torch.full(shape, float("nan") if dtype.is_floating_point else 2**30, dtype=dtype, device=device)


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(sparse_plan, "new_output", poison)
    monkeypatch.setattr(sparse_op, "new_output", poison)


@pytest.fixture(params=["default", "grouped"])
def design(request):
    """The variant naming each design: dense-masked ("default") and grouped."""
    return request.param


def make(rows, dim, rank, experts, dtype, seed, bias=True, top_k=2):
    """Leaf tensors for both forms: the gate, the routing (top_k experts per row, drawn at
    random, with a repeated expert on row 0 when k > 1), the experts and the epilogue inputs."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=generator) * std).to(DEVICE, dt).requires_grad_(True)

    expert_idx = torch.randint(0, experts, (rows, top_k), generator=generator)
    if rows and top_k > 1:
        expert_idx[0, 1] = expert_idx[0, 0]
    return dict(
        x=randn(rows, dim), w_gate=randn(experts, dim, std=0.3, dt=torch.float32),
        b_gate=randn(experts, dt=torch.float32) if bias else None,
        expert_idx=expert_idx.to(DEVICE), expert_weight=randn(rows, top_k, dt=torch.float32),
        w_down=randn(experts, rank, dim, std=dim ** -0.5), b_down=randn(experts, rank, std=0.5) if bias else None,
        w_up=randn(experts, dim, rank, std=rank ** -0.5), b_up=randn(experts, dim, std=0.5) if bias else None,
        scale=randn(dim), residual=randn(rows, dim),
        row_scale=(torch.rand(rows, generator=generator) + 0.5).to(DEVICE),
    )


def call(fn, case, *, routed, top_k=2, scale="channel", residual="tensor", row_scale=True, activation="gelu",
         **kwargs):
    """One call of fn (the fused op or the reference) on case's tensors; returns (outputs, the
    differentiable inputs by name)."""
    scale_arg = {"channel": case["scale"], "float": 0.7, "none": None, "tensor": case["scale"][:1]}[scale]
    residual_arg = {"tensor": case["residual"], "none": None, "x": case["x"],
                    "skip+x": (case["residual"], case["x"])}[residual]
    common = dict(activation=activation, residual=residual_arg,
                  row_scale=case["row_scale"] if row_scale else None, **kwargs)
    experts = [case[name] for name in PARAMS]
    if routed:
        out = fn(case["x"], case["expert_idx"], case["expert_weight"], *experts, scale_arg, **common)
        names = ["x", "expert_weight", *PARAMS]
    else:
        out = fn(case["x"], case["w_gate"], case["b_gate"], *experts, scale_arg, top_k=top_k, return_logits=True,
                 **common)
        names = ["x", "w_gate", "b_gate", *PARAMS]
    names += (["scale"] if scale in ("channel", "tensor") else []) + (["residual"] if residual in ("tensor", "skip+x")
                                                                      else [])
    return out, {name: case[name] for name in names if case[name] is not None}


def float64(case):
    return {name: (t.detach().double().requires_grad_(t.requires_grad) if t is not None and t.is_floating_point()
                   else t) for name, t in case.items()}


def check(case, dtype, *, routed, top_k=2, **options):
    """Forward and every gradient against float64; returns the fused forward output."""
    variant = {"variant": options.pop("variant")} if "variant" in options else {}
    out, inputs = call(routed_adapter if routed else sparse_adapter, case, routed=routed, top_k=top_k, **options,
                       **variant)
    wide = float64(case)
    expected, wide_inputs = call(reference.routed_adapter if routed else reference.sparse_adapter, wide,
                                 routed=routed, top_k=top_k, **options)
    generator = torch.Generator().manual_seed(7)
    if routed:
        outs, refs = [out], [expected]
    else:
        outs, refs = list(out), list(expected)
    assert outs[0].shape == case["x"].shape
    grads_out = [torch.randn(o.shape, generator=generator).to(DEVICE) for o in refs]
    tolerance = TOLERANCE[dtype]
    for name, o, r in zip(("y", "logits"), outs, refs):
        assert relative_error(o, r) <= tolerance, (name, relative_error(o, r))
    got = torch.autograd.grad(outs, list(inputs.values()), [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    want = torch.autograd.grad(refs, list(wide_inputs.values()), [g.double() for g in grads_out])
    for name, g, w in zip(inputs, got, want):
        assert g.dtype == inputs[name].dtype, name
        # fp16 gradients sum rounded products over rows: twice the forward's bound.
        assert relative_error(g, w) <= 2 * tolerance, (name, relative_error(g, w))
    return outs[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
# Fast mode keeps a single expert, an odd E with k = 2 and the widest k.
@pytest.mark.parametrize("experts, top_k", [(1, 1), pytest.param(5, 1, marks=pytest.mark.slow), (5, 2),
                                            pytest.param(5, 5, marks=pytest.mark.slow),
                                            pytest.param(8, 2, marks=pytest.mark.slow), (16, 3)])
def test_gated_against_float64(experts, top_k, dtype, design, poisoned):
    case = make(37, 45, 3, experts, dtype, seed=experts * 10 + top_k)
    check(case, dtype, routed=False, top_k=top_k, variant=design)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("experts, top_k", [(1, 1), pytest.param(4, 1, marks=pytest.mark.slow), (6, 3)])
def test_routed_against_float64(experts, top_k, dtype, design, poisoned):
    # Row 0 names one expert twice: its weights add up, and each slot gets that expert's gradient.
    case = make(41, 36, 5, experts, dtype, seed=experts + top_k, top_k=top_k)
    check(case, dtype, routed=True, variant=design)


@pytest.mark.parametrize("rows, dim, rank, experts", [(1, 1, 1, 2), (70, 33, 5, 4), (150, 70, 9, 8),
                                                      (40, 96, 16, 16)])
@pytest.mark.slow
def test_odd_shapes_and_plans(rows, dim, rank, experts, design, poisoned):
    # (150, 70, 9, 8): E*r = 72 splits the weights launch into 3 stacked-column blocks and M into
    # several row chunks; (40, 96, 16, 16): E*r = 256, the largest dense tile. Grouped: experts
    # with several tiles of assignments, and experts with none.
    case = make(rows, dim, rank, experts, torch.float32, seed=rows)
    check(case, torch.float32, routed=False, variant=design)
    check(case, torch.float32, routed=True, variant=design)


@pytest.mark.slow
def test_multi_chunk_backward_against_float64(poisoned):
    # Planned for 8 SMs, M = 260 fills them: the weights launch splits M into row chunks whose
    # fp32 partials torch sums, and E*r = 72 into 3 stacked-column blocks (dscale folded).
    rows, dim, rank, experts = 260, 70, 9, 8
    x = torch.empty(rows, dim)
    w_down, w_up = torch.empty(experts, rank, dim), torch.empty(experts, dim, rank)
    with launch_plan(8):
        planned = sparse_plan.backward(
            x, None, x, torch.empty(rows, 72), torch.empty(rows, experts), torch.empty(experts, dim), w_down, w_up,
            None, None, 1.0, None, "gelu", torch.float32, False, True, torch.float32)
        weights_launch, partials = planned.launches["sparse_backward_weights"], planned.buffers["partials"]
        assert weights_launch.grid[0] > 1 and weights_launch.grid[2] == 3
        assert partials.shape[0] == weights_launch.grid[0]
        case = make(rows, dim, rank, experts, torch.float32, seed=12)
        check(case, torch.float32, routed=False)
        check(case, torch.float32, routed=True, scale="tensor")


@pytest.mark.parametrize("activation", [a if a in ("gelu", "identity") else pytest.param(a, marks=pytest.mark.slow)
                                        for a in sorted(reference.ACTIVATIONS)])  # all in the bottleneck tests
def test_activations_and_epilogues(activation, design, poisoned):
    case = make(29, 40, 4, 6, torch.float32, seed=3, bias=activation != "relu")
    check(case, torch.float32, routed=False, activation=activation, scale="float", residual="x", row_scale=False,
          variant=design)
    check(case, torch.float32, routed=True, activation=activation, scale="none", residual="skip+x", variant=design)
    check(case, torch.float32, routed=False, top_k=3, activation=activation, scale="tensor", residual="none",
          variant=design)


# The interpreter's numpy arithmetic on the NaN rows warns, as it should.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("where", ["w_gate", "b_gate", "x"])
def test_nan_in_the_gate_propagates_as_in_the_reference(where, design, poisoned):
    # torch.topk ranks a NaN logit first, so the reference's row (or every row, for a NaN gate
    # parameter) comes out NaN; compared as NaN, the kernels' top-k never chose it: a dead expert
    # and a finite output, silently. Now the NaN rows are the reference's, and the rest agree.
    case = make(23, 16, 3, 5, torch.float32, seed=21)
    with torch.no_grad():
        if where == "x":
            case["x"][4, 7] = float("nan")
        else:
            case[where][2] = float("nan")  # b_gate[2], or all of w_gate's row 2
    y, logits = call(sparse_adapter, case, routed=False, variant=design)[0]
    ref, ref_logits = call(reference.sparse_adapter, case, routed=False)[0]
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y).any()
    finite = ~torch.isnan(ref)
    assert relative_error(y[finite], ref[finite]) <= TOLERANCE[torch.float32]
    assert torch.equal(torch.isnan(logits), torch.isnan(ref_logits))


def test_deliberate_ties_go_to_the_lower_expert(design, poisoned):
    # Experts 1 and 3 share a gate row and bias, so every row ties them, and they lead on every
    # row: expert 1 must win with k = 1; both get half the weight with k = 2.
    case = make(25, 32, 4, 5, torch.float32, seed=11, bias=True)
    with torch.no_grad():
        case["w_gate"][3] = case["w_gate"][1]
        case["b_gate"][1] += 50.0
        case["b_gate"][3] = case["b_gate"][1]
    y1 = check(case, torch.float32, routed=False, top_k=1, variant=design)
    with torch.no_grad():
        case["w_up"][3].zero_()  # had expert 3 been picked, the output would change
    torch.testing.assert_close(check(case, torch.float32, routed=False, top_k=1, variant=design), y1)
    check(case, torch.float32, routed=False, top_k=2, variant=design)


@pytest.mark.skipif(DEVICE != "cuda", reason=NO_CUDA_REASON)
@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_on_cuda(autocast, design):
    # bf16 tensors, and fp32 tensors under bf16 autocast (y fp32: the fp32 residual promotes).
    dtype = torch.float32 if autocast else torch.bfloat16
    case = make(300, 200, 12, 8, dtype, seed=13)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        check(case, torch.bfloat16, routed=False, variant=design)
        check(case, torch.bfloat16, routed=True, residual="x", variant=design)


def test_zero_rows(design):
    case = make(0, 16, 2, 3, torch.float32, seed=0)
    y, logits = sparse_adapter(case["x"], case["w_gate"], None, case["w_down"], None, case["w_up"], None, top_k=2,
                               return_logits=True, variant=design)
    assert y.shape == (0, 16) and logits.shape == (0, 3)
    y.sum().backward()
    assert case["w_down"].grad.abs().sum() == 0


def test_fp16_autocast_reads_fp32_tensors_in_place(design, poisoned):
    # fp32 x, parameters and residual under fp16 autocast: fp16 dots, fp32 gate, y promoted to
    # fp32 (the residual is fp32), every gradient in its input's dtype.
    case = make(33, 40, 4, 6, torch.float32, seed=21)
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = check(case, torch.float16, routed=False, residual="skip+x", variant=design)
        assert y.dtype == torch.float32
        y = check(case, torch.float16, routed=True, residual="none", scale="float", variant=design)
        assert y.dtype == torch.float16


def test_aux_loss_gradient_reaches_the_gate(design):
    # load_balancing_loss on the returned logits alone (no use of y): the gate still learns.
    case = make(30, 24, 4, 6, torch.float32, seed=5)
    _, logits = sparse_adapter(case["x"], case["w_gate"], case["b_gate"], *(case[n] for n in PARAMS), top_k=2,
                               return_logits=True, variant=design)
    _, ref_logits = reference.sparse_adapter(case["x"], case["w_gate"], case["b_gate"],
                                             *(case[n] for n in PARAMS), top_k=2, return_logits=True)
    loss = reference.load_balancing_loss(logits, 2)
    grads = torch.autograd.grad(loss, [case["w_gate"], case["x"]])
    want = torch.autograd.grad(reference.load_balancing_loss(ref_logits, 2), [case["w_gate"], case["x"]])
    for g, w in zip(grads, want):
        assert relative_error(g, w) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("variant", sorted(list_variants("sparse_adapter")))
@pytest.mark.parametrize("rank,experts", [(5, 6), pytest.param(30, 8, marks=pytest.mark.slow)])  # E*r pads to 32, 256
def test_every_variant_against_float64(variant, rank, experts, poisoned):
    case = make(70, 40, rank, experts, torch.float32, seed=31)
    with use_variant("sparse_adapter", variant):
        check(case, torch.float32, routed=False)
    check(case, torch.float32, routed=True, variant=variant)


def test_variant_argument_is_used_by_the_backward(monkeypatch):
    seen = []
    original = sparse_plan.backward

    def spy(*args, **kwargs):
        seen.append(args[-1].name)
        return original(*args, **kwargs)

    monkeypatch.setattr(sparse_plan, "backward", spy)
    case = make(20, 16, 2, 4, torch.float32, seed=2)
    y = sparse_adapter(case["x"], case["w_gate"], None, *(case[n] for n in PARAMS), top_k=2, variant="store_act")
    y.sum().backward()
    assert seen == ["store_act"]


def test_large_expert_count_runs_the_grouped_kernels(monkeypatch):
    # E*r = 272 > 256: the dense tiles do not fit; every variant runs the grouped design.
    case = make(9, 20, 17, 16, torch.float32, seed=4)
    counter = LaunchCounter()
    with counter.patch(monkeypatch):
        check(case, torch.float32, routed=False, variant="rows16")
    assert "_grouped_forward_kernel" in counter.names and "_sparse_forward_kernel" not in counter.names
    assert sparse_plan.choose_design(16, 17, "rows16") == "grouped" and sparse_plan.choose_design(16, 16) == "dense"


# --------------------------------------------------------------------------------------------
# Structure: launches, aten ops, determinism, saved tensors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("routed", [False, True])
def test_one_forward_launch_and_two_backward(routed, monkeypatch):
    rows, dim = 64, 48
    case = make(rows, dim, 4, 8, torch.float32, seed=9)
    counter = LaunchCounter()
    with counter.patch(monkeypatch), AtenRecorder(counter) as recorder:
        out, inputs = call(routed_adapter if routed else sparse_adapter, case, routed=routed, residual="x")
        forward_launches = list(counter.names)
        y = out if routed else out[0]
        torch.autograd.grad(y, list(inputs.values()), torch.ones_like(y))
    assert forward_launches == ["_sparse_forward_kernel"]
    assert counter.names[1:] == ["_sparse_backward_input_kernel", "_sparse_backward_weights_kernel"]
    big = [(op, shapes) for op, shapes in recorder.ops if any(len(s) == 2 and s == (rows, dim) for s in shapes)]
    # The only M x D tensors are the op's outputs and dy (ones_like): no copy, cast or add.
    assert all(op in ("ones_like", "empty", "view", "reshape", "_reshape_alias") for op, _ in big), big


GROUPED_LAUNCHES = {
    # (routed, k): (forward launches, backward launches)
    (False, 2): (["_sparse_gate_kernel", "_grouped_forward_kernel", "_grouped_combine_kernel"],
                 ["_grouped_backward_input_kernel", "_grouped_backward_combine_kernel",
                  "_grouped_backward_weights_kernel"]),
    (True, 2): (["_grouped_forward_kernel", "_grouped_combine_kernel"],
                ["_grouped_backward_input_kernel", "_grouped_backward_combine_kernel",
                 "_grouped_backward_weights_kernel"]),
    # One expert per row (multi-task batches): the grouped launches write y and dx themselves.
    (True, 1): (["_grouped_forward_kernel"], ["_grouped_backward_input_kernel", "_grouped_backward_weights_kernel"]),
}


@pytest.mark.parametrize("routed, top_k", sorted(GROUPED_LAUNCHES))
def test_grouped_launches(routed, top_k, monkeypatch):
    rows, dim = 64, 48
    case = make(rows, dim, 4, 8, torch.float32, seed=9, top_k=top_k)
    counter = LaunchCounter()
    with counter.patch(monkeypatch), AtenRecorder(counter) as recorder:
        out, inputs = call(routed_adapter if routed else sparse_adapter, case, routed=routed, top_k=top_k,
                           residual="x", variant="grouped")
        forward_launches = list(counter.names)
        y = out if routed else out[0]
        torch.autograd.grad(y, list(inputs.values()), torch.ones_like(y))
    forward, backward = GROUPED_LAUNCHES[(routed, top_k)]
    assert forward_launches == forward
    assert counter.names[len(forward):] == backward
    big = [(op, shapes) for op, shapes in recorder.ops if any(len(s) == 2 and s == (rows, dim) for s in shapes)]
    assert all(op in ("ones_like", "empty", "view", "reshape", "_reshape_alias") for op, _ in big), big


@pytest.mark.slow
def test_backward_is_bitwise_deterministic(design):
    case = make(150, 70, 9, 8, torch.float32, seed=8)
    results = []
    for _ in range(2):
        out, inputs = call(sparse_adapter, case, routed=False, variant=design)
        results.append(torch.autograd.grad(out[0], list(inputs.values()), torch.ones_like(out[0])))
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_saves_no_m_by_d_tensor_besides_x():
    rows, dim, rank, experts = 50, 64, 4, 8
    case = make(rows, dim, rank, experts, torch.float16, seed=6)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call(sparse_adapter, case, routed=False, residual="x")
    inputs = {case["x"].data_ptr(), case["row_scale"].data_ptr()}
    big = [t for t in saved if t.numel() >= rows * dim]
    assert len(big) == 1 and big[0].data_ptr() == case["x"].data_ptr()  # x by reference, no copy
    # Besides the inputs: the hidden layer [M, E*r] (compute dtype) and the routing weights [M, E] (fp32).
    own = [t for t in saved if t.dim() > 0 and t.shape[0] == rows and t.data_ptr() not in inputs]
    assert sorted((tuple(t.shape), t.dtype) for t in own) == [((rows, experts), torch.float32),
                                                              ((rows, experts * rank), torch.float16)]


def test_grouped_saves_no_m_by_d_tensor_besides_x():
    rows, dim, rank, experts, top_k = 50, 64, 4, 8, 2
    case = make(rows, dim, rank, experts, torch.float16, seed=6)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call(sparse_adapter, case, routed=False, residual="x", variant="grouped")
    inputs = {case["x"].data_ptr(), case["row_scale"].data_ptr()}
    big = [t for t in saved if t.numel() >= rows * dim]
    assert len(big) == 1 and big[0].data_ptr() == case["x"].data_ptr()
    # Besides the inputs: h by sorted position [M*k, r], the routing [M, k] (int32 experts, fp32
    # weights), the sort (order [M*k], counts [E]).
    own = [t for t in saved if t.dim() > 0 and t.data_ptr() not in inputs and t.shape[0] in (rows, rows * top_k)]
    assert sorted((tuple(t.shape), str(t.dtype)) for t in own) == sorted([
        ((rows * top_k, rank), "torch.float16"), ((rows, top_k), "torch.int32"), ((rows, top_k), "torch.float32"),
        ((rows * top_k,), "torch.int64")])


def test_grouped_gate_partials_over_several_chunks(monkeypatch, poisoned):
    # The gate's weight gradient summed over 3 row chunks of fp32 partials (big M plans more).
    monkeypatch.setattr(sparse_plan, "gate_chunks", lambda *args: 3)
    case = make(70, 40, 5, 6, torch.float32, seed=17)
    check(case, torch.float32, routed=False, variant="grouped")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_weights_launch_splits_large_ranks(dtype, poisoned):
    # Rank 100 pads to 128: the weights launch splits it into two rank blocks (their dscale rows
    # folded); E*r = 300, so every variant runs the grouped design.
    assert sparse_plan.weights_rank_blocks(100, dtype) == 2
    case = make(40, 24, 100, 3, dtype, seed=5)
    check(case, dtype, routed=False)
    check(case, dtype, routed=True, scale="tensor")


def test_grouped_launches_plan_for_the_gpu():
    # ViT-B/16 batch 32 (M = 6304, D = 768), E = 16, r = 32 (E*r = 512: grouped only), k = 2 on
    # 132 SMs: every launch gets at least one program per SM. Plans only.
    rows, dim, experts, rank, top_k = 6304, 768, 16, 32, 2
    half = torch.float16
    x = torch.empty(rows, dim, dtype=half)
    w_gate = torch.empty(experts, dim)
    w_down, w_up = torch.empty(experts, rank, dim, dtype=half), torch.empty(experts, dim, rank, dtype=half)
    idx, weights = torch.empty(rows, top_k, dtype=torch.int32), torch.empty(rows, top_k)
    order, counts = torch.empty(rows * top_k, dtype=torch.int64), torch.empty(experts, dtype=torch.int64)
    hidden = torch.empty(rows * top_k, rank, dtype=half)
    with launch_plan(132):
        plans = [sparse_plan.gate(x, w_gate, None, top_k, False)]
        plans.append(sparse_plan.grouped_forward(x, idx, weights, order, counts, w_down, None, w_up, None, None, 1.0,
                                                 None, True, None, "gelu", half, half, True))
        plans.append(sparse_plan.grouped_backward(x, None, x, hidden, idx, weights, order, counts, w_gate, w_down, w_up,
                                                  None, None, 1.0, None, "gelu", half, True, True, half))
    launches = [launch for plan in plans for launch in plan.launches.values()]
    assert len(launches) == 6
    for launch in launches:
        assert launch.programs >= 132, (launch.kernel.__name__, launch.grid)


def test_launches_plan_for_the_gpu():
    # ViT-B/16 batch 32 (M = 6304, D = 768), E = 8, r = 16 on 132 SMs: every launch gets at least
    # one program per SM. Plans only: nothing is launched.
    rows, dim, experts, rank = 6304, 768, 8, 16
    x = torch.empty(rows, dim, dtype=torch.float16)
    w_down, w_up = torch.empty(experts, rank, dim, dtype=torch.float16), torch.empty(experts, dim, rank,
                                                                                     dtype=torch.float16)
    hidden = torch.empty(rows, experts * rank, dtype=torch.float16)
    weights = torch.empty(rows, experts)
    with launch_plan(132):
        forward = sparse_plan.forward(x, torch.empty(experts, dim), None, None, None, w_down, None, w_up, None, None,
                                      1.0, None, True, None, 2, "gelu", torch.float16, torch.float16, True, False)
        backward = sparse_plan.backward(x, None, x, hidden, weights, torch.empty(experts, dim), w_down, w_up, None,
                                        None, 1.0, None, "gelu", torch.float16, True, True, torch.float16)
    launches = list(forward.launches.values()) + list(backward.launches.values())
    assert len(launches) == 3
    for launch in launches:
        assert launch.programs >= 132, (launch.kernel.__name__, launch.grid)
