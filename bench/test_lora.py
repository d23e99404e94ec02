"""Op-level benchmark of a LoRA linear: forward, and forward+backward, of
y = F.linear(x, W, b) + s * (x A^T) B^T with the base layer frozen (W, b without gradients; x,
A and B with), s = alpha / r, alpha 16. Three providers run the whole linear, base GEMM
included: "eager" is PEFT's plain PyTorch, `F.linear(x, W, b) + (x @ A.T @ B.T) * s`;
"compile" is torch.compile of that function (dynamic=False); "fused" is what adapters/lora.py
runs, the kernels' lora_linear op: in its default form the base GEMM then one width-changing
bottleneck_adapter call (identity activation, no biases, the base output as residual), with
every kernel variant of the branch side by side; and fused[single_launch], the base GEMM and the
branch in one Triton launch (backward two), which the default becomes where these rows say so.

The rows carry the bottleneck rows' keys (bench/conftest.py's ROW_KEYS) plus dim_out (D_out)
and scale (s); op "lora", shape "M=... D=... D_out=... r=...". The floor: every M x D and M x
D_out tensor the linear must read or write, once, and the frozen W read once a pass. Forward
reads x [M, D] and W, writes y [M, D_out]; backward reads dy [M, D_out], x (for A's and B's
gradients) and W (dx = dy W + ...), writes dx [M, D]. y and dy have the compute dtype (bf16
under autocast), x, dx and W their own. The bias, A, B and the M x r tensors are left out; W
is not: at small M it is a large share (the qkv W is 768 x 2304, as large as x and y together
at M = 576).

Shapes: ViT-B's qkv (D = 768 -> 2304) and fc1 (768 -> 3072), rank 8 (and 16 on the full CUDA
run). On a GPU: bf16, and fp32 under bf16 autocast, M = batch x 197 tokens for batch 8, 32 and
128; the full run adds ViT-L's qkv (1024 -> 3072) and fc1 (1024 -> 4096). On the CPU: fp32,
eager and compiled timed, fused rows device-free (see bench/conftest.py); the quick run keeps
the qkv shape at batch 2 (M = 394), rank 8; the full run adds fc1, batch 8 and rank 16.

Interpreter counts (launches, bytes moved; shapes up to --benchmark-count-rows) are made for
every row but the compiled ones on full runs, and on quick runs for the eager rows and
fused[default] (and on a GPU fused[single_launch]) only: each variant's count takes about 13 s
on two cores at the CPU quick shape (fused[single_launch]'s bytes there are pinned by
tests/test_lora_linear.py instead). The other variants' rows keep their timings (GPU), bytes
saved and registers. fp32 rows run fused[single_launch] with tf32 dots allowed (its only fp32
mode; the GPU rows are bf16 or bf16 autocast).

Dropout rows (row key "dropout", 0.1; the other rows have 0): PEFT's lora_dropout on the
branch's input. eager is PEFT's path, `F.linear(x, W, b) + (F.dropout(x) @ A.T @ B.T) * s`
(torch's dropout: an M x D pass, its mask kept for backward); fused and fused[single_launch]
run the dropout inside their launches (a fresh seed per call, the mask drawn again in
backward). Only those three (the branch's other tile variants add nothing to the dropout
question), at the bf16 shapes on a GPU (quick: qkv at batch 32) and the fp32 ones on the CPU.
The CPU quick run keeps one, eager forward+backward (seconds: each op's fused dropout row, its
interpreter forward and count, added about 40 s on 2 cores). `python bench/bytes.py --op lora
--dropout 0.1` counts every form, and torch's dropout outside the fused branch as well.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from bench.measure import (
    DROPOUT, DTYPES, LORA_SINGLE_LAUNCH, TOKENS, differentiable, floor_bytes, host_us, kernel_counts, lora_call,
    lora_eager, lora_fused, lora_inputs, lora_variant, peak_memory, rotation_count, saved_bytes, time_rotating,
)
from fused_adapters.kernels import list_variants
from fused_adapters.kernels.bottleneck import jit as bottleneck_jit
from fused_adapters.kernels.lora import jit as lora_jit

OP = "bottleneck_adapter"  # the branch's kernel: its variants are the fused rows' columns
PASSES = ("forward", "forward+backward")
ALPHA = 16.0
# (D, D_out) of the adapted linears: ViT-B qkv and fc1, ViT-L qkv and fc1.
VIT_B = ((768, 2304), (768, 3072))
VIT_L = ((1024, 3072), (1024, 4096))


def shapes(cuda: bool, quick: bool):
    """(dtype name, D, D_out, batch, rank) for this device and mode."""
    if cuda:
        widths, ranks = (VIT_B, (8,)) if quick else (VIT_B + VIT_L, (8, 16))
        return [(dtype, dim, dim_out, batch, rank) for dtype, (dim, dim_out), batch, rank
                in itertools.product(("bf16", "fp32 (bf16 autocast)"), widths, (8, 32, 128), ranks)]
    if quick:
        return [("fp32", 768, 2304, 2, 8)]
    return [("fp32", dim, dim_out, batch, rank) for (dim, dim_out), batch, rank
            in itertools.product(VIT_B, (2, 8), (8, 16))]


def providers():
    return ([("eager", "-"), ("compile", "-")] + [("fused", name) for name in list_variants(OP)]
            + [("fused", LORA_SINGLE_LAUNCH)])


def dropout_rows(cuda: bool, quick: bool, dtype: str, dim_out: int, batch: int) -> list:
    """(pass, provider, variant) of the dropout rows at a shape of shapes(): the bf16 ones on a
    GPU (quick: qkv at batch 32), the fp32 ones on the CPU (quick: one row)."""
    if dtype != ("bf16" if cuda else "fp32") or (cuda and quick and (dim_out, batch) != (2304, 32)):
        return []
    if quick and not cuda:
        return [("forward+backward", "eager", "-")]
    return [(pass_name, provider, variant) for pass_name in PASSES
            for provider, variant in (("eager", "-"), ("fused", "default"), ("fused", LORA_SINGLE_LAUNCH))]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    cuda, quick = torch.cuda.is_available(), config.getoption("--benchmark-quick")
    cases, ids = [], []
    for dtype, dim, dim_out, batch, rank in shapes(cuda, quick):
        rows = [(pass_name, provider, variant, 0.0) for pass_name in PASSES for provider, variant in providers()]
        rows += [(pass_name, provider, variant, DROPOUT)
                 for pass_name, provider, variant in dropout_rows(cuda, quick, dtype, dim_out, batch)]
        for pass_name, provider, variant, dropout in rows:
            cases.append((pass_name, dtype, dim, dim_out, batch * TOKENS, rank, provider, variant, dropout))
            label = provider if variant == "-" else f"{provider}[{variant}]"
            rate = f"-dropout{dropout}" if dropout else ""
            ids.append(f"{pass_name}{rate}-{dtype.replace(' ', '')}-D{dim}-Dout{dim_out}-M{batch * TOKENS}-r{rank}-"
                       f"{label}")
    metafunc.parametrize("case", cases, ids=ids)


_COMPILED = {}


def _function(provider: str):
    if provider == "fused":
        return lora_fused
    if provider == "eager":
        return lora_eager
    if "compiled" not in _COMPILED:
        _COMPILED["compiled"] = torch.compile(lora_eager, dynamic=False)
    return _COMPILED["compiled"]


KERNEL_NAMES = {name for module in (bottleneck_jit, lora_jit) for name in vars(module) if name.endswith("_kernel")}

# Bytes the fused forward saves for backward, per shape (CPU: measured once in the interpreter).
_SAVED: dict = {}


def test_lora(benchmark, suite, case):
    pass_name, dtype_name, dim, dim_out, rows, rank, provider, variant, dropout = case
    device = suite.device
    dtype, autocast_dtype = DTYPES[dtype_name]
    scale = ALPHA / rank
    x_size = torch.empty((), dtype=dtype).element_size()
    # y (and dy) has the compute dtype: x's, or under autocast bf16 (the base GEMM's output, and
    # the update's). W is read once a pass in its own dtype, x's.
    y_size = torch.empty((), dtype=autocast_dtype or dtype).element_size()
    floor = floor_bytes(pass_name, rows, dim, x_size, y_size, residual="none", dim_out=dim_out,
                        weight_bytes=dim_out * dim * x_size)
    shape = f"M={rows} D={dim} D_out={dim_out} r={rank}" + (f" dropout={dropout}" if dropout else "")
    row = suite.row(op="lora", shape=shape, rows=rows, dim=dim, dim_out=dim_out, rank=rank, scale=scale,
                    dropout=dropout, dtype=dtype_name, provider=provider, variant=variant, floor_bytes=floor,
                    **{"pass": pass_name})
    count_case = dict(op="lora", provider=provider, variant=variant if provider == "fused" else "default", rows=rows,
                      dim=dim, dim_out=dim_out, rank=rank, scale=scale, dropout=dropout, dtype=dtype_name,
                      **{"pass": pass_name})

    if provider == "fused" and not suite.cuda:
        # Nothing to time: the interpreter's speed means nothing. The row keeps what needs no GPU.
        # The variants tile the launches differently but save the same tensors (the pre-activation
        # [M, r], x by reference, and the single launch the frozen W by reference; with dropout
        # the seed): one interpreter forward per shape serves every variant's rows.
        key = (rows, dim, dim_out, rank, dtype_name, dropout)
        if key not in _SAVED:
            inputs = lora_inputs(rows, dim, dim_out, rank, dtype, device, torch.Generator().manual_seed(0))
            _SAVED[key] = saved_bytes(
                lambda: _call(lora_fused, inputs, scale, autocast_dtype, device, variant, dropout), inputs.values(),
                device)
        row["saved_bytes"] = _SAVED[key]
        suite.untimed.append(row)
        suite.compile_rows.append(row)
        if not _counted(suite, provider, variant):
            pytest.skip("fused timings need CUDA: bytes saved for backward and registers for this row are in the "
                        "summary and in the JSON; with --benchmark-quick launches and bytes moved are counted for "
                        "fused[default] only, for every variant without it")
        suite.count_later(row, count_case)
        pytest.skip("fused timings need CUDA: device-free counts for this row are in the summary and in the JSON")

    benchmark.group = f"lora {pass_name} {dtype_name} D={dim} D_out={dim_out} r={rank}"
    benchmark.extra_info.update(row)
    row = benchmark.extra_info  # filled in below, and by the session (device-free counts) at the end
    fn = _function(provider)
    # What each call reads that the previous calls did not: x and W (each linear of a model has
    # its own), and dy for the backward (the outputs reuse the allocator's blocks).
    set_bytes = (rows * dim + dim_out * dim) * x_size + (rows * dim_out * y_size if pass_name != "forward" else 0)
    generator = torch.Generator().manual_seed(0)
    sets = [lora_inputs(rows, dim, dim_out, rank, dtype, device, generator)
            for _ in range(rotation_count(set_bytes, device))]
    grads = [torch.randn(rows, dim_out, generator=generator).to(device=device, dtype=autocast_dtype or dtype)
             for _ in sets]
    variant_in_force = variant if provider == "fused" else "default"

    def run(index):
        # The backward runs inside the variant's block too: it takes the variant in force.
        with lora_variant(variant_in_force):
            inputs = sets[index]
            y = _call(fn, inputs, scale, autocast_dtype, device, variant, dropout)
            if pass_name == "forward+backward":
                torch.autograd.grad(y, differentiable(inputs), grads[index])
            return y

    # Compile, JIT and autotuning run outside the timed region; see time_rotating.
    if not time_rotating(benchmark, suite, run, len(sets), min(len(sets), 2), floor):
        return
    if suite.cuda or provider != "compile":
        # On the CPU the saved-tensor hooks cannot vouch for what a compiled graph keeps.
        row["saved_bytes"] = saved_bytes(lambda: _call(fn, sets[0], scale, autocast_dtype, device, variant, dropout),
                                         sets[0].values(), device)
    row["peak_mem_bytes"] = peak_memory(lambda: run(0), device)
    row["host_us"] = host_us(lambda: run(0), device)
    row["triton_launches"], row["aten_kernels"] = kernel_counts(lambda: run(0), device, KERNEL_NAMES)
    if provider != "compile" and _counted(suite, provider, variant):  # the interpreter cannot count compiled graphs
        suite.count_later(row, count_case)


def _counted(suite, provider: str, variant: str) -> bool:
    """Whether the row gets interpreter counts (launches, bytes moved) at the end of the session:
    quick runs count the eager rows and fused[default], and on a GPU fused[single_launch] too.
    One variant's count takes about 13 s on two cores at the CPU quick shape, and about 4 times
    that at M = 1576 (a GPU quick run's counted shapes). The branch's variants run the same
    launches with other tiles (store_act's backward also writes act(h) [M, r])."""
    if not (suite.quick and provider == "fused"):
        return True
    return variant == "default" or (variant == LORA_SINGLE_LAUNCH and suite.cuda)


def _call(fn, inputs, scale, autocast_dtype, device, variant, dropout=0.0):
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast, lora_variant(variant if fn is lora_fused else "default"):
        return lora_call(fn, inputs, scale, dropout)
