"""What the benchmark suite measures besides time, and how it times: byte floors, bytes kept for
backward, kernel counts, peak memory, host enqueue time, copy bandwidth, rotated inputs.

    python -m bench.measure --count CASES.json --jobs 8   # device-free counts (used by the suite)

Device-free counts (Triton launches, aten kernels and bytes moved, from the interpreter's byte
counter with launches planned for a given SM count) need TRITON_INTERPRET=1 before triton is
imported; the suite gets them from this module run as a subprocess, so a GPU run has them too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


def floor_bytes(pass_name: str, rows: int, dim: int, x_size: int, y_size: int, residual: str = "x",
                dim_out: Optional[int] = None, weight_bytes: int = 0) -> int:
    """The fewest bytes of memory traffic a pass of the bottleneck op can move: every M x D
    tensor it must read or write, once (the parameters and the M x r tensors are left out).

    forward: read x, read the residual unless it is x itself, write y.
    backward: read dy and x, write dx. The residual's gradient is dy itself: with residual x it
    is added into dx in the same store; another residual tensor gets dy by reference.
    forward+backward: the sum. x_size and y_size are element sizes in bytes (dy has y's dtype,
    dx has x's, the residual has x's).

    dim_out: y's width where it differs from x's (a width-changing bottleneck, or a LoRA linear
    D -> D_out): y, dy and a residual tensor are M x D_out; the residual cannot be x then.
    weight_bytes: a weight every pass must read once (a LoRA linear's frozen W: forward for y,
    backward for dx), added to each pass."""
    if residual not in ("x", "none", "tensor"):
        raise ValueError(f"residual must be 'x', 'none' or 'tensor', got {residual!r}")
    dim_out = dim if dim_out is None else dim_out
    if residual == "x" and dim_out != dim:
        raise ValueError(f"residual 'x' needs y as wide as x; got D={dim}, D_out={dim_out}")
    inputs, outputs = rows * dim, rows * dim_out
    forward = inputs * x_size + outputs * y_size + (outputs * x_size if residual == "tensor" else 0) + weight_bytes
    backward = outputs * y_size + 2 * inputs * x_size + weight_bytes
    passes = {"forward": forward, "backward": backward, "forward+backward": forward + backward}
    if pass_name not in passes:
        raise ValueError(f"pass_name must be one of {sorted(passes)}, got {pass_name!r}")
    return passes[pass_name]


def fusion_floor_bytes(pass_name: str, rows: int, dim: int, size: int) -> int:
    """AdapterFusion's floor (residual x, element size `size` for x, y and the weights): the
    bottleneck op's, plus the fusion's three D x D weights W_q, W_k, W_v, read once a pass; the
    backward also writes their gradients. At M = 1576, D = 768 the weights are 73% of the
    forward's floor."""
    weights = 3 * dim * dim * size
    extra = {"forward": weights, "backward": 2 * weights, "forward+backward": 3 * weights}
    if pass_name not in extra:
        raise ValueError(f"pass_name must be one of {sorted(extra)}, got {pass_name!r}")
    return floor_bytes(pass_name, rows, dim, size, size) + extra[pass_name]


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


def lora_inputs(rows: int, dim: int, dim_out: int, rank: int, dtype: torch.dtype, device,
                generator: Optional[torch.Generator] = None) -> dict:
    """One set of LoRA linear inputs: x [M, D] and the branch's A [r, D] and B [D_out, r], which
    require grad, and the frozen base layer's weight [D_out, D] and bias [D_out], which do not.
    B is random, not zero as at init, so that the branch adds something."""

    def randn(*shape, std=1.0, grad=True):
        t = torch.randn(*shape, generator=generator) * std
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    return dict(x=randn(rows, dim), weight=randn(dim_out, dim, std=dim ** -0.5, grad=False),
                bias=randn(dim_out, std=0.1, grad=False), lora_A=randn(rank, dim, std=dim ** -0.5),
                lora_B=randn(dim_out, rank, std=rank ** -0.5))


def lora_eager(x, weight, bias, lora_A, lora_B, scale: float, dropout: float = 0.0):
    """A LoRA linear as PEFT runs it, in plain PyTorch: the base layer plus the scaled update,
    with lora_dropout (torch's dropout of x, its mask kept for backward) on the branch's input;
    PEFT's dropout at rate 0 is an identity."""
    branch_x = torch.nn.functional.dropout(x, dropout) if dropout > 0.0 else x
    return torch.nn.functional.linear(x, weight, bias) + (branch_x @ lora_A.T @ lora_B.T) * scale


def lora_fused(x, weight, bias, lora_A, lora_B, scale: float, dropout: float = 0.0):
    """A LoRA linear as adapters/lora.py runs it: the kernels' lora_linear op, in the form
    lora_variant puts in force (by default the base GEMM, then one fused call whose residual is
    the base output), dropout inside its launches (a fresh seed each call, as in training)."""
    from fused_adapters.kernels import lora_linear

    return lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout=dropout)


def lora_unfused_dropout(x, weight, bias, lora_A, lora_B, scale: float, dropout: float = 0.0):
    """A LoRA linear with dropout as a user of a fused branch without dropout writes it: the base
    GEMM, torch's dropout of x outside (an M x D pass, its mask kept for backward), then the
    fused branch on the dropped x with the base output as its residual (lora_linear's default
    form, fed another x)."""
    from fused_adapters.kernels import bottleneck_adapter

    branch_x = torch.nn.functional.dropout(x, dropout) if dropout > 0.0 else x
    return bottleneck_adapter(branch_x, lora_A, None, lora_B, None, scale, activation="identity",
                              residual=torch.nn.functional.linear(x, weight, bias))


# The LoRA rows' fused variant that is the LoRA linear's own form, not a launch plan of the
# branch's bottleneck kernels.
LORA_SINGLE_LAUNCH = "single_launch"


@contextlib.contextmanager
def lora_variant(variant: str):
    """What a LoRA row's fused variant puts in force: a bottleneck_adapter variant name runs the
    default form (base GEMM, then the branch) with that launch plan for the branch;
    "single_launch" the LoRA linear's single-launch form, with tf32 allowed for fp32 (its only
    fp32 mode: without tf32 the default form would run; no GPU row is pure fp32)."""
    from fused_adapters.kernels import use_variant

    if variant != LORA_SINGLE_LAUNCH:
        with use_variant("bottleneck_adapter", variant), use_variant("lora_linear", "default"):
            yield
        return
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with use_variant("lora_linear", variant):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


