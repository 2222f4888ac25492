"""Evaluation of a model on the synthetic shapes data: class consistency of samples (a pixel
classifier, `var_jax.data.shapes.classify`, tells each sample's class), tokenizer reconstruction
PSNR on held-out images (a seed the training data never used), reconstruction FID."""
from __future__ import annotations

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
