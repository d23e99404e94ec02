"""The bottleneck adapter's tile tables, one per kernel (and per layout where one spills), and its
kernel variants. plan.py chooses among them."""

import torch

from ..launch import BlockConfig, dtype_group, padded_rank
from ..variants import Variant, register_variants

# Keyed by (padded rank, dtype group of the compute dtype). Every entry, and every smaller
# block-rows variant plan_block_rows may derive from it, was compiled for sm_80 and sm_90 with
# compile_check: the chosen tiles are the largest tried that have no spills in either
# specialization (aligned and unaligned); see fused_adapters.tools.compile_check for the table.
FORWARD_CONFIGS = {
    (16, "half"): BlockConfig("fwd_r16_half", 64, 64, 8, 2, wide_dim=128),
    (32, "half"): BlockConfig("fwd_r32_half", 64, 64, 8, 2, wide_dim=128),
    (64, "half"): BlockConfig("fwd_r64_half", 64, 64, 8, 2, wide_dim=128),
    (128, "half"): BlockConfig("fwd_r128_half", 64, 64, 8, 2),
    (256, "half"): BlockConfig("fwd_r256_half", 32, 32, 8, 2),
    (16, "fp32"): BlockConfig("fwd_r16_fp32", 32, 64, 8, 2),
    (32, "fp32"): BlockConfig("fwd_r32_fp32", 32, 64, 8, 2),
    (64, "fp32"): BlockConfig("fwd_r64_fp32", 32, 64, 8, 2),
    (128, "fp32"): BlockConfig("fwd_r128_fp32", 16, 64, 8, 2),
    (256, "fp32"): BlockConfig("fwd_r256_fp32", 16, 16, 4, 2),
}
BACKWARD_HIDDEN_CONFIGS = {
    (16, "half"): BlockConfig("bwd_hidden_r16_half", 64, 64, 8, 2, wide_dim=128),
    (32, "half"): BlockConfig("bwd_hidden_r32_half", 64, 64, 8, 2, wide_dim=128),
    (64, "half"): BlockConfig("bwd_hidden_r64_half", 64, 64, 8, 2, wide_dim=128),
    (128, "half"): BlockConfig("bwd_hidden_r128_half", 32, 64, 8, 2),
    (256, "half"): BlockConfig("bwd_hidden_r256_half", 16, 32, 8, 2),
    (16, "fp32"): BlockConfig("bwd_hidden_r16_fp32", 64, 64, 8, 2),
    (32, "fp32"): BlockConfig("bwd_hidden_r32_fp32", 64, 64, 8, 2),
    (64, "fp32"): BlockConfig("bwd_hidden_r64_fp32", 32, 64, 8, 2),
    (128, "fp32"): BlockConfig("bwd_hidden_r128_fp32", 32, 32, 8, 2),
    (256, "fp32"): BlockConfig("bwd_hidden_r256_fp32", 16, 32, 8, 2),
}
BACKWARD_WEIGHTS_CONFIGS = {
    # 16 columns per program at rank <= 16: 48 column tiles at D = 768, so 6 row chunks fill 132
    # SMs twice; with 32 columns it takes 11, and their partials cost 11% of a pass over x at
    # M = 6304, rank 8 (counted: backward 1.39x the floor with 16 columns).
    (16, "half"): BlockConfig("bwd_weights_r16_half", 32, 16, 4, 2),
    (32, "half"): BlockConfig("bwd_weights_r32_half", 32, 32, 4, 2),
    # Two rank blocks at rank 64: twice the programs per row chunk, so half the chunks (and
    # partials, 400 KB each at D = 768) fill the GPU.
    (64, "half"): BlockConfig("bwd_weights_r64_half", 16, 32, 8, 2, rank_tile=32),
    (128, "half"): BlockConfig("bwd_weights_r128_half", 16, 32, 8, 2, rank_tile=64),
    (256, "half"): BlockConfig("bwd_weights_r256_half", 16, 32, 8, 2, rank_tile=64),
    (16, "fp32"): BlockConfig("bwd_weights_r16_fp32", 16, 32, 4, 2),
    (32, "fp32"): BlockConfig("bwd_weights_r32_fp32", 16, 32, 4, 2),
    (64, "fp32"): BlockConfig("bwd_weights_r64_fp32", 16, 32, 4, 2, rank_tile=32),
    (128, "fp32"): BlockConfig("bwd_weights_r128_fp32", 16, 32, 4, 2, rank_tile=32),
    (256, "fp32"): BlockConfig("bwd_weights_r256_fp32", 16, 32, 4, 2, rank_tile=32),
}
# The weights launch of a width-changing bottleneck (D_out != D) carries a second column mask and
# width; these tiles compile without spills there (compile check, "backward_weights_wide").
BACKWARD_WEIGHTS_WIDE_CONFIGS = {
    (16, "half"): BlockConfig("bwd_weights_wide_r16_half", 32, 16, 4, 1),
    (32, "half"): BlockConfig("bwd_weights_wide_r32_half", 32, 16, 4, 2),
    (64, "half"): BlockConfig("bwd_weights_wide_r64_half", 16, 32, 4, 2, rank_tile=32),
    (128, "half"): BlockConfig("bwd_weights_wide_r128_half", 16, 32, 8, 2, rank_tile=64),
    (256, "half"): BlockConfig("bwd_weights_wide_r256_half", 16, 32, 8, 2, rank_tile=64),
    (16, "fp32"): BlockConfig("bwd_weights_wide_r16_fp32", 16, 32, 4, 2),
    (32, "fp32"): BlockConfig("bwd_weights_wide_r32_fp32", 16, 32, 4, 2),
    (64, "fp32"): BlockConfig("bwd_weights_wide_r64_fp32", 16, 16, 4, 2, rank_tile=32),
    (128, "fp32"): BlockConfig("bwd_weights_wide_r128_fp32", 16, 16, 4, 2, rank_tile=32),
    (256, "fp32"): BlockConfig("bwd_weights_wide_r256_fp32", 16, 16, 4, 2, rank_tile=32),
}


