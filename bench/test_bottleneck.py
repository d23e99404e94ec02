"""Op-level benchmark of the bottleneck adapter: forward, and forward+backward, of Adapter+'s
post adapter (y = x + s * up(gelu(down(x))), channel scale, biases) against eager PyTorch
(kernels/reference.py, the code the tests trust) and torch.compile of it, with every kernel
variant of the fused op side by side.

Shapes: ViT-S/B/L/H widths (D = 384, 768, 1024, 1280), M = batch x 197 tokens for batch 8 to
256, ranks 8, 16, 64; bf16, fp16 and fp32 activations under bf16 autocast on a GPU. On the CPU:
fp32 at small sizes, eager and compiled timed, fused rows device-free (see bench/conftest.py).

Dropout rows (row key "dropout", 0.1; the other rows have 0): dropout on act(h). fused is the
op with its in-kernel mask (a fresh seed per call, nothing of the mask saved); eager is the
unfused chain users ran: the reference with torch's F.dropout between the activation and the up
projection (bench.measure.torch_dropout_masks; its mask kept for backward), not the reference's
bit-exact Philox, which no user's code computes. Only eager and fused[default] (the variants'
other tiles add nothing to the dropout question), at the bf16 shapes on a GPU (quick: batch 32)
and the fp32 ones on the CPU. The CPU quick run keeps one, eager forward+backward (seconds: each
op's fused dropout row, its interpreter forward and count, added about 40 s on 2 cores;
bench/bytes.py --dropout counts the fused op).
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from bench.measure import (
    DROPOUT, DTYPES, TOKENS, bottleneck_inputs, dropout_arguments, floor_bytes, host_us, kernel_counts, peak_memory,
    rotation_count, saved_bytes, time_rotating, torch_dropout_masks,
)
from fused_adapters.kernels import bottleneck_adapter, list_variants, reference, use_variant
from fused_adapters.kernels.bottleneck import jit as bottleneck_jit

OP = "bottleneck_adapter"
PASSES = ("forward", "forward+backward")


def shapes(cuda: bool, quick: bool):
    """(dtype name, D, batch, rank) for this device and mode."""
    if cuda and quick:
        return itertools.product(("bf16", "fp32 (bf16 autocast)"), (768,), (8, 32, 128), (8,))
    if cuda:
        return itertools.product(("bf16", "fp16", "fp32 (bf16 autocast)"), (384, 768, 1024, 1280),
                                 (8, 32, 64, 128, 256), (8, 16, 64))
    if quick:
        return itertools.product(("fp32",), (768,), (8,), (8,))
    return itertools.product(("fp32",), (384, 768), (2, 8), (8, 64))


def providers():
    return [("eager", "-"), ("compile", "-")] + [("fused", name) for name in list_variants(OP)]


def dropout_rows(cuda: bool, quick: bool, dtype: str, batch: int) -> list:
    """(pass, provider, variant) of the dropout rows at a shape of shapes(): the bf16 ones on a
    GPU (quick: batch 32), the fp32 ones on the CPU (quick: one row)."""
    if dtype != ("bf16" if cuda else "fp32") or (cuda and quick and batch != 32):
        return []
    if quick and not cuda:
        return [("forward+backward", "eager", "-")]
    return [(pass_name, provider, variant) for pass_name in PASSES
            for provider, variant in (("eager", "-"), ("fused", "default"))]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    cuda, quick = torch.cuda.is_available(), config.getoption("--benchmark-quick")
    cases, ids = [], []
    for dtype, dim, batch, rank in shapes(cuda, quick):
        rows = [(pass_name, provider, variant, 0.0) for pass_name in PASSES for provider, variant in providers()]
        rows += [(pass_name, provider, variant, DROPOUT)
                 for pass_name, provider, variant in dropout_rows(cuda, quick, dtype, batch)]
        for pass_name, provider, variant, dropout in rows:
            cases.append((pass_name, dtype, dim, batch * TOKENS, rank, provider, variant, dropout))
            label = provider if variant == "-" else f"{provider}[{variant}]"
            rate = f"-dropout{dropout}" if dropout else ""
            ids.append(f"{pass_name}{rate}-{dtype.replace(' ', '')}-D{dim}-M{batch * TOKENS}-r{rank}-{label}")
    metafunc.parametrize("case", cases, ids=ids)


_COMPILED = {}


def _function(provider: str):
    if provider == "fused":
        return bottleneck_adapter
    if provider == "eager":
        return reference.bottleneck_adapter
    if "compiled" not in _COMPILED:
        _COMPILED["compiled"] = torch.compile(reference.bottleneck_adapter, dynamic=False)
    return _COMPILED["compiled"]


KERNEL_NAMES = {name for name in vars(bottleneck_jit) if name.endswith("_kernel")}


def test_bottleneck(benchmark, suite, case):
    pass_name, dtype_name, dim, rows, rank, provider, variant, dropout = case
    device = suite.device
    dtype, autocast_dtype = DTYPES[dtype_name]
    x_size = torch.empty((), dtype=dtype).element_size()
    # y has x's dtype (under autocast the fp32 residual promotes y to fp32, x's dtype too).
    floor = floor_bytes(pass_name, rows, dim, x_size, x_size)
    shape = f"M={rows} D={dim} r={rank}" + (f" dropout={dropout}" if dropout else "")
    row = suite.row(op="bottleneck", shape=shape, rows=rows, dim=dim, rank=rank, dropout=dropout, dtype=dtype_name,
                    provider=provider, variant=variant, floor_bytes=floor, **{"pass": pass_name})
    count_case = dict(provider=provider, variant=variant if provider == "fused" else "default", rows=rows, dim=dim,
                      rank=rank, dropout=dropout, dtype=dtype_name, **{"pass": pass_name})

    if provider == "fused" and not suite.cuda:
        # Nothing to time: the interpreter's speed means nothing. The row keeps what needs no GPU.
        inputs = bottleneck_inputs(rows, dim, rank, dtype, device, True)
        row["saved_bytes"] = saved_bytes(
            lambda: _call(bottleneck_adapter, inputs, autocast_dtype, device, variant, dropout), inputs.values(),
            device)
        suite.untimed.append(row)
        suite.count_later(row, count_case)
        suite.compile_rows.append(row)
        pytest.skip("fused timings need CUDA: device-free counts for this row are in the summary and in the JSON")

    benchmark.group = f"bottleneck {pass_name} {dtype_name} D={dim} r={rank}"
    benchmark.extra_info.update(row)
    row = benchmark.extra_info  # filled in below, and by the session (device-free counts) at the end
    fn = _function(provider)
    # What each call reads that the previous calls did not: x, and dy for the backward (the
    # outputs reuse the allocator's blocks).
    set_bytes = rows * dim * x_size * (1 if pass_name == "forward" else 2)
    sets = [bottleneck_inputs(rows, dim, rank, dtype, device, True)
            for _ in range(rotation_count(set_bytes, device))]
    grads = [torch.randn(rows, dim, device=device, dtype=dtype) for _ in sets]
    variant_in_force = variant if provider == "fused" else "default"

    def run(index):
        # The backward runs inside the variant's block too: it takes the variant in force.
        with use_variant(OP, variant_in_force):
            inputs = sets[index]
            y = _call(fn, inputs, autocast_dtype, device, variant, dropout)
            if pass_name == "forward+backward":
                torch.autograd.grad(y, list(inputs.values()), grads[index])
            return y

    # Compile, JIT and autotuning run outside the timed region; see time_rotating.
    if not time_rotating(benchmark, suite, run, len(sets), min(len(sets), 2), floor):
        return
    if suite.cuda or provider != "compile":
        # On the CPU the saved-tensor hooks cannot vouch for what a compiled graph keeps.
        row["saved_bytes"] = saved_bytes(lambda: _call(fn, sets[0], autocast_dtype, device, variant, dropout),
                                         sets[0].values(), device)
    row["peak_mem_bytes"] = peak_memory(lambda: run(0), device)
    row["host_us"] = host_us(lambda: run(0), device)
    row["triton_launches"], row["aten_kernels"] = kernel_counts(lambda: run(0), device, KERNEL_NAMES)
    if provider != "compile":  # the interpreter cannot count inside a compiled graph
        suite.count_later(row, count_case)


def _call(fn, inputs, autocast_dtype, device, variant, dropout=0.0):
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    fused = fn is bottleneck_adapter
    # The eager chain's mask is torch's, kept for backward by autograd: the backward needs no mask context.
    masks = torch_dropout_masks() if dropout and not fused else contextlib.nullcontext()
    with autocast, use_variant(OP, variant if fused else "default"), masks:
        return fn(inputs["x"], inputs["w_down"], inputs["b_down"], inputs["w_up"], inputs["b_up"], inputs["scale"],
                  residual=inputs["x"], **dropout_arguments(dropout, fused, device))
