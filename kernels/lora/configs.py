"""The LoRA linear's tile tables (its single-launch GEMM) and its variants, the op's two forms."""

from ..launch import BlockConfig
from ..variants import Variant, register_variants

# Keyed by (padded rank, dtype group of the compute dtype); each entry lists tiles from the
# largest to the smallest, and plan.gemm_config takes the largest whose grid fills the GPU.
# "fp32" means tf32 dots: fp32 without tf32 lowers both dots to FMAs, which spill at every tile
# tried from rank 32 up (64 x 64 x 32, rank 64: 1448 bytes on sm_90), and there cuBLAS's fp32
# GEMM in the default form is the better kernel anyway. Ranks above 64 (wide hidden accumulators
# spill at 128 x 128 x 32 on sm_80) also take the default form: LoRA's ranks are 4 to 64.
#
# Every entry was compiled for sm_80 and sm_90 with the compile check (kernels lora_forward and
# lora_backward_input): no spills, MMA, vectorized loads, shared memory within sm_80's 163 KiB.
# Aligned launches (unit column stride, widths, row stride and pointers multiples of 16) take
# LORA_LINEAR_CONFIGS. Anything else takes LORA_LINEAR_UNALIGNED_CONFIGS: with no vectorized
# loads every element carries its own 64-bit address, and the aligned tiles spill there
# (64 x 64 x 64, rank 16, bf16, sm_80: 304 bytes); 64 x 64 x 16 does not.
MAX_SINGLE_LAUNCH_RANK = 64
# With dropout the backward's input launch draws the mask of its whole output tile in the
# epilogue, beside the live accumulator: 128 x 128 spills there (rank 64, fp16, sm_90: 1088
# bytes; 255 registers at ranks 8 and 16) where 128 x 64 does not (179 registers at rank 64).
# That launch takes tiles of at most this many elements.
MAX_MASKED_OUTPUT_TILE = 128 * 64


def _configs(rank: int, group: str, tiles, suffix: str = "") -> list:
    return [BlockConfig(f"lora_r{rank}_{group}_{rows}x{cols}x{k}{suffix}", block_rows=rows, block_dim=cols,
                        num_warps=warps, num_stages=stages, block_k=k, group_rows=8)
            for rows, cols, k, warps, stages in tiles]


_RANKS = (16, 32, 64)
LORA_LINEAR_CONFIGS = {
    **{(rank, "half"): _configs(rank, "half", ((128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 4, 3)))
       for rank in _RANKS},
    **{(rank, "fp32"): _configs(rank, "fp32", ((64, 128, 32, 8, 2), (64, 64, 32, 4, 2), (32, 64, 32, 4, 2)))
       for rank in _RANKS},
}
LORA_LINEAR_UNALIGNED_CONFIGS = {
    **{(rank, "half"): _configs(rank, "half", ((64, 64, 16, 4, 2), (32, 32, 16, 4, 2)), "_unaligned")
       for rank in _RANKS},
    **{(rank, "fp32"): _configs(rank, "fp32", ((32, 32, 16, 4, 2),), "_unaligned") for rank in _RANKS},
}

VARIANTS = (
    Variant("default", "the base GEMM through F.linear (cuBLAS on a GPU), then the low-rank branch as one fused "
                       "bottleneck launch with the GEMM's output as its residual"),
    Variant("single_launch", "base GEMM and low-rank branch in one Triton launch (x read once per column tile, "
                             "no [M, D_out] intermediate); backward 2 launches", single_launch=True),
)
register_variants("lora_linear", VARIANTS)
