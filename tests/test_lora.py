"""LoRA on timm ViTs: each adapted linear is its base GEMM plus one fused op call. The formula
per target, exact zero init, merge/unmerge, save/load, stacking/swapping/deleting named
adapters of both kinds, wrong-backbone errors, autocast, dropout and config checks. Small
timm models, pretrained=False, kernels in the interpreter on machines without CUDA.

Targets other than "proj" change the width (qkv D -> 3D, fc1 D -> 4D, fc2 4D -> D): the
cases that run them through the fused op need its D_out != D_in support (ids *qkv*, *fc1*,
*fc2*, *all_targets*)."""

import copy
import dataclasses
import io
import json
import math

import pytest
import timm
import torch
from torch import nn

from fused_adapters.adapters import (
    AdapterConfig,
    BottleneckAdapter,
    LoraBranch,
    LoraConfig,
    LoraLinear,
    active_adapter,
    adapter_configs,
    delete_adapter,
    disable_adapters,
    inject,
    load_adapters,
    merge_adapters,
    merged_adapter,
    param_groups,
    save_adapters,
    set_adapter,
    task_routing,
    trainable_parameters,
    unmerge_adapters,
)
from fused_adapters.adapters import lora as lora_module
from fused_adapters.adapters.lora import TARGET_PATHS, TARGETS
from fused_adapters.kernels import new_seed, reference
from helpers import DEVICE, LaunchCounter, relative_error

IMG = 32
PROJ = ("proj",)  # D -> D: runs on the fused op as it is
TARGET_SETS = [pytest.param(PROJ, id="proj"), pytest.param(TARGETS, id="all_targets", marks=pytest.mark.slow)]


def vit(seed=0, num_classes=5, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, num_classes=num_classes, img_size=IMG,
                             **kwargs).to(DEVICE)


