"""LoSA side networks: the math against a plain-PyTorch version of it (float64), the frozen
backbone out of the autograd graph, bytes saved for backward against Adapter+, the cached-feature
path, switching, save/load and errors."""

import copy

import pytest
import timm
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from fused_adapters.adapters import (
    AdapterConfig, LosaConfig, LosaSideNetwork, delete_adapter, disable_adapters, inject, load_adapters,
    losa_features, losa_logits, merge_adapters, save_adapters, set_adapter, task_routing, trainable_parameters,
)
from helpers import DEVICE, TOLERANCE, poisoned_outputs, relative_error

IMG = 32


def vit(seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=IMG, **kwargs).to(DEVICE)


def images(batch=2, seed=1, size=IMG):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def randomize(module, seed=3, std=0.2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter) * std)


def losa_model(name="side", **config):
    model = inject(vit(), LosaConfig(**{"channel_rank": 4, "token_rank": 3, **config}), name=name, verbose=False)
    randomize(model.losa[name])
    return model.eval()


def plain_side_network(side, features, keep=None):
    """The side network's math in plain PyTorch on [B, N, D] tensors (no layouts, no fused op):
    delta_0 = 0; z = h_i + delta; u = z + C(z); delta += C(z) + T(u); output h_L + delta."""

    def mixer(module, rows):  # rows [..., W]: scale * (gelu(rows w_down^T + b_down) w_up^T + b_up)
        hidden = nn.functional.gelu(rows @ module.w_down.T + module.b_down)
        return module.scale * (hidden @ module.w_up.T + module.b_up)

    delta = torch.zeros_like(features[0])
    for index, h in enumerate(features):
        z = h + delta
        channel = mixer(side.channel[index], z)
        if keep is not None:
            channel = channel * keep[index][0][:, None, None]
        u = z + channel
        token = mixer(side.token[index], u.transpose(1, 2)).transpose(1, 2)
        if keep is not None:
            token = token * keep[index][1][:, None, None]
        delta = delta + channel + token
    return features[-1] + delta


@pytest.mark.parametrize("blocks", [None, (1, 3, -1)])
def test_side_network_against_float64_plain_pytorch(blocks, monkeypatch):
    batch, tokens, dim = 3, 7, 24
    fed = 4 if blocks is None else 3
    side = LosaSideNetwork(dim, tokens, range(fed), LosaConfig(channel_rank=5, token_rank=3, blocks=blocks)).to(DEVICE)
    randomize(side)
    side.eval()  # no stochastic depth (see the next test)
    generator = torch.Generator().manual_seed(7)
    features = [torch.randn(batch, tokens, dim, generator=generator).to(DEVICE) for _ in range(fed)]
    with poisoned_outputs(monkeypatch):
        out = side(features)
    grad = torch.randn(out.shape, generator=generator).to(out)
    params = list(side.parameters())
    grads = torch.autograd.grad(out, params, grad)
    side64 = copy.deepcopy(side).double()
    ref = plain_side_network(side64, [f.double() for f in features])
    ref_grads = torch.autograd.grad(ref, list(side64.parameters()), grad.double())
    assert out.shape == (batch, tokens, dim)
    assert relative_error(out, ref) < TOLERANCE[torch.float32]
    for (name, _), got, want in zip(side.named_parameters(), grads, ref_grads):
        assert relative_error(got, want) < 1e-4, name
    # The package's own reference path (fused=False) is the same math too.
    assert relative_error(side(features, fused=False), ref) < TOLERANCE[torch.float32]


def test_drop_path_draws_per_image_and_mixer(monkeypatch):
    side = LosaSideNetwork(16, 5, range(2), LosaConfig(channel_rank=4, token_rank=2, drop_path=0.5)).to(DEVICE)
    randomize(side)
    features = [torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i in range(2)]
    draws = []
    from fused_adapters.adapters import losa as losa_module

    original = losa_module.drop_path_scale

    def recording(x, drop_path, training):
        scale = original(x, drop_path, training)
        draws.append(scale)
        return scale

    monkeypatch.setattr(losa_module, "drop_path_scale", recording)
    side.train()
    out = side(features)
    keep = [(draws[2 * i], draws[2 * i + 1]) for i in range(2)]
    assert all(d.shape == (4,) for d in draws)
    expected = plain_side_network(side, features, keep)
    assert relative_error(out, expected) < TOLERANCE[torch.float32]
    side.eval()
    draws.clear()
    side(features)
    assert draws == [None] * 4