def lora_call(fn: Callable, inputs: dict, scale: float, dropout: float = 0.0):
    """fn (lora_eager, lora_fused, lora_unfused_dropout or a compiled lora_eager) on lora_inputs,
    at this dropout rate on the branch's input."""
    if dropout == 0.0:
        return fn(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"], scale)
    return fn(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"], scale,
              dropout=dropout)


# A multi-LoRA batch: one linear with T tasks' LoRA branches, each image of the batch its own
# task's (task_routing over LoRA adapters). The providers, all base GEMM included:
#   routed        what task_routing runs: the base GEMM, then every task's branch in one
#                 routed_adapter launch (adapters.routing.mixed_lora_forward)
#   loop-fused    PEFT's mixed-batch loop with the fused branch: the base GEMM, then per task
#                 its images gathered, the branch as one bottleneck_adapter call (identity,
#                 scale s), the update index_add_-ed into the base output
#   loop-eager    PEFT's mixed-batch loop (peft's LoraLayer._mixed_batch_forward) in plain
#                 PyTorch: result[index] += lora_B(lora_A(x[index])) * s per task
#   gather-eager  each image's A and B gathered ([batch, r, D], [batch, D_out, r]), the update
#                 as two batched matmuls: base + (x @ A_b^T @ B_b^T) * s
MULTILORA_PROVIDERS = ("routed", "loop-fused", "loop-eager", "gather-eager")
MULTILORA_FUSED = ("routed", "loop-fused")


def multilora_inputs(images: int, tokens: int, dim: int, dim_out: int, rank: int, tasks: int, dtype: torch.dtype,
                     device, generator: Optional[torch.Generator] = None) -> dict:
    """One set of multi-LoRA inputs: x [images, tokens, D] (requires grad), the frozen base
    layer's weight [D_out, D] and bias [D_out], each task's branch lora_A{t} [r, D] and lora_B{t}
    [D_out, r] (require grad; B random, not zero, so that every branch adds something), and the
    routing: task_of_sample [images] with image b in task b % T (interleaved), and index{t}, the
    images of task t (the loops' sub-batches, made once here as PEFT makes its index lists on
    the host). T = tasks, the tasks the batch holds: at most one per image."""
    if not 1 <= tasks <= images:
        raise ValueError(f"a batch of {images} images holds 1 to {images} tasks, got {tasks}")

    def randn(*shape, std=1.0, grad=True):
        t = torch.randn(*shape, generator=generator) * std
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    inputs = dict(x=randn(images, tokens, dim), weight=randn(dim_out, dim, std=dim ** -0.5, grad=False),
                  bias=randn(dim_out, std=0.1, grad=False))
    for task in range(tasks):
        inputs[f"lora_A{task}"] = randn(rank, dim, std=dim ** -0.5)
        inputs[f"lora_B{task}"] = randn(dim_out, rank, std=rank ** -0.5)
    task_of_sample = torch.arange(images) % tasks
    inputs["task_of_sample"] = task_of_sample.to(device)
    for task in range(tasks):
        inputs[f"index{task}"] = torch.nonzero(task_of_sample == task)[:, 0].to(device)
    return inputs


class _Branch:
    """The part of a LoraBranch that mixed_lora_forward reads, around given tensors."""

    def __init__(self, lora_A, lora_B, scale: float):
        self.lora_A, self.lora_B, self.scale = lora_A, lora_B, scale
        self.dropout, self.training, self.fused = 0.0, True, True

    def active_dropout(self) -> float:
        return self.dropout if self.training else 0.0


def multilora_routed(x, weight, bias, lora_A: list, lora_B: list, scale: float, task_of_sample, groups: list):
    """What a LoRA linear runs under task_routing: the base GEMM once, every task's branch in one
    routed launch (mixed_lora_forward, the library's own code)."""
    from fused_adapters.adapters.routing import mixed_lora_forward

    branches = [_Branch(a, b, scale) for a, b in zip(lora_A, lora_B)]
    return mixed_lora_forward(branches, task_of_sample, x, torch.nn.functional.linear(x, weight, bias))


def multilora_loop_fused(x, weight, bias, lora_A: list, lora_B: list, scale: float, task_of_sample, groups: list):
    """PEFT's mixed-batch loop with the fused branch: per task (groups: (task, image index)), its
    images' update s (x A^T) B^T as one bottleneck_adapter call, added into the base output."""
    from fused_adapters.kernels import bottleneck_adapter

    result = torch.nn.functional.linear(x, weight, bias)
    for task, index in groups:
        update = bottleneck_adapter(x[index], lora_A[task], None, lora_B[task], None, scale, activation="identity")
        result.index_add_(0, index, update.to(result.dtype))  # as PEFT's .to(torch_result_dtype)
    return result


def multilora_loop_eager(x, weight, bias, lora_A: list, lora_B: list, scale: float, task_of_sample, groups: list):
    """PEFT's LoraLayer._mixed_batch_forward for vanilla LoRA without dropout, in plain PyTorch."""
    linear = torch.nn.functional.linear
    result = linear(x, weight, bias)
    for task, index in groups:
        sub_batch = x[index]
        result[index] += linear(linear(sub_batch, lora_A[task]), lora_B[task]) * scale
    return result


def multilora_gather_eager(x, weight, bias, lora_A: list, lora_B: list, scale: float, task_of_sample, groups: list):
    """Each image's own A and B gathered from the stacked tasks' ([batch, r, D], [batch, D_out,
    r]; an image's tokens share its task, so one copy per image rather than per row), the update
    as two batched matmuls, added to the base output as lora_eager adds it."""
    a = torch.stack(lora_A)[task_of_sample]
    b = torch.stack(lora_B)[task_of_sample]
    return torch.nn.functional.linear(x, weight, bias) + (x @ a.transpose(1, 2) @ b.transpose(1, 2)) * scale


MULTILORA_FUNCTIONS = {"routed": multilora_routed, "loop-fused": multilora_loop_fused,
                       "loop-eager": multilora_loop_eager, "gather-eager": multilora_gather_eager}


def multilora_call(fn: Callable, inputs: dict, scale: float):
    """fn (one of MULTILORA_FUNCTIONS, or a compiled one) on multilora_inputs."""
    tasks = sum(1 for key in inputs if key.startswith("lora_A"))
    groups = [(task, inputs[f"index{task}"]) for task in range(tasks)]
    return fn(inputs["x"], inputs["weight"], inputs["bias"], [inputs[f"lora_A{t}"] for t in range(tasks)],
              [inputs[f"lora_B{t}"] for t in range(tasks)], scale, inputs["task_of_sample"], groups)


# Dropout: the rate of the suites' dropout rows (every op's hidden, LoRA's branch input; rows
# at 0 are the rows without dropout).
DROPOUT = 0.1


@contextlib.contextmanager
def torch_dropout_masks():
    """The reference's dropout drawn as torch's dropout draws it, for the eager rows: the
    reference computes the kernels' Philox stream with about 250 tensor ops on [M, C] int64 (so
    that the tests compare bit for bit), a cost no user's eager code pays. Here a dropout of a
    whole tensor (the bottleneck's act(h)) is F.dropout itself (on CUDA one kernel that writes
    the output and the mask it keeps for backward), and a mask the reference indexes (each
    expert's rows of [M, E*r]) is torch's CPU dropout's noise, bernoulli_(1 - p) then
    div_(1 - p)."""
    from fused_adapters.kernels import reference

    def factor(seed, rows, cols, stream, p, row_start=0):
        noise = torch.empty(rows, cols, dtype=torch.float32, device=seed.device)
        return noise.bernoulli_(1.0 - p).div_(1.0 - p)

    def dropped(t, seed, p, stream, dtype):
        return torch.nn.functional.dropout(t.to(dtype), p) if p > 0.0 and seed is not None else t.to(dtype)

    originals = reference.dropout_factor, reference.dropped
    reference.dropout_factor, reference.dropped = factor, dropped
    try:
        yield
    finally:
        reference.dropout_factor, reference.dropped = originals


# The seed tensor the eager rows pass the reference, one per device, made once: under
# torch_dropout_masks nothing reads it, and an eager chain draws no seed of its own to count.
_EAGER_SEEDS: dict = {}


def dropout_arguments(dropout: float, fused: bool, device) -> dict:
    """The keyword arguments that run an op (fused, or its reference) at this dropout rate: none
    at 0; the fused op draws a fresh seed per call itself, the reference takes _EAGER_SEEDS'
    (run it under torch_dropout_masks)."""
    if dropout == 0.0:
        return {}
    if fused:
        return {"dropout": dropout}
    device = torch.device(device)
    if device not in _EAGER_SEEDS:
        _EAGER_SEEDS[device] = torch.zeros((), dtype=torch.int64, device=device)
    return {"dropout": dropout, "seed": _EAGER_SEEDS[device]}


# The sparse mixture's two forms: gated by a learned top-k gate, or routed by the caller.
SPARSE_OPS = ("sparse_adapter", "routed_adapter")


def sparse_inputs(rows: int, dim: int, rank: int, experts: int, top_k: int, dtype: torch.dtype, device,
                  requires_grad: bool, routed: bool = False, generator: Optional[torch.Generator] = None) -> dict:
    """One set of sparse mixture inputs, as bottleneck_inputs for E experts: x, the routing, each
    expert's projections stacked (w_down [E, r, D], b_down [E, r], w_up [E, D, r], b_up [E, D])
    and a channel scale shared by the experts; the residual is x itself.

    The routing, gated (routed=False): w_gate [E, D] and b_gate [E], fp32 whatever the experts'
    dtype (a router kept in fp32), scaled so that the logits are about N(0, 1) and the experts
    get about equal shares. Routed: expert_idx [M, k] int64, k distinct experts per row drawn at
    random, and expert_weight [M, k] fp32, random positive, each row summing to 1 (no gradient
    for expert_idx). Draws from `generator` when given (a fixed seed gives a fixed routing)."""

    def randn(*shape, std=1.0, grad=requires_grad, dt=dtype):
        t = torch.randn(*shape, generator=generator) * std
        return t.to(device=device, dtype=dt).requires_grad_(grad)

    inputs = dict(x=randn(rows, dim))
    if routed:
        expert_idx = torch.rand(rows, experts, generator=generator).argsort(dim=1)[:, :top_k]
        expert_weight = torch.rand(rows, top_k, generator=generator) + 0.25
        expert_weight = expert_weight / expert_weight.sum(dim=1, keepdim=True)
        inputs.update(expert_idx=expert_idx.to(device),
                      expert_weight=expert_weight.to(device).requires_grad_(requires_grad))
    else:
        inputs.update(w_gate=randn(experts, dim, std=dim ** -0.5, dt=torch.float32),
                      b_gate=randn(experts, std=0.1, dt=torch.float32))
    inputs.update(w_down=randn(experts, rank, dim, std=dim ** -0.5), b_down=randn(experts, rank, std=0.1),
                  w_up=randn(experts, dim, rank, std=rank ** -0.5), b_up=randn(experts, dim, std=0.1),
                  scale=randn(dim))
    return inputs


def sparse_call(op: str, fn: Callable, inputs: dict, top_k: int, **kwargs):
    """fn (the fused op, its reference, or a compiled reference) of form `op` on sparse_inputs:
    residual x, the channel scale; kwargs go to fn (e.g. the fused op's variant=)."""
    experts = (inputs["w_down"], inputs["b_down"], inputs["w_up"], inputs["b_up"], inputs["scale"])
    if op == "sparse_adapter":
        return fn(inputs["x"], inputs["w_gate"], inputs["b_gate"], *experts, top_k=top_k, residual=inputs["x"],
                  **kwargs)
    if op == "routed_adapter":
        return fn(inputs["x"], inputs["expert_idx"], inputs["expert_weight"], *experts, residual=inputs["x"],
                  **kwargs)
    raise ValueError(f"op must be one of {SPARSE_OPS}, got {op!r}")


def fusion_inputs(rows: int, dim: int, rank: int, adapters: int, dtype: torch.dtype, device, requires_grad: bool,
                  generator: Optional[torch.Generator] = None) -> dict:
    """One set of AdapterFusion inputs: x [M, D]; N frozen Adapter+ adapters stacked (w_down
    [N, r, D], b_down [N, r], w_up [N, D, r], b_up [N, D], channel scales [N, D]; no gradient, as
    in I2I's fusion phase); the fusion's w_query, b_query, w_key, b_key (BERT-like std 0.02) and
    w_value (the library's identity init plus 1e-6 everywhere off the diagonal), trainable."""

    def randn(*shape, std=1.0, grad=requires_grad):
        t = torch.randn(*shape, generator=generator) * std
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    value = torch.full((dim, dim), 1e-6).fill_diagonal_(1.0)
    return dict(
        x=randn(rows, dim),
        w_down=randn(adapters, rank, dim, std=dim ** -0.5, grad=False), b_down=randn(adapters, rank, std=0.1, grad=False),
        w_up=randn(adapters, dim, rank, std=rank ** -0.5, grad=False), b_up=randn(adapters, dim, std=0.1, grad=False),
        scale=randn(adapters, dim, grad=False),
        w_query=randn(dim, dim, std=0.02), b_query=randn(dim, std=0.02), w_key=randn(dim, dim, std=0.02),
        b_key=randn(dim, std=0.02), w_value=value.to(device=device, dtype=dtype).requires_grad_(requires_grad),
    )


FUSION_ARGUMENTS = ("x", "w_down", "b_down", "w_up", "b_up", "scale", "w_query", "b_query", "w_key", "b_key",
                    "w_value")


def fusion_call(fn: Callable, inputs: dict):
    """fn (adapter_fusion, its reference, or a compiled reference) on fusion_inputs, at the post
    position: the residual is x."""
    return fn(*(inputs[name] for name in FUSION_ARGUMENTS), residual=inputs["x"])


def differentiable(inputs: dict) -> list:
    """The inputs a backward differentiates: every tensor that requires grad (not expert_idx)."""
    return [t for t in inputs.values() if t.requires_grad]


def vit_model(provider: str, device, model_name: str = "vit_base_patch16_224", **create_kwargs) -> tuple:
    """(model, the callable that runs it, optimizer) for a model-level row: timm's model_name
    (random weights, create_kwargs to timm.create_model), backbone frozen, Adapter+ rank 8 in
    every block, eager ("eager", "compile") or fused ("fused", "fused+compiled-backbone"), the
    model compiled for the providers that say so; or trained another way: "losa" (a LoSA side
    network, LosaConfig()) and "full-finetune" (every parameter, no adapters). AdamW (lr 1e-3,
    weight decay 0.05) on what trains. Seeded: every provider starts from the same weights."""
    import timm

    from fused_adapters.adapters import AdapterConfig, BottleneckAdapter, LosaConfig, inject, param_groups

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, **create_kwargs)
    if provider == "losa":
        inject(model, LosaConfig(), verbose=False)
    elif provider != "full-finetune":
        inject(model, AdapterConfig(rank=8), verbose=False)
    for module in model.modules():
        if isinstance(module, BottleneckAdapter):
            module.fused = provider.startswith("fused")
    model.to(device)
    runner = torch.compile(model) if "compile" in provider else model
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.05))
    return model, runner, optimizer


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



