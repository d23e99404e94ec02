"""Host time per call of each fused op: what its Python side (argument checks, launch plan,
allocations, the custom op and autograd glue) costs, with every Triton launch replaced by a
no-op, against the host time of the same math as a plain F.linear chain.

    python bench/host.py [--rows 6304] [--dim 768] [--repeats 100] [--rounds 5] [--sms 132]

Fused: CPU fp16 tensors, the kernels' path taken as under the interpreter but with Launch calls
doing nothing (measure.launches_as_no_ops), so what is timed is what a GPU's host thread does
before and between its launches; the ops' reductions of gradient partials, device work on a GPU
that the CPU runs in place here, are timed and taken out. Eager: the same math as a plain chain
of aten ops (F.linear, the activation, the epilogue; the sparse mixture over its stacked
experts) on CPU tensors of 16 rows and 32 columns in fp32 (the CPU's fp16 kernels take slow
paths), where the arithmetic is next to nothing and what is timed is dispatch and autograd,
which do not depend on the shape: about its host time on a GPU. A no-op autograd.Function with
the bottleneck op's 6 gradients gives the floor of any Python autograd op.

Forward (a training forward: inputs require grad) and forward + backward, in microseconds: the
least and the median of many calls (the least is the figure free of the machine's noise).
Shapes: ViT-B batch 32 (M = 6304, D = 768), bottleneck r = 8, sparse E = 8, k = 2, r = 16, LoRA
qkv (768 -> 2304, r = 8; fused: the single-launch form, whose every launch is Triton's). On a
GPU the enqueue time of each launch (a few microseconds) adds to both columns.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # the kernels' path on CPU tensors; the launches are no-ops below

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.measure import (  # noqa: E402
    HOST_EAGER_DIM, HOST_EAGER_ROWS, bottleneck_inputs, host_time, launches_as_no_ops, lora_inputs, sparse_inputs,
)
from fused_adapters.kernels import (  # noqa: E402
    bottleneck_adapter, lora_linear, routed_adapter, sparse_adapter, use_variant,
)

EXPERTS, TOP_K, SPARSE_RANK, RANK = 8, 2, 16, 8


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


class NoOp(torch.autograd.Function):
    """An autograd op that does nothing: what any Python-level autograd op pays per call here."""

    @staticmethod
    def forward(ctx, x, *params):
        ctx.shapes = [p.shape for p in params]
        return x.new_empty(x.shape)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(grad.new_empty(shape) for shape in ctx.shapes))


def floor_times(rows: int, dim: int, repeats: int, rounds: int) -> tuple:
    """host_time of NoOp on the bottleneck op's tensors (x and 5 parameters), forward and
    forward+backward: the floor of a Python autograd op with that many gradients."""
    tensors = list(cases(rows, dim, "fused")[0][2].values())
    grad = torch.ones_like(NoOp.apply(*tensors))
    return (host_time(lambda: NoOp.apply(*tensors), repeats, rounds),
            host_time(lambda: torch.autograd.grad(NoOp.apply(*tensors), tensors, grad), repeats, rounds))


def host_times(rows: int, dim: int, repeats: int, rounds: int, device: str, device_work=None) -> dict:
    """{op: ((least, median) forward us, (least, median) forward+backward us)}: device "fused"
    (the fused ops; call it with launches_as_no_ops) or "eager" (the aten chains)."""
    results = {}
    for name, forward, tensors in cases(rows, dim, device):
        wanted = [t for t in tensors.values() if t.requires_grad]
        grad = torch.ones_like(forward())

        def step():
            torch.autograd.grad(forward(), wanted, grad)

        results[name] = (host_time(forward, repeats, rounds, device_work),
                         host_time(step, repeats, rounds, device_work))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=6304)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=100, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sms", type=int, default=132, help="SM count the launches are planned for")
    args = parser.parse_args(argv)
    with launches_as_no_ops(args.sms) as device_work:  # the plans (and partials) an H100 would get
        fused = host_times(args.rows, args.dim, args.repeats, args.rounds, "fused", device_work)
    eager = host_times(HOST_EAGER_ROWS, HOST_EAGER_DIM, args.repeats, args.rounds, "eager")
    print(f"host time per call, us: least / median of {args.rounds} x {args.repeats} calls; fused fp16, "
          f"M = {args.rows}, D = {args.dim}; eager fp32, M = {HOST_EAGER_ROWS}, D = {HOST_EAGER_DIM}")
    print(f"{'op':<16} {'fused fwd':>15} {'fused f+b':>15} {'eager fwd':>15} {'eager f+b':>15}")
    for name in fused:
        cells = [f"{least:.0f} / {median:.0f}" for least, median in (*fused[name], *eager[name])]
        print(f"{name:<16} " + " ".join(f"{cell:>15}" for cell in cells))
    cells = [f"{least:.0f} / {median:.0f}" for least, median in floor_times(args.rows, args.dim, args.repeats,
                                                                            args.rounds)]
    print(f"{'no-op autograd':<16} " + " ".join(f"{cell:>15}" for cell in cells)
          + "   (an autograd.Function doing nothing, 6 gradients: the floor of any Python autograd op)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
