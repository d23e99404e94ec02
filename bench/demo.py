"""Run the fused bottleneck adapter once and compare it with the plain-PyTorch reference.

    python bench/demo.py [--rows 394] [--dim 768] [--rank 8]

On a CUDA machine the Triton kernels run on the GPU (fp32, fp16, bf16) and the demo also times
forward+backward against eager PyTorch, for every kernel variant. Without CUDA it runs the same
kernels in Triton's interpreter (fp32, fp16). It prints, per dtype, the relative error of the
output and of every gradient against a float64 reference (pass or FAIL against the tests'
bound), the Triton launches per pass (pass or FAIL against the design's 1 and 2), the bytes
kept for backward by the fused op and by eager PyTorch, and (in the interpreter) the bytes each
moves against the floor. It exits non-zero when a check fails. The benchmark suite
(pytest --benchmark) is the place for real measurements; this is the smoke test a new user
runs first.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import triton  # noqa: E402
import triton.runtime.interpreter  # noqa: E402
import triton.runtime.jit  # noqa: E402

from fused_adapters.kernels import bottleneck_adapter, list_variants, reference, use_variant, uses_triton  # noqa: E402
from fused_adapters.kernels.paths import is_interpreted  # noqa: E402

# ||out - ref|| / ||ref|| against float64, as the tests bound it.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


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
    from fused_adapters.tools.byte_count import count_bytes

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
    failures = 0
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

        name = str(dtype).replace("torch.", "")
        limit = TOLERANCE[dtype]
        names = ["y", "dx", "dw_down", "db_down", "dw_up", "db_up", "dscale"]
        errors = [err(out, ref_out)] + [err(g, r) for g, r in zip(grads, ref_grads)]
        errors_ok = all(e <= limit for e in errors)
        # The plain-PyTorch reference (a CPU without the interpreter) launches nothing.
        launches_ok = (forward_launches, backward_launches) == ((1, 2) if uses_triton(x) else (0, 0))
        failures += (not errors_ok) + (not launches_ok)
        print(f"\n{name}")
        print(f"  relative error against a float64 reference, ||out - ref|| / ||ref|| (limit {limit:.0e}): "
              f"{verdict(errors_ok)}")
        print("    " + "  ".join(f"{n} {e:.1e}" for n, e in zip(names, errors)))
        print(f"  Triton launches: forward {forward_launches}, backward {backward_launches} "
              f"(the design: {'1 and 2' if uses_triton(x) else '0 on the reference path'}): {verdict(launches_ok)}")
        kept = " (the M x r pre-activation)" if uses_triton(x) else " (the reference path recomputes)"
        print(f"  kept for backward beyond the inputs: fused {fused_saved / 1024:.0f} KiB{kept}, "
              f"eager {eager_saved / 1024:.0f} KiB")
        if is_interpreted() and uses_triton(x):
            print("  bytes moved / floor, launches planned for a 132-SM GPU (floor: read x and write y "
                  "forward; read dy and x, write dx backward):")
            print("    " + bytes_line(fused, eager, tensors, grad))
        if device == "cuda":
            def step(fn):
                out = fn(*tensors)
                torch.autograd.grad(out, tensors, grad)

            eager_ms = triton.testing.do_bench(lambda: step(eager), return_mode="median")
            timings = {}
            for variant in list_variants("bottleneck_adapter"):
                with use_variant("bottleneck_adapter", variant):
                    timings[variant] = triton.testing.do_bench(lambda: step(fused), return_mode="median")
            fastest = min(timings, key=timings.get)
            print(f"  forward+backward median time (triton.testing.do_bench): eager {eager_ms * 1e3:.0f} us, "
                  f"fused {timings['default'] * 1e3:.0f} us ({eager_ms / timings['default']:.2f}x faster)")
            print("    by kernel variant: " + ", ".join(f"{v} {t * 1e3:.0f} us" for v, t in timings.items())
                  + f"; fastest here: {fastest}")
    print(f"\n{'all checks passed' if not failures else f'{failures} check(s) FAILED'}")
    return 1 if failures else 0


def verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


if __name__ == "__main__":
    sys.exit(main())
