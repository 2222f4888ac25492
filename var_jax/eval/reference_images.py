"""Reference images for `var-jax fid-stats`: an image folder, a TFDS split, an ADM batch, or the
synthetic shapes data set, as uint8 (N, S, S, 3) batches.

Images of another size are brought to S x S the way ADM built its reference batches
(guided-diffusion `image_datasets.center_crop_arr`): halve with a box filter while the shorter
side is at least 2 S, scale the shorter side to S with bicubic, then take the centre S x S crop.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
from PIL import Image

from var_jax.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".JPEG", ".JPG", ".PNG")


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
  """uint8 (size, size, 3): ADM's centre crop of a PIL image."""
  image = image.convert("RGB")
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
  arr = np.asarray(image)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return np.ascontiguousarray(arr[top:top + size, left:left + size])


def list_images(directory: str) -> list[str]:
  """Every image file under `directory` (recursively), sorted."""
  if not os.path.isdir(directory):
    raise InputError(f"--images {directory!r} is not a directory.")
  paths = sorted(os.path.join(root, name) for root, _, names in os.walk(directory)
                 for name in names if name.endswith(IMAGE_SUFFIXES))
  if not paths:
    raise InputError(f"--images {directory!r} holds no image files ({', '.join(IMAGE_SUFFIXES[:5])}).")
  return paths


def _batches_of(images: Iterator[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
  batch = []
  for image in images:
    batch.append(image)
    if len(batch) == batch_size:
      yield np.stack(batch)
      batch = []
  if batch:
    yield np.stack(batch)


def folder_batches(directory: str, size: int, batch_size: int, limit: int | None = None
                   ) -> tuple[int, Iterator[np.ndarray]]:
  paths = list_images(directory)[:limit]

  def images():
    for path in paths:
      try:
        with Image.open(path) as image:
          yield adm_center_crop(image, size)
      except OSError as e:
        raise InputError(f"Cannot read image {path!r} ({e}): remove or replace it.") from e

  return len(paths), _batches_of(images(), batch_size)


def tfds_batches(name_split: str, size: int, batch_size: int, limit: int | None = None, *,
                 data_dir: str = "") -> tuple[int, Iterator[np.ndarray]]:
  """Images of a TFDS split ("imagenet2012:validation"), prepared in array_record format."""
  from var_jax.data.tfds_source import TfdsSource  # pylint: disable=g-import-not-at-top
  if ":" not in name_split:
    raise InputError(f"--tfds takes NAME:SPLIT (e.g. imagenet2012:validation), got {name_split!r}.")
  name, split = name_split.split(":", 1)
  source = TfdsSource(name, split, data_dir=data_dir)
  count = len(source) if limit is None else min(limit, len(source))

  def images():
    for i in range(count):
      image, _ = source.read(i)
      yield adm_center_crop(image, size)

  return count, _batches_of(images(), batch_size)


def shapes_batches(count: int, size: int, batch_size: int, *, seed: int
                   ) -> tuple[int, Iterator[np.ndarray]]:
  """The first `count` images of the synthetic shapes data set drawn from `seed`."""
  from var_jax.data import shapes  # pylint: disable=g-import-not-at-top

  def batches():
    for start in range(0, count, batch_size):
      yield shapes.generate(range(start, min(start + batch_size, count)), seed=seed,
                            image_size=size)[0]

  return count, batches()
