"""Checks of a model of the synthetic shapes data: class consistency of samples (a pixel
classifier, `var_jax.data.shapes.classify`, tells each sample's class) and tokenizer
reconstruction PSNR on held-out images (a seed the training data never used)."""
from __future__ import annotations

from typing import Iterator

import numpy as np

HELD_OUT_SEED = 987_654  # never used for training data (shapes_seed 0 / 1)


def class_consistency(images_NHWC: np.ndarray, labels_N: np.ndarray) -> dict:
  """The share of samples the shapes classifier assigns to the class they were drawn for."""
  from var_jax.data import shapes
  labels = np.asarray(labels_N)
  pred = shapes.classify(images_NHWC)
  correct = pred == labels
  return {"class_consistency": float(correct.mean()),
          "per_class": {shapes.CLASS_NAMES[c]: float(correct[labels == c].mean())
                        for c in range(shapes.NUM_CLASSES) if np.any(labels == c)},
          "unclassified": float((pred < 0).mean())}


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
