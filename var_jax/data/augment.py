"""The official image augmentation (VAR `utils/data.py`) with PIL, and the [-1, 1] scaling.

Train: resize the shorter side to round(mid_reso * final_reso) with PIL LANCZOS, random crop to
final_reso, optional horizontal flip. Eval: the same with a center crop and no flip. The output is
uint8 HWC; `scale_to_model_range` maps it to float32 [-1, 1] on device.

The resize calls PIL's `Image.resize` with the size torchvision's `Resize(int)` computes, so the
pixels match the official pipeline given the same PIL. The official flip comes before the resize;
here it comes after the crop, which is cheaper and gives the same distribution (the LANCZOS kernel
and the crop offsets are symmetric).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from PIL import Image

from var_jax.errors import ConfigError, InputError

# Domain tags keep the per-example augmentation stream apart from the other seeded streams.
AUGMENT_STREAM = 1


def example_rng(seed: int, epoch: int, index: int,
                stream: int = AUGMENT_STREAM) -> np.random.Generator:
  """The random generator of example `index` in `epoch`, a pure function of its arguments."""
  return np.random.default_rng(np.random.SeedSequence((stream, seed, epoch, index)))


def mid_size(final_reso: int, mid_reso: float) -> int:
  """Side the shorter image side is resized to: round(mid_reso * final_reso) (288 for 256 px)."""
  size = round(mid_reso * final_reso)
  if size < final_reso:
    raise ConfigError(
        f"mid_reso={mid_reso} gives a resize to {size} px, smaller than the {final_reso} px crop; "
        "use mid_reso >= 1 (official 1.125).")
  return size


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
  """Resizes so that the shorter side is `size`, keeping the aspect ratio as torchvision does."""
  width, height = image.size
  if width <= height:
    new_width, new_height = size, int(size * height / width)
  else:
    new_width, new_height = int(size * width / height), size
  if (new_width, new_height) == (width, height):
    return image
  return image.resize((new_width, new_height), Image.Resampling.LANCZOS)


def crop_offsets(height: int, width: int, crop: int,
                 rng: np.random.Generator | None) -> tuple[int, int]:
  """(top, left) of a random crop when `rng` is given, else of the center crop (as torchvision)."""
  if rng is None:
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
  top = int(rng.integers(0, height - crop + 1))
  left = int(rng.integers(0, width - crop + 1))
  return top, left


def augment_image(image: Image.Image | np.ndarray, *, final_reso: int, mid_reso: float,
                  rng: np.random.Generator | None, hflip: bool,
                  resize_and_crop: bool = True) -> np.ndarray:
  """Returns the uint8 (final_reso, final_reso, 3) training (rng given) or eval (rng None) view.

  Args:
    image: a PIL image in any mode, or a uint8 HWC / HW array.
    final_reso: side of the output.
    mid_reso: the shorter side is resized to round(mid_reso * final_reso) before the crop.
    rng: draws the crop offsets and the flip; None gives the center crop without flip.
    hflip: flip horizontally with probability 1/2 (train only).
    resize_and_crop: False for images already at final_reso (synthetic data), which then only
      get the flip.
  """
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  image = image.convert("RGB")
  if resize_and_crop:
    image = resize_shorter_side(image, mid_size(final_reso, mid_reso))
    top, left = crop_offsets(image.height, image.width, final_reso, rng)
    image = image.crop((left, top, left + final_reso, top + final_reso))
  array = np.asarray(image, dtype=np.uint8)
  if array.shape != (final_reso, final_reso, 3):
    raise InputError(
        f"image of shape {array.shape} is not {final_reso}x{final_reso}x3; images passed with "
        "resize_and_crop=False must already have the final size.")
  if hflip and rng is not None and rng.random() < 0.5:
    array = array[:, ::-1]
  return np.ascontiguousarray(array)


def scale_to_model_range(images):
  """uint8 images in [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1); works under jit, on device."""
  return jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0