def time_rotating(benchmark, suite, run: Callable[[int], object], sets: int, warm: int, floor: int) -> bool:
    """Time run(index) over `sets` rotating input sets, as every op-level row is timed: the first
    `warm` sets run (and synchronize) outside the timed region (torch.compile, Triton's JIT,
    autotuning); each round times `iterations` calls queued back to back and one synchronize
    at its end, sized from one synchronized call to about 2 ms a round on a GPU, so a small
    shape's time is what a stream of calls achieves. Records `iterations` and, on a GPU,
    `gbps` (floor bytes per second) in the row; returns False when benchmarks are disabled."""
    import itertools

    device = suite.device

    def run_synchronized(index):
        run(index)
        synchronize(device)

    for index in range(warm):
        run_synchronized(index)
    iterations = 1
    if suite.cuda:
        start = time.perf_counter()
        run_synchronized(0)
        iterations = max(1, min(100, math.ceil(2e-3 / (time.perf_counter() - start))))
    order, calls = itertools.cycle(range(sets)), itertools.count(1)

    def timed():
        run(next(order))
        if next(calls) % iterations == 0:
            synchronize(device)

    if suite.quick:
        rounds, warmup = (5, 1) if not suite.cuda else (20, 3)
    else:
        rounds, warmup = (20, 2) if not suite.cuda else (100, 10)
    synchronize(device)
    benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=warmup)
    benchmark.extra_info["iterations"] = iterations
    if benchmark.disabled:
        return False
    if suite.cuda:
        benchmark.extra_info["gbps"] = round(floor / benchmark.stats.stats.median / 1e9, 2)
    return True

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


