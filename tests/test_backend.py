"""kernels.backend(x): which path ("triton", "interpreter", "reference") the fused ops take for
x, and that it is the path they actually take; a CUDA call that falls back to the reference warns
once per op and reason, a CPU one never."""

import contextlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

from fused_adapters.kernels import backend, bottleneck_adapter, paths, routed_adapter
from fused_adapters.kernels import sparse_adapter, uses_triton
from helpers import DEVICE, LaunchCounter

interpreter_only = pytest.mark.skipif(not paths.is_interpreted(), reason="needs TRITON_INTERPRET=1")

AUTOCAST = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(name, device=DEVICE):
    dtype = AUTOCAST[name]
    return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def fused_warnings(record):
    return [w for w in record if "plain-PyTorch reference" in str(w.message)]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    # Each test starts with no reference warning given yet (they are once per process).
    monkeypatch.setattr(paths, "_warned", set())


# --------------------------------------------------------------------------------------------
# What backend() says
# --------------------------------------------------------------------------------------------


@interpreter_only
@pytest.mark.parametrize("dtype, want", [
    (torch.float32, "interpreter"), (torch.float16, "interpreter"),
    (torch.float64, "reference"), (torch.bfloat16, "reference"),
])
def test_cpu_under_the_interpreter(dtype, want):
    x = torch.ones(2, 8, dtype=dtype)
    assert backend(x) == want
    assert uses_triton(x) == (want != "reference")


