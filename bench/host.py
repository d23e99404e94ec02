"""Host time per call of each fused op: what its Python side (argument checks, launch plan,
allocations, the custom op and autograd glue) costs, with every Triton launch replaced by a
no-op, against the host time of the same math as a plain F.linear chain.

    python bench/host.py [--rows 6304] [--dim 768] [--repeats 200] [--sms 132]

Fused: CPU fp16 tensors, the kernels' path taken as under the interpreter but with Launch calls
doing nothing, so what is timed is what a GPU's host thread would do before and between its
launches. Eager: the same math as a plain chain of aten ops (F.linear, the activation, the
epilogue; the sparse mixture over its stacked experts) on CPU tensors of 16 rows and 32
columns in fp32 (the CPU's fp16 kernels take slow paths), where the arithmetic is next to nothing and what is timed is dispatch and autograd,
which do not depend on the shape: about its host time on a GPU. Forward (a training
forward: inputs require grad) and forward + backward, medians in microseconds. Shapes: ViT-B
batch 32 (M = 6304, D = 768), bottleneck r = 8, sparse E = 8, k = 2, r = 16, LoRA qkv
(768 -> 2304, r = 8; fused: the single-launch form, whose every launch is Triton's). On a GPU the enqueue time of each launch (a few microseconds) adds to
both columns.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # the kernels' path on CPU tensors; the launches are no-ops below

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.measure import bottleneck_inputs, lora_inputs, sparse_inputs  # noqa: E402
from fused_adapters.kernels import (  # noqa: E402
    bottleneck_adapter, lora_linear, routed_adapter, sparse_adapter, use_variant,
)
from fused_adapters.kernels import launch as launch_module  # noqa: E402

EXPERTS, TOP_K, SPARSE_RANK, RANK = 8, 2, 16, 8
EAGER_ROWS, EAGER_DIM = 16, 32


def sparse_chain(x, w_gate, b_gate, w_down, b_down, w_up, b_up, scale, residual):
    """The gated mixture as plain aten ops over the stacked experts (the dense design's math)."""
    experts, rank, dim = w_down.shape
    logits = F.linear(x.float(), w_gate, b_gate)
    top, idx = logits.topk(TOP_K, dim=-1)
    weights = torch.zeros_like(logits).scatter(-1, idx, top.softmax(-1)).to(x.dtype)
    act = F.gelu(F.linear(x, w_down.reshape(experts * rank, dim), b_down.reshape(-1)))
    act = act * weights.repeat_interleave(rank, dim=-1)
    update = F.linear(act, w_up.permute(1, 0, 2).reshape(dim, experts * rank)) + weights @ b_up
    return residual + scale * update


def routed_chain(x, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, residual):
    experts, rank, dim = w_down.shape
    weights = torch.zeros(x.shape[0], experts, dtype=x.dtype, device=x.device).scatter_add(
        -1, expert_idx, expert_weight.to(x.dtype))
    act = F.gelu(F.linear(x, w_down.reshape(experts * rank, dim), b_down.reshape(-1)))
    act = act * weights.repeat_interleave(rank, dim=-1)
    update = F.linear(act, w_up.permute(1, 0, 2).reshape(dim, experts * rank)) + weights @ b_up
    return residual + scale * update


def lora_single_launch(*args):
    # The single-launch form: the default form's base GEMM is an aten op, which the CPU would
    # compute here rather than enqueue.
    with use_variant("lora_linear", "single_launch"):
        return lora_linear(*args, 2.0)


def cases(rows: int, dim: int, device: str):
    """(name, forward callable, the tensors it differentiates) per op: device "fused" or "eager"."""
    # fp32 for the eager chain: the CPU's fp16 kernels take slow paths that would be timed too.
    dtype = torch.float16 if device == "fused" else torch.float32
    generator = torch.Generator().manual_seed(0)

    bottleneck = (bottleneck_inputs(rows, dim, RANK, dtype, "cpu", True, generator))
    gated = (sparse_inputs(rows, dim, SPARSE_RANK, EXPERTS, TOP_K, dtype, "cpu", True, False, generator))
    routed = (sparse_inputs(rows, dim, SPARSE_RANK, EXPERTS, TOP_K, dtype, "cpu", True, True, generator))
    lora = (lora_inputs(rows, dim, 3 * dim, RANK, dtype, "cpu", generator))
    fused = device == "fused"
    b, g, r, lo = bottleneck, gated, routed, lora
    experts = (g["w_down"], g["b_down"], g["w_up"], g["b_up"], g["scale"])
    routed_experts = (r["w_down"], r["b_down"], r["w_up"], r["b_up"], r["scale"])
    return [
        ("bottleneck", (lambda: bottleneck_adapter(b["x"], b["w_down"], b["b_down"], b["w_up"], b["b_up"], b["scale"],
                                                   residual=b["x"])) if fused else
         (lambda: b["x"] + b["scale"] * F.linear(F.gelu(F.linear(b["x"], b["w_down"], b["b_down"])), b["w_up"],
                                                 b["b_up"])), b),
        ("sparse_adapter", (lambda: sparse_adapter(g["x"], g["w_gate"], g["b_gate"], *experts, top_k=TOP_K,
                                                   residual=g["x"])) if fused else
         (lambda: sparse_chain(g["x"], g["w_gate"], g["b_gate"], *experts, residual=g["x"])), g),
        ("routed_adapter", (lambda: routed_adapter(r["x"], r["expert_idx"], r["expert_weight"], *routed_experts,
                                                   residual=r["x"])) if fused else
         (lambda: routed_chain(r["x"], r["expert_idx"], r["expert_weight"], *routed_experts, residual=r["x"])), r),
        ("lora_linear", (lambda: lora_single_launch(lo["x"], lo["weight"], lo["bias"], lo["lora_A"], lo["lora_B"]))
         if fused else (lambda: F.linear(lo["x"], lo["weight"], lo["bias"])
                        + 2.0 * F.linear(F.linear(lo["x"], lo["lora_A"]), lo["lora_B"])), lo),
    ]


def median_us(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def host_times(rows: int, dim: int, repeats: int, device: str) -> dict:
    """{op: (forward us, forward+backward us)}: device "fused" (the fused ops, launches no-ops) or
    "eager" (the aten chains)."""
    results = {}
    for name, forward, tensors in cases(rows, dim, device):
        wanted = [t for t in tensors.values() if t.requires_grad]
        y = forward()
        grad = torch.ones_like(y)

        def step():
            torch.autograd.grad(forward(), wanted, grad)

        results[name] = (median_us(forward, repeats), median_us(step, repeats))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=6304)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--sms", type=int, default=132, help="SM count the launches are planned for")
    args = parser.parse_args(argv)
    original = launch_module.Launch.__call__
    launch_module.Launch.__call__ = lambda self: None
    try:
        with launch_module.launch_plan(args.sms):  # the plans (and partials) an H100 would get
            fused = host_times(args.rows, args.dim, args.repeats, "fused")
    finally:
        launch_module.Launch.__call__ = original
    eager = host_times(EAGER_ROWS, EAGER_DIM, args.repeats, "eager")
    print(f"host time per call, us (median of {args.repeats}; fused fp16, M = {args.rows}, D = {args.dim}; "
          f"eager fp32, M = {EAGER_ROWS}, D = {EAGER_DIM})")
    print(f"{'op':<16} {'fused fwd':>10} {'fused f+b':>10} {'eager fwd':>10} {'eager f+b':>10}")
    for name in fused:
        print(f"{name:<16} {fused[name][0]:>10.1f} {fused[name][1]:>10.1f} {eager[name][0]:>10.1f} "
              f"{eager[name][1]:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
