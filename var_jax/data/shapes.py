"""Procedural class-conditional images: flat-coloured shapes on a plain, gently shaded background.

Ten classes, each a (shape, colour) pair: five shapes (circle, square, triangle, ring, plus) in two
colours (red, blue). Class index = 2 * shape_index + colour_index, so `CLASS_NAMES` runs
"red circle", "blue circle", "red square", ... Every image holds exactly one shape, axis-aligned
(the triangle points up), whose bounding square spans 40-75% of the image side and lies fully
inside the image. The background is a low-saturation colour from a fixed palette with a mild
linear brightness gradient; the foreground colours are strongly saturated, so foreground and
background never collide. Edges are anti-aliased and mild Gaussian noise is added.

`generate` is random access: example `i` depends only on `(seed, i)`. Labels are balanced in
every aligned block of ten indices (a random permutation of the ten classes per block).

`classify` needs no learned weights: it separates the foreground by its colour distance from the
background (read off the image border), reads the colour off the sign of red minus blue, and
picks the shape whose template, placed from the foreground's area and centroid alone, overlaps
the foreground best (intersection over union). Area and centroid barely move under blur or
noise, which makes the classifier robust to imperfect generated images.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from var_jax.errors import InputError

SHAPE_NAMES = ("circle", "square", "triangle", "ring", "plus")
COLOUR_NAMES = ("red", "blue")
NUM_CLASSES = len(SHAPE_NAMES) * len(COLOUR_NAMES)
CLASS_NAMES = tuple(f"{colour} {shape}" for shape in SHAPE_NAMES for colour in COLOUR_NAMES)

# `classify` returns this for an image with no recognisable shape (too little foreground, or a
# foreground that matches no shape template). It never equals a requested class.
UNKNOWN = -1

DEFAULT_IMAGE_SIZE = 64
MIN_IMAGE_SIZE = 32
IMAGE_SIZE_MULTIPLE = 16

# Side of the shape's bounding square, as a fraction of the image side.
MIN_SHAPE_FRACTION = 0.40
MAX_SHAPE_FRACTION = 0.75
# Inner over outer radius of the ring; arm width over side of the plus.
RING_INNER_RATIO = 0.5
PLUS_ARM_RATIO = 1.0 / 3.0

# Foreground colours (RGB) before a per-image jitter of up to +-FOREGROUND_JITTER per channel.
FOREGROUND_RGB = ((215.0, 45.0, 45.0), (45.0, 85.0, 215.0))
FOREGROUND_JITTER = 15.0
# Background palette: low-chroma colours only (max - min channel <= 22).
BACKGROUND_PALETTE_RGB = (
    (205.0, 205.0, 205.0),  # light grey
    (170.0, 172.0, 175.0),  # silver
    (128.0, 128.0, 128.0),  # mid grey
    (95.0, 100.0, 108.0),  # slate
    (60.0, 62.0, 65.0),  # charcoal
    (212.0, 204.0, 190.0),  # beige
    (180.0, 172.0, 158.0),  # sand
    (130.0, 132.0, 118.0),  # grey olive
)
BACKGROUND_BRIGHTNESS_JITTER = 12.0
BACKGROUND_TINT_JITTER = 3.0
# Largest brightness change of the background gradient across the image.
BACKGROUND_GRADIENT = 20.0
NOISE_STD = 3.0

# Classifier settings.
MIN_COLOUR_DISTANCE = 40.0
MIN_FOREGROUND_FRACTION = 0.02
MIN_SHAPE_SCORE = 0.5
CLASSIFY_CHUNK = 128

_EXAMPLE_STREAM = 0
_LABEL_STREAM = 1

DistanceFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _circle_distance(dx: np.ndarray, dy: np.ndarray, side: np.ndarray) -> np.ndarray:
  return np.sqrt(dx * dx + dy * dy) - side / 2


def _square_distance(dx: np.ndarray, dy: np.ndarray, side: np.ndarray) -> np.ndarray:
  return np.maximum(np.abs(dx), np.abs(dy)) - side / 2


def _triangle_distance(dx: np.ndarray, dy: np.ndarray, side: np.ndarray) -> np.ndarray:
  """Upward triangle: apex at the top middle, base along the bottom of the bounding square."""
  base = dy - side / 2
  slanted = (2 * np.abs(dx) - dy - side / 2) / np.sqrt(5.0)
  return np.maximum(base, slanted)


def _ring_distance(dx: np.ndarray, dy: np.ndarray, side: np.ndarray) -> np.ndarray:
  mid_radius = (1 + RING_INNER_RATIO) * side / 4
  half_width = (1 - RING_INNER_RATIO) * side / 4
  return np.abs(np.sqrt(dx * dx + dy * dy) - mid_radius) - half_width


def _plus_distance(dx: np.ndarray, dy: np.ndarray, side: np.ndarray) -> np.ndarray:
  half_arm = PLUS_ARM_RATIO * side / 2
  horizontal = np.maximum(np.abs(dx) - side / 2, np.abs(dy) - half_arm)
  vertical = np.maximum(np.abs(dx) - half_arm, np.abs(dy) - side / 2)
  return np.minimum(horizontal, vertical)


# Per shape: signed distance (pixels, negative inside; exact or a close bound near the edge),
# area as a fraction of side**2, and the centroid's downward offset from the bounding square's
# centre as a fraction of side.
_SHAPE_DISTANCES: tuple[DistanceFn, ...] = (
    _circle_distance, _square_distance, _triangle_distance, _ring_distance, _plus_distance)
SHAPE_AREA_FRACTIONS = (
    np.pi / 4,
    1.0,
    0.5,
    np.pi / 4 * (1 - RING_INNER_RATIO**2),
    2 * PLUS_ARM_RATIO - PLUS_ARM_RATIO**2,
)
SHAPE_CENTROID_OFFSETS = (0.0, 0.0, 1.0 / 6.0, 0.0, 0.0)


def _coverage(distance: np.ndarray) -> np.ndarray:
  """Anti-aliased fraction of a pixel inside the shape, from the signed distance at its centre."""
  return np.clip(0.5 - distance, 0.0, 1.0)


def _pixel_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """x and y of every pixel centre, each float64 (H, W)."""
  centres = np.arange(image_size, dtype=np.float64) + 0.5
  return np.meshgrid(centres, centres, indexing="xy")


def _check_image_size(image_size) -> int:
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
    raise InputError(
        f"image_size must be an int, got {image_size!r} ({type(image_size).__name__}).")
  image_size = int(image_size)
  if image_size < MIN_IMAGE_SIZE or image_size % IMAGE_SIZE_MULTIPLE:
    raise InputError(
        f"image_size must be a multiple of {IMAGE_SIZE_MULTIPLE} and at least {MIN_IMAGE_SIZE} "
        f"(e.g. 32, 48, 64, 128), got {image_size}.")
  return image_size


def _check_seed(seed) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise InputError(f"seed must be a non-negative int, got {seed!r}.")
  return int(seed)


def _check_indices(indices) -> np.ndarray:
  """Returns `indices` as int64 (N,), or raises if they are not non-negative integers in 1-D."""
  if np.ndim(indices) == 0 and not isinstance(indices, Iterable):
    raise InputError(
        f"indices must be a 1-D sequence of example indices, got the scalar {indices!r}.")
  array = indices if isinstance(indices, np.ndarray) else np.asarray(list(indices))
  if array.ndim != 1:
    raise InputError(
        "indices must be 1-D (a list, range or array of example indices), "
        f"got shape {array.shape}.")
  if array.size == 0:
    return np.zeros((0,), np.int64)
  if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
    raise InputError(f"indices must be integers, got dtype {array.dtype}.")
  if array.min() < 0:
    raise InputError(f"indices must be non-negative, got {int(array.min())}.")
  return array.astype(np.int64)


def labels_for(indices: Iterable[int], *, seed: int) -> np.ndarray:
  """int32 (N,): the class of each example, without rendering it.

  Each aligned block of ten indices [10b, 10b + 10) holds every class once, in an order drawn
  from (seed, b) alone.
  """
  seed = _check_seed(seed)
  indices = _check_indices(indices)
  labels = np.empty(indices.shape, np.int32)
  blocks, positions = np.divmod(indices, NUM_CLASSES)
  for block in np.unique(blocks):
    order = np.random.default_rng((seed, _LABEL_STREAM, int(block))).permutation(NUM_CLASSES)
    in_block = blocks == block
    labels[in_block] = order[positions[in_block]]
  return labels


def _background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """float64 (H, W, 3): a palette colour with a mild linear brightness gradient."""
  size = x.shape[0]
  base = np.asarray(BACKGROUND_PALETTE_RGB[rng.integers(len(BACKGROUND_PALETTE_RGB))])
  base = base + rng.uniform(-BACKGROUND_BRIGHTNESS_JITTER, BACKGROUND_BRIGHTNESS_JITTER)
  base = base + rng.uniform(-BACKGROUND_TINT_JITTER, BACKGROUND_TINT_JITTER, size=3)
  angle = rng.uniform(0.0, 2 * np.pi)
  amplitude = rng.uniform(-BACKGROUND_GRADIENT, BACKGROUND_GRADIENT)
  ramp = ((x - size / 2) * np.cos(angle) + (y - size / 2) * np.sin(angle)) / size
  return base + (amplitude * ramp)[..., None]


def _render(rng: np.random.Generator, label: int, image_size: int) -> np.ndarray:
  """uint8 (H, W, 3): one image of class `label`, every random choice drawn from `rng`."""
  shape_index, colour_index = divmod(label, len(COLOUR_NAMES))
  x, y = _pixel_grid(image_size)
  side = rng.uniform(MIN_SHAPE_FRACTION, MAX_SHAPE_FRACTION) * image_size
  centre_x, centre_y = rng.uniform(side / 2 + 1, image_size - side / 2 - 1, size=2)
  foreground = np.asarray(FOREGROUND_RGB[colour_index])
  foreground = foreground + rng.uniform(-FOREGROUND_JITTER, FOREGROUND_JITTER, size=3)
  background = _background(rng, x, y)
  distance = _SHAPE_DISTANCES[shape_index](x - centre_x, y - centre_y, np.asarray(side))
  coverage = _coverage(distance)[..., None]
  image = background * (1 - coverage) + foreground * coverage
  image = image + rng.normal(0.0, NOISE_STD, size=image.shape)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def generate(indices: Iterable[int], *, seed: int,
             image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """Renders examples `indices` of the data set drawn from `seed`.

  Args:
    indices: 1-D non-negative integer example indices (list, range or array), any order, repeats
      allowed. Example i depends only on (seed, i).
    seed: non-negative int naming the data set.
    image_size: side in pixels; a multiple of 16, at least 32.

  Returns:
    images: uint8 (N, image_size, image_size, 3).
    labels: int32 (N,), class indices into `CLASS_NAMES`.
  """
  seed = _check_seed(seed)
  image_size = _check_image_size(image_size)
  indices = _check_indices(indices)
  labels = labels_for(indices, seed=seed)
  images = np.empty((indices.size, image_size, image_size, 3), np.uint8)
  for row, (index, label) in enumerate(zip(indices, labels)):
    rng = np.random.default_rng((seed, _EXAMPLE_STREAM, int(index)))
    images[row] = _render(rng, int(label), image_size)
  return images, labels


def _check_images(images) -> np.ndarray:
  if not isinstance(images, np.ndarray):
    images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise InputError(f"images must be (N, H, W, 3) RGB, got shape {images.shape}.")
  if images.dtype != np.uint8:
    raise InputError(
        f"images must be uint8 in [0, 255], got dtype {images.dtype}; convert e.g. with "
        "np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for floats in [0, 1].")
  if images.shape[1] < 8 or images.shape[2] < 8:
    raise InputError(
        f"images must be at least 8x8 pixels, got {images.shape[1]}x{images.shape[2]}.")
  return images


def _background_colours(pixels: np.ndarray) -> np.ndarray:
  """float64 (N, 3): per-channel median of each image's one-pixel border.

  Shapes stay clear of the border, so the border is background; the median ignores the odd
  foreground pixel of a generated shape that touches the edge.
  """
  border = np.concatenate([
      pixels[:, 0, :], pixels[:, -1, :], pixels[:, 1:-1, 0], pixels[:, 1:-1, -1]], axis=1)
  return np.median(border, axis=1)


def _foreground_masks(images: np.ndarray) -> np.ndarray:
  """float64 (N, H, W): 1 where a pixel's colour is far from the image's background colour.

  The threshold on the RGB distance from the background sits halfway between the image's 5th and
  95th distance percentiles and never below MIN_COLOUR_DISTANCE, so shading, noise, blur and
  colour shifts of the whole image move it along with the image.
  """
  pixels = images.astype(np.float64)
  background = _background_colours(pixels)
  distance = np.linalg.norm(pixels - background[:, None, None, :], axis=-1)
  low, high = np.percentile(distance.reshape(distance.shape[0], -1), [5, 95], axis=1)
  threshold = np.maximum((low + high) / 2, MIN_COLOUR_DISTANCE)
  return (distance > threshold[:, None, None]).astype(np.float64)


def _colour_scores(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """float64 (N, 2): fraction of foreground pixels that are red (R > B) and blue."""
  pixels = images.astype(np.int32)
  redder = (pixels[..., 0] > pixels[..., 2]).astype(np.float64)
  area = np.maximum(masks.sum(axis=(1, 2)), 1.0)
  red = (redder * masks).sum(axis=(1, 2)) / area
  return np.stack([red, 1.0 - red], axis=1)


def _shape_scores(masks: np.ndarray) -> np.ndarray:
  """float64 (N, 5): intersection over union of each mask with each shape template.

  Each template is sized so that its area equals the mask's area and placed so that its centroid
  sits on the mask's centroid.
  """
  num, height, width = masks.shape
  x = (np.arange(width, dtype=np.float64) + 0.5)[None, None, :]
  y = (np.arange(height, dtype=np.float64) + 0.5)[None, :, None]
  area = np.maximum(masks.sum(axis=(1, 2)), 1.0)
  centroid_x = (masks * x).sum(axis=(1, 2)) / area
  centroid_y = (masks * y).sum(axis=(1, 2)) / area
  scores = np.empty((num, len(SHAPE_NAMES)))
  for k, distance_fn in enumerate(_SHAPE_DISTANCES):
    side = np.sqrt(area / SHAPE_AREA_FRACTIONS[k])
    centre_y = centroid_y - SHAPE_CENTROID_OFFSETS[k] * side
    template = _coverage(distance_fn(
        x - centroid_x[:, None, None], y - centre_y[:, None, None], side[:, None, None]))
    intersection = np.minimum(template, masks).sum(axis=(1, 2))
    union = np.maximum(template, masks).sum(axis=(1, 2))
    scores[:, k] = intersection / np.maximum(union, 1.0)
  return scores


def class_scores(images) -> np.ndarray:
  """float32 (N, NUM_CLASSES) in [0, 1]: how well each image matches each class.

  Score of (shape, colour) = IoU of the foreground with the shape's template times the fraction
  of foreground pixels of that colour. Images with less than MIN_FOREGROUND_FRACTION of the
  pixels in the foreground score 0 everywhere.
  """
  images = _check_images(images)
  out = np.zeros((images.shape[0], NUM_CLASSES), np.float32)
  for start in range(0, images.shape[0], CLASSIFY_CHUNK):
    chunk = images[start:start + CLASSIFY_CHUNK]
    masks = _foreground_masks(chunk)
    scores = (_shape_scores(masks)[:, :, None] * _colour_scores(chunk, masks)[:, None, :])
    scores = scores.reshape(chunk.shape[0], NUM_CLASSES)
    enough = masks.mean(axis=(1, 2)) >= MIN_FOREGROUND_FRACTION
    out[start:start + chunk.shape[0]] = np.where(enough[:, None], scores, 0.0)
  return out


def classify(images) -> np.ndarray:
  """int32 (N,): the class of each uint8 (N, H, W, 3) image, read from its pixels alone.

  Returns UNKNOWN (-1) for an image whose best class score is below MIN_SHAPE_SCORE (no
  foreground, or a foreground shaped like none of the shapes).
  """
  scores = class_scores(images)
  best = scores.argmax(axis=1).astype(np.int32)
  return np.where(scores.max(axis=1) >= MIN_SHAPE_SCORE, best, UNKNOWN).astype(np.int32)
