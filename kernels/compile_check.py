"""Compile every kernel at every block configuration for real GPUs, no GPU needed.

    python -m fused_adapters.kernels.compile_check [--arch 80 90] [--dtype bfloat16 float32]
    python -m fused_adapters.kernels.compile_check --kernel sparse_forward sparse_backward_input \
        sparse_backward_weights        (only the sparse mixture's kernels; --config c128 narrows more)
    python -m fused_adapters.kernels.compile_check --kernel grouped_gate grouped_forward grouped_combine \
        grouped_backward_input grouped_backward_combine grouped_backward_weights
                                       (the sparse mixture's grouped design; --config r16 gate combine
                                        takes rank 16 and the rank-free kernels)

For each kernel, each block configuration the package can choose (one per padded rank and
compute dtype group, and for the row-tile kernels every smaller block-rows variant the launch
plan may pick from M), each dtype (autocast included: fp32 storage, bf16/fp16 dots) and each
architecture, this builds the exact launch the package would make
(through the same launch builders the runtime uses), specializes its arguments as Triton's
JIT does at launch (pointers and integers that are multiples of 16 get tt.divisibility=16,
integers equal to 1 become constants), compiles with triton.compile for GPUTarget("cuda",
arch, 32), and reads registers and stack/local (spill) bytes from the cubin with the
cuobjdump that ships in triton/backends/nvidia/bin. It also checks the PTX for tensor-core
instructions (mma.sync on sm_80, wgmma or mma.sync on sm_90) wherever the dots run in
fp16/bf16 or tf32 (the "tf32" dtype: float32 with allow_tf32 on), and for vectorized global loads
(ld.global.v2/v4, or the 8- and 16-byte cp.async copies a pipelined loop, num_stages > 1, issues).

Kernels: the bottleneck adapter's (forward, backward_hidden, backward_weights; forward_wide and
backward_weights_wide are the same kernels specialized for a width-changing bottleneck, D_out =
3 D as LoRA on a ViT's qkv; the latter from its own table; forward_column_major,
backward_hidden_column_major and backward_weights_column_major are the same kernels with x, the
residual, y, dy and dx column-major, as LoSA's token mixers run them) and the sparse
mixture of adapters' (sparse_forward, sparse_backward_input, sparse_backward_weights; see
kernels/sparse.py), whose configurations are keyed by the padded E*r instead of the padded rank:
each is compiled at one representative (experts, rank) per key (SPARSE_SHAPES). The sparse
forward is compiled in both forms, gated (top-2 over a fp32 gate) and routed (the "+routed"
configs: top-2 experts and weights given per row); the sparse backward in the gated form, with
the logits' own gradient, both recomputing act(h) (the default) and storing it ("+store_act").

The sparse mixture's grouped design (kernels/sparse_grouped.py): grouped_gate (logits, top-k and
weights), grouped_forward and grouped_combine, grouped_backward_input, grouped_backward_combine
and grouped_backward_weights. The grouped launches' configurations are keyed by the padded rank
(one case per key: GROUPED_EXPERTS experts of that rank, an odd rank in the same padded block in
the unaligned scenario); the gate's and the combines' by the dtype group alone (the gate's by
x's storage dtype, the others' by the compute dtype), and their dots, where they have any, are
the fp32 gate's ieee dots: no MMA is expected of them. The grouped kernels' block rows are fixed
by their configuration, except the gate's, which the launch plan picks from M: the gate's smaller
block-rows variants are compiled too. Every case is the gated form with top-2, b_gate and the
logits stored (and their own gradient in the backward); the "+k1" configs add the k = 1 forms
where the kernel changes: grouped_forward applying the epilogue and writing y itself, and
grouped_backward_input in the routed form writing dx (plus dy) itself.

Two shape scenarios:
  aligned    ViT-like: D, rank, rows and strides multiples of 16, aligned pointers. Must have
             0 spill bytes, MMA and vectorized (64- or 128-bit) loads (reported only for the
             smaller block-rows variants), or the check fails.
  unaligned  odd D, rank and rows, misaligned x (sparse: an odd rank with E*r in the same
             padded block; grouped: an odd rank in the same padded block). Must not spill; loads
             and MMA are reported.

Prints a table; exits 1 on any failure. Needs TRITON_INTERPRET unset (it compiles the real
kernels, not the interpreter's stand-ins).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

ARCHS = (80, 90)
# "tf32" is float32 with torch.backends.cuda.matmul.allow_tf32 on: the same configs, MMA dots.
# "autocast_bf16" / "autocast_fp16": fp32 x, residual, parameters and output (a model trained
# under torch.autocast), dots in bf16 / fp16: the loads convert in registers.
DTYPES = ("bfloat16", "float16", "float32", "tf32", "autocast_bf16", "autocast_fp16")


def _dtypes(name: str) -> tuple[torch.dtype, torch.dtype]:
    """(storage dtype of x, residual, parameters and y; compute dtype of the dots)."""
    if name == "tf32":
        return torch.float32, torch.float32
    if name.startswith("autocast_"):
        return torch.float32, {"bf16": torch.bfloat16, "fp16": torch.float16}[name.split("_")[1]]
    return getattr(torch, name), getattr(torch, name)


SCENARIOS = ("aligned", "unaligned")
BOTTLENECK_KERNELS = ("forward", "backward_hidden", "backward_weights")
# The bottleneck kernels where a width-changing bottleneck (D_out != D: LoRA on qkv, fc1, fc2)
# compiles another specialization (SAME_WIDTH off): compiled with D_out = 3 D, the qkv shape;
# the weights launch has its own table. (The backward-hidden kernel only walks D_out.)
WIDE_KERNELS = ("forward_wide", "backward_weights_wide")
# The bottleneck kernels with x, the residual, y, dy and dx column-major ([M, D] with row stride
# 1): a bottleneck over the token axis of a token-major tensor (LoSA's token mixers), where the
# kernels' rows are contiguous in memory instead of their columns.
LAYOUT_KERNELS = ("forward_column_major", "backward_hidden_column_major", "backward_weights_column_major")
SPARSE_KERNELS = ("sparse_forward", "sparse_backward_input", "sparse_backward_weights")
GROUPED_KERNELS = ("grouped_gate", "grouped_forward", "grouped_combine", "grouped_backward_input",
                   "grouped_backward_combine", "grouped_backward_weights")
# The LoRA linear's single-launch form (kernels/lora.py): one GEMM kernel with a rank-r side
# product, as the forward (D_in -> D_out) and as the backward's input launch (D_out -> D_in),
# both at every tile of its tables (the aligned tiles in the aligned scenario, the unaligned ones
# in the other), at padded ranks up to 64 and with tensor-core dots (no "float32": without tf32
# the form is not used); and its weights launch, the bottleneck weights kernel without dx
# (identity activation, no biases, a float scale) from both its tables: the wide one at the qkv
# shape (D_out = 3 D) and the same-width one (D_out = D, LoRA on proj). The aligned scenario
# compiles each at the padded rank and, as the "+half_rank" configs, at half of it (rank 8 pads
# to 16 but is no multiple of 16, so B's strides specialize differently).
LORA_KERNELS = ("lora_forward", "lora_backward_input", "lora_backward_weights")
KERNELS = BOTTLENECK_KERNELS + WIDE_KERNELS + LAYOUT_KERNELS + SPARSE_KERNELS + GROUPED_KERNELS + LORA_KERNELS
# The sparse kernels' configurations are keyed by the padded E*r: one (experts, rank) per key.
# The unaligned scenario keeps the experts and takes an odd rank whose E*r pads to the same block.
SPARSE_SHAPES = {16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
SPARSE_TOP_K = 2
# The grouped design's kernels without a rank axis: their tables are keyed by the dtype group alone
# (config_tables lists them under padded rank 0), and their dots, where they have any, are the
# fp32 gate's ieee dots (no MMA expected).
GROUPED_RANKLESS_KERNELS = ("grouped_gate", "grouped_combine", "grouped_backward_combine")
# The grouped kernels whose k = 1 form is a different kernel (the "+k1" configs).
GROUPED_K1_KERNELS = ("grouped_forward", "grouped_backward_input")
GROUPED_EXPERTS = 8
# The gate's block rows are planned from M as for an H100's SM count.
GROUPED_PLAN_SMS = 132
# Shared memory one block may opt in to: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                   torch.int32: "i32", torch.int64: "i64"}  # the routed form's expert_idx


@dataclass
class Result:
    kernel: str
    config: str
    dtype: str
    arch: int
    scenario: str
    registers: int = -1
    stack_bytes: int = -1
    local_bytes: int = -1
    shared_bytes: int = -1
    mma: str = "-"
    widest_load_bits: int = 0
    error: str = ""
    failures: tuple = ()


def _tools_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _scenario_shapes(block_rank: int, scenario: str):
    """(rows, dim, rank, misaligned_x) for a scenario, with the rank landing in block_rank."""
    if scenario == "aligned":
        return 3152, 768, block_rank, False  # 16 x 197 tokens, ViT-B width
    return 3151, 771, max(1, block_rank // 2 + 1), True


def _sparse_shape(block_columns: int, scenario: str) -> tuple[int, int]:
    """(experts, rank) of the sparse case whose E*r pads to block_columns in this scenario."""
    experts, rank = SPARSE_SHAPES[block_columns]
    return (experts, rank) if scenario == "aligned" else (experts, rank - 1)


def build_launches(kernel: str, block_rank: int, dtype_name: str, scenario: str, variant=None,
                   store_act: bool = False, routed: bool = False, single: bool = False):
    """The Launch the package makes for this case, with every optional input present (the
    heaviest variant of each kernel: all biases, channel scale, x and another tensor as residual
    terms, row_scale, gelu), at the block configuration `variant` (default: the plan's), and for
    the backward with act(h) stored at every rank when store_act (the store_act op variant).

    For the sparse kernels block_rank is the padded E*r (their tables' key) and the heaviest
    variant is the gated form with b_gate, the logits returned and, in the backward, their own
    gradient; routed: the sparse forward's routed form instead (expert_idx and expert_weight).

    For the grouped kernels block_rank is the padded rank (0 for the gate and the combines, whose
    tables have no rank axis); the heaviest variant is the gated form with top-2, b_gate and the
    logits stored (and their own gradient in the backward); single: the k = 1 form instead (the
    routed form with top-1: grouped_forward writes y, grouped_backward_input writes dx)."""
    if kernel in GROUPED_KERNELS:
        if routed or store_act:
            raise ValueError(f"{kernel}: the grouped kernels have no routed or store_act case (see single)")
        launch = _grouped_launch(kernel, block_rank, dtype_name, scenario, single)
        if variant is not None:
            launch.config = variant
            launch.constexprs = dict(launch.constexprs, BLOCK_ROWS=variant.block_rows, BLOCK_DIM=variant.block_dim)
        return launch
    if kernel in LORA_KERNELS:
        if store_act or routed:
            raise ValueError(f"{kernel}: the LoRA linear's kernels have no store_act or routed case")
        return _lora_launch(kernel, block_rank, dtype_name, scenario, variant, half_rank=single)
    if single:
        raise ValueError(f"{kernel}: the k = 1 form is compiled for the grouped kernels only (and, as half_rank, "
                         f"for the LoRA kernels)")
    if kernel in SPARSE_KERNELS:
        launch = _sparse_launch(kernel, block_rank, dtype_name, scenario, store_act, routed)
        if variant is not None:
            launch.config = variant
            constexprs = dict(launch.constexprs, BLOCK_ROWS=variant.block_rows, BLOCK_DIM=variant.block_dim)
            if kernel == "sparse_backward_weights":
                constexprs["BLOCK_COLUMNS"] = variant.rank_tile or block_rank
            launch.constexprs = constexprs
        return launch
    if routed:
        raise ValueError(f"{kernel}: only sparse_forward has a routed form")
    from . import bottleneck as bn

    rows, dim, rank, misaligned = _scenario_shapes(block_rank, scenario)
    dtype, compute = _dtypes(dtype_name)
    wide = kernel in WIDE_KERNELS
    column_major = kernel in LAYOUT_KERNELS
    kernel = kernel.removesuffix("_wide").removesuffix("_column_major")
    dim_out = 3 * dim if wide else dim

    def tensor(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt)

    def matrix(rows_, cols, offset=False):  # [rows_, cols], row-major or (column_major) column-major
        if column_major:
            flat = tensor(rows_ * cols + 1)[1:] if offset else tensor(rows_ * cols)
            return flat.view(cols, rows_).t()
        return tensor(rows_ * cols + 1)[1:].view(rows_, cols) if offset else tensor(rows_, cols)

    x = matrix(rows, dim, offset=misaligned)
    w_down, w_up = tensor(rank, dim), tensor(dim_out, rank)
    b_down, b_up, scale = tensor(rank), tensor(dim_out), tensor(dim_out)
    residual, row_scale = matrix(rows, dim_out), tensor(rows, dt=torch.float32)
    hidden = tensor(rows, rank, dt=compute)
    if kernel == "forward":  # x is a residual term only where D_out = D
        launch = bn.forward_launch(x, w_down, b_down, w_up, b_up, scale, 1.0, residual, not wide, row_scale, "gelu",
                                   compute, matrix(rows, dim_out), hidden)
    else:
        grad_y = matrix(rows, dim_out)
        hidden_launch, weights_launch, _ = bn.backward_launches(
            grad_y, x, hidden, w_down, w_up, b_up, scale, 1.0, row_scale, "gelu", compute, not wide,
            tensor(rows, rank, dt=compute), tensor(rows if block_rank > 32 or store_act else 0, rank, dt=compute),
            matrix(rows, dim),
            dtype,  # one chunk here: the gradients stored in the parameters' dtype (fp32 for autocast_*)
            next(v for v in bn.VARIANTS if v.store_act) if store_act else bn.DEFAULT_VARIANT,
        )
        launch = hidden_launch if kernel == "backward_hidden" else weights_launch
    if variant is not None:
        launch.config = variant
        launch.constexprs = dict(launch.constexprs, BLOCK_ROWS=variant.block_rows, BLOCK_DIM=variant.block_dim)
    return launch


def _lora_launch(kernel: str, block_rank: int, dtype_name: str, scenario: str, variant, half_rank: bool = False):
    """The single-launch LoRA linear's launches at the qkv shape (D -> 3 D), with a bias; variant:
    one of its GEMM configurations, or for the weights launch one of the bottleneck weights
    configurations, the same-width table's compiled at D_out = D. half_rank: rank block_rank / 2."""
    from . import bottleneck as bn
    from . import lora as ll

    rows, dim, rank, misaligned = _scenario_shapes(block_rank, scenario)
    if half_rank:
        rank = block_rank // 2
    dtype, compute = _dtypes(dtype_name)
    same_width = kernel == "lora_backward_weights" and variant is not None and \
        variant in bn.BACKWARD_WEIGHTS_CONFIGS.values()
    dim_out = dim if same_width else 3 * dim

    def tensor(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt)

    x = tensor(rows * dim + 1)[1:].view(rows, dim) if misaligned else tensor(rows, dim)
    weight, bias, lora_a, lora_b = tensor(dim_out, dim), tensor(dim_out), tensor(rank, dim), tensor(dim_out, rank)
    hidden = tensor(rows, rank, dt=compute)
    if kernel == "lora_forward":
        return ll.forward_launch(x, weight, bias, lora_a, lora_b, 0.5, compute, tensor(rows, dim_out, dt=compute),
                                 hidden, variant)
    grad_y = tensor(rows * dim_out + 1, dt=compute)[1:].view(rows, dim_out) if misaligned else \
        tensor(rows, dim_out, dt=compute)
    if kernel == "lora_backward_input":
        return ll.backward_input_launch(grad_y, weight, lora_a, lora_b, 0.5, compute, tensor(rows, dim),
                                        tensor(rows, rank, dt=compute), variant)
    launch, _ = ll.backward_weights_launch(grad_y, x, hidden, tensor(rows, rank, dt=compute), lora_a, lora_b, 0.5,
                                           compute, dtype)
    return launch


def _sparse_launch(kernel: str, block_columns: int, dtype_name: str, scenario: str, store_act: bool,
                   routed: bool):
    from . import sparse as sp

    if routed and kernel != "sparse_forward":
        raise ValueError(f"{kernel}: the routed form is compiled for sparse_forward only")
    rows, dim, _, misaligned = _scenario_shapes(16, scenario)
    experts, rank = _sparse_shape(block_columns, scenario)
    if sp.block_columns(experts, rank) != block_columns:
        raise ValueError(f"E = {experts}, r = {rank} does not pad to {block_columns} columns")
    dtype, compute = _dtypes(dtype_name)
    columns = experts * rank

    def tensor(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt)

    x = tensor(rows * dim + 1)[1:].view(rows, dim) if misaligned else tensor(rows, dim)
    # The gate is fp32 whatever the experts' dtype (its logits are fp32 ieee dots).
    w_gate, b_gate = tensor(experts, dim, dt=torch.float32), tensor(experts, dt=torch.float32)
    w_down, w_up = tensor(experts, rank, dim), tensor(experts, dim, rank)
    b_down, b_up, scale = tensor(experts, rank), tensor(experts, dim), tensor(dim)
    residual, row_scale = tensor(rows, dim), tensor(rows, dt=torch.float32)
    hidden = tensor(rows, columns, dt=compute)
    weights = tensor(rows, experts, dt=torch.float32)
    if kernel == "sparse_forward":
        expert_idx = tensor(rows, SPARSE_TOP_K, dt=torch.int64) if routed else None
        expert_weight = tensor(rows, SPARSE_TOP_K) if routed else None
        return sp.forward_launch(
            x, None if routed else w_gate, None if routed else b_gate, expert_idx, expert_weight, w_down, b_down,
            w_up, b_up, scale, 1.0, residual, True, row_scale, SPARSE_TOP_K, "gelu", compute, tensor(rows, dim),
            hidden, weights, tensor(0 if routed else rows, experts, dt=torch.float32),
        )
    variant = next(v for v in sp.VARIANTS if v.store_act) if store_act else sp.DEFAULT_VARIANT
    input_launch, weights_launch, _ = sp.backward_launches(
        tensor(rows, dim), tensor(rows, experts, dt=torch.float32), x, hidden, weights, w_gate, w_down, w_up, b_up,
        scale, 1.0, row_scale, "gelu", compute, True, tensor(rows, columns, dt=compute),
        tensor(rows, experts, dt=torch.float32), tensor(rows if store_act else 0, columns, dt=compute),
        tensor(rows, dim),
        dtype,  # one chunk here: the gradients stored in the parameters' dtype (fp32 for autocast_*)
        variant,
    )
    return input_launch if kernel == "sparse_backward_input" else weights_launch


def _grouped_launch(kernel: str, block_rank: int, dtype_name: str, scenario: str, single: bool):
    from . import sparse_grouped as sg

    rows, dim, rank, misaligned = _scenario_shapes(block_rank or 16, scenario)
    if block_rank and sg.padded_rank(rank) != block_rank:
        raise ValueError(f"r = {rank} does not pad to {block_rank}")
    dtype, compute = _dtypes(dtype_name)
    experts, top_k = GROUPED_EXPERTS, 1 if single else SPARSE_TOP_K
    gated = not single
    assignments = rows * top_k

    def tensor(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt)

    # The buffers grouped_forward / grouped_backward allocate, in their dtypes.
    x = tensor(rows * dim + 1)[1:].view(rows, dim) if misaligned else tensor(rows, dim)
    idx, weights = tensor(rows, top_k, dt=torch.int32), tensor(rows, top_k, dt=torch.float32)
    order, counts = tensor(assignments, dt=torch.int64), tensor(experts, dt=torch.int64)
    w_gate, b_gate = tensor(experts, dim, dt=torch.float32), tensor(experts, dt=torch.float32)
    w_down, w_up = tensor(experts, rank, dim), tensor(experts, dim, rank)
    b_down, b_up, scale = tensor(experts, rank), tensor(experts, dim), tensor(dim)
    residual, row_scale = tensor(rows, dim), tensor(rows, dt=torch.float32)
    hidden = tensor(assignments, rank, dt=compute)
    if kernel == "grouped_gate":
        return sg.gate_launch(x, w_gate, b_gate, top_k, tensor(rows, experts, dt=torch.float32), idx, weights,
                              GROUPED_PLAN_SMS)
    if kernel in ("grouped_forward", "grouped_combine"):
        launches = sg.grouped_forward_launches(
            x, idx, weights, order, counts, w_down, b_down, w_up, b_up, scale, 1.0, residual, True, row_scale, "gelu",
            compute, tensor(rows, dim), hidden, tensor(assignments if top_k > 1 else 0, dim, dt=compute),
        )
        launch = launches[0] if kernel == "grouped_forward" else launches[1]
    else:
        weights_rows = sg.grouped_config(sg.GROUPED_BACKWARD_WEIGHTS_CONFIGS, rank, compute).block_rows
        chunks = sg.gate_chunks(rows, dim, experts, top_k, x.element_size(), weights_rows) if gated else 0
        launches = sg.grouped_backward_launches(
            tensor(rows, dim), tensor(rows, experts, dt=torch.float32) if gated else None, x, hidden, idx, weights,
            order, counts, w_gate if gated else None, w_down, w_up, b_up, scale, 1.0, row_scale, "gelu", compute,
            True, tensor(rows, dim), tensor(rows, top_k, dt=torch.float32), tensor(assignments, rank, dt=compute),
            tensor(assignments if gated else 0, dim, dt=compute),
            tensor(rows if gated else 0, experts, dt=torch.float32),
            # the parameters' dtype (fp32 for autocast_*)
            tensor(sg.packed_size(experts, rank, dim, sg.weights_rank_blocks(rank, compute))),
            tensor(chunks, experts * dim + experts, dt=torch.float32),
        )
        launch = launches[("grouped_backward_input", "grouped_backward_combine",
                           "grouped_backward_weights").index(kernel)]
    if launch is None:
        raise ValueError(f"{kernel}: no such launch with k = {top_k}")
    return launch


def specialize(launch):
    """signature, constexprs and attrs as Triton's JIT would build them for these arguments."""
    fn = launch.kernel
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for index, name in enumerate(fn.arg_names):
        if name in launch.constexprs:
            signature[name] = "constexpr"
            continue
        value = launch.args[name]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TORCH_TO_TRITON[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            raise TypeError(f"{name}: runtime bools are not expected")
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot specialize {type(value).__name__}")
    return signature, constexprs, attrs


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        out = subprocess.run(
            [os.path.join(_tools_dir(), "cuobjdump"), "--dump-resource-usage", handle.name],
            check=True, capture_output=True, text=True,
        ).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", out)
        usage[key] = int(match.group(1)) if match else -1
    return usage


def compile_launch(launch, arch: int):
    """The kernel a GPU of this arch would compile for the launch (same specialization)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = specialize(launch)
    return triton.compile(
        ASTSource(launch.kernel, signature, constexprs, attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=launch.config.num_warps, num_stages=launch.config.num_stages),
    )


def launch_usage(launch, arch: int) -> dict:
    """{"registers", "spill_bytes"} of the launch's kernel compiled for arch."""
    usage = _resource_usage(compile_launch(launch, arch).asm["cubin"])
    return {"registers": usage["REG"], "spill_bytes": usage["STACK"] + usage["LOCAL"]}


def check_one(kernel: str, block_rank: int, dtype_name: str, arch: int, scenario: str, variant=None,
              store_act: bool = False, routed: bool = False, single: bool = False) -> Result:
    dtype = _dtypes(dtype_name)[1]
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"  # the launchers read it
    try:
        launch = build_launches(kernel, block_rank, dtype_name, scenario, variant, store_act, routed, single)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    lora = kernel in LORA_KERNELS
    suffix = ("+store_act" if store_act else "") + ("+routed" if routed else "") + \
        ("+k1" if single and not lora else "") + ("+half_rank" if single and lora else "")
    result = Result(kernel, launch.config.name + suffix, dtype_name, arch, scenario)
    try:
        compiled = compile_launch(launch, arch)
    except Exception as error:  # report and fail, do not crash the table
        result.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
        result.failures = ("compile error",)
        return result
    usage = _resource_usage(compiled.asm["cubin"])
    result.registers, result.stack_bytes = usage["REG"], usage["STACK"]
    result.local_bytes = usage["LOCAL"]
    result.shared_bytes = compiled.metadata.shared  # dynamic shared memory; cuobjdump shows only static
    ptx = compiled.asm["ptx"]
    result.mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if re.search(r"\bmma\.sync", ptx) else "none")
    widths = [32 * int(w) for w in re.findall(r"ld\.global(?:\.\w+)*\.v(\d)\.(?:b|u|f)32", ptx)]
    # Loads the software pipeline (num_stages > 1) issues as global-to-shared copies: bytes per copy.
    copies = re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*?,\s*(0x[0-9a-fA-F]+|\d+)\s*[,;]", ptx)
    widths += [8 * int(size, 0) for size in copies]
    result.widest_load_bits = max(widths, default=32)

    failures = []
    if result.stack_bytes != 0 or result.local_bytes != 0:
        failures.append("spills")
    if result.shared_bytes > SHARED_MEMORY_LIMIT[arch]:
        failures.append("shared memory")
    wants_mma = kernel not in GROUPED_RANKLESS_KERNELS and (
        dtype != torch.float32 or launch.constexprs.get("INPUT_PRECISION") == "tf32")
    if scenario == "aligned":
        if wants_mma and result.mma == "none":
            failures.append("no MMA")
        # 128-bit where a thread's share of a tile row allows it; small tiles give 64-bit. The
        # smaller block-rows variants (the `_rowsN` configs, for grids that fill the GPU at
        # moderate M) are reported, not failed: there the backward-hidden kernel's dy tile
        # feeds an mma.sync operand directly and Triton loads it in that layout, 32 bits a
        # thread, at ranks up to 32.
        if result.widest_load_bits < 64 and "_rows" not in result.config:
            failures.append("no vectorized loads")
    result.failures = tuple(failures)
    return result


def config_tables() -> dict:
    """Each kernel's table of block configurations, {(padded rank or E*r, dtype group): config};
    the grouped gate's and combines' (keyed by the dtype group alone) under padded rank 0."""
    from . import bottleneck as bn
    from . import lora as ll
    from . import sparse as sp
    from . import sparse_grouped as sg

    def rankless(table):
        return {(0, group): config for group, config in table.items()}

    # The LoRA GEMM's aligned and unaligned tile lists together; _cases compiles each list in its
    # own scenario.
    lora_gemm = {key: configs + ll.LORA_LINEAR_UNALIGNED_CONFIGS[key] for key, configs in ll.LORA_LINEAR_CONFIGS.items()}

    return {"forward": bn.FORWARD_CONFIGS, "backward_hidden": bn.BACKWARD_HIDDEN_CONFIGS,
            "backward_weights": bn.BACKWARD_WEIGHTS_CONFIGS, "forward_wide": bn.FORWARD_CONFIGS,
            "backward_weights_wide": bn.BACKWARD_WEIGHTS_WIDE_CONFIGS, "forward_column_major": bn.FORWARD_CONFIGS,
            "backward_hidden_column_major": bn.BACKWARD_HIDDEN_COLUMN_MAJOR_CONFIGS,
            "backward_weights_column_major": bn.BACKWARD_WEIGHTS_COLUMN_MAJOR_CONFIGS,
            "sparse_forward": sp.FORWARD_CONFIGS,
            "sparse_backward_input": sp.BACKWARD_INPUT_CONFIGS,
            "sparse_backward_weights": sp.BACKWARD_WEIGHTS_CONFIGS,
            "grouped_gate": rankless(sg.GATE_CONFIGS), "grouped_forward": sg.GROUPED_FORWARD_CONFIGS,
            "grouped_combine": rankless(sg.COMBINE_CONFIGS),
            "grouped_backward_input": sg.GROUPED_BACKWARD_INPUT_CONFIGS,
            "grouped_backward_combine": rankless(sg.BACKWARD_COMBINE_CONFIGS),
            "grouped_backward_weights": sg.GROUPED_BACKWARD_WEIGHTS_CONFIGS,
            "lora_forward": lora_gemm, "lora_backward_input": lora_gemm,
            "lora_backward_weights": {key: [bn.BACKWARD_WEIGHTS_CONFIGS[key], config]
                                      for key, config in bn.BACKWARD_WEIGHTS_WIDE_CONFIGS.items()
                                      if key[0] <= ll.MAX_SINGLE_LAUNCH_RANK}}


def _cases(archs, dtypes, scenarios, kernels, configs=None):
    """Every case of these kernels; configs: only the block configurations (row variants
    included) whose name contains one of these strings ("c128_half" takes a configuration and
    its `_rowsN` variants, "c128_half_rows16" one variant)."""
    from .launch import dtype_group, row_variants

    tables = config_tables()
    for kernel in kernels:
        sparse = kernel in SPARSE_KERNELS
        grouped = kernel in GROUPED_KERNELS
        for (block_rank, group), config in tables[kernel].items():
            # The row-tile kernels pick their block rows from M: every variant is compiled. The
            # grouped kernels' block rows are fixed by the configuration, except the gate's. The
            # LoRA linear's GEMM tables list every tile its plan may pick.
            fixed_rows = kernel.endswith(("backward_weights", "backward_weights_wide",
                                          "backward_weights_column_major")) or (
                grouped and kernel != "grouped_gate")
            if kernel in LORA_KERNELS:
                variants = config
            else:
                variants = [config] if fixed_rows else row_variants(config)
            # The store_act op variant changes the bottleneck backward kernels' flags at ranks up
            # to 32 (above that they always store act), the sparse backward's at every E*r.
            backward = kernel not in ("forward", "forward_wide", "forward_column_major", "sparse_forward") and \
                not grouped and \
                kernel not in LORA_KERNELS
            store_acts = (False, True) if backward and (sparse or block_rank <= 32) else (False,)
            # The trailing arguments of each form: the sparse forward's two forms, gated and
            # routed, are different kernels; so are two grouped kernels' k = 1 forms.
            if sparse:
                forms = [(False,), (True,)] if kernel == "sparse_forward" else [(False,)]
            elif kernel in LORA_KERNELS:
                forms = [(False, False), (False, True)]  # the padded rank, and half of it
            elif grouped:
                forms = [(False, False), (False, True)] if kernel in GROUPED_K1_KERNELS else [(False, False)]
            else:
                forms = [()]
            for variant in variants:
                if configs and not any(part in variant.name for part in configs):
                    continue
                for store_act in store_acts:
                    for form in forms:
                        for dtype_name in dtypes:
                            # The gate's table is keyed by x's dtype, the others' by the compute dtype.
                            if dtype_group(_dtypes(dtype_name)[0 if kernel == "grouped_gate" else 1]) != group:
                                continue
                            # The LoRA linear's single launch runs fp32 only with tf32 dots.
                            if kernel in LORA_KERNELS and dtype_name == "float32":
                                continue
                            for arch in archs:
                                for scenario in scenarios:
                                    if kernel in LORA_KERNELS[:2] and \
                                            variant.name.endswith("_unaligned") != (scenario == "unaligned"):
                                        continue
                                    if kernel in LORA_KERNELS and form[1] and scenario == "unaligned":
                                        continue  # the unaligned scenario's rank is odd already
                                    yield (kernel, block_rank, dtype_name, arch, scenario, variant, store_act) + form


def _run_case(case) -> Result:
    return check_one(*case)


def format_table(results) -> str:
    kw = max([17] + [len(r.kernel) for r in results])
    cw = max([22] + [len(r.config) for r in results])
    header = f"{'kernel':<{kw}} {'config':<{cw}} {'dtype':<9} {'arch':<5} {'scenario':<10} {'regs':>4} " \
             f"{'stack':>5} {'local':>5} {'smem':>6} {'mma':<9} {'ld bits':>7}  status"
    lines = [header, "-" * len(header)]
    for r in results:
        status = "ok" if not r.failures else "FAIL: " + ", ".join(r.failures) + (f" ({r.error})" if r.error else "")
        lines.append(
            f"{r.kernel:<{kw}} {r.config:<{cw}} {r.dtype:<9} sm_{r.arch:<2} {r.scenario:<10} {r.registers:>4} "
            f"{r.stack_bytes:>5} {r.local_bytes:>5} {r.shared_bytes:>6} {r.mma:<9} {r.widest_load_bits:>7}  {status}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--scenario", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--config", nargs="+", default=None, metavar="PART",
                        help="only the block configurations whose name contains one of these (c128_half: "
                             "that configuration and its _rowsN variants)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    from .launch import is_interpreted

    if is_interpreted():
        print("compile_check: TRITON_INTERPRET=1 is set; unset it to compile the real kernels", file=sys.stderr)
        return 2
    cases = list(_cases(args.arch, args.dtype, args.scenario, args.kernel, args.config))
    if not cases:
        print("compile_check: no case matches these options", file=sys.stderr)
        return 2
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_run_case, cases))
    else:
        results = [_run_case(case) for case in cases]
    print(format_table(results))
    failed = [r for r in results if r.failures]
    print(f"\ncompile check: {len(results) - len(failed)} ok, {len(failed)} failing")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
