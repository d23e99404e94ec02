"""Each named adapter owns its classifier head (train_head) and, with train_norms, the backbone's
LayerNorms: training one adapter leaves the others' outputs alone, set_adapter switches the
copies, disable_adapters runs the originals, save/load carry them, task_routing classifies each
image with its own task's head; inject's summary names the kernel path."""

import copy

import pytest
import timm
import torch
from torch import nn

from fused_adapters.adapters import (
    AdapterConfig,
    disable_adapters,
    inject,
    load_adapters,
    param_groups,
    save_adapters,
    set_adapter,
    task_routing,
)
from helpers import DEVICE

IMG = 32


def vit(seed=0, num_classes=5, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, num_classes=num_classes, img_size=IMG,
                             **kwargs).to(DEVICE)


def images(batch=3, seed=1):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def two_tasks(**config):
    model = vit()
    pristine = copy.deepcopy(model).eval()
    for name in ("taskA", "taskB"):
        inject(model, AdapterConfig(drop_path=0.0, **config), name=name, verbose=False)
    return model, pristine


def perturb(modules, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for parameter in module.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter) * 0.2)


def train_step(model, x, lr=0.5):
    optimizer = torch.optim.SGD(param_groups(model, lr=lr, weight_decay=0.0))
    loss = model(x).logsumexp(-1).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def outputs(model, name, x):
    set_adapter(model, name)
    model.eval()
    with torch.no_grad():
        return model(x)


def test_training_one_adapter_leaves_the_other_alone():
    model, _ = two_tasks()
    x = images()
    before_b = outputs(model, "taskB", x)
    set_adapter(model, "taskA")
    head_a = model.get_classifier()
    assert head_a.weight.requires_grad
    model.train()
    train_step(model, x)
    assert torch.equal(outputs(model, "taskB", x), before_b)
    assert model.get_classifier() is not head_a  # taskB's own copy sits at model.head now
    set_adapter(model, "taskA")
    assert model.get_classifier() is head_a
    assert not torch.allclose(outputs(model, "taskA", x), before_b, atol=1e-4)


def test_only_the_active_adapters_head_trains():
    model, _ = two_tasks()
    set_adapter(model, "taskB")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "head.weight" in trainable and "head.bias" in trainable
    assert all(".taskB." in name or name.startswith("head.") for name in trainable), trainable
    # The other adapter's head and the original are frozen, and the active head is taskB's own.
    assert not model.adapter_modules["taskA"]["head"].weight.requires_grad
    assert not model.base_modules["head"].weight.requires_grad
    assert model.head is model.adapter_modules["taskB"]["head"]


def test_disable_adapters_runs_the_original_head():
    model, pristine = two_tasks()
    x = images()
    perturb([model.adapter_modules["taskA"], model.adapter_modules["taskB"]], seed=5)
    for name in ("taskA", "taskB"):
        set_adapter(model, name)
        model.eval()
        with torch.no_grad(), disable_adapters(model):
            assert model.head is model.base_modules["head"]
            assert torch.equal(model(x), pristine(x))
        assert model.head is model.adapter_modules[name]["head"]


def test_state_dict_keeps_the_usual_keys():
    model, _ = two_tasks()
    perturb([model.adapter_modules["taskA"]], seed=6)
    set_adapter(model, "taskA")
    state = model.state_dict()
    assert torch.equal(state["head.weight"], model.adapter_modules["taskA"]["head"].weight)
    fresh = vit(seed=1)
    missing, _ = fresh.load_state_dict(state, strict=False)
    assert not missing
    assert torch.equal(fresh.head.weight, model.adapter_modules["taskA"]["head"].weight)


def test_save_writes_the_named_adapters_head_and_load_restores_it_into_that_adapter_only(tmp_path):
    model, _ = two_tasks()
    perturb([model.adapter_modules["taskA"], model.adapter_modules["taskB"]], seed=7)
    set_adapter(model, "taskB")  # taskA is not the active one: save_adapters(name=) still saves its head
    save_adapters(model, tmp_path / "a", name="taskA")
    x = images()
    want_a = outputs(model, "taskA", x)

    other, _ = two_tasks()
    perturb([other.adapter_modules["taskB"]], seed=8)
    other_b_head = other.adapter_modules["taskB"]["head"].weight.clone()
    load_adapters(other, tmp_path / "a")
    assert torch.equal(other.adapter_modules["taskA"]["head"].weight, model.adapter_modules["taskA"]["head"].weight)
    assert torch.equal(other.adapter_modules["taskB"]["head"].weight, other_b_head)
    assert torch.equal(other.base_modules["head"].weight, vit().head.weight)  # the original untouched
    assert torch.equal(outputs(other, "taskA", x), want_a)


