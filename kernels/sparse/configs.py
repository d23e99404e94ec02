"""The sparse mixture's tile tables, for both designs (dense-masked and grouped), and its
variants. plan.py chooses among them."""

import torch

from ..launch import BlockConfig, dtype_group, next_power_of_2, padded_rank
from ..variants import Variant, register_variants

MAX_EXPERTS = 64
# The dense design keeps [rows, E*r] tiles and [D tile, E*r] accumulators in registers.
MAX_DENSE_COLUMNS = 256
MIN_BLOCK = 16


def block_columns(experts: int, rank: int) -> int:
    return max(MIN_BLOCK, next_power_of_2(experts * rank))


def block_experts(experts: int) -> int:
    return max(MIN_BLOCK, next_power_of_2(experts))


# The dense design's tiles, keyed by (padded E*r, dtype group of the compute dtype): the largest
# tiles the compile check found with 0 spill bytes on sm_80 and sm_90, aligned and unaligned, for
# the configuration and every smaller block-rows variant (python -m fused_adapters.tools.compile_check
# --kernel sparse_forward sparse_backward_input sparse_backward_weights); num_stages 1 was what
# removed most spills. Many entries sit at 255 registers: recheck after any kernel change.

FORWARD_CONFIGS = {
    (16, "half"): BlockConfig("sparse_fwd_c16_half", 64, 32, 8, 2),
    (32, "half"): BlockConfig("sparse_fwd_c32_half", 64, 32, 8, 2),
    (64, "half"): BlockConfig("sparse_fwd_c64_half", 64, 32, 8, 2),
    (128, "half"): BlockConfig("sparse_fwd_c128_half", 64, 32, 8, 1),
    (256, "half"): BlockConfig("sparse_fwd_c256_half", 16, 32, 8, 1),
    (16, "fp32"): BlockConfig("sparse_fwd_c16_fp32", 32, 32, 8, 1),
    (32, "fp32"): BlockConfig("sparse_fwd_c32_fp32", 32, 32, 8, 1),
    (64, "fp32"): BlockConfig("sparse_fwd_c64_fp32", 32, 32, 8, 1),
    (128, "fp32"): BlockConfig("sparse_fwd_c128_fp32", 16, 16, 4, 1),
    (256, "fp32"): BlockConfig("sparse_fwd_c256_fp32", 16, 16, 8, 1),
}
BACKWARD_INPUT_CONFIGS = {
    (16, "half"): BlockConfig("sparse_bwd_input_c16_half", 64, 32, 8, 1),
    (32, "half"): BlockConfig("sparse_bwd_input_c32_half", 32, 32, 8, 2),
    (64, "half"): BlockConfig("sparse_bwd_input_c64_half", 16, 64, 8, 1),
    (128, "half"): BlockConfig("sparse_bwd_input_c128_half", 16, 32, 8, 1),
    (256, "half"): BlockConfig("sparse_bwd_input_c256_half", 16, 32, 16, 2),
    (16, "fp32"): BlockConfig("sparse_bwd_input_c16_fp32", 32, 64, 8, 2),
    # One stage: with two, sm_90 compiles the store_act form with an 8-byte stack frame.
    (32, "fp32"): BlockConfig("sparse_bwd_input_c32_fp32", 32, 64, 8, 1),
    (64, "fp32"): BlockConfig("sparse_bwd_input_c64_fp32", 16, 64, 8, 1),
    (128, "fp32"): BlockConfig("sparse_bwd_input_c128_fp32", 16, 16, 8, 2),
    (256, "fp32"): BlockConfig("sparse_bwd_input_c256_fp32", 16, 16, 8, 2),
}
# rank_tile: stacked columns per program. The weights launch has no M-sized axis to fill the
# GPU with but its row chunks, and every chunk writes E*r x D x 2 fp32 partials (786 KB at
# E = 8, r = 16, D = 768): splitting the stacked columns 4 ways gives 4x the programs per chunk,
# so 4x fewer chunks (and partials) fill the same SMs.
BACKWARD_WEIGHTS_CONFIGS = {
    (16, "half"): BlockConfig("sparse_bwd_weights_c16_half", 32, 32, 4, 1),
    (32, "half"): BlockConfig("sparse_bwd_weights_c32_half", 32, 32, 4, 2),
    (64, "half"): BlockConfig("sparse_bwd_weights_c64_half", 32, 32, 4, 2, rank_tile=32),
    (128, "half"): BlockConfig("sparse_bwd_weights_c128_half", 32, 32, 4, 2, rank_tile=32),
    (256, "half"): BlockConfig("sparse_bwd_weights_c256_half", 32, 32, 4, 2, rank_tile=32),
    (16, "fp32"): BlockConfig("sparse_bwd_weights_c16_fp32", 16, 32, 4, 1),
    (32, "fp32"): BlockConfig("sparse_bwd_weights_c32_fp32", 16, 32, 4, 1),
    (64, "fp32"): BlockConfig("sparse_bwd_weights_c64_fp32", 16, 32, 4, 1, rank_tile=32),
    (128, "fp32"): BlockConfig("sparse_bwd_weights_c128_fp32", 16, 32, 4, 1, rank_tile=32),
    (256, "fp32"): BlockConfig("sparse_bwd_weights_c256_fp32", 16, 32, 4, 1, rank_tile=32),
}


