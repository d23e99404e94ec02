"""Op-level benchmark of AdapterFusion: forward, and forward+backward, of adapter_fusion over N
frozen Adapter+ adapters at the post position (residual x), the fusion's W_q, b_q, W_k, b_k and
W_v trainable (I2I's fusion phase), against eager PyTorch (kernels/reference.py's
adapter_fusion, which forms every adapter's output, key and value: the code the tests trust)
and torch.compile of it. The rows carry the bottleneck rows' keys (bench/conftest.py's
ROW_KEYS) plus "adapters"; the byte floor is the bottleneck op's plus the fusion's three D x D
weights, read once a pass (the backward also writes their gradients).

Shapes: N = 2, 4, 8 and 16 adapters of rank 8. On a GPU D = 768 and 1024, M = batch x 197
tokens for batch 8 to 64, bf16, fp16 and fp32 under bf16 autocast (quick: D = 768, batch 32,
N = 4, bf16 and fp32 under autocast). On the CPU: fp32, D = 768, batch 2 and 8, N = 2, 4 and 8,
eager and compiled timed, fused rows device-free (see bench/conftest.py). The quick run on the
CPU keeps one small shape (D = 768, M = 197, N = 4) and leaves out torch.compile.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from bench.measure import (
    DTYPES, TOKENS, differentiable, fusion_call, fusion_floor_bytes, fusion_inputs, host_us, kernel_counts, peak_memory,
    rotation_count, saved_bytes, time_rotating,
)
from fused_adapters.kernels import adapter_fusion, reference
from fused_adapters.kernels.fusion import jit as fusion_jit
from fused_adapters.kernels.sparse import jit_dense

OP = "adapter_fusion"
PASSES = ("forward", "forward+backward")
RANK = 8


def shapes(cuda: bool, quick: bool):
    """(dtype name, D, batch, adapters) for this device and mode."""
    if cuda and quick:
        return itertools.product(("bf16", "fp32 (bf16 autocast)"), (768,), (32,), (4,))
    if quick:
        return itertools.product(("fp32",), (768,), (1,), (4,))
    if cuda:
        return itertools.product(("bf16", "fp16", "fp32 (bf16 autocast)"), (768, 1024), (8, 32, 64), (2, 4, 8, 16))
    return itertools.product(("fp32",), (768,), (2, 8), (2, 4, 8))


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    cases, ids = [], []
    for dtype, dim, batch, adapters in shapes(torch.cuda.is_available(), metafunc.config.getoption("--benchmark-quick")):
        rows = batch * TOKENS
        for pass_name in PASSES:
            for provider in ("eager", "compile", "fused"):
                cases.append((pass_name, dtype, dim, rows, adapters, provider))
                ids.append(f"{OP}-{pass_name}-{dtype.replace(' ', '')}-D{dim}-M{rows}-r{RANK}-N{adapters}-{provider}")
    metafunc.parametrize("case", cases, ids=ids)


_COMPILED = {}


def _function(provider: str):
    if provider == "fused":
        return adapter_fusion
    if provider == "eager":
        return reference.adapter_fusion
    if "compiled" not in _COMPILED:
        _COMPILED["compiled"] = torch.compile(reference.adapter_fusion, dynamic=False)
    return _COMPILED["compiled"]


# The Triton kernels the fused op launches, as the profiler names them on CUDA.
KERNEL_NAMES = {name for module in (fusion_jit, jit_dense) for name in vars(module) if name.endswith("_kernel")}
_SAVED: dict = {}


def _call(fn, inputs, autocast_dtype, device):
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        return fusion_call(fn, inputs)


def test_fusion(benchmark, suite, case):
    pass_name, dtype_name, dim, rows, adapters, provider = case
    device = suite.device
    dtype, autocast_dtype = DTYPES[dtype_name]
    x_size = torch.empty((), dtype=dtype).element_size()
    floor = fusion_floor_bytes(pass_name, rows, dim, x_size)
    row = suite.row(op=OP, shape=f"M={rows} D={dim} r={RANK} N={adapters}", rows=rows, dim=dim, rank=RANK,
                    adapters=adapters, dtype=dtype_name, provider=provider, variant="-" if provider != "fused"
                    else "default", floor_bytes=floor, **{"pass": pass_name})
    count_case = dict(op=OP, provider=provider, variant="default", rows=rows, dim=dim, rank=RANK, adapters=adapters,
                      dtype=dtype_name, **{"pass": pass_name})

    if provider == "fused" and not suite.cuda:
        key = (rows, dim, adapters, dtype_name)
        if key not in _SAVED:
            inputs = fusion_inputs(rows, dim, RANK, adapters, dtype, device, True, torch.Generator().manual_seed(0))
            _SAVED[key] = saved_bytes(lambda: _call(adapter_fusion, inputs, autocast_dtype, device), inputs.values(),
                                      device)
        row["saved_bytes"] = _SAVED[key]
        suite.untimed.append(row)
        suite.count_later(row, count_case)
        suite.compile_rows.append(row)
        pytest.skip("fused timings need CUDA: device-free counts for this row are in the summary and in the JSON")
    if provider == "compile" and not suite.cuda and suite.quick:
        pytest.skip("torch.compile of the eager fusion takes tens of seconds on a few CPU cores: run without "
                    "--benchmark-quick")

    benchmark.group = f"{OP} {pass_name} {dtype_name} D={dim} r={RANK} N={adapters}"
    benchmark.extra_info.update(row)
    row = benchmark.extra_info
    fn = _function(provider)
    set_bytes = rows * dim * x_size * (1 if pass_name == "forward" else 2)
    generator = torch.Generator().manual_seed(0)
    sets = [fusion_inputs(rows, dim, RANK, adapters, dtype, device, True, generator)
            for _ in range(rotation_count(set_bytes, device))]
    grads = [torch.randn(rows, dim, generator=generator).to(device=device, dtype=dtype) for _ in sets]

    def run(index):
        inputs = sets[index]
        y = _call(fn, inputs, autocast_dtype, device)
        if pass_name == "forward+backward":
            torch.autograd.grad(y, differentiable(inputs), grads[index].to(y.dtype))
        return y

    if not time_rotating(benchmark, suite, run, len(sets), min(len(sets), 2), floor):
        return
    if suite.cuda or provider != "compile":
        row["saved_bytes"] = saved_bytes(lambda: _call(fn, sets[0], autocast_dtype, device), sets[0].values(), device)
    row["peak_mem_bytes"] = peak_memory(lambda: run(0), device)
    row["host_us"] = host_us(lambda: run(0), device)
    row["triton_launches"], row["aten_kernels"] = kernel_counts(lambda: run(0), device, KERNEL_NAMES)
    if provider != "compile":
        suite.count_later(row, count_case)
