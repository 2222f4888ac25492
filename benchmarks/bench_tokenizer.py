"""Tokenizer encode/decode throughput (images/s) of the released 256 px VQVAE config, random weights.

  JAX_PLATFORMS=cpu python benchmarks/bench_tokenizer.py                          # ours only
  JAX_PLATFORMS=cpu VAR_REF=/path/to/VAR python benchmarks/bench_tokenizer.py     # + official

Times `Tokenizer.encode` (images -> 10 token maps) and `Tokenizer.decode` (token maps -> images) on
the current JAX backend: the first call (trace + compile + run) separately from the steady-state
calls (block_until_ready). With VAR_REF and torch, the official `vae.img_to_idxBl` and
`vae.idxBl_to_img(..., same_shape=True, last_one=True)` run on the same weights, images and
tokens, and the speed ratio ours/official is printed (> 1: ours faster).
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

import _common


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  _common.add_common_flags(parser, batch_sizes="1,8", iters=3)
  return parser.parse_args(argv)


def random_images(seed: int, batch: int, size: int) -> np.ndarray:
  """float32 (B, size, size, 3) uniform in [-1, 1]."""
  return np.random.default_rng(seed).uniform(-1.0, 1.0, (batch, size, size, 3)).astype(np.float32)


def time_ours(tok, images: np.ndarray, iters: int) -> dict[str, _common.Timing]:
  """Encode and decode through the public Tokenizer API (input checks included)."""
  x = jax.device_put(images)
  enc = _common.time_calls(lambda: tok.encode(x), iters)
  idx = tok.encode(x)
  dec = _common.time_calls(lambda: tok.decode(idx), iters)
  return {"encode": enc, "decode": dec}


def time_official(official: _common.Official, images: np.ndarray, idx_maps, iters: int,
                  warmup: int) -> dict[str, _common.Timing]:
  """The official img_to_idxBl and idxBl_to_img(same_shape=True, last_one=True), same inputs."""
  torch = official.torch
  vae = official.vae
  x = official.tensor(images.transpose(0, 3, 1, 2))
  idx_Bl = [official.tensor(np.asarray(m).reshape(m.shape[0], -1), np.int64) for m in idx_maps]
  sync = official.synchronize
  with torch.inference_mode():
    enc = _common.time_torch(lambda: vae.img_to_idxBl(x), iters, warmup, sync)
    dec = _common.time_torch(lambda: vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True), iters,
                             warmup, sync)
  return {"encode": enc, "decode": dec}


def main(argv=None) -> None:
  args = parse_args(argv)
  env = _common.environment()
  _common.print_environment(env)
  # The VAR depth does not matter here: build the smallest official VAR beside the VQVAE.
  official, why, tok, _ = _common.models(args, depth=1, need_var=False)
  print(f"official comparison: {'on' if official is not None else 'off'} ({why})")
  size = tok.config.image_size
  rows = []
  for batch in args.batch_sizes:
    images = random_images(args.seed + batch, batch, size)
    ours = time_ours(tok, images, args.iters)
    theirs = None
    if official is not None:
      theirs = time_official(official, images, tok.encode(images), args.iters, args.torch_warmup)
    for op in ("encode", "decode"):
      t = ours[op]
      row = {
          "bench": "tokenizer", "op": op, "batch": batch, "image_size": size, "iters": args.iters,
          "ours_images_per_s": batch / t.median_s, "ours_steady_s": t.median_s,
          "ours_steady_min_s": t.min_s, "ours_first_call_s": t.first_s,
          "ours_compile_s": t.first_minus_steady_s,
      }
      if theirs is not None:
        o = theirs[op]
        row.update({"official_images_per_s": batch / o.median_s, "official_steady_s": o.median_s,
                    "official_first_call_s": o.first_s, "speedup": _common.speedup(t.median_s, o.median_s)})
      rows.append(row)
      _common.emit({**row, **env})
  _common.print_table(
      f"tokenizer {size}px, {env['backend']} ({env['device']}), median of {args.iters} steady calls",
      rows,
      [("op", "op", ""), ("batch", "batch", "d"), ("ours img/s", "ours_images_per_s", ".2f"),
       ("ours steady s", "ours_steady_s", ".3f"), ("first call s", "ours_first_call_s", ".2f"),
       ("compile s", "ours_compile_s", ".2f"), ("official img/s", "official_images_per_s", ".2f"),
       ("official s", "official_steady_s", ".3f"), ("ours/official", "speedup", ".2f")])
  print("compile s = first call - steady state (trace + XLA compile); ours/official = speed ratio.")


if __name__ == "__main__":
  main()
