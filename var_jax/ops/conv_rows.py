"""3x3 convolutions (stride 1, zero padding 1, NHWC, HWIO) as matmuls over blocks of output rows.

XLA's CPU backend runs a bfloat16 convolution no faster than a float32 one: 180-210 GFLOP/s for
the decoder's 256 x 256 x 160 -> 160 conv on a 2-core Intel Xeon with AMX, where a bf16 matmul
reaches 600-1200 GFLOP/s, provided its K and N are a few hundred wide and its output is small
enough to stay in cache (the same dot over all 66k rows of a 256 x 256 image at once falls to
~350). So here one conv is a loop over blocks of R output rows of one image. Per block:

  cols  = the block's R + 2 padded input rows with the three horizontal taps side by side on the
          channel axis, ((R + 2) * W, 3 * Cin);
  z     = cols @ kernel arranged as (3 * Cin, 3 * Cout): one column group per vertical tap dy;
  y[r]  = z[r, group 0] + z[r + 1, group 1] + z[r + 2, group 2] (+ bias), float32, then cast.

All nine taps are summed in float32 (the dot accumulates in float32, and the three partial sums
are float32), so the result differs from XLA's convolution only by summation order. The data
movement (padding, the side-by-side copy, the loop's slices) runs on the values' bit patterns as
unsigned integers: XLA:CPU moves bfloat16 arrays through float32 converts, which made the
copies 1.7x slower (measured). On that host, bf16, one image, XLA's convolution against this
(`benchmarks/bench_conv.py`): 256 x 256 x 160 -> 160 150 -> 47-56 ms, 128 x 128 x 320 -> 160
63 -> 24 ms, 64 x 64 x 320 -> 320 28-30 -> 8-9 ms; all the decoder's convs 1805 -> 574 ms. In
float32 XLA's own convolution is faster (1818 against 2215 ms), so `ops.conv`'s "auto" takes this
path for bfloat16 on CPU only: on CPUs with AMX, and for narrow convs on CPUs without (where
Winograd wins the wide ones, `ops.conv`).

`ops.conv.conv3x3(impl="row_blocks")` differentiates it as XLA's convolution (a custom vjp, as
for the TPU kernel), so training through this path is the same computation as through XLA's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from var_jax.ops import float_bits

# Rows per block: the largest divisor of the image height up to this. 32 rows of a 256-wide image
# is a (8704, 480) x (480, 480) dot with a 17 MB float32 output for 160 channels; 8 and 16 were
# slower, or equal within noise, at every decoder shape measured.
MAX_BLOCK_ROWS = 32


def block_rows(height: int, max_rows: int = MAX_BLOCK_ROWS) -> int:
  """The rows per block for images `height` rows high: its largest divisor <= max_rows."""
  return max(r for r in range(1, min(height, max_rows) + 1) if height % r == 0)


def map_over_row_blocks(x_BHWC, dtype, upsample: bool, rows_per_block, block):
  """The loop both CPU block convolutions (this one, ops/conv_winograd.py) share: x in `dtype`,
  upsampled x2 by nearest neighbour first with `upsample`, zero-padded by 1, then for each block
  of R = rows_per_block(H, W) output rows of one image `block(rows)` on the block's R + 2 padded
  input rows as bit patterns ((R + 2, W + 2, C), `float_bits`), which returns the block's
  (R, W, O) output in any float dtype, inside a conditional (the comment in `step`). Returns
  (B, H, W, O) in `dtype`."""
  bits_BHWC = float_bits.to_bits(x_BHWC.astype(dtype))
  if upsample:
    bits_BHWC = jnp.repeat(jnp.repeat(bits_BHWC, 2, axis=1), 2, axis=2)
  B, H, W, C = bits_BHWC.shape
  R = rows_per_block(H, W)
  blocks_per_image = H // R
  padded = jnp.pad(bits_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)))

  def block_bits(padded, i):
    image, first_row = i // blocks_per_image, (i % blocks_per_image) * R
    rows = jax.lax.dynamic_slice(padded, (image, first_row, 0, 0), (1, R + 2, W + 2, C))[0]
    return float_bits.to_bits(block(rows).astype(dtype))

  out_bits = jax.eval_shape(block_bits, padded, 0)
  skipped = lambda padded, i: jnp.zeros(out_bits.shape, out_bits.dtype)

  def step(i):
    # The block is the taken branch of a conditional (i >= 0 always holds, but XLA does not fold
    # it) because XLA:CPU fuses a block's last elementwise pass (Winograd's output transform, the
    # row blocks' tap sums) into the loop's in-place write of the block into the stacked output,
    # and runs such an in-place fusion on one thread; a conditional is a boundary XLA does not
    # fuse across, so that pass runs on every thread into the branch's own buffer and only its
    # copy writes in place. Measured on a 2-core AMD EPYC (no AMX), the released tokenizer's
    # decoder for one image, both ways alternated in one process, images identical: float32
    # 1.49 -> 1.34 s (medians of 11), bfloat16 1.59 -> 1.49 s; the public sampling call, float32,
    # batch 1 5.10 -> 4.98 s (medians of 7), batch 8 40.58 -> 40.46 s (of 3; its calls spread
    # over 38-43 s). `jax.lax.optimization_barrier` on the block instead did not help.
    return jax.lax.cond(i >= 0, block_bits, skipped, padded, i)

  out = jax.lax.map(step, jnp.arange(B * blocks_per_image))
  return float_bits.from_bits(out, dtype).reshape(B, H, W, out.shape[-1])


def conv3x3_row_blocks(x_BHWC, kernel_HWIO, bias_O, upsample: bool = False,
                       max_rows: int = MAX_BLOCK_ROWS):
  """conv3x3(x) + bias in the kernel's dtype (float32 accumulation), x upsampled x2 by nearest
  neighbour first with `upsample`; shapes as `ops.conv.conv3x3` (the caller checks them). The
  forward only: `ops.conv.conv3x3(impl="row_blocks")` gives it the XLA convolution's gradient."""
  dtype = kernel_HWIO.dtype
  C, O = kernel_HWIO.shape[2:]
  # (dy, dx, cin, cout) -> rows (dx, cin), columns (dy, cout).
  kernel_KN = kernel_HWIO.transpose(1, 2, 0, 3).reshape(3 * C, 3 * O)
  bias_O = bias_O.astype(jnp.float32)

  def block(rows):
    R, W = rows.shape[0] - 2, rows.shape[1] - 2
    cols = jnp.concatenate([rows[:, dx:dx + W] for dx in range(3)], axis=-1)
    cols_MK = float_bits.from_bits(cols, dtype).reshape((R + 2) * W, 3 * C)
    z = jnp.dot(cols_MK, kernel_KN, preferred_element_type=jnp.float32).reshape(R + 2, W, 3, O)
    return z[0:R, :, 0] + z[1:R + 1, :, 1] + z[2:R + 2, :, 2] + bias_O

  return map_over_row_blocks(x_BHWC, dtype, upsample, lambda H, W: block_rows(H, max_rows), block)
