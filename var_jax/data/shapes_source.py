"""The procedural "shapes" data set (`var_jax.data.shapes`) as an image record source.

Images are rendered at the training size. Each shape lies fully inside its image by construction;
the official resize-and-random-crop could cut it, so the pipeline skips that step for this source
and only applies the optional flip (every shape is left-right symmetric).
"""
from __future__ import annotations

import numpy as np

from var_jax.errors import ConfigError


class ShapesSource:
  """`num_examples` rendered examples; split "train" comes from `seed`, any other from seed + 1."""

  images_at_final_size = True

  def __init__(self, split: str, *, num_examples: int, seed: int, image_size: int):
    # Imported here: the shapes module belongs to the synthetic-data path only.
    from var_jax.data import shapes  # pylint: disable=g-import-not-at-top
    if num_examples < 1:
      raise ConfigError(f"data.shapes_num_examples must be >= 1, got {num_examples}.")
    self._generate = shapes.generate
    self.num_classes = shapes.NUM_CLASSES
    self.split = split
    self._seed = seed if split == "train" else seed + 1
    self._image_size = image_size
    self._num_examples = num_examples

  def __len__(self) -> int:
    return self._num_examples

  def read(self, index: int) -> tuple[np.ndarray, int]:
    images, labels = self._generate(
        np.array([index], np.int64), seed=self._seed, image_size=self._image_size)
    return images[0], int(labels[0])

  def record_id(self, index: int) -> str:
    return f"shapes:{self.split}[{index}]"
