"""Shared by the tests: fresh random inputs, the float64 reference, relative errors, and
counters for Triton launches and aten ops."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fused_adapters.kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# ||out - ref|| / ||ref|| against float64. fp32 on the interpreter is exact fp32 arithmetic;
# on a GPU fp32 dots are ieee unless tf32 is allowed. fp16/bf16 round the operands.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

NO_CUDA_REASON = (
    "needs a CUDA GPU: Triton's interpreter has no bf16 (tl.dot multiplies the raw bit patterns; "
    "maintainers: 'we just don't support it yet'), and real launches need a device"
)


@dataclasses.dataclass
class Case:
    """Everything one call of bottleneck_adapter takes, as leaf tensors."""

    x: torch.Tensor
    w_down: torch.Tensor
    b_down: Optional[torch.Tensor]
    w_up: torch.Tensor
    b_up: Optional[torch.Tensor]
    scale: object
    residual: Optional[torch.Tensor]
    row_scale: Optional[torch.Tensor]
    activation: str

    def call(self, fn, **overrides):
        kwargs = dict(activation=self.activation, residual=self.residual, row_scale=self.row_scale)
        kwargs.update(overrides)
        return fn(self.x, self.w_down, self.b_down, self.w_up, self.b_up, self.scale, **kwargs)

    def differentiable(self) -> dict:
        names = ["x", "w_down", "b_down", "w_up", "b_up", "scale", "residual"]
        return {
            n: getattr(self, n) for n in names
            if isinstance(getattr(self, n), torch.Tensor) and getattr(self, n).requires_grad
        }

    def float64(self) -> "Case":
        """A detached float64 copy that requires grad: the reference case."""

        def cast(t):
            if not isinstance(t, torch.Tensor):
                return t
            out = t.detach().to(torch.float64)
            return out.requires_grad_(t.requires_grad)

        return Case(**{f.name: cast(getattr(self, f.name)) for f in dataclasses.fields(self)})


def make_case(
    shape=(37, 45),
    rank=5,
    dtype=torch.float32,
    param_dtype=None,
    activation="gelu",
    bias=True,
    scale="channel",
    residual=True,
    row_scale=True,
    device=DEVICE,
    requires_grad=True,
    generator=None,
    dim_out=None,
) -> Case:
    """Fresh random inputs (never zeros). scale: None, "float", "scalar" (0-d), "one" ([1]) or "channel".
    dim_out: the output width of a width-changing bottleneck (default x's D)."""
    param_dtype = param_dtype or dtype
    dim = shape[-1]
    dim_out = dim if dim_out is None else dim_out
    rows = 1
    for size in shape[:-1]:
        rows *= size

    def randn(*size, dt, std=1.0):
        size = tuple(size)
        t = torch.randn(size, generator=generator, dtype=torch.float32) * std
        return t.to(device=device, dtype=dt).requires_grad_(requires_grad)

    # Weights sized so the pre-activation is O(1) and every activation's curve matters.
    x = randn(*shape, dt=dtype)
    w_down = randn(rank, dim, dt=param_dtype, std=dim ** -0.5)
    w_up = randn(dim_out, rank, dt=param_dtype, std=rank ** -0.5)
    b_down = randn(rank, dt=param_dtype, std=0.5) if bias else None
    b_up = randn(dim_out, dt=param_dtype, std=0.5) if bias else None
    scale_value = {
        None: None,
        "float": 0.7,
        "scalar": randn(dt=param_dtype),
        "one": randn(1, dt=param_dtype),
        "channel": randn(dim_out, dt=param_dtype),
    }[scale]
    res = randn(*shape[:-1], dim_out, dt=dtype) if residual else None
    rs = (torch.rand(rows, generator=generator) + 0.5).to(device) if row_scale else None
    return Case(x, w_down, b_down, w_up, b_up, scale_value, res, rs, activation)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values (an unwritten, NaN-poisoned element?)"
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())


@contextlib.contextmanager
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN (an integer one as an index far out of
    range), so an unwritten element shows up."""
    from fused_adapters.kernels.bottleneck import plan as bottleneck_plan
    from fused_adapters.kernels.fusion import plan as fusion_plan
    from fused_adapters.kernels.lora import plan as lora_plan
    from fused_adapters.kernels.sparse import op as sparse_op
    from fused_adapters.kernels.sparse import plan as sparse_plan

    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan") if dtype.is_floating_point else 2**30, dtype=dtype, device=device)

    for module in (bottleneck_plan, fusion_plan, lora_plan, sparse_plan, sparse_op):
        monkeypatch.setattr(module, "new_output", nan_output)
    yield


def force_reference(monkeypatch) -> None:
    """Every op takes its plain-PyTorch path: the one rule (kernels/paths.py) answers "reference"."""
    from fused_adapters.kernels import paths

    monkeypatch.setattr(paths, "reference_reason", lambda device_type, dtypes, rank=0: "a test forcing the reference")


@contextlib.contextmanager
def allow_tf32(value: bool):
    """torch.backends.cuda.matmul.allow_tf32 set for the block (a property, so no monkeypatch)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = value
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


