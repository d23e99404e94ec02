"""Training under DistributedDataParallel: two CPU processes (gloo) on two halves of a batch give
the same adapter weights as one process on the whole batch."""

import os

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fused_adapters.adapters import AdapterConfig, inject, param_groups

STEPS, BATCH, IMG = 3, 4, 32


def _model_and_batch():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=IMG)
    inject(model, AdapterConfig(drop_path=0.0), verbose=False)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, IMG, IMG, generator=generator)
    target = torch.randint(0, 5, (BATCH,), generator=generator)
    return model, x, target


def _train(model, forward, x, target):
    optimizer = torch.optim.SGD(param_groups(model, lr=0.5, weight_decay=0.0), momentum=0.9)
    for _ in range(STEPS):
        loss = nn.functional.cross_entropy(forward(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _worker(rank, world_size, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model, x, target = _model_and_batch()
        ddp = nn.parallel.DistributedDataParallel(model)
        shard = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
        weights = _train(model, ddp, x[shard], target[shard])
        if rank == 0:
            torch.save(weights, result_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the gloo CPU test covers the wiring; the kernels' CUDA path is tested elsewhere")
    result_file = str(tmp_path / "ddp.pt")
    # Children inherit os.environ, TRITON_INTERPRET included: they run the same kernels.
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), result_file), nprocs=2, join=True)
    distributed = torch.load(result_file)
    model, x, target = _model_and_batch()
    single = _train(model, model, x, target)
    assert distributed.keys() == single.keys() and len(single) > 0
    for name, weight in single.items():
        assert torch.allclose(distributed[name], weight, rtol=1e-4, atol=1e-6), name
    start, _, _ = _model_and_batch()
    moved = [n for n, p in start.named_parameters() if p.requires_grad and not torch.equal(p, single[n])]
    assert moved, "training changed nothing: the comparison would be vacuous"
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
