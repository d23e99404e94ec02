"""adapters/: Adapter+ and the other positions as fused layers in timm ViTs. Small timm models,
pretrained=False, kernels in the interpreter on machines without CUDA."""

import json
import os

import pytest
import timm
import torch
from torch import nn

from fused_adapters.adapters import (
    POSITIONS,
    AdapterConfig,
    BottleneckAdapter,
    adapter_configs,
    adapter_summary,
    disable_adapters,
    inject,
    load_adapters,
    param_groups,
    save_adapters,
    set_adapter,
    trainable_parameters,
)
from fused_adapters.kernels import reference
from helpers import DEVICE, LaunchCounter, relative_error

IMG = 32  # 2 x 2 patches of 16: a few tokens keep the interpreter quick


def vit(name="test_vit", seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("img_size", IMG)
    return timm.create_model(name, pretrained=False, num_classes=5, **kwargs).to(DEVICE)


def images(batch=2, seed=1, size=IMG):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def randomize_adapters(model, seed=3):
    """Houlsby init is ~0: give the adapters weights that change the output visibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BottleneckAdapter):
                for parameter in module.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3 + (
                        1.0 if parameter is module.scale else 0.0))


def adapter_formula(adapter: BottleneckAdapter, x, skip):
    """skip + scale * up(act(down(norm(x)))) in float64 plain PyTorch (no DropPath: eval mode)."""
    inputs = adapter.norm(x) if adapter.norm is not None else x
    params = [p.double() if p is not None else None for p in (adapter.down.weight, adapter.down.bias,
                                                                adapter.up.weight, adapter.up.bias)]
    scale = adapter.scale.double() if isinstance(adapter.scale, torch.Tensor) else adapter.scale
    return reference.bottleneck_adapter(inputs.double(), *params, scale, activation=adapter.activation,
                                        residual=skip.double())


def block_formula(block, x, position, slots):
    """The README's position formulas, written out from the block's own parts."""
    def attn_branch(v):
        return block.drop_path1(block.ls1(block.attn(block.norm1(v))))

    def mlp_branch(v):
        return block.drop_path2(block.ls2(block.mlp(block.norm2(v))))

    A = slots["block"]
    if position in ("post", "pfeiffer"):
        x = x + attn_branch(x)
        x = x + mlp_branch(x)
        return adapter_formula(A, x, x)
    if position == "pre":
        x = x + attn_branch(x)
        x = adapter_formula(A, x, x).float()
        return x + mlp_branch(x)
    if position == "intermediate":
        x = x + attn_branch(x)
        y = mlp_branch(x)
        return adapter_formula(A, y, x + y)
    if position == "houlsby":
        y = attn_branch(x)
        x = adapter_formula(slots["attn"], y, x + y).float()
        y = mlp_branch(x)
        return adapter_formula(A, y, x + y)
    y = x + attn_branch(x)  # parallel
    z = y + mlp_branch(y)
    return adapter_formula(A, y, z)


PRESETS = {
    "post": AdapterConfig(),
    "pre": AdapterConfig(position="pre"),
    "intermediate": AdapterConfig(position="intermediate", scaling="layer"),
    "parallel": AdapterConfig.parallel(activation="silu"),
    "pfeiffer": AdapterConfig.pfeiffer(),
    "houlsby": AdapterConfig.houlsby(bias=False),
}


@pytest.mark.parametrize("model_name", ["test_vit", "test_vit2"])  # test_vit2: LayerScale in the branches
@pytest.mark.parametrize("position", POSITIONS)
def test_every_position_matches_its_formula(position, model_name):
    model = inject(vit(model_name), PRESETS[position], verbose=False).eval()
    randomize_adapters(model)
    x = torch.randn(2, 5, model.embed_dim, device=DEVICE)
    for block in model.blocks:
        out = block(x)
        expected = block_formula(block, x, position, block.adapters["default"])
        assert relative_error(out, expected) < 1e-5, position
        x = out.detach()


@pytest.mark.parametrize("name", ["test_vit", "test_vit2", "test_vit3", "deit3_small_patch16_224",
                                  "deit_tiny_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_model_variants(name):
    # class token or not, register tokens, LayerScale (deit3, dinov2, test_vit2/3), map pooling
    # (test_vit3), patch 14 (dinov2). Real architectures cut to 2 blocks to keep the interpreter quick.
    kwargs = {} if name.startswith("test_vit") else {"depth": 2}
    if "patch14" in name:
        kwargs["img_size"] = 28
    model = vit(name, **kwargs)
    x = images(size=kwargs.get("img_size", IMG))
    with torch.no_grad():
        bare = model(x)
    inject(model, AdapterConfig(), verbose=False)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), bare, atol=1e-2)  # Houlsby init: near identity
        randomize_adapters(model)
        adapted = model(x)
        with disable_adapters(model):
            assert torch.allclose(model(x), bare, atol=1e-6)
    assert not torch.allclose(adapted, bare, atol=1e-3)


def test_fused_path_matches_reference_path_with_drop_path():
    model = inject(vit(), AdapterConfig(drop_path=0.5), verbose=False).train()
    randomize_adapters(model)
    results = []
    for fused in (True, False):
        for module in model.modules():
            if isinstance(module, BottleneckAdapter):
                module.fused = fused
        model.zero_grad()
        torch.manual_seed(123)  # the same DropPath masks on both paths
        out = model(images(batch=4))
        out.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((out.detach(), grads))
    (out_fused, grads_fused), (out_ref, grads_ref) = results
    assert relative_error(out_fused, out_ref) < 1e-5
    for a, b in zip(grads_fused, grads_ref):
        assert relative_error(a, b) < 1e-4


def test_drop_path_is_per_sample_over_keep_prob():
    adapter = BottleneckAdapter(16, 4, drop_path=0.5).train()
    with torch.no_grad():
        adapter.up.weight.normal_()
    x = torch.randn(6, 3, 16, device=DEVICE)
    adapter.to(DEVICE)
    torch.manual_seed(0)
    with torch.no_grad():
        trained = adapter(x, residual=torch.zeros_like(x))
        plain = adapter.eval()(x, residual=torch.zeros_like(x))
    ratios = set()
    for sample in range(6):  # every token of a sample is kept (x 1/keep) or dropped together
        ratio = (trained[sample] / plain[sample]).flatten()
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), atol=1e-4)
        ratios.add(round(float(ratio[0]), 3))
    assert ratios <= {0.0, 2.0} and len(ratios) == 2
    empty = torch.randn(0, 3, 16, device=DEVICE)
    assert adapter.train()(empty, residual=empty).shape == (0, 3, 16)


def test_freezing_and_counts():
    model = inject(vit(), AdapterConfig(), verbose=False)
    head = set(id(p) for p in model.get_classifier().parameters())
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (".adapters." in name or id(parameter) in head), name
    model(images()).sum().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == parameter.requires_grad, name
    frozen_head = inject(vit(), AdapterConfig(train_head=False), verbose=False)
    assert not any(p.requires_grad for p in frozen_head.get_classifier().parameters())


def test_vit_base_adapter_plus_count(caplog):
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    with caplog.at_level("INFO", logger="fused_adapters"):
        inject(model, AdapterConfig())
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".adapters." in n and p.requires_grad)
    assert adapters == 12 * (2 * 768 * 8 + 8 + 768 + 768) == 165_984
    trainable, _ = trainable_parameters(model)
    assert trainable == 165_984 + 768 * 10 + 10
    assert "trainable params 173,674" in caplog.text
    assert "(165,984 adapter + 7,690 head)" in caplog.text  # what the count is made of
    inject(model, AdapterConfig.houlsby(), name="houlsby", verbose=False)
    assert adapter_summary(model).endswith("(313,536 adapter + 7,690 head + 38,400 LayerNorm)")


@pytest.mark.slow
def test_adamw_steps_lower_the_loss():
    model = inject(vit(), AdapterConfig(drop_path=0.0), verbose=False).train()
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-2, weight_decay=0.05))
    x, target = images(batch=4), torch.tensor([0, 1, 2, 3], device=DEVICE)
    losses = []
    for _ in range(6):
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses


def test_param_groups_decay_only_matrices():
    model = inject(vit(), AdapterConfig(), verbose=False)
    decay, no_decay = param_groups(model, lr=1e-3, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)


def test_save_load_round_trip(tmp_path):
    model = inject(vit(), AdapterConfig(scaling="layer"), verbose=False).eval()
    randomize_adapters(model)
    with torch.no_grad():
        model.get_classifier().weight.add_(1.0)  # a trained head travels too
    folder = save_adapters(model, tmp_path / "out")
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["config"]["scaling"] == "layer" and saved["name"] == "default"
    fresh = vit()  # same seed: the same backbone
    load_adapters(fresh, folder)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(images()), model(images()))


@pytest.mark.parametrize("scaling", [0.5, None, "layer"])
def test_round_trip_scalings_and_distilled_heads(scaling, tmp_path):
    model = inject(vit("deit_tiny_distilled_patch16_224", depth=2), AdapterConfig(scaling=scaling),
                   verbose=False).eval()
    assert model.head.weight.requires_grad and model.head_dist.weight.requires_grad  # both heads train
    randomize_adapters(model)
    with torch.no_grad():
        model.head_dist.weight.add_(1.0)
    folder = save_adapters(model, tmp_path / "out")
    fresh = vit("deit_tiny_distilled_patch16_224", depth=2)
    load_adapters(fresh, folder)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images()), model(images()))
    assert adapter_configs(fresh)["default"] == adapter_configs(model)["default"]


@pytest.mark.slow
def test_whole_model_pickles_into_a_fresh_process(tmp_path):
    import subprocess
    import sys

    model = inject(vit(), AdapterConfig(position="parallel"), verbose=False).eval()
    randomize_adapters(model)
    with torch.no_grad():
        expected = model(images())
    torch.save(model, tmp_path / "model.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = (
        "import sys, torch; sys.path.insert(0, %r)\n"  # unpickling imports fused_adapters itself
        "from test_adapters import images\n"
        "model = torch.load(%r, weights_only=False)\n"
        "expected = torch.load(%r)\n"
        "with torch.no_grad(): assert torch.equal(model(images()), expected)\n"
        "print('ok', type(model.blocks[0]).__name__)\n"
    ) % (os.path.dirname(__file__), str(tmp_path / "model.pt"), str(tmp_path / "expected.pt"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok AdaptedBlock" in result.stdout, result.stderr[-2000:]
    import copy

    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(images()), expected)


def test_config_is_frozen_and_checked_on_load(tmp_path):
    import dataclasses

    config = AdapterConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.position = "pre"
    model = inject(vit(), AdapterConfig(position="pre"), verbose=False)
    folder = save_adapters(model, tmp_path / "out")
    other = inject(vit(), AdapterConfig(), verbose=False)  # "default" exists, built as "post"
    with pytest.raises(ValueError, match="were built from"):
        load_adapters(other, folder)
    load_adapters(other, folder, name="from_disk")  # under another name it is injected fresh
    assert adapter_configs(other)["from_disk"].position == "pre"


def test_load_errors(tmp_path):
    model = inject(vit(), AdapterConfig(), verbose=False)
    folder = save_adapters(model, tmp_path / "out")
    with pytest.raises(ValueError, match="depth"):
        load_adapters(vit(depth=3), folder)
    with pytest.raises(ValueError, match="dim"):
        load_adapters(vit(embed_dim=32), folder)
    with pytest.raises(ValueError, match="num_classes=5"):
        torch.manual_seed(0)
        load_adapters(timm.create_model("test_vit", pretrained=False, num_classes=7, img_size=IMG), folder)
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    state["blocks.0.block.extra"] = torch.zeros(1)
    save_file(state, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensors"):
        load_adapters(vit(), folder)
    del state["blocks.0.block.extra"], state["blocks.1.block.up.bias"]
    save_file(state, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="missing tensors"):
        load_adapters(vit(), folder)
    with pytest.raises(FileNotFoundError):
        load_adapters(vit(), tmp_path / "nowhere")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    model = inject(vit(), AdapterConfig(), verbose=False)
    folder = save_adapters(model, tmp_path / "out")
    before = (folder / "adapter_model.safetensors").read_bytes()
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(model, folder)
    assert (folder / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_named_adapters_switch_and_disable():
    model = vit()
    with torch.no_grad():
        bare = model.eval()(images())
    inject(model, AdapterConfig(), verbose=False)
    inject(model, AdapterConfig.houlsby(), name="taskB", verbose=False)
    assert sorted(adapter_configs(model)) == ["default", "taskB"]
    randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        out_b = model(images())
        # houlsby() trains the backbone's LayerNorms too (train_norms): taskB's own copies sit at their paths.
        own_norm = [isinstance(model.get_submodule(n.rpartition(".")[0]), nn.LayerNorm) and ".adapters." not in n
                    and not n.startswith(("adapter_modules.", "base_modules.")) for n, _ in model.named_parameters()]
        assert any(own_norm)
        assert all(p.requires_grad == (".taskB." in n or n.startswith("head") or own)
                   for (n, p), own in zip(model.named_parameters(), own_norm))
        set_adapter(model, "default")
        assert all(p.requires_grad == (".default." in n or n.startswith("head")) for n, p in model.named_parameters())
        out_default = model(images())
        with disable_adapters(model):
            assert torch.allclose(model(images()), bare, atol=1e-6)
        assert torch.equal(model(images()), out_default)
    assert not torch.allclose(out_b, out_default, atol=1e-3)
    houlsby = [m for m in model.blocks[0].adapters["taskB"].values()]
    assert len(houlsby) == 2  # attention-branch adapter first, then the MLP one
    with pytest.raises(ValueError, match="already has adapters named"):
        inject(model, AdapterConfig(), name="taskB", verbose=False)
    with pytest.raises(ValueError, match="no adapters named"):
        set_adapter(model, "nope")


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = inject(vit(), AdapterConfig(drop_path=0.0), verbose=False)
        randomize_adapters(model)
        model.set_grad_checkpointing(checkpointing)
        model(images()).square().sum().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        assert relative_error(a, b) < 1e-5


def test_dropout_runs_inside_the_fused_op(monkeypatch):
    model = inject(vit(), AdapterConfig(dropout=0.5, drop_path=0.1), verbose=False).train()
    randomize_adapters(model)
    with LaunchCounter().patch(monkeypatch) as launches:
        torch.manual_seed(3)
        out = model(images())
    # One forward launch per block, as without dropout; no plain-PyTorch bottleneck.
    assert launches.names.count("_bottleneck_forward_kernel") == len(model.blocks)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # The reference path draws the same DropPath masks and dropout seeds from the same state.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BottleneckAdapter):
                module.fused = False
        torch.manual_seed(3)
        assert relative_error(out, model(images())) < 1e-5
        torch.manual_seed(4)
        assert relative_error(out, model(images())) > 1e-3  # another seed, other masks
        model.eval()  # no dropout at inference
        out = model(images())
        for module in model.modules():
            if isinstance(module, BottleneckAdapter):
                module.fused = True
        assert relative_error(out, model(images())) < 1e-5


@pytest.mark.slow
def test_compile_one_adapted_block_fullgraph():
    torch._dynamo.reset()
    model = inject(vit(), AdapterConfig(), verbose=False).eval()
    randomize_adapters(model)
    block = model.blocks[0]
    x = torch.randn(2, 5, model.embed_dim, device=DEVICE)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        assert relative_error(compiled(x), block(x)) < 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank"),
        ({"position": "middle"}, "position"),
        ({"init": "xavier"}, "init"),
        ({"scaling": "row"}, "scaling"),
        ({"activation": "tanh"}, "activation"),
        ({"drop_path": 1.0}, "drop_path"),
    ],
)
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=f"AdapterConfig.{message}"):
        AdapterConfig(**kwargs)


def test_model_without_timm_blocks():
    with pytest.raises(TypeError, match="blocks"):
        inject(nn.Linear(4, 4), AdapterConfig(), verbose=False)
    model = vit()
    model.blocks[1] = nn.Identity()
    with pytest.raises(TypeError, match=r"blocks\[1\] is torch.nn.modules.linear.Identity"):
        inject(model, AdapterConfig(), verbose=False)


def fused_and_reference(position, seed=0):
    """The same adapted model twice: fused adapters, and adapters that run the plain-PyTorch
    reference (the eager code they replace)."""
    fused = inject(vit(seed=seed), PRESETS[position], verbose=False)
    randomize_adapters(fused)
    reference_model = inject(vit(seed=seed), PRESETS[position], verbose=False)
    reference_model.load_state_dict(fused.state_dict())
    for module in reference_model.modules():
        if isinstance(module, BottleneckAdapter):
            module.fused = False
    return fused, reference_model


@pytest.mark.parametrize("autocast_dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.slow)],
                         ids=["fp16", "bf16"])
@pytest.mark.parametrize("position", [p if p in ("post", "houlsby") else pytest.param(p, marks=pytest.mark.slow)
                                      for p in POSITIONS])  # fast mode: one branch, and two with their own norms
def test_every_position_trains_under_autocast(position, autocast_dtype):
    # An fp32 model under autocast, as users train: forward and backward of every position,
    # DropPath on, against the same model in fp32. Both the fused model and the eager reference
    # code under the same autocast land within the autocast dtype's rounding of it (the op's own
    # numerics are pinned against float64 in test_bottleneck_autocast.py; through six blocks,
    # the two autocast models' rounding errors differ by chance, either way).
    fused, reference_model = fused_and_reference(position)
    batch, labels = images(), torch.tensor([1, 3], device=DEVICE)
    results = []
    for model, autocast in ((fused, True), (reference_model, True), (reference_model, False)):
        model.zero_grad()
        torch.manual_seed(7)  # the same DropPath draws
        with torch.autocast(DEVICE, dtype=autocast_dtype, enabled=autocast):
            out = model(batch)
            loss = nn.functional.cross_entropy(out, labels)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results.append((out, grads))
    (out, grads), (eager_out, eager_grads), (exact_out, exact_grads) = results
    assert out.dtype == eager_out.dtype

    tolerance = {torch.float16: 2e-2, torch.bfloat16: 1e-1}[autocast_dtype]

    def no_worse(got, eager, exact, what):
        error, eager_error = relative_error(got, exact), relative_error(eager, exact)
        assert error <= max(tolerance, 3 * eager_error), f"{what}: {error:.2e} from fp32 (eager autocast {eager_error:.2e})"

    no_worse(out, eager_out, exact_out, "output")
    for name, grad in grads.items():
        parameter = dict(fused.named_parameters())[name]
        assert grad.dtype == parameter.dtype, name
        no_worse(grad, eager_grads[name], exact_grads[name], name)


@pytest.mark.parametrize("position", ["intermediate", "houlsby"])
def test_skip_sum_positions_under_bf16_autocast(position):
    # Used to fail: the block's fp32 skip x + y was rejected as a residual of another dtype
    # than the bf16 branch output y.
    model = inject(vit(), AdapterConfig(position=position, drop_path=0.0), verbose=False)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = model(images())
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()
