"""Bytes the fused ops move against their floor, fused and eager, on any machine.

    python bench/bytes.py [--sms 132] [--shapes 768x768x8 6304x768x8 ...] [--residual x|skip+x]
    python bench/bytes.py --op sparse [--experts 8] [--top-k 2] [--shapes 1576x768x16 ...]
    python bench/bytes.py --op sparse --variant grouped [--experts 16] [--shapes 1576x768x32 ...]
    python bench/bytes.py --op fusion [--adapters 2 4 8] [--shapes 1576x768x8 ...]

Runs the op forward and backward in Triton's interpreter (set here when CUDA is absent) with
launches planned for a GPU of --sms SMs, and counts every load and store of its launches
(distinct addresses within a launch) plus the PyTorch ops around them; eager PyTorch (the
reference) is counted the same way. The floor: forward reads x (and any residual other than
x) and writes y; backward reads dy and x and writes dx. fp16, row_scale and a channel scale on.
The sparse mixture (--op sparse: gated by a learned top-k gate, or --op routed: the routing
given, as in a multi-task batch) has the same floor; its gate and expert weights are small.
--variant runs the fused op with one of its kernel variants (kernels.list_variants), e.g. the
sparse mixture's grouped design; where E*r > 256 every sparse variant runs the grouped design.
AdapterFusion (--op fusion) over N frozen adapters of rank r at the post position (residual x),
the fusion's W_q, b_q, W_k, b_k and W_v trainable, has that floor plus its three D x D weights
(read once a pass; the backward also writes their gradients); eager is the reference, which
forms every adapter's output, key and value.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: bytes are counted there

from fused_adapters.kernels import (  # noqa: E402
    adapter_fusion, bottleneck_adapter, list_variants, reference, routed_adapter, sparse_adapter, use_variant,
)
from fused_adapters.tools.byte_count import count_bytes  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too
from bench.measure import floor_bytes, fusion_floor_bytes  # noqa: E402

DEFAULT_SHAPES = ["768x768x8", "1024x768x8", "6304x768x8", "768x768x16", "768x1024x16", "6304x768x16",
                  "768x768x64", "1024x768x64", "6304x768x64"]


def measure(fn, rows, dim, rank, residual, sms):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).half().requires_grad_(True)

    x, skip = randn(rows, dim), randn(rows, dim)
    params = [randn(rank, dim, std=dim ** -0.5), randn(rank, std=0.5), randn(dim, rank, std=rank ** -0.5),
              randn(dim, std=0.5), randn(dim)]
    row_scale = torch.rand(rows, generator=generator) + 0.5
    arg = x if residual == "x" else (skip, x)
    with count_bytes(sm_count=sms) as forward:
        y = fn(x, *params, residual=arg, row_scale=row_scale)
    inputs = [x, *params] + ([skip] if residual != "x" else [])
    grad = torch.randn(y.shape, generator=generator).to(y.dtype)
    with count_bytes(sm_count=sms) as backward:
        torch.autograd.grad(y, inputs, grad)
    kind = "x" if residual == "x" else "tensor"
    forward_floor = floor_bytes("forward", rows, dim, 2, 2, kind)
    backward_floor = floor_bytes("backward", rows, dim, 2, 2, kind)
    return forward.total() / forward_floor, backward.total() / backward_floor, forward, backward


def measure_sparse(fn, rows, dim, rank, experts, top_k, residual, sms, routed=False):
    """As measure, for sparse_adapter (or routed_adapter with routed=True: top_k experts per row,
    drawn at random) with E experts of rank r; returns the same four values."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).half().requires_grad_(True)

    x, skip = randn(rows, dim), randn(rows, dim)
    experts_params = [randn(experts, rank, dim, std=dim ** -0.5), randn(experts, rank, std=0.5),
                      randn(experts, dim, rank, std=rank ** -0.5), randn(experts, dim, std=0.5)]
    scale = randn(dim)
    row_scale = torch.rand(rows, generator=generator) + 0.5
    arg = x if residual == "x" else (skip, x)
    if routed:
        routing = [torch.rand(rows, experts, generator=generator).argsort(dim=1)[:, :top_k],
                   torch.rand(rows, top_k, generator=generator).requires_grad_(True)]
    else:
        routing = [randn(experts, dim, std=0.3), randn(experts, std=0.5)]
    kwargs = {} if routed else {"top_k": top_k}
    with count_bytes(sm_count=sms) as forward:
        y = fn(x, *routing, *experts_params, scale, residual=arg, row_scale=row_scale, **kwargs)
    inputs = [x, *[t for t in routing if t.requires_grad], *experts_params, scale]
    inputs += [skip] if residual != "x" else []
    grad = torch.randn(y.shape, generator=generator).to(y.dtype)
    with count_bytes(sm_count=sms) as backward:
        torch.autograd.grad(y, inputs, grad)
    kind = "x" if residual == "x" else "tensor"
    forward_floor = floor_bytes("forward", rows, dim, 2, 2, kind)
    backward_floor = floor_bytes("backward", rows, dim, 2, 2, kind)
    return forward.total() / forward_floor, backward.total() / backward_floor, forward, backward


