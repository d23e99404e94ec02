"""Op-level benchmark of the sparse mixture of adapters: forward, and forward+backward, of
sparse_adapter (each row routed to its top-k of E experts by a learned fp32 gate) and
routed_adapter (the routing given: k experts per row drawn at random with a fixed seed, random
positive weights), every expert an Adapter+ post adapter (residual x, channel scale, biases),
against eager PyTorch (kernels/reference.py's expert loop, the code the tests trust) and
torch.compile of it, with every kernel variant of the fused ops side by side: the dense-masked
ones (default, rows16, rows64, store_act) and grouped (assignments sorted by expert,
kernels/sparse/). The rows carry the bottleneck rows' keys (bench/conftest.py's
ROW_KEYS) plus experts and top_k; the byte floor is the bottleneck op's (forward: read x, write
y; backward: read dy and x, write dx).

Shapes: E = 8 and 16 experts with ranks 16 and 8 (E*r up to 256: both designs run), and on the
full runs also E = 16 with r = 32 and E = 64 with r = 16 (E*r = 512 and 1024: the dense design
does not fit, so choose_design gives every variant the grouped kernels there, and the
dense variants' rows are skipped as repeats of the grouped row); k = 1 and 2 per row. On a GPU
D = 384, 768 and 1024, M = batch x 197 tokens for batch 8 to 256, bf16, fp16 and fp32
activations under bf16 autocast (quick: D = 768, batch 32, rank 16, E = 8 and 16, bf16 and fp32
under autocast). On the CPU: fp32 at small sizes (D = 384 and 768, batch 2 and 8), eager and
compiled timed, fused rows device-free (see bench/conftest.py). The quick run on the CPU keeps
one small shape (D = 768, M = 197, r = 16, E = 8, k = 2) and leaves out what takes minutes
there: torch.compile of the expert loop, and the interpreter counts (launches, bytes moved,
registers) of every fused variant but the default; every fused row keeps the bytes it saves for
backward (the dense design's h [M, E*r] and weights [M, E]; the grouped design's hidden
[M*k, r], routing [M, k] and sort).

Dropout rows (row key "dropout", 0.1; the other rows have 0): dropout on each expert's act(h).
fused runs it inside its launches (a fresh seed per call, the mask drawn again in backward);
eager is the reference's expert loop with its mask [M, E*r] drawn as torch's dropout draws its
noise (bench.measure.torch_dropout_masks: bernoulli_, div_; kept for backward), not the
reference's bit-exact Philox, which no user's code computes. Only eager and the default fused
variant (grouped where E*r > 256), at the bf16 shapes on a GPU (quick: E = 8, k = 2) and on the
CPU at D = 768, k = 2. The CPU quick run keeps one, sparse_adapter's eager forward+backward
(seconds: each op's fused dropout row, its interpreter forward and count, added about 40 s on 2
cores; bench/bytes.py --op sparse --dropout counts the fused op).
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from bench.measure import (
    DROPOUT, DTYPES, TOKENS, differentiable, dropout_arguments, floor_bytes, host_us, kernel_counts, peak_memory,
    rotation_count, saved_bytes, sparse_call, sparse_inputs, time_rotating, torch_dropout_masks,
)
from fused_adapters.kernels import list_variants, reference, routed_adapter, sparse_adapter
from fused_adapters.kernels.sparse import configs as sparse_configs
from fused_adapters.kernels.sparse import jit_dense, jit_grouped
from fused_adapters.kernels.sparse.plan import choose_design

OPS = ("sparse_adapter", "routed_adapter")
FUSED = {"sparse_adapter": sparse_adapter, "routed_adapter": routed_adapter}
# Both forms run the same kernels and take the same variants.
VARIANT_FAMILY = "sparse_adapter"
PASSES = ("forward", "forward+backward")
# (rank, experts) with E*r up to sparse_configs.MAX_DENSE_COLUMNS (256), where both designs run, and past
# it, where the grouped design is the only one (full runs only).
BOTH_DESIGNS = tuple(itertools.product((8, 16), (8, 16)))
GROUPED_ONLY = ((32, 16), (16, 64))


def shapes(cuda: bool, quick: bool):
    """(dtype name, D, batch, rank, experts, top_k) for this device and mode."""
    if cuda and quick:
        return itertools.product(("bf16", "fp32 (bf16 autocast)"), (768,), (32,), (16,), (8, 16), (1, 2))
    if quick:
        # One image (M = 197): the eager expert loop and the interpreter are slow on a few cores.
        return itertools.product(("fp32",), (768,), (1,), (16,), (8,), (2,))
    if cuda:
        dtypes, dims, batches = ("bf16", "fp16", "fp32 (bf16 autocast)"), (384, 768, 1024), (8, 32, 64, 128, 256)
    else:
        # The grouped-only shapes add one fused variant each: about a tenth more interpreter time.
        dtypes, dims, batches = ("fp32",), (384, 768), (2, 8)
    return ((dtype, dim, batch, rank, experts, top_k) for dtype, dim, batch, (rank, experts), top_k
            in itertools.product(dtypes, dims, batches, BOTH_DESIGNS + GROUPED_ONLY, (1, 2)))


GROUPED_VARIANTS = {variant.name for variant in sparse_configs.VARIANTS if variant.grouped}


def repeats_grouped(experts: int, rank: int, variant: str) -> bool:
    """Whether a fused row of a dense variant would run the grouped kernels (E*r past the dense
    design's limit: choose_design) and so repeat the grouped variant's row."""
    return variant not in GROUPED_VARIANTS and choose_design(experts, rank, variant) == "grouped"


def providers():
    return [("eager", "-"), ("compile", "-")] + [("fused", name) for name in list_variants(VARIANT_FAMILY)]


def dropout_rows(cuda: bool, quick: bool, dtype: str, dim: int, rank: int, experts: int, top_k: int) -> list:
    """(op, pass, provider, variant) of the dropout rows at a shape of shapes(): the bf16 ones on a
    GPU (quick: E = 8, k = 2), on the CPU those at D = 768, k = 2 (quick: one row). The fused
    row runs the default variant, or grouped where the dense design does not fit."""
    if dtype != ("bf16" if cuda else "fp32") or (quick and cuda and (experts, top_k) != (8, 2)):
        return []
    if not cuda and (dim, top_k) != (768, 2):
        return []
    if quick and not cuda:
        return [("sparse_adapter", "forward+backward", "eager", "-")]
    fused = "grouped" if repeats_grouped(experts, rank, "default") else "default"
    return [(op, pass_name, provider, variant) for op in OPS for pass_name in PASSES
            for provider, variant in (("eager", "-"), ("fused", fused))]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    cuda, quick = torch.cuda.is_available(), config.getoption("--benchmark-quick")
    cases, ids = [], []
    for dtype, dim, batch, rank, experts, top_k in shapes(cuda, quick):
        rows = batch * TOKENS
        runs = [(op, pass_name, provider, variant, 0.0) for op in OPS for pass_name in PASSES
                for provider, variant in providers()]
        runs += [(op, pass_name, provider, variant, DROPOUT) for op, pass_name, provider, variant
                 in dropout_rows(cuda, quick, dtype, dim, rank, experts, top_k)]
        for op, pass_name, provider, variant, dropout in runs:
            cases.append((op, pass_name, dtype, dim, rows, rank, experts, top_k, provider, variant, dropout))
            label = provider if variant == "-" else f"{provider}[{variant}]"
            rate = f"-dropout{dropout}" if dropout else ""
            ids.append(f"{op}-{pass_name}{rate}-{dtype.replace(' ', '')}-D{dim}-M{rows}-r{rank}-E{experts}-k{top_k}-"
                       f"{label}")
    metafunc.parametrize("case", cases, ids=ids)


_COMPILED = {}


def _function(op: str, provider: str):
    if provider == "fused":
        return FUSED[op]
    if provider == "eager":
        return getattr(reference, op)
    if op not in _COMPILED:
        # Automatic dynamic shapes (torch.compile's default), not the bottleneck rows' dynamic=False:
        # how many rows each expert gets depends on the routing, so graphs specialized to those
        # counts would recompile for every input set (and in a user's loop for every batch). A
        # size that changes is made dynamic on its first recompile; the warm-up runs every input
        # set once, so that those recompiles all happen before the timing.
        _COMPILED[op] = torch.compile(getattr(reference, op))
    return _COMPILED[op]


# The Triton kernels of both designs, as the profiler names them on CUDA.
KERNEL_NAMES = {name for module in (jit_dense, jit_grouped) for name in vars(module)
                if name.endswith("_kernel")}

# Bytes the fused forward saves for backward, per shape and design (CPU: measured once in the
# interpreter).
_SAVED: dict = {}


def test_sparse(benchmark, suite, case):
    op, pass_name, dtype_name, dim, rows, rank, experts, top_k, provider, variant, dropout = case
    if provider == "fused" and repeats_grouped(experts, rank, variant):
        pytest.skip(f"E*r = {experts * rank} > {sparse_configs.MAX_DENSE_COLUMNS}: the dense design does not fit, so "
                    f"variant {variant!r} runs the grouped kernels; see the fused[grouped] row")
    device = suite.device
    dtype, autocast_dtype = DTYPES[dtype_name]
    routed = op == "routed_adapter"
    x_size = torch.empty((), dtype=dtype).element_size()
    # y has x's dtype (under autocast the fp32 residual promotes y to fp32, x's dtype too). The
    # floor is the bottleneck op's: the gate, the routing and the experts' weights are small.
    floor = floor_bytes(pass_name, rows, dim, x_size, x_size)
    shape = f"M={rows} D={dim} r={rank} E={experts} k={top_k}" + (f" dropout={dropout}" if dropout else "")
    row = suite.row(op=op, shape=shape, rows=rows, dim=dim, rank=rank, experts=experts, top_k=top_k, dropout=dropout,
                    dtype=dtype_name, provider=provider, variant=variant, floor_bytes=floor, **{"pass": pass_name})
    count_case = dict(op=op, provider=provider, variant=variant if provider == "fused" else "default", rows=rows,
                      dim=dim, rank=rank, experts=experts, top_k=top_k, dropout=dropout, dtype=dtype_name,
                      **{"pass": pass_name})

    if provider == "fused" and not suite.cuda:
        # Nothing to time: the interpreter's speed means nothing. The row keeps what needs no GPU.
        # The dense variants tile the launches differently but save the same tensors (h [M, E*r]
        # and the weights [M, E]); the grouped design saves its own (hidden [M*k, r], the routing
        # idx [M, k] int32 and weights [M, k] fp32, the sort's order [M*k] and counts [E]; with
        # dropout the seed): one interpreter forward per shape and design serves every variant's rows.
        key = (op, rows, dim, rank, experts, top_k, dtype_name, choose_design(experts, rank, variant), dropout)
        if key not in _SAVED:
            inputs = sparse_inputs(rows, dim, rank, experts, top_k, dtype, device, True, routed,
                                   torch.Generator().manual_seed(0))
            _SAVED[key] = saved_bytes(
                lambda: _call(op, FUSED[op], inputs, top_k, autocast_dtype, device, variant, dropout),
                inputs.values(), device)
        row["saved_bytes"] = _SAVED[key]
        suite.untimed.append(row)
        if suite.quick and variant != "default":
            # The interpreter needs tens of seconds for one sparse forward and backward on a few
            # cores: a quick run counts the default variant (the one users get) only.
            pytest.skip("fused timings need CUDA: bytes saved for backward for this row are in the summary and in "
                        "the JSON; with --benchmark-quick launches, bytes moved and registers are counted for "
                        "the default variant only")
        suite.count_later(row, count_case)
        suite.compile_rows.append(row)
        pytest.skip("fused timings need CUDA: device-free counts for this row are in the summary and in the JSON")
    if provider == "compile" and not suite.cuda and suite.quick:
        pytest.skip("torch.compile of the expert loop takes tens of seconds on a few CPU cores: run without "
                    "--benchmark-quick")

    benchmark.group = f"{op} {pass_name} {dtype_name} D={dim} r={rank} E={experts} k={top_k}"
    benchmark.extra_info.update(row)
    row = benchmark.extra_info  # filled in below, and by the session (device-free counts) at the end
    fn = _function(op, provider)
    # What each call reads that the previous calls did not: x, and dy for the backward (the
    # outputs reuse the allocator's blocks). The routing is drawn from a fixed seed.
    set_bytes = rows * dim * x_size * (1 if pass_name == "forward" else 2)
    generator = torch.Generator().manual_seed(0)
    sets = [sparse_inputs(rows, dim, rank, experts, top_k, dtype, device, True, routed, generator)
            for _ in range(rotation_count(set_bytes, device))]
    grads = [torch.randn(rows, dim, generator=generator).to(device=device, dtype=dtype) for _ in sets]

    def run(index):
        # The fused op's variant= holds for its backward too.
        inputs = sets[index]
        y = _call(op, fn, inputs, top_k, autocast_dtype, device, variant, dropout)
        if pass_name == "forward+backward":
            torch.autograd.grad(y, differentiable(inputs), grads[index])
        return y

    # Compile, JIT and autotuning run outside the timed region (torch.compile on every set: each routing may
    # recompile until its sizes are dynamic); see time_rotating.
    if not time_rotating(benchmark, suite, run, len(sets), len(sets) if provider == "compile" else min(len(sets), 2), floor):
        return
    if suite.cuda or provider != "compile":
        # On the CPU the saved-tensor hooks cannot vouch for what a compiled graph keeps.
        row["saved_bytes"] = saved_bytes(
            lambda: _call(op, fn, sets[0], top_k, autocast_dtype, device, variant, dropout), sets[0].values(), device)
    row["peak_mem_bytes"] = peak_memory(lambda: run(0), device)
    row["host_us"] = host_us(lambda: run(0), device)
    row["triton_launches"], row["aten_kernels"] = kernel_counts(lambda: run(0), device, KERNEL_NAMES)
    if provider != "compile":  # the interpreter cannot count inside a compiled graph
        suite.count_later(row, count_case)


def _call(op, fn, inputs, top_k, autocast_dtype, device, variant, dropout=0.0):
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    fused = fn is FUSED[op]
    kwargs = {"variant": variant} if fused else {}
    # The eager loop's mask is torch's, kept for backward by autograd: the backward needs no mask context.
    masks = torch_dropout_masks() if dropout and not fused else contextlib.nullcontext()
    with autocast, masks:
        return sparse_call(op, fn, inputs, top_k, **kwargs, **dropout_arguments(dropout, fused, device))