def time_rounds(run: Callable[[int], object], sets: int, device: torch.device, rounds: int = 15,
                round_seconds: float = 2e-3) -> list[float]:
    """Seconds per call of run(index), one value a round, index rotating over `sets` input sets:
    each round queues `iterations` calls back to back between two CUDA events (on the CPU,
    perf_counter and a synchronize), sized from one synchronized call to about round_seconds, so
    a small shape's time is what a stream of calls achieves. Warm-up (compile, JIT) is the
    caller's."""
    import itertools

    order = itertools.cycle(range(sets))
    synchronize(device)
    start = time.perf_counter()
    run(next(order))
    synchronize(device)
    iterations = max(1, min(100, math.ceil(round_seconds / (time.perf_counter() - start))))
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(iterations):
                run(next(order))
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3 / iterations)
        else:
            start = time.perf_counter()
            for _ in range(iterations):
                run(next(order))
            times.append((time.perf_counter() - start) / iterations)
    return times


def copy_gbps(device: torch.device, size: int = 1 << 30) -> float:
    """Bandwidth of a plain copy (read + write, in GB/s) on this device: what a memory-bound
    kernel can hope for, measured in the same run as the benchmarks."""
    if device.type != "cuda":
        size = min(size, 256 << 20)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(2):
        target.copy_(source)
    return 2 * size / statistics.median(time_rounds(lambda _: target.copy_(source), 1, device, rounds=10)) / 1e9


# --------------------------------------------------------------------------------------------
# Device-free counts (interpreter), run as a subprocess
# --------------------------------------------------------------------------------------------


def _fused_provider(case: dict) -> bool:
    """Whether a count case's provider runs the package's kernels: "fused", and the multi-LoRA
    rows' "routed" and "loop-fused"."""
    return case["provider"] == "fused" or (case.get("op") == "multilora" and case["provider"] in MULTILORA_FUSED)


