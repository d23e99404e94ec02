"""What the benchmark suite measures besides time, and how it times: byte floors, bytes kept for
backward, kernel counts, peak memory, host enqueue time, copy bandwidth, rotated inputs.

    python -m bench.measure --count CASES.json --jobs 8   # device-free counts (used by the suite)

Device-free counts (Triton launches, aten kernels and bytes moved, from the interpreter's byte
counter with launches planned for a given SM count) need TRITON_INTERPRET=1 before triton is
imported; the suite gets them from this module run as a subprocess, so a GPU run has them too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Optional

import torch

# ViT-B/16 at 224 px: 197 tokens per image, so M = batch x 197.
TOKENS = 197

# dtype name -> (dtype of x and the parameters, autocast dtype or None)
DTYPES = {
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "fp32": (torch.float32, None),
    "fp32 (bf16 autocast)": (torch.float32, torch.bfloat16),
}


# --------------------------------------------------------------------------------------------
# Byte floors
# --------------------------------------------------------------------------------------------


def floor_bytes(pass_name: str, rows: int, dim: int, x_size: int, y_size: int, residual: str = "x") -> int:
    """The fewest bytes of memory traffic a pass of the bottleneck op can move: every M x D
    tensor it must read or write, once (the parameters and the M x r tensors are left out).

    forward: read x, read the residual unless it is x itself, write y.
    backward: read dy and x, write dx. The residual's gradient is dy itself: with residual x it
    is added into dx in the same store; another residual tensor gets dy by reference.
    forward+backward: the sum. x_size and y_size are element sizes in bytes (dy has y's dtype,
    dx has x's, the residual has x's)."""
    if residual not in ("x", "none", "tensor"):
        raise ValueError(f"residual must be 'x', 'none' or 'tensor', got {residual!r}")
    elements = rows * dim
    forward = elements * (x_size + y_size + (x_size if residual == "tensor" else 0))
    backward = elements * (y_size + 2 * x_size)
    passes = {"forward": forward, "backward": backward, "forward+backward": forward + backward}
    if pass_name not in passes:
        raise ValueError(f"pass_name must be one of {sorted(passes)}, got {pass_name!r}")
    return passes[pass_name]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def bottleneck_inputs(rows: int, dim: int, rank: int, dtype: torch.dtype, device, requires_grad: bool,
                      generator: Optional[torch.Generator] = None) -> dict:
    """One set of Adapter+ post-adapter inputs: x, the four projection tensors and a channel
    scale; the residual is x itself (y = x + s * up(gelu(down(x))))."""

    def randn(*shape, std=1.0, grad=requires_grad):
        t = torch.randn(*shape, generator=generator) * std
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    return dict(x=randn(rows, dim), w_down=randn(rank, dim, std=dim ** -0.5), b_down=randn(rank, std=0.1),
                w_up=randn(dim, rank, std=rank ** -0.5), b_up=randn(dim, std=0.1), scale=randn(dim))


def rotation_count(set_bytes: int, device: torch.device, memory_cap: int = 4 << 30) -> int:
    """How many input sets to rotate through so that no set is still in the cache when it
    comes round again: twice the last-level cache (L2 on a GPU), within memory_cap."""
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    else:
        cache = 64 << 20
    return max(1, min(math.ceil(2 * cache / max(set_bytes, 1)), memory_cap // max(set_bytes, 1), 64))


# --------------------------------------------------------------------------------------------
# Timing helpers (pytest-benchmark does the timing; these measure the rest)
# --------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_us(fn: Callable[[], object], device: torch.device, calls: int = 10) -> Optional[float]:
    """Microseconds the host takes to enqueue one call (CUDA): a floor on the time of small
    shapes, whatever the GPU does. None on the CPU, where enqueueing is running."""
    if device.type != "cuda":
        return None
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    synchronize(device)
    return elapsed / calls * 1e6


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated by one call beyond what was allocated before it (CUDA)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def saved_bytes(forward: Callable[[], object], inputs, device: torch.device) -> Optional[int]:
    """Bytes a forward keeps alive for its backward beyond its inputs and outputs.

    CUDA: the allocator's live bytes after the forward, less those before and the outputs';
    this sees inside torch.compile'd graphs too. CPU: distinct storages passed to autograd's
    saved-tensor hooks that are not inputs (None where the hooks cannot see, e.g. compiled)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        out = forward()
        synchronize(device)
        outputs = out if isinstance(out, (tuple, list)) else [out]
        kept = torch.cuda.memory_allocated(device) - before
        kept -= sum(o.untyped_storage().nbytes() for o in outputs if isinstance(o, torch.Tensor))
        del out, outputs
        return max(kept, 0)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
    except Exception:  # saved-tensor hooks are not supported everywhere (torch.compile)
        return None
    outputs = out if isinstance(out, (tuple, list)) else [out]
    known = {t.untyped_storage().data_ptr() for t in list(inputs) + list(outputs) if isinstance(t, torch.Tensor)}
    return sum(size for ptr, size in seen.items() if ptr not in known)


