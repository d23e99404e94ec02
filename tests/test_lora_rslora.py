"""rsLoRA (LoraConfig(use_rslora=True)): the update scaled by alpha / sqrt(rank), as PEFT's
use_rslora, in the forward, the gradients, the merge and the saved files; files saved before the
field existed load as plain LoRA."""

import json
import math

import pytest
import timm
import torch
from torch import nn

from fused_adapters.adapters import (
    LoraConfig, LoraLinear, adapter_configs, inject, load_adapters, merge_adapters, save_adapters, set_adapter,
)
from fused_adapters.adapters.lora import LoraBranch, TARGET_PATHS
from helpers import DEVICE, relative_error

IMG = 32


def vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=IMG).to(DEVICE)


def randomized(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraBranch):
                for parameter in (module.lora_A, module.lora_B):
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def test_the_scale_is_alpha_over_sqrt_rank():
    config = LoraConfig(rank=16, alpha=8.0, use_rslora=True)
    assert config.scale == 8.0 / math.sqrt(16) == 2.0 and LoraConfig(rank=16, alpha=8.0).scale == 0.5
    assert LoraBranch(8, 8, rank=4, alpha=6.0, use_rslora=True).scale == 3.0
    assert LoraConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="use_rslora"):
        LoraConfig(use_rslora=1)


@pytest.mark.parametrize("target", ["qkv", "fc2"])
def test_the_forward_and_gradients_use_it(target):
    model = randomized(inject(vit(), LoraConfig(rank=4, alpha=6.0, targets=(target,), use_rslora=True),
                              name="rs", verbose=False))
    linear = model.blocks[1].get_submodule(TARGET_PATHS[target])
    assert isinstance(linear, LoraLinear)
    branch = linear.lora["rs"]
    x = torch.randn(2, 5, linear.in_features, device=DEVICE, requires_grad=True)
    out = linear(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    x64 = x.detach().double().requires_grad_(True)
    a64, b64 = (p.detach().double().requires_grad_(True) for p in (branch.lora_A, branch.lora_B))
    expected = nn.functional.linear(x64, linear.weight.double(), linear.bias.double()) + (
        6.0 / math.sqrt(4)) * (x64 @ a64.T) @ b64.T
    expected.backward(grad_out.double())
    assert relative_error(out, expected) < 1e-5
    for got, want in ((x.grad, x64.grad), (branch.lora_A.grad, a64.grad), (branch.lora_B.grad, b64.grad)):
        assert relative_error(got, want) < 1e-5


def test_merge_save_and_load_keep_it(tmp_path):
    model = randomized(inject(vit(), LoraConfig(rank=4, alpha=6.0, targets=("qkv", "fc1"), use_rslora=True),
                              name="rs", verbose=False))
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        expected = model(images)
    save_adapters(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert json.dumps(saved).count('"use_rslora": true') == 1
    fresh = vit()
    load_adapters(fresh, tmp_path)
    assert adapter_configs(fresh)["rs"].use_rslora
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images), expected, rtol=1e-5, atol=1e-5)
        merge_adapters(fresh, "rs")
        torch.testing.assert_close(fresh(images), expected, rtol=1e-4, atol=1e-4)


def test_files_without_the_field_load_as_plain_lora(tmp_path):
    model = randomized(inject(vit(), LoraConfig(rank=4, alpha=6.0), name="plain", verbose=False))
    save_adapters(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    text = json.dumps(data)
    assert '"use_rslora": false' in text
    path.write_text(text.replace(', "use_rslora": false', "").replace('"use_rslora": false, ', ""))
    assert "use_rslora" not in path.read_text()
    fresh = vit()
    load_adapters(fresh, tmp_path)
    set_adapter(fresh, "plain")
    assert not adapter_configs(fresh)["plain"].use_rslora
    images = torch.randn(2, 3, IMG, IMG).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images), model(images), rtol=1e-5, atol=1e-5)