def measure_fusion(fn, rows, dim, rank, adapters, sms):
    """As measure, for adapter_fusion over N frozen adapters (fp16, channel scales, residual x)
    with trainable fusion weights at BERT-like scale; returns the same four values."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0, grad=True):
        return (torch.randn(*shape, generator=generator) * std).half().requires_grad_(grad)

    x = randn(rows, dim)
    frozen = [randn(adapters, rank, dim, std=dim ** -0.5, grad=False), randn(adapters, rank, std=0.5, grad=False),
              randn(adapters, dim, rank, std=rank ** -0.5, grad=False), randn(adapters, dim, std=0.5, grad=False),
              randn(adapters, dim, grad=False)]
    fusion = [randn(dim, dim, std=0.02), randn(dim, std=0.02), randn(dim, dim, std=0.02), randn(dim, std=0.02),
              randn(dim, dim, std=dim ** -0.5)]
    with count_bytes(sm_count=sms) as forward:
        y = fn(x, *frozen, *fusion, residual=x)
    grad = torch.randn(y.shape, generator=generator).to(y.dtype)
    with count_bytes(sm_count=sms) as backward:
        torch.autograd.grad(y, [x, *fusion], grad)
    forward_floor = fusion_floor_bytes("forward", rows, dim, 2)
    backward_floor = fusion_floor_bytes("backward", rows, dim, 2)
    return forward.total() / forward_floor, backward.total() / backward_floor, forward, backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sms", type=int, default=132, help="SM count the launches are planned for (H100: 132)")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="MxDxr, e.g. 6304x768x8")
    parser.add_argument("--residual", choices=["x", "skip+x"], default="x")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager baseline (faster)")
    parser.add_argument("--op", choices=["bottleneck", "sparse", "routed", "fusion"], default="bottleneck")
    parser.add_argument("--adapters", type=int, nargs="+", default=[2, 4, 8], help="fusion: adapters N (each a row)")
    parser.add_argument("--experts", type=int, default=8, help="sparse/routed: experts E")
    parser.add_argument("--top-k", type=int, default=2, help="sparse/routed: experts per row k")
    parser.add_argument("--variant", help="the fused op's kernel variant (default: the one in force); sparse/routed: "
                                          + ", ".join(list_variants("sparse_adapter")))
    args = parser.parse_args()
    family = "bottleneck_adapter" if args.op == "bottleneck" else "sparse_adapter"
    if args.variant is not None and args.variant not in list_variants(family):
        parser.error(f"--variant for --op {args.op} must be one of {', '.join(list_variants(family))}")
    if args.op == "fusion" and args.shapes == DEFAULT_SHAPES:
        args.shapes = ["1576x768x8"]
    elif args.op != "bottleneck" and args.shapes == DEFAULT_SHAPES:
        args.shapes = ["768x768x16", "1576x768x16", "6304x768x16"]
    if args.op == "fusion":
        print(f"bytes moved / floor, fp16, AdapterFusion at the post position (residual x), launches planned for "
              f"{args.sms} SMs")
        print(f"{'M':>6} {'D':>5} {'r':>3} {'N':>3}  {'fwd':>6} {'bwd':>6}  {'eager fwd':>9} {'eager bwd':>9}  "
              f"{'launches':<9} {'aten':<9} seconds")
        for shape in args.shapes:
            rows, dim, rank = (int(v) for v in shape.split("x"))
            for adapters in args.adapters:
                start = time.time()
                forward_ratio, backward_ratio, forward, backward = measure_fusion(adapter_fusion, rows, dim, rank,
                                                                                  adapters, args.sms)
                eager = ("-", "-") if args.no_eager else measure_fusion(reference.adapter_fusion, rows, dim, rank,
                                                                        adapters, args.sms)[:2]
                eager_text = "  ".join(f"{v:>8.2f}x" if isinstance(v, float) else f"{v:>9}" for v in eager)
                launches = f"{forward.triton_launches}/{backward.triton_launches}"
                aten = f"{len(forward.aten)}/{len(backward.aten)}"
                print(f"{rows:>6} {dim:>5} {rank:>3} {adapters:>3}  {forward_ratio:>5.3f}x {backward_ratio:>5.3f}x  "
                      f"{eager_text}  {launches:<9} {aten:<9} {time.time() - start:.0f}", flush=True)
        return
    mixture = "" if args.op == "bottleneck" else f", {args.op} E {args.experts} k {args.top_k}"
    mixture += f", variant {args.variant}" if args.variant else ""
    print(f"bytes moved / floor, fp16, residual {args.residual}{mixture}, launches planned for {args.sms} SMs")
    print(f"{'M':>6} {'D':>5} {'r':>3}  {'fwd':>6} {'bwd':>6}  {'eager fwd':>9} {'eager bwd':>9}  "
          f"{'programs per launch':<22} seconds")
    for shape in args.shapes:
        rows, dim, rank = (int(v) for v in shape.split("x"))
        start = time.time()
        if args.op == "bottleneck":
            def run(fn):
                return measure(fn, rows, dim, rank, args.residual, args.sms)
            fused_fn, eager_fn = bottleneck_adapter, reference.bottleneck_adapter
        else:
            def run(fn):
                return measure_sparse(fn, rows, dim, rank, args.experts, args.top_k, args.residual, args.sms,
                                      routed=args.op == "routed")
            fused_fn = sparse_adapter if args.op == "sparse" else routed_adapter
            eager_fn = reference.sparse_adapter if args.op == "sparse" else reference.routed_adapter
        with use_variant(family, args.variant) if args.variant else contextlib.nullcontext():
            forward_ratio, backward_ratio, forward, backward = run(fused_fn)
        eager = ("-", "-") if args.no_eager else run(eager_fn)[:2]
        programs = "/".join(str(launch.programs) for launch in forward.launches + backward.launches)
        eager_text = "  ".join(f"{v:>8.2f}x" if isinstance(v, float) else f"{v:>9}" for v in eager)
        print(f"{rows:>6} {dim:>5} {rank:>3}  {forward_ratio:>5.3f}x {backward_ratio:>5.3f}x  {eager_text}  "
              f"{programs:<22} {time.time() - start:.0f}", flush=True)


if __name__ == "__main__":
    main()
