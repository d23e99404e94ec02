"""The GPU smoke run's measurements: the numbers the package exists for, in a few minutes.

    python -m bench.smoke ops OUT [--providers eager fused] [--rows 6304] [--dim 768] [--dtype bf16]
    python -m bench.smoke vit OUT [--batch 32]

`ops`: each op's forward and forward+backward at ViT-B batch 32 (M = 6304 rows, D = 768) in
bf16: the bottleneck adapter (Adapter+'s post adapter: residual x, channel scale, biases, gelu,
r = 8), the sparse mixture gated and routed (E = 8, top-2, r = 16, residual x), the LoRA
linear on ViT-B's qkv (768 -> 2304, r = 8, alpha 16) and AdapterFusion over N = 4 frozen rank-8
adapters (residual x, the fusion's weights trainable), for the providers asked: eager PyTorch
(kernels/reference.py; PEFT's expression for LoRA), torch.compile of it, and the fused op in its
default form (LoRA's single launch as a row of its own). Forward rows are training forwards
(inputs that require grad). Times with CUDA events (bench.measure.time_rounds), medians and
their spread (interquartile range over median), over input sets rotated to defeat the L2; GB/s of the byte floor (bench.measure.floor_bytes) and
their share of a device-to-device copy measured in the same run; peak memory of one call.
OUT/timings.json and OUT/timings.md are rewritten after every row (a run cut short keeps the
rows it finished), and a second `ops` call adds its rows to the same files.

`vit`: a ViT-B/16 Adapter+ train step (forward, cross-entropy, backward, AdamW on adapters and
head) under bf16 autocast, eager adapters against fused: images/s and peak memory, written to
OUT/vit.json and OUT/vit.md after each provider.

Without CUDA both run on the CPU at the sizes given, the fused ops in Triton's interpreter (whose
times mean nothing); tests/test_gpu_check.py runs them that way, so this file cannot rot while no
GPU is at hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

from bench.measure import (  # noqa: E402
    DTYPES, LORA_SINGLE_LAUNCH, bottleneck_inputs, copy_gbps, differentiable, floor_bytes, fusion_call,
    fusion_floor_bytes, fusion_inputs, lora_call, lora_eager, lora_fused, lora_inputs, lora_variant, peak_memory,
    rotation_count, sparse_call, sparse_inputs, synchronize, time_rounds, vit_model,
)
from fused_adapters.kernels import (  # noqa: E402
    adapter_fusion, bottleneck_adapter, reference, routed_adapter, sparse_adapter, use_variant,
)

PASSES = ("forward", "forward+backward")
PROVIDERS = ("eager", "compile", "fused")
RANK, SPARSE_RANK, EXPERTS, TOP_K, LORA_ALPHA, FUSED_ADAPTERS = 8, 16, 8, 2, 16, 4


@dataclass
class OpCase:
    """One op at one shape: how to make an input set, call a provider's function on it, and the
    bytes its passes must move at least."""

    op: str
    shape: str
    inputs: Callable[[torch.Generator], dict]
    call: Callable[[Callable, dict], torch.Tensor]
    eager: Callable
    fused: Callable
    floor: Callable[[str], int]
    set_bytes: Callable[[str], int]  # what a call reads that the calls before it did not
    fused_variants: tuple = ("default",)
    variant: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext()
    compile_dynamic: bool = False


def op_cases(rows: int, dim: int, dtype: torch.dtype, device) -> list[OpCase]:
    size = torch.empty((), dtype=dtype).element_size()
    scale = LORA_ALPHA / RANK
    lora_out = 3 * dim
    # Cheapest torch.compile first: the sparse ops' expert loop recompiles per routing.
    cases = [OpCase(
        "bottleneck", f"M={rows} D={dim} r={RANK}",
        lambda g: bottleneck_inputs(rows, dim, RANK, dtype, device, True, g),
        lambda fn, i: fn(i["x"], i["w_down"], i["b_down"], i["w_up"], i["b_up"], i["scale"], residual=i["x"]),
        reference.bottleneck_adapter, bottleneck_adapter,
        lambda pass_name: floor_bytes(pass_name, rows, dim, size, size),
        lambda pass_name: rows * dim * size * (1 if pass_name == "forward" else 2),
        variant=lambda name: use_variant("bottleneck_adapter", name),
    ), OpCase(
        "lora", f"M={rows} D={dim} D_out={lora_out} r={RANK}",
        lambda g: lora_inputs(rows, dim, lora_out, RANK, dtype, device, g),
        lambda fn, i: lora_call(fn, i, scale),
        lora_eager, lora_fused,
        lambda pass_name: floor_bytes(pass_name, rows, dim, size, size, residual="none", dim_out=lora_out,
                                      weight_bytes=lora_out * dim * size),
        lambda pass_name: (rows * dim + lora_out * dim + (rows * lora_out if pass_name != "forward" else 0)) * size,
        fused_variants=("default", LORA_SINGLE_LAUNCH),
        variant=lora_variant,
    ), OpCase(
        "adapter_fusion", f"M={rows} D={dim} r={RANK} N={FUSED_ADAPTERS}",
        lambda g: fusion_inputs(rows, dim, RANK, FUSED_ADAPTERS, dtype, device, True, g),
        fusion_call, reference.adapter_fusion, adapter_fusion,
        lambda pass_name: fusion_floor_bytes(pass_name, rows, dim, size),
        lambda pass_name: rows * dim * size * (1 if pass_name == "forward" else 2),
    )]
    for op, fused in (("sparse_adapter", sparse_adapter), ("routed_adapter", routed_adapter)):
        routed = op == "routed_adapter"
        cases.append(OpCase(
            op, f"M={rows} D={dim} r={SPARSE_RANK} E={EXPERTS} k={TOP_K}",
            lambda g, routed=routed: sparse_inputs(rows, dim, SPARSE_RANK, EXPERTS, TOP_K, dtype, device, True, routed,
                                                   g),
            lambda fn, i, op=op: sparse_call(op, fn, i, TOP_K),
            getattr(reference, op), fused,
            # The bottleneck op's floor: the gate, the routing and the experts' weights are small.
            lambda pass_name: floor_bytes(pass_name, rows, dim, size, size),
            lambda pass_name: rows * dim * size * (1 if pass_name == "forward" else 2),
            variant=lambda name: use_variant("sparse_adapter", name),
            # The expert loop's sizes depend on the routing: automatic dynamic shapes, as
            # bench/test_sparse.py compiles it.
            compile_dynamic=True,
        ))
    return cases


class Results:
    """A JSON file of rows (and the Markdown table beside it), rewritten after every row."""

    def __init__(self, path: str, extra: dict):
        self.path = path
        self.data = {"rows": []}
        if os.path.exists(path):
            with open(path) as handle:
                self.data = json.load(handle)
        self.data.update(extra)

    def add(self, row: dict, key: tuple, render: Callable[[dict], str]) -> None:
        rows = [r for r in self.data["rows"] if tuple(r[k] for k in key) != tuple(row[k] for k in key)]
        self.data["rows"] = rows + [row]
        with open(self.path, "w") as handle:
            json.dump(self.data, handle, indent=1)
        with open(os.path.splitext(self.path)[0] + ".md", "w") as handle:
            handle.write(render(self.data))


def environment(device: torch.device) -> dict:
    import triton

    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def spread(times: list[float]) -> float:
    """The rounds' interquartile range over their median: a difference between two rows smaller
    than this is noise."""
    if len(times) < 2:
        return 0.0
    quartiles = statistics.quantiles(times, n=4)
    return round((quartiles[2] - quartiles[0]) / statistics.median(times), 3)


def time_op(case: OpCase, pass_name: str, provider: str, variant: str, dtype_name: str, device, rounds: int,
            compiled: dict) -> dict:
    generator = torch.Generator().manual_seed(0)
    sets = [case.inputs(generator) for _ in range(rotation_count(case.set_bytes(pass_name), device))]
    if provider == "compile":
        if case.op not in compiled:
            compiled[case.op] = torch.compile(case.eager, dynamic=None if case.compile_dynamic else False)
        fn = compiled[case.op]
    else:
        fn = case.fused if provider == "fused" else case.eager
    context = (lambda: case.variant(variant)) if provider == "fused" else contextlib.nullcontext
    grads = []

    def run(index):
        # The backward runs inside the variant's block too: it takes the variant in force.
        with context():
            y = case.call(fn, sets[index])
            if pass_name == "forward+backward":
                while len(grads) <= index:
                    grads.append(torch.randn(y.shape, generator=generator).to(y))
                torch.autograd.grad(y, differentiable(sets[index]), grads[index])
            return y

    start = time.perf_counter()
    # Compile and JIT outside the timed region; a dynamic compile sees every set's routing first.
    for index in range(len(sets) if provider == "compile" and case.compile_dynamic else min(len(sets), 2)):
        run(index)
    synchronize(device)
    warm_s = time.perf_counter() - start
    times = time_rounds(run, len(sets), device, rounds=rounds)
    seconds = statistics.median(times)
    floor = case.floor(pass_name)
    return {"op": case.op, "pass": pass_name, "provider": provider, "variant": variant, "dtype": dtype_name,
            "shape": case.shape, "median_us": round(seconds * 1e6, 2), "spread": spread(times),
            "gbps": round(floor / seconds / 1e9, 1),
            "floor_bytes": floor, "peak_mem_bytes": peak_memory(lambda: run(0), device), "input_sets": len(sets),
            "warmup_s": round(warm_s, 1)}


def render_ops(data: dict) -> str:
    copy = data.get("copy_gbps")
    lines = [f"# Op timings: {data['device']}, torch {data['torch']}, triton {data['triton']}, {data['date']}", "",
             f"Medians of {'CUDA-event' if data['device'] != 'cpu' else 'CPU (fused: Triton interpreter)'} "
             f"timings per call; GB/s of the byte floor; a device-to-device copy ran at {copy:.0f} GB/s in the "
             f"same run.", "",
             "| op | shape | dtype | pass | provider | median us | spread | GB/s | of copy | vs eager | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    eager = {(r["op"], r["pass"], r["dtype"]): r.get("median_us") for r in data["rows"] if r["provider"] == "eager"}
    for r in data["rows"]:
        label = r["provider"] if r["variant"] == "default" else f"{r['provider']}[{r['variant']}]"
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['pass']} | {label} | "
                         f"failed: {r['error']} | | | | | |")
            continue
        base = eager.get((r["op"], r["pass"], r["dtype"]))
        speedup = f"{base / r['median_us']:.2f}x" if base else "-"
        share = f"{r['gbps'] / copy:.0%}" if copy else "-"
        peak = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['pass']} | {label} | {r['median_us']:.1f} | "
                     f"{r['spread']:.0%} | {r['gbps']:.0f} | {share} | {speedup} | {peak} |")
    return "\n".join(lines) + "\n"


def run_ops(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype][0]
    results = Results(os.path.join(args.out, "timings.json"), environment(device))
    if results.data.get("copy_gbps") is None:
        results.data["copy_gbps"] = round(copy_gbps(device), 1)
    compiled: dict = {}
    failed = 0
    for case in op_cases(args.rows, args.dim, dtype, device):
        for pass_name in PASSES:
            for provider in args.providers:
                for variant in case.fused_variants if provider == "fused" else ("default",):
                    try:
                        row = time_op(case, pass_name, provider, variant, args.dtype, device, args.rounds, compiled)
                    except Exception as error:  # one failing row must not lose the others
                        traceback.print_exc()
                        failed += 1
                        row = {"op": case.op, "pass": pass_name, "provider": provider, "variant": variant,
                               "dtype": args.dtype, "shape": case.shape,
                               "error": f"{type(error).__name__}: {error}".splitlines()[0][:200]}
                    results.add(row, ("op", "pass", "provider", "variant", "dtype", "shape"), render_ops)
                    print(json.dumps(row), flush=True)
    return 1 if failed else 0


def render_vit(data: dict) -> str:
    lines = [f"# ViT train step: {data['device']}, torch {data['torch']}, triton {data['triton']}, {data['date']}", "",
             "| model | batch | autocast | provider | median ms | spread | images/s | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['autocast']} | {r['provider']} | failed: {r['error']} "
                         f"| | | |")
            continue
        peak = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.0f}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['autocast']} | {r['provider']} | {r['median_ms']:.1f} | "
                     f"{r['spread']:.0%} | {r['images_per_s']:.1f} | {peak} |")
    return "\n".join(lines) + "\n"


def time_train_step(provider: str, args, device) -> dict:
    import torch.nn.functional as F

    create = {"img_size": args.img_size} if args.img_size else {}
    model, runner, optimizer = vit_model(provider, device, args.model, **create)
    model.train()
    size = model.patch_embed.img_size
    images = [torch.randn(args.batch, 3, *size, device=device) for _ in range(2)]
    labels = torch.randint(0, model.num_classes, (args.batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(index):
        with autocast:
            logits = runner(images[index])
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for index in range(3):
        step(index % 2)
    synchronize(device)
    times = time_rounds(step, 2, device, rounds=args.rounds, round_seconds=0)
    seconds = statistics.median(times)
    return {"model": args.model, "batch": args.batch, "autocast": "bf16" if device.type == "cuda" else "off",
            "provider": provider, "median_ms": round(seconds * 1e3, 2), "spread": spread(times),
            "images_per_s": round(args.batch / seconds, 1),
            "peak_mem_bytes": peak_memory(lambda: step(0), device)}


def run_vit(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = Results(os.path.join(args.out, "vit.json"), environment(device))
    failed = 0
    for provider in ("eager", "fused"):
        try:
            row = time_train_step(provider, args, device)
        except Exception as error:
            traceback.print_exc()
            failed += 1
            row = {"model": args.model, "batch": args.batch, "autocast": "-", "provider": provider,
                   "error": f"{type(error).__name__}: {error}".splitlines()[0][:200]}
        results.add(row, ("model", "batch", "provider"), render_vit)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ops = commands.add_parser("ops", help="each op's forward and forward+backward against eager and torch.compile")
    ops.add_argument("out")
    ops.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ops.add_argument("--rows", type=int, default=6304, help="M (default: ViT-B/16 batch 32, 32 x 197)")
    ops.add_argument("--dim", type=int, default=768)
    ops.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ops.add_argument("--rounds", type=int, default=15)
    vit = commands.add_parser("vit", help="a ViT Adapter+ train step, eager adapters against fused")
    vit.add_argument("out")
    vit.add_argument("--batch", type=int, default=32)
    vit.add_argument("--model", default="vit_base_patch16_224")
    vit.add_argument("--img-size", type=int, default=None, help="timm's img_size (default: the model's)")
    vit.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    return run_ops(args) if args.command == "ops" else run_vit(args)


if __name__ == "__main__":
    sys.exit(main())
