"""adapters/ with mixtures of experts and multi-task batches: SparseAdapter against the plain
PyTorch math (token and sample routing, noisy gating, autocast), inject with
AdapterConfig(experts=...), the auxiliary loss, save/load, and task_routing (each image of a
batch through its own named adapter, equal to running it alone). Small timm ViTs; the kernels
run in Triton's interpreter without CUDA."""

import copy

import pytest
import timm
import torch

from fused_adapters.adapters import (
    AdapterConfig,
    BottleneckAdapter,
    SparseAdapter,
    inject,
    load_adapters,
    model_aux_loss,
    save_adapters,
    set_adapter,
    task_routing,
)
from fused_adapters.kernels import reference
from helpers import DEVICE, TOLERANCE, relative_error

IMG = 32  # 2 x 2 patches of 16: a few tokens keep the interpreter quick


def vit(seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=IMG, **kwargs).to(DEVICE)


def images(batch=3, seed=1):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def randomize(model, seed=3):
    """Near-zero inits hide mistakes: visible weights for every adapter and gate."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (BottleneckAdapter, SparseAdapter)):
                for parameter in module.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator).to(parameter) * 0.3)


def sparse_formula(adapter: SparseAdapter, x, residual):
    """The mixture in float64 plain PyTorch, routing computed here (eval mode: no noise, no DropPath)."""
    inputs = (adapter.norm(x) if adapter.norm is not None else x).double()
    experts = [p.double() if p is not None else None for p in (adapter.down_weight, adapter.down_bias,
                                                                adapter.up_weight, adapter.up_bias)]
    scale = adapter.scale.double() if isinstance(adapter.scale, torch.Tensor) else adapter.scale
    gate = (adapter.gate.weight.double(), adapter.gate.bias.double())
    if adapter.routing == "token":
        return reference.sparse_adapter(inputs, *gate, *experts, scale, top_k=adapter.top_k,
                                        activation=adapter.activation, residual=residual.double())
    pooled = inputs[:, 0] if adapter.class_token else inputs.mean(1)
    expert_idx, expert_weight = reference.topk_routing(reference.gate_logits(pooled, *gate), adapter.top_k)
    tokens = x.shape[1]
    return reference.routed_adapter(inputs, expert_idx.repeat_interleave(tokens, 0).reshape(*x.shape[:2], -1),
                                    expert_weight.repeat_interleave(tokens, 0).reshape(*x.shape[:2], -1), *experts,
                                    scale, activation=adapter.activation, residual=residual.double())


@pytest.mark.parametrize("routing, class_token", [("token", True), ("sample", True), ("sample", False)])
@pytest.mark.parametrize("norm", [False, True])
def test_sparse_adapter_matches_the_math(routing, class_token, norm):
    torch.manual_seed(0)
    adapter = SparseAdapter(24, 4, 6, 2, routing=routing, class_token=class_token, norm=norm).to(DEVICE).eval()
    randomize(adapter)
    x = torch.randn(3, 7, 24, device=DEVICE)
    out = adapter(x, residual=x)
    assert relative_error(out, sparse_formula(adapter, x, x)) <= TOLERANCE[torch.float32]
    if routing == "sample":  # every token of an image takes its image's experts
        alone = [adapter(x[b:b + 1], residual=x[b:b + 1]) for b in range(3)]
        torch.testing.assert_close(out, torch.cat(alone))


def test_sparse_adapter_trains_every_parameter_and_records_the_aux_loss():
    torch.manual_seed(0)
    adapter = SparseAdapter(24, 4, 6, 2, noisy_gating=True, drop_path=0.1, aux_loss_weight=0.5).to(DEVICE).train()
    randomize(adapter)
    x = torch.randn(4, 5, 24, device=DEVICE)
    out, aux_loss = adapter(x, residual=x, return_aux_loss=True)
    assert aux_loss is not None and aux_loss.item() > 0
    (out.square().mean() + aux_loss).backward()
    for name, parameter in adapter.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    ema = copy.deepcopy(adapter)  # an EMA copy after a training forward: the loss is not the module's
    assert not hasattr(ema, "aux_loss") and not hasattr(adapter, "aux_loss")
    adapter.eval()
    with torch.no_grad():
        (first, first_loss), second = adapter(x, return_aux_loss=True), adapter(x)
    torch.testing.assert_close(first, second)  # no noise, no DropPath in eval
    assert first_loss is None


def test_sparse_adapter_under_fp16_autocast():
    torch.manual_seed(0)
    adapter = SparseAdapter(32, 4, 4, 2).to(DEVICE).eval()
    randomize(adapter)
    x = torch.randn(2, 9, 32, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        out = adapter(x, residual=x)
    assert out.dtype == torch.float32  # the fp32 residual promotes, as in eager
    assert relative_error(out, sparse_formula(adapter, x, x)) <= TOLERANCE[torch.float16]


def test_fused_and_reference_paths_agree():
    torch.manual_seed(0)
    fused = SparseAdapter(24, 3, 5, 2).to(DEVICE).eval()
    randomize(fused)
    plain = SparseAdapter(24, 3, 5, 2, fused=False).to(DEVICE).eval()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 6, 24, device=DEVICE)
    assert relative_error(fused(x, residual=x), plain(x, residual=x)) <= TOLERANCE[torch.float32]


def test_inject_a_mixture_and_train_with_the_aux_loss(caplog):
    model = vit()
    with caplog.at_level("INFO", logger="fused_adapters"):
        inject(model, AdapterConfig(experts=4, top_k=2, aux_loss_weight=0.1), name="moa")
    assert "4 experts top-2 by token" in caplog.text
    adapters = [m for m in model.modules() if isinstance(m, SparseAdapter)]
    assert len(adapters) == len(model.blocks)
    model.train()
    loss = model(images()).logsumexp(-1).mean()
    aux = model_aux_loss(model)
    assert aux.item() > 0
    (loss + aux).backward()
    assert all(a.gate.weight.grad is not None and a.gate.weight.grad.abs().sum() > 0 for a in adapters)
    model.eval()
    with torch.no_grad():
        model(images())
    assert model_aux_loss(model).item() == 0.0


def test_sample_routing_in_a_vit_routes_whole_images():
    model = vit()
    inject(model, AdapterConfig(experts=4, top_k=1, routing="sample"), name="moa", verbose=False)
    randomize(model)
    model.eval()
    batch = images(3)
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model(batch[b:b + 1]) for b in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_save_and_load_a_mixture(tmp_path):
    model = vit()
    inject(model, AdapterConfig(experts=3, top_k=2, noisy_gating=True), name="moa", verbose=False)
    randomize(model)
    model.eval()
    with torch.no_grad():
        expected = model(images())
    save_adapters(model, tmp_path)
    fresh = vit()
    load_adapters(fresh, tmp_path)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(images()), expected)


@pytest.mark.parametrize("overrides, field", [
    (dict(experts=0), "experts"), (dict(experts=65), "experts"), (dict(experts=4, top_k=5), "top_k"),
    (dict(top_k=0), "top_k"), (dict(routing="image"), "routing"), (dict(aux_loss_weight=-1.0), "aux_loss_weight"),
    (dict(noisy_gating="yes"), "noisy_gating"), (dict(experts=2, dropout=1.0), "dropout"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"AdapterConfig.{field}"):
        AdapterConfig(**overrides)


# --------------------------------------------------------------------------------------------
# Multi-task batches
# --------------------------------------------------------------------------------------------


def multi_task_model(configs):
    model = vit()
    for name, config in configs.items():
        inject(model, config, name=name, verbose=False)
        randomize(model, seed=len(name))
    return model


@pytest.mark.parametrize("position, scaling, norm", [("post", "channel", False),
                                                     pytest.param("houlsby", 0.7, False, marks=pytest.mark.slow),
                                                     pytest.param("pfeiffer", "layer", True, marks=pytest.mark.slow)])
def test_multi_task_batch_equals_each_image_alone(position, scaling, norm):
    config = AdapterConfig(position=position, scaling=scaling, norm=norm)
    model = multi_task_model({"cars": config, "birds": config, "dogs": config})
    model.eval()
    batch = images(4)
    names = ["birds", "cars", "birds", "dogs"]
    with torch.no_grad(), task_routing(model, names):
        together = model(batch)
    alone = []
    with torch.no_grad():
        for b, name in enumerate(names):
            set_adapter(model, name)
            alone.append(model(batch[b:b + 1]))
    assert relative_error(together, torch.cat(alone)) <= 10 * TOLERANCE[torch.float32]
    with torch.no_grad():
        set_adapter(model, "cars")
        one_task = model(batch)
    assert relative_error(one_task, together) > 1e-3  # the tasks' adapters do differ


def test_multi_task_batch_trains_each_images_own_adapter():
    config = AdapterConfig()
    model = multi_task_model({"cars": config, "birds": config, "dogs": config})
    set_adapter(model, "cars")
    model.train()
    with task_routing(model, ["birds", "cars", "birds"]):
        model(images(3)).square().mean().backward()
    block = model.blocks[0]
    for name in ("birds", "cars"):
        assert block.adapters[name]["block"].down.weight.grad is not None, name
    assert block.adapters["dogs"]["block"].down.weight.grad is None  # no image of that task
    # The flags set_adapter chose come back after the block: only "cars" trains.
    assert not block.adapters["birds"]["block"].down.weight.requires_grad
    assert block.adapters["cars"]["block"].down.weight.requires_grad


def test_task_routing_errors():
    model = multi_task_model({"cars": AdapterConfig(), "wide": AdapterConfig(rank=4),
                              "moa": AdapterConfig(experts=2)})
    with pytest.raises(ValueError, match="no adapters named"):
        with task_routing(model, ["cars", "planes"]):
            pass
    with pytest.raises(ValueError, match="one rank"):
        with task_routing(model, ["cars", "wide"]):
            pass
    with pytest.raises(ValueError, match="mixture of experts"):
        with task_routing(model, ["cars", "moa"]):
            pass
    with pytest.raises(ValueError, match="2 task names but the batch has 3 images"):
        with task_routing(model, ["cars", "cars"]):
            model(images(3))