def kernel_counts(fn: Callable[[], object], device: torch.device, triton_names=()) -> tuple:
    """(Triton launches, other kernels) one call runs on the GPU, from the profiler: Triton
    kernels are the package's (triton_names) and Inductor's (named triton_*). (None, None) on
    the CPU; there the suite counts with the interpreter instead."""
    if device.type != "cuda":
        return None, None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    names = [event.name for event in prof.events() if event.device_type == DeviceType.CUDA]
    names = [name for name in names if not name.startswith(("Memcpy", "Memset"))]
    triton = sum(1 for name in names if name.startswith("triton") or name in triton_names)
    return triton, len(names) - triton


def copy_gbps(device: torch.device, size: int = 1 << 30) -> float:
    """Bandwidth of a plain copy (read + write, in GB/s) on this device: what a memory-bound
    kernel can hope for, measured in the same run as the benchmarks."""
    if device.type != "cuda":
        size = min(size, 256 << 20)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(12):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size / statistics.median(times[2:]) / 1e9


# --------------------------------------------------------------------------------------------
# Device-free counts (interpreter), run as a subprocess
# --------------------------------------------------------------------------------------------


def count_case(case: dict) -> dict:
    """Triton launches, aten kernels and bytes moved by one forward and one backward of a
    provider ("eager" or "fused" with case["variant"]), counted in the interpreter with launches
    planned for case["sms"] SMs. The interpreter has no bf16: bf16 cases are counted in fp16
    (same element size, same plans)."""
    from fused_adapters.kernels import bottleneck_adapter, reference, use_variant
    from fused_adapters.kernels.byte_count import count_bytes

    dtype, autocast = DTYPES[case["dtype"]]
    dtype = torch.float16 if dtype == torch.bfloat16 else dtype
    autocast = torch.float16 if autocast == torch.bfloat16 else autocast
    generator = torch.Generator().manual_seed(0)
    inputs = bottleneck_inputs(case["rows"], case["dim"], case["rank"], dtype, "cpu", True, generator)
    fn = bottleneck_adapter if case["provider"] == "fused" else reference.bottleneck_adapter
    variant = case.get("variant") or "default"
    autocast_context = (torch.autocast("cpu", dtype=autocast) if autocast is not None
                        else torch.autocast("cpu", enabled=False))
    with use_variant("bottleneck_adapter", variant if case["provider"] == "fused" else "default"), autocast_context:
        with count_bytes(sm_count=case["sms"]) as forward:
            y = fn(inputs["x"], inputs["w_down"], inputs["b_down"], inputs["w_up"], inputs["b_up"], inputs["scale"],
                   residual=inputs["x"])
        grad = torch.randn(y.shape, generator=generator).to(y.dtype)
        with count_bytes(sm_count=case["sms"]) as backward:
            torch.autograd.grad(y, list(inputs.values()), grad)
    return {
        "forward": {"triton_launches": forward.triton_launches, "aten_kernels": len(forward.aten),
                    "moved_bytes": forward.total()},
        "backward": {"triton_launches": backward.triton_launches, "aten_kernels": len(backward.aten),
                     "moved_bytes": backward.total()},
    }


