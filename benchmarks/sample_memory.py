"""Resident memory of `var_jax.sample` on this host, phase by phase.

  JAX_PLATFORMS=cpu python benchmarks/sample_memory.py                      # d16 float32, batch 1
  JAX_PLATFORMS=cpu python benchmarks/sample_memory.py --batch-sizes 8 --dtype bfloat16

Builds a random-weight VAR-d{depth} and its tokenizer as device arrays (what
`var_jax.load_pretrained` gives: Orbax restores them onto the default device), then calls the
public `var_jax.sample` twice and prints the process's resident memory (Linux VmRSS) after each
phase and its peak (VmHWM) within the phase: the model, the first call (placement, trace, compile
and the call itself), a steady call. It also prints the bytes the placement holds and how many of
them are the model's own memory (on one CPU device the blocks' per-layer weights share the
model's stacks, `placement._layer`) rather than copies.
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

import _common
import var_jax
from var_jax.inference import placement


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  _common.add_common_flags(parser, batch_sizes="1", iters=1)
  parser.add_argument("--depth", type=int, default=16, help="VAR depth (default 16)")
  parser.add_argument("--dtype", default="float32", help="compute dtype (default float32)")
  return parser.parse_args(argv)


def _rss_gb() -> float:
  rss = _common.resident_bytes()
  if rss is None:
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")
  return rss / 2**30


def _phase(name: str, fn):
  """Runs fn, printing the RSS after it and the peak RSS within it (GB)."""
  _common.reset_peak_rss()
  out = fn()
  peak = _common.peak_rss_since_reset()
  print(f"  {name:34s} RSS {_rss_gb():6.2f} GB   peak within {peak / 2**30:6.2f} GB", flush=True)
  return out


def _buffers(tree) -> dict[int, int]:
  """Start address -> bytes of every device buffer of a tree's arrays (per-layer tuples included)."""
  return {shard.data.unsafe_buffer_pointer(): shard.data.nbytes
          for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)
          for shard in x.addressable_shards}


def main(argv=None) -> None:
  args = parse_args(argv)
  _common.print_environment(_common.environment())
  print(f"VAR-d{args.depth}, {args.dtype}; RSS at the start {_rss_gb():.2f} GB")
  model = _phase("model (device arrays)", lambda: _common.random_var_model(
      args.depth, _common.random_tokenizer(args.seed), args.seed, dtype=args.dtype))
  key = jax.random.key(args.seed)
  for batch in args.batch_sizes:
    labels = np.arange(batch) % model.config.num_classes
    print(f"batch {batch}:")
    call = lambda: jax.block_until_ready(var_jax.sample(model, labels, rng=key))
    _phase("first call (place, compile, run)", call)
    for i in range(max(args.iters, 1)):
      _phase(f"steady call {i + 1}", call)
    placed = model.placements[placement.default_mesh()]
    own = _buffers((model.params, model.tokenizer.params))
    held = _buffers((placed.var_params, placed.decoding_vae_params))
    stacks = [(start, start + n) for start, n in own.items()]
    inside = lambda p: any(lo <= p < hi for lo, hi in stacks)
    shared = sum(n for p, n in held.items() if inside(p))
    print(f"  the model's params {sum(own.values()) / 2**30:.2f} GB; the placement holds "
          f"{sum(held.values()) / 2**30:.2f} GB, of which {shared / 2**30:.2f} GB is the model's "
          "own memory", flush=True)


if __name__ == "__main__":
  main()
