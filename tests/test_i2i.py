"""I2I (adapters/continual.py) on synthetic continual tasks: two old tasks, each with a bottleneck
adapter trained for a few steps, and a new task built from their classes. i2i_initialize
distills a fusion of the old adapters into the new one (the distillation loss falls), starts
the new task lower than a freshly initialized adapter, never touches the old adapters, and
leaves the model as it was when it fails; evaluate_tasks scores every task with its own adapter.

The models are float64, so every op takes the plain-PyTorch reference path: these tests are
about the training loop, and the reference keeps them fast without a GPU (the kernels' numbers
are tests/test_fusion_adapters.py's)."""

import copy
import dataclasses
import logging

import pytest
import timm
import torch
from torch.nn import functional as F

from fused_adapters.adapters import (
    AdapterConfig,
    I2IResult,
    active_adapter,
    adapter_configs,
    evaluate_tasks,
    i2i_initialize,
    inject,
    param_groups,
    set_adapter,
)
from helpers import DEVICE

IMG, CLASSES, BATCH = 32, 5, 16
DTYPE = torch.float64
OLD = ("t0", "t1")
CONFIG = AdapterConfig(rank=4, drop_path=0.0)


def prototypes(seed: int) -> torch.Tensor:
    """One fixed random image per class: a task's classes."""
    return torch.randn(CLASSES, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def task_batches(classes: torch.Tensor, seed: int, count: int = 4) -> list:
    """`count` batches of noisy class prototypes with their labels (learnable, never the same twice)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        noise = 0.5 * torch.randn(BATCH, 3, IMG, IMG, generator=generator, dtype=DTYPE)
        batches.append(((classes[labels] + noise).to(DEVICE), labels.to(DEVICE)))
    return batches


OLD_CLASSES = {"t0": prototypes(10), "t1": prototypes(11)}
# The new task's classes mix both old tasks' (class c: t0's class c plus t1's class c + 1).
NEW_CLASSES = 0.7 * OLD_CLASSES["t0"] + 0.7 * OLD_CLASSES["t1"].roll(-1, dims=0)
NEW_TRAIN, NEW_HELD_OUT = task_batches(NEW_CLASSES, 20), task_batches(NEW_CLASSES, 21, count=2)


def train(model, data, steps: int, lr: float = 3e-3) -> None:
    optimizer = torch.optim.AdamW(param_groups(model, lr=lr, weight_decay=0.0))
    model.train()
    for step in range(steps):
        images, labels = data[step % len(data)]
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def old_tasks():
    """A tiny ViT with one trained adapter (and head) per old task."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=CLASSES, img_size=IMG).to(DEVICE, DTYPE)
    for seed, name in enumerate(OLD):
        inject(model, CONFIG, name=name, verbose=False)
        train(model, task_batches(OLD_CLASSES[name], seed), steps=20)
    return model.eval()


@pytest.fixture
def model(old_tasks):
    return copy.deepcopy(old_tasks)


def task_loss(model, name, data) -> float:
    set_adapter(model, name)
    with torch.no_grad():
        return sum(F.cross_entropy(model(images), labels).item() for images, labels in data) / len(data)


def old_state(model) -> tuple:
    """The old adapters' parameters and heads, and the old tasks' outputs, as they are now."""
    blocks = model.blocks.state_dict()
    parameters = {name: {k: v.clone() for k, v in blocks.items() if f".{name}." in k} for name in OLD}
    heads = {name: {k: v.clone() for k, v in model.adapter_modules[name].state_dict().items()} for name in OLD}
    images = NEW_HELD_OUT[0][0]
    outputs = {}
    with torch.no_grad():
        for name in OLD:
            set_adapter(model, name)
            outputs[name] = model(images)
    return parameters, heads, outputs


def assert_same(before, after) -> None:
    for part_before, part_after in zip(before, after):
        assert part_before.keys() == part_after.keys()
        for name in part_before:
            value_before, value_after = part_before[name], part_after[name]
            if isinstance(value_before, dict):
                assert all(torch.equal(value_before[k], value_after[k]) for k in value_before)
            else:
                assert torch.equal(value_before, value_after)


@pytest.mark.slow  # 48 optimizer steps of a float64 ViT: about a minute on 2 cores
def test_i2i_starts_the_new_task_lower_than_a_fresh_adapter_and_keeps_the_old_ones(model, caplog):
    before = old_state(model)
    set_adapter(model, "t1")
    model.train()
    with caplog.at_level(logging.INFO, logger="fused_adapters"):
        result = i2i_initialize(model, "new", list(OLD), NEW_TRAIN, fusion_steps=24, distill_steps=24, lr=3e-3)
    assert isinstance(result, I2IResult) and result.name == "new"
    assert len(result.fusion_losses) == 24 and len(result.distill_losses) == 24
    assert result.fusion_losses[-1] < result.fusion_losses[0]
    assert result.distill_losses[-1] < result.distill_losses[0]
    phases = [record.getMessage() for record in caplog.records if record.getMessage().startswith("i2i 'new'")]
    assert len(phases) == 2 and "fusion over ['t0', 't1']" in phases[0] and "distill (outputs)" in phases[1]
    # The new adapter is active and trainable, the fusion gone, the train/eval mode as it was.
    assert active_adapter(model) == "new" and list(adapter_configs(model)) == ["t0", "t1", "new"]
    assert adapter_configs(model)["new"] == CONFIG and model.training
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".new." in name or name.startswith("head.") for name in trainable), trainable
    model.eval()
    assert_same(before, old_state(model))

    # Houlsby-initialized adapters of the same config, measured on the same held-out batches: one
    # with the model's head (a fresh start), one with the head I2I gave the new adapter (so the
    # difference left is the adapter's own).
    inject(model, CONFIG, name="fresh", verbose=False)
    inject(model, CONFIG, name="fresh_same_head", verbose=False)
    model.adapter_modules["fresh_same_head"].load_state_dict(model.adapter_modules["new"].state_dict())
    i2i, fresh = task_loss(model, "new", NEW_HELD_OUT), task_loss(model, "fresh", NEW_HELD_OUT)
    same_head = task_loss(model, "fresh_same_head", NEW_HELD_OUT)
    print(f"\nnew task, held-out cross-entropy at the start: I2I {i2i:.4f}, Houlsby init {fresh:.4f}, Houlsby init "
          f"with the I2I head {same_head:.4f} (fusion {result.fusion_losses[0]:.4f} -> {result.fusion_losses[-1]:.4f}, "
          f"distillation {result.distill_losses[0]:.3e} -> {result.distill_losses[-1]:.3e})")
    assert i2i < same_head < fresh


