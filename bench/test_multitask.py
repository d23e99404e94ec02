"""Model-level benchmark: one batch of vit_base_patch16_224 (random weights, backbone frozen) in
which the images belong to 8 tasks, each with its own adapters injected by name: Adapter+ (rank
8, post; op "vit_b16_8tasks") or LoRA on every block's qkv and fc1 (rank 8, alpha 16; op
"vit_b16_8tasks_lora", a multi-LoRA batch: bench/test_multilora.py has one linear's rows).

Providers:
  task_routing  every image through its own task's adapters: one routed launch per block
                (Adapter+), or per adapted linear the base GEMM once and one routed launch for
                every task's LoRA branch (fused_adapters.adapters.task_routing)
  loop-fused    a loop over the tasks: set_adapter, run that task's images, fused adapters
  loop-eager    the same loop with the adapters' plain-PyTorch path
Passes: inference (no_grad forward) and a train step (forward, cross-entropy, backward, AdamW on
every task's adapters and the head). On a GPU: batch 64 (8 images per task) under bf16 autocast;
on the CPU only the eager loop is timed (the fused rows would time Triton's interpreter), and
nothing runs with --benchmark-quick there (a ViT-B with 8 adapters per block is slow on 2 cores).
"""

from __future__ import annotations

import itertools

import pytest
import timm
import torch
import torch.nn.functional as F

from bench.measure import kernel_counts, peak_memory, synchronize
from fused_adapters.adapters import (
    AdapterConfig, BottleneckAdapter, LoraBranch, LoraConfig, inject, param_groups, set_adapter, task_routing,
)

PROVIDERS = ("task_routing", "loop-fused", "loop-eager")
# op -> (the adapters each task gets, the modules whose `fused` flag picks their path, trainable names)
KINDS = {
    "vit_b16_8tasks": (AdapterConfig(rank=8), BottleneckAdapter, ".adapters."),
    "vit_b16_8tasks_lora": (LoraConfig(rank=8, alpha=16.0, targets=("qkv", "fc1")), LoraBranch, ".lora."),
}
PASSES = ("inference", "train_step")
MODEL = "vit_base_patch16_224"
TASKS = tuple(f"task{index}" for index in range(8))
KERNEL_NAMES = {"_bottleneck_forward_kernel", "_backward_hidden_kernel", "_backward_input_and_weights_kernel",
                "_sparse_forward_kernel", "_sparse_backward_input_kernel", "_sparse_backward_weights_kernel",
                "_grouped_forward_kernel", "_grouped_combine_kernel", "_grouped_backward_input_kernel",
                "_grouped_backward_combine_kernel", "_grouped_backward_weights_kernel", "_lora_linear_kernel"}


def pytest_generate_tests(metafunc):
    if "multitask_case" not in metafunc.fixturenames:
        return
    cuda = torch.cuda.is_available()
    batches = (64,) if cuda else (8,)
    dtype = "fp32 (bf16 autocast)" if cuda else "fp32"
    cases = list(itertools.product(KINDS, PROVIDERS, PASSES, batches))
    metafunc.parametrize("multitask_case", [(op, p, s, b, dtype) for op, p, s, b in cases],
                         ids=[f"{'lora-' if op.endswith('lora') else ''}{s}-b{b}-{p}" for op, p, s, b in cases])


_BUILT: dict = {}


def _model(op: str, provider: str, device: torch.device):
    """(model, optimizer) with the 8 tasks' adapters of the op's kind, built once per kind and
    adapter path."""
    config, module_type, trainable_name = KINDS[op]
    key = (op, provider != "loop-eager")
    if key not in _BUILT:
        _BUILT.clear()
        torch.manual_seed(0)
        model = timm.create_model(MODEL, pretrained=False)
        for task in TASKS:
            inject(model, config, name=task, verbose=False)
        for module in model.modules():
            if isinstance(module, module_type):
                module.fused = key[1]
        model.to(device)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        trainable = [p for name, p in model.named_parameters() if trainable_name in name or name.startswith("head")]
        for parameter in trainable:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.05))
        _BUILT[key] = model, optimizer
    return _BUILT[key]


def test_multitask(benchmark, suite, multitask_case):
    op, provider, pass_name, batch, dtype_name = multitask_case
    device = suite.device
    row = suite.row(
        op=op, shape=f"batch={batch} 224px 8 tasks", rows=batch, dim=768, rank=8, dtype=dtype_name,
        provider=provider, variant="default" if provider != "loop-eager" else "-", **{"pass": pass_name},
    )
    if not suite.cuda:
        if suite.quick:
            pytest.skip("a ViT-B with 8 adapters per block is slow on a few CPU cores: run without "
                        "--benchmark-quick")
        if provider != "loop-eager":
            pytest.skip("fused timings need CUDA: on the CPU the fused adapters run in Triton's interpreter")
    model, optimizer = _model(op, provider, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=suite.cuda)
    names = [TASKS[index % len(TASKS)] for index in range(batch)]
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    groups = {task: torch.tensor([i for i, name in enumerate(names) if name == task], device=device)
              for task in TASKS}

    def forward():
        with autocast:
            if provider == "task_routing":
                with task_routing(model, names):
                    return model(images)
            logits = torch.empty(batch, model.num_classes, device=device)
            for task, index in groups.items():
                set_adapter(model, task)
                logits = logits.index_copy(0, index, model(images[index]).float())
            return logits

    def train_step():
        F.cross_entropy(forward().float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def inference():
        with torch.no_grad():
            forward()

    step = train_step if pass_name == "train_step" else inference
    model.train(pass_name == "train_step")

    def timed():
        step()
        synchronize(device)

    timed()  # warm-up (and compiles the kernels) outside the timed region
    rounds = (10 if suite.quick else 30) if suite.cuda else 3
    benchmark.group = f"vit_b16 8 tasks{' lora' if op.endswith('lora') else ''} {pass_name} {dtype_name}"
    benchmark.extra_info.update(row)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1 if suite.cuda else 0)
    if benchmark.disabled:
        return
    info = benchmark.extra_info
    info["images_per_s"] = round(batch / benchmark.stats.stats.median, 1)
    info["peak_mem_bytes"] = peak_memory(step, device)
    info["triton_launches"], info["aten_kernels"] = kernel_counts(step, device, KERNEL_NAMES)
