"""The adapter epilogue in Triton, shared by every fused op's forward:
y = residual + scale * (row_scale[:, None] * update), on one [rows, D-tile] fp32 tile; and its
backward's start, g = dy * row_scale * scale.

`epilogue_scalars` loads, once per program, what does not depend on the D tile (row_scale for
the program's rows, a layer-wise scale); `epilogue` applies the rest to each tile, and
`scaled_grad` loads one dy tile and scales it. x as a residual term is read from x itself (its
tile was read by the op's first loop, so the read hits L2)."""

import triton
import triton.language as tl


@triton.jit
def epilogue_scalars(row_scale_ptr, scale_ptr, row_ids, row_mask, scale_value,
                     COMPUTE_DTYPE: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr):
    """(row_scale [BLOCK_ROWS] rounded to the compute dtype as eager casts it, the layer-wise
    scale: the one-element tensor's value, or scale_value when the scale is a Python number)."""
    row_scale = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    if HAS_ROW_SCALE:
        row_scale = tl.load(row_scale_ptr + row_ids, mask=row_mask, other=0.0).to(COMPUTE_DTYPE).to(tl.float32)
    scalar_scale = scale_value
    if SCALE_MODE == "tensor":
        scalar_scale = tl.load(scale_ptr).to(tl.float32)
    return row_scale, scalar_scale


@triton.jit
def epilogue(update, x_ptr, residual_ptr, scale_ptr, row_ids, col_ids, col_mask, tile_mask, row_scale, scalar_scale,
             stride_x_row, stride_x_col, stride_res_row, stride_res_col,
             SCALE_MODE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, ADD_INPUT: tl.constexpr,
             HAS_RESIDUAL: tl.constexpr):
    """update [rows, D tile] in fp32 -> residual + scale * (row_scale * update), in fp32."""
    if HAS_ROW_SCALE:
        update = update * row_scale[:, None]
    if SCALE_MODE == "channel":
        update = update * tl.load(scale_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    else:
        update = update * scalar_scale
    if ADD_INPUT:
        update += tl.load(
            x_ptr + row_ids[:, None] * stride_x_row + col_ids[None, :] * stride_x_col,
            mask=tile_mask, other=0.0,
        ).to(tl.float32)
    if HAS_RESIDUAL:
        update += tl.load(
            residual_ptr + row_ids[:, None] * stride_res_row + col_ids[None, :] * stride_res_col,
            mask=tile_mask, other=0.0,
        ).to(tl.float32)
    return update


@triton.jit
def scaled_grad(grad_y_ptr, scale_ptr, row_ids, row_mask, col_ids, col_mask, row_scale, scalar_scale,
                stride_g_row, stride_g_col, SCALE_MODE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr):
    """g = dy * row_scale * scale on one [rows, D tile] tile of dy (rows row_ids, which may be
    gathered), in fp32. The scales multiply dy in fp32 before any rounding to the compute dtype,
    as eager autocast does (dy * scale, then the cast): a large fp32 dy (loss scaling) times a
    small scale stays finite."""
    grad = tl.load(grad_y_ptr + row_ids[:, None] * stride_g_row + col_ids[None, :] * stride_g_col,
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    if HAS_ROW_SCALE:
        grad = grad * row_scale[:, None]
    if SCALE_MODE == "channel":
        grad = grad * tl.load(scale_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    else:
        grad = grad * scalar_scale
    return grad
