"""The tokenizer decoder's 3x3 convolutions on TPU as a Pallas kernel, with GroupNorm + SiLU fused in.

Why a kernel: in a resnet block the conv's input is silu(group_norm(x)); XLA materialises that
activation in HBM and then runs the conv, and XLA's TPU cost model charges its 3x3 convs with
~7-10x their operands' bytes (a 3x3 conv over 2x256x256x160 bf16 is charged 814 MB for 84 MB of
input and output, measured for issue 16), which made the decoder the bulk of the sampler's
compiled roofline at small batches. This kernel reads each input row once (plus one halo row
above and below per block of rows), applies the per-channel affine + SiLU in VMEM, does the nine
taps as nine matmuls on the MXU with float32 accumulation, and writes each output row once. Its
HBM traffic is exactly what its BlockSpecs move, which is what it declares to the cost model.

Layout: NHWC in, NHWC out, kernel HWIO (nn.Conv's), stride 1, zero padding 1. A grid step takes
one image's block of `rows` output rows (all W columns, a block of output channels): the window
of rows + 2 input rows is assembled in a VMEM scratch (halo rows outside the image are zeros),
each of the 3 row offsets is one (rows*W, Cin) operand, the 3 column offsets are applied to the
float32 products by rotating them one row of the flattened (rows*W) axis and zeroing the column
that wrapped.

Works on the arrays one device holds; the caller wraps it in shard_map.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from var_jax.errors import InputError

_LANES = 128
# VMEM of one grid step, everything included: under the default scoped limit of v4 and v5e
# (16 MiB, all of v4's VMEM), with room for Mosaic's own scratch.
_STEP_VMEM_BYTES = 12 * 2**20
_MAX_BLOCK_PIXELS = 8192  # output pixels per grid step (DMA block)
_MAX_CHUNK_PIXELS = 512  # output pixels per matmul (M of the MXU operands)


def _lane_padded(channels: int) -> int:
  return -(-channels // _LANES) * _LANES


def plan_blocks(height: int, width: int, cin: int, cout: int, in_dtype, out_dtype, *,
                even_rows: bool = False):
  """(rows, chunk, cout_block) of one grid step, or None when even one row does not fit.

  A grid step DMAs `rows` output rows' worth of input (plus 2 halo rows) and writes `rows` output
  rows; it computes them `chunk` rows at a time, so that the float32 sums of a chunk stay small
  while large blocks keep the halo re-reads (2 rows per block) few. Output channels are split
  into the largest block (all of them, or a 128-multiple divisor) whose double-buffered weights
  take at most half of `_STEP_VMEM_BYTES`; then `rows` is the largest divisor of `height` that
  fits. Channels are counted lane-padded (to 128), as VMEM holds them. None too when `width` is
  not a multiple of the sublane tile (8 rows of 32-bit, 16 of 16-bit values). `even_rows`: only
  even block heights (an upsampling step reads rows / 2 input rows).
  """
  item, out_item = jnp.dtype(in_dtype).itemsize, jnp.dtype(out_dtype).itemsize
  if width % (32 // min(item, out_item)):
    return None  # rows of (width, C) would not flatten into whole (8 or 16)-row sublane tiles
  cin_p = _lane_padded(cin)
  weight_bytes = lambda block: 2 * 9 * cin_p * _lane_padded(block) * item
  blocks = [cout] + [b for b in range(cout - cout % _LANES, 0, -_LANES) if b and cout % b == 0]
  cout_block = next((b for b in blocks if weight_bytes(b) <= _STEP_VMEM_BYTES // 2), None)
  if cout_block is None:
    return None
  cout_p = _lane_padded(cout_block)

  def chunk_of(rows):
    return max(c for c in range(1, rows + 1)
               if rows % c == 0 and (c == 1 or c * width <= _MAX_CHUNK_PIXELS))

  def step_bytes(rows):
    window = (rows + 2) * width * cin_p * item
    blocks_in_out = 2 * (rows + 2) * width * cin_p * item + 2 * rows * width * cout_p * out_item
    # A chunk's float32 activation and its 3 column sums plus one product.
    chunk_temps = chunk_of(rows) * width * (cin_p * 4 + 4 * cout_p * 4)
    return window + blocks_in_out + weight_bytes(cout_block) + chunk_temps

  fitting = [r for r in range(1, height + 1)
             if height % r == 0 and not (even_rows and r % 2)
             and (r == 1 or r * width <= _MAX_BLOCK_PIXELS)
             and step_bytes(r) <= _STEP_VMEM_BYTES]
  if not fitting:
    return None
  rows = max(fitting)
  return rows, chunk_of(rows), cout_block


def fits(height: int, width: int, cin: int, cout: int, in_dtype, out_dtype, *,
         upsample: bool = False) -> bool:
  """Whether `conv3x3` can take this shape (`plan_blocks` finds a step that fits VMEM); height
  and width are the output's."""
  return plan_blocks(height, width, cin, cout, in_dtype, out_dtype,
                     even_rows=upsample) is not None


