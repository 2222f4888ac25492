"""The image record source a data config names. Each concrete source lives in its own module and
is imported only when chosen, so that e.g. a folder run never imports TFDS."""
from __future__ import annotations

import ml_collections

from var_jax.data.records import ImageRecordSource
from var_jax.errors import ConfigError


def make_image_source(config: ml_collections.ConfigDict, split: str) -> ImageRecordSource:
  """The image source `config.source` names, reading `split`."""
  if config.source == "folder":
    from var_jax.data import folder_source  # pylint: disable=g-import-not-at-top
    return folder_source.FolderSource(config.data_dir, split)
  if config.source == "tfds":
    from var_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.TfdsSource(
        config.name, split, data_dir=config.data_dir, manual_dir=config.manual_dir,
        download=config.download)
  if config.source == "shapes":
    from var_jax.data import shapes_source  # pylint: disable=g-import-not-at-top
    return shapes_source.ShapesSource(
        split, num_examples=config.shapes_num_examples, seed=config.shapes_seed,
        image_size=config.image_size)
  raise ConfigError(
      f"data.source={config.source!r} is not an image source: use 'tfds', 'folder' or 'shapes'.")