# The width-changing specializations of the backward kernels (SAME_WIDTH off: D_out != D, a second
# width and column mask) take the same tiles but where the compile check at D_out = 3 D or D // 4
# found spills with them (--kernel sparse_backward_input_wide sparse_backward_weights_wide):
# there these, 0 spill bytes on sm_80 and sm_90, every dtype, aligned and unaligned, every
# block-rows variant. The forward needs no table of its own.
BACKWARD_INPUT_WIDE_CONFIGS = {
    **BACKWARD_INPUT_CONFIGS,
    # 16 warps: with 8 (and 32 or 64 columns, one or two stages) the narrow form spilled 8-24 bytes
    # on sm_90, unaligned.
    (128, "half"): BlockConfig("sparse_bwd_input_wide_c128_half", 16, 32, 16, 1),
    # 32 columns: 64 gave the frame under tf32 (unaligned), and with one stage fp32 spilled 16 bytes.
    (16, "fp32"): BlockConfig("sparse_bwd_input_wide_c16_fp32", 32, 32, 8, 2),
}
BACKWARD_WEIGHTS_WIDE_CONFIGS = {
    **BACKWARD_WEIGHTS_CONFIGS,
    # Eight warps: four gave an 8-byte frame under fp16 and bf16 autocast (and, with two stages,
    # under fp16 autocast in the narrow form on sm_80).
    (16, "half"): BlockConfig("sparse_bwd_weights_wide_c16_half", 32, 32, 8, 1),
    # Eight warps: four gave the frame under tf32 with store_act (unaligned).
    (16, "fp32"): BlockConfig("sparse_bwd_weights_wide_c16_fp32", 16, 32, 8, 1),
}


def block_config(table: dict, experts: int, rank: int, dtype: torch.dtype) -> BlockConfig:
    return table[(block_columns(experts, rank), dtype_group(dtype))]


# Variants (kernels.use_variant("sparse_adapter", name), or the ops' variant= argument).

VARIANTS = (
    Variant("default", "dense-masked, one forward launch: all experts' weights stacked, unselected experts "
                       "zeroed after the activation; block rows planned from M and the SM count; the "
                       "backward recomputes act(h) from h"),
    Variant("rows16", "dense-masked, 16 rows per program in the row-tile launches", block_rows=16),
    Variant("rows64", "dense-masked, 64 rows per program in the row-tile launches (the configuration's own "
                      "where fewer)", block_rows=64),
    Variant("store_act", "dense-masked; the backward's first launch also writes act(h) * weights [M, E*r] for "
                         "the second to read, instead of recomputing it", store_act=True),
    Variant("grouped", "grouped: assignments sorted by expert, each program one expert's tile (FLOPs "
                       "proportional to k); gate, grouped and combine launches forward, three backward; the "
                       "design for E*r > 256", grouped=True),
)
register_variants("sparse_adapter", VARIANTS)
DEFAULT_VARIANT = VARIANTS[0]
VARIANTS_BY_NAME = {variant.name: variant for variant in VARIANTS}


# The grouped design's tiles. The grouped launches are keyed by (padded r, dtype group of the
# compute dtype); the gate and the combines (no rank axis) by the dtype group. Chosen with the
# compile check (--kernel grouped_...): 0 spill bytes on sm_80 and sm_90, every dtype, aligned
# and unaligned. rank_tile: at padded rank 128 and 256 the weights launch splits the rank axis
# over a third grid axis (its two fp32 [D tile, rank] accumulators spilled up to 6 KB at every
# whole-rank tile tried). 8 warps: the gathered, unaligned x and dy tiles spill at 4.