def _count_or_error(case: dict) -> dict:
    try:
        return count_case(case)
    except Exception as error:  # one failing case must not lose the others' counts
        return {"error": f"{type(error).__name__}: {error}"}


def in_subprocess(mode: str, cases: list[dict], jobs: int = 1, timeout: float = 3600) -> list[dict]:
    """`python -m bench.measure --count` (launches and bytes, interpreter, CPU only) or
    `--registers` (compile for sm_90) on the cases, in a subprocess: either needs triton
    imported in a mode this process may not have."""
    import subprocess
    import tempfile

    if not cases:
        return []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "cases.json")
        with open(path, "w") as handle:
            json.dump(cases, handle)
        done = subprocess.run([sys.executable, "-m", "bench.measure", f"--{mode}", path, "--jobs", str(jobs)],
                              cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"bench.measure --{mode} failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout)


def fused_launches(case: dict) -> list:
    """The Launch records the fused op makes for a row (x, the residual and y of the row's
    dtypes; backward launches too for forward+backward), planned for case["sms"] SMs."""
    from fused_adapters.kernels import bottleneck
    from fused_adapters.kernels.launch import launch_plan

    dtype, autocast = DTYPES[case["dtype"]]
    compute = autocast or dtype
    rows, dim, rank = case["rows"], case["dim"], case["rank"]
    variant = next(v for v in bottleneck.VARIANTS if v.name == case["variant"])
    inputs = bottleneck_inputs(1, dim, rank, dtype, "cpu", False)
    x = torch.empty(rows, dim, dtype=dtype)
    hidden = torch.empty(rows, rank, dtype=compute)
    params = inputs["w_down"], inputs["b_down"], inputs["w_up"], inputs["b_up"], inputs["scale"]
    with launch_plan(case["sms"]):
        launches = [bottleneck.forward_launch(x, params[0], params[1], params[2], params[3], params[4], 1.0, None, True,
                                              None, "gelu", compute, torch.empty_like(x), hidden, variant)]
        if case["pass"] != "forward":
            store_act = bottleneck.padded_rank(rank) > 32 or variant.store_act
            hidden_launch, weights_launch, _ = bottleneck.backward_launches(
                x, x, hidden, params[0], params[2], params[3], params[4], 1.0, None, "gelu", compute, True,
                torch.empty(rows, rank, dtype=compute), torch.empty(rows if store_act else 0, rank, dtype=compute),
                torch.empty_like(x), dtype, variant)
            launches += [hidden_launch, weights_launch]
    return launches


def register_usage(cases: list[dict], arch: int = 90) -> list[dict]:
    """Registers and spill bytes per launch of each case, compiled for arch (no GPU needed)."""
    from fused_adapters.kernels.compile_check import launch_usage

    cache = {}
    results = []
    for case in cases:
        usage = []
        for launch in fused_launches(case):
            key = (launch.kernel.__name__, launch.config, tuple(sorted(launch.constexprs.items())))
            if key not in cache:
                cache[key] = launch_usage(launch, arch)
            usage.append(cache[key])
        results.append({"registers": [u["registers"] for u in usage], "spill_bytes": [u["spill_bytes"] for u in usage]})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="device-free numbers for the benchmark suite (JSON to stdout)")
    parser.add_argument("--count", help="JSON file with a list of cases: launches and bytes (interpreter)")
    parser.add_argument("--registers", help="JSON file with a list of cases: registers and spills (sm_90)")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    with open(args.count or args.registers) as handle:
        cases = json.load(handle)
    if args.registers:
        json.dump(register_usage(cases), sys.stdout)
        return 0
    if args.jobs > 1 and len(cases) > 1:
        with ProcessPoolExecutor(min(args.jobs, len(cases))) as pool:
            results = list(pool.map(_count_or_error, cases))
    else:
        results = [_count_or_error(case) for case in cases]
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    # Counting needs the interpreter, compiling needs it off; both before triton is imported.
    if "--count" in sys.argv:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
