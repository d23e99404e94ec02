"""Bytes the fused ops move against their floor, fused and eager, on any machine.

    python bench/bytes.py [--sms 132] [--shapes 768x768x8 6304x768x8 ...] [--residual x|skip+x]
    python bench/bytes.py --op sparse [--experts 8] [--top-k 2] [--shapes 1576x768x16 ...]
    python bench/bytes.py --op sparse --variant grouped [--experts 16] [--shapes 1576x768x32 ...]
    python bench/bytes.py --op fusion [--adapters 2 4 8] [--shapes 1576x768x8 ...]
    python bench/bytes.py --op multilora [--tasks 8] [--shapes 1576x768x2304x8 ...] [--jobs 2]
    python bench/bytes.py --op lora [--dropout 0.1] [--shapes 1576x768x2304x8 ...] [--jobs 2]
    python bench/bytes.py [--op sparse|routed|fusion] --dropout 0 0.1

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
A multi-LoRA batch (--op multilora, shapes MxDxD_OUTxr with M = images x 197 tokens) is one
frozen linear with T tasks' LoRA branches (alpha 16), image b in task b % T, x and every A and B
differentiated: task_routing's form (routed: the base GEMM, one routed launch) against PEFT's
mixed-batch loop with the fused branch (loop-fused) and in plain PyTorch (loop-eager), and the
per-image weight gather (gather-eager); bench/test_multilora.py describes them. Its floor is the
LoRA linear's: forward reads x and the frozen W and writes y [M, D_out]; backward reads dy, x
and W and writes dx. The loops' indexing ops are charged the rows they touch (the counter's own
totals, which charge each gather and scatter its whole tensor, are the last columns).
A LoRA linear (--op lora, shapes MxDxD_OUTxr, alpha 16, x, A and B differentiated, W and b frozen)
has the same floor. Its providers, each the whole linear: fused (lora_linear's default form: the
base GEMM, then the branch as one fused launch, dropout inside it), single_launch (lora_linear's
single-launch form), unfused-dropout (torch's dropout of x outside, then the fused branch without
dropout: what a fused op without dropout leaves its user to write) and eager (PEFT's plain
PyTorch: F.linear, F.dropout and the branch); each at every --dropout rate (unfused-dropout only
where it is > 0), and the fused forms at 0 too.
--dropout (one rate or several, each a row): the rate on the bottleneck's act(h), on each
expert's (sparse, routed) or adapter's (fusion) act(h), on the LoRA branch's input. The fused
ops draw their masks inside their launches (a fresh seed per call, nothing saved); eager runs
the reference with the mask drawn as torch's dropout draws it (bench.measure.torch_dropout_masks,
kept for backward by autograd), as the unfused eager chain did.
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
from bench.measure import (  # noqa: E402
    LORA_SINGLE_LAUNCH, MULTILORA_FUNCTIONS, MULTILORA_PROVIDERS, TOKENS, count_moved, differentiable,
    dropout_arguments, floor_bytes, fusion_floor_bytes, lora_call, lora_eager, lora_fused, lora_inputs,
    lora_unfused_dropout, lora_variant, multilora_call, multilora_inputs, torch_dropout_masks,
)

DEFAULT_SHAPES = ["768x768x8", "1024x768x8", "6304x768x8", "768x768x16", "768x1024x16", "6304x768x16",
                  "768x768x64", "1024x768x64", "6304x768x64"]


def _masks(fn, dropout):
    """The context an op runs in at this rate: the reference's mask drawn as torch's dropout draws
    it (fused ops draw their own)."""
    return torch_dropout_masks() if dropout and _is_reference(fn) else contextlib.nullcontext()


def _is_reference(fn) -> bool:
    return getattr(fn, "__module__", None) == reference.__name__


def _dropout(fn, dropout):
    """fn's keyword arguments at this rate (the reference takes a seed, made before the count; the
    fused ops draw one)."""
    return dropout_arguments(dropout, not _is_reference(fn), "cpu")


def measure(fn, rows, dim, rank, residual, sms, dropout=0.0):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).half().requires_grad_(True)

    x, skip = randn(rows, dim), randn(rows, dim)
    params = [randn(rank, dim, std=dim ** -0.5), randn(rank, std=0.5), randn(dim, rank, std=rank ** -0.5),
              randn(dim, std=0.5), randn(dim)]
    row_scale = torch.rand(rows, generator=generator) + 0.5
    arg = x if residual == "x" else (skip, x)
    rate = _dropout(fn, dropout)
    with _masks(fn, dropout), count_bytes(sm_count=sms) as forward:
        y = fn(x, *params, residual=arg, row_scale=row_scale, **rate)
    inputs = [x, *params] + ([skip] if residual != "x" else [])
    grad = torch.randn(y.shape, generator=generator).to(y.dtype)
    with count_bytes(sm_count=sms) as backward:
        torch.autograd.grad(y, inputs, grad)
    kind = "x" if residual == "x" else "tensor"
    forward_floor = floor_bytes("forward", rows, dim, 2, 2, kind)
    backward_floor = floor_bytes("backward", rows, dim, 2, 2, kind)
    return forward.total() / forward_floor, backward.total() / backward_floor, forward, backward


def measure_sparse(fn, rows, dim, rank, experts, top_k, residual, sms, routed=False, dropout=0.0):
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
    rate = _dropout(fn, dropout)
    with _masks(fn, dropout), count_bytes(sm_count=sms) as forward:
        y = fn(x, *routing, *experts_params, scale, residual=arg, row_scale=row_scale, **kwargs, **rate)
    inputs = [x, *[t for t in routing if t.requires_grad], *experts_params, scale]
    inputs += [skip] if residual != "x" else []
    grad = torch.randn(y.shape, generator=generator).to(y.dtype)
    with count_bytes(sm_count=sms) as backward:
        torch.autograd.grad(y, inputs, grad)
    kind = "x" if residual == "x" else "tensor"
    forward_floor = floor_bytes("forward", rows, dim, 2, 2, kind)
    backward_floor = floor_bytes("backward", rows, dim, 2, 2, kind)
    return forward.total() / forward_floor, backward.total() / backward_floor, forward, backward


def measure_fusion(fn, rows, dim, rank, adapters, sms, dropout=0.0):
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
    rate = _dropout(fn, dropout)
    with _masks(fn, dropout), count_bytes(sm_count=sms) as forward:
        y = fn(x, *frozen, *fusion, residual=x, **rate)
    grad = torch.randn(y.shape, generator=generator).to(y.dtype)
    with count_bytes(sm_count=sms) as backward:
        torch.autograd.grad(y, [x, *fusion], grad)
    forward_floor = fusion_floor_bytes("forward", rows, dim, 2)
    backward_floor = fusion_floor_bytes("backward", rows, dim, 2)
    return forward.total() / forward_floor, backward.total() / backward_floor, forward, backward


def measure_multilora(provider, rows, dim, dim_out, rank, tasks, sms):
    """(forward, backward) ByteReports of one multi-LoRA provider, fp16, alpha 16, the loops'
    indexing ops charged the rows they touch (each report's indexed_rows.recharged lists them)."""
    images = rows // TOKENS
    inputs = multilora_inputs(images, TOKENS, dim, dim_out, rank, min(tasks, images), torch.float16, "cpu",
                              torch.Generator().manual_seed(0))
    with count_moved(sms, indexed_rows=True) as forward:
        y = multilora_call(MULTILORA_FUNCTIONS[provider], inputs, 16.0 / rank)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    with count_moved(sms, indexed_rows=True) as backward:
        torch.autograd.grad(y, differentiable(inputs), grad)
    return forward, backward


def _multilora_line(job):
    """One printed line of --op multilora: (shape, provider, tasks, sms) -> text."""
    shape, provider, tasks, sms = job
    rows, dim, dim_out, rank = (int(v) for v in shape.split("x"))
    start = time.time()
    forward, backward = measure_multilora(provider, rows, dim, dim_out, rank, tasks, sms)
    weight = dim_out * dim * 2
    floors = [floor_bytes(p, rows, dim, 2, 2, residual="none", dim_out=dim_out, weight_bytes=weight)
              for p in ("forward", "backward")]
    counted = [report.total() + sum(c - r for c, r in report.indexed_rows.recharged) for report in (forward, backward)]
    megabytes = [report.total() / 1e6 for report in (forward, backward)]
    return (f"{rows:>6} {dim:>5} {dim_out:>5} {rank:>3} {min(tasks, rows // TOKENS):>3}  {provider:<13} "
            f"{megabytes[0]:>7.2f} {forward.total() / floors[0]:>6.2f}x {megabytes[1]:>7.2f} "
            f"{backward.total() / floors[1]:>6.2f}x  {forward.triton_launches:>2}/{backward.triton_launches:<3} "
            f"{len(forward.aten):>3}/{len(backward.aten):<4} {counted[0] / 1e6:>8.2f}/{counted[1] / 1e6:<8.2f} "
            f"{time.time() - start:.0f}")


def print_linear_floors(shapes: list, left_out: str) -> None:
    """The LoRA linear's floor (shapes MxDxD_OUTxr, fp16) for each shape, and what it leaves out."""
    print("floor: forward reads x [M, D] and W [D_out, D], writes y [M, D_out]; backward reads dy, x and W, writes "
          f"dx; {left_out} left out")
    for shape in shapes:
        rows, dim, dim_out, _ = (int(v) for v in shape.split("x"))
        floors = [floor_bytes(p, rows, dim, 2, 2, residual="none", dim_out=dim_out, weight_bytes=dim_out * dim * 2)
                  for p in ("forward", "backward")]
        print(f"M={rows} D={dim} D_out={dim_out}: floor {floors[0] / 1e6:.2f} MB forward, {floors[1] / 1e6:.2f} MB "
              "backward")


def main_multilora(args) -> None:
    shapes = args.shapes if args.shapes != DEFAULT_SHAPES else ["1576x768x2304x8", "1576x768x3072x8"]
    for shape in shapes:
        parts = shape.split("x")
        if len(parts) != 4 or int(parts[0]) % TOKENS:
            raise SystemExit(f"--op multilora shapes are MxDxD_OUTxr with M a multiple of {TOKENS}, got {shape}")
    print(f"bytes moved (MB) and / floor, fp16, a multi-LoRA batch of up to {args.tasks} tasks (image b in task b % "
          f"{args.tasks}, alpha 16), launches planned for {args.sms} SMs")
    print_linear_floors(shapes, "the tasks' A and B")
    print(f"{'M':>6} {'D':>5} {'D_out':>5} {'r':>3} {'T':>3}  {'provider':<13} {'fwd MB':>7} {'/floor':>7} "
          f"{'bwd MB':>7} {'/floor':>7}  {'launches':<8} {'aten':<8} {'as counted MB':<17} seconds")
    jobs = [(shape, provider, args.tasks, args.sms) for shape in shapes for provider in MULTILORA_PROVIDERS]
    _pool_lines(_multilora_line, jobs, args.jobs)


LORA_PROVIDERS = ("fused", "single_launch", "unfused-dropout", "eager")
LORA_FUNCTIONS = {"fused": lora_fused, "single_launch": lora_fused, "unfused-dropout": lora_unfused_dropout,
                  "eager": lora_eager}


def measure_lora(provider, rows, dim, dim_out, rank, dropout, sms):
    """(forward, backward) ByteReports of one LoRA linear provider (LORA_PROVIDERS), fp16, alpha 16,
    at this dropout rate on the branch's input."""
    inputs = lora_inputs(rows, dim, dim_out, rank, torch.float16, "cpu", torch.Generator().manual_seed(0))
    # The fused forms' branch and the unfused path's fused branch in their default variants.
    with lora_variant(LORA_SINGLE_LAUNCH if provider == "single_launch" else "default"):
        with count_moved(sms) as forward:
            y = lora_call(LORA_FUNCTIONS[provider], inputs, 16.0 / rank, dropout)
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        with count_moved(sms) as backward:
            torch.autograd.grad(y, differentiable(inputs), grad)
    return forward, backward


def _lora_line(job):
    """One printed line of --op lora: (shape, provider, dropout, sms) -> text."""
    shape, provider, dropout, sms = job
    rows, dim, dim_out, rank = (int(v) for v in shape.split("x"))
    start = time.time()
    forward, backward = measure_lora(provider, rows, dim, dim_out, rank, dropout, sms)
    floors = [floor_bytes(p, rows, dim, 2, 2, residual="none", dim_out=dim_out, weight_bytes=dim_out * dim * 2)
              for p in ("forward", "backward")]
    return (f"{rows:>6} {dim:>5} {dim_out:>5} {rank:>3} {dropout:>4g}  {provider:<15} "
            + _counts_text(forward, backward, floors) + f"  {time.time() - start:.0f}")


def _counts_text(forward, backward, floors) -> str:
    """MB and / floor of each pass, launches and aten ops forward/backward."""
    return (f"{forward.total() / 1e6:>7.2f} {forward.total() / floors[0]:>6.2f}x {backward.total() / 1e6:>7.2f} "
            f"{backward.total() / floors[1]:>6.2f}x  {forward.triton_launches:>2}/{backward.triton_launches:<3}  "
            f"{len(forward.aten):>3}/{len(backward.aten):<4}")


def _pool_lines(function, jobs, processes: int) -> None:
    """Print function(job) for every job, in order, on `processes` processes side by side."""
    if processes > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(processes) as pool:
            for line in pool.map(function, jobs):
                print(line, flush=True)
    else:
        for job in jobs:
            print(function(job), flush=True)


def main_lora(args) -> None:
    shapes = args.shapes if args.shapes != DEFAULT_SHAPES else ["1576x768x2304x8"]
    for shape in shapes:
        if len(shape.split("x")) != 4:
            raise SystemExit(f"--op lora shapes are MxDxD_OUTxr, got {shape}")
    print(f"bytes moved (MB) and / floor, fp16, a LoRA linear (alpha 16, x, A and B differentiated, W and b frozen), "
          f"dropout p on the branch's input, launches planned for {args.sms} SMs")
    print_linear_floors(shapes, "A and B")
    print(f"{'M':>6} {'D':>5} {'D_out':>5} {'r':>3} {'p':>4}  {'provider':<15} {'fwd MB':>7} {'/floor':>7} "
          f"{'bwd MB':>7} {'/floor':>7}  {'launches':<6} {'aten':<8} seconds")
    rates = sorted(set(args.dropout))
    providers = args.providers or LORA_PROVIDERS
    jobs = []
    for shape in shapes:
        for rate in rates:
            # unfused-dropout at 0 is the fused default form (torch's dropout at 0 returns x itself).
            jobs += [(shape, provider, rate, args.sms) for provider in providers
                     if rate > 0.0 or provider != "unfused-dropout"]
        if 0.0 not in rates and args.providers is None:
            jobs += [(shape, provider, 0.0, args.sms) for provider in ("fused", "single_launch")]
    _pool_lines(_lora_line, jobs, args.jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sms", type=int, default=132, help="SM count the launches are planned for (H100: 132)")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="MxDxr, e.g. 6304x768x8")
    parser.add_argument("--residual", choices=["x", "skip+x"], default="x")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager baseline (faster)")
    parser.add_argument("--op", choices=["bottleneck", "sparse", "routed", "fusion", "multilora", "lora"],
                        default="bottleneck")
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0],
                        help="dropout rates, each a row (not multilora): on act(h), or LoRA's branch input")
    parser.add_argument("--providers", nargs="+", choices=LORA_PROVIDERS,
                        help="lora: these providers only, at the --dropout rates given (default: all, the fused "
                             "forms at 0 too)")
    parser.add_argument("--tasks", type=int, default=8, help="multilora: tasks T (image b in task b %% T)")
    parser.add_argument("--jobs", type=int, default=1, help="multilora, lora: processes counting side by side")
    parser.add_argument("--adapters", type=int, nargs="+", default=[2, 4, 8], help="fusion: adapters N (each a row)")
    parser.add_argument("--experts", type=int, default=8, help="sparse/routed: experts E")
    parser.add_argument("--top-k", type=int, default=2, help="sparse/routed: experts per row k")
    parser.add_argument("--variant", help="the fused op's kernel variant (default: the one in force); sparse/routed: "
                                          + ", ".join(list_variants("sparse_adapter")))
    args = parser.parse_args()
    if any(not 0.0 <= rate < 1.0 for rate in args.dropout):
        parser.error("--dropout rates must be in [0, 1)")
    if args.op == "multilora":
        if args.dropout != [0.0]:
            parser.error("--op multilora has no --dropout")
        main_multilora(args)
        return
    if args.op == "lora":
        main_lora(args)
        return
    family = "bottleneck_adapter" if args.op == "bottleneck" else "sparse_adapter"
    if args.variant is not None and args.variant not in list_variants(family):
        parser.error(f"--variant for --op {args.op} must be one of {', '.join(list_variants(family))}")
    if args.op == "fusion" and args.shapes == DEFAULT_SHAPES:
        args.shapes = ["1576x768x8"]
    elif args.op != "bottleneck" and args.shapes == DEFAULT_SHAPES:
        args.shapes = ["768x768x16", "1576x768x16", "6304x768x16"]
    if args.op == "fusion":
        print(f"bytes moved / floor, fp16, AdapterFusion at the post position (residual x), dropout p on each "
              f"adapter's act(h), launches planned for {args.sms} SMs")
        print(f"{'M':>6} {'D':>5} {'r':>3} {'N':>3} {'p':>4}  {'fwd':>6} {'bwd':>6}  {'eager fwd':>9} "
              f"{'eager bwd':>9}  {'launches':<9} {'aten':<9} seconds")
        for shape in args.shapes:
            rows, dim, rank = (int(v) for v in shape.split("x"))
            for adapters in args.adapters:
                for rate in args.dropout:
                    start = time.time()
                    forward_ratio, backward_ratio, forward, backward = measure_fusion(
                        adapter_fusion, rows, dim, rank, adapters, args.sms, rate)
                    eager = ("-", "-") if args.no_eager else measure_fusion(
                        reference.adapter_fusion, rows, dim, rank, adapters, args.sms, rate)[:2]
                    eager_text = "  ".join(f"{v:>8.2f}x" if isinstance(v, float) else f"{v:>9}" for v in eager)
                    launches = f"{forward.triton_launches}/{backward.triton_launches}"
                    aten = f"{len(forward.aten)}/{len(backward.aten)}"
                    print(f"{rows:>6} {dim:>5} {rank:>3} {adapters:>3} {rate:>4g}  {forward_ratio:>5.3f}x "
                          f"{backward_ratio:>5.3f}x  {eager_text}  {launches:<9} {aten:<9} {time.time() - start:.0f}",
                          flush=True)
        return
    mixture = "" if args.op == "bottleneck" else f", {args.op} E {args.experts} k {args.top_k}"
    mixture += f", variant {args.variant}" if args.variant else ""
    where = "act(h)" if args.op == "bottleneck" else "each expert's act(h)"
    print(f"bytes moved (MB) and / floor, fp16, residual {args.residual}{mixture}, dropout p on {where}, launches "
          f"planned for {args.sms} SMs")
    print(f"{'M':>6} {'D':>5} {'r':>3} {'p':>4}  {'provider':<8} {'fwd MB':>7} {'/floor':>7} {'bwd MB':>7} "
          f"{'/floor':>7}  {'launches':<6} {'aten':<8} {'programs per launch':<22} seconds")
    kind = "x" if args.residual == "x" else "tensor"
    for shape in args.shapes:
        rows, dim, rank = (int(v) for v in shape.split("x"))
        floors = [floor_bytes(p, rows, dim, 2, 2, kind) for p in ("forward", "backward")]
        for rate in args.dropout:
            if args.op == "bottleneck":
                def run(fn):
                    return measure(fn, rows, dim, rank, args.residual, args.sms, rate)
                fused_fn, eager_fn = bottleneck_adapter, reference.bottleneck_adapter
            else:
                def run(fn):
                    return measure_sparse(fn, rows, dim, rank, args.experts, args.top_k, args.residual, args.sms,
                                          routed=args.op == "routed", dropout=rate)
                fused_fn = sparse_adapter if args.op == "sparse" else routed_adapter
                eager_fn = reference.sparse_adapter if args.op == "sparse" else reference.routed_adapter
            for provider in ("fused",) + (() if args.no_eager else ("eager",)):
                start = time.time()
                fused = provider == "fused"
                with use_variant(family, args.variant) if args.variant and fused else contextlib.nullcontext():
                    _, _, forward, backward = run(fused_fn if fused else eager_fn)
                programs = "/".join(str(launch.programs) for launch in forward.launches + backward.launches)
                print(f"{rows:>6} {dim:>5} {rank:>3} {rate:>4g}  {provider:<8} "
                      + _counts_text(forward, backward, floors) + f"  {programs or '-':<22} {time.time() - start:.0f}",
                      flush=True)


if __name__ == "__main__":
    main()