def test_fresh_side_network_is_the_linear_probe():
    # Up-projections start at zero: the model computes exactly what the backbone does.
    model = vit().eval()
    x = images()
    with torch.no_grad():
        bare = model(x)
    inject(model, LosaConfig(), name="side", verbose=False)
    with torch.no_grad():
        assert torch.allclose(model(x), bare, atol=1e-6)


def test_backbone_is_out_of_the_autograd_graph():
    model = losa_model().train()
    final_norm = {id(p) for p in model.norm.parameters()}
    backbone = {id(p) for name, p in model.named_parameters()
                if not name.startswith(("losa.", "head.")) and id(p) not in final_norm}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("losa.side.", "head.")) for name in trainable)
    saved, kept_alive = [], []  # the block outputs are kept alive so their memory is not reused

    def pack(tensor):
        saved.append(tensor)
        return tensor

    hooks = [block.register_forward_hook(lambda module, args, out: kept_alive.append(out)) for block in model.blocks]
    x = images()
    with saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    for hook in hooks:
        hook.remove()
    block_outputs = {t.untyped_storage().data_ptr() for t in kept_alive}
    assert len(block_outputs) == len(model.blocks) and not any(t.requires_grad for t in kept_alive)
    # Nothing the backbone computed is kept, and of its parameters only the final norm's (frozen:
    # it normalizes the side network's output, whose gradient needs its weight).
    for tensor in saved:
        assert id(tensor) not in backbone
        assert tensor.untyped_storage().data_ptr() not in block_outputs
    nn.functional.cross_entropy(out, torch.tensor([1, 3], device=DEVICE)).backward()
    assert all(p.grad is None for p in model.parameters() if id(p) in backbone or id(p) in final_norm)
    assert all(p.grad is not None for p in model.losa.side.parameters())


