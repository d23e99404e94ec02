"""Multi-LoRA batches: task_routing over LoRA adapters runs each image with its own task's A and B
in every target linear, the base GEMM once for the batch and every task's branch in one
routed_adapter launch per linear. Checked against each image run alone with its adapter active
(set_adapter), in float64 (the reference) and in the interpreter (fp32, fp16 autocast), for the
forward, the gradients, the heads, merged adapters, dropout and the refusals."""

import pytest
import timm
import torch

from fused_adapters.adapters import (
    AdapterConfig,
    LoraConfig,
    adapter_configs,
    active_adapter,
    disable_adapters,
    inject,
    merge_adapters,
    merged_adapter,
    set_adapter,
    task_routing,
)
from fused_adapters.adapters.lora import TARGETS, LoraLinear
from helpers import DEVICE, LaunchCounter

IMG = 32
PROJ = ("proj",)
TASKS = {  # one rank and targets; alpha, rsLoRA and heads differ
    "cars": dict(alpha=8.0),
    "birds": dict(alpha=3.0, use_rslora=True),
    "dogs": dict(alpha=16.0, train_head=False),
}


def vit(seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=IMG, **kwargs).to(DEVICE)


def images(batch, seed=1, dtype=torch.float32):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def lora_tasks(targets=PROJ, rank=4, dtype=torch.float32, tasks=TASKS):
    """A ViT with one LoRA adapter per task, A, B and own heads random (B is zero at init)."""
    model = vit().to(dtype)
    generator = torch.Generator().manual_seed(5)
    for name, fields in tasks.items():
        inject(model, LoraConfig(rank=rank, targets=targets, **fields), name=name, verbose=False)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:  # this adapter's branches and own head
                    noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.2
                    parameter.add_(noise.to(parameter.device, parameter.dtype))
    return model.eval()


def alone(model, names, x, **autocast):
    """Each image run alone with its own adapter active, concatenated."""
    rows = []
    for index, name in enumerate(names):
        set_adapter(model, name)
        with torch.no_grad(), torch.autocast("cpu", **autocast) if autocast else _nothing():
            rows.append(model(x[index:index + 1]))
    return torch.cat(rows)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


NAMES = ["birds", "cars", "dogs", "cars", "birds"]


@pytest.mark.parametrize("targets", [pytest.param(PROJ, id="proj"),
                                     pytest.param(TARGETS, id="all_targets")])
def test_each_image_gets_its_own_lora_float64(targets):
    model = lora_tasks(targets, dtype=torch.float64)
    x = images(len(NAMES), dtype=torch.float64)
    want = alone(model, NAMES, x)
    with torch.no_grad(), task_routing(model, NAMES):
        mixed = model(x)
    torch.testing.assert_close(mixed, want, rtol=1e-12, atol=1e-12)
    assert active_adapter(model) == "birds"  # set last by alone(); the block leaves it so


@pytest.mark.parametrize("targets", [pytest.param(PROJ, id="proj"),
                                     pytest.param(TARGETS, id="all_targets", marks=pytest.mark.slow)])
def test_each_image_gets_its_own_lora_in_the_kernels(targets):
    model = lora_tasks(targets)
    x = images(len(NAMES))
    want = alone(model, NAMES, x)
    with torch.no_grad(), task_routing(model, NAMES):
        mixed = model(x)
    torch.testing.assert_close(mixed, want, rtol=2e-5, atol=2e-5)


def test_fp16_autocast_matches_each_image_alone():
    model = lora_tasks(TARGETS)
    x = images(3)
    names = ["dogs", "cars", "birds"]
    want = alone(model, names, x, dtype=torch.float16)
    exact = alone(model, names, x.double().float())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16), task_routing(model, names):
        mixed = model(x)
    assert mixed.dtype == want.dtype
    # Both run fp16 GEMMs; they may round differently (one scale per row, the stacked dot), never
    # by more than fp16 rounding of the float32 result.
    bound = 4 * (want.float() - exact).abs().max().item() + 1e-3
    assert (mixed.float() - want.float()).abs().max().item() <= bound


def test_one_branch_launch_per_linear(monkeypatch):
    model = lora_tasks(TARGETS)
    x = images(4)
    linears = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(linears) == 4 * len(model.blocks)
    with LaunchCounter().patch(monkeypatch) as launches, torch.no_grad(), \
            task_routing(model, ["cars", "dogs", "birds", "cars"]):
        model(x)
    assert launches.names == ["_sparse_forward_kernel"] * len(linears)  # 3 tasks, one launch each linear


