"""The tokenizer's 3x3 convolutions, per implementation, at the released decoder's shapes.

  JAX_PLATFORMS=cpu python benchmarks/bench_conv.py                          # bf16 and f32
  JAX_PLATFORMS=cpu python benchmarks/bench_conv.py --dtypes bfloat16 --batch-sizes 1,8

Times `ops.conv.conv3x3(x, kernel, bias, impl=...)` (the call the tokenizer's resnet blocks and
upsamplers make, jitted) for "xla" (XLA's convolution) and "row_blocks" (matmuls over blocks of
output rows, `ops/conv_rows.py`) on every conv shape of the 256 px decoder (ch 160, ch_mult
1,1,2,2,4), and prints GFLOP/s and which implementation "auto" picks on this backend. The
decoder-weighted line sums each shape's time times its count in one decode, the figure that
decides "auto".
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import _common
from var_jax.ops import conv as conv_ops

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
  parser.add_argument("--impls", default="xla,row_blocks",
                      help="comma-separated ops.conv implementations (default xla,row_blocks)")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  env = _common.environment()
  _common.print_environment(env)
  impls = [i for i in args.impls.split(",") if i]
  rows = []
  for dtype_name in [d for d in args.dtypes.split(",") if d]:
    dtype = jnp.dtype(dtype_name)
    for batch in args.batch_sizes:
      totals = dict.fromkeys(impls, 0.0)
      for side, cin, cout, upsample, count in DECODER_CONVS:
        rng = np.random.default_rng(args.seed)
        x = jnp.asarray(rng.standard_normal((batch, side, side, cin)), dtype)
        kernel = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin), dtype)
        bias = jnp.zeros((cout,), dtype)
        out_side = 2 * side if upsample else side
        flops = 2 * batch * out_side * out_side * 9 * cin * cout
        row = {"bench": "conv3x3", "dtype": dtype_name, "batch": batch, "side": out_side,
               "cin": cin, "cout": cout, "upsample": upsample, "count": count,
               "auto": conv_ops.resolve_impl("auto", batch=batch, dtype=dtype)}
        for impl in impls:
          call = jax.jit(lambda x, k, b, impl=impl: conv_ops.conv3x3(x, k, b, upsample=upsample,
                                                                     impl=impl))
          t = _common.time_calls(lambda: call(x, kernel, bias), args.iters)
          row[f"{impl}_ms"] = 1e3 * t.min_s
          row[f"{impl}_gflops"] = flops / t.min_s / 1e9
          totals[impl] += count * t.min_s
        rows.append(row)
        _common.emit({**row, **env})
      rows.append({"dtype": dtype_name, "batch": batch, "side": "decoder",
                   **{f"{impl}_ms": 1e3 * totals[impl] for impl in impls}})
  columns = [("dtype", "dtype", ""), ("batch", "batch", ""), ("out side", "side", ""),
             ("Cin", "cin", ""), ("Cout", "cout", ""), ("upsample", "upsample", ""),
             ("auto", "auto", "")]
  for impl in impls:
    columns += [(f"{impl} ms", f"{impl}_ms", ".1f"), (f"{impl} GFLOP/s", f"{impl}_gflops", ".0f")]
  _common.print_table(f"3x3 convs of the 256 px decoder, {env['backend']} ({env['device']}), "
                      f"min of {args.iters} calls", rows, columns)
  print("decoder rows: the sum over the shapes of each one's time x its count in one decode.")


if __name__ == "__main__":
  main()
