"""The compile check: every kernel at every block configuration, compiled for sm_80 and sm_90
without a GPU, with no spills and with tensor-core instructions where the dots can use them."""

import os
import subprocess
import sys

import pytest
import torch

from fused_adapters.kernels import bottleneck, sparse


def _environment_without_interpreter():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compile the real kernels, not the interpreter's
    return env


@pytest.mark.slow
def test_compile_check_passes_for_every_configuration():
    # The bottleneck kernels; the sparse ones (a run of their own, as long again) are compiled
    # one case per kernel by the test below.
    from fused_adapters.kernels.compile_check import BOTTLENECK_KERNELS

    result = subprocess.run(
        [sys.executable, "-m", "fused_adapters.kernels.compile_check", "--kernel", *BOTTLENECK_KERNELS],
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


def test_compile_check_compiles_a_sparse_case_per_kernel():
    # The smallest sparse configurations, fp16 on sm_90, aligned: the gated and routed forward
    # and both backward kernels with act recomputed and stored, through the CLI (6 compiles).
    # Each must build and compile to a cubin with tensor-core dots; the spill and load rules are
    # the full run's (python -m fused_adapters.kernels.compile_check --kernel sparse_...).
    result = subprocess.run(
        [sys.executable, "-m", "fused_adapters.kernels.compile_check",
         "--kernel", "sparse_forward", "sparse_backward_input", "sparse_backward_weights",
         "--config", "sparse_fwd_c16_half_rows16", "sparse_bwd_input_c16_half_rows16", "sparse_bwd_weights_c16_half",
         "--dtype", "float16", "--arch", "90", "--scenario", "aligned", "--jobs", "2"],
        capture_output=True, text=True, env=_environment_without_interpreter(), timeout=300,
    )
    table = result.stdout
    assert result.returncode in (0, 1), f"compile check did not run:\n{table[-6000:]}\n{result.stderr[-3000:]}"
    assert "compile error" not in table, table
    rows = [line.split() for line in table.splitlines() if line.startswith("sparse_")]
    configs = {(row[0], row[1]) for row in rows}
    assert configs == {
        ("sparse_forward", "sparse_fwd_c16_half_rows16"), ("sparse_forward", "sparse_fwd_c16_half_rows16+routed"),
        ("sparse_backward_input", "sparse_bwd_input_c16_half_rows16"),
        ("sparse_backward_input", "sparse_bwd_input_c16_half_rows16+store_act"),
        ("sparse_backward_weights", "sparse_bwd_weights_c16_half"),
        ("sparse_backward_weights", "sparse_bwd_weights_c16_half+store_act"),
    }, table
    for row in rows:
        assert int(row[5]) > 0 and row[9] in ("mma.sync", "wgmma"), row  # registers read from the cubin


def test_sparse_cases_cover_every_configuration_at_its_padded_columns():
    # Building the launches needs no compiler: every configuration key gets a case, each
    # scenario's (E, r) pads to that key, and the cases are the heaviest flags of each kernel.
    from fused_adapters.kernels.compile_check import ARCHS, DTYPES, SCENARIOS, SPARSE_KERNELS, _cases, build_launches

    cases = list(_cases(ARCHS, DTYPES, SCENARIOS, SPARSE_KERNELS))
    for kernel, table in (("sparse_forward", sparse.FORWARD_CONFIGS),
                          ("sparse_backward_input", sparse.BACKWARD_INPUT_CONFIGS),
                          ("sparse_backward_weights", sparse.BACKWARD_WEIGHTS_CONFIGS)):
        names = {case[5].name for case in cases if case[0] == kernel}
        assert {config.name for config in table.values()} <= names
    assert any(case[7] for case in cases if case[0] == "sparse_forward")  # the routed form
    assert {case[6] for case in cases if case[0] != "sparse_forward"} == {False, True}  # store_act

    for scenario in SCENARIOS:
        for block_columns in (16, 32, 64, 128, 256):
            launch = build_launches("sparse_forward", block_columns, "float16", scenario)
            assert launch.constexprs["BLOCK_COLUMNS"] == block_columns
            assert sparse.block_columns(launch.args["experts"], launch.args["rank"]) == block_columns
            assert launch.args["rank"] % 2 == (scenario == "unaligned")
        flags = build_launches("sparse_forward", 128, "float16", scenario).constexprs
        assert flags["GATED"] and flags["HAS_B_GATE"] and flags["STORE_LOGITS"] and flags["TOP_K"] == 2
        assert flags["HAS_B_DOWN"] and flags["HAS_B_UP"] and flags["HAS_RESIDUAL"] and flags["ADD_INPUT"]
        assert flags["HAS_ROW_SCALE"] and flags["SCALE_MODE"] == "channel" and flags["ACTIVATION"] == "gelu"
        routed = build_launches("sparse_forward", 128, "float16", scenario, routed=True).constexprs
        assert not routed["GATED"] and routed["TOP_K"] == 2
        for store_act in (False, True):
            flags = build_launches("sparse_backward_input", 128, "float16", scenario, store_act=store_act).constexprs
            assert flags["GATED"] and flags["HAS_GRAD_LOGITS"] and flags["COMPUTE_DX"] and flags["ADD_GRAD_Y"]
            assert flags["STORE_ACT"] == store_act
            flags = build_launches("sparse_backward_weights", 128, "float16", scenario, store_act=store_act).constexprs
            assert flags["GATED"] and flags["RECOMPUTE_ACT"] != store_act
    # A configuration given as the variant sets the tiles, rank_tile included.
    config = sparse.BACKWARD_WEIGHTS_CONFIGS[(256, "half")]
    launch = build_launches("sparse_backward_weights", 256, "float16", "aligned", config)
    assert launch.constexprs["BLOCK_COLUMNS"] == (config.rank_tile or 256) and launch.config is config


def _jit_view(kernel):
    """The interpreter's stand-in lacks arg_names; read them off the function signature."""
    if hasattr(kernel, "arg_names"):
        return kernel
    import inspect

    class View:
        arg_names = list(inspect.signature(kernel.fn).parameters)

    return View()
