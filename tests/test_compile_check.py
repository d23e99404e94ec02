"""The compile check: every kernel at every block configuration, compiled for sm_80 and sm_90
without a GPU, with no spills and with tensor-core instructions where the dots can use them."""

import os
import subprocess
import sys

import pytest
import torch

from fused_adapters.kernels import bottleneck


def _environment_without_interpreter():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compile the real kernels, not the interpreter's
    return env


@pytest.mark.slow
def test_compile_check_passes_for_every_configuration():
    result = subprocess.run(
        [sys.executable, "-m", "fused_adapters.kernels.compile_check"],
        capture_output=True, text=True, env=_environment_without_interpreter(), timeout=1200,
    )
    table = result.stdout
    assert result.returncode == 0, f"compile check failed:\n{table[-6000:]}\n{result.stderr[-3000:]}"
    assert "FAIL" not in table
    names = [config.name for table_ in (bottleneck.FORWARD_CONFIGS, bottleneck.BACKWARD_HIDDEN_CONFIGS,
                                         bottleneck.BACKWARD_WEIGHTS_CONFIGS) for config in table_.values()]
    missing = [name for name in names if name not in table]
    assert not missing, f"configurations the package can choose but the check skipped: {missing}"
    for arch in ("sm_80", "sm_90"):
        assert arch in table


def test_specialization_follows_the_jit():
    # What Triton's launcher does with arguments: pointers and integers divisible by 16 get
    # tt.divisibility=16, integers equal to 1 become constants, other integers stay i32.
    from fused_adapters.kernels.compile_check import build_launches, specialize

    launch = build_launches("forward", 16, "float16", "aligned")
    launch.kernel = _jit_view(launch.kernel)
    signature, constexprs, attrs = specialize(launch)
    names = launch.kernel.arg_names
    assert signature["x_ptr"] == "*fp16" and (names.index("x_ptr"),) in attrs
    assert signature["dim"] == "i32" and (names.index("dim"),) in attrs  # 768
    assert constexprs["stride_x_col"] == 1 and signature["stride_x_col"] == "constexpr"
    assert signature["scale_value"] == "fp32"
    unaligned = build_launches("forward", 16, "float16", "unaligned")
    unaligned.kernel = _jit_view(unaligned.kernel)
    signature, _, attrs = specialize(unaligned)
    assert (names.index("x_ptr"),) not in attrs and (names.index("dim"),) not in attrs  # 771, offset x


def _jit_view(kernel):
    """The interpreter's stand-in lacks arg_names; read them off the function signature."""
    if hasattr(kernel, "arg_names"):
        return kernel
    import inspect

    class View:
        arg_names = list(inspect.signature(kernel.fn).parameters)

    return View()
