"""The tokenizer's 3x3 convolutions, per implementation, at the released decoder's shapes.

  JAX_PLATFORMS=cpu python benchmarks/bench_conv.py                          # bf16 and f32
  JAX_PLATFORMS=cpu python benchmarks/bench_conv.py --dtypes bfloat16 --batch-sizes 1,8
  JAX_PLATFORMS=cpu python benchmarks/bench_conv.py --sample xla --dtypes float32 --batch-sizes 1,8
  JAX_PLATFORMS=cpu python benchmarks/bench_conv.py --winograd-tiles --batch-sizes 1,2,8
  JAX_PLATFORMS=cpu python benchmarks/bench_conv.py --winograd-tiles --public-call --batch-sizes 1,8
  JAX_PLATFORMS=cpu python benchmarks/bench_conv.py --kernel-transform --dtypes float32 --batch-sizes 1,8

Times `ops.conv.conv3x3(x, kernel, bias, impl=...)` (the call the tokenizer's resnet blocks and
upsamplers make, jitted) for "xla" (XLA's convolution), "row_blocks" (matmuls over blocks of
output rows, `ops/conv_rows.py`) and "winograd" (F(2x2, 3x3) or F(4x4, 3x3) over blocks of
rows, `ops/conv_winograd.py`) on every conv shape of the 256 px decoder (ch 160, ch_mult 1,1,2,2,4),
and prints GFLOP/s ("direct" FLOPs, 9 multiply-adds per tap: Winograd's read above the matmul
rate) and which implementation "auto" picks on this backend. The decoder-weighted line sums each
shape's time times its count in one decode, the figure that decides "auto".

`--sample IMPL` instead builds the public call's program (`sampler.build_sample_call`, what
`var_jax.sample` runs; random d16 weights, tokenizer and transformer in each `--dtypes`) with the
tokenizer's `conv_impl` set to IMPL and to "auto", and times the two alternately: the tokens must
be identical, the images differ by the two convolutions' rounding.

`--winograd-tiles` instead times the float32 decoder (`VQVAE.decode_fhat_unclamped` under jit,
random released-size weights) with Winograd's F(2x2, 3x3) only and with its default tile rule
(`conv_winograd.output_tile`: F(4x4, 3x3) for images of >= 64 x 64 px), alternately; with
`--public-call`, the float32 public sampling call's program (random d16 weights) both ways
instead (the tokens must be identical).

`--kernel-transform` builds the public call's program with the decoder's Winograd kernels
transformed in every call (as before the placement transformed them once per model) and once at
placement (the default), and times the two alternately: images and tokens must be identical.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import _common
import var_jax
from var_jax.models import vqvae
from var_jax.models.vqvae import VQVAE
from var_jax.ops import conv as conv_ops
from var_jax.ops import conv_winograd

# (side, Cin, Cout, upsample, count in one decode of the released 256 px decoder).
DECODER_CONVS = (
    (16, 640, 640, False, 10),   # mid (2 blocks) and the 16 px level (3 blocks), 2 convs each
    (16, 640, 640, True, 1),     # upsample to 32
    (32, 640, 320, False, 1), (32, 320, 320, False, 5),
    (32, 320, 320, True, 1),     # upsample to 64
    (64, 320, 320, False, 6),
    (64, 320, 320, True, 1),     # upsample to 128
    (128, 320, 160, False, 1), (128, 160, 160, False, 5),
    (128, 160, 160, True, 1),    # upsample to 256
    (256, 160, 160, False, 6),
    (256, 160, 3, False, 1),     # output head
)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  _common.add_common_flags(parser, batch_sizes="1", iters=5)
  parser.add_argument("--dtypes", default="bfloat16,float32",
                      help="comma-separated compute dtypes (default bfloat16,float32)")
  parser.add_argument("--impls", default="xla,row_blocks,winograd",
                      help="comma-separated ops.conv implementations (default "
                           "xla,row_blocks,winograd)")
  parser.add_argument("--sample", choices=conv_ops.CONV_IMPLS, default=None,
                      help="time the public sampling call with the tokenizer's conv_impl set to "
                           "this and to 'auto' instead")
  parser.add_argument("--winograd-tiles", action="store_true",
                      help="time the float32 decoder with Winograd F(2x2) only and with its "
                           "default tiles instead")
  parser.add_argument("--public-call", action="store_true",
                      help="with --winograd-tiles: time the public sampling call's program "
                           "instead of the decoder")
  parser.add_argument("--kernel-transform", action="store_true",
                      help="time the public sampling call with the decoder's Winograd kernels "
                           "transformed in every call and once at placement instead")
  return parser.parse_args(argv)


def bench_sample(args, dtype_name: str, batch: int) -> None:
  """The public call's program with the tokenizer's convs as `args.sample` and as "auto"."""
  tokenizer = _common.random_tokenizer(args.seed)
  base = _common.random_var_model(16, tokenizer, args.seed)
  config = dataclasses.replace(base.config, dtype=dtype_name)
  variants = {}
  for impl in (args.sample, "auto"):
    tok = var_jax.Tokenizer(dataclasses.replace(tokenizer.config, dtype=dtype_name,
                                                conv_impl=impl), tokenizer.params)
    variants[f"conv_impl={impl}"] = (var_jax.VARModel(config, base.params, tok),
                                     contextlib.nullcontext)
  print(f"auto resolves to {conv_ops.resolve_impl('auto', batch=batch, dtype=dtype_name)!r}")
  _common.compare_sample_programs(variants, np.arange(batch) % config.num_classes, args.seed,
                                  args.iters, f"d16 {dtype_name} batch {batch}")


@contextlib.contextmanager
def _winograd_f2x2_only():
  """F(2x2, 3x3) for every Winograd conv traced meanwhile (no image reaches the F(4x4) rule's)."""
  min_pixels = conv_winograd.TILE4_MIN_PIXELS
  conv_winograd.TILE4_MIN_PIXELS = float("inf")
  try:
    yield
  finally:
    conv_winograd.TILE4_MIN_PIXELS = min_pixels


def bench_winograd_tiles_public_call(args, batch: int) -> None:
  """The float32 public call's program built with F(2x2) only and with the default tiles."""
  tokenizer = _common.random_tokenizer(args.seed)
  model = _common.random_var_model(16, tokenizer, args.seed)
  variants = {"F(2x2) only": (model, _winograd_f2x2_only),
              "default": (model, contextlib.nullcontext)}
  _common.compare_sample_programs(variants, np.arange(batch) % model.config.num_classes,
                                  args.seed, args.iters, f"d16 float32 batch {batch}")


def _kernels_transformed_in_the_call():
  """A placement without the decoder's transformed Winograd kernels: the call transforms them."""
  return mock.patch.object(vqvae, "winograd_kernels", lambda config, params: {})


def bench_kernel_transform_public_call(args, dtype_name: str, batch: int) -> None:
  """The public call's program with the Winograd kernels transformed in the call and at placement."""
  tokenizer = _common.random_tokenizer(args.seed)
  base = _common.random_var_model(16, tokenizer, args.seed)
  tokenizer = var_jax.Tokenizer(dataclasses.replace(tokenizer.config, dtype=dtype_name),
                                tokenizer.params)
  config = dataclasses.replace(base.config, dtype=dtype_name)
  # a model each: a model caches its placement
  variants = {"in the call": (var_jax.VARModel(config, base.params, tokenizer),
                              _kernels_transformed_in_the_call),
              "at placement": (var_jax.VARModel(config, base.params, tokenizer),
                               contextlib.nullcontext)}
  _common.compare_sample_programs(variants, np.arange(batch) % config.num_classes, args.seed,
                                  args.iters, f"d16 {dtype_name} batch {batch}")


def bench_winograd_tiles(args, batch: int) -> None:
  """The float32 decoder built with F(2x2) only and with the default tiles, timed alternately."""
  tokenizer = _common.random_tokenizer(args.seed)
  vae = VQVAE(dataclasses.replace(tokenizer.config, dtype="float32"))
  side = tokenizer.config.latent_size
  f_hat = jnp.asarray(np.random.default_rng(args.seed).standard_normal(
      (batch, side, side, tokenizer.config.z_channels)), jnp.float32)
  compiled = {}
  for name, context in (("F(2x2) only", _winograd_f2x2_only), ("default", contextlib.nullcontext)):
    # A new function per variant: jax.jit would reuse the first one's trace for the same one.
    decode = lambda params, f: vae.apply({"params": params}, f,
                                         method=VQVAE.decode_fhat_unclamped)
    with context():
      compiled[name] = jax.jit(decode).lower(tokenizer.params, f_hat).compile()
  images = {name: np.asarray(call(tokenizer.params, f_hat)) for name, call in compiled.items()}
  first, second = images.values()
  print(f"float32 decoder, batch {batch}: outputs differ by at most "
        f"{np.abs(first - second).max():.2e} (of [-1, 1] images)")
  times = _common.time_alternately(
      {name: (lambda call=call: call(tokenizer.params, f_hat)) for name, call in compiled.items()},
      args.iters)
  medians = {name: float(np.median(t)) for name, t in times.items()}
  for name, t in times.items():
    print(f"  {name}: " + " ".join(f"{s:.2f}" for s in t) + f" s (median {medians[name]:.2f})")
  print(f"  F(2x2) only / default (medians): x{medians['F(2x2) only'] / medians['default']:.3f}")


def main(argv=None) -> None:
  args = parse_args(argv)
  env = _common.environment()
  _common.print_environment(env)
  if args.winograd_tiles:
    for batch in args.batch_sizes:
      (bench_winograd_tiles_public_call if args.public_call else bench_winograd_tiles)(args, batch)
    return
  if args.kernel_transform:
    for dtype_name in [d for d in args.dtypes.split(",") if d]:
      for batch in args.batch_sizes:
        bench_kernel_transform_public_call(args, dtype_name, batch)
    return
  if args.sample:
    for dtype_name in [d for d in args.dtypes.split(",") if d]:
      for batch in args.batch_sizes:
        bench_sample(args, dtype_name, batch)
    return
  impls = [i for i in args.impls.split(",") if i]
  rows = []
  for dtype_name in [d for d in args.dtypes.split(",") if d]:
    dtype = jnp.dtype(dtype_name)
    for batch in args.batch_sizes:
      totals = dict.fromkeys(impls + ["auto"], 0.0)
      for side, cin, cout, upsample, count in DECODER_CONVS:
        rng = np.random.default_rng(args.seed)
        x = jnp.asarray(rng.standard_normal((batch, side, side, cin)), dtype)
        kernel = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin), dtype)
        bias = jnp.zeros((cout,), dtype)
        out_side = 2 * side if upsample else side
        flops = 2 * batch * out_side * out_side * 9 * cin * cout
        row = {"bench": "conv3x3", "dtype": dtype_name, "batch": batch, "side": out_side,
               "cin": cin, "cout": cout, "upsample": upsample, "count": count,
               "auto": conv_ops.resolve_impl("auto", batch=batch, dtype=dtype,
                                             channels=(cin, cout))}
        for impl in impls:
          call = jax.jit(lambda x, k, b, impl=impl: conv_ops.conv3x3(x, k, b, upsample=upsample,
                                                                     impl=impl))
          t = _common.time_calls(lambda: call(x, kernel, bias), args.iters)
          row[f"{impl}_ms"] = 1e3 * t.min_s
          row[f"{impl}_gflops"] = flops / t.min_s / 1e9
          totals[impl] += count * t.min_s
        if row["auto"] in impls:
          totals["auto"] += count * row[f"{row['auto']}_ms"] / 1e3
        rows.append(row)
        _common.emit({**row, **env})
      rows.append({"dtype": dtype_name, "batch": batch, "side": "decoder",
                   **{f"{impl}_ms": 1e3 * totals[impl] for impl in impls},
                   "auto": f"{1e3 * totals['auto']:.1f}" if all(
                       r["auto"] in impls for r in rows if r.get("batch") == batch
                       and r.get("dtype") == dtype_name and r.get("side") != "decoder") else "-"})
  columns = [("dtype", "dtype", ""), ("batch", "batch", ""), ("out side", "side", ""),
             ("Cin", "cin", ""), ("Cout", "cout", ""), ("upsample", "upsample", ""),
             ("auto", "auto", "")]
  for impl in impls:
    columns += [(f"{impl} ms", f"{impl}_ms", ".1f"), (f"{impl} GFLOP/s", f"{impl}_gflops", ".0f")]
  _common.print_table(f"3x3 convs of the 256 px decoder, {env['backend']} ({env['device']}), "
                      f"min of {args.iters} calls", rows, columns)
  print("decoder rows: the sum over the shapes of each one's time x its count in one decode; "
        "under auto, that of the implementation auto picks for each (when it was timed).")


if __name__ == "__main__":
  main()