def saved_activation_bytes(model, x):
    """Distinct storages autograd keeps for backward in one training forward, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


@pytest.mark.slow
def test_saved_bytes_against_adapter_plus_vit_b():
    # ViT-B/16 at 224 px, batch 2, fp32: LoSA keeps at most 30% of what Adapter+ (rank 8, post)
    # keeps for backward. Adapter+ backpropagates through the frozen blocks and keeps their
    # activations; LoSA keeps, per block, its two mixers' inputs and two M x r tensors.
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    torch.manual_seed(0)
    adapter_plus = inject(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10).to(DEVICE),
                          AdapterConfig(), verbose=False).train()
    adapter_bytes = saved_activation_bytes(adapter_plus, x)
    del adapter_plus
    torch.manual_seed(0)
    losa = inject(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10).to(DEVICE),
                  LosaConfig(), verbose=False).train()
    losa_bytes = saved_activation_bytes(losa, x)
    rows, dim = 2 * 197, 768
    print(f"saved for backward, ViT-B/16 batch 2: Adapter+ {adapter_bytes / 2**20:.1f} MiB, "
          f"LoSA {losa_bytes / 2**20:.1f} MiB ({losa_bytes / adapter_bytes:.1%})")
    assert losa_bytes <= 0.30 * adapter_bytes
    assert losa_bytes <= 12 * (2 * rows * dim + 2 * rows * 16 + 2 * dim * 16) * 4 + 4 * rows * dim * 4


def test_cached_features_give_the_end_to_end_result():
    model = losa_model()
    x = images(batch=3)
    with torch.no_grad():
        end_to_end = model(x)
        features = losa_features(model, x)
    assert features.shape == (6, 3, 5, 64) and not features.requires_grad
    logits = losa_logits(model, features)
    assert torch.equal(logits.detach(), end_to_end)
    # Training from cached features reaches the side network and the head only.
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2], device=DEVICE)).backward()
    assert all(p.grad is not None for p in model.losa.side.parameters())
    half = losa_features(model, x, dtype=torch.float16)
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match="L = 6 fed blocks"):
        losa_logits(model, features[:5])


def test_cached_features_need_the_losa_adapter_active():
    # The backbone and the head run as the model is set: with a trained LoRA (or a bottleneck
    # adapter) active, features and logits would not be the side network's, so both refuse.
    from fused_adapters.adapters import LoraConfig

    model = losa_model()
    inject(model, LoraConfig(rank=4), name="lora", verbose=False)  # now the active adapter
    x = images()
    with torch.no_grad():
        for name in (None, "side"):
            with pytest.raises(ValueError, match=r"name: the LoSA adapter 'side' must be the active adapter.*"
                                                 r"active now: 'lora'.*set_adapter\(model, 'side'\)"):
                losa_features(model, x, name=name)
            with pytest.raises(ValueError, match="must be the active adapter"):
                losa_logits(model, torch.zeros(6, 2, 5, 64, device=DEVICE), name=name)
        with pytest.raises(ValueError, match=r"name: no LoSA adapter named 'lora'.*\['side'\]"):
            losa_features(model, x, name="lora")
        set_adapter(model, "side")
        features = losa_features(model, x, name="side")
        assert torch.equal(losa_logits(model, features, name="side"), model(x))
        with disable_adapters(model):
            with pytest.raises(ValueError, match="inside disable_adapters"):
                losa_features(model, x)
        with pytest.raises(ValueError, match="has no LoSA adapter"):
            losa_features(vit(), x)
        # Features of different images per block are refused, not broadcast.
        with pytest.raises(ValueError, match="block feature 1 has batch 1, block feature 0 has 2"):
            model.losa.side([features[0], features[1, :1], *features[2:]])


def test_fed_blocks_subset_and_trainable_count(caplog):
    with caplog.at_level("INFO", logger="fused_adapters"):
        model = inject(vit(), LosaConfig(channel_rank=4, token_rank=3, blocks=(0, 2, 5)), name="side")
    side = model.losa.side
    assert side.blocks == (0, 2, 5) and len(side.channel) == 3
    tokens, dim = 5, 64
    per_block = (2 * dim * 4 + 4 + 2 * dim) + (2 * tokens * 3 + 3 + 2 * tokens)
    head = sum(p.numel() for p in model.head.parameters())
    assert trainable_parameters(model)[0] == 3 * per_block + head
    assert "LoSA side network on 3 blocks" in caplog.text
    with pytest.raises(ValueError, match="distinct blocks"):
        inject(vit(), LosaConfig(blocks=(3, 1)), name="bad", verbose=False)


def test_switching_kinds_disable_and_delete():
    model = vit().eval()
    x = images()
    with torch.no_grad():
        bare = model(x)
    inject(model, AdapterConfig(), name="plus", verbose=False)
    randomize(model.blocks[0].adapters["plus"], seed=5)
    with torch.no_grad():
        plus = model(x)
    inject(model, LosaConfig(channel_rank=4, token_rank=3), name="side", verbose=False)
    randomize(model.losa["side"])
    with torch.no_grad():
        side = model(x)
        set_adapter(model, "plus")
        assert torch.equal(model(x), plus)
        set_adapter(model, "side")
        assert torch.equal(model(x), side)
        with disable_adapters(model):
            assert torch.allclose(model(x), bare, atol=1e-6)
        assert torch.equal(model(x), side)
    with pytest.raises(ValueError, match="LoSA side network"):
        merge_adapters(model)
    with pytest.raises(ValueError, match="LoSA side network"):
        with task_routing(model, ["side", "side"]):
            pass
    delete_adapter(model, "side")  # the active one: none is active after it
    assert type(model).__name__ != "LosaVisionTransformer" and not hasattr(model, "losa")
    with torch.no_grad():
        assert torch.equal(model(x), bare)
        set_adapter(model, "plus")
        assert torch.equal(model(x), plus)
    delete_adapter(model, "plus")
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    with torch.no_grad():
        assert torch.equal(model(x), bare)


def test_save_load_deepcopy_and_wrong_tokens(tmp_path):
    model = losa_model()
    x = images()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(copy.deepcopy(model)(x), expected)
    save_adapters(model, tmp_path / "side")
    fresh = vit()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("losa.")}, strict=False)
    load_adapters(fresh, tmp_path / "side")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)
    other = timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=48).to(DEVICE)
    with pytest.raises(ValueError, match="tokens per image"):
        load_adapters(other, tmp_path / "side")
    assert not hasattr(other, "losa")
    with pytest.raises(ValueError, match="5 tokens per image"):
        model(images(size=48))


def test_fp16_autocast_training_step():
    model = losa_model().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch.autocast(DEVICE, dtype=torch.float16):
        out = model(images())
        loss = nn.functional.cross_entropy(out, torch.tensor([1, 2], device=DEVICE))
    loss.backward()
    assert out.dtype == torch.float16
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad.dtype == torch.float32 and torch.isfinite(parameter.grad).all(), name
    optimizer.step()


def test_config_checks_and_round_trip():
    config = LosaConfig(channel_rank=8, token_rank=4, blocks=[0, 5], init="houlsby", drop_path=0.0)
    assert config.blocks == (0, 5) and LosaConfig.from_dict(config.to_dict()) == config
    for field, value in (("channel_rank", 0), ("token_rank", 300), ("blocks", ()), ("blocks", (1.5,)),
                         ("init", "zeros"), ("drop_path", 1.0), ("train_head", 1)):
        with pytest.raises(ValueError, match=f"LosaConfig.{field}"):
            LosaConfig(**{field: value})
    with pytest.raises(ValueError, match="unknown LosaConfig fields"):
        LosaConfig.from_dict({"rank": 3})


@pytest.mark.slow
def test_forward_bytes_per_block():
    # ViT-B widths (N 197, D 768), batch 2, fp16, two fed blocks, launches planned for 132 SMs.
    # One M x D pass = B * N * D elements. The first feature is copied token-major once (2
    # passes); each next feature joins as h_{i+1} - h_i, written token-major in one aten op (3)
    # and read by the token mixer as a residual term (1); each mixer reads its input and writes
    # its output (2). About 8.2 passes a block where the feature is added, against 10 for a
    # separate add after the token mixer (which would read and write the state once more).
    from fused_adapters.tools.byte_count import count_bytes

    batch, tokens, dim = 2, 197, 768
    side = LosaSideNetwork(dim, tokens, range(2), LosaConfig(drop_path=0.0)).half().eval()
    randomize(side, std=0.02)
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(batch, tokens, dim, generator=generator).half() for _ in range(2)]
    with count_bytes(sm_count=132) as forward:
        side(features)
    passes = forward.total() / (batch * tokens * dim * 2)
    print(f"LoSA side network forward, 2 blocks: {passes:.2f} M x D passes")
    assert forward.triton_launches == 4 and [op.op for op in forward.aten] == ["clone", "sub"], forward.summary()
    assert passes <= 14.6, forward.summary()


def test_backward_runs_no_copy_and_task_routing_turns_losa_off(monkeypatch):
    # Backward: each mixer's dx comes back laid out like its input, so no aten op (a transposing
    # copy) runs between the launches; one copy takes the output's [B, N, D] gradient into the
    # token-major layout, once. task_routing runs the backbone's own forward even while a LoSA
    # adapter is the active one, and puts it back after.
    from fused_adapters.tools.byte_count import count_bytes

    side = LosaSideNetwork(32, 13, range(2), LosaConfig(channel_rank=4, token_rank=3, drop_path=0.0)).eval()
    randomize(side)
    features = [torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    out = side(features)
    grad = torch.randn(out.shape)
    with count_bytes(sm_count=4) as backward:
        torch.autograd.grad(out, list(side.parameters()), grad)
    assert backward.triton_launches == 8 and [op.op for op in backward.aten] == ["clone"], backward.summary()

    model = vit().eval()
    inject(model, AdapterConfig(), name="plus", verbose=False)
    randomize(model.blocks[0].adapters["plus"], seed=5)
    x = images()
    with torch.no_grad():
        plus = model(x)
    inject(model, LosaConfig(channel_rank=4, token_rank=3), name="side", verbose=False)
    randomize(model.losa["side"])
    with torch.no_grad():
        side_out = model(x)
        with task_routing(model, ["plus", "plus"]):  # (its gathered per-image weights round differently)
            assert relative_error(model(x), plus) < 1e-5
        assert torch.equal(model(x), side_out)
