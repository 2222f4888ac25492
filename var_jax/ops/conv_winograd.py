"""3x3 convolutions (stride 1, zero padding 1, NHWC, HWIO) by Winograd's F(m x m, 3 x 3) over
blocks of output rows: XLA:CPU's fast path for float32.

Each m x m tile of outputs is computed from the (m + 2) x (m + 2) input tile around it as

  Y = A^T [ (G g G^T) * (B^T d B) ] A      (Lavin & Gray, "Fast Algorithms for Convolutional
                                            Neural Networks", 2016)

where, per channel, d is the input tile, g the 3 x 3 kernel and * the product of the (m + 2)^2
entries; summed over the input channels, those products are (m + 2)^2 matmuls (tiles, Cin) x
(Cin, Cout). Per output pixel and channel pair that is (m + 2)^2 / m^2 multiplies where the direct
convolution takes 9: F(2x2, 3x3) 4 (2.25x fewer), F(4x4, 3x3) 2.25 (4x fewer). The transforms
only add, subtract and scale by constants; they run in float32, and the matmuls take operands in
the kernel's dtype and accumulate in float32.

Rounding: a transformed value sums up to 4 (m = 2) or 16 (m = 4) inputs with coefficients up to
1 or 25, and each output sums (m + 2)^2 matmul results with coefficients up to 1 or 64, so the
result differs from the direct convolution by a few units in the last place of the largest of
those terms: measured in float32 against XLA's exact-to-rounding convolution at the decoder's
shapes (unit-variance inputs and outputs), at most 4e-6 to 6.4e-6 for m = 2 and ~5e-5 for m = 4,
both far below the 1/255 of a decoded pixel. In bfloat16 the rounded transforms cost more (m = 2:
max 0.03 against 0.016 for the row blocks at 256 x 256 x 160, `ops/conv_rows.py`), so bfloat16
keeps m = 2, and "auto" gives bfloat16 to the row blocks on CPUs with AMX, which are faster there
(the decoder's convs at batch 8: 7.1 s against 4.4 s), and to Winograd on CPUs without
(figures at `ops.conv.AUTO_WINOGRAD_MIN_CHANNELS`).

`output_tile` picks m: 4 for float32 images of at least 64 x 64 output pixels with sides that are
multiples of 4, else 2. Against F(2x2) on the 2-core Xeon of the measurements, float32, batch 8,
both alternated in one process: 256 x 256 x 160 1561 -> 1166 ms, 128 x 128 x 160 355 -> 269,
64 x 64 x 320 299 -> 205; the decoder's convs of >= 160 output channels 17.97 -> 13.55 s, the
whole decoder 18.8 -> 13.6 s. On a 2-core AMD EPYC (AVX-512, no AMX): one image's decoder 2.12
-> 1.78 s; the public sampling call, which decodes one image per step on CPU, batch 1 5.67 ->
5.43 s and batch 8 44.43 -> 40.80 s (medians, `benchmarks/bench_conv.py --winograd-tiles
--public-call`), for up to ~10 s more compile (on the Xeon an earlier A/B read batch 1 x1.02).
Smaller images keep F(2x2) (`TILE4_MIN_PIXELS`).

Blocks: the matmuls of one block of R output rows of one image, (R/m x W/m tiles, Cin), run near
XLA's matmul rate while their float32 products stay near the caches; for the whole image at once
the same matmuls ran far slower (measured, m = 2, 160 channels, 16 matmuls of 1024 tiles against
16 of 16384: float32 230 against 136 GFLOP/s, bf16 1046 against 249). Figures:
`benchmarks/bench_conv.py --dtypes float32`; `ops.conv` takes this path by "auto" for float32 on
CPU at 160 channels and more.

`ops.conv.conv3x3(impl="winograd")` differentiates it as XLA's convolution (a custom vjp), so
training through this path is the same computation as through XLA's.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from var_jax.ops import conv_rows, cpu_gemm, float_bits

# (B^T, G, A^T) of F(m x m, 3 x 3) by output tile m, from the interpolation points 0, +-1 (m = 2)
# and 0, +-1, +-2 (m = 4), each with the point at infinity (Lavin & Gray 2016).
_MATRICES = {
    2: (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
        ((1, 1, 1, 0), (0, 1, -1, -1))),
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
         (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
         (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
}
OUTPUT_TILES = tuple(_MATRICES)

# Tiles per block: the rows per block are the largest divisor R of the image height that is a
# multiple of m with (R / m) x (W / m) <= this (at least m rows). Each block's loop step has a
# fixed cost (~1 ms on the 2-core Xeon of the measurements) and its float32 products grow with it:
# 512 tiles measured fastest or within noise of it at the decoder's shapes, float32, batch 1 to 8
# (m = 2, 256 x 256 x 160 at batch 1: 136 ms against 151 / 175 for 1024 / 2048 tiles and 206 for
# 256; m = 4, 2 images: 218 ms against 264 / 271 for 128 / 256 tiles and 259 / 274 for 1024 /
# 2048), while 16 and 32 px images are one block each.
MAX_BLOCK_TILES = 512


# F(4x4, 3x3) from this many output pixels of one image up: below it an image has too few 4 x 4
# tiles for its 36 matmuls (at 32 x 32 px, 64 tiles of 320 channels, F(4x4) took 74 ms for 8
# images against F(2x2)'s 63; at 16 x 16 x 640 83 against 79), above it F(4x4) won at every
# shape of the released decoder at batch 8 (64 x 64 x 320 x1.45, 128 x 128 x 160 x1.32, 256 x
# 256 x 160 x1.34) and, on a 2-core AMD EPYC, for one image (the decoder 2.12 -> 1.78 s).
# Its transforms are 2.25x F(2x2)'s ops, so a sampling program compiles up to ~10 s longer.
TILE4_MIN_PIXELS = 64 * 64


def output_tile(height: int, width: int, dtype) -> int:
  """m of the F(m x m, 3 x 3) for images of `height` x `width` outputs (both even) in `dtype`:
  4 for float32 where both sides are multiples of 4 and an image has at least TILE4_MIN_PIXELS;
  else 2 (module docstring)."""
  if (jnp.dtype(dtype) == jnp.float32 and height % 4 == 0 and width % 4 == 0
      and height * width >= TILE4_MIN_PIXELS):
    return 4
  return 2


def block_rows(height: int, width: int, tile: int, max_tiles: int = MAX_BLOCK_TILES) -> int:
  """The output rows per block for `height` x `width` images (both multiples of `tile`)."""
  fitting = [r for r in range(tile, height + 1, tile)
             if height % r == 0 and (r // tile) * (width // tile) <= max_tiles]
  return max(fitting, default=tile)


def _combine(matrix, xs):
  """matrix @ xs for a constant matrix and a list of arrays, as adds (zeros skipped, +-1 as adds
  and subtractions, other entries as scalings)."""
  out = []
  for row in matrix:
    total = None
    for coefficient, x in zip(row, xs):
      if coefficient == 0:
        continue
      term = x if coefficient == 1 else -x if coefficient == -1 else x * coefficient
      total = term if total is None else total + term
    out.append(total)
  return out


def _tiles_along(x, axis: int, tile: int):
  """The m + 2 entries of every input tile along `axis` of x (R + 2 long there), as m + 2 arrays
  R / m long there: entry t of tile j is x[j m + t]. x, zero-padded to R + m there (nothing for
  m = 2), reshapes into R / m + 1 groups of m: entries 0..m-1 are group j's, m and m + 1 the first
  two of group j + 1. XLA:CPU made strided slices of the same entries 2x slower (measured, m = 2:
  15.0 against 8.2 ms per image), and for m = 4 two reshapes of rows 0..R-1 and 2..R+1 without
  the padding 1.25x slower (256 x 256 x 160, 2 images: 327 against 260 ms)."""
  tile_count = (x.shape[axis] - 2) // tile
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, tile - 2)
  groups = jnp.pad(x, pad).reshape(x.shape[:axis] + (tile_count + 1, tile) + x.shape[axis + 1:])

  def entry(first_group, t):
    index = (slice(None),) * axis + (slice(first_group, first_group + tile_count), t)
    return groups[index]

  return [entry(0, t) for t in range(tile)] + [entry(1, 0), entry(1, 1)]


def _input_transform(d_HWC, tile: int):
  """B^T d B for every (m + 2) x (m + 2) tile at offsets that are multiples of m of the padded
  rows d, (R + 2, W + 2, C) float32 -> (m + 2, m + 2, R / m, W / m, C): the tile's entries first,
  then its place."""
  B_T = _MATRICES[tile][0]
  rows = jnp.stack(_combine(B_T, _tiles_along(d_HWC, 0, tile)))  # (m + 2, R/m, W + 2, C)
  return jnp.stack(_combine(B_T, _tiles_along(rows, 2, tile)), axis=1)


def _output_transform(m_AB_TO, tile: int):
  """A^T m A: (m + 2, m + 2, R / m, W / m, O) products -> (R, W, O) outputs, each m x m tile in
  place."""
  A_T = _MATRICES[tile][2]
  along_rows = _combine(A_T, list(m_AB_TO))  # m x (m + 2, R/m, W/m, O)
  tiles = jnp.stack([jnp.stack(_combine(A_T, list(m)), axis=-2) for m in along_rows],
                    axis=1)  # (R/m, m, W/m, m, O)
  Rm, _, Wm, _, O = tiles.shape
  return tiles.reshape(tile * Rm, tile * Wm, O)


# The transforms below are a few hundred array ops per block (`_combine`'s adds), traced anew for
# every conv that calls them: the released decoder has 38 Winograd convs, each block of which
# `conv_rows.map_over_row_blocks` traces twice (its output shape, then its loop step), in
# eleven distinct shapes. As jitted functions they are traced once per shape and dtype (jax.jit's
# cache) and enter the program as calls, which XLA inlines: the same optimized HLO (op for op)
# and the same images. On a 2-core Xeon, the released tokenizer in float32: one trace of its
# decoder (`jax.eval_shape(vqvae.winograd_kernels, ...)`) 5.65 -> 2.03 s; VAR-d16's first
# sampling call at batch 1 (which traces the decoder twice) spent 48.1 and 41.2 s beyond a steady
# call's time before, 40.7 and 39.5 s after (two runs each; the host's speed drifts).


@functools.partial(jax.jit, static_argnames=("dtype", "tile"))
def kernel_transform(kernel_HWIO, dtype, tile: int = 2):
  """G g G^T per (Cin, Cout) pair: (3, 3, Cin, Cout) -> (m + 2, m + 2, Cin, Cout), computed in
  float32, then cast to `dtype`."""
  G = _MATRICES[tile][1]
  k = kernel_HWIO.astype(jnp.float32)
  return jnp.stack([jnp.stack(_combine(G, list(r))) for r in _combine(G, list(k))]).astype(dtype)


def conv3x3_winograd(x_BHWC, kernel_HWIO, bias_O, upsample: bool = False,
                     tile: int | None = None, max_tiles: int = MAX_BLOCK_TILES,
                     transformed_kernel=None):
  """conv3x3(x) + bias in the kernel's dtype (float32 accumulation), x upsampled x2 by nearest
  neighbour first with `upsample`, by F(m x m, 3 x 3) with m = `tile` (None: `output_tile`); the
  (upsampled) height and width must be multiples of m. Shapes as `ops.conv.conv3x3` (the caller
  checks them). `transformed_kernel`: `kernel_transform(kernel_HWIO, dtype, m)` computed before
  (a sampler computes it once per model instead of in every call), else it is computed here. The
  forward only: `ops.conv.conv3x3(impl="winograd")` gives it the XLA convolution's gradient."""
  dtype = kernel_HWIO.dtype
  C, O = kernel_HWIO.shape[2:]
  H, W = (2 * x_BHWC.shape[1], 2 * x_BHWC.shape[2]) if upsample else x_BHWC.shape[1:3]
  m = output_tile(H, W, dtype) if tile is None else tile
  if m not in _MATRICES:
    raise ValueError(f"Winograd output tile {m} is not one of {OUTPUT_TILES}.")
  if H % m or W % m:
    raise ValueError(f"Winograd F({m}x{m}, 3x3) needs a height and width that are multiples of "
                     f"{m}, got {H} x {W}.")
  n = m + 2
  if transformed_kernel is None:
    transformed_kernel = kernel_transform(kernel_HWIO, dtype, m)
  elif transformed_kernel.shape != (n, n, C, O) or transformed_kernel.dtype != dtype:
    raise ValueError(f"a transformed kernel for F({m}x{m}, 3x3) must be {(n, n, C, O)} {dtype}, "
                     f"got {transformed_kernel.shape} {transformed_kernel.dtype}.")
  block = functools.partial(_block, u_K_IO=transformed_kernel.reshape(n * n, C, O),
                            bias_O=bias_O.astype(jnp.float32), dtype=jnp.dtype(dtype), tile=m)
  return conv_rows.map_over_row_blocks(
      x_BHWC, dtype, upsample, lambda H, W: block_rows(H, W, m, max_tiles), block)


@functools.partial(jax.jit, static_argnames=("dtype", "tile"))
def _block(rows, u_K_IO, bias_O, *, dtype, tile: int):
  """One block of output rows (float32, bias added) from its R + 2 padded input rows as bit
  patterns in `dtype` ((R + 2, W + 2, C), `conv_rows.map_over_row_blocks`) and the transformed
  kernel (m + 2)^2 x (C, O)."""
  m, n = tile, tile + 2
  R, W = rows.shape[0] - 2, rows.shape[1] - 2
  O = u_K_IO.shape[-1]
  d = float_bits.from_bits(rows, dtype).astype(jnp.float32)
  v_K_TC = _input_transform(d, m).astype(dtype).reshape(n * n, (R // m) * (W // m), -1)
  if cpu_gemm.enabled(v_K_TC, u_K_IO):
    m_K_TO = cpu_gemm.matmul(v_K_TC, u_K_IO)
  else:
    m_K_TO = jnp.einsum("ktc,kco->kto", v_K_TC, u_K_IO, preferred_element_type=jnp.float32)
  return _output_transform(m_K_TO.reshape(n, n, R // m, W // m, O), m) + bias_O