class LaunchCounter:
    """Counts Triton kernel launches, by kernel name, on the GPU and in the interpreter."""

    def __init__(self):
        self.names: list[str] = []
        self.in_kernel = False

    @contextlib.contextmanager
    def patch(self, monkeypatch):
        import triton.runtime.interpreter as interpreter
        import triton.runtime.jit as jit

        counter = self
        for cls in (interpreter.InterpretedFunction, jit.JITFunction):
            original = cls.run

            def run(fn_self, *args, _original=original, **kwargs):
                counter.names.append(fn_self.fn.__name__)
                counter.in_kernel = True
                try:
                    return _original(fn_self, *args, **kwargs)
                finally:
                    counter.in_kernel = False

            monkeypatch.setattr(cls, "run", run)
        yield self


def custom_op_impl(name: str):
    """The Python implementation of the custom op fused_adapters::name."""
    from fused_adapters.kernels.bottleneck import op as bottleneck_op
    from fused_adapters.kernels.fusion import op as fusion_op
    from fused_adapters.kernels.lora import op as lora_op
    from fused_adapters.kernels.sparse import op as sparse_op

    ops = {fused.name: fused for module in (bottleneck_op, fusion_op, lora_op, sparse_op)
           for fused in (module.forward_op, module.backward_op)}
    return ops[name].impl


class AtenRecorder(TorchDispatchMode):
    """Records the aten ops the host side runs (outside Triton launches: the interpreter's own
    host copies are no part of a GPU launch) with the shapes of what they return."""

    def __init__(self, launches: Optional[LaunchCounter] = None):
        super().__init__()
        self.launches = launches
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fused_adapters":
            # Our custom ops are one node to the dispatcher; record what their implementation runs.
            with self:
                return custom_op_impl(func.overloadpacket.__name__)(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if self.launches is None or not self.launches.in_kernel:
            outs = out if isinstance(out, (tuple, list)) else [out]
            shapes = [tuple(t.shape) for t in outs if isinstance(t, torch.Tensor)]
            self.ops.append((str(func.overloadpacket.__name__), shapes))
        return out


def reference_grads(case: Case, grad_out: torch.Tensor):
    """Forward and gradients of the float64 reference."""
    ref_case = case.float64()
    out = ref_case.call(reference.bottleneck_adapter)
    inputs = ref_case.differentiable()
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out.to(torch.float64))
    return out, dict(zip(inputs, grads))


def check_against_float64(call, fn, reference_fn, tensors: dict, tolerance: float, grad_tolerance=None,
                          seed: int = 0) -> dict:
    """call(fn, tensors) against call(reference_fn, float64 copies of tensors): the output, and
    the gradient of every tensor that requires grad for a seeded random output gradient, each
    within tolerance (grad_tolerance for the gradients; default the same) as ||out - ref|| /
    ||ref||, each gradient in its input's dtype and shape. Integer tensors (routing indices) go
    to both calls as they are. Returns the errors by name ("y", "dx", ...)."""
    out = call(fn, tensors)
    wide = {name: t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
            for name, t in tensors.items()}
    expected = call(reference_fn, wide)
    names = [name for name, t in tensors.items() if t.requires_grad]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    got = torch.autograd.grad(out, [tensors[name] for name in names], grad_out)
    want = torch.autograd.grad(expected, [wide[name] for name in names], grad_out.double())
    errors = {"y": relative_error(out, expected)}
    bounds = {"y": tolerance}
    for name, grad, ref in zip(names, got, want):
        tensor = tensors[name]
        assert grad.dtype == tensor.dtype and grad.shape == tensor.shape, \
            f"d{name}: {grad.dtype} {tuple(grad.shape)}, not {tensor.dtype} {tuple(tensor.shape)}"
        errors["d" + name] = relative_error(grad, ref)
        bounds["d" + name] = tolerance if grad_tolerance is None else grad_tolerance
    bad = {name: error for name, error in errors.items() if not error <= bounds[name]}
    assert not bad, f"relative errors over their bounds {bounds}: {bad}"
    return errors
