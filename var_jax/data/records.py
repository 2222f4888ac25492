"""Image records: the source interface, image decoding, and the error for an unreadable record.

A source maps a record index in [0, len(source)) to (image, label); `var_jax.data.sources` picks
one by name.
"""
from __future__ import annotations

import io
from typing import Protocol

import numpy as np
from PIL import Image

# What PIL raises on a truncated, corrupt or unsupported image file.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class UnreadableRecordError(Exception):
  """A record's image could not be read or decoded; the pipeline skips the record.

  Attributes:
    record_id: names the record in logs (file path or data set + index).
  """

  def __init__(self, record_id: str, reason: str):
    super().__init__(f"{record_id}: {reason}")
    self.record_id = record_id


class ImageRecordSource(Protocol):
  """What the pipeline needs from a data set of labelled images.

  Attributes:
    num_classes: labels lie in [0, num_classes).
    images_at_final_size: True when images come already at the training size (synthetic data):
      the pipeline then skips the resize and crop.
  """
  num_classes: int
  images_at_final_size: bool

  def __len__(self) -> int:
    """Number of records."""

  def read(self, index: int) -> tuple[Image.Image | np.ndarray, int]:
    """(image, label) of record `index`; raises UnreadableRecordError for a corrupt image."""

  def record_id(self, index: int) -> str:
    """A name for record `index` that a person can find it by (for warnings)."""


def decode_image(data: bytes, record_id: str) -> Image.Image:
  """Decodes encoded image bytes into a fully loaded RGB PIL image.

  Raises:
    UnreadableRecordError: the bytes are not a readable image.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      return image.convert("RGB")
  except _DECODE_ERRORS as error:
    raise UnreadableRecordError(record_id, f"{type(error).__name__}: {error}") from error