def test_gradients_reach_each_tasks_own_branches_and_match_alone():
    model = lora_tasks(TARGETS, dtype=torch.float64)
    x = images(3, dtype=torch.float64)
    names = ["cars", "birds", "cars"]
    model.train()
    trained = {name: {key: p for key, p in model.named_parameters() if f".lora.{name}." in key
                      or key.startswith(f"adapter_modules.{name}.")} for name in TASKS}

    want = {}
    for index, name in enumerate(names):  # the sum over images of each image's gradient alone
        set_adapter(model, name)
        model.zero_grad(set_to_none=True)
        (model(x[index:index + 1]) * (index + 1)).sum().backward()
        for key, parameter in trained[name].items():
            want[key] = want.get(key, 0) + parameter.grad
    set_adapter(model, "dogs")
    model.zero_grad(set_to_none=True)
    with task_routing(model, names):
        weights = torch.arange(1, 4, dtype=torch.float64).reshape(3, 1)
        (model(x) * weights).sum().backward()
    for key, expected in want.items():
        torch.testing.assert_close(model.get_parameter(key).grad, expected, rtol=1e-10, atol=1e-12, msg=key)
    for key, parameter in trained["dogs"].items():  # no image of dogs: nothing reaches it
        assert parameter.grad is None or not parameter.grad.any(), key
    assert all(p.grad is None for key, p in model.named_parameters() if ".lora." not in key
               and not key.startswith("adapter_modules."))  # the backbone stays frozen
    assert not any(p.requires_grad for key, p in trained["cars"].items())  # flags restored: dogs active


def test_merged_adapter_routes_from_the_original_weights():
    model = lora_tasks(TARGETS, dtype=torch.float64)
    x = images(3, dtype=torch.float64)
    names = ["cars", "dogs", "birds"]
    want = alone(model, names, x)
    merge_adapters(model, "cars")
    with torch.no_grad(), task_routing(model, names):
        mixed = model(x)
    torch.testing.assert_close(mixed, want, rtol=1e-12, atol=1e-12)
    assert merged_adapter(model) == "cars"  # still merged after the block


def test_dropout_only_on_its_own_tasks_rows():
    tasks = {"plain": dict(alpha=8.0), "dropped": dict(alpha=8.0, dropout=0.5)}
    model = lora_tasks(PROJ, dtype=torch.float64, tasks=tasks)
    x = images(4, dtype=torch.float64)
    names = ["plain", "dropped", "plain", "dropped"]
    with torch.no_grad(), task_routing(model, names):
        evaluated = model(x)
        model.train()
        torch.manual_seed(0)
        trained = model(x)
    plain = torch.tensor([name == "plain" for name in names])
    torch.testing.assert_close(trained[plain], evaluated[plain], rtol=1e-12, atol=1e-12)
    assert (trained[~plain] - evaluated[~plain]).abs().max() > 1e-6  # its branch input was dropped


def test_refuses_loras_of_other_rank_or_targets_and_mixed_kinds():
    model = lora_tasks(PROJ, tasks={"a": {}})
    inject(model, LoraConfig(rank=8, targets=PROJ), name="wide", verbose=False)
    inject(model, LoraConfig(rank=4, targets=("qkv",)), name="qkv", verbose=False)
    inject(model, AdapterConfig(), name="bottleneck", verbose=False)
    before = adapter_configs(model)
    x = images(2)
    for other, message in (("wide", "one rank: 'a' has 4, 'wide' has 8"),
                           ("qkv", r"one targets: 'a' has \('proj',\), 'qkv' has \('qkv',\)"),
                           ("bottleneck", "one kind: 'a' is a LoRA adapter, 'bottleneck' is")):
        with pytest.raises(ValueError, match=message):
            with task_routing(model, ["a", other]):
                model(x)
    assert adapter_configs(model) == before


def test_batch_of_another_size_is_refused():
    model = lora_tasks(PROJ)
    with torch.no_grad(), task_routing(model, ["cars", "dogs"]):
        with pytest.raises(ValueError, match="given 2 task names"):
            model(images(3))


def test_the_active_adapter_runs_again_after_the_block():
    # After the block the active adapter runs again, and disable_adapters still gives the backbone.
    model = lora_tasks(PROJ)
    x = images(2)
    set_adapter(model, "cars")
    with torch.no_grad():
        before = model(x)
        with task_routing(model, ["dogs", "birds"]):
            model(x)
        assert torch.equal(model(x), before)
        with disable_adapters(model):
            bare = model(x)
    assert not torch.equal(bare, before)


def _set_fused(model, fused: bool) -> None:
    for module in model.modules():
        if isinstance(module, LoraLinear):
            for branch in module.lora.values():
                branch.fused = fused


def test_shared_dropout_runs_inside_the_routed_launch(monkeypatch):
    # Tasks of one rate: the branch input's mask is drawn inside the routed launch (one launch per
    # adapted linear, as without dropout, and no x-sized mask in PyTorch); the reference path
    # draws the same seed from the same state, so it gives the same masks.
    tasks = {"cars": dict(alpha=8.0, dropout=0.3), "birds": dict(alpha=3.0, dropout=0.3)}
    model = lora_tasks(PROJ, tasks=tasks).train()
    x = images(4)
    names = ["cars", "birds", "birds", "cars"]
    with torch.no_grad(), task_routing(model, names):
        with LaunchCounter().patch(monkeypatch) as launches:
            torch.manual_seed(0)
            fused = model(x)
        assert launches.names.count("_sparse_forward_kernel") == len(model.blocks)
        _set_fused(model, False)
        torch.manual_seed(0)
        unfused = model(x)
        torch.manual_seed(1)
        other = model(x)
        model.eval()
        evaluated = model(x)
    assert (fused - unfused).abs().max() < 1e-4
    assert (fused - other).abs().max() > 1e-4 and (fused - evaluated).abs().max() > 1e-4
