"""The compile check: every kernel at every block configuration, compiled for sm_80 and sm_90
without a GPU, with no spills and with tensor-core instructions where the dots can use them."""

import os
import subprocess
import sys

import pytest

from fused_adapters.kernels.bottleneck import configs as bottleneck
from fused_adapters.kernels.sparse import configs as sparse


def _environment_without_interpreter():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compile the real kernels, not the interpreter's
    return env


@pytest.mark.slow
def test_compile_check_passes_for_every_configuration():
    # The bottleneck kernels; the sparse ones (a run of their own, as long again) are compiled
    # one case per kernel by the test below, and the grouped design's (--kernel grouped_...)
    # one kernel's two forms.
    from fused_adapters.tools.compile_check import BOTTLENECK_KERNELS

    result = subprocess.run(
        [sys.executable, "-m", "fused_adapters.tools.compile_check", "--kernel", *BOTTLENECK_KERNELS],
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
    from fused_adapters.tools.compile_check import build_launches, specialize

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


@pytest.mark.slow
def test_compile_check_compiles_a_sparse_and_a_wide_case_per_kernel():
    # The smallest sparse configurations, fp16 on sm_90, aligned: the gated and routed forward
    # and both backward kernels with act recomputed and stored, the grouped forward with k = 2
    # and k = 1 (the "+k1" form, which applies the epilogue), and the bottleneck kernels
    # specialized for a width-changing bottleneck (D_out = 3 D), and the LoRA linear's single
    # launch (forward and the backward's input launch, at rank 16 and 8) and the column-major forward (LoSA's
    # token mixers), through the CLI (16 compiles).
    # Each must build, compile to a cubin with tensor-core dots and pass every rule of the full
    # runs (python -m fused_adapters.tools.compile_check --kernel sparse_... / grouped_...): no
    # spills, vectorized loads; any op's failure fails the test.
    result = subprocess.run(
        [sys.executable, "-m", "fused_adapters.tools.compile_check",
         "--kernel", "sparse_forward", "sparse_backward_input", "sparse_backward_weights", "grouped_forward",
         "forward_wide", "backward_weights_wide", "forward_column_major", "lora_forward", "lora_backward_input",
         "--config", "sparse_fwd_c16_half_rows16", "sparse_bwd_input_c16_half_rows16", "sparse_bwd_weights_c16_half",
         "grouped_fwd_r16_half", "fwd_r16_half_rows16", "bwd_weights_wide_r16_half", "lora_r16_half_64x64x32",
         "--dtype", "float16", "--arch", "90", "--scenario", "aligned", "--jobs", "2"],
        capture_output=True, text=True, env=_environment_without_interpreter(), timeout=300,
    )
    table = result.stdout
    assert result.returncode == 0, f"compile check failed:\n{table[-6000:]}\n{result.stderr[-3000:]}"
    assert "FAIL" not in table and "compile error" not in table, table
    rows = [line.split() for line in table.splitlines() if line.startswith(("sparse_", "grouped_", "forward_wide",
                                                                            "backward_weights_wide", "lora_",
                                                                            "forward_column_major"))]
    configs = {(row[0], row[1]) for row in rows}
    assert configs == {
        ("sparse_forward", "sparse_fwd_c16_half_rows16"), ("sparse_forward", "sparse_fwd_c16_half_rows16+routed"),
        ("sparse_backward_input", "sparse_bwd_input_c16_half_rows16"),
        ("sparse_backward_input", "sparse_bwd_input_c16_half_rows16+store_act"),
        ("sparse_backward_weights", "sparse_bwd_weights_c16_half"),
        ("sparse_backward_weights", "sparse_bwd_weights_c16_half+store_act"),
        ("grouped_forward", "grouped_fwd_r16_half"), ("grouped_forward", "grouped_fwd_r16_half+k1"),
        ("forward_wide", "fwd_r16_half_rows16"), ("forward_column_major", "fwd_r16_half_rows16"),
        ("backward_weights_wide", "bwd_weights_wide_r16_half"),
        ("backward_weights_wide", "bwd_weights_wide_r16_half+store_act"),
        ("lora_forward", "lora_r16_half_64x64x32"), ("lora_forward", "lora_r16_half_64x64x32+half_rank"),
        ("lora_backward_input", "lora_r16_half_64x64x32"), ("lora_backward_input", "lora_r16_half_64x64x32+half_rank"),
    }, table
    for row in rows:
        assert int(row[5]) > 0 and row[9] in ("mma.sync", "wgmma"), row  # registers read from the cubin


def test_cases_come_from_the_ops_plans(monkeypatch):
    # The compile check mirrors no launch rule: its cases are what the ops' plans make, so a
    # change to a plan (here the bottleneck's act(h) rule, the sparse forward's and the fusion
    # scores' launches, the LoRA GEMM's tile choice) changes the cases with it.
    from fused_adapters.kernels.bottleneck import plan as bottleneck_plan
    from fused_adapters.kernels.fusion import plan as fusion_plan
    from fused_adapters.kernels.lora import plan as lora_plan
    from fused_adapters.kernels.sparse import plan as sparse_plan
    from fused_adapters.tools.compile_check import build_launches

    assert build_launches("backward_hidden", 16, "float16", "aligned").constexprs["STORE_ACT"] is False
    monkeypatch.setattr(bottleneck_plan, "stores_act", lambda rank, variant: True)
    assert build_launches("backward_hidden", 16, "float16", "aligned").constexprs["STORE_ACT"] is True
    assert build_launches("backward_weights", 16, "float16", "aligned").constexprs["RECOMPUTE_ACT"] is False

    original = sparse_plan.forward

    def forward(*args, **kwargs):
        planned = original(*args, **kwargs)
        planned.launches["sparse_forward"].constexprs["ACTIVATION"] = "relu"
        return planned

    monkeypatch.setattr(sparse_plan, "forward", forward)
    assert build_launches("sparse_forward", 128, "float16", "aligned").constexprs["ACTIVATION"] == "relu"
    for kernel, name in (("fusion_scores", "scores"), ("fusion_scores_backward", "scores_backward")):
        planned_by = getattr(fusion_plan, name)

        def fusion(*args, _planned_by=planned_by, _kernel=kernel, **kwargs):
            planned = _planned_by(*args, **kwargs)
            planned.launches[_kernel].constexprs["ACTIVATION"] = "relu"
            return planned

        monkeypatch.setattr(fusion_plan, name, fusion)
        assert build_launches(kernel, 64, "float16", "aligned").constexprs["ACTIVATION"] == "relu"
    smallest = lora_plan.LORA_LINEAR_CONFIGS[(16, "half")][-1]
    monkeypatch.setattr(lora_plan, "gemm_config", lambda *args: smallest)
    assert build_launches("lora_forward", 16, "float16", "aligned").config is smallest


def test_sparse_cases_cover_every_configuration_at_its_padded_columns():
    # Building the launches needs no compiler: every configuration key gets a case, each
    # scenario's (E, r) pads to that key, and the cases are the heaviest flags of each kernel.
    from fused_adapters.tools.compile_check import ARCHS, DTYPES, SCENARIOS, SPARSE_KERNELS, _cases, build_launches

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


def test_grouped_cases_cover_every_configuration():
    # The grouped design's cases, built without a compiler: every configuration of the six
    # tables (the gate's block-rows variants included), the "+k1" forms of the two kernels that
    # change with k = 1, the gate's table picked by x's dtype (autocast: fp32 storage), and the
    # heaviest flags through the runtime's launch builders.
    from fused_adapters.tools.compile_check import (
        ARCHS, DTYPES, GROUPED_EXPERTS, GROUPED_KERNELS, SCENARIOS, _cases, build_launches,
    )
    from fused_adapters.kernels.launch import padded_rank, row_variants

    cases = list(_cases(ARCHS, DTYPES, SCENARIOS, GROUPED_KERNELS))
    for kernel, table in (("grouped_gate", sparse.GATE_CONFIGS),
                          ("grouped_forward", sparse.GROUPED_FORWARD_CONFIGS),
                          ("grouped_combine", sparse.COMBINE_CONFIGS),
                          ("grouped_backward_input", sparse.GROUPED_BACKWARD_INPUT_CONFIGS),
                          ("grouped_backward_combine", sparse.BACKWARD_COMBINE_CONFIGS),
                          ("grouped_backward_weights", sparse.GROUPED_BACKWARD_WEIGHTS_CONFIGS)):
        names = {case[5].name for case in cases if case[0] == kernel}
        expected = {variant.name for config in table.values()
                    for variant in (row_variants(config) if kernel == "grouped_gate" else [config])}
        assert names == expected, kernel
    singles = {(case[0], case[8]) for case in cases}
    assert {kernel for kernel, single in singles if single} == {"grouped_forward", "grouped_backward_input"}
    groups = {(case[2], case[5].name) for case in cases}
    assert ("autocast_bf16", "grouped_gate_fp32") in groups and ("float16", "grouped_gate_half") in groups
    assert ("autocast_bf16", "grouped_gate_half") not in groups
    assert ("autocast_bf16", "grouped_combine_half") in groups and ("autocast_bf16", "grouped_fwd_r16_half") in groups

    for scenario in SCENARIOS:
        for block_rank in (16, 32, 64, 128, 256):
            launch = build_launches("grouped_forward", block_rank, "float16", scenario)
            assert launch.constexprs["BLOCK_RANK"] == block_rank == padded_rank(launch.args["rank"])
            assert launch.args["experts"] == GROUPED_EXPERTS
            assert launch.args["rank"] % 2 == (scenario == "unaligned")
        flags = build_launches("grouped_gate", 0, "float16", scenario).constexprs
        assert flags["HAS_B_GATE"] and flags["STORE_LOGITS"] and flags["TOP_K"] == 2
        for kernel in ("grouped_forward", "grouped_combine"):
            flags = build_launches(kernel, 16, "float16", scenario).constexprs
            assert flags["HAS_RESIDUAL"] and flags["ADD_INPUT"] and flags["HAS_ROW_SCALE"] and flags["TOP_K"] == 2
            assert flags["SCALE_MODE"] == "channel"
        flags = build_launches("grouped_forward", 16, "float16", scenario).constexprs
        assert flags["HAS_B_DOWN"] and flags["HAS_B_UP"] and flags["SAVE"] and not flags["SINGLE"]
        assert flags["ACTIVATION"] == "gelu"
        assert build_launches("grouped_forward", 16, "float16", scenario, single=True).constexprs["SINGLE"]
        flags = build_launches("grouped_backward_input", 16, "float16", scenario).constexprs
        assert flags["COMPUTE_DX"] and not flags["SINGLE"] and flags["HAS_B_UP"] and flags["HAS_ROW_SCALE"]
        flags = build_launches("grouped_backward_input", 16, "float16", scenario, single=True).constexprs
        assert flags["SINGLE"] and flags["ADD_GRAD_Y"] and flags["TOP_K"] == 1
        flags = build_launches("grouped_backward_combine", 0, "float16", scenario).constexprs
        assert flags["GATED"] and flags["HAS_GRAD_LOGITS"] and flags["COMPUTE_DX"] and flags["ADD_GRAD_Y"]
        launch = build_launches("grouped_backward_weights", 16, "float16", scenario)
        assert launch.grid[0] > GROUPED_EXPERTS and launch.args["rows_per_gate_chunk"] > 0  # the gate's chunks
    # A gate variant given sets the tiles (the block rows the plan may pick from M).
    variant = row_variants(sparse.GATE_CONFIGS["half"])[-1]
    launch = build_launches("grouped_gate", 0, "float16", "aligned", variant)
    assert launch.constexprs["BLOCK_ROWS"] == variant.block_rows and launch.config is variant


def _jit_view(kernel):
    """The interpreter's stand-in lacks arg_names; read them off the function signature."""
    if hasattr(kernel, "arg_names"):
        return kernel
    import inspect

    class View:
        arg_names = list(inspect.signature(kernel.fn).parameters)

    return View()


def test_wide_cases_cover_every_configuration():
    # The width-changing specializations, built without a compiler: every forward configuration
    # (block-rows variants included) and every entry of the wide weights table, compiled with
    # SAME_WIDTH off and D_out = 3 D; the adapter's own cases keep SAME_WIDTH on.
    from fused_adapters.tools.compile_check import ARCHS, DTYPES, SCENARIOS, WIDE_KERNELS, _cases, build_launches
    from fused_adapters.kernels.launch import row_variants

    cases = list(_cases(ARCHS, DTYPES, SCENARIOS, WIDE_KERNELS))
    names = {kernel: {case[5].name for case in cases if case[0] == kernel} for kernel in WIDE_KERNELS}
    assert names["forward_wide"] == {v.name for c in bottleneck.FORWARD_CONFIGS.values() for v in row_variants(c)}
    assert names["backward_weights_wide"] == {c.name for c in bottleneck.BACKWARD_WEIGHTS_WIDE_CONFIGS.values()}
    for scenario in SCENARIOS:
        for kernel in WIDE_KERNELS:
            launch = build_launches(kernel, 16, "float16", scenario)
            assert launch.constexprs["SAME_WIDTH"] is False
            assert launch.args["dim_out"] == 3 * launch.args["dim"]
            assert launch.config.name.startswith("bwd_weights_wide" if "weights" in kernel else "fwd_")
        for kernel in ("forward", "backward_weights"):
            assert build_launches(kernel, 16, "float16", scenario).constexprs["SAME_WIDTH"] is True


def test_lora_cases_cover_every_configuration():
    # The LoRA linear's single launch, built without a compiler: every tile of its tables at
    # every padded rank it takes, the aligned tiles in the aligned scenario (at the padded rank
    # and at half of it) and the unaligned ones in the other, never plain fp32 (ieee dots: that
    # form is not used), and the weights launch (the bottleneck kernel without dx) from both its
    # tables, the same-width one at D_out = D.
    from fused_adapters.kernels.lora import configs as lora
    from fused_adapters.tools.compile_check import ARCHS, DTYPES, LORA_KERNELS, SCENARIOS, _cases, build_launches

    cases = list(_cases(ARCHS, DTYPES, SCENARIOS, LORA_KERNELS))
    assert not [case for case in cases if case[2] == "float32"]
    assert not [case for case in cases if case[4] == "unaligned" and case[-1]]  # half_rank: aligned only
    for kernel in ("lora_forward", "lora_backward_input"):
        for scenario, table in (("aligned", lora.LORA_LINEAR_CONFIGS), ("unaligned", lora.LORA_LINEAR_UNALIGNED_CONFIGS)):
            for half_rank in ((False, True) if scenario == "aligned" else (False,)):
                names = {case[5].name for case in cases
                         if case[0] == kernel and case[4] == scenario and case[-1] == half_rank}
                assert names == {config.name for configs in table.values() for config in configs}, (kernel, scenario)
    weights = {case[5].name for case in cases if case[0] == "lora_backward_weights"}
    assert weights == {bottleneck.BACKWARD_WEIGHTS_CONFIGS[key].name for key in [(16, "half"), (32, "half"),
                                                                               (64, "half"), (16, "fp32"),
                                                                               (32, "fp32"), (64, "fp32")]} | {
        bottleneck.BACKWARD_WEIGHTS_WIDE_CONFIGS[key].name for key in [(16, "half"), (32, "half"), (64, "half"),
                                                                       (16, "fp32"), (32, "fp32"), (64, "fp32")]}
    for scenario in SCENARIOS:
        forward = build_launches("lora_forward", 16, "float16", scenario)
        backward = build_launches("lora_backward_input", 16, "float16", scenario)
        assert forward.args["dim_out"] == 3 * forward.args["dim_in"] == backward.args["dim_in"]
        assert forward.args["stride_w_k"] == 1 and backward.args["stride_w_n"] == 1  # W^T forward, W backward
        weights_launch = build_launches("lora_backward_weights", 16, "float16", scenario)
        assert weights_launch.constexprs["COMPUTE_DX"] is False and weights_launch.constexprs["ACTIVATION"] == "identity"
        assert weights_launch.constexprs["SAME_WIDTH"] is False
        same_width = build_launches("lora_backward_weights", 16, "float16", scenario,
                                    bottleneck.BACKWARD_WEIGHTS_CONFIGS[(16, "half")])
        assert same_width.constexprs["SAME_WIDTH"] is True
    assert build_launches("lora_forward", 16, "float16", "aligned", single=True).args["rank"] == 8


def test_column_major_cases():
    # The bottleneck kernels as LoSA's token mixers run them: every configuration and block-rows
    # variant, with x, the residual, y, dy and dx column-major (row stride 1, specialized as a
    # constant); the backward from its column-major tables, as the launch plan picks them.
    from fused_adapters.tools.compile_check import ARCHS, DTYPES, SCENARIOS, _cases, build_launches, specialize
    from fused_adapters.kernels.launch import row_variants

    cases = list(_cases(ARCHS, DTYPES, SCENARIOS, ("forward_column_major", "backward_hidden_column_major",
                                                   "backward_weights_column_major")))

    def names(kernel):
        return {case[5].name for case in cases if case[0] == kernel}

    assert names("forward_column_major") == {v.name for c in bottleneck.FORWARD_CONFIGS.values() for v in row_variants(c)}
    assert names("backward_hidden_column_major") == {
        v.name for c in bottleneck.BACKWARD_HIDDEN_COLUMN_MAJOR_CONFIGS.values() for v in row_variants(c)}
    assert names("backward_weights_column_major") == {
        c.name for c in bottleneck.BACKWARD_WEIGHTS_COLUMN_MAJOR_CONFIGS.values()}
    launch = build_launches("forward_column_major", 16, "float16", "aligned")
    assert launch.args["stride_x_row"] == launch.args["stride_y_row"] == launch.args["stride_res_row"] == 1
    launch.kernel = _jit_view(launch.kernel)
    _, constexprs, _ = specialize(launch)
    assert constexprs["stride_y_row"] == 1 and constexprs["stride_x_row"] == 1
    weights = build_launches("backward_weights_column_major", 32, "autocast_bf16", "aligned")
    assert weights.config.name == "bwd_weights_r32_half_colmajor"  # the plan picks the column-major table
    assert weights.args["stride_dx_row"] == weights.args["stride_g_row"] == weights.args["stride_x_row"] == 1


def test_dropout_cases_compile_the_kernels_with_dropout_on():
    # Every "<kernel>_dropout" case is its base kernel's launch with dropout compiled in (the
    # rates as the package uses them), at the base kernel's configurations (the LoRA backward's
    # input launch: those its plan takes with dropout).
    from fused_adapters.kernels.lora.plan import masks_output
    from fused_adapters.tools.compile_check import (
        ARCHS, DROPOUT_KERNELS, DROPOUT_SUFFIX, DTYPES, SCENARIOS, _cases, build_launches,
    )

    flags = ("HIDDEN_DROPOUT", "INPUT_DROPOUT", "DROP_DOWN_INPUT", "DROP_UP_OUTPUT")
    for kernel in DROPOUT_KERNELS:
        base = kernel.removesuffix(DROPOUT_SUFFIX)
        cases = list(_cases(ARCHS[-1:], DTYPES[1:2], SCENARIOS[:1], [kernel]))
        base_cases = [case[1:] for case in _cases(ARCHS[-1:], DTYPES[1:2], SCENARIOS[:1], [base])
                      if base != "lora_backward_input" or masks_output(case[5])]
        assert cases and [case[1:] for case in cases] == base_cases, kernel
        _, block_rank, dtype_name, _, scenario, variant, store_act, *form = cases[0]
        launch = build_launches(kernel, block_rank, dtype_name, scenario, variant, store_act, *form)
        plain = build_launches(base, block_rank, dtype_name, scenario, variant, store_act, *form)
        assert any(launch.constexprs.get(flag) for flag in flags), (kernel, launch.constexprs)
        assert not any(plain.constexprs.get(flag) for flag in flags), (base, plain.constexprs)


@pytest.mark.slow
def test_compile_check_compiles_the_dropout_kernels():
    # fp16 on sm_90, aligned, one configuration per op family with dropout compiled in: the
    # bottleneck forward and weights (hidden), their width-changing forms (LoRA's input
    # dropout), the LoRA single launch, the sparse forward, the grouped forward and the fusion's
    # scores forward. No spills, MMA, vectorized loads, as every case.
    result = subprocess.run(
        [sys.executable, "-m", "fused_adapters.tools.compile_check",
         "--kernel", "forward_dropout", "backward_weights_dropout", "forward_wide_dropout", "lora_forward_dropout",
         "sparse_forward_dropout", "grouped_forward_dropout", "fusion_scores_dropout",
         "--config", "fwd_r16_half_rows16", "bwd_weights_r16_half", "lora_r16_half_64x64x32",
         "sparse_fwd_c16_half_rows16", "grouped_fwd_r16_half", "scores_c16_half_rows16",
         "--dtype", "float16", "--arch", "90", "--scenario", "aligned", "--jobs", "2"],
        capture_output=True, text=True, env=_environment_without_interpreter(), timeout=600,
    )
    table = result.stdout
    assert result.returncode == 0, f"compile check failed:\n{table[-6000:]}\n{result.stderr[-3000:]}"
    assert "FAIL" not in table and "compile error" not in table, table
    kernels = {line.split()[0] for line in table.splitlines() if "_dropout " in line}
    assert kernels == {"forward_dropout", "backward_weights_dropout", "forward_wide_dropout", "lora_forward_dropout",
                       "sparse_forward_dropout", "grouped_forward_dropout", "fusion_scores_dropout"}, table
