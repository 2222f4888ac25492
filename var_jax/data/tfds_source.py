"""TFDS image source: random access to any TFDS data set with `image` and `label` features.

Records are read with `tfds.data_source` (array_record files, random access, no tf.data) and the
image feature is left encoded (SkipDecoding) so that PIL decodes it, as the official pipeline does,
and so that a corrupt image is skipped instead of failing the whole read.

ImageNet: TFDS cannot download it; put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in the
manual dir and prepare it once, in the array_record format random access needs:
  tfds build imagenet2012 --data_dir=$TFDS_DATA_DIR --manual_dir=$MANUAL_DIR \\
    --file_format=array_record
"""
from __future__ import annotations

from PIL import Image

from var_jax.data.records import decode_image
from var_jax.errors import ConfigError, MissingDependencyError

try:
  import tensorflow_datasets as tfds
except ImportError as error:
  raise MissingDependencyError(
      f"data.source='tfds' needs the `data` extra ({error}): pip install 'var-jax[train,data]'.") from error


def _prepare_hint(name: str, data_dir: str, manual_dir: str) -> str:
  return (
      f"Prepare it once in the array_record format random access needs, e.g. `tfds build "
      f"{name.split(':')[0]} --data_dir={data_dir or '$TFDS_DATA_DIR'} "
      f"--manual_dir={manual_dir or '<dir with the downloaded archives>'} "
      "--file_format=array_record`, or set data.download=True on a single host.")


def _as_text(value) -> str:
  value = value.item() if hasattr(value, "item") else value
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class TfdsSource:
  """Random access to split `split` of the TFDS data set `name`."""

  images_at_final_size = False

  def __init__(self, name: str, split: str, *, data_dir: str = "", manual_dir: str = "",
               download: bool = False):
    self.name, self.split = name, split
    prepare_kwargs = None
    if manual_dir:
      prepare_kwargs = {"download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)}
    try:
      self._records = tfds.data_source(
          name, split=split, data_dir=data_dir or None, download=download,
          decoders={"image": tfds.decode.SkipDecoding()},
          download_and_prepare_kwargs=prepare_kwargs)
    except tfds.core.registered.DatasetNotFoundError as error:
      raise ConfigError(
          f"Unknown TFDS data set {name!r} (data.name): use a registered name such as "
          "'imagenet2012' or 'cifar10', or data.source='folder' for an image folder.") from error
    except (AssertionError, NotImplementedError, OSError, ValueError, KeyError) as error:
      raise ConfigError(
          f"Cannot open split {split!r} of TFDS data set {name!r} in data_dir "
          f"{data_dir or '$TFDS_DATA_DIR'}: {type(error).__name__}: {error}\n"
          f"{_prepare_hint(name, data_dir, manual_dir)}") from error
    features = self._records.dataset_info.features
    if "image" not in features or "label" not in features:
      raise ConfigError(
          f"TFDS data set {name!r} has features {sorted(features.keys())}; the image pipeline "
          "needs an `image` and a `label` feature.")
    self.num_classes = int(getattr(features["label"], "num_classes", 0) or 0)
    self._has_file_name = "file_name" in features

  def __len__(self) -> int:
    return len(self._records)

  def read(self, index: int) -> tuple[Image.Image, int]:
    record = self._records[index]
    record_id = self.record_id(index)
    if self._has_file_name:
      record_id += f" ({_as_text(record['file_name'])})"
    return decode_image(record["image"], record_id), int(record["label"])

  def record_id(self, index: int) -> str:
    return f"tfds:{self.name}/{self.split}[{index}]"
