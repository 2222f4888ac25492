"""Image folder source: `<root>/<split>/<class_name>/**/<image file>`, as torchvision DatasetFolder.

Class indices follow the sorted class folder names, files are listed recursively in sorted order,
and only image extensions count (torchvision's IMG_EXTENSIONS, any case). For an ImageNet folder
this gives the synset order 0..999 that the official checkpoints' class embeddings use.

The listing is a local directory walk (os.walk): for data on GCS mount the bucket (gcsfuse) or use
source "tfds"; listing 1.3M objects through the GCS API on every host would take minutes.
"""
from __future__ import annotations

import os

from PIL import Image

from var_jax.data.records import UnreadableRecordError, decode_image
from var_jax.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def list_image_folder(split_dir: str) -> tuple[list[str], list[str], list[int]]:
  """(class names, file paths, labels) of `split_dir`, in DatasetFolder order.

  Raises:
    InputError: `split_dir` is missing, has no class folders, or a class has no image file.
  """
  if not os.path.isdir(split_dir):
    raise InputError(
        f"Image folder {split_dir!r} does not exist: data.data_dir must hold one folder per split "
        "(e.g. train/, val/), each with one folder per class.")
  classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
  if not classes:
    raise InputError(
        f"Image folder {split_dir!r} has no class folders: put each class's images in "
        f"{split_dir}/<class_name>/.")
  paths, labels, empty = [], [], []
  for label, class_name in enumerate(classes):
    before = len(paths)
    class_dir = os.path.join(split_dir, class_name)
    for folder, _, file_names in sorted(os.walk(class_dir, followlinks=True)):
      for file_name in sorted(file_names):
        if file_name.lower().endswith(IMAGE_EXTENSIONS):
          paths.append(os.path.join(folder, file_name))
          labels.append(label)
    if len(paths) == before:
      empty.append(class_name)
  if empty:
    raise InputError(
        f"Class folders without image files in {split_dir!r}: {empty[:10]}"
        f"{' ...' if len(empty) > 10 else ''}. Accepted extensions: {', '.join(IMAGE_EXTENSIONS)}.")
  return classes, paths, labels


class FolderSource:
  """Random access to the images of `<root>/<split>/<class_name>/`."""

  images_at_final_size = False

  def __init__(self, root: str, split: str):
    self.split_dir = os.path.join(os.fspath(root), split)
    self.class_names, self._paths, self._labels = list_image_folder(self.split_dir)
    self.num_classes = len(self.class_names)

  def __len__(self) -> int:
    return len(self._paths)

  def read(self, index: int) -> tuple[Image.Image, int]:
    path = self._paths[index]
    try:
      with open(path, "rb") as file:
        data = file.read()
    except OSError as error:
      raise UnreadableRecordError(path, f"{type(error).__name__}: {error}") from error
    return decode_image(data, path), self._labels[index]

  def record_id(self, index: int) -> str:
    return self._paths[index]
