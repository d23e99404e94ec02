"""The ops' host side: no host sync in any op's forward or backward (CUDA graphs and
torch.compile's "reduce-overhead" mode depend on it), and the eager path past the dispatcher
(kernels/customop.py) computes what the custom ops compute, bit for bit."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fused_adapters.kernels import bottleneck_adapter, lora_linear, sparse_adapter, use_variant
from fused_adapters.kernels.bottleneck import plan as bottleneck_plan
from fused_adapters.kernels.launch import Launch
from fused_adapters.kernels.paths import is_interpreted
from fused_adapters.kernels.lora import plan as lora_plan
from fused_adapters.kernels.sparse import op as sparse_op
from fused_adapters.kernels.sparse import plan as sparse_plan
from fused_adapters.kernels.sparse import routed_adapter_unchecked
from helpers import DEVICE

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not is_interpreted(), reason="the kernels' path needs the "
                                "interpreter or CUDA")


def calls():
    """(name, forward callable, the inputs it differentiates) for every op and form."""
    generator = torch.Generator().manual_seed(0)
    rows, dim, rank, experts = 37, 32, 4, 6

    def randn(*shape, std=1.0, grad=True):
        return (torch.randn(*shape, generator=generator) * std).to(DEVICE).requires_grad_(grad)

    x = randn(rows, dim)
    bottleneck = [randn(rank, dim, std=dim ** -0.5), randn(rank), randn(dim, rank, std=0.5), randn(dim), randn(dim)]
    lora = [randn(3 * dim, dim, std=dim ** -0.5, grad=False), randn(3 * dim, grad=False),
            randn(rank, dim, std=dim ** -0.5), randn(3 * dim, rank, std=0.5)]
    experts_params = [randn(experts, rank, dim, std=dim ** -0.5), randn(experts, rank),
                      randn(experts, dim, rank, std=0.5), randn(experts, dim), randn(dim)]
    gate = [randn(experts, dim, std=dim ** -0.5), randn(experts)]
    idx = torch.randint(0, experts, (rows, 2), generator=generator).to(DEVICE)
    weight = randn(rows, 2)

    def lora_form(form):
        def call():
            with use_variant("lora_linear", form):
                return lora_linear(x, *lora, 0.5)
        return call

    found = [("bottleneck", lambda: bottleneck_adapter(x, *bottleneck, residual=x), [x, *bottleneck])]
    found += [(f"lora[{form}]", lora_form(form), [x, *lora[2:]]) for form in ("default", "single_launch")]
    for design in ("default", "grouped"):
        found.append((f"sparse[{design}]", lambda design=design: sparse_adapter(
            x, *gate, *experts_params, top_k=2, residual=x, variant=design), [x, *gate, *experts_params]))
        found.append((f"routed[{design}]", lambda design=design: routed_adapter_unchecked(
            x, idx, weight, *experts_params, residual=x, variant=design), [x, weight, *experts_params]))
    return found


CALLS = calls()


@pytest.mark.parametrize("name, forward, inputs", CALLS, ids=[call[0] for call in CALLS])
def test_no_host_sync_forward_or_backward(name, forward, inputs, monkeypatch):
    # The launches are the device's work (and the interpreter's own numpy copies would look like
    # syncs): replaced by no-ops, what runs is the host side alone, and nothing there may read a
    # tensor's value back to the host or branch on one.
    monkeypatch.setattr(Launch, "__call__", lambda self: None)
    # What the launches would have written: zeros (valid expert indices for the grouped sort).
    for module in (bottleneck_plan, lora_plan, sparse_plan, sparse_op):
        monkeypatch.setattr(module, "new_output", lambda shape, dtype, device: torch.zeros(shape, dtype=dtype,
                                                                                         device=device))

    def sync(*args, **kwargs):
        raise AssertionError("a host sync on an op's hot path")

    for method in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, method, sync)
    y = forward()
    torch.autograd.grad(y, inputs, torch.ones_like(y))


class Recorder(TorchDispatchMode):
    """A dispatch mode that changes nothing: with it active, the ops go through their custom ops."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.namespace))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name, forward, inputs", CALLS, ids=[call[0] for call in CALLS])
def test_eager_path_equals_the_custom_op(name, forward, inputs):
    def run():
        y = forward()
        return [y.detach(), *torch.autograd.grad(y, inputs, torch.ones_like(y))]

    eager = run()
    recorder = Recorder()
    with recorder:
        dispatched = run()
    assert "fused_adapters" in recorder.ops
    for got, want in zip(eager, dispatched):
        assert torch.equal(got, want), name
