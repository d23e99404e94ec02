"""The smoke selection: every op's default path once (AdapterFusion's included), with the LoRA
linear's single launch and the sparse mixture's grouped design beside it, at one small shape, in fp16 and bf16, forward and
every gradient against float64, outputs poisoned with NaN.

`bash bench/gpu_check.sh OUT --smoke` runs this file first on a CUDA machine: the first check
of real launches and of bf16 (a few dozen kernel compiles, seconds each). Elsewhere it runs in
Triton's interpreter like the rest of the suite, bf16 skipped (the interpreter has none); the
fast mode (-m "not slow") leaves it out: the op tests cover the same paths on the CPU."""

import pytest
import torch
import torch.nn.functional as F

from fused_adapters.kernels import (
    adapter_fusion, backend, bottleneck_adapter, lora_linear, reference, routed_adapter, sparse_adapter, use_variant,
)
from helpers import (
    DEVICE, NO_CUDA_REASON, TOLERANCE, LaunchCounter, check_against_float64, poisoned_outputs,
)

DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE != "cuda",
                                                                                 reason=NO_CUDA_REASON))]
# Three images of 37 tokens: 111 rows (odd, a partial last row tile), ViT-aligned D = 96.
SHAPE, RANK = (3, 37, 96), 8
# The sparse mixture as the timings run it: E = 8 experts, top-2, rank 16.
EXPERTS, TOP_K, EXPERT_RANK = 8, 2, 16

pytestmark = pytest.mark.slow


def randn(generator, *size, dtype, std=1.0, grad=True):
    return (torch.randn(*size, generator=generator) * std).to(DEVICE, dtype).requires_grad_(grad)


def check_kernels(call, fn, reference_fn, tensors, dtype, grad_factor=1.0):
    """check_against_float64 with outputs poisoned, and the Triton kernels (not a fallback) run."""
    assert backend(tensors["x"]) in ("triton", "interpreter")
    monkeypatch = pytest.MonkeyPatch()
    try:
        with poisoned_outputs(monkeypatch), LaunchCounter().patch(monkeypatch) as launches:
            check_against_float64(call, fn, reference_fn, tensors, TOLERANCE[dtype],
                                  grad_factor * TOLERANCE[dtype])
    finally:
        monkeypatch.undo()
    return launches.names


# Each position's residual argument (adapters/timm_vit.py): post, pre and pfeiffer add the input
# itself; intermediate and houlsby the skip plus the input; parallel another tensor; none.
RESIDUALS = {
    "input": lambda t: t["x"],
    "skip+input": lambda t: (t["skip"], t["x"]),
    "tensor": lambda t: t["skip"],
    "none": lambda t: None,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", list(RESIDUALS))
def test_bottleneck(residual, dtype):
    generator = torch.Generator().manual_seed(1)
    dim = SHAPE[-1]
    tensors = dict(x=randn(generator, *SHAPE, dtype=dtype), w_down=randn(generator, RANK, dim, dtype=dtype, std=dim ** -0.5),
                   b_down=randn(generator, RANK, dtype=dtype, std=0.5),
                   w_up=randn(generator, dim, RANK, dtype=dtype, std=RANK ** -0.5),
                   b_up=randn(generator, dim, dtype=dtype, std=0.5), scale=randn(generator, dim, dtype=dtype))
    if residual in ("skip+input", "tensor"):
        tensors["skip"] = randn(generator, *SHAPE, dtype=dtype)
    # Drop path's per-row scale, as in training.
    row_scale = (torch.rand(SHAPE[0] * SHAPE[1], generator=generator) + 0.5).to(DEVICE)

    def call(fn, t):
        return fn(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], t["scale"], residual=RESIDUALS[residual](t),
                  row_scale=row_scale)

    names = check_kernels(call, bottleneck_adapter, reference.bottleneck_adapter, tensors, dtype)
    assert len(names) == 3, names  # one launch forward, two backward


