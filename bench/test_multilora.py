"""Op-level benchmark of a multi-LoRA batch: one frozen linear with T tasks' LoRA branches (rank
8, alpha 16, s = 2), each image of the batch its own task's (image b in task b % 8, so a batch of
8 or more images holds all 8 tasks), forward and forward+backward with x and every task's A and
B differentiated (W and b frozen). What task_routing runs in each adapted linear, against
PEFT-style looping over the adapters. Providers (bench/measure.py's multilora_* functions), each
the whole linear, base GEMM included:

  routed        task_routing's form, the library's own code (mixed_lora_forward): the base GEMM
                once, then one routed_adapter launch for every task's branch (identity
                activation, one expert per row with weight 1, the tasks' A and B stacked as the
                experts' down- and up-projections, the shared s, the base output as residual)
  loop-fused    PEFT's mixed-batch loop with the fused branch: the base GEMM once, then per task
                its images gathered, s (x A^T) B^T as one bottleneck_adapter call (identity),
                index_add_-ed into the base output (PEFT's result[index] += ...)
  loop-eager    PEFT's mixed-batch forward (peft's LoraLayer._mixed_batch_forward, vanilla LoRA
                without dropout) in plain PyTorch: per task result[index] += B(A(x[index])) * s
  gather-eager  the eager per-row form: each image's A and B gathered from the stacked tasks'
                ([batch, r, D] and [batch, D_out, r]: every token of an image shares its task,
                so one copy per image rather than per row, which would be [M, r, D]) and the
                update as two batched matmuls, base + (x @ A_b^T @ B_b^T) * s
  compile       torch.compile of loop-eager (dynamic=False)
The loops' image indices per task are made once per input set (PEFT makes its index lists on
the host each call; a GPU then copies them over, which these rows leave out).

The rows carry the LoRA rows' keys (dim_out, scale) plus tasks (T, the tasks the batch holds)
and images (the batch); op "multilora", shape "M=... D=... D_out=... r=... T=...". The floor is
the LoRA linear's (bench/test_lora.py): x [M, D] read and y [M, D_out] written once, the frozen
W read once a pass; backward reads dy, x and W and writes dx. The T tasks' A and B are left out,
as floor_bytes leaves a single LoRA's out: at qkv, 8 tasks' A and B are 196,608 elements, 3% of
the forward's floor at M = 1576. Bytes moved are the interpreter's counts with one correction
(measure.IndexedRows): the loops' gathers and scatters (x[index], result[index] += ...,
index_add_) are charged the rows they touch, where the counter charges every indexing op its
whole tensor (with 8 tasks, 8 times the rows each gather reads). What autograd adds is charged
in full, as a GPU runs it: per task of a loop, the gather's gradient is a zero-filled [M, D]
tensor added into dx, and the in-place update of the base output (a view of the GEMM's 2-D
output) clones the whole gradient; most of the loops' backward bytes are these.

Shapes: ViT-B's qkv (768 -> 2304) and fc1 (768 -> 3072). On a GPU: bf16 (full runs add fp32
under bf16 autocast), batch 8 and 64 (quick) or 8, 32 and 128 (full). On the CPU: fp32, the
eager rows and compile timed, the fused rows device-free; the full run takes both targets at
batch 8 (M = 1576, all 8 tasks), the quick run qkv at batch 2 (M = 394, two tasks of the eight:
an interpreter count of a fused row takes about 30 s on one core there, and about four times
that at M = 1576), counts the routed and eager rows only (loop-fused keeps its bytes saved; its
counts are in bench/bytes.py's multilora output) and leaves out compile (13 s to compile) and the
compile check of the routed rows' kernels (registers and spills, sm_90).
The fused rows' bytes saved for backward come from a forward with every launch a no-op (what a
forward keeps is decided before its launches run). loop-fused's index_add_ keeps each task's
update [M_t, D_out] for backward (autograd saves index_add_'s source).
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from bench.measure import (
    DTYPES, MULTILORA_FUNCTIONS, MULTILORA_FUSED, TOKENS, differentiable, floor_bytes, host_us, kernel_counts,
    launches_as_no_ops, multilora_call, multilora_inputs, multilora_loop_eager, peak_memory, rotation_count,
    saved_bytes, time_rotating,
)
from fused_adapters.kernels.bottleneck import jit as bottleneck_jit
from fused_adapters.kernels.sparse import jit_dense, jit_grouped

PASSES = ("forward", "forward+backward")
ALPHA, RANK, TASKS = 16.0, 8, 8
# (D, D_out) of the adapted linears: ViT-B qkv and fc1.
VIT_B = ((768, 2304), (768, 3072))
PROVIDERS = ("loop-eager", "gather-eager", "compile", "loop-fused", "routed")


def shapes(cuda: bool, quick: bool):
    """(dtype name, D, D_out, batch) for this device and mode."""
    if cuda:
        dtypes, batches = (("bf16",), (8, 64)) if quick else (("bf16", "fp32 (bf16 autocast)"), (8, 32, 128))
        return [(dtype, dim, dim_out, batch) for dtype, (dim, dim_out), batch
                in itertools.product(dtypes, VIT_B, batches)]
    if quick:
        return [("fp32", 768, 2304, 2)]
    return [("fp32", dim, dim_out, 8) for dim, dim_out in VIT_B]


def pytest_generate_tests(metafunc):
    if "multilora_case" not in metafunc.fixturenames:
        return
    cases, ids = [], []
    for dtype, dim, dim_out, batch in shapes(torch.cuda.is_available(), metafunc.config.getoption("--benchmark-quick")):
        for pass_name in PASSES:
            for provider in PROVIDERS:
                cases.append((pass_name, dtype, dim, dim_out, batch, provider))
                ids.append(f"{pass_name}-{dtype.replace(' ', '')}-D{dim}-Dout{dim_out}-M{batch * TOKENS}-r{RANK}-"
                           f"T{min(TASKS, batch)}-{provider}")
    metafunc.parametrize("multilora_case", cases, ids=ids)


_COMPILED = {}


def _function(provider: str):
    if provider != "compile":
        return MULTILORA_FUNCTIONS[provider]
    if "compiled" not in _COMPILED:
        _COMPILED["compiled"] = torch.compile(multilora_loop_eager, dynamic=False)
    return _COMPILED["compiled"]


# The fused rows' kernels: the routed launch's (dense design at T*r = 64) and the loop branch's.
KERNEL_NAMES = {name for module in (bottleneck_jit, jit_dense, jit_grouped) for name in vars(module)
                if name.endswith("_kernel")}

# Bytes a fused forward saves for backward, per shape and provider (CPU: measured once, launches as no-ops).
_SAVED: dict = {}


def test_multilora(benchmark, suite, multilora_case):
    pass_name, dtype_name, dim, dim_out, batch, provider = multilora_case
    device = suite.device
    dtype, autocast_dtype = DTYPES[dtype_name]
    rows, tasks, scale = batch * TOKENS, min(TASKS, batch), ALPHA / RANK
    fused = provider in MULTILORA_FUSED
    x_size = torch.empty((), dtype=dtype).element_size()
    y_size = torch.empty((), dtype=autocast_dtype or dtype).element_size()
    floor = floor_bytes(pass_name, rows, dim, x_size, y_size, residual="none", dim_out=dim_out,
                        weight_bytes=dim_out * dim * x_size)
    row = suite.row(op="multilora", shape=f"M={rows} D={dim} D_out={dim_out} r={RANK} T={tasks}", rows=rows, dim=dim,
                    dim_out=dim_out, rank=RANK, tasks=tasks, images=batch, scale=scale, dtype=dtype_name,
                    provider=provider, variant="default" if fused else "-", floor_bytes=floor, **{"pass": pass_name})
    if provider == "loop-fused":
        # Its launches are the LoRA rows' branch kernels, once per task (those rows compile-check them).
        row["missing"] = {"registers": "not compile-checked: the LoRA rows' branch kernels, once per task"}
    count_case = dict(op="multilora", provider=provider, variant="default", rows=rows, images=batch, tasks=tasks,
                      dim=dim, dim_out=dim_out, rank=RANK, scale=scale, dtype=dtype_name, **{"pass": pass_name})

    def new_inputs(generator):
        return multilora_inputs(batch, TOKENS, dim, dim_out, RANK, tasks, dtype, device, generator)

    if provider == "compile" and suite.quick and not suite.cuda:
        pytest.skip("torch.compile of the 8-task loop takes about 13 s to compile on 2 CPU cores: run without "
                    "--benchmark-quick")
    if fused and not suite.cuda:
        # Nothing to time: the interpreter's speed means nothing. What the forward keeps for
        # backward is the same with every launch a no-op (the launches only fill the buffers).
        key = (rows, dim, dim_out, dtype_name, provider)
        if key not in _SAVED:
            inputs = new_inputs(torch.Generator().manual_seed(0))
            with launches_as_no_ops(suite.sms):
                _SAVED[key] = saved_bytes(lambda: _call(provider, inputs, scale, autocast_dtype, device),
                                          inputs.values(), device)
        row["saved_bytes"] = _SAVED[key]
        suite.untimed.append(row)
        if provider == "routed" and not suite.quick:  # quick runs leave out the compile check's 6 s
            suite.compile_rows.append(row)
        if not _counted(suite, provider):
            pytest.skip("fused timings need CUDA: bytes saved for backward for this row are in the summary and in "
                        "the JSON; with --benchmark-quick launches and bytes moved are counted for routed only")
        suite.count_later(row, count_case)
        pytest.skip("fused timings need CUDA: device-free counts for this row are in the summary and in the JSON")

    benchmark.group = f"multilora {pass_name} {dtype_name} D={dim} D_out={dim_out} r={RANK} T={tasks}"
    benchmark.extra_info.update(row)
    row = benchmark.extra_info  # filled in below, and by the session (device-free counts) at the end
    # What each call reads that the previous calls did not: x and W (each linear of a model has
    # its own), and dy for the backward.
    set_bytes = (rows * dim + dim_out * dim) * x_size + (rows * dim_out * y_size if pass_name != "forward" else 0)
    generator = torch.Generator().manual_seed(0)
    sets = [new_inputs(generator) for _ in range(rotation_count(set_bytes, device))]
    grads = [torch.randn(batch, TOKENS, dim_out, generator=generator).to(device=device, dtype=autocast_dtype or dtype)
             for _ in sets]

    def run(index):
        inputs = sets[index]
        y = _call(provider, inputs, scale, autocast_dtype, device)
        if pass_name == "forward+backward":
            torch.autograd.grad(y, differentiable(inputs), grads[index])
        return y

    # Compile, JIT and autotuning run outside the timed region; see time_rotating.
    if not time_rotating(benchmark, suite, run, len(sets), min(len(sets), 2), floor):
        return
    if suite.cuda or provider != "compile":
        # On the CPU the saved-tensor hooks cannot vouch for what a compiled graph keeps.
        row["saved_bytes"] = saved_bytes(lambda: _call(provider, sets[0], scale, autocast_dtype, device),
                                         sets[0].values(), device)
    row["peak_mem_bytes"] = peak_memory(lambda: run(0), device)
    row["host_us"] = host_us(lambda: run(0), device)
    row["triton_launches"], row["aten_kernels"] = kernel_counts(lambda: run(0), device, KERNEL_NAMES)
    if provider != "compile" and _counted(suite, provider):  # the interpreter cannot count compiled graphs
        suite.count_later(row, count_case)


def _counted(suite, provider: str) -> bool:
    """Whether the row gets interpreter counts (launches, bytes moved) at the end of the session:
    every row but compile's, and with --benchmark-quick on the CPU the routed and eager rows only
    (an interpreter count of loop-fused takes about as long as routed's)."""
    if provider == "compile":
        return False
    return not (suite.quick and not suite.cuda and provider == "loop-fused")


def _call(provider: str, inputs: dict, scale: float, autocast_dtype, device):
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        return multilora_call(_function(provider), inputs, scale)
