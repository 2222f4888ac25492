"""CPU sampling attention in blocks of (sequence, head) pairs against one call, side by side.

  JAX_PLATFORMS=cpu python benchmarks/bench_cpu_attention.py                       # d16 scales, bf16
  JAX_PLATFORMS=cpu python benchmarks/bench_cpu_attention.py --dtype float32 --batch-sizes 1,8
  JAX_PLATFORMS=cpu python benchmarks/bench_cpu_attention.py --min-pair-kib 0   # every scale in blocks
  JAX_PLATFORMS=cpu python benchmarks/bench_cpu_attention.py --sample --batch-sizes 8  # public call

On CPU, `attention.prefix_attention` runs a scale whose (sequence, head) pairs have logits of at
least `attention.CPU_BLOCK_MIN_PAIR_LOGITS_BYTES` as a loop over blocks of pairs whose float32
logits fit `attention.CPU_LOGITS_BLOCK_BYTES`, else as one call. By default this times that op for
every scale of VAR-d16 at 256 px (queries pn², cache prefix up to the scale's end, guidance's
doubled batch), as the decode loop calls it (one layer of a uint16 cache stack on CPU, bf16
viewed), with the constants as shipped, or as `--block-mib` / `--min-pair-kib` set them
("blocks"), and in one call at every scale ("one call"), the two called alternately so that a
drifting host slows both alike; it prints each scale's medians, whether the outputs are
identical, and the sum over scales (one layer). `--sample` instead builds the public call's
program (`sampler.build_sample_call`, what `var_jax.sample` runs; random d16 weights) both ways and
times it whole.
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
from var_jax import scales
from var_jax.ops import attention, float_bits

VARIANTS = ("blocks", "one call")
ONE_CALL_BYTES = 2**62  # past any scale's logits: never a loop


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  _common.add_common_flags(parser, batch_sizes="1,8", iters=7)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                      help="attention dtype (default bfloat16)")
  parser.add_argument("--block-mib", type=float, default=None,
                      help="the blocks' logits budget in MiB (default: CPU_LOGITS_BLOCK_BYTES)")
  parser.add_argument("--min-pair-kib", type=float, default=None,
                      help="the smallest pair logits that go in blocks, KiB (default: "
                           "CPU_BLOCK_MIN_PAIR_LOGITS_BYTES; 0: every scale in blocks)")
  parser.add_argument("--sample", action="store_true",
                      help="time the public sampling call of random VAR-d16 weights instead")
  args = parser.parse_args(argv)
  if args.iters < 1 or min(args.batch_sizes) < 1:
    parser.error("--iters and the batch sizes must be positive")
  if (args.block_mib is not None and args.block_mib <= 0) or (
      args.min_pair_kib is not None and args.min_pair_kib < 0):
    parser.error("--block-mib must be positive and --min-pair-kib not negative")
  return args


@contextlib.contextmanager
def _constants(args, variant: str):
  """attention's block constants for `variant` while a program is traced."""
  if variant == "blocks":
    block = (attention.CPU_LOGITS_BLOCK_BYTES if args.block_mib is None
             else int(args.block_mib * 2**20))
    min_pair = (attention.CPU_BLOCK_MIN_PAIR_LOGITS_BYTES if args.min_pair_kib is None
                else int(args.min_pair_kib * 2**10))
  else:
    block, min_pair = ONE_CALL_BYTES, attention.CPU_BLOCK_MIN_PAIR_LOGITS_BYTES
  with mock.patch.object(attention, "CPU_LOGITS_BLOCK_BYTES", block), \
       mock.patch.object(attention, "CPU_BLOCK_MIN_PAIR_LOGITS_BYTES", min_pair):
    yield