@interpreter_only
def test_cpu_autocast_under_the_interpreter():
    x = torch.ones(2, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        assert backend(x) == "interpreter"
        assert backend(x.double()) == "reference"  # autocast leaves float64 alone
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert backend(x) == "reference"  # the compute dtype is bf16: no bf16 in the interpreter
    # autocast on another device type changes nothing for a CPU tensor
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
        assert backend(x) == "interpreter"


def test_the_rule(monkeypatch):
    # The decision itself, for every device type and mode, without a GPU.
    monkeypatch.setattr(paths, "is_interpreted", lambda: False)
    assert paths.kernel_path("cuda", (torch.float16, torch.float16)) == "triton"
    assert paths.kernel_path("cuda", (torch.float32, torch.bfloat16)) == "triton"
    assert paths.kernel_path("cuda", (torch.float64, torch.float64)) == "reference"
    assert paths.kernel_path("cpu", (torch.float32, torch.float32)) == "reference"
    assert "TRITON_INTERPRET" in paths.reference_reason("cpu", (torch.float32,))
    monkeypatch.setattr(paths, "is_interpreted", lambda: True)
    for device in ("cpu", "cuda"):
        assert paths.kernel_path(device, (torch.float32, torch.float16)) == "interpreter"
        assert paths.kernel_path(device, (torch.float32, torch.bfloat16)) == "reference"
        assert paths.kernel_path(device, (torch.float64,)) == "reference"
    assert paths.kernel_path("meta", (torch.float32,)) == "reference"
    for device_type, dtypes in [("cuda", (torch.float16,)), ("cpu", (torch.bfloat16,)), ("cuda", (torch.float64,))]:
        assert paths.takes_triton(device_type, dtypes) == (paths.kernel_path(device_type, dtypes) != "reference")


@pytest.mark.parametrize("bad", [None, 1.5, [1.0, 2.0], torch.ones(2, dtype=torch.int64)])
def test_bad_argument(bad):
    with pytest.raises(TypeError, match="tensor"):
        backend(bad)


def test_cpu_without_the_interpreter_runs_the_reference(tmp_path):
    # TRITON_INTERPRET must be unset before triton is imported: a fresh interpreter. The CPU
    # reference path is the normal one there, so it must not warn (-W error).
    script = (
        "import torch\n"
        "from fused_adapters.kernels import backend, bottleneck_adapter, paths, uses_triton\n"
        "from fused_adapters.kernels.bottleneck import plan\n"
        "assert not paths.is_interpreted()\n"
        "def no_kernels(*args, **kwargs):\n"
        "    raise AssertionError('the kernels ran')\n"
        "plan.forward = plan.backward = no_kernels\n"
        "x = torch.randn(3, 8, requires_grad=True)\n"
        "answers = [backend(x), backend(x.half()), backend(x.double()), uses_triton(x)]\n"
        "with torch.autocast('cpu', dtype=torch.float16):\n"
        "    answers.append(backend(x))\n"
        "y = bottleneck_adapter(x, torch.randn(2, 8), None, torch.randn(8, 2), None, residual=x)\n"
        "y.sum().backward()\n"
        "print(answers)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # on a GPU machine too, a CPU tensor is what is asked about
    done = subprocess.run([sys.executable, "-W", "error", "-c", script], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(["reference", "reference", "reference", False, "reference"])


# --------------------------------------------------------------------------------------------
# backend() agrees with what runs: Triton launches happen exactly when it says they do
# --------------------------------------------------------------------------------------------


def small_call(op, x):
    generator = torch.Generator().manual_seed(0)
    dim, rank, experts = x.shape[-1], 2, 3

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=x.device, dtype=x.dtype)

    if op == "bottleneck":
        return lambda: bottleneck_adapter(x, randn(rank, dim), randn(rank), randn(dim, rank), randn(dim), 0.5,
                                          residual=x)
    w_down, b_down, w_up, b_up = randn(experts, rank, dim), randn(experts, rank), randn(experts, dim, rank), \
        randn(experts, dim)
    if op == "sparse":
        return lambda: sparse_adapter(x, randn(experts, dim), randn(experts), w_down, b_down, w_up, b_up, 0.5,
                                      top_k=2, residual=x)
    idx = torch.randint(0, experts, (x.shape[0], 2), generator=generator).to(x.device)
    return lambda: routed_adapter(x, idx, randn(x.shape[0], 2), w_down, b_down, w_up, b_up, 0.5, residual=x)


@pytest.mark.parametrize("op", ["bottleneck", "sparse", "routed"])
@pytest.mark.parametrize("dtype, autocast_name", [
    (torch.float32, "none"), (torch.float16, "none"), (torch.float64, "none"), (torch.bfloat16, "none"),
    (torch.float32, "fp16"), (torch.float32, "bf16"),
])
def test_backend_is_what_runs(op, dtype, autocast_name, monkeypatch):
    x = torch.randn(5, 16, device=DEVICE).to(dtype)
    call = small_call(op, x)
    counter = LaunchCounter()
    with counter.patch(monkeypatch), autocast(autocast_name), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a float64 call on CUDA warns; that is tested below
        said = backend(x)
        y = call()
    assert said in ("triton", "interpreter", "reference")
    assert bool(counter.names) == (said != "reference"), (said, counter.names)
    assert said != "interpreter" or paths.is_interpreted()
    assert said != "triton" or (x.is_cuda and not paths.is_interpreted())
    assert y.shape == x.shape


# --------------------------------------------------------------------------------------------
# The CUDA fallback warns once; the CPU one never
# --------------------------------------------------------------------------------------------


@pytest.fixture
def pretend_cuda(monkeypatch):
    """The ops' fallbacks on this machine's tensors, warned about as if they were CUDA tensors
    (no GPU needed): the op's own call of warn_reference, with the device type swapped."""
    real = paths.warn_reference

    def as_cuda(op, device_type, dtypes=(), reason=None):
        return real(op, "cuda", dtypes, reason)

    # Filed under the kernels' folder, as the real helper is, so the warning's stacklevel skips it
    # and still has to find the caller outside the package and torch.
    as_cuda.__code__ = as_cuda.__code__.replace(co_filename=paths.__file__)
    monkeypatch.setattr(paths, "warn_reference", as_cuda)


def test_reference_warning_on_cuda_once(pretend_cuda):
    x64 = torch.randn(4, 8, dtype=torch.float64)
    x32 = torch.randn(4, 8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            small_call("bottleneck", x64)()
        first = fused_warnings(record)
        assert len(first) == 1, [str(w.message) for w in record]
        message = str(first[0].message)
        assert "bottleneck_adapter" in message and "float64" in message and "slower" in message
        assert first[0].filename == __file__  # names the caller, not torch.library's dispatch
        for _ in range(2):
            small_call("sparse", x64)()
            small_call("routed", x64)()
        # once per op and reason
        assert [str(w.message).split(" on CUDA")[0] for w in fused_warnings(record)] == \
            ["bottleneck_adapter", "sparse_adapter", "routed_adapter"]
        # a call that takes the kernels adds nothing
        with torch.autocast("cpu", dtype=torch.float16):
            takes_kernels = backend(x32) != "reference"
            small_call("bottleneck", x32)()
        if takes_kernels:
            assert len(fused_warnings(record)) == 3


@interpreter_only
def test_bf16_under_the_interpreter_warns_on_cuda(pretend_cuda):
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        small_call("bottleneck", x)()
        small_call("bottleneck", x)()
    [warning] = fused_warnings(record)
    assert "bfloat16" in str(warning.message) and "interpreter" in str(warning.message)


def test_sparse_rank_above_the_kernels_warns_once(pretend_cuda):
    rank = paths.MAX_RANK + 1
    x = torch.randn(3, 8)
    w_down, w_up = torch.randn(2, rank, 8) * 0.1, torch.randn(2, 8, rank) * 0.1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            sparse_adapter(x, torch.randn(2, 8), None, w_down, None, w_up, None, top_k=1)
    [warning] = fused_warnings(record)
    assert f"rank {rank} > {paths.MAX_RANK}" in str(warning.message)
    assert "sparse_adapter on CUDA" in str(warning.message)


def test_cpu_fallbacks_do_not_warn():
    x64 = torch.randn(4, 8, dtype=torch.float64)
    xbf16 = torch.randn(4, 8, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for x in (x64, xbf16):
            for op in ("bottleneck", "sparse", "routed"):
                small_call(op, x)()
        rank = paths.MAX_RANK + 1
        sparse_adapter(torch.randn(3, 8), torch.randn(2, 8), None, torch.randn(2, rank, 8), None,
                       torch.randn(2, 8, rank), None, top_k=1)
    assert fused_warnings(record) == []


def test_warn_reference_directly():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        paths.warn_reference("bottleneck_adapter", "cpu", (torch.float64,))
        assert record == []
        paths.warn_reference("bottleneck_adapter", "cuda", (torch.float64, torch.float64))
        paths.warn_reference("bottleneck_adapter", "cuda", (torch.float32, torch.float64))
        paths.warn_reference("bottleneck_adapter", "cuda", (torch.float16, torch.float64))
        assert len(record) == 1
        paths.warn_reference("bottleneck_adapter", "cuda", (torch.float32, torch.complex64))
        assert len(record) == 2
    assert "complex64" in str(record[1].message)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu():
    x = torch.randn(4, 8, device="cuda", dtype=torch.float16)
    want = "interpreter" if paths.is_interpreted() else "triton"
    assert backend(x) == want
    assert backend(x.float()) == want
    assert backend(x.bfloat16()) == ("reference" if paths.is_interpreted() else "triton")
    assert backend(x.double()) == "reference"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            small_call("bottleneck", x.double())()
    [warning] = fused_warnings(record)
    assert "float64" in str(warning.message)
