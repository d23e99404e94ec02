"""Training under DistributedDataParallel and FSDP2 (torch.distributed.fsdp.fully_shard, every
block and then the model sharded): two CPU processes (gloo) on two halves of a batch give the
same adapter weights as one process on the whole batch, for every adapter kind (bottleneck,
mixture with its auxiliary loss, LoRA, LoSA)."""

import os

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fused_adapters.adapters import AdapterConfig, LoraConfig, LosaConfig, inject, model_aux_loss, param_groups

STEPS, BATCH, IMG = 3, 4, 32
KINDS = {
    "bottleneck": AdapterConfig(drop_path=0.0),
    "mixture": AdapterConfig(drop_path=0.0, experts=4, top_k=2, aux_loss_weight=0.1),
    "lora": LoraConfig(rank=4, targets=("qkv", "fc2")),
    "losa": LosaConfig(channel_rank=4, token_rank=2, drop_path=0.0),
}
WRAPPERS = ("ddp", "fsdp2")


def _model_and_batch(kind):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=IMG)
    inject(model, KINDS[kind], verbose=False)
    with torch.no_grad():  # zero-initialized up-projections would keep the first step's gradients trivial
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and parameter.dim() >= 2 and not parameter.any():
                parameter.normal_(std=0.02)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, IMG, IMG, generator=generator)
    target = torch.randint(0, 5, (BATCH,), generator=generator)
    return model, x, target


def _train(model, forward, x, target, shards=1):
    """STEPS of SGD on the mean over `shards` equal parts of the batch of each part's loss: what
    data parallelism over `shards` processes computes. (The mixture's load-balancing loss is not
    linear in the batch: each process balances its own part, so one process must too.)"""
    optimizer = torch.optim.SGD(param_groups(model, lr=0.5, weight_decay=0.0), momentum=0.9)
    for _ in range(STEPS):
        optimizer.zero_grad()
        for part_x, part_target in zip(x.chunk(shards), target.chunk(shards)):
            loss = nn.functional.cross_entropy(forward(part_x), part_target) + model_aux_loss(model)
            (loss / shards).backward()
        optimizer.step()
    return {name: _full(p).detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _full(parameter):
    # FSDP2 leaves DTensor shards; full_tensor gathers one (every process must call it).
    return parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter


def _worker(rank, world_size, init_file, result_file):
    torch.set_num_threads(1)  # two processes on the machine's cores: no oversubscribed thread pools
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {wrapper: {} for wrapper in WRAPPERS}
        for wrapper in WRAPPERS:
            for kind in KINDS:
                model, x, target = _model_and_batch(kind)
                if wrapper == "ddp":
                    forward = nn.parallel.DistributedDataParallel(model)
                else:
                    from torch.distributed.device_mesh import init_device_mesh
                    from torch.distributed.fsdp import fully_shard

                    mesh = init_device_mesh("cpu", (world_size,))
                    for block in model.blocks:
                        fully_shard(block, mesh=mesh)
                    forward = fully_shard(model, mesh=mesh)
                shard = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
                results[wrapper][kind] = _train(model, forward, x[shard], target[shard])
        if rank == 0:
            torch.save(results, result_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one_for_every_kind(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the gloo CPU test covers the wiring; the kernels' CUDA path is tested elsewhere")
    result_file = str(tmp_path / "distributed.pt")
    # One spawn for both wrappers. Children inherit os.environ, TRITON_INTERPRET included: they
    # run the same kernels.
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), result_file), nprocs=2, join=True)
    distributed = torch.load(result_file)
    assert sorted(distributed) == sorted(WRAPPERS)
    for wrapper in WRAPPERS:
        assert sorted(distributed[wrapper]) == sorted(KINDS), wrapper
    for kind in KINDS:
        model, x, target = _model_and_batch(kind)
        single = _train(model, model, x, target, shards=2)
        for wrapper in WRAPPERS:
            assert distributed[wrapper][kind].keys() == single.keys() and len(single) > 0, (wrapper, kind)
            trained = distributed[wrapper][kind]
            for name, weight in single.items():
                assert torch.allclose(trained[name], weight, rtol=1e-4, atol=1e-6), (wrapper, kind, name)
        start, _, _ = _model_and_batch(kind)
        moved = [n for n, p in start.named_parameters() if p.requires_grad and not torch.equal(p, single[n])]
        assert len(moved) == len(single), (kind, "training left some trainable tensors as they were")
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
