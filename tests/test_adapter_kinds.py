"""adapters/kinds.py: a new adapter kind is one file plus its registration. A toy kind, a learned
bias on the logits, written the way bottleneck.py, lora.py and losa.py are (the TOY block below
is all it takes), works with every public call: inject, set, disable, routing and merge
refusals, save/load, delete, the refusal guarantees."""

import dataclasses
import inspect

import pytest
import timm
import torch
from torch import nn

from fused_adapters.adapters import (
    AdapterConfig,
    AdapterKind,
    active_adapter,
    adapter_configs,
    delete_adapter,
    disable_adapters,
    inject,
    load_adapters,
    merge_adapters,
    register_kind,
    save_adapters,
    set_adapter,
    task_routing,
    trainable_parameters,
)
from fused_adapters.adapters.config import ConfigDict
from fused_adapters.adapters.kinds import Built, unregister_kind
from fused_adapters.adapters.record import record_of
from helpers import DEVICE

# TOY: the whole kind -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LogitBiasConfig(ConfigDict):
    """A learned bias on the model's logits (init `init`)."""

    init: float = 0.0
    train_head: bool = False


class LogitBiasKind(AdapterKind):
    file_kind = "logit_bias"
    config_class = LogitBiasConfig
    noun = "a logit bias"

    def build(self, model, name, config, record):
        bias = nn.ParameterDict({"bias": nn.Parameter(torch.full((model.num_classes,), config.init))})

        def attach():
            if not hasattr(model, "logit_bias"):
                model.logit_bias = nn.ModuleDict()
                model.register_forward_hook(_add_bias)
            model.logit_bias[name] = bias

        return Built({"logit_bias": bias}, attach)

    def modules(self, model, name):
        return {"logit_bias": model.logit_bias[name]} if name in getattr(model, "logit_bias", {}) else {}

    def remove(self, model, name):
        del model.logit_bias[name]
        if not len(model.logit_bias):
            del model.logit_bias
            for key, hook in list(model._forward_hooks.items()):
                if hook is _add_bias:
                    del model._forward_hooks[key]


def _add_bias(model, args, out):
    name = record_of(model).running
    return out + model.logit_bias[name]["bias"] if name in model.logit_bias else out


# The toy at work -----------------------------------------------------------------------------


@pytest.fixture
def toy_kind():
    kind = register_kind(LogitBiasKind())
    yield kind
    unregister_kind(kind)


def vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=32).to(DEVICE).eval()


def test_the_toy_kind_is_a_few_dozen_lines():
    source = inspect.getsource(LogitBiasConfig) + inspect.getsource(LogitBiasKind) + inspect.getsource(_add_bias)
    assert len(source.splitlines()) < 50


def test_a_registered_kind_works_with_every_public_call(toy_kind, tmp_path):
    model = vit()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        base = model(x)
    inject(model, AdapterConfig(), name="plain", verbose=False)
    inject(model, LogitBiasConfig(init=0.5), name="shift", verbose=False)
    assert active_adapter(model) == "shift" and trainable_parameters(model)[0] == 5
    with torch.no_grad():
        torch.testing.assert_close(model(x), base + 0.5)
        with disable_adapters(model):
            torch.testing.assert_close(model(x), base)
        set_adapter(model, "plain")
        torch.testing.assert_close(model(x), base, atol=1e-2, rtol=0)  # Houlsby init: ~ the backbone
        assert not torch.equal(model(x), base + 0.5)
    with pytest.raises(ValueError, match="cannot merge adapter 'shift': it is a logit bias"):
        merge_adapters(model, "shift")
    with pytest.raises(ValueError, match="'shift' is a logit bias"):
        with task_routing(model, ["plain", "shift"]):
            pass
    model.logit_bias["shift"]["bias"].data.fill_(2.0)
    folder = save_adapters(model, tmp_path / "shift", name="shift")
    fresh = vit()
    load_adapters(fresh, folder)
    assert adapter_configs(fresh) == {"shift": LogitBiasConfig(init=0.5)}
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), base + 2.0)
    delete_adapter(fresh, "shift")
    assert not hasattr(fresh, "logit_bias") and not fresh._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), base)
