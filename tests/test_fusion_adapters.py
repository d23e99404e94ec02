"""AdapterFusion as an adapter kind (adapters/fusion.py): a fusion over bottleneck adapters of
different ranks computes, in every block, the formula written out below from the adapters'
own modules; only the fusion and its head train; what it cannot fuse is refused without a
change; it saves, loads, regularizes and runs under autocast.

The fp32 models run the Triton kernels (in the interpreter without a GPU); the float64 ones the
reference path, used where the test is about the adapter plumbing rather than the numbers."""

import copy
import dataclasses

import pytest
import timm
import torch
from torch.nn import functional as F

from fused_adapters.adapters import (
    AdapterConfig,
    AdapterFusion,
    FusionConfig,
    LoraConfig,
    active_adapter,
    adapter_configs,
    adapter_state,
    delete_adapter,
    fusion_regularization,
    inject,
    load_adapters,
    merge_adapters,
    save_adapters,
    set_adapter,
    task_routing,
)
from fused_adapters.adapters.record import record_of
from fused_adapters.kernels import reference
from helpers import DEVICE

IMG = 32
# Three adapters of different ranks, scales and biases: padding to rank 8 must change nothing.
SOURCES = {
    "a": dict(rank=4, scaling="channel"),
    "b": dict(rank=8, scaling="layer"),
    "c": dict(rank=2, scaling=0.5, bias=False),
}


def vit(dtype=torch.float32):
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=IMG).to(DEVICE, dtype).eval()


