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
import time
from unittest import mock

import jax
import numpy as np

import _common
import var_jax
from var_jax.inference import sampler
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


def build(model, labels: np.ndarray, layout: str, seed: int):
  """The public call's program with the weights placed in `layout`: (call, compiled, seconds)."""
  with mock.patch.object(var_model, "weights_per_layer", lambda platform=None: layout == "per_layer"):
    call = sampler.build_sample_call(model, labels, rng=jax.random.key(seed))
  t0 = time.perf_counter()
  lowered = call.lower(fresh=True)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return call, compiled, (t1 - t0, time.perf_counter() - t1)


def main(argv=None) -> None:
  args = parse_args(argv)
  _common.print_environment(_common.environment())
  tokenizer = _common.random_tokenizer(args.seed)
  base = _common.random_var_model(args.depth, tokenizer, args.seed)
  tokenizer = var_jax.Tokenizer(dataclasses.replace(tokenizer.config, dtype=args.dtype), tokenizer.params)
  for batch in args.batch_sizes:
    labels = np.arange(batch) % base.config.num_classes
    built, outputs = {}, {}
    for layout in LAYOUTS:  # a model each: a model caches its placement
      model = var_jax.VARModel(dataclasses.replace(base.config, dtype=args.dtype), base.params, tokenizer)
      call, compiled, (lower_s, compile_s) = build(model, labels, layout, args.seed)
      built[layout] = (call, compiled)
      outputs[layout] = jax.device_get(compiled(*call.args))
      print(f"d{args.depth} {args.dtype} batch {batch} {layout}: lower {lower_s:.1f} s, "
            f"compile {compile_s:.1f} s", flush=True)
    same = all(np.array_equal(a, b) for a, b in zip(*(jax.tree.leaves(outputs[k]) for k in LAYOUTS)))
    print(f"  images and tokens identical: {same}")
    times = {layout: [] for layout in LAYOUTS}
    for _ in range(args.iters):
      for layout, (call, compiled) in built.items():
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*call.args))
        times[layout].append(time.perf_counter() - t0)
    for layout, ts in times.items():
      print(f"  {layout}: " + " ".join(f"{t:.2f}" for t in ts)
            + f" s (median {float(np.median(ts)):.2f}, min {min(ts):.2f})")
    ratio = np.median(times["stacked"]) / np.median(times["per_layer"])
    print(f"  stacked / per_layer (medians): x{ratio:.3f}", flush=True)


if __name__ == "__main__":
  main()