def lora_tensors(dtype):
    """ViT's qkv in small: D -> 3D, rank 8, the frozen weight and bias without gradients."""
    generator = torch.Generator().manual_seed(2)
    dim = SHAPE[-1]
    return dict(x=randn(generator, *SHAPE, dtype=dtype),
                weight=randn(generator, 3 * dim, dim, dtype=dtype, std=dim ** -0.5, grad=False),
                bias=randn(generator, 3 * dim, dtype=dtype, std=0.1, grad=False),
                lora_a=randn(generator, RANK, dim, dtype=dtype, std=dim ** -0.5),
                lora_b=randn(generator, 3 * dim, RANK, dtype=dtype, std=0.5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_branch(dtype):
    # The default form's branch: a width-changing bottleneck, identity, no biases, a float scale,
    # the base GEMM's output as the residual.
    tensors = lora_tensors(dtype)
    tensors["base"] = F.linear(tensors["x"], tensors["weight"], tensors["bias"]).detach().requires_grad_()

    def call(fn, t):
        return fn(t["x"], t["lora_a"], None, t["lora_b"], None, 2.0, activation="identity", residual=t["base"])

    names = check_kernels(call, bottleneck_adapter, reference.bottleneck_adapter, tensors, dtype)
    assert len(names) == 3, names


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["default", "single_launch"])
def test_lora_linear(form, dtype):
    def call(fn, t):
        return fn(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], 2.0)

    with use_variant("lora_linear", form):
        names = check_kernels(call, lora_linear, reference.lora_linear, lora_tensors(dtype), dtype)
    kernel = "_lora_linear_kernel" if form == "single_launch" else "_bottleneck_forward_kernel"
    assert names[0] == kernel, names


def sparse_tensors(dtype, routed):
    generator = torch.Generator().manual_seed(3)
    dim, rows = SHAPE[-1], SHAPE[0] * SHAPE[1]
    tensors = dict(x=randn(generator, *SHAPE, dtype=dtype))
    if routed:
        # TOP_K distinct experts per row, random positive weights: a multi-task batch's routing.
        tensors["expert_idx"] = torch.rand(rows, EXPERTS, generator=generator).argsort(dim=1)[:, :TOP_K].to(DEVICE)
        tensors["expert_weight"] = (torch.rand(rows, TOP_K, generator=generator) + 0.25).to(DEVICE).requires_grad_()
    else:  # the gate in fp32 whatever the experts' dtype
        tensors["w_gate"] = randn(generator, EXPERTS, dim, dtype=torch.float32, std=dim ** -0.5)
        tensors["b_gate"] = randn(generator, EXPERTS, dtype=torch.float32, std=0.1)
    tensors.update(w_down=randn(generator, EXPERTS, EXPERT_RANK, dim, dtype=dtype, std=dim ** -0.5),
                   b_down=randn(generator, EXPERTS, EXPERT_RANK, dtype=dtype, std=0.5),
                   w_up=randn(generator, EXPERTS, dim, EXPERT_RANK, dtype=dtype, std=EXPERT_RANK ** -0.5),
                   b_up=randn(generator, EXPERTS, dim, dtype=dtype, std=0.5), scale=randn(generator, dim, dtype=dtype))
    return tensors


def sparse_call(fn, t):
    experts = (t["w_down"], t["b_down"], t["w_up"], t["b_up"], t["scale"])
    if "expert_idx" in t:
        return fn(t["x"], t["expert_idx"], t["expert_weight"], *experts, residual=t["x"])
    return fn(t["x"], t["w_gate"], t["b_gate"], *experts, top_k=TOP_K, residual=t["x"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, design", [("sparse_adapter", "default"), ("sparse_adapter", "grouped"),
                                        ("routed_adapter", "default")])
def test_sparse(op, design, dtype):
    routed = op == "routed_adapter"
    fused, ref = (routed_adapter, reference.routed_adapter) if routed else (sparse_adapter, reference.sparse_adapter)
    with use_variant("sparse_adapter", design):
        # Gradients sum rounded products over rows and experts: twice the forward's bound, as
        # tests/test_sparse_kernel.py has it.
        names = check_kernels(sparse_call, fused, ref, sparse_tensors(dtype, routed), dtype, grad_factor=2.0)
    grouped = any("grouped" in name for name in names)
    assert names and grouped == (design == "grouped"), names


