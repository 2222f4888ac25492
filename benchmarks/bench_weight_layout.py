"""The sampler with the blocks' weights held as stacks against one array per layer, side by side.

  JAX_PLATFORMS=cpu python benchmarks/bench_weight_layout.py                 # d16, batch 1, float32
  JAX_PLATFORMS=cpu python benchmarks/bench_weight_layout.py --dtype bfloat16 --batch-sizes 1,8

`var.weights_per_layer` decides how the inference placement holds the blocks' weights on a
backend: stacked (the decode loop slices each layer's weights out of the stacks at every scale)
or one array per layer (the blocks unrolled, each matmul reading its weight in place; CPU). This
builds the public call's program (`sampler.build_sample_call`, what `var_jax.sample` runs) for
both layouts on this backend, with random weights, and prints each program's lower and compile
seconds, whether their images and tokens are identical, and their steady call times, the two
called alternately so that a host whose speed drifts slows both alike.
"""
from __future__ import annotations

import argparse
import dataclasses
from unittest import mock

import numpy as np

import _common
import var_jax
from var_jax.models import var as var_model

LAYOUTS = ("stacked", "per_layer")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  _common.add_common_flags(parser, batch_sizes="1", iters=4)
  parser.add_argument("--depth", type=int, default=16, help="VAR depth (default 16)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype of the transformer and tokenizer (default float32)")
  args = parser.parse_args(argv)
  if args.depth < 1 or args.iters < 1 or min(args.batch_sizes) < 1:
    parser.error("--depth, --iters and the batch sizes must be positive")
  return args


def _layout(layout: str):
  """The placement choosing `layout` while a program is built (`var.weights_per_layer`)."""
  return mock.patch.object(var_model, "weights_per_layer",
                           lambda platform=None: layout == "per_layer")


def main(argv=None) -> None:
  args = parse_args(argv)
  _common.print_environment(_common.environment())
  tokenizer = _common.random_tokenizer(args.seed)
  base = _common.random_var_model(args.depth, tokenizer, args.seed)
  tokenizer = var_jax.Tokenizer(dataclasses.replace(tokenizer.config, dtype=args.dtype), tokenizer.params)
  config = dataclasses.replace(base.config, dtype=args.dtype)
  for batch in args.batch_sizes:
    labels = np.arange(batch) % base.config.num_classes
    # a model each: a model caches its placement
    variants = {layout: (var_jax.VARModel(config, base.params, tokenizer),
                         lambda layout=layout: _layout(layout)) for layout in LAYOUTS}
    _common.compare_sample_programs(variants, labels, args.seed, args.iters,
                                    f"d{args.depth} {args.dtype} batch {batch}")


if __name__ == "__main__":
  main()
