"""Compile every kernel at every block configuration for real GPUs, no GPU needed.

    python -m fused_adapters.tools.compile_check [--arch 80 90] [--dtype bfloat16 float32]
    python -m fused_adapters.tools.compile_check --kernel sparse_forward sparse_backward_input \
        sparse_backward_weights        (only the sparse mixture's kernels; --config c128 narrows more)
    python -m fused_adapters.tools.compile_check --kernel grouped_gate grouped_forward grouped_combine \
        grouped_backward_input grouped_backward_combine grouped_backward_weights
                                       (the sparse mixture's grouped design; --config r16 gate combine
                                        takes rank 16 and the rank-free kernels)

For each kernel, each block configuration the package can choose (one per padded rank and
compute dtype group, and for the row-tile kernels every smaller block-rows variant the launch
plan may pick from M), each dtype (autocast included: fp32 storage, bf16/fp16 dots) and each
architecture, this builds the exact launch the package would make (the ops' own launch plans,
kernels/<op>/plan.py, which the runtime runs, called by tools/compile_cases.py), specializes its
arguments as Triton's JIT does at launch (pointers and integers that are multiples of 16 get tt.divisibility=16,
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
kernels/sparse/), whose configurations are keyed by the padded E*r instead of the padded rank:
each is compiled at one representative (experts, rank) per key (SPARSE_SHAPES). The sparse
forward is compiled in both forms, gated (top-2 over a fp32 gate) and routed (the "+routed"
configs: top-2 experts and weights given per row); the sparse backward in the gated form, with
the logits' own gradient, both recomputing act(h) (the default) and storing it ("+store_act").
sparse_forward_wide, sparse_backward_input_wide and sparse_backward_weights_wide are the same
three kernels specialized for a width-changing mixture (w_up [E, D_out, r], D_out = 3 D as
per-task LoRA on a ViT's qkv), at the same forms and the configurations of their wide tables;
in the unaligned scenario also at D_out = D // 4 (fc2's shape; "+narrow"), a multiple of 16
while D is odd. grouped_forward_wide, grouped_backward_input_wide and
grouped_backward_weights_wide are the grouped kernels' such specializations (D_out = 3 D).

The sparse mixture's grouped design (kernels/sparse/jit_grouped.py): grouped_gate (logits, top-k and
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

from .compile_cases import (  # noqa: F401  (the cases' names, for callers of this module)
    ARCHS, BOTTLENECK_KERNELS, DROPOUT_KERNELS, DROPOUT_SUFFIX, DTYPES, GROUPED_EXPERTS, GROUPED_KERNELS,
    GROUPED_RANKLESS_KERNELS, KERNELS, LAYOUT_KERNELS, LORA_KERNELS, SCENARIOS, SPARSE_KERNELS, SPARSE_WIDE_KERNELS, WIDE_KERNELS, _cases, _dtypes,
    build_launches, config_tables,
)

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
    base = kernel.removesuffix(DROPOUT_SUFFIX)
    lora, narrow = base in LORA_KERNELS, base in SPARSE_WIDE_KERNELS
    suffix = ("+store_act" if store_act else "") + ("+routed" if routed else "") + \
        ("+k1" if single and not (lora or narrow) else "") + ("+half_rank" if single and lora else "") + \
        ("+narrow" if single and narrow else "")
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
    wants_mma = base not in GROUPED_RANKLESS_KERNELS and (
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

    from ..kernels.paths import is_interpreted

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