GATE_CONFIGS = {
    "half": BlockConfig("grouped_gate_half", 32, 32, 4, 2),
    "fp32": BlockConfig("grouped_gate_fp32", 32, 32, 4, 2),
}
COMBINE_CONFIGS = {
    "half": BlockConfig("grouped_combine_half", 16, 128, 4, 1),
    "fp32": BlockConfig("grouped_combine_fp32", 16, 64, 4, 1),
}
BACKWARD_COMBINE_CONFIGS = {
    "half": BlockConfig("grouped_bwd_combine_half", 16, 64, 4, 1),
    "fp32": BlockConfig("grouped_bwd_combine_fp32", 16, 64, 4, 1),
}
GROUPED_FORWARD_CONFIGS = {
    (16, "half"): BlockConfig("grouped_fwd_r16_half", 64, 64, 8, 2),
    (32, "half"): BlockConfig("grouped_fwd_r32_half", 64, 64, 8, 2),
    (64, "half"): BlockConfig("grouped_fwd_r64_half", 64, 32, 8, 2),
    (128, "half"): BlockConfig("grouped_fwd_r128_half", 32, 32, 8, 2),
    (256, "half"): BlockConfig("grouped_fwd_r256_half", 32, 16, 8, 1),
    (16, "fp32"): BlockConfig("grouped_fwd_r16_fp32", 64, 64, 8, 1),
    (32, "fp32"): BlockConfig("grouped_fwd_r32_fp32", 32, 32, 4, 1),
    (64, "fp32"): BlockConfig("grouped_fwd_r64_fp32", 32, 32, 4, 1),
    (128, "fp32"): BlockConfig("grouped_fwd_r128_fp32", 32, 32, 8, 2),
    (256, "fp32"): BlockConfig("grouped_fwd_r256_fp32", 16, 16, 4, 1),
}
GROUPED_BACKWARD_INPUT_CONFIGS = {
    (16, "half"): BlockConfig("grouped_bwd_input_r16_half", 64, 64, 8, 2),
    (32, "half"): BlockConfig("grouped_bwd_input_r32_half", 64, 64, 8, 2),
    (64, "half"): BlockConfig("grouped_bwd_input_r64_half", 64, 32, 8, 2),
    (128, "half"): BlockConfig("grouped_bwd_input_r128_half", 32, 32, 8, 2),
    (256, "half"): BlockConfig("grouped_bwd_input_r256_half", 16, 64, 8, 1),
    (16, "fp32"): BlockConfig("grouped_bwd_input_r16_fp32", 32, 32, 4, 1),
    (32, "fp32"): BlockConfig("grouped_bwd_input_r32_fp32", 32, 32, 4, 1),
    (64, "fp32"): BlockConfig("grouped_bwd_input_r64_fp32", 32, 32, 4, 1),
    (128, "fp32"): BlockConfig("grouped_bwd_input_r128_fp32", 32, 32, 8, 1),
    (256, "fp32"): BlockConfig("grouped_bwd_input_r256_fp32", 16, 16, 4, 1),
}
GROUPED_BACKWARD_WEIGHTS_CONFIGS = {
    (16, "half"): BlockConfig("grouped_bwd_weights_r16_half", 32, 64, 8, 2),
    (32, "half"): BlockConfig("grouped_bwd_weights_r32_half", 32, 64, 8, 2),
    (64, "half"): BlockConfig("grouped_bwd_weights_r64_half", 16, 64, 8, 2),
    (128, "half"): BlockConfig("grouped_bwd_weights_r128_half", 16, 64, 8, 2, rank_tile=64),
    (256, "half"): BlockConfig("grouped_bwd_weights_r256_half", 16, 64, 8, 2, rank_tile=64),
    (16, "fp32"): BlockConfig("grouped_bwd_weights_r16_fp32", 16, 32, 4, 1),
    (32, "fp32"): BlockConfig("grouped_bwd_weights_r32_fp32", 16, 32, 4, 1),
    (64, "fp32"): BlockConfig("grouped_bwd_weights_r64_fp32", 16, 32, 4, 1),
    (128, "fp32"): BlockConfig("grouped_bwd_weights_r128_fp32", 16, 32, 4, 1, rank_tile=64),
    (256, "fp32"): BlockConfig("grouped_bwd_weights_r256_fp32", 16, 32, 4, 1, rank_tile=64),
}


# The grouped kernels' width-changing specializations (SAME_WIDTH off) take the same tiles but
# where the compile check at D_out = 3 D found spills with them, all on sm_90, unaligned (--kernel
# grouped_forward_wide grouped_backward_input_wide grouped_backward_weights_wide): there these,
# 0 spill bytes on sm_80 and sm_90, every dtype, aligned and unaligned.
GROUPED_FORWARD_WIDE_CONFIGS = {
    **GROUPED_FORWARD_CONFIGS,
    # 16 rows: 32 spilled 16 bytes under fp16 (one or two stages).
    (256, "half"): BlockConfig("grouped_fwd_wide_r256_half", 16, 16, 8, 1),
}
GROUPED_BACKWARD_WEIGHTS_WIDE_CONFIGS = {
    **GROUPED_BACKWARD_WEIGHTS_CONFIGS,
    # Eight warps: four spilled 8 and 16 bytes under fp32.
    (16, "fp32"): BlockConfig("grouped_bwd_weights_wide_r16_fp32", 16, 32, 8, 1),
    (32, "fp32"): BlockConfig("grouped_bwd_weights_wide_r32_fp32", 16, 32, 8, 1),
}


def grouped_config(table: dict, rank: int, dtype: torch.dtype) -> BlockConfig:
    return table[(padded_rank(rank), dtype_group(dtype))]