def test_an_adapter_without_train_head_uses_the_frozen_original():
    model = vit()
    inject(model, AdapterConfig(drop_path=0.0), name="own", verbose=False)
    inject(model, AdapterConfig(drop_path=0.0, train_head=False), name="shared", verbose=False)
    assert model.head is model.base_modules["head"] and not model.head.weight.requires_grad
    assert "shared" not in model.adapter_modules
    set_adapter(model, "own")
    assert model.head is model.adapter_modules["own"]["head"] and model.head.weight.requires_grad


def test_a_headless_model_owns_nothing(tmp_path):
    model = vit(num_classes=0)
    inject(model, AdapterConfig(), verbose=False)
    assert not hasattr(model, "adapter_modules")
    save_adapters(model, tmp_path)
    load_adapters(vit(num_classes=0), tmp_path)


def test_task_routing_classifies_each_image_with_its_own_head():
    model, _ = two_tasks()
    perturb([model.adapter_modules["taskA"], model.adapter_modules["taskB"]], seed=9)
    perturb([m for b in model.blocks for m in b.adapters.values()], seed=10)
    x = images(4)
    names = ["taskB", "taskA", "taskA", "taskB"]
    want = torch.cat([outputs(model, name, x[i:i + 1]) for i, name in enumerate(names)])
    active_head = model.head
    with torch.no_grad(), task_routing(model, names):
        mixed = model(x)
    torch.testing.assert_close(mixed, want, atol=1e-5, rtol=1e-5)
    assert model.head is active_head  # restored


def test_task_routing_trains_each_tasks_own_head():
    model, _ = two_tasks()
    set_adapter(model, "taskA")
    model.train()
    x = images(3)
    with task_routing(model, ["taskA", "taskB", "taskB"]):
        model(x)[0].sum().backward()  # only image 0 (taskA) reaches the loss
    head_a, head_b = model.adapter_modules["taskA"]["head"], model.adapter_modules["taskB"]["head"]
    assert head_a.weight.grad is not None and head_a.weight.grad.abs().sum() > 0
    assert head_b.weight.grad is None or head_b.weight.grad.abs().sum() == 0
    assert model.base_modules["head"].weight.grad is None
    assert not head_b.weight.requires_grad  # flags restored: taskA is the active adapter


def test_task_routing_needs_heads_of_one_shape():
    model, _ = two_tasks()
    model.adapter_modules["taskB"]["head"] = nn.Linear(model.head.in_features, 7).to(DEVICE)
    with torch.no_grad(), task_routing(model, ["taskA", "taskB"]):
        with pytest.raises(ValueError, match="own task's head"):
            model(images(2))


# -------------------------------------------------------------------------------------------
# train_norms: the backbone's LayerNorms train too, one copy per adapter
# -------------------------------------------------------------------------------------------

def norms(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) and ".adapters." not in n
            and not n.startswith(("adapter_modules", "base_modules"))}


def test_train_norms_owns_every_backbone_layernorm(tmp_path):
    model, pristine = two_tasks(train_norms=True)
    set_adapter(model, "taskA")
    paths = set(norms(pristine))
    assert paths and set(norms(model)) == paths
    trainable = {name.rsplit(".", 1)[0] for name, p in model.named_parameters() if p.requires_grad}
    assert paths <= trainable
    assert all(model.get_submodule(p) is model.adapter_modules["taskA"][p.replace(".", "__")] for p in paths)
    x = images()
    before_b = outputs(model, "taskB", x)
    set_adapter(model, "taskA")
    model.train()
    train_step(model, x)
    assert torch.equal(outputs(model, "taskB", x), before_b)
    with torch.no_grad(), disable_adapters(model):
        assert torch.equal(model(x), pristine(x))

    save_adapters(model, tmp_path, name="taskA")
    want = outputs(model, "taskA", x)
    fresh = vit()
    load_adapters(fresh, tmp_path)
    assert torch.equal(outputs(fresh, "taskA", x), want)


def test_task_routing_with_own_layernorms_matches_each_image_alone():
    model, _ = two_tasks(train_norms=True)
    perturb([model.adapter_modules["taskA"], model.adapter_modules["taskB"]], seed=11)
    x = images(3)
    names = ["taskA", "taskB", "taskA"]
    want = torch.cat([outputs(model, name, x[i:i + 1]) for i, name in enumerate(names)])
    with torch.no_grad(), task_routing(model, names):
        mixed = model(x)
    torch.testing.assert_close(mixed, want, atol=1e-5, rtol=1e-5)


def test_inject_summary_names_the_kernel_path(caplog, capsys):
    # The summary goes to the "fused_adapters" logger (INFO), never to stdout.
    from fused_adapters.kernels import backend

    model = vit()
    with caplog.at_level("INFO", logger="fused_adapters"):
        inject(model, AdapterConfig())
    expected = backend(next(model.parameters()))
    assert expected in ("triton", "interpreter")  # the suite runs the kernels (CUDA or interpreter)
    assert f"kernels: {expected})" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="fused_adapters"):
        inject(model.double(), AdapterConfig(), name="wide")
    assert "kernels: reference)" in caplog.text  # float64 runs the plain-PyTorch reference
    assert capsys.readouterr().out == ""