def _case_call(case: dict, rows: int, dim: int, dim_out: Optional[int], dtype, autocast):
    """(forward call, its inputs, the context it runs in) of a count case's provider at these
    sizes: the op on its inputs (the fused op with the case's variant, or eager PyTorch), at
    the case's dropout rate (bottleneck, LoRA and sparse cases; the eager rows' masks as torch
    draws them: torch_dropout_masks)."""
    from fused_adapters.kernels import bottleneck_adapter, reference, routed_adapter, sparse_adapter, use_variant

    generator = torch.Generator().manual_seed(0)
    fused = _fused_provider(case)
    variant = case.get("variant") or "default"
    op = case.get("op")
    dropout = case.get("dropout") or 0.0
    rate = dropout_arguments(dropout, fused, "cpu")  # the eager rows' seed made here, not in a counted call
    if op == "multilora":
        # rows = images x tokens; the host-time chain at HOST_EAGER_ROWS keeps the images.
        images = case["images"]
        inputs = multilora_inputs(images, max(1, rows // images), dim, dim_out, case["rank"], case["tasks"], dtype,
                                  "cpu", generator)
        fn = MULTILORA_FUNCTIONS[case["provider"]]

        def forward_call():
            return multilora_call(fn, inputs, case["scale"])
    elif op == "lora":
        inputs = lora_inputs(rows, dim, dim_out, case["rank"], dtype, "cpu", generator)
        fn = lora_fused if fused else lora_eager

        def forward_call():
            return lora_call(fn, inputs, case["scale"], dropout)
    elif op == "adapter_fusion":
        from fused_adapters.kernels import adapter_fusion

        inputs = fusion_inputs(rows, dim, case["rank"], case["adapters"], dtype, "cpu", True, generator)
        fn = adapter_fusion if fused else reference.adapter_fusion

        def forward_call():
            return fusion_call(fn, inputs)
    elif op in SPARSE_OPS:
        inputs = sparse_inputs(rows, dim, case["rank"], case["experts"], case["top_k"], dtype, "cpu", True,
                               op == "routed_adapter", generator)
        fn = (sparse_adapter if op == "sparse_adapter" else routed_adapter) if fused else getattr(reference, op)

        def forward_call():
            return sparse_call(op, fn, inputs, case["top_k"], **({"variant": variant} if fused else {}), **rate)
    else:
        op = "bottleneck_adapter"
        inputs = bottleneck_inputs(rows, dim, case["rank"], dtype, "cpu", True, generator)
        fn = bottleneck_adapter if fused else reference.bottleneck_adapter

        def forward_call():
            return fn(inputs["x"], inputs["w_down"], inputs["b_down"], inputs["w_up"], inputs["b_up"], inputs["scale"],
                      residual=inputs["x"], **rate)

    @contextlib.contextmanager
    def context():
        autocast_context = (torch.autocast("cpu", dtype=autocast) if autocast is not None
                            else torch.autocast("cpu", enabled=False))
        # The sparse ops share the "sparse_adapter" variants (their variant= argument is passed too).
        if op == "multilora":
            # The branch's bottleneck kernels and the routed launch in their default variants.
            variant_context = contextlib.ExitStack()
            for family in ("bottleneck_adapter", "sparse_adapter"):
                variant_context.enter_context(use_variant(family, "default"))
        elif op == "lora":
            variant_context = lora_variant(variant if fused else "default")
        else:
            # AdapterFusion mixes through the routed mixture's kernels: their default variant.
            family = "sparse_adapter" if op in SPARSE_OPS + ("adapter_fusion",) else op
            variant_context = use_variant(family, variant if fused else "default")
        masks = torch_dropout_masks() if dropout > 0.0 and not fused else contextlib.nullcontext()
        with variant_context, autocast_context, masks:
            yield

    return forward_call, inputs, context


def _count_dtypes(case: dict) -> tuple:
    """(dtype, autocast dtype) a case is counted in: the interpreter has no bf16, so bf16 cases
    are counted in fp16 (same element size, same plans)."""
    dtype, autocast = DTYPES[case["dtype"]]
    return (torch.float16 if dtype == torch.bfloat16 else dtype,
            torch.float16 if autocast == torch.bfloat16 else autocast)


# Indexing ops that read or write some rows of a tensor: the byte counter charges them the whole
# tensor (its rule for every op: each tensor argument read whole, a mutated one read and written
# whole), while a GPU's index kernels move the rows they touch. A gather of one task's 197 rows
# of x [1576, 768] is charged all 1576 rows: 8x too much for each of a loop's 8 tasks.
INDEXING_OPS = frozenset({"index", "index_select", "index_put_", "index_add_"})


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def indexed_bytes(name: str, args: tuple, kwargs: dict, out) -> tuple[int, int]:
    """(read, written) bytes of an indexing op (INDEXING_OPS) that touches only its indexed rows:
    a gather (index(self, indices), index_select(self, dim, index)) reads the indices and the
    elements it returns, and writes them; a scatter into self (index_put_(self, indices, values,
    accumulate): self[indices] = values, or += with accumulate; index_add_(self, dim, index,
    source): self[index] += source) reads the values and the indices, and reads (when it adds)
    and writes as many elements of self."""
    if name == "index":
        return _tensor_bytes(out) + _tensor_bytes(args[1]), _tensor_bytes(out)
    if name == "index_select":
        return _tensor_bytes(out) + _tensor_bytes(args[2]), _tensor_bytes(out)
    if name == "index_put_":
        target, indices, values = args[:3]
        accumulate = bool(args[3] if len(args) > 3 else kwargs.get("accumulate", False))
    else:  # index_add_
        target, indices, values = args[0], args[2], args[3] if len(args) > 3 else kwargs["source"]
        accumulate = True
    touched = values.numel() * target.element_size()
    return _tensor_bytes(values) + _tensor_bytes(indices) + (touched if accumulate else 0), touched


class IndexedRows(TorchDispatchMode):
    """Entered inside count_bytes(): each indexing op (INDEXING_OPS) the counter records outside a
    launch is re-charged the bytes of the rows it touches (indexed_bytes) in the counter's report;
    `recharged` keeps (counted, re-charged) bytes per op, so the counter's own total is
    report.total() + sum(counted - recharged)."""

    def __init__(self, report):
        super().__init__()
        self.report = report
        self.recharged: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from fused_adapters.tools.byte_count import AtenBytes

        kwargs = kwargs or {}
        before = len(self.report.events)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in INDEXING_OPS and len(self.report.events) == before + 1:
            event = self.report.events[before]
            if isinstance(event, AtenBytes) and event.op == name:
                read, written = indexed_bytes(name, args, kwargs, out)
                self.report.events[before] = AtenBytes(op=name, read=read, written=written)
                self.recharged.append((event.read + event.written, read + written))
        return out


@contextlib.contextmanager
def count_moved(sms: int, indexed_rows: bool = False):
    """count_bytes(sm_count=sms) (the interpreter's byte counter, launches planned for sms SMs);
    with indexed_rows, its indexing ops charged the rows they touch (IndexedRows), the mode kept
    on the report as report.indexed_rows."""
    from fused_adapters.tools.byte_count import count_bytes

    with count_bytes(sm_count=sms) as report:
        if not indexed_rows:
            yield report
            return
        mode = IndexedRows(report)
        report.indexed_rows = mode
        with mode:
            yield report


def count_case(case: dict) -> dict:
    """Triton launches, aten kernels and bytes moved by one forward and one backward of a
    provider ("eager" or "fused" with case["variant"]), counted in the interpreter with launches
    planned for case["sms"] SMs, and the host time per call (case_host_us). The interpreter has
    no bf16: bf16 cases are counted in fp16 (same element size, same plans). case["op"]
    "sparse_adapter" or "routed_adapter" (with case["experts"] and case["top_k"]) counts that op
    on sparse_inputs; "lora" (with case["dim_out"] and case["scale"]) a LoRA linear on
    lora_inputs (lora_fused, or lora_eager for "eager"); "adapter_fusion" (with case["adapters"])
    AdapterFusion on fusion_inputs; "multilora" (with case["dim_out"], case["scale"],
    case["tasks"] and case["images"]) a multi-LoRA batch on multilora_inputs, its provider one of
    MULTILORA_PROVIDERS; otherwise the bottleneck op."""
    dtype, autocast = _count_dtypes(case)
    forward_call, inputs, context = _case_call(case, case["rows"], case["dim"], case.get("dim_out"), dtype, autocast)
    # The multi-LoRA loops gather and scatter rows: their indexing ops are charged the rows they touch.
    indexed_rows = case.get("op") == "multilora"
    with context():
        with count_moved(case["sms"], indexed_rows) as forward:
            y = forward_call()
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        with count_moved(case["sms"], indexed_rows) as backward:
            torch.autograd.grad(y, differentiable(inputs), grad)
    return {
        "forward": {"triton_launches": forward.triton_launches, "aten_kernels": len(forward.aten),
                    "moved_bytes": forward.total()},
        "backward": {"triton_launches": backward.triton_launches, "aten_kernels": len(backward.aten),
                     "moved_bytes": backward.total()},
        "host_us": case_host_us(case),
    }


class DeviceWork:
    """Times the fused ops' post-launch reductions (gradient partials summed over chunks, split
    rows folded): on a GPU they are launches too, enqueued in microseconds; on the CPU they run
    in place, and their time is taken out of a host time."""

    def __init__(self):
        self.seconds = 0.0
        self.patches = []

    def __enter__(self):
        from fused_adapters.kernels.bottleneck import op as bottleneck_op
        from fused_adapters.kernels.lora import op as lora_op
        from fused_adapters.kernels.sparse import op as sparse_op

        for module in (bottleneck_op, lora_op, sparse_op):
            for name in ("reduce_partials", "fold_rows"):
                if hasattr(module, name):
                    original = getattr(module, name)
                    self.patches.append((module, name, original))
                    setattr(module, name, self._timed(original))
        return self

    def _timed(self, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return result
        return run

    def __exit__(self, *exc):
        for module, name, original in self.patches:
            setattr(module, name, original)


@contextlib.contextmanager
def launches_as_no_ops(sms: int):
    """Triton launches that do nothing (planned for `sms` SMs), and the reductions after them
    timed (DeviceWork): what runs is the host side alone."""
    from fused_adapters.kernels import launch
    from fused_adapters.kernels.bottleneck import plan as bottleneck_plan
    from fused_adapters.kernels.lora import plan as lora_plan
    from fused_adapters.kernels.sparse import op as sparse_op
    from fused_adapters.kernels.sparse import plan as sparse_plan

    def new_output(shape, dtype, device):
        # What the launches would have written to integer buffers (the grouped design's routing,
        # sorted next): zeros, valid expert indices. Float buffers stay empty (no fill is timed).
        if dtype.is_floating_point:
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.zeros(shape, dtype=dtype, device=device)

    modules = (bottleneck_plan, lora_plan, sparse_plan, sparse_op)
    originals = [module.new_output for module in modules], launch.Launch.__call__
    launch.Launch.__call__ = lambda self: None
    for module in modules:
        module.new_output = new_output
    try:
        with launch.launch_plan(sms), DeviceWork() as device_work:
            yield device_work
    finally:
        launch.Launch.__call__ = originals[1]
        for module, original in zip(modules, originals[0]):
            module.new_output = original


def host_time(fn: Callable[[], object], repeats: int, rounds: int, device_work: Optional[DeviceWork] = None) -> tuple:
    """(least, median) microseconds per call of fn over `rounds` rounds of `repeats` calls, less
    the device work the CPU ran in place. The least is the figure free of the machine's noise (a
    shared VM's speed drifts by tens of percent between seconds)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(rounds):
        for _ in range(repeats):
            if device_work is not None:
                device_work.seconds = 0.0
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start - (device_work.seconds if device_work is not None else 0.0))
    return min(times) * 1e6, statistics.median(times) * 1e6


# The eager chain's host time is timed at this size, where its arithmetic is next to nothing.
HOST_EAGER_ROWS, HOST_EAGER_DIM = 16, 32


def case_host_us(case: dict, repeats: int = 30, rounds: int = 3) -> dict:
    """The least host time per call, us, of a count case's forward and forward+backward. Fused:
    the case's sizes, Triton launches as no-ops (launches_as_no_ops). Eager: the same chain at
    HOST_EAGER_ROWS x HOST_EAGER_DIM in fp32, where dispatch and autograd are what is timed (the
    CPU's fp16 kernels take slow paths)."""
    fused = _fused_provider(case)
    if fused:
        dtype, autocast = _count_dtypes(case)
        rows, dim, dim_out = case["rows"], case["dim"], case.get("dim_out")
    else:
        dtype, autocast = torch.float32, None
        rows, dim = HOST_EAGER_ROWS, HOST_EAGER_DIM
        dim_out = 3 * dim if case.get("dim_out") else None
    forward_call, inputs, context = _case_call(case, rows, dim, dim_out, dtype, autocast)
    wanted = differentiable(inputs)
    with context(), (launches_as_no_ops(case["sms"]) if fused else contextlib.nullcontext()) as device_work:
        grad = torch.ones_like(forward_call())

        def step():
            torch.autograd.grad(forward_call(), wanted, grad)

        forward, both = (host_time(fn, repeats, rounds, device_work)[0] for fn in (forward_call, step))
    return {"forward": round(forward, 1), "forward+backward": round(both, 1)}


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
    dtypes; backward launches too for forward+backward), from the op's own plans
    (kernels/<op>/plan.py) at the row's shapes, planned for case["sms"] SMs: the bottleneck
    row's Adapter+ post adapter (residual x, channel scale, biases, gelu); the LoRA row's form;
    the sparse row's design (gated or routed, residual x, channel scale); a multi-LoRA row's routed
    launch (the routed row's); each at the row's dropout rate (the kernels compile a dropout
    stage only where it is > 0)."""
    from fused_adapters.kernels.launch import launch_plan

    dtype, autocast = DTYPES[case["dtype"]]
    compute = autocast or dtype
    backward = case["pass"] != "forward"
    with launch_plan(case["sms"]):
        if case.get("op") in SPARSE_OPS:
            plans = _sparse_plans(case, dtype, compute, backward)
        elif case.get("op") == "adapter_fusion":
            plans = _fusion_plans(case, dtype, compute, backward)
        elif case.get("op") == "lora":
            plans = _lora_plans(case, dtype, compute, backward)
        elif case.get("op") == "multilora":
            plans = _multilora_plans(case, dtype, compute, backward)
        else:
            plans = _bottleneck_plans(case, dtype, compute, backward)
    return [launch for plan in plans for launch in plan.launches.values()]


def _bottleneck_plans(case: dict, dtype, compute, backward: bool) -> list:
    from fused_adapters.kernels.bottleneck import configs, plan

    rows, dim, rank = case["rows"], case["dim"], case["rank"]
    variant = next(v for v in configs.VARIANTS if v.name == case["variant"])
    params = bottleneck_inputs(1, dim, rank, dtype, "cpu", False)
    w_down, b_down, w_up, b_up, scale = (params[k] for k in ("w_down", "b_down", "w_up", "b_up", "scale"))
    x = torch.empty(rows, dim, dtype=dtype)
    dropout = _plan_dropout(case)
    forward = plan.forward(x, w_down, b_down, w_up, b_up, scale, 1.0, None, True, None, "gelu", compute, dtype, True,
                           variant, **dropout)
    if not backward:
        return [forward]
    return [forward, plan.backward(torch.empty_like(x), x, forward.buffers["hidden"], w_down, w_up, b_up, scale, 1.0,
                                   None, "gelu", compute, True, True, dtype, variant, **dropout)]


def _plan_dropout(case: dict, name: str = "dropout") -> dict:
    """A plan's dropout arguments at the case's rate (`name`: the plan's keyword for it), with a
    seed tensor to plan around; none at 0."""
    rate = case.get("dropout") or 0.0
    return {name: rate, "seed": torch.zeros((), dtype=torch.int64)} if rate > 0.0 else {}


def _lora_plans(case: dict, dtype, compute, backward: bool) -> list:
    """The default form: the branch's bottleneck plans (identity, no biases, scale alpha / r as a
    float, the base output [M, D_out] as residual; the base GEMM is PyTorch's); single_launch:
    the LoRA plans."""
    from fused_adapters.kernels.bottleneck import configs, plan as bottleneck_plan
    from fused_adapters.kernels.lora import plan as lora_plan

    rows, dim, dim_out, rank, scale = case["rows"], case["dim"], case["dim_out"], case["rank"], case["scale"]
    inputs = lora_inputs(1, dim, dim_out, rank, dtype, "cpu")
    lora_a, lora_b = inputs["lora_A"].detach(), inputs["lora_B"].detach()
    x = torch.empty(rows, dim, dtype=dtype)
    if case["variant"] == LORA_SINGLE_LAUNCH:
        weight, bias = inputs["weight"].detach(), inputs["bias"].detach()
        dropout = _plan_dropout(case)
        with lora_variant(LORA_SINGLE_LAUNCH):
            forward = lora_plan.forward(x, weight, bias, lora_a, lora_b, scale, compute, True, **dropout)
            if not backward:
                return [forward]
            return [forward, lora_plan.backward(torch.empty(rows, dim_out, dtype=compute), x,
                                                forward.buffers["hidden"], weight, lora_a, lora_b, scale, compute,
                                                True, dtype, **dropout)]
    variant = next(v for v in configs.VARIANTS if v.name == case["variant"])
    # The base output: F.linear gives the compute dtype (under autocast bf16), y promotes to it.
    base = torch.empty(rows, dim_out, dtype=compute)
    # The default form's dropout is the branch's input dropout.
    dropout = _plan_dropout(case, "input_dropout")
    forward = bottleneck_plan.forward(x, lora_a, None, lora_b, None, None, scale, base, False, None, "identity",
                                      compute, compute, True, variant, **dropout)
    if not backward:
        return [forward]
    return [forward, bottleneck_plan.backward(torch.empty(rows, dim_out, dtype=compute), x, forward.buffers["hidden"],
                                              lora_a, lora_b, None, None, scale, None, "identity", compute, False,
                                              True, dtype, variant, **dropout)]


def _multilora_plans(case: dict, dtype, compute, backward: bool) -> list:
    """The routed launch of a multi-LoRA batch, as mixed_lora_forward makes it: the T tasks' A
    and B stacked as w_down [T, r, D] and w_up [T, D_out, r], one expert per row (k = 1, weight
    1), identity, no biases, the shared scale as a float, the base output [M, D_out] as residual
    (the base GEMM is PyTorch's). loop-fused's launches are the LoRA rows' branch, once per task:
    its rows are not compile-checked."""
    from fused_adapters.kernels.launch import packed_grad_dtype
    from fused_adapters.kernels.sparse import configs, plan

    rows, dim, dim_out, rank, tasks = case["rows"], case["dim"], case["dim_out"], case["rank"], case["tasks"]
    variant = next(v for v in configs.VARIANTS if v.name == case["variant"])
    w_down, w_up = torch.empty(tasks, rank, dim, dtype=dtype), torch.empty(tasks, dim_out, rank, dtype=dtype)
    x, base = torch.empty(rows, dim, dtype=dtype), torch.empty(rows, dim_out, dtype=compute)
    expert_idx = torch.zeros(rows, 1, dtype=torch.int64)
    expert_weight = torch.ones(rows, 1, dtype=torch.float32)
    forward = plan.forward(x, None, None, expert_idx, expert_weight, w_down, None, w_up, None, None, case["scale"],
                           base, False, None, 1, "identity", compute, compute, True, False, variant)
    if not backward:
        return [forward]
    grad_dtype = packed_grad_dtype(x, None, None, w_down, None, w_up, None, None)
    return [forward, plan.backward(torch.empty(rows, dim_out, dtype=compute), None, x, forward.buffers["hidden"],
                                   forward.buffers["weights"], None, w_down, w_up, None, None, case["scale"], None,
                                   "identity", compute, False, True, grad_dtype, variant)]


def _sparse_plans(case: dict, dtype, compute, backward: bool) -> list:
    """The design the row's variant runs at its E and r (plan.choose_design), as sparse_call's
    arguments make it (residual x, channel scale, no row_scale, the logits not returned). The
    grouped design's routing and sort are a valid one (k distinct experts per row): the gate
    launch would overwrite it."""
    from fused_adapters.kernels.launch import packed_grad_dtype
    from fused_adapters.kernels.sparse import configs, plan
    from fused_adapters.kernels.sparse.op import sort_assignments

    rows, dim, rank, experts, top_k = case["rows"], case["dim"], case["rank"], case["experts"], case["top_k"]
    routed = case["op"] == "routed_adapter"
    variant = next(v for v in configs.VARIANTS if v.name == case["variant"])
    params = sparse_inputs(1, dim, rank, experts, top_k, dtype, "cpu", False, routed)
    w_gate, b_gate = params.get("w_gate"), params.get("b_gate")
    w_down, b_down, w_up, b_up, scale = (params[k] for k in ("w_down", "b_down", "w_up", "b_up", "scale"))
    x = torch.empty(rows, dim, dtype=dtype)
    grad_dtype = packed_grad_dtype(x, w_gate, b_gate, w_down, b_down, w_up, b_up, scale)
    dropout = _plan_dropout(case)
    if plan.choose_design(experts, rank, variant.name) == "dense":
        expert_idx = torch.empty(rows, top_k, dtype=torch.int64) if routed else None
        expert_weight = torch.empty(rows, top_k, dtype=torch.float32) if routed else None
        forward = plan.forward(x, w_gate, b_gate, expert_idx, expert_weight, w_down, b_down, w_up, b_up, scale, 1.0,
                               None, True, None, top_k, "gelu", compute, dtype, True, False, variant, **dropout)
        if not backward:
            return [forward]
        return [forward, plan.backward(torch.empty_like(x), None, x, forward.buffers["hidden"],
                                       forward.buffers["weights"], w_gate, w_down, w_up, b_up, scale, 1.0, None,
                                       "gelu", compute, True, True, grad_dtype, variant, **dropout)]
    plans = [plan.gate(x, w_gate, b_gate, top_k, False)] if w_gate is not None else []
    idx = (torch.arange(rows * top_k) % experts).to(torch.int32).view(rows, top_k)
    weights = torch.full((rows, top_k), 1.0 / top_k)
    order, counts = sort_assignments(idx, experts)
    forward = plan.grouped_forward(x, idx, weights, order, counts, w_down, b_down, w_up, b_up, scale, 1.0, None,
                                   True, None, "gelu", compute, dtype, True, **dropout)
    plans.append(forward)
    if backward:
        plans.append(plan.grouped_backward(torch.empty_like(x), None, x, forward.buffers["hidden"], idx, weights,
                                           order, counts, w_gate, w_down, w_up, b_up, scale, 1.0, None, "gelu",
                                           compute, True, True, grad_dtype, **dropout))
    return plans


def _fusion_plans(case: dict, dtype, compute, backward: bool) -> list:
    """The scores launch and the routed mixture's dense launches (every adapter chosen, the folded
    up-projections, residual x), as adapter_fusion makes them on fusion_inputs; backward: the
    mixture's launches, then the scores' backward launch."""
    from fused_adapters.kernels.fusion import op as fusion_op
    from fused_adapters.kernels.fusion import plan as fusion_plan
    from fused_adapters.kernels.sparse import configs, plan as sparse_plan

    rows, dim, rank, adapters = case["rows"], case["dim"], case["rank"], case["adapters"]
    params = {k: v.detach() for k, v in fusion_inputs(1, dim, rank, adapters, dtype, "cpu", False).items()}
    folds = fusion_op.fold_weights(*(params[k] for k in ("w_up", "b_up", "scale", "w_query", "b_query", "w_key",
                                                         "b_key", "w_value")))
    x = torch.empty(rows, dim, dtype=dtype)
    w_down, b_down = params["w_down"], params["b_down"]
    scores = fusion_plan.scores(x, w_down, b_down, folds["query_hidden"], folds["query_hidden_bias"].reshape(-1),
                                folds["query_bias"], folds["query_bias_bias"], "gelu", compute, 1.0)
    every = torch.arange(adapters).expand(rows, adapters)
    probs = torch.empty(rows, adapters, dtype=torch.float32)
    value_up = folds["value_up"].contiguous()
    forward = sparse_plan.forward(x, None, None, every, probs, w_down, b_down, value_up, folds["value_bias"], None,
                                  1.0, None, True, None, adapters, "gelu", compute, dtype, True, False,
                                  configs.DEFAULT_VARIANT)
    if not backward:
        return [scores, forward]
    mixture = sparse_plan.backward(torch.empty_like(x), None, x, forward.buffers["hidden"], forward.buffers["weights"],
                                   None, w_down, value_up, folds["value_bias"], None, 1.0, None, "gelu", compute, True,
                                   True, torch.float32, configs.DEFAULT_VARIANT)
    scores_backward = fusion_plan.scores_backward(x, probs, probs, w_down, b_down, folds["query_hidden"],
                                                  folds["query_hidden_bias"].reshape(-1), "gelu", compute, 1.0, dtype)
    return [scores, forward, mixture, scores_backward]


def register_usage(cases: list[dict], arch: int = 90) -> list[dict]:
    """Registers and spill bytes per launch of each case, compiled for arch (no GPU needed)."""
    from fused_adapters.tools.compile_check import launch_usage

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
