"""How far bfloat16 sampling moves the greedy tokens of a VAR-d16 from float32.

A random-weight VAR-d16 (the released 256 px layout) whose weights are spread like the official
fixtures' (`tests/fixtures/README.md`: official init plus N(0, 1/fan_in) on every weight, so the
AdaLN gates are open and the logits are far from uniform), sampled greedily (top_k=1) with
`var_jax.sample` in float32 and with `dtype="bfloat16"` (bf16 matmuls, weights stored in bf16,
float32 softmax/LayerNorm/logits). Printed per scale:

* free-running: the share of tokens equal between the two runs (a token that flips changes
  the context of every later scale, so this compounds);
* teacher-forced: the share of bf16 argmaxes equal to the float32 greedy token, both given the
  float32 tokens of the coarser scales (with cfg=0, the per-token effect of bf16 alone), and the
  float32 top-2 margin of the tokens that flip.

  JAX_PLATFORMS=cpu python benchmarks/bf16_tokens.py --batch 8 --cfg 0
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import var_jax  # noqa: E402
from var_jax import scales  # noqa: E402

import _common  # noqa: E402


def spread_weights(params, seed: int):
  """Official init + N(0, 1/fan_in) per weight matrix and N(0, 0.1) per vector, as the fixtures."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  out = []
  for x in leaves:
    x = np.asarray(x)
    std = 1.0 / np.sqrt(x.shape[-2]) if x.ndim >= 2 else 0.1
    out.append((x + rng.standard_normal(x.shape).astype(np.float32) * std).astype(np.float32))
  return jax.tree.unflatten(treedef, out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--cfg", type=float, default=0.0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  tok = _common.random_tokenizer(args.seed)
  base = _common.random_var_model(16, tok, args.seed)
  f32 = var_jax.VARModel(base.config, spread_weights(base.params, args.seed), tok)
  bf16 = var_jax.VARModel(dataclasses.replace(f32.config, dtype="bfloat16"), f32.params, tok)
  labels = np.arange(args.batch) * 97 % 1000
  key = jax.random.key(args.seed)
  opts = dict(rng=key, cfg=args.cfg, top_k=1, top_p=0.0, return_tokens=True)
  _, tok32 = var_jax.sample(f32, labels, **opts)
  _, tok16 = var_jax.sample(bf16, labels, **opts)
  logits32 = np.asarray(f32.logits(labels, tok32))
  logits16 = np.asarray(bf16.logits(labels, tok32))
  flat32 = np.concatenate([np.asarray(t).reshape(args.batch, -1) for t in tok32], axis=1)
  flat16 = np.concatenate([np.asarray(t).reshape(args.batch, -1) for t in tok16], axis=1)
  forced = logits16.argmax(-1)
  top2 = np.sort(logits32, axis=-1)[..., -2:]
  margin = top2[..., 1] - top2[..., 0]
  rows = []
  for si, (b, e) in enumerate(scales.begin_ends(f32.config.patch_nums)):
    flips = forced[:, b:e] != flat32[:, b:e]
    rows.append(dict(scale=si, tokens=args.batch * (e - b),
                     free_running_equal=float((flat16[:, b:e] == flat32[:, b:e]).mean()),
                     teacher_forced_equal=float(1 - flips.mean()),
                     median_margin=float(np.median(margin[:, b:e])),
                     max_margin_of_flips=float(margin[:, b:e][flips].max()) if flips.any() else 0.0))
  _common.print_table(
      f"VAR-d16 greedy tokens, bfloat16 vs float32 (batch {args.batch}, cfg {args.cfg})", rows,
      [("scale", "scale", "d"), ("tokens", "tokens", "d"),
       ("free-running equal", "free_running_equal", ".4f"),
       ("teacher-forced equal", "teacher_forced_equal", ".4f"),
       ("median f32 top-2 margin", "median_margin", ".3f"),
       ("largest margin that flipped", "max_margin_of_flips", ".3f")])
  total = dict(free_running_equal=float((flat16 == flat32).mean()),
               teacher_forced_equal=float((forced == flat32).mean()), batch=args.batch, cfg=args.cfg)
  print(json.dumps(total))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
