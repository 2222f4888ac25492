"""3x3 convolutions (stride 1, zero padding 1, NHWC, HWIO) by Winograd's F(2x2, 3x3) over blocks
of output rows: XLA:CPU's fast path for float32.

Each 2 x 2 tile of outputs is computed from the 4 x 4 input tile around it as

  Y = A^T [ (G g G^T) * (B^T d B) ] A      (Lavin & Gray, "Fast Algorithms for Convolutional
                                            Neural Networks", 2016)

where, per channel, d is the input tile, g the 3 x 3 kernel and * the product of the 16 entries;
summed over the input channels, those 16 products are 16 matmuls (tiles, Cin) x (Cin, Cout). That
is 16 multiplies per tile and channel pair where the direct convolution takes 36: 2.25x fewer
FLOPs, for transforms that only add and subtract (B, A) or halve (G). The transforms run in
float32; the 16 matmuls take operands in the kernel's dtype and accumulate in float32.

Rounding: the transformed values are sums of up to 4 inputs (B) or 9 weights (G), and each output
sums 9 matmul results, so float32 results differ from the direct convolution by a few units in
the last place of the largest of those terms (measured: at most 4e-6 to 6.4e-6 from XLA's exact-
to-rounding float32 convolution at the decoder's shapes, unit-variance inputs). In bfloat16 the
rounded transforms cost more (max 0.03 against 0.016 for the row blocks at 256 x 256 x 160,
`ops/conv_rows.py`), and there the row blocks are also faster (the decoder's convs at batch 8:
7.1 s against 4.4 s), so "auto" takes this path for float32 only.

Blocks: the 16 matmuls of one block of R output rows of one image, (R/2 x W/2 tiles, Cin), run
near XLA's matmul rate while their float32 products stay near the caches; for the whole image at
once the same matmuls ran far slower (measured, 160 channels, 16 matmuls of 1024 tiles against
16 of 16384: float32 230 against 136 GFLOP/s, bf16 1046 against 249). Figures:
`benchmarks/bench_conv.py --dtypes float32`; `ops.conv` takes this path by "auto" for float32 on
CPU at 160 channels and more.

`ops.conv.conv3x3(impl="winograd")` differentiates it as XLA's convolution (a custom vjp), so
training through this path is the same computation as through XLA's.
"""
from __future__ import annotations

import jax.numpy as jnp

from var_jax.ops import conv_rows, float_bits

# Output pixels per block: the rows per block are the largest even divisor R of the image height
# with R x width <= this (at least 2 rows). Each block's loop step has a fixed cost (~1 ms on the
# 2-core Xeon of the measurements) and its float32 products grow with it: 2048 pixels (512 tiles
# per matmul) measured fastest or within noise of it at the decoder's shapes, float32, batch 1
# and 4 (256 x 256 x 160: 136 ms against 151 / 175 for 4096 / 8192 pixels and 206 for 1024;
# 128 x 128 x 160: 28 ms against 28 / 50 / 53), while 16 and 32 px images are one block each.
MAX_BLOCK_PIXELS = 2048


def block_rows(height: int, width: int, max_pixels: int = MAX_BLOCK_PIXELS) -> int:
  """The output rows per block for `height` x `width` images (`height` even)."""
  fitting = [r for r in range(2, height + 1, 2) if height % r == 0 and r * width <= max_pixels]
  return max(fitting, default=2)


def _tile_transform(e0, o0, e1, o1):
  """B^T applied along one axis: (d0, d1, d2, d3) = (e0, o0, e1, o1), the tile's even and odd
  entries in two consecutive pairs, to (d0 - d2, d1 + d2, d2 - d1, d1 - d3)."""
  return [e0 - e1, o0 + e1, e1 - o0, o0 - o1]


