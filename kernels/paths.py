"""Which path an op takes for its tensors: the Triton kernels compiled for CUDA ("triton"), the
same kernels in Triton's interpreter ("interpreter", TRITON_INTERPRET=1 set before triton was
imported), or the plain-PyTorch reference ("reference"). One rule for every op, asked inside
each op's custom op (so torch.compile sees one node whatever the path), and one warning when a
CUDA call falls back.

The rule: the reference runs for any input dtype the kernels do not take (float64, ...), for a
rank above MAX_RANK (the kernels hold a rank tile in registers), for bf16 under the interpreter
(it has no bf16) and for tensors on a device the kernels cannot run on (a CPU without the
interpreter). Everything else takes the kernels.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

import torch
import triton

from .checks import MAX_RANK, check_float_tensor

__all__ = ["backend", "uses_triton", "is_interpreted", "reference_reason", "kernel_path", "takes_triton",
           "use_kernels", "warn_reference", "MAX_RANK", "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _probe():
    pass


def is_interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1 was set before import)."""
    return not isinstance(_probe, triton.runtime.JITFunction)


def reference_reason(device_type: str, dtypes, rank: int = 0) -> Optional[str]:
    """Why tensors on this device with these dtypes (x, compute, output, residual, parameters)
    and this rank take the plain-PyTorch reference, in words; None when they take the kernels."""
    others = [dtype for dtype in dtypes if dtype not in KERNEL_DTYPES]
    if others:
        return f"a {_dtype_name(others[0])} input (the kernels take float16, bfloat16 or float32)"
    if rank > MAX_RANK:
        return f"rank {rank} > {MAX_RANK} (the kernels hold a rank tile in registers)"
    if is_interpreted():
        # The interpreter has no bf16 (tl.dot multiplies the raw bit patterns): bf16 anywhere
        # takes the reference, CUDA tensors included, rather than a silently wrong answer.
        if torch.bfloat16 in dtypes:
            return "bfloat16 under TRITON_INTERPRET=1 (Triton's interpreter has no bf16)"
        if device_type not in ("cpu", "cuda"):
            return f"{device_type} tensors (Triton's interpreter runs CPU and CUDA tensors)"
        return None
    if device_type != "cuda":
        return f"{device_type} tensors without TRITON_INTERPRET=1 (the kernels need CUDA or the interpreter)"
    return None


def kernel_path(device_type: str, dtypes, rank: int = 0) -> str:
    """The path tensors on this device with these dtypes and this rank take: "triton",
    "interpreter" or "reference"."""
    if reference_reason(device_type, dtypes, rank) is not None:
        return "reference"
    return "interpreter" if is_interpreted() else "triton"


def takes_triton(device_type: str, dtypes, rank: int = 0) -> bool:
    """Whether they take the Triton kernels (CUDA, or anywhere under TRITON_INTERPRET=1)."""
    return kernel_path(device_type, dtypes, rank) != "reference"


def use_kernels(op: str, device_type: str, dtypes, rank: int = 0) -> bool:
    """The rule as the ops ask it: True to run the kernels; False to run the reference, having
    warned (once per op and reason) where that happens on CUDA."""
    reason = reference_reason(device_type, dtypes, rank)
    if reason is None:
        return True
    warn_reference(op, device_type, reason=reason)
    return False


def backend(tensor: torch.Tensor) -> str:
    """Which path the fused ops take, here and now, for `tensor` as their x argument at the
    ambient torch.autocast state:

    - "triton": the compiled Triton kernels (CUDA tensors in fp16, bf16 or fp32);
    - "interpreter": the same kernels in Triton's interpreter (TRITON_INTERPRET=1 was set before
      triton was imported; CPU or CUDA tensors in fp16 or fp32: the interpreter has no bf16);
    - "reference": the plain-PyTorch reference in kernels.reference (a CPU tensor without the
      interpreter; float64 anywhere; bf16, or a bf16 autocast, under the interpreter).

    Every op chooses its path with this rule, given x's device, x's dtype and the compute dtype
    (autocast's, else x's); the call's other tensors count too, so a float64 parameter or
    residual (or, under the interpreter, a bf16 one) sends a call to the reference whatever this
    says, as does a rank above MAX_RANK. A CUDA call that falls back warns once.
    Raises TypeError unless `tensor` is a floating-point torch.Tensor.
    """
    from .reference import compute_dtype

    check_float_tensor("tensor", tensor)
    return kernel_path(tensor.device.type, (tensor.dtype, compute_dtype(tensor)))


def uses_triton(x: torch.Tensor) -> bool:
    """Whether x takes the Triton kernels here (CUDA, or the interpreter under TRITON_INTERPRET=1),
    at the ambient autocast state, or the plain-PyTorch reference: backend(x) != "reference"."""
    return backend(x) != "reference"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# The messages warn_reference has given: each once per process.
_warned: set = set()
_KERNELS_DIR = os.path.dirname(os.path.abspath(__file__))
# Frames in these folders are skipped when warn_reference names the caller: the kernels, their
# sibling fused_adapters.adapters, and torch (torch.library's dispatch, nn.Module.__call__).
_INTERNAL_DIRS = tuple(os.path.join(folder, "") for folder in (
    _KERNELS_DIR, os.path.join(os.path.dirname(_KERNELS_DIR), "adapters"),
    os.path.dirname(os.path.abspath(torch.__file__)),
))


def _caller_stacklevel() -> int:
    """warn_reference's stacklevel for the first frame outside the package and torch: the
    user's call, not torch.library's dispatch into an op's implementation."""
    frame, level = sys._getframe(2), 2  # frame 1 is warn_reference; stacklevel 2 its caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


def warn_reference(op: str, device_type: str, dtypes=(), reason: Optional[str] = None) -> None:
    """Called where `op` falls back to the plain-PyTorch reference: on CUDA, warn (once per op and
    reason) that the reference runs instead of the fused kernels, slower. Elsewhere nothing: the
    reference is the normal path of a CPU without the interpreter. reason: the words for it,
    default reference_reason(device_type, dtypes). Skipped while torch.compile traces (dynamo
    cannot trace warnings.warn in a fullgraph compile)."""
    if device_type != "cuda" or torch.compiler.is_compiling():
        return
    if reason is None:
        reason = reference_reason(device_type, dtypes) or f"dtypes {sorted({_dtype_name(d) for d in dtypes})}"
    message = (f"{op} on CUDA: {reason}, so the plain-PyTorch reference runs instead of the fused Triton "
               f"kernels (slower, more memory)")
    if message in _warned:
        return
    _warned.add(message)
    warnings.warn(message, stacklevel=_caller_stacklevel())