def with_sources(dtype=torch.float32, position="post", sources=SOURCES, **common):
    """A ViT with the bottleneck adapters `sources`, their weights random (not the near-zero init,
    so every branch matters)."""
    model = vit(dtype)
    for name, fields in sources.items():
        fields = {"position": position, "drop_path": 0.0, **common, **fields}
        inject(model, AdapterConfig(**fields), name=name, verbose=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in sources:
            for block in model.blocks:
                for parameter in block.adapters[name].parameters():
                    parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def randomize_fusion(model, name, seed=2):
    """Query, key and value far from their init, so the scores are far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            fusion = block.adapters[name]["block"]
            for parameter in fusion.parameters():
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
            fusion.w_value.add_(torch.eye(fusion.dim))


def images(dtype=torch.float32, batch=2, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMG, IMG, generator=generator).to(DEVICE, dtype)


# The formula, eagerly, from the adapters' own modules --------------------------------------


def eager_fusion(block, fusion_name, x, temperature):
    fusion = block.adapters[fusion_name]["block"]
    values, keys = [], []
    for name in fusion.names:
        adapter = block.adapters[name]["block"]
        hidden = F.linear(x, adapter.down.weight, adapter.down.bias)
        branch = F.linear(reference.activation_fn(adapter.activation)(hidden), adapter.up.weight, adapter.up.bias)
        if adapter.scale is not None:
            branch = branch * adapter.scale
        keys.append(F.linear(branch, fusion.w_key, fusion.b_key))
        values.append(F.linear(branch, fusion.w_value))
    query = F.linear(x, fusion.w_query, fusion.b_query)
    scores = torch.stack([(query * key).sum(-1) for key in keys], dim=-1) / temperature
    probs = torch.softmax(scores, dim=-1)
    return sum(probs[..., i, None] * value for i, value in enumerate(values))


def eager_forward(model, fusion_name, position, temperature, x):
    """The ViT's forward with the fusion at `position` in every block (eval mode: no drop path)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for block in model.blocks:
        attn = block.ls1(block.attn(block.norm1(x)))
        if position == "post":
            x = x + attn
            x = x + block.ls2(block.mlp(block.norm2(x)))
            x = x + eager_fusion(block, fusion_name, x, temperature)
        elif position == "pre":
            x = x + attn
            x = x + eager_fusion(block, fusion_name, x, temperature)
            x = x + block.ls2(block.mlp(block.norm2(x)))
        elif position == "intermediate":
            x = x + attn
            y = block.ls2(block.mlp(block.norm2(x)))
            x = x + y + eager_fusion(block, fusion_name, y, temperature)
        else:  # parallel
            y = x + attn
            x = y + block.ls2(block.mlp(block.norm2(y))) + eager_fusion(block, fusion_name, y, temperature)
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("position, temperature, dtype", [
    ("post", 1.0, torch.float32),
    ("intermediate", 2.0, torch.float32),
    ("pre", 0.5, torch.float64),
    ("parallel", 1.0, torch.float64),
])
def test_the_model_computes_the_fusion_formula_in_every_block(position, temperature, dtype):
    model = with_sources(dtype, position)
    inject(model, FusionConfig(adapters=["a", "b", "c"], temperature=temperature), name="fusion", verbose=False)
    randomize_fusion(model, "fusion")
    x = images(dtype)
    with torch.no_grad():
        out = model(x)
        expected = eager_forward(copy.deepcopy(model).double(), "fusion", position, temperature, x.double())
        # The fusion matters: without it (the last adapter alone) the output is another one.
        set_adapter(model, "c")
        assert not torch.allclose(model(x).double(), expected, atol=1e-2)
    # The op takes the scores and the softmax in fp32 whatever the dtype (reference.adapter_fusion).
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(out.double(), expected, **tolerance)


def test_only_the_fusion_and_its_head_train():
    model = with_sources()
    inject(model, FusionConfig(adapters=["a", "b", "c"]), name="fusion", verbose=False)
    randomize_fusion(model, "fusion")
    fusion_ids = {id(p) for slots in (block.adapters["fusion"] for block in model.blocks) for p in slots.parameters()}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    head = {f"head.{key}" for key in ("weight", "bias")}
    assert set(trainable) == {n for n, p in trainable.items() if id(p) in fusion_ids} | head
    assert len(fusion_ids) == 5 * len(model.blocks)
    model.train()  # the fused adapters run deterministically inside the fusion, in either mode
    F.cross_entropy(model(images()), torch.tensor([0, 3], device=DEVICE)).backward()
    for name in SOURCES:
        for parameter in (p for block in model.blocks for p in block.adapters[name].parameters()):
            assert not parameter.requires_grad and parameter.grad is None
    for block in model.blocks:
        fusion = block.adapters["fusion"]["block"]
        for parameter in (fusion.w_query, fusion.b_query, fusion.w_key, fusion.w_value):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert model.head.weight.grad is not None


def test_inside_the_fusion_the_adapters_run_without_drop_path_or_dropout():
    model = with_sources(torch.float64, drop_path=0.5, dropout=0.3)  # test_vit itself has no stochastic depth
    inject(model, FusionConfig(adapters=["a", "b", "c"]), name="fusion", verbose=False)
    x = images(torch.float64)
    with torch.no_grad():
        evaluated = model(x)
        model.train()
        assert torch.equal(model(x), evaluated) and torch.equal(model(x), evaluated)


def test_its_state_is_its_own_parameters_only():
    model = with_sources(torch.float64)
    inject(model, FusionConfig(adapters=["a", "b"]), name="fusion", verbose=False)
    state = adapter_state(model, "fusion")
    per_block = {"w_query", "b_query", "w_key", "b_key", "w_value"}
    assert set(state) == {f"blocks.{i}.block.{key}" for i in range(len(model.blocks)) for key in per_block} | {
        "head.weight", "head.bias"}
    fusion = model.blocks[0].adapters["fusion"]["block"]
    dim = fusion.dim
    # The library's init: value the identity with 1e-6 off the diagonal, exactly; query and key random, biases zero.
    expected_value = torch.full((dim, dim), 1e-6, dtype=torch.float64).fill_diagonal_(1.0)
    assert torch.equal(fusion.w_value.cpu(), expected_value)
    assert not fusion.b_query.any() and not fusion.b_key.any()
    assert 0.01 < fusion.w_query.std().item() < 0.03 and 0.01 < fusion.w_key.std().item() < 0.03


# Refusals ------------------------------------------------------------------------------------


def snapshot(model):
    record = record_of(model)
    return (record.state(), {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, type(model.blocks[0]))


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[0] == before[0] and after[2] == before[2] and after[3] is before[3]
    assert after[1].keys() == before[1].keys() and all(torch.equal(after[1][k], before[1][k]) for k in before[1])


def refusal_case(case):
    """(model, fused names, the expected message) for one thing a fusion cannot run over."""
    model = vit(torch.float64)
    inject(model, AdapterConfig(rank=4), name="a", verbose=False)
    extra = {
        "missing": None,
        "lora": LoraConfig(rank=4),
        "mixture": AdapterConfig(experts=2),
        "position": AdapterConfig(position="pre"),
        "activation": AdapterConfig(activation="relu"),
        "norm": AdapterConfig(norm=True),
        "houlsby": AdapterConfig(position="houlsby"),
        "train_norms": AdapterConfig(train_norms=True),
    }[case]
    if extra is not None:
        inject(model, extra, name="b", verbose=False)
    set_adapter(model, "a")
    message = {
        "missing": "names 'b', which the model does not have",
        "lora": "cannot fuse adapter 'b': it is a LoRA",
        "mixture": "cannot fuse adapter 'b': it is a mixture of 2 experts",
        "position": r"must share one position, got \{'a': 'post', 'b': 'pre'\}",
        "activation": r"must share one activation, got \{'a': 'gelu', 'b': 'relu'\}",
        "norm": "cannot fuse adapter 'b': it has norm=True",
        "houlsby": "cannot fuse adapter 'b': position 'houlsby' has two adapters per block",
        "train_norms": r"cannot fuse adapter 'b': it trains its own copies of the backbone's LayerNorms",
    }[case]
    return model, message


@pytest.mark.parametrize("case", ["missing", "lora", "mixture", "position", "activation", "norm", "houlsby",
                                  "train_norms"])
def test_what_it_cannot_fuse_is_refused_and_changes_nothing(case):
    model, message = refusal_case(case)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        inject(model, FusionConfig(adapters=["a", "b"]), name="fusion", verbose=False)
    assert_unchanged(model, before)
    assert active_adapter(model) == "a" and "fusion" not in adapter_configs(model)


def test_a_fusion_of_a_fusion_is_refused():
    model = with_sources(torch.float64)
    inject(model, FusionConfig(adapters=["a", "b"]), name="first", verbose=False)
    with pytest.raises(ValueError, match="cannot fuse adapter 'first': it is an AdapterFusion"):
        inject(model, FusionConfig(adapters=["first", "c"]), name="second", verbose=False)


@pytest.mark.parametrize("fields, message", [
    (dict(adapters=[]), "FusionConfig.adapters must be a non-empty list"),
    (dict(adapters="a"), "FusionConfig.adapters must be a non-empty list"),
    (dict(adapters=["a", "a"]), "distinct"),
    (dict(adapters=["a", "not a name"]), "FusionConfig.adapters"),
    (dict(adapters=[f"a{i}" for i in range(17)]), "1 to 16 adapters"),
    (dict(adapters=["a"], temperature=0.0), "FusionConfig.temperature"),
    (dict(adapters=["a"], temperature="cool"), "FusionConfig.temperature"),
    (dict(adapters=["a"], temperature=float("inf")), "FusionConfig.temperature"),
    (dict(adapters=["a"], train_head=1), "FusionConfig.train_head"),
])
def test_the_config_is_checked_at_construction(fields, message):
    with pytest.raises(ValueError, match=message):
        FusionConfig(**fields)


def test_the_config_round_trips_through_a_dict():
    config = FusionConfig(adapters=["a", "b"], temperature="anneal", train_head=False)
    assert config.adapters == ("a", "b")
    assert FusionConfig.from_dict(config.to_dict()) == config
    assert config.to_dict() == {"adapters": ["a", "b"], "temperature": "anneal", "train_head": False}
    assert dataclasses.replace(config, temperature=2).temperature == 2.0


def test_other_calls_refuse_a_fusion_clearly():
    model = with_sources(torch.float64)
    inject(model, FusionConfig(adapters=["a", "b"]), name="fusion", verbose=False)
    with pytest.raises(ValueError, match="cannot merge adapter 'fusion': it is an AdapterFusion"):
        merge_adapters(model, "fusion")
    with pytest.raises(ValueError, match="'fusion' is an AdapterFusion"):
        with task_routing(model, ["fusion", "c"]):
            pass
    with pytest.raises(ValueError, match="fusion_regularization needs an AdapterFusion; name is 'c'"):
        fusion_regularization(model, "c")


def test_a_fused_adapter_cannot_be_deleted_while_the_fusion_runs_over_it():
    model = with_sources(torch.float64)
    plain_class = type(vit().blocks[0])
    inject(model, FusionConfig(adapters=["a", "b"]), name="fusion", verbose=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="cannot delete adapter 'b': fusion 'fusion' runs over it"):
        delete_adapter(model, "b")
    assert_unchanged(model, before)
    delete_adapter(model, "c")  # not fused: fine
    delete_adapter(model, "fusion")
    assert active_adapter(model) is None
    delete_adapter(model, "a")
    delete_adapter(model, "b")
    assert type(model.blocks[0]) is plain_class and record_of(model) is None


# Save, load, regularization, temperature, autocast -------------------------------------------


def test_save_and_load_reproduce_the_outputs(tmp_path):
    model = with_sources()
    fresh = copy.deepcopy(model)  # the same backbone and fused adapters, no fusion yet
    inject(model, FusionConfig(adapters=["a", "c"], temperature=1.5), name="fusion", verbose=False)
    randomize_fusion(model, "fusion")
    with torch.no_grad():
        model.head.weight.mul_(2.0)
        expected = model(images())
    folder = save_adapters(model, tmp_path / "fusion")
    load_adapters(fresh, folder)
    assert adapter_configs(fresh)["fusion"] == FusionConfig(adapters=["a", "c"], temperature=1.5)
    assert active_adapter(fresh) == "fusion"
    with torch.no_grad():
        torch.testing.assert_close(fresh(images()), expected, rtol=0, atol=0)


def test_loading_refuses_without_the_fused_adapters(tmp_path):
    model = with_sources(torch.float64)
    inject(model, FusionConfig(adapters=["a", "b"]), name="fusion", verbose=False)
    folder = save_adapters(model, tmp_path / "fusion")
    missing = with_sources(torch.float64, sources={"a": SOURCES["a"], "c": SOURCES["c"]})
    before = snapshot(missing)
    with pytest.raises(ValueError, match="runs over adapter 'b'.*which this model does not have"):
        load_adapters(missing, folder)
    assert_unchanged(missing, before)
    other_rank = with_sources(torch.float64, sources={"a": SOURCES["a"], "b": dict(rank=16)})
    with pytest.raises(ValueError, match="over adapter 'b' with .*'rank': 8.*this model's 'b' has .*'rank': 16"):
        load_adapters(other_rank, folder)


def test_fusion_regularization_is_zero_at_the_identity_and_grows_with_training():
    model = with_sources(torch.float64)
    inject(model, FusionConfig(adapters=["a", "b", "c"]), name="fusion", verbose=False)
    with torch.no_grad():
        for block in model.blocks:
            block.adapters["fusion"]["block"].w_value.copy_(torch.eye(64))
    regularization = fusion_regularization(model)
    assert regularization.item() == 0.0 and regularization.requires_grad and regularization.dtype == torch.float32
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = F.cross_entropy(model(images(torch.float64)), torch.tensor([1, 2], device=DEVICE)) + regularization
    loss.backward()
    optimizer.step()
    after = fusion_regularization(model, "fusion")
    values = [block.adapters["fusion"]["block"].w_value.detach() for block in model.blocks]
    eye = torch.eye(64, dtype=torch.float64)
    expected = 0.01 * sum(((eye - value) ** 2).sum() for value in values)
    assert after.item() > 0 and not torch.equal(values[0], eye)
    torch.testing.assert_close(after.double(), expected, rtol=1e-6, atol=0)
    set_adapter(model, "a")
    with pytest.raises(ValueError, match="the active adapter is 'a'"):
        fusion_regularization(model)


def test_annealed_temperature_falls_per_training_forward_and_is_saved(tmp_path):
    model = with_sources(torch.float64)
    fresh = copy.deepcopy(model)
    inject(model, FusionConfig(adapters=["a", "b"], temperature="anneal"), name="fusion", verbose=False)
    fusion = model.blocks[0].adapters["fusion"]["block"]
    assert fusion.current_temperature() == 50.0
    model.train()
    for _ in range(3):
        model(images(torch.float64))
    assert fusion.current_temperature() == pytest.approx(50.0 - 3 * 0.05)
    model.eval()
    with torch.no_grad():
        expected = model(images(torch.float64))  # eval forwards do not anneal
    assert fusion.current_temperature() == pytest.approx(50.0 - 3 * 0.05)
    load_adapters(fresh, save_adapters(model, tmp_path / "annealed"))
    loaded = fresh.blocks[0].adapters["fusion"]["block"]
    assert loaded.current_temperature() == pytest.approx(50.0 - 3 * 0.05)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images(torch.float64)), expected, rtol=0, atol=0)
    fusion._calls = 10_000  # the floor
    fusion.anneal_calls.fill_(10_000)
    assert fusion.current_temperature() == 1.0


def test_fp16_autocast_runs_close_to_fp32():
    model = with_sources()
    inject(model, FusionConfig(adapters=["a", "b", "c"]), name="fusion", verbose=False)
    randomize_fusion(model, "fusion")
    x = images()
    with torch.no_grad():
        full = model(x)
        with torch.autocast(x.device.type, dtype=torch.float16):
            half = model(x)
    assert half.dtype in (torch.float16, torch.float32) and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), full, rtol=5e-2, atol=5e-2)


@pytest.mark.slow  # torch.compile: about 10 s on two cores
def test_a_block_with_a_fusion_compiles_as_one_graph():
    torch._dynamo.reset()
    model = with_sources()
    inject(model, FusionConfig(adapters=["a", "b", "c"]), name="fusion", verbose=False)
    randomize_fusion(model, "fusion")
    block = model.blocks[0]
    x = torch.randn(2, 5, 64, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), block(x), rtol=1e-5, atol=1e-5)


def test_the_module_refuses_mixed_activations():
    from fused_adapters.adapters import BottleneckAdapter

    with pytest.raises(ValueError, match="share one activation"):
        AdapterFusion(8, [BottleneckAdapter(8, 2), BottleneckAdapter(8, 2, activation="relu")], ["a", "b"])
