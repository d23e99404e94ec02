"""What every op's torch.library custom ops share: registration with their fake and autograd,
calls by name, an eager path past the dispatcher, and the refusal of double backward.

Each fused op is a forward custom op (with autograd) and a backward custom op, so torch.compile
sees one node for each. In eager mode the dispatcher's Python side of a custom op with autograd
costs about 110 us a call with 15 arguments (measured on 2 CPU cores: schema handling and
default filling per argument), which alone is twice the whole host budget of a forward; an
autograd.Function with the same setup_context and backward costs about 12 us. So a call takes
the custom op wherever the op must be one node or see what traces it (torch.compile, fake or
other tensor subclasses, an active dispatch mode such as the byte counter), and otherwise runs
the same implementation through the autograd.Function.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

__all__ = ["FusedOp", "refuse_double_backward", "wants_grad"]


def _through_dispatcher(first: torch.Tensor) -> bool:
    """Whether a call must go through the custom op: something traces it or wraps its tensors."""
    return (torch.compiler.is_compiling() or type(first) is not torch.Tensor
            or torch._C._len_torch_dispatch_stack() > 0)


class FusedOp:
    """The custom op fused_adapters::`name` with implementation `impl` (its inputs by name: the
    signature's), `fake` and, for a forward op, autograd by `setup_context` and `backward`
    (which get the inputs as a dict by name and return the gradients as a dict by name).

    Call it with keywords: op(x=..., w_down=..., ...)."""

    def __init__(self, name: str, impl: Callable, fake: Callable,
                 setup_context: Optional[Callable] = None, backward: Optional[Callable] = None):
        self.name = name
        self.impl = impl
        parameters = inspect.signature(impl).parameters
        self.names = tuple(parameters)
        # The dispatcher leaves trailing arguments that equal their defaults out of what autograd's
        # setup and backward see: they get them back from here.
        self.defaults = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
        self.op = torch.library.custom_op(f"fused_adapters::{name}", impl, mutates_args=())
        self.op.register_fake(fake)
        self.eager = None
        if backward is not None:
            names, defaults = self.names, self.defaults

            def setup(ctx, inputs, output):
                setup_context(ctx, {**defaults, **dict(zip(names, inputs))}, output)

            def backward_by_name(ctx, *grads):
                needs = {name: False for name in names}
                needs.update(zip(names, ctx.needs_input_grad))
                result = backward(ctx, needs, *grads)
                return tuple(result.get(name) if needs[name] else None for name in names)

            self.op.register_autograd(backward_by_name, setup_context=setup)

            class Eager(torch.autograd.Function):
                @staticmethod
                def forward(ctx, *inputs):
                    output = impl(*inputs)
                    setup(ctx, inputs, output)
                    return output

                @staticmethod
                def backward(ctx, *grads):
                    return backward_by_name(ctx, *grads)

            Eager.__name__ = Eager.__qualname__ = f"{name}_function"
            self.eager = Eager

    def __call__(self, **inputs):
        args = [inputs[name] if name in inputs else self.defaults[name] for name in self.names]
        if _through_dispatcher(args[0]):
            return self.op(*args)
        if self.eager is not None and wants_grad(*args):
            return self.eager.apply(*args)
        return self.impl(*args)


def wants_grad(*tensors) -> bool:
    """Whether autograd records a call on these tensors (None and non-tensors ignored): then its
    forward saves what its backward needs."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def refuse_double_backward(op: str, reference: str) -> None:
    """Autograd runs a backward with grad mode on only for create_graph=True. The hand-written
    backward kernels have no backward of their own: say so now, not at the second backward."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op} does not support double backward (create_graph=True / higher-order gradients); "
                           f"run that computation with fused_adapters.kernels.reference.{reference}")