# Column-major x and dy (a bottleneck over the token axis of a token-major tensor, LoSA's token
# mixers): the tiles are contiguous along their rows, and these entries of the tables above
# spill there (compile check, backward_weights_column_major: bwd_weights_r32_half under
# autocast_bf16 on sm_80, 32 bytes; bwd_weights_r32_fp32 on sm_90, 8; backward_hidden_column_major:
# bwd_hidden_r64_fp32 on sm_80, unaligned, 8). These smaller tiles do not.
BACKWARD_WEIGHTS_COLUMN_MAJOR_CONFIGS = {
    **BACKWARD_WEIGHTS_CONFIGS,
    (16, "half"): BlockConfig("bwd_weights_r16_half_colmajor", 16, 32, 4, 2),
    (32, "half"): BlockConfig("bwd_weights_r32_half_colmajor", 16, 32, 4, 2),
    (32, "fp32"): BlockConfig("bwd_weights_r32_fp32_colmajor", 16, 16, 4, 2),
    (64, "fp32"): BlockConfig("bwd_weights_r64_fp32_colmajor", 16, 16, 4, 2, rank_tile=32),
    (128, "fp32"): BlockConfig("bwd_weights_r128_fp32_colmajor", 16, 16, 4, 2, rank_tile=32),
    (256, "fp32"): BlockConfig("bwd_weights_r256_fp32_colmajor", 16, 16, 4, 2, rank_tile=32),
}
BACKWARD_HIDDEN_COLUMN_MAJOR_CONFIGS = {
    **BACKWARD_HIDDEN_CONFIGS,
    (64, "fp32"): BlockConfig("bwd_hidden_r64_fp32_colmajor", 32, 32, 8, 2),
}


def block_config(table: dict, rank: int, dtype: torch.dtype) -> BlockConfig:
    return table[(padded_rank(rank), dtype_group(dtype))]


# Variants: named plans the caller may force (kernels.use_variant) and the benchmark compares.
# Each picks among the configurations and flags above, all of which the compile check covers.

VARIANTS = (
    Variant("default", "block rows planned from M and the SM count (the most rows that still give every SM "
                       "two programs); at ranks up to 32 the backward recomputes act(h) from h"),
    Variant("rows16", "16 rows per program in the row-tile launches: the most programs, smallest tiles",
            block_rows=16),
    Variant("rows32", "32 rows per program in the row-tile launches (the configuration's own where fewer)",
            block_rows=32),
    Variant("rows64", "64 rows per program in the row-tile launches (the configuration's own where fewer): "
                      "the fewest programs, largest tiles", block_rows=64),
    Variant("store_act", "planned block rows; at ranks up to 32 the backward's first launch also writes "
                         "act(h) [M, r] for the second to read, instead of recomputing it", store_act=True),
)
register_variants("bottleneck_adapter", VARIANTS)
DEFAULT_VARIANT = VARIANTS[0]


