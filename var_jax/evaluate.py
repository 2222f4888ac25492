"""`var-jax evaluate`: class consistency of samples and tokenizer reconstruction PSNR.

For models of the synthetic shapes data (e.g. the shipped `shapes-tiny`), a deterministic pixel
classifier (`var_jax.data.shapes.classify`) tells each sample's class; class consistency is the
share of samples classified as the class they were generated for. Reconstruction PSNR is measured
on held-out generated images (a seed the training data never used).
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from var_jax.errors import InputError

HELD_OUT_SEED = 987_654  # never used for training data (shapes_seed 0 / 1)


def class_consistency(model, *, per_class: int, seed: int, batch_size: int, cfg: float, top_k: int,
                      top_p: float, more_smooth: bool = False) -> dict:
  """Samples `per_class` images of every class and classifies them with the shapes classifier."""
  from var_jax.data import shapes
  from var_jax.sampling import sample
  if model.config.num_classes != shapes.NUM_CLASSES:
    raise InputError(f"class consistency uses the shapes classifier ({shapes.NUM_CLASSES} classes); "
                     f"this model has {model.config.num_classes} classes.")
  labels = np.repeat(np.arange(shapes.NUM_CLASSES), per_class)
  key = jax.random.key(seed)
  predictions = []
  for i, start in enumerate(range(0, len(labels), batch_size)):
    chunk = labels[start:start + batch_size]
    padded = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[-1])])
    images = np.asarray(sample(model, padded, rng=jax.random.fold_in(key, i), cfg=cfg, top_k=top_k,
                               top_p=top_p, more_smooth=more_smooth))[:len(chunk)]
    predictions.append(shapes.classify(images))
  pred = np.concatenate(predictions)
  correct = pred == labels
  return {"class_consistency": float(correct.mean()),
          "per_class": {shapes.CLASS_NAMES[c]: float(correct[labels == c].mean())
                        for c in range(shapes.NUM_CLASSES)},
          "unclassified": float((pred < 0).mean()), "num_samples": int(len(labels))}


def reconstruction_psnr(tokenizer, *, num_images: int, batch_size: int) -> float:
  """Mean PSNR (dB, on [0, 1]) of tokenizer round trips of held-out shapes images."""
  from var_jax.data import shapes
  size = tokenizer.config.image_size
  values = []
  for start in range(0, num_images, batch_size):
    idx = np.arange(start, min(start + batch_size, num_images))
    images, _ = shapes.generate(idx, seed=HELD_OUT_SEED, image_size=size)
    x = images.astype(np.float32) / 127.5 - 1.0
    rec = np.asarray(tokenizer.decode(tokenizer.encode(x)))
    mse = np.mean(((rec + 1) / 2 - (x + 1) / 2) ** 2, axis=(1, 2, 3))
    values.append(10 * np.log10(1.0 / np.maximum(mse, 1e-10)))
  return float(np.mean(np.concatenate(values)))


def main(argv=None) -> int:
  from var_jax.cli import _load_model
  parser = argparse.ArgumentParser(prog="var-jax evaluate", description=__doc__)
  parser.add_argument("--model", default="shapes-tiny")
  parser.add_argument("--per-class", type=int, default=50)
  parser.add_argument("--batch-size", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cfg", type=float, default=1.5)
  parser.add_argument("--top-k", type=int, default=900)
  parser.add_argument("--top-p", type=float, default=0.96)
  parser.add_argument("--psnr-images", type=int, default=500)
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args((argv or sys.argv)[1:])
  model = _load_model(args.model, None)
  result = class_consistency(model, per_class=args.per_class, seed=args.seed, batch_size=args.batch_size,
                             cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
  result["reconstruction_psnr_db"] = reconstruction_psnr(model.tokenizer, num_images=args.psnr_images,
                                                         batch_size=args.batch_size)
  result["settings"] = dict(model=args.model, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                            per_class=args.per_class, seed=args.seed)
  print(f"class consistency: {result['class_consistency']:.2%} of {result['num_samples']} samples "
        f"(cfg {args.cfg}, top-k {args.top_k}, top-p {args.top_p})")
  for name, acc in result["per_class"].items():
    print(f"  {name:14s} {acc:.2%}")
  print(f"tokenizer reconstruction PSNR on {args.psnr_images} held-out images: "
        f"{result['reconstruction_psnr_db']:.2f} dB")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0
