"""Image files in and out: PNG grids, single PNGs, the .npz batch FID tools read."""
from __future__ import annotations

import math
import pathlib

import numpy as np

from var_jax.errors import InputError


def make_grid(images_NHWC: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
  """uint8 (N, H, W, 3) -> one uint8 grid image with `pad` white pixels between tiles."""
  images = np.asarray(images_NHWC)
  n, h, w, c = images.shape
  ncols = ncols or min(n, int(math.ceil(math.sqrt(n))))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
  return grid


def save_png(image_HWC: np.ndarray, path) -> pathlib.Path:
  from PIL import Image
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(image_HWC, np.uint8)).save(path)
  return path


def load_image(path, size: int | None = None, mode: str = "RGB") -> np.ndarray:
  """Reads an image file as uint8 (H, W, C); with `size`, it must already be size x size."""
  from PIL import Image, UnidentifiedImageError
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(f"{path}: no such image file.")
  try:
    with Image.open(path) as im:
      arr = np.asarray(im.convert(mode))
  except (UnidentifiedImageError, OSError) as e:
    raise InputError(f"{path} is not a readable image ({e}).") from None
  if size is not None and arr.shape[:2] != (size, size):
    raise InputError(f"{path} is {arr.shape[1]}x{arr.shape[0]} but the model takes {size}x{size}; "
                     "resize or crop it first.")
  return arr


def save_npz_batch(images_NHWC: np.ndarray, path) -> pathlib.Path:
  """Writes `arr_0` = uint8 (N, H, W, 3), the layout of the guided-diffusion FID/IS evaluator."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, arr_0=np.asarray(images_NHWC, np.uint8))
  return path
