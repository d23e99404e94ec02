"""Model-level benchmark: timm vit_base_patch16_224 (random weights), backbone frozen, Adapter+
(rank 8, post, channel scale, drop path 0.1) in every block, 224 px images.

Passes: a train step (forward, cross-entropy, backward, AdamW on the adapters and the head) and
inference (no_grad forward). Providers: eager adapters (the plain-PyTorch path), fused adapters,
torch.compile of the model with eager adapters, and fused adapters with the backbone compiled
around them (the fused op is one graph node). Two more train the same model another way, for
comparison: "losa", a LoSA side network (LosaConfig(): channel and token rank 16, every block)
on the backbone run without autograd, fused mixers; and "full-finetune", every parameter
trained, no adapters. On a GPU: batch 64 and 128 under bf16 autocast; on the CPU: batch 2 in
fp32, fused rows not timed (they would time Triton's interpreter), and the losa and
full-finetune rows only on full runs (bytes saved for backward; full-finetune timed).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from bench.measure import kernel_counts, peak_memory, saved_bytes, synchronize, vit_model

PROVIDERS = ("eager", "fused", "compile", "fused+compiled-backbone", "losa", "full-finetune")
# The rows that train the model another way than Adapter+ (see the module docstring).
OTHER_METHODS = ("losa", "full-finetune")
# The rank each row's adapters have (LoSA: its mixers' default ranks; full fine-tuning: none).
RANKS = {**{provider: 8 for provider in PROVIDERS}, "losa": 16, "full-finetune": 0}
PASSES = ("train_step", "inference")
MODEL = "vit_base_patch16_224"
KERNEL_NAMES = {"_bottleneck_forward_kernel", "_backward_hidden_kernel", "_backward_input_and_weights_kernel"}


def pytest_generate_tests(metafunc):
    if "model_case" not in metafunc.fixturenames:
        return
    cuda = torch.cuda.is_available()
    quick = metafunc.config.getoption("--benchmark-quick")
    batches = ((64,) if quick else (64, 128)) if cuda else (2,)
    dtype = "fp32 (bf16 autocast)" if cuda else "fp32"
    # Provider outermost: one model (and one compile) serves all its rows in turn.
    cases = list(itertools.product(PROVIDERS, PASSES, batches))
    metafunc.parametrize("model_case", [(p, s, b, dtype) for p, s, b in cases],
                         ids=[f"{s}-b{b}-{p}" for p, s, b in cases])


_BUILT: dict = {}


def _model(provider: str, device: torch.device):
    """vit_model(provider), built once per provider."""
    if provider not in _BUILT:
        _BUILT.clear()  # one ViT-B and its optimizer state at a time
        _BUILT[provider] = vit_model(provider, device, MODEL)
    return _BUILT[provider]


def test_vit(benchmark, suite, model_case):
    provider, pass_name, batch, dtype_name = model_case
    device = suite.device
    row = suite.row(
        op="vit_b16", shape=f"batch={batch} 224px", rows=batch, dim=768, rank=RANKS[provider], dtype=dtype_name,
        provider=provider, variant="default" if provider.startswith("fused") else "-", **{"pass": pass_name},
    )
    if provider in OTHER_METHODS and not suite.cuda and suite.quick:
        pytest.skip("LoSA and full fine-tuning rows on the CPU run without --benchmark-quick (a ViT-B train step "
                    "with every parameter, or LoSA in Triton's interpreter, takes seconds a call)")
    if provider == "losa" and not suite.cuda:
        if pass_name == "train_step":
            model, runner, _ = _model(provider, device)
            model.train()
            images = torch.randn(batch, 3, 224, 224)
            row["saved_bytes"] = saved_bytes(lambda: runner(images), [images, *model.parameters()], device)
            suite.untimed.append(row)
        pytest.skip("fused timings need CUDA: on the CPU LoSA's fused mixers run in Triton's interpreter")
    if provider.startswith("fused") and not suite.cuda:
        if provider == "fused" and pass_name == "train_step":
            # What needs no GPU: the activations a training forward keeps, fused adapters in the
            # interpreter against the eager row's.
            model, runner, _ = _model(provider, device)
            model.train()
            images = torch.randn(batch, 3, 224, 224)
            row["saved_bytes"] = saved_bytes(lambda: runner(images), [images, *model.parameters()], device)
            suite.untimed.append(row)
        pytest.skip("fused timings need CUDA: on the CPU the fused adapters run in Triton's interpreter")
    if "compile" in provider and not suite.cuda and suite.quick:
        pytest.skip("torch.compile of ViT-B takes minutes on a few CPU cores: run without --benchmark-quick")
    model, runner, optimizer = _model(provider, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=suite.cuda)
    images = [torch.randn(batch, 3, 224, 224, device=device) for _ in range(2)]
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    order = itertools.cycle(range(len(images)))

    def forward(index):
        with autocast:
            return runner(images[index])

    def train_step(index):
        logits = forward(index)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def inference(index):
        with torch.no_grad():
            forward(index)

    step = train_step if pass_name == "train_step" else inference
    model.train(pass_name == "train_step")

    def setup():
        synchronize(device)
        return (next(order),), {}

    def timed(index):
        step(index)
        synchronize(device)

    for index in range(2):  # compile and warm up outside the timed region
        timed(index)
    rounds = (10 if suite.quick else 30) if suite.cuda else 3
    benchmark.group = f"vit_b16 {pass_name} {dtype_name}"
    benchmark.extra_info.update(row)
    benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=1 if suite.cuda else 0)
    if benchmark.disabled:
        return
    info = benchmark.extra_info
    info["images_per_s"] = round(batch / benchmark.stats.stats.median, 1)
    info["peak_mem_bytes"] = peak_memory(lambda: step(0), device)
    if pass_name == "train_step" and (suite.cuda or "compile" not in provider):
        # Beyond the inputs and parameters: activations, and under autocast the low-precision
        # weight copies autograd keeps (the same for every provider unless a compiled graph
        # recomputes them). On the CPU the saved-tensor hooks cannot vouch for a compiled graph.
        info["saved_bytes"] = saved_bytes(lambda: forward(0), [images[0], *model.parameters()], device)
        optimizer.zero_grad(set_to_none=True)
    info["triton_launches"], info["aten_kernels"] = kernel_counts(lambda: step(0), device, KERNEL_NAMES)