@pytest.mark.parametrize("distill", ["logits", "both"])
def test_the_logit_distillation_modes_train_too(model, distill):
    before = old_state(model)
    result = i2i_initialize(model, "new", list(OLD), NEW_TRAIN, fusion_steps=4, distill_steps=8, distill=distill,
                            config=dataclasses.replace(CONFIG, rank=8))
    assert result.distill_losses[-1] < result.distill_losses[0]
    assert adapter_configs(model)["new"].rank == 8
    assert_same(before, old_state(model))


def test_a_failure_midway_leaves_the_model_as_it_was(model):
    before = old_state(model)
    set_adapter(model, "t0")
    configs = adapter_configs(model)
    one_pass = iter(NEW_TRAIN)  # fusion_steps > its 4 batches: the second pass finds nothing
    with pytest.raises(ValueError, match="data yielded no batches"):
        i2i_initialize(model, "new", list(OLD), one_pass, fusion_steps=6, distill_steps=2)
    assert adapter_configs(model) == configs and active_adapter(model) == "t0" and not model.training

    class FailsInTheDistillation:
        def __iter__(self):
            yield from NEW_TRAIN[:2]
            raise RuntimeError("the data loader broke")

    with pytest.raises(RuntimeError, match="the data loader broke"):
        i2i_initialize(model, "new", list(OLD), FailsInTheDistillation(), fusion_steps=1, distill_steps=4)
    assert adapter_configs(model) == configs and active_adapter(model) == "t0"
    assert_same(before, old_state(model))


@pytest.mark.parametrize("arguments, message", [
    (dict(new_name="t0"), "already has adapters named 't0'"),
    (dict(from_adapters=["t0", "nope"]), "names 'nope', which the model does not have"),
    (dict(from_adapters="t0"), "from_adapters must be a list"),
    (dict(fusion_steps=-1), "fusion_steps must be an int >= 0"),
    (dict(distill="features"), "distill must be one of"),
    (dict(config=AdapterConfig(position="pre")), "config.position must be the fused adapters' position 'post'"),
    (dict(lr=0.0), "lr must be a positive finite float"),
])
def test_bad_arguments_are_refused_before_anything_changes(model, arguments, message):
    set_adapter(model, "t1")
    configs = adapter_configs(model)
    call = dict(new_name="new", from_adapters=list(OLD), fusion_steps=1, distill_steps=1) | arguments
    with pytest.raises(ValueError, match=message):
        i2i_initialize(model, call.pop("new_name"), call.pop("from_adapters"), NEW_TRAIN, **call)
    assert adapter_configs(model) == configs and active_adapter(model) == "t1"


def test_autocast_runs(model):
    model.float()
    result = i2i_initialize(model, "new", list(OLD), NEW_TRAIN, fusion_steps=2, distill_steps=2,
                            autocast=torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(result.fusion_losses + result.distill_losses)))


def test_evaluate_tasks_scores_each_task_with_its_own_adapter(model):
    tasks = {name: task_batches(OLD_CLASSES[name], seed) for seed, name in enumerate(OLD)}
    set_adapter(model, "t1")
    model.train()
    accuracy = evaluate_tasks(model, tasks)
    assert set(accuracy) == set(OLD) and all(0.0 <= value <= 1.0 for value in accuracy.values())
    assert active_adapter(model) == "t1" and model.training
    # Trained for a few steps, each old task is better than chance with its own adapter.
    assert all(value > 1 / CLASSES for value in accuracy.values()), accuracy
    losses = evaluate_tasks(model, tasks, metric=lambda logits, labels: F.cross_entropy(logits, labels).item())
    model.eval()
    assert losses["t0"] == pytest.approx(task_loss(model, "t0", tasks["t0"]))
    with pytest.raises(ValueError, match=r"tasks names adapters \['t9'\]"):
        evaluate_tasks(model, {"t9": tasks["t0"]})


def test_training_the_new_task_leaves_the_old_tasks_bit_for_bit(model):
    """The continual-learning loop after I2I: the new adapter trains on its task as any adapter
    does (set_adapter freezes the others), and every old task keeps its parameters, its head and
    its outputs exactly."""
    before = old_state(model)
    i2i_initialize(model, "new", list(OLD), NEW_TRAIN, fusion_steps=1, distill_steps=1)
    new_before = {k: v.clone() for k, v in model.blocks.state_dict().items() if ".new." in k}
    train(model, NEW_TRAIN, steps=3)
    new_after = {k: v for k, v in model.blocks.state_dict().items() if ".new." in k}
    assert any(not torch.equal(new_before[k], new_after[k]) for k in new_before)  # the new task did train
    assert_same(before, old_state(model))