def images(batch=2, seed=1):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def randomize(model, name=None, seed=3, std=0.2):
    """Zero-init B leaves the output unchanged: random A and B (and head) change it visibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in model.modules():
            if isinstance(linear, LoraLinear):
                for branch_name, branch in linear.lora.items():
                    if name is None or branch_name == name:
                        for parameter in (branch.lora_A, branch.lora_B):
                            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        if name is not None and name in getattr(model, "adapter_modules", {}):
            for parameter in model.adapter_modules[name].parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter) * 0.2)


def randomize_bottlenecks(model, seed=4):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BottleneckAdapter):
                for parameter in module.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)


def outputs(model, name, x):
    if name is None:
        with torch.no_grad(), disable_adapters(model):
            return model.eval()(x)
    set_adapter(model, name)
    with torch.no_grad():
        return model.eval()(x)


def lora_model(targets=PROJ, seed=0, name="default", **config):
    model = inject(vit(seed=seed), LoraConfig(targets=targets, **config), name=name, verbose=False)
    randomize(model, name)
    return model.eval()


def base_weights(model):
    return {key: value.clone() for key, value in model.state_dict().items() if ".lora." not in key}


# -------------------------------------------------------------------------------------------
# The config
# -------------------------------------------------------------------------------------------

def test_config_defaults_round_trip_and_frozen():
    config = LoraConfig()
    assert (config.rank, config.alpha, config.targets, config.dropout, config.init, config.train_head) == (
        8, 8.0, ("qkv",), 0.0, "lora", True)
    assert config.scale == 1.0 and LoraConfig(rank=4, alpha=16).scale == 4.0
    ordered = LoraConfig(targets=["fc2", "qkv"], alpha=2)  # any order, a list: kept in TARGETS order
    assert ordered.targets == ("qkv", "fc2") and ordered == LoraConfig(targets=("qkv", "fc2"), alpha=2.0)
    data = ordered.to_dict()
    assert json.loads(json.dumps(data)) == data and data["targets"] == ["qkv", "fc2"]
    assert LoraConfig.from_dict(json.loads(json.dumps(data))) == ordered
    with pytest.raises(ValueError, match="unknown LoraConfig fields"):
        LoraConfig.from_dict({**data, "position": "post"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 4


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rank": 0}, "rank"), ({"rank": 257}, "rank"), ({"rank": True}, "rank"), ({"rank": 8.0}, "rank"),
        ({"alpha": 0}, "alpha"), ({"alpha": -1.0}, "alpha"), ({"alpha": math.inf}, "alpha"),
        ({"alpha": math.nan}, "alpha"), ({"alpha": True}, "alpha"), ({"alpha": "8"}, "alpha"),
        ({"targets": ()}, "targets"), ({"targets": "qkv"}, "targets"), ({"targets": ("qkv", "qkv")}, "targets"),
        ({"targets": ("q",)}, "targets"), ({"targets": ("attn.qkv",)}, "targets"),
        ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
        ({"init": "xavier"}, "init"), ({"train_head": 1}, "train_head"),
    ],
)
def test_bad_configs(kwargs, field):
    with pytest.raises(ValueError, match=f"LoraConfig.{field}"):
        LoraConfig(**kwargs)


def test_inits():
    torch.manual_seed(0)
    for init in ("lora", "gaussian"):
        branch = LoraBranch(256, 64, rank=16, init=init)
        assert torch.equal(branch.lora_B, torch.zeros(64, 16))
        std = float(branch.lora_A.detach().std())
        # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 * 256)
        expected = 1 / math.sqrt(3 * 256) if init == "lora" else 1 / 16
        assert abs(std - expected) < 0.05 * expected, (init, std)
    with pytest.raises(ValueError, match="LoraConfig.init"):
        LoraBranch(8, 8, init="houlsby")


# -------------------------------------------------------------------------------------------
# The formula, zero init, freezing, the count
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_each_target_matches_the_float64_formula(target):
    model = lora_model((target,), rank=4, alpha=6.0)
    linear = model.blocks[2].get_submodule(TARGET_PATHS[target])
    assert isinstance(linear, LoraLinear) and linear.active_lora == "default"
    branch = linear.lora["default"]
    x = torch.randn(2, 5, linear.in_features, device=DEVICE, requires_grad=True)
    out = linear(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    x64 = x.detach().double().requires_grad_(True)
    a64, b64 = (p.detach().double().requires_grad_(True) for p in (branch.lora_A, branch.lora_B))
    expected = (nn.functional.linear(x64, linear.weight.double(), linear.bias.double())
                + 1.5 * (x64 @ a64.T) @ b64.T)
    expected.backward(grad_out.double())
    assert out.shape == (2, 5, linear.out_features)
    assert relative_error(out, expected) < 1e-5
    for got, want in ((x.grad, x64.grad), (branch.lora_A.grad, a64.grad), (branch.lora_B.grad, b64.grad)):
        assert relative_error(got, want) < 1e-5
    assert linear.weight.grad is None and linear.bias.grad is None  # the base stays frozen


@pytest.mark.parametrize("targets", TARGET_SETS)
def test_fresh_lora_computes_the_backbone_exactly(targets):
    model = vit().eval()
    x = images()
    with torch.no_grad():
        bare = model(x)
    inject(model, LoraConfig(targets=targets), verbose=False)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), bare)


def test_keys_stay_and_only_lora_and_head_train():
    pristine = vit()
    model = inject(vit(), LoraConfig(targets=("qkv", "fc2")), verbose=False)
    keys, backbone = set(model.state_dict()), set(pristine.state_dict())
    assert backbone <= keys  # attn.qkv.weight stays attn.qkv.weight
    added = {key for key in keys - backbone if not key.startswith(("adapter_modules.", "base_modules."))}
    assert added == {f"blocks.{i}.{path}.lora.default.lora_{ab}" for i in range(6)
                     for path in ("attn.qkv", "mlp.fc2") for ab in "AB"}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name in keys if ".lora.default." in name} | {"head.weight", "head.bias"}
    assert type(model.blocks[0]) is type(pristine.blocks[0])  # LoRA alone leaves the blocks' class
    decay, no_decay = param_groups(model, lr=1e-3, weight_decay=0.1)
    assert len(decay["params"]) == 6 * 4 + 1 and len(no_decay["params"]) == 1  # A, B and head.weight


def test_vit_base_qkv_count_and_summary(caplog):
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    with caplog.at_level("INFO", logger="fused_adapters"):
        inject(model, LoraConfig(rank=8, targets=("qkv",)))
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora." in n and p.requires_grad)
    assert lora == 12 * 8 * (768 + 2304) == 294_912
    trainable, total = trainable_parameters(model)
    assert trainable == 294_912 + 768 * 10 + 10
    printed = caplog.text
    assert "injected 'default' (LoRA on qkv, rank 8, alpha 8; kernels: " in printed
    assert f"trainable params 302,602 || all params {total:,}" in printed


@pytest.mark.parametrize("targets", TARGET_SETS)
@pytest.mark.slow
def test_training_lowers_the_loss(targets):
    model = inject(vit(), LoraConfig(targets=targets, alpha=16), verbose=False).train()
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-2, weight_decay=0.0))
    x, labels = images(4), torch.tensor([0, 1, 2, 3], device=DEVICE)
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# -------------------------------------------------------------------------------------------
# Merge and unmerge
# -------------------------------------------------------------------------------------------

def forbid_adapter_ops(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a merged forward ran an adapter op")

    monkeypatch.setattr(lora_module, "bottleneck_adapter", boom)
    monkeypatch.setattr(reference, "bottleneck_adapter", boom)


@pytest.mark.parametrize("targets", TARGET_SETS)
def test_merge_runs_plain_linears_and_unmerge_restores_exactly(targets, monkeypatch):
    model = lora_model(targets, alpha=4.0)
    originals = base_weights(model)
    x = images()
    with torch.no_grad():
        unmerged = model(x)
    assert merged_adapter(model) is None
    assert merge_adapters(model) is model and merged_adapter(model) == "default"
    for index, block in enumerate(model.blocks):
        for target in targets:
            linear = block.get_submodule(TARGET_PATHS[target])
            branch = linear.lora["default"]
            want = originals[f"blocks.{index}.{TARGET_PATHS[target]}.weight"].float() + (
                branch.lora_B.float() @ branch.lora_A.float()) * 0.5
            assert torch.equal(linear.weight, want.to(linear.weight.dtype))
    with monkeypatch.context() as patch:
        forbid_adapter_ops(patch)
        with LaunchCounter().patch(patch) as launches, torch.no_grad():
            merged = model(x)
        assert launches.names == []
    assert relative_error(merged, unmerged) < 1e-5
    merged_weights = base_weights(model)
    merge_adapters(model)  # merging again changes nothing
    assert all(torch.equal(model.state_dict()[key], value) for key, value in merged_weights.items())
    assert unmerge_adapters(model) is model and merged_adapter(model) is None
    assert all(torch.equal(model.state_dict()[key], value) for key, value in originals.items())
    with torch.no_grad():
        assert torch.equal(model(x), unmerged)
    unmerge_adapters(model)  # nothing merged: nothing to do


def test_merge_in_half_precision_sums_in_fp32():
    model = lora_model(PROJ).half()
    linear = model.blocks[0].attn.proj
    original = linear.weight.clone()
    branch = linear.lora["default"]
    merge_adapters(model)
    want = (original.float() + branch.lora_B.float() @ branch.lora_A.float()).half()
    assert linear.weight.dtype == torch.float16 and torch.equal(linear.weight, want)
    unmerge_adapters(model)
    assert torch.equal(linear.weight, original)


def test_merge_errors_name_the_adapter():
    model = inject(vit(), AdapterConfig(), name="bottleneck", verbose=False)
    with pytest.raises(ValueError, match="cannot merge adapter 'bottleneck': it is a bottleneck adapter"):
        merge_adapters(model)
    inject(model, LoraConfig(targets=PROJ), name="low_rank", verbose=False)
    set_adapter(model, "bottleneck")
    merge_adapters(model, "low_rank")  # name= makes it the active one first
    assert active_adapter(model) == merged_adapter(model) == "low_rank"
    delete_adapter(model, "low_rank")
    with pytest.raises(ValueError, match="needs an active LoRA adapter"):
        merge_adapters(model)
    with pytest.raises(ValueError, match="no adapters named 'nope'"):
        merge_adapters(model, "nope")
    # A refused merge changes nothing: the merged adapter stays merged and active.
    inject(model, LoraConfig(targets=PROJ), name="low_rank", verbose=False)
    merge_adapters(model, "low_rank")
    with pytest.raises(ValueError, match="cannot merge adapter 'bottleneck'"):
        merge_adapters(model, "bottleneck")
    assert active_adapter(model) == merged_adapter(model) == "low_rank"


def test_state_dicts_record_the_merge():
    # The merged weight is W + s B A with W kept aside: loading weights into a merged linear, or
    # a merged state dict into an unmerged one, would silently drop or double the update.
    x = images()
    model = lora_model(PROJ, name="cars")
    with torch.no_grad():
        want = model(x)
    unmerged_state = copy.deepcopy(model.state_dict())
    merge_adapters(model)
    merged_state = copy.deepcopy(model.state_dict())  # a copy: unmerging writes the weights in place
    assert merged_state._metadata["blocks.0.attn.proj"]["fused_adapters_merged_lora"] == "cars"
    assert "fused_adapters_merged_lora" not in unmerged_state._metadata["blocks.0.attn.proj"]
    with pytest.raises(ValueError, match=r"state_dict: blocks.0.attn.proj has LoRA adapter 'cars' merged.*"
                                         r"unmerge_adapters\(model\) first"):
        model.load_state_dict(unmerged_state)
    fresh = lora_model(PROJ, name="cars", seed=1)
    buffer = io.BytesIO()
    torch.save(merged_state, buffer)  # the record survives a round trip through a file
    buffer.seek(0)
    with pytest.raises(ValueError, match=r"blocks.0.attn.proj.weight has LoRA adapter 'cars' merged into it"):
        fresh.load_state_dict(torch.load(buffer))
    # Unmerged state dicts load as before; a merged one is a plain ViT's weights.
    unmerge_adapters(model)
    fresh.load_state_dict(unmerged_state)
    plain = vit(seed=1).eval()
    missing, unexpected = plain.load_state_dict(merged_state, strict=False)
    assert not missing and all(".lora." in key or key.startswith(("adapter_modules.", "base_modules."))
                               for key in unexpected)  # the branches and the heads' owner copies
    with torch.no_grad():
        assert torch.equal(outputs(fresh, "cars", x), want)
        assert relative_error(plain(x), want) < 1e-5
        assert torch.equal(model(x), want)


@pytest.mark.parametrize("config", [AdapterConfig(), LoraConfig(targets=PROJ), "losa"])
def test_names_that_are_module_dict_attributes_are_refused(config):
    from fused_adapters.adapters import LosaConfig

    config = LosaConfig(channel_rank=4, token_rank=3) if config == "losa" else config
    model = vit()
    classes = [type(module) for module in model.modules()]
    for name in ("train", "keys", "items", "float", "half"):
        with pytest.raises(ValueError, match=f"adapter name '{name}' is an attribute of torch.nn.ModuleDict"):
            inject(model, config, name=name, verbose=False)
    assert adapter_configs(model) == {} and [type(module) for module in model.modules()] == classes


def test_what_happens_while_merged(tmp_path):
    model = lora_model(PROJ, name="cars")
    inject(model, LoraConfig(targets=PROJ, rank=4), name="dogs", verbose=False)
    randomize(model, "dogs", seed=5)
    inject(model, AdapterConfig(drop_path=0.0), name="birds", verbose=False)
    randomize_bottlenecks(model)
    pristine = vit().eval()
    originals = base_weights(pristine)
    x = images()
    with torch.no_grad():
        bare = pristine(x)
    want = {name: outputs(model, name, x) for name in ("cars", "dogs", "birds")}
    with torch.no_grad(), task_routing(model, ["birds", "birds"]):
        routed = model(x)
    save_adapters(model, tmp_path / "unmerged", name="cars")

    def weights_are_original():
        state = model.state_dict()
        return all(torch.equal(state[key], value) for key, value in originals.items() if key in state
                   and not key.startswith("head."))

    merge_adapters(model, "cars")
    with torch.no_grad():
        assert relative_error(model(x), want["cars"]) < 1e-5
        with disable_adapters(model):  # runs the kept originals
            assert torch.equal(model(x), bare)
        with task_routing(model, ["birds", "birds"]):  # LoRA off: the original weights
            assert torch.equal(model(x), routed)
    set_adapter(model, "cars")  # the merged one: stays merged
    assert merged_adapter(model) == "cars" and not weights_are_original()
    save_adapters(model, tmp_path / "merged", name="cars")  # merging leaves A and B alone
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / f / "adapter_model.safetensors")) for f in ("unmerged", "merged"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    set_adapter(model, "dogs")  # another name: unmerges first
    assert merged_adapter(model) is None and weights_are_original()
    assert torch.equal(outputs(model, "dogs", x), want["dogs"])

    merge_adapters(model, "dogs")
    inject(model, LoraConfig(targets=PROJ), name="new", verbose=False)  # the new one is active: unmerged
    assert merged_adapter(model) is None and weights_are_original() and active_adapter(model) == "new"

    merge_adapters(model, "cars")
    load_adapters(model, tmp_path / "merged")  # into the merged adapter: unmerges, then loads
    assert merged_adapter(model) is None and torch.equal(outputs(model, "cars", x), want["cars"])

    merge_adapters(model, "cars")
    delete_adapter(model, "cars")  # unmerged first, then gone
    assert merged_adapter(model) is None and weights_are_original() and active_adapter(model) is None
    assert torch.equal(outputs(model, "birds", x), want["birds"])


# -------------------------------------------------------------------------------------------
# Save and load
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets", TARGET_SETS)
def test_save_load_round_trip(targets, tmp_path):
    model = lora_model(targets, rank=4, alpha=2.0)
    folder = save_adapters(model, tmp_path / "out")
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["format_version"] == 2 and meta["kind"] == "lora" and meta["name"] == "default"
    assert meta["config"]["targets"] == list(targets) and meta["config"]["alpha"] == 2.0
    shapes = {"qkv": [192, 64], "proj": [64, 64], "fc1": [192, 64], "fc2": [64, 192]}  # test_vit: mlp_ratio 3
    assert meta["model"]["linears"] == {target: shapes[target] for target in targets}
    from safetensors.torch import load_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    assert set(state) == {f"blocks.{i}.{TARGET_PATHS[t]}.lora_{ab}" for i in range(6) for t in targets
                          for ab in "AB"} | {"head.weight", "head.bias"}
    fresh = vit()
    load_adapters(fresh, folder)
    assert adapter_configs(fresh) == adapter_configs(model)
    x = images()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


def test_a_file_without_kind_loads_as_a_bottleneck_adapter(tmp_path):
    model = inject(vit(), AdapterConfig(scaling="layer"), verbose=False).eval()
    randomize_bottlenecks(model)
    folder = save_adapters(model, tmp_path / "out")
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["kind"] == "adapter" and "linears" not in meta["model"]
    del meta["kind"]
    meta["format_version"] = 1  # as written before LoRA
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    fresh = vit()
    load_adapters(fresh, folder)
    assert isinstance(adapter_configs(fresh)["default"], AdapterConfig)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images()), model(images()))
    for version, kind, message in ((2, "prefix", "kind 'prefix'"), (2, None, "kind None"),
                                   (3, "adapter", "format_version 3")):
        broken = {**meta, "format_version": version, "kind": kind}
        (folder / "adapter_config.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            load_adapters(vit(), folder)


def test_lora_file_into_a_bottleneck_name_is_refused(tmp_path):
    folder = save_adapters(lora_model(PROJ), tmp_path / "out")
    model = inject(vit(), AdapterConfig(), verbose=False)  # "default" exists, a bottleneck adapter
    with pytest.raises(ValueError, match="were built from AdapterConfig"):
        load_adapters(model, folder)
    load_adapters(model, folder, name="low_rank")
    assert isinstance(adapter_configs(model)["low_rank"], LoraConfig)


def test_wrong_backbone_is_refused_and_the_model_left_alone(tmp_path):
    folder = save_adapters(lora_model(("proj", "fc1")), tmp_path / "out")
    for kwargs, message in (({"depth": 3}, "depth 6; this model has depth 3"),
                            ({"embed_dim": 32}, "dim 64; this model has dim 32"),
                            ({"mlp_ratio": 2.0}, r"mlp.fc1 weights are \[out, in\] = \[192, 64\]; this model's "
                                                 r"are \[128, 64\]"),
                            ({"num_classes": 7}, "num_classes=5")):
        model = vit(**kwargs)
        inject(model, AdapterConfig(), name="other", verbose=False)
        before = set(model.state_dict())
        with pytest.raises(ValueError, match=message):
            load_adapters(model, folder)
        assert sorted(adapter_configs(model)) == ["other"] and set(model.state_dict()) == before
    # proj alone does not care about the MLP's width
    load_adapters(vit(mlp_ratio=2.0), save_adapters(lora_model(PROJ), tmp_path / "proj"))

    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    del state["blocks.5.mlp.fc1.lora_B"]
    save_file(state, str(folder / "adapter_model.safetensors"))
    model = lora_model(PROJ, name="keep")
    merge_adapters(model)
    before = base_weights(model)
    with pytest.raises(ValueError, match=r"missing tensors \['blocks.5.mlp.fc1.lora_B'\]"):
        load_adapters(model, folder)
    assert sorted(adapter_configs(model)) == ["keep"] and active_adapter(model) == "keep"
    assert merged_adapter(model) == "keep" and base_weights(model).keys() == before.keys()
    assert all(torch.equal(base_weights(model)[k], v) for k, v in before.items())
    assert not any(isinstance(m, LoraLinear) for m in model.blocks[0].mlp.modules())


# -------------------------------------------------------------------------------------------
# Deltas that deploy: stack, swap, delete
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dog_targets", TARGET_SETS)
def test_stack_swap_and_delete_give_each_adapters_own_outputs(dog_targets, tmp_path):
    x = images(3)
    pristine = vit().eval()
    with torch.no_grad():
        bare = pristine(x)
    alone, folders = {}, {}
    for seed, (name, config) in enumerate((("cars", LoraConfig(targets=PROJ, alpha=4.0)),
                                           ("birds", AdapterConfig(drop_path=0.0)),
                                           ("dogs", LoraConfig(targets=dog_targets, rank=4, train_head=False)))):
        model = inject(vit(), config, name=name, verbose=False)
        randomize(model, name, seed=seed)
        randomize_bottlenecks(model, seed=seed)
        alone[name] = outputs(model, name, x)
        assert not torch.equal(alone[name], bare)
        folders[name] = save_adapters(model, tmp_path / name)

    model = vit()
    for name in ("cars", "birds", "dogs"):
        load_adapters(model, folders[name])
        assert active_adapter(model) == name
    for name in ("dogs", "cars", "birds", "cars", "dogs"):  # swap by name at run time
        assert torch.equal(outputs(model, name, x), alone[name]), name
    assert torch.equal(outputs(model, None, x), bare)

    set_adapter(model, "cars")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora.cars." in n} | {"head.weight", "head.bias"}
    assert all(block.active_adapter is None for block in model.blocks)  # the bottlenecks are off

    delete_adapter(model, "birds")  # not the active one: cars stays active
    assert active_adapter(model) == "cars" and sorted(adapter_configs(model)) == ["cars", "dogs"]
    assert type(model.blocks[0]) is type(pristine.blocks[0])  # no bottleneck adapter left in the blocks
    assert torch.equal(outputs(model, "cars", x), alone["cars"])
    assert torch.equal(outputs(model, "dogs", x), alone["dogs"])

    delete_adapter(model, "dogs")  # the active one: none is active, the bare backbone runs
    assert active_adapter(model) is None and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model.eval()(x), bare)
    assert model.head is model.base_modules["head"]  # cars still owns a head copy
    assert torch.equal(outputs(model, "cars", x), alone["cars"])

    delete_adapter(model, "cars")
    assert adapter_configs(model) == {} and active_adapter(model) is None
    assert model.state_dict().keys() == pristine.state_dict().keys()
    assert [type(m) for m in model.modules()] == [type(m) for m in pristine.modules()]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), bare)
    with pytest.raises(ValueError, match="no adapters named 'cars' to delete"):
        delete_adapter(model, "cars")
    load_adapters(model, folders["cars"])  # and back again
    assert torch.equal(outputs(model, "cars", x), alone["cars"])


def test_deleting_keeps_other_owners_heads():
    model = vit()
    for name in ("a", "b"):
        inject(model, LoraConfig(targets=PROJ), name=name, verbose=False)
    head_b = model.adapter_modules["b"]["head"]
    delete_adapter(model, "a")
    assert set(model.adapter_modules) == {"b"} and "head" in model.base_modules
    assert active_adapter(model) == "b" and model.head is head_b
    delete_adapter(model, "b")
    assert not hasattr(model, "adapter_modules") and not hasattr(model, "base_modules")
    assert isinstance(model.head, nn.Linear) and model.head.weight.shape == (5, 64)


# -------------------------------------------------------------------------------------------
# Precision, dropout, pickling, errors
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets", TARGET_SETS)
def test_fp16_autocast(targets):
    model = lora_model(targets)
    x, labels = images(), torch.tensor([1, 3], device=DEVICE)
    with torch.no_grad():
        exact = model(x)
    linear = model.blocks[0].get_submodule(TARGET_PATHS[targets[-1]])
    tokens = torch.randn(2, 5, linear.in_features, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        assert linear(tokens).dtype == torch.float16  # as the plain nn.Linear under autocast
        out = model(x)
        loss = nn.functional.cross_entropy(out, labels)
    loss.backward()
    assert out.dtype == torch.float16
    assert relative_error(out, exact) < 1e-2
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad.dtype == torch.float32 and torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("targets", TARGET_SETS)
def test_dropout_applies_to_the_branch_input_only(targets, monkeypatch):
    model = lora_model(targets, dropout=0.5).train()
    for target in targets:
        linear = model.blocks[1].get_submodule(TARGET_PATHS[target])
        branch = linear.lora["default"]
        x = torch.randn(2, 5, linear.in_features, device=DEVICE)
        torch.manual_seed(11)
        out = linear(x)
        torch.manual_seed(11)  # the forward draws its dropout seed from torch's generator
        seed = new_seed(x.device)
        keep = reference.dropout_factor(seed, 10, linear.in_features, reference.INPUT_STREAM, 0.5)
        dropped = x.double() * keep.double().reshape(x.shape)
        want = (nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
                + (dropped @ branch.lora_A.double().T) @ branch.lora_B.double().T)
        assert relative_error(out, want) < 1e-5, target
    model(images()).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if targets == PROJ:  # dropout runs inside the fused op: training launches what eval does
        with LaunchCounter().patch(monkeypatch) as launches, torch.no_grad():
            model.train()(images())
        assert len(launches.names) == 6
        with LaunchCounter().patch(monkeypatch) as launches, torch.no_grad():
            model.eval()(images())
        assert len(launches.names) == 6


def test_deepcopy_and_pickle_keep_the_outputs():
    model = lora_model(PROJ)
    inject(model, AdapterConfig(drop_path=0.0), name="birds", verbose=False)
    set_adapter(model, "default")
    x = images()
    with torch.no_grad():
        want = model.eval()(x)
        assert torch.equal(copy.deepcopy(model)(x), want)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=False)(x), want)


def test_task_routing_refuses_lora_mixed_with_bottleneck_adapters():
    model = lora_model(PROJ, name="low_rank")
    inject(model, AdapterConfig(), name="birds", verbose=False)
    with pytest.raises(ValueError, match="'low_rank' is a LoRA adapter"):
        with task_routing(model, ["birds", "low_rank"]):
            pass


def test_inject_errors_leave_the_model_alone():
    model = vit()
    with pytest.raises(TypeError, match="AdapterConfig, a LoraConfig or a LosaConfig"):
        inject(model, {"rank": 8}, verbose=False)
    model.blocks[3].mlp.fc2 = nn.Identity()
    with pytest.raises(TypeError, match=r"blocks\[3\].mlp.fc2 is torch.nn.modules.linear.Identity"):
        inject(model, LoraConfig(targets=("fc2",)), verbose=False)
    assert not any(isinstance(m, LoraLinear) for m in model.modules()) and adapter_configs(model) == {}
    inject(model, LoraConfig(targets=PROJ), verbose=False)
    with pytest.raises(ValueError, match="already has adapters named 'default'"):
        inject(model, LoraConfig(targets=PROJ), verbose=False)


@pytest.mark.slow
def test_compile_one_lora_block_fullgraph():
    torch._dynamo.reset()
    model = lora_model(PROJ)
    block = model.blocks[0]
    x = torch.randn(2, 5, model.embed_dim, device=DEVICE)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        assert relative_error(compiled(x), block(x)) < 1e-5


@pytest.mark.parametrize("targets", TARGET_SETS)
@pytest.mark.slow
def test_single_launch_variant_matches_the_default_form(targets, monkeypatch):
    # The same model under use_variant("lora_linear", "single_launch"): every adapted linear runs
    # one Triton launch for its GEMM and branch, with the default form's outputs and gradients.
    from fused_adapters.kernels import use_variant
    from helpers import allow_tf32

    model = lora_model(targets)
    x, labels = images(), torch.tensor([1, 3], device=DEVICE)
    results = {}
    with allow_tf32(True), LaunchCounter().patch(monkeypatch) as launches:
        for variant in ("default", "single_launch"):
            model.zero_grad()
            launches.names.clear()
            with use_variant("lora_linear", variant):
                out = model(x)
                nn.functional.cross_entropy(out, labels).backward()
            grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
            results[variant] = out.detach(), grads, list(launches.names)
    (out, grads, default_names), (single_out, single_grads, names) = results["default"], results["single_launch"]
    # tf32 on a GPU: a Triton tf32 GEMM against cuBLAS's through every block; exact fp32 elsewhere.
    tolerance = 5e-3 if DEVICE == "cuda" else 1e-5
    assert relative_error(single_out, out) < tolerance
    for name, grad in grads.items():
        assert relative_error(single_grads[name], grad) < tolerance, name
    linears = len(model.blocks) * len(targets)
    if DEVICE == "cuda" or "_bottleneck_forward_kernel" in default_names:  # the kernels ran
        assert names.count("_lora_linear_kernel") == 2 * linears  # forward, and dx's launch
        assert "_bottleneck_forward_kernel" not in names