def _input_transform(d_HWC):
  """B^T d B for every 4 x 4 tile at even offsets of the padded rows d, (R + 2, W + 2, C) float32
  -> (4, 4, R / 2, W / 2, C): the tile's 16 entries first, then its place."""
  H2, W2, C = d_HWC.shape
  # The even/odd split by reshape: strided slices made XLA:CPU's fusion 2x slower (measured).
  pairs = d_HWC.reshape(H2 // 2, 2, W2, C)
  even, odd = pairs[:, 0], pairs[:, 1]
  rows = jnp.stack(_tile_transform(even[:-1], odd[:-1], even[1:], odd[1:]))  # (4, R/2, W+2, C)
  pairs = rows.reshape(4, H2 // 2 - 1, W2 // 2, 2, C)
  even, odd = pairs[:, :, :, 0], pairs[:, :, :, 1]
  return jnp.stack(_tile_transform(even[:, :, :-1], odd[:, :, :-1], even[:, :, 1:], odd[:, :, 1:]),
                   axis=1)


def _output_transform(m_AB_TO):
  """A^T m A: (4, 4, R / 2, W / 2, O) products -> (R, W, O) outputs, each 2 x 2 tile in place."""
  along_rows = [m_AB_TO[0] + m_AB_TO[1] + m_AB_TO[2], m_AB_TO[1] - m_AB_TO[2] - m_AB_TO[3]]
  tiles = jnp.stack([jnp.stack([m[0] + m[1] + m[2], m[1] - m[2] - m[3]], axis=-2)
                     for m in along_rows], axis=1)  # (R/2, 2, W/2, 2, O)
  R2, _, W2, _, O = tiles.shape
  return tiles.reshape(2 * R2, 2 * W2, O)


def kernel_transform(kernel_HWIO, dtype):
  """G g G^T per (Cin, Cout) pair: (3, 3, Cin, Cout) -> (4, 4, Cin, Cout), computed in float32,
  then cast to `dtype`."""
  def along(k0, k1, k2):  # G = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]
    return [k0, (k0 + k1 + k2) * 0.5, (k0 - k1 + k2) * 0.5, k2]

  k = kernel_HWIO.astype(jnp.float32)
  return jnp.stack([jnp.stack(along(r[0], r[1], r[2])) for r in along(k[0], k[1], k[2])]
                   ).astype(dtype)


def conv3x3_winograd(x_BHWC, kernel_HWIO, bias_O, upsample: bool = False,
                     max_pixels: int = MAX_BLOCK_PIXELS):
  """conv3x3(x) + bias in the kernel's dtype (float32 accumulation), x upsampled x2 by nearest
  neighbour first with `upsample`; the (upsampled) height and width must be even. Shapes as
  `ops.conv.conv3x3` (the caller checks them). The forward only: `ops.conv.conv3x3(
  impl="winograd")` gives it the XLA convolution's gradient."""
  dtype = kernel_HWIO.dtype
  C, O = kernel_HWIO.shape[2:]
  H, W = (2 * x_BHWC.shape[1], 2 * x_BHWC.shape[2]) if upsample else x_BHWC.shape[1:3]
  if H % 2 or W % 2:
    raise ValueError(f"Winograd F(2x2, 3x3) needs an even height and width, got {H} x {W}.")
  u_K_IO = kernel_transform(kernel_HWIO, dtype).reshape(16, C, O)
  bias_O = bias_O.astype(jnp.float32)

  def block(rows):
    R, W = rows.shape[0] - 2, rows.shape[1] - 2
    d = float_bits.from_bits(rows, dtype).astype(jnp.float32)
    v_K_TC = _input_transform(d).astype(dtype).reshape(16, (R // 2) * (W // 2), C)
    m_K_TO = jnp.einsum("ktc,kco->kto", v_K_TC, u_K_IO, preferred_element_type=jnp.float32)
    return _output_transform(m_K_TO.reshape(4, 4, R // 2, W // 2, O)) + bias_O

  return conv_rows.map_over_row_blocks(
      x_BHWC, dtype, upsample, lambda H, W: block_rows(H, W, max_pixels), block)
