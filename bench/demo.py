"""Run the fused bottleneck adapter once and compare it with the plain-PyTorch reference.

    python bench/demo.py [--rows 394] [--dim 768] [--rank 8]

On a CUDA machine the Triton kernels run on the GPU (fp32, fp16, bf16) and the demo also times
forward+backward against eager PyTorch. Without CUDA it runs the same kernels in Triton's
interpreter (fp32, fp16). It prints, per dtype, the relative error of the output and of every
gradient against a float64 reference, the Triton launches per pass, the bytes kept for
backward by the fused op and by eager PyTorch, and (in the interpreter) the bytes each moves
against the floor. The benchmark suite (pytest --benchmark) is the
place for real measurements; this is the smoke test a new user runs first.
"""

from __future__ import annotations

import argparse
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import triton  # noqa: E402
import triton.runtime.interpreter  # noqa: E402
import triton.runtime.jit  # noqa: E402

from fused_adapters.kernels import bottleneck_adapter, reference, uses_triton  # noqa: E402
from fused_adapters.kernels.launch import is_interpreted, launch_plan, sm_count  # noqa: E402


def count_launches():
    names = []
    for cls in (triton.runtime.interpreter.InterpretedFunction, triton.runtime.jit.JITFunction):
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            names.append(self.fn.__name__)
            return _original(self, *args, **kwargs)

        cls.run = run
    return names


def saved_bytes(fn, tensors):
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*tensors)
    leaves = {t.untyped_storage().data_ptr() for t in tensors}
    # What the pass allocated to keep: inputs and parameters kept by reference cost nothing extra.
    extra = sum(t.numel() * t.element_size() for t in seen.values() if t.untyped_storage().data_ptr() not in leaves)
    return out, extra


def bytes_line(fused, eager, tensors, grad) -> str:
    """Forward and backward bytes against the floor (read x, write y; read dy and x, write dx),
    counted in the interpreter, fused and eager."""
    from fused_adapters.kernels.byte_count import count_bytes

    x = tensors[0]
    floor = x.numel() * x.element_size()
    ratios = []
    for fn in (fused, eager):
        inputs = [t.detach().requires_grad_() for t in tensors]
        with count_bytes(sm_count=132) as forward:
            out = fn(*inputs)
        with count_bytes(sm_count=132) as backward:
            torch.autograd.grad(out, inputs, grad)
        ratios.append((forward.total() / (2 * floor), backward.total() / (3 * floor)))
    (fused_forward, fused_backward), (eager_forward, eager_backward) = ratios
    return (f"fused forward {fused_forward:.2f}x backward {fused_backward:.2f}x; "
            f"eager forward {eager_forward:.2f}x backward {eager_backward:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=394, help="tokens (2 images of 197 at ViT-B/16)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    path = "Triton on " + torch.cuda.get_device_name() if device == "cuda" else "Triton interpreter (no CUDA)"
    if not uses_triton(torch.empty(1, device=device)):
        path = "plain-PyTorch reference"
    print(f"fused bottleneck adapter: rows={args.rows} dim={args.dim} rank={args.rank}, {path}")
    launches = count_launches()
    torch.manual_seed(0)
    for dtype in dtypes:
        x = torch.randn(args.rows, args.dim, device=device, dtype=dtype, requires_grad=True)
        params = [
            (torch.randn(args.rank, args.dim, device=device) * args.dim ** -0.5).requires_grad_(),
            (torch.randn(args.rank, device=device) * 0.5).requires_grad_(),
            (torch.randn(args.dim, args.rank, device=device) * args.rank ** -0.5).requires_grad_(),
            (torch.randn(args.dim, device=device) * 0.5).requires_grad_(),
            torch.randn(args.dim, device=device).requires_grad_(),  # channel-wise scale (Adapter+)
        ]
        tensors = [x, *params]

        def fused(x, *p):
            return bottleneck_adapter(x, *p, residual=x)

        def eager(x, *p):
            return reference.bottleneck_adapter(x, *p, residual=x)

        del launches[:]
        out, fused_saved = saved_bytes(fused, tensors)
        forward_launches = len(launches)
        grad = torch.randn_like(out)
        del launches[:]
        grads = torch.autograd.grad(out, tensors, grad)
        backward_launches = len(launches)
        _, eager_saved = saved_bytes(eager, [t.detach().requires_grad_() for t in tensors])
        ref_inputs = [t.detach().double().requires_grad_() for t in tensors]
        ref_out = eager(*ref_inputs)
        ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad.double())

        def err(a, b):
            a, b = a.detach().double(), b.detach()
            return float((a - b).norm() / b.norm())

        names = ["x", "w_down", "b_down", "w_up", "b_up", "scale"]
        errors = "  ".join(f"d{n} {err(g, r):.1e}" for n, g, r in zip(names, grads, ref_grads))
        print(f"\n{str(dtype).replace('torch.', ''):>9}: y {err(out, ref_out):.1e}  {errors}")
        print(f"           Triton launches: forward {forward_launches}, backward {backward_launches}")
        print(f"           kept for backward beyond inputs: fused {fused_saved / 1024:.0f} KiB, "
              f"eager {eager_saved / 1024:.0f} KiB")
        if is_interpreted() and uses_triton(x):
            print("           bytes moved / floor (132-SM plan): " + bytes_line(fused, eager, tensors, grad))
        if device == "cuda":
            def step(fn):
                out = fn(*tensors)
                torch.autograd.grad(out, tensors, grad)

            fused_ms = triton.testing.do_bench(lambda: step(fused), return_mode="median")
            eager_ms = triton.testing.do_bench(lambda: step(eager), return_mode="median")
            print(f"           forward+backward median: fused {fused_ms * 1e3:.0f} us, eager {eager_ms * 1e3:.0f} us")
            # The same op planned for a quarter of the SMs: bigger row tiles and fewer partials,
            # half the programs per SM. Which plan wins is a GPU question.
            sms = sm_count(x.device)
            with launch_plan(max(1, sms // 4)):
                coarse_ms = triton.testing.do_bench(lambda: step(fused), return_mode="median")
            print(f"           fused planned for {max(1, sms // 4)} of {sms} SMs: {coarse_ms * 1e3:.0f} us")


if __name__ == "__main__":
    main()