def _conv_kernel(*refs, rows: int, chunk: int, width: int, prologue: bool, upsample: bool,
                 precision):
  if prologue:
    top_ref, mid_ref, bot_ref, scale_ref, shift_ref, w_ref, b_ref, o_ref, win_ref = refs
  else:
    top_ref, mid_ref, bot_ref, w_ref, b_ref, o_ref, win_ref = refs
  i, last = pl.program_id(1), pl.num_programs(1) - 1

  def activate(x):
    if not prologue:
      return x.astype(win_ref.dtype)
    a = x.astype(jnp.float32) * scale_ref[...] + shift_ref[...]
    return (a * jax.nn.sigmoid(a)).astype(win_ref.dtype)

  # The window: input rows [i * rows - 1, (i + 1) * rows + 1), zeros outside the image.
  zero_row = jnp.zeros((1,) + win_ref.shape[1:], win_ref.dtype)
  if upsample:
    # Nearest x2 of the input's rows: each row written twice, each column doubled by a 0/1
    # (width, width / 2) matmul (exact; Mosaic has no sublane interleave to do it in place).
    half = width // 2
    pick = (jax.lax.broadcasted_iota(jnp.int32, (width, half), 0) // 2
            == jax.lax.broadcasted_iota(jnp.int32, (width, half), 1)).astype(win_ref.dtype)

    def widen(row):
      wide = jax.lax.dot_general(pick, activate(row), (((1,), (0,)), ((), ())),
                                 precision=precision, preferred_element_type=jnp.float32)
      return wide.astype(win_ref.dtype)[None]

    for k in range(rows // 2):
      wide = widen(mid_ref[k])
      win_ref[1 + 2 * k:2 + 2 * k] = wide
      win_ref[2 + 2 * k:3 + 2 * k] = wide
    win_ref[0:1] = jnp.where(i > 0, widen(top_ref[0]), zero_row)
    win_ref[rows + 1:rows + 2] = jnp.where(i < last, widen(bot_ref[0]), zero_row)
  else:
    for c in range(rows // chunk):
      win_ref[1 + c * chunk:1 + (c + 1) * chunk] = activate(mid_ref[c * chunk:(c + 1) * chunk])
    win_ref[0:1] = jnp.where(i > 0, activate(top_ref[...]), zero_row)
    win_ref[rows + 1:rows + 2] = jnp.where(i < last, activate(bot_ref[...]), zero_row)

  pixels, cin = chunk * width, win_ref.shape[-1]
  column = jax.lax.broadcasted_iota(jnp.int32, (pixels, o_ref.shape[-1]), 0) % width
  bias = b_ref[...].astype(jnp.float32)
  for c in range(rows // chunk):
    sums = [None, None, None]  # per column offset dx: sum over dy of window rows @ w[dy, dx]
    for dy in range(3):
      lhs = win_ref[c * chunk + dy:c * chunk + dy + chunk].reshape(pixels, cin)
      for dx in range(3):
        p = jax.lax.dot_general(lhs, w_ref[dy, dx], (((1,), (0,)), ((), ())),
                                precision=precision, preferred_element_type=jnp.float32)
        sums[dx] = p if sums[dx] is None else sums[dx] + p
    # Output column w takes input column w - 1 through dx = 0 and w + 1 through dx = 2.
    left = jnp.where(column > 0, pltpu.roll(sums[0], 1, 0), 0.0)
    right = jnp.where(column < width - 1, pltpu.roll(sums[2], pixels - 1, 0), 0.0)
    out = sums[1] + left + right + bias
    o_ref[c * chunk:(c + 1) * chunk] = out.reshape((chunk,) + o_ref.shape[1:]).astype(o_ref.dtype)


def conv3x3(x_BHWC, kernel_HWIO, bias_O, scale_BC=None, shift_BC=None, *, upsample: bool = False,
            out_dtype=None, rows: int | None = None, interpret: bool = False):
  """conv3x3(a) + bias with zero padding 1, where a = x, or silu(x * scale + shift) per image and
  channel (float32) when `scale_BC`/`shift_BC` are given; a is cast to the kernel's dtype before
  the matmuls, which accumulate in float32. Returns (B, H, W, Cout) in `out_dtype` (default the
  kernel's dtype). With `upsample`, a is first upsampled x2 by nearest neighbour (the output is
  (B, 2H, 2W, Cout)) inside the kernel, which reads x at its own size. `rows` (a divisor of the
  output height, even with `upsample`) overrides the planned output rows per grid step."""
  B, H_in, W_in, Cin = x_BHWC.shape
  H, W = (2 * H_in, 2 * W_in) if upsample else (H_in, W_in)
  if kernel_HWIO.shape[:3] != (3, 3, Cin) or bias_O.shape != kernel_HWIO.shape[3:]:
    raise InputError(f"conv3x3 needs a (3, 3, {Cin}, Cout) kernel and a (Cout,) bias for a "
                     f"{x_BHWC.shape} input, got {kernel_HWIO.shape} and {bias_O.shape}.")
  prologue = scale_BC is not None
  if prologue != (shift_BC is not None):
    raise InputError("conv3x3 takes scale_BC and shift_BC together or neither.")
  Cout = kernel_HWIO.shape[3]
  dtype = kernel_HWIO.dtype
  out_dtype = jnp.dtype(dtype if out_dtype is None else out_dtype)
  plan = plan_blocks(H, W, Cin, Cout, x_BHWC.dtype, out_dtype, even_rows=upsample)
  if plan is None:
    raise InputError(f"A {W}-wide row of {Cin} -> {Cout} channels does not fit the conv kernel's "
                     f"VMEM budget (check tpu_conv.fits first); use the XLA convolution.")
  planned_rows, chunk, cout_block = plan
  if rows is None:
    rows = planned_rows
  elif rows < 1 or H % rows or (upsample and rows % 2):
    raise InputError(f"rows={rows} must be a positive divisor of the output height {H}"
                     + (", and even when upsampling." if upsample else "."))
  chunk = max(c for c in range(1, chunk + 1) if rows % c == 0)
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT

  in_rows = rows // 2 if upsample else rows  # input rows under one block of output rows
  halo_top = pl.BlockSpec((None, 1, W_in, Cin),
                          lambda b, i, j: (b, jnp.maximum(i * in_rows - 1, 0), 0, 0))
  middle = pl.BlockSpec((None, in_rows, W_in, Cin), lambda b, i, j: (b, i, 0, 0))
  halo_bottom = pl.BlockSpec((None, 1, W_in, Cin),
                             lambda b, i, j: (b, jnp.minimum((i + 1) * in_rows, H_in - 1), 0, 0))
  per_image = pl.BlockSpec((None, 1, Cin), lambda b, i, j: (b, 0, 0))
  weights = pl.BlockSpec((3, 3, Cin, cout_block), lambda b, i, j: (0, 0, 0, j))
  bias = pl.BlockSpec((1, cout_block), lambda b, i, j: (0, j))
  out_spec = pl.BlockSpec((None, rows, W, cout_block), lambda b, i, j: (b, i, 0, j))

  operands = [x_BHWC, x_BHWC, x_BHWC]
  in_specs = [halo_top, middle, halo_bottom]
  if prologue:
    operands += [scale_BC.astype(jnp.float32).reshape(B, 1, Cin),
                 shift_BC.astype(jnp.float32).reshape(B, 1, Cin)]
    in_specs += [per_image, per_image]
  operands += [kernel_HWIO, bias_O.reshape(1, Cout)]
  in_specs += [weights, bias]

  steps = B * (H // rows)
  cout_blocks = Cout // cout_block
  # HBM holds the channel (lane) axis padded to 128, and the DMAs move whole tiles.
  in_row = W_in * _lane_padded(Cin) * x_BHWC.dtype.itemsize
  out_row = W * _lane_padded(Cout) * out_dtype.itemsize
  rows_read = B * (H_in + 2 * (H // rows))  # each input row once, 2 halo rows per block
  weight_reads = 1 if cout_blocks == 1 else steps  # an unchanged block index is not re-read
  widen_flops = 2 * W * W_in * Cin * rows_read if upsample else 0
  cost = pl.CostEstimate(
      flops=2 * 9 * B * H * W * Cin * Cout + widen_flops,
      transcendentals=rows_read * W_in * Cin if prologue else 0,
      bytes_accessed=(rows_read * in_row + B * H * out_row
                      + weight_reads * (kernel_HWIO.size + Cout) * kernel_HWIO.dtype.itemsize
                      + (2 * B * Cin * 4 if prologue else 0)),
  )
  return pl.pallas_call(
      functools.partial(_conv_kernel, rows=rows, chunk=chunk, width=W, prologue=prologue,
                        upsample=upsample, precision=precision),
      grid=(B, H // rows, cout_blocks),
      in_specs=in_specs,
      out_specs=out_spec,
      out_shape=jax.ShapeDtypeStruct((B, H, W, Cout), out_dtype),
      scratch_shapes=[pltpu.VMEM((rows + 2, W, Cin), dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost,
      interpret=interpret,
      name="var_conv3x3",
  )(*operands)
