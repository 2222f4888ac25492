"""`var-jax evaluate`: class consistency of samples, tokenizer reconstruction PSNR, optional FID.

For models of the synthetic shapes data (e.g. the shipped `shapes-tiny`), a deterministic pixel
classifier (`var_jax.data.shapes.classify`) tells each sample's class; class consistency is the
share of samples classified as the class they were generated for. Reconstruction PSNR is measured
on held-out generated images (a seed the training data never used).

With --fid-inception (pytorch-fid's FID Inception weights, a local file) it also reports the
tokenizer's reconstruction FID (rFID: held-out images vs their reconstructions) and the FID of the
samples against --fid-ref-stats (an .npz of mu and sigma) or, without it, the held-out images.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Iterator

import jax
import numpy as np

from var_jax.eval import fid
from var_jax.errors import InputError
from var_jax.eval import inception

HELD_OUT_SEED = 987_654  # never used for training data (shapes_seed 0 / 1)


def class_consistency(model, *, per_class: int, seed: int, batch_size: int, cfg: float, top_k: int,
                      top_p: float, more_smooth: bool = False,
                      on_images: Callable[[np.ndarray], None] | None = None) -> dict:
  """Samples `per_class` images of every class and classifies them with the shapes classifier.

  `on_images`, if given, also receives each batch of samples (uint8 (b, H, W, 3)).
  """
  from var_jax.data import shapes
  from var_jax.inference.sampler import sample
  if model.config.num_classes != shapes.NUM_CLASSES:
    raise InputError(f"class consistency uses the shapes classifier ({shapes.NUM_CLASSES} classes); "
                     f"this model has {model.config.num_classes} classes.")
  labels = np.repeat(np.arange(shapes.NUM_CLASSES), per_class)
  key = jax.random.key(seed)
  predictions = []
  for start in range(0, len(labels), batch_size):
    idx = np.arange(start, min(start + batch_size, len(labels)))
    padded = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])  # one shape, one compile
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(padded.astype(np.uint32))  # image i: key i
    images = np.asarray(sample(model, labels[padded], rng=keys, cfg=cfg, top_k=top_k, top_p=top_p,
                               more_smooth=more_smooth))[:len(idx)]
    predictions.append(shapes.classify(images))
    if on_images is not None:
      on_images(images)
  pred = np.concatenate(predictions)
  correct = pred == labels
  return {"class_consistency": float(correct.mean()),
          "per_class": {shapes.CLASS_NAMES[c]: float(correct[labels == c].mean())
                        for c in range(shapes.NUM_CLASSES)},
          "unclassified": float((pred < 0).mean()), "num_samples": int(len(labels))}


def held_out_images(image_size: int, *, num_images: int, batch_size: int) -> Iterator[np.ndarray]:
  """Batches of held-out shapes images, uint8 (b, S, S, 3)."""
  from var_jax.data import shapes
  for start in range(0, num_images, batch_size):
    idx = np.arange(start, min(start + batch_size, num_images))
    yield shapes.generate(idx, seed=HELD_OUT_SEED, image_size=image_size)[0]


def reconstruction_psnr(tokenizer, *, num_images: int, batch_size: int) -> float:
  """Mean PSNR (dB, on [0, 1]) of tokenizer round trips of held-out shapes images."""
  size = tokenizer.config.image_size
  values = []
  for images in held_out_images(size, num_images=num_images, batch_size=batch_size):
    x = images.astype(np.float32) / 127.5 - 1.0
    rec = np.asarray(tokenizer.decode(tokenizer.encode(x)))
    mse = np.mean(((rec + 1) / 2 - (x + 1) / 2) ** 2, axis=(1, 2, 3))
    values.append(10 * np.log10(1.0 / np.maximum(mse, 1e-10)))
  return float(np.mean(np.concatenate(values)))


def reconstruction_fid(tokenizer, image_features: Callable[[np.ndarray], np.ndarray], *,
                       num_images: int, batch_size: int
                       ) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
  """rFID between held-out shapes images and their tokenizer round trips (rounded to uint8).

  Args:
    tokenizer: a `Tokenizer`.
    image_features: uint8 images -> FID Inception features (`inception.make_image_features`).
    num_images: held-out images to use (at least 2).
    batch_size: images per tokenizer call.

  Returns:
    (rFID, (mu, sigma) of the held-out originals).
  """
  if num_images < 2:
    raise InputError(f"rFID needs at least 2 images, got {num_images}.")
  real = fid.FeatureStats(inception.FEATURE_DIM)
  fake = fid.FeatureStats(inception.FEATURE_DIM)
  for images in held_out_images(tokenizer.config.image_size, num_images=num_images,
                                batch_size=batch_size):
    x = images.astype(np.float32) / 127.5 - 1.0
    rec = np.asarray(tokenizer.decode(tokenizer.encode(x)))
    rec_uint8 = np.clip(np.round((rec + 1.0) * 127.5), 0, 255).astype(np.uint8)
    real.update(image_features(images))
    fake.update(image_features(rec_uint8))
  real_stats = real.stats()
  return fid.frechet_distance(*real_stats, *fake.stats()), real_stats


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
  parser.add_argument("--fid-inception", default=None, metavar="PATH",
                      help="pytorch-fid's FID Inception weights, a local file "
                           "(pt_inception-2015-12-05-6726825d.pth): also report rFID and sample FID")
  parser.add_argument("--fid-ref-stats", default=None, metavar="PATH.npz",
                      help="reference statistics (arrays mu, sigma) for the sample FID; default: "
                           "the held-out images")
  parser.add_argument("--fid-images", type=int, default=500, help="held-out images for rFID")
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args((argv or sys.argv)[1:])
  if args.fid_ref_stats and not args.fid_inception:
    raise InputError("--fid-ref-stats needs --fid-inception (the network the statistics are of).")
  image_features = ref_stats = sample_stats = None
  if args.fid_inception:  # read the files before the long sampling run
    if args.fid_images < 2:
      raise InputError(f"--fid-images must be >= 2, got {args.fid_images}.")
    if args.fid_ref_stats:
      ref_stats = fid.load_stats(args.fid_ref_stats)
      if ref_stats[0].shape != (inception.FEATURE_DIM,):
        raise InputError(f"--fid-ref-stats {args.fid_ref_stats!r} has {ref_stats[0].shape[0]}-d "
                         f"statistics; FID Inception features are {inception.FEATURE_DIM}-d.")
    image_features = inception.make_image_features(
        *inception.load_fid_inception(args.fid_inception), args.batch_size)
    sample_stats = fid.FeatureStats(inception.FEATURE_DIM)
  model = _load_model(args.model, None)
  result = class_consistency(model, per_class=args.per_class, seed=args.seed, batch_size=args.batch_size,
                             cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                             on_images=(lambda images: sample_stats.update(image_features(images)))
                             if image_features else None)
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
  if image_features is not None:
    rfid, held_out_stats = reconstruction_fid(model.tokenizer, image_features,
                                              num_images=args.fid_images,
                                              batch_size=args.batch_size)
    reference = args.fid_ref_stats or f"{args.fid_images} held-out images"
    sample_fid = fid.frechet_distance(*(held_out_stats if ref_stats is None else ref_stats),
                                      *sample_stats.stats())
    result.update(reconstruction_rfid=rfid, sample_fid=sample_fid, fid_reference=reference)
    print(f"tokenizer reconstruction FID on {args.fid_images} held-out images: {rfid:.3f}")
    print(f"sample FID of {sample_stats.count} samples against {reference}: {sample_fid:.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0