def fusion_tensors(dtype, seed):
    """4 frozen adapters of rank RANK with their scales, and the fusion's trainable weights."""
    generator = torch.Generator().manual_seed(seed)
    dim, adapters = SHAPE[-1], 4
    return dict(
        x=randn(generator, *SHAPE, dtype=dtype),
        w_down=randn(generator, adapters, RANK, dim, dtype=dtype, std=dim ** -0.5, grad=False),
        b_down=randn(generator, adapters, RANK, dtype=dtype, std=0.5, grad=False),
        w_up=randn(generator, adapters, dim, RANK, dtype=dtype, std=RANK ** -0.5, grad=False),
        b_up=randn(generator, adapters, dim, dtype=dtype, std=0.5, grad=False),
        scale=randn(generator, adapters, dim, dtype=dtype, grad=False),
        w_query=randn(generator, dim, dim, dtype=dtype, std=dim ** -0.5),
        b_query=randn(generator, dim, dtype=dtype, std=0.3),
        w_key=randn(generator, dim, dim, dtype=dtype, std=dim ** -0.5),
        w_value=randn(generator, dim, dim, dtype=dtype, std=dim ** -0.5),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_fusion(dtype):
    """AdapterFusion over 4 frozen adapters (the fusion's weights trainable): the scores launch,
    the mixture's launch, and backward the mixture's two and the scores' one."""
    tensors = fusion_tensors(dtype, 5)

    def call(fn, t):
        return fn(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], t["scale"], t["w_query"], t["b_query"],
                  t["w_key"], None, t["w_value"], residual=t["x"])

    # The scores are dot products of D-long rounded vectors, and the weights' gradients sum them
    # over rows: four times the forward's bound for the gradients (tests/test_fusion_kernel.py).
    names = check_kernels(call, adapter_fusion, reference.adapter_fusion, tensors, dtype, grad_factor=4.0)
    assert sorted(set(names)) == sorted({"_fusion_scores_kernel", "_sparse_forward_kernel",
                                         "_fusion_scores_backward_kernel", "_sparse_backward_input_kernel",
                                         "_sparse_backward_weights_kernel"}), names


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["bottleneck", "lora_default", "lora_single_launch", "sparse_default",
                                "sparse_grouped", "routed", "fusion"])
def test_dropout(op, dtype):
    """Each op with dropout 0.2 inside its kernels, against the float64 reference drawing the same
    masks from the same seed (the mask is a function of the seed: kernels/dropout.py)."""
    seed = torch.tensor(20261207, device=DEVICE)
    if op == "bottleneck":
        generator = torch.Generator().manual_seed(6)
        dim = SHAPE[-1]
        tensors = dict(x=randn(generator, *SHAPE, dtype=dtype),
                       w_down=randn(generator, RANK, dim, dtype=dtype, std=dim ** -0.5),
                       b_down=randn(generator, RANK, dtype=dtype, std=0.5),
                       w_up=randn(generator, dim, RANK, dtype=dtype, std=RANK ** -0.5),
                       b_up=randn(generator, dim, dtype=dtype, std=0.5), scale=randn(generator, dim, dtype=dtype))

        def call(fn, t):
            return fn(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], t["scale"], residual=t["x"],
                      dropout=0.2, input_dropout=0.1, seed=seed)

        names = check_kernels(call, bottleneck_adapter, reference.bottleneck_adapter, tensors, dtype)
        assert len(names) == 3, names
    elif op.startswith("lora"):
        def call(fn, t):
            return fn(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], 2.0, dropout=0.2, seed=seed)

        with use_variant("lora_linear", op.removeprefix("lora_")):
            check_kernels(call, lora_linear, reference.lora_linear, lora_tensors(dtype), dtype)
    elif op == "fusion":
        def call(fn, t):
            return fn(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], t["scale"], t["w_query"],
                      t["b_query"], t["w_key"], None, t["w_value"], residual=t["x"], dropout=0.2, seed=seed)

        check_kernels(call, adapter_fusion, reference.adapter_fusion, fusion_tensors(dtype, 7), dtype,
                      grad_factor=4.0)
    else:
        routed = op == "routed"
        fused, ref = (routed_adapter, reference.routed_adapter) if routed else \
            (sparse_adapter, reference.sparse_adapter)

        def call(fn, t):
            experts = (t["w_down"], t["b_down"], t["w_up"], t["b_up"], t["scale"])
            if routed:
                return fn(t["x"], t["expert_idx"], t["expert_weight"], *experts, residual=t["x"], dropout=0.2,
                          seed=seed)
            return fn(t["x"], t["w_gate"], t["b_gate"], *experts, top_k=TOP_K, residual=t["x"], dropout=0.2,
                      seed=seed)

        with use_variant("sparse_adapter", "grouped" if op == "sparse_grouped" else "default"):
            check_kernels(call, fused, ref, sparse_tensors(dtype, routed), dtype, grad_factor=2.0)
