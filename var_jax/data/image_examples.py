"""Examples of an image source: read, decode, and augment with a per-example seed."""
from __future__ import annotations

import numpy as np

from var_jax.data import augment
from var_jax.data.records import ImageRecordSource


class ImageExamples:
  """Turns (record index, epoch) into {"image": uint8 (H, W, 3), "label": int32 ()}.

  The augmentation randomness comes from augment.example_rng(seed, epoch, index), so an example is
  a pure function of (seed, epoch, index). Eval examples (train=False) use the center crop and no
  flip, and do not depend on the epoch.
  """

  def __init__(self, source: ImageRecordSource, *, image_size: int, mid_reso: float, hflip: bool,
               seed: int, train: bool):
    augment.mid_size(image_size, mid_reso)  # Fails early on a mid_reso that cannot fit the crop.
    self.source = source
    self.num_classes = source.num_classes
    self._image_size = image_size
    self._mid_reso = mid_reso
    self._hflip = hflip
    self._seed = seed
    self._train = train

  @property
  def num_records(self) -> int:
    return len(self.source)

  def record_id(self, index: int) -> str:
    return self.source.record_id(index)

  def load(self, index: int, epoch: int) -> dict[str, np.ndarray]:
    """The example of record `index` in `epoch`; raises UnreadableRecordError if it is corrupt."""
    image, label = self.source.read(index)
    rng = augment.example_rng(self._seed, epoch, index) if self._train else None
    image = augment.augment_image(
        image, final_reso=self._image_size, mid_reso=self._mid_reso, rng=rng,
        hflip=self._hflip, resize_and_crop=not self.source.images_at_final_size)
    return {"image": image, "label": np.int32(label)}