def bench_op(args, batch: int) -> None:
  """prefix_attention at every d16 scale, one layer of a two-layer cache stack."""
  heads, head_dim, patch_nums = 16, 64, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  dtype = jnp.dtype(args.dtype)
  sequences = 2 * batch  # classifier-free guidance doubles the batch
  cache_len = attention.kv_cache_len(patch_nums)
  rng = np.random.default_rng(args.seed)
  cache = jnp.asarray(rng.standard_normal((2, 2, sequences, heads, cache_len, head_dim)), dtype)
  if dtype.itemsize == 2:  # the decode loop's uint16 cache on CPU (`models.var.cache_as_uint16`)
    cache = float_bits.to_bits(cache)
  view = (lambda c: float_bits.from_bits(c, dtype)) if dtype.itemsize == 2 else (lambda c: c)
  totals = {name: 0.0 for name in VARIANTS}
  for pn, (_, end) in zip(patch_nums, scales.begin_ends(patch_nums)):
    q = jnp.asarray(rng.standard_normal((sequences, heads, pn * pn, head_dim)) / 8, dtype)
    fns, outputs = {}, {}
    for variant in VARIANTS:
      with _constants(args, variant):
        run = jax.jit(lambda q, kv, layer, end=end: attention.prefix_attention(
            q, view(kv[0]), view(kv[1]), kv_len=end, impl="xla", layer=layer)).lower(
                q, cache, jnp.int32(1)).compile()
      fns[variant] = lambda run=run, q=q: run(q, cache, jnp.int32(1))
      outputs[variant] = np.asarray(fns[variant]().astype(jnp.float32))
    same = np.array_equal(*outputs.values())
    times = _common.time_alternately(fns, args.iters)
    medians = {name: float(np.median(ts)) for name, ts in times.items()}
    for name, t in medians.items():
      totals[name] += t
    logits_mb = 4 * sequences * heads * pn * pn * end / 2**20
    print(f"  scale {pn:2d}x{pn:<2d} kv {end:3d} logits {logits_mb:7.1f} MiB: "
          + ", ".join(f"{name} {t * 1e3:7.2f} ms" for name, t in medians.items())
          + f"  (x{medians['one call'] / medians['blocks']:.2f}, identical: {same})", flush=True)
  print("  all scales, one layer: " + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in totals.items())
        + f"  (x{totals['one call'] / totals['blocks']:.2f})", flush=True)


def bench_sample(args, batch: int) -> None:
  """The public call's program built with blocks and with one call per scale, timed whole."""
  tokenizer = _common.random_tokenizer(args.seed)
  base = _common.random_var_model(16, tokenizer, args.seed)
  tokenizer = var_jax.Tokenizer(dataclasses.replace(tokenizer.config, dtype=args.dtype),
                                tokenizer.params)
  config = dataclasses.replace(base.config, dtype=args.dtype)
  # a model each: a model caches its placement; the constants are read while tracing. One call
  # first, so that the printed ratio is one call / blocks.
  variants = {variant: (var_jax.VARModel(config, base.params, tokenizer),
                        lambda variant=variant: _constants(args, variant))
              for variant in reversed(VARIANTS)}
  _common.compare_sample_programs(variants, np.arange(batch) % config.num_classes, args.seed,
                                  args.iters, f"d16 {args.dtype} batch {batch}")


def main(argv=None) -> None:
  args = parse_args(argv)
  _common.print_environment(_common.environment())
  print(f"CPU_LOGITS_BLOCK_BYTES = {attention.CPU_LOGITS_BLOCK_BYTES}, "
        f"CPU_BLOCK_MIN_PAIR_LOGITS_BYTES = {attention.CPU_BLOCK_MIN_PAIR_LOGITS_BYTES}"
        + (f"; blocks run with --block-mib {args.block_mib}" if args.block_mib is not None else "")
        + (f", --min-pair-kib {args.min_pair_kib}" if args.min_pair_kib is not None else ""))
  for batch in args.batch_sizes:
    print(f"d16 {args.dtype} batch {batch} ({'public call' if args.sample else 'prefix_attention'}):")
    (bench_sample if args.sample else bench_op)(args, batch)


if __name__ == "__main__":
  main()
