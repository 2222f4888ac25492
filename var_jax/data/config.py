"""The data config: every field the input pipeline reads, with defaults, and its validation."""
from __future__ import annotations

import ml_collections

from var_jax.errors import ConfigError

SOURCES = ("tfds", "folder", "shapes", "pretokenized")
EPOCH_REMAINDERS = ("pad", "drop")


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the data config with its defaults; experiment configs start from it.

  Fields:
    source: where examples come from, one of
      "tfds": a TFDS image data set read by random access (`tfds.data_source`); it must have
        `image` and `label` features and be prepared in the array_record format.
      "folder": `<data_dir>/<split>/<class_name>/**/*.{jpg,jpeg,png,webp,...}`; class index =
        position of the class folder in sorted order (torchvision DatasetFolder; for ImageNet this
        is the synset order the released checkpoints use).
      "shapes": the procedural set of `var_jax.data.shapes`, rendered at `image_size`.
      "pretokenized": token shards written by `var_jax.data.pretokenize.write_pretokenized`, in
        `data_dir`; such a directory holds one split, so split and eval_split are not read.
    name: TFDS data set name, e.g. "imagenet2012" or "imagenet2012:5.1.0" (source "tfds" only).
    split: split read for training, e.g. "train" ("tfds" also takes slices like "train[:10%]").
    eval_split: split read when the iterator is built with train=False, e.g. "validation" for
      TFDS ImageNet, "val" for an ImageNet folder.
    data_dir: TFDS data dir ("tfds"; empty = $TFDS_DATA_DIR or ~/tensorflow_datasets), the folder
      root ("folder"), or the directory of meta.json and the shards ("pretokenized").
    manual_dir: where TFDS finds manually downloaded archives (ImageNet's ILSVRC2012_img_*.tar);
      only used when `download` is True. Empty = <data_dir>/downloads/manual.
    download: let TFDS download and prepare the data set when it is not prepared yet. Off by
      default: on a pod every host would prepare the same files at once. Prepare it once instead,
      e.g. `tfds build imagenet2012 --data_dir=... --manual_dir=... --file_format=array_record`.
    image_size: side of the square training crop (the official final_reso = 16 * max(patch_nums)).
    mid_reso: the shorter side is first resized to round(mid_reso * image_size) (official 1.125).
    hflip: random horizontal flip with probability 1/2 (official default: off).
    num_workers: threads per process that read, decode and augment, each loading whole batches
      (so num_workers batches load at once). PIL releases the GIL while decoding and resizing, so
      threads use several cores; `num_processes` adds processes when they do not suffice.
    prefetch: batches read ahead beyond the num_workers being loaded (per worker process too).
      Each batch in flight holds local_batch * image_size**2 * 3 bytes.
    num_processes: grain worker processes (`mp_prefetch`) that load batches, each with
      num_workers threads; 0 loads in the training process. Workers start with the 'spawn'
      method (a second or two each, importing var_jax) and take every num_processes-th step.
    epoch_remainder: how an epoch's last, partial global batch is handled.
      "pad" (official `DistInfiniteBatchSampler`): steps_per_epoch = ceil(N / global_batch) and the
        last batch is filled up from the head of the epoch's permutation.
      "drop": steps_per_epoch = N // global_batch and the leftover examples of each epoch are not
        seen that epoch.
    shapes_num_examples: number of examples in a "shapes" split.
    shapes_seed: which "shapes" data set is drawn; splits other than "train" use shapes_seed + 1.
  """
  config = ml_collections.ConfigDict()
  config.source = "tfds"
  config.name = "imagenet2012"
  config.split = "train"
  config.eval_split = "validation"
  config.data_dir = ""
  config.manual_dir = ""
  config.download = False
  config.image_size = 256
  config.mid_reso = 1.125
  config.hflip = False
  config.num_workers = 8
  config.prefetch = 2
  config.num_processes = 0
  config.epoch_remainder = "pad"
  config.shapes_num_examples = 10_000
  config.shapes_seed = 0
  return config


def _require_int(config, field: str, minimum: int) -> int:
  value = config.get(field)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f"data.{field} must be an int >= {minimum}, got {value!r}.")
  return value


def validate_data_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field of `config` that is missing or out of range."""
  missing = sorted(set(default_data_config().keys()) - set(config.keys()))
  if missing:
    raise ConfigError(
        f"data config lacks the fields {missing}: build it from "
        "var_jax.data.default_data_config() and override what you need.")
  if config.source not in SOURCES:
    raise ConfigError(f"Unknown data.source {config.source!r}: use one of {', '.join(SOURCES)}.")
  if config.epoch_remainder not in EPOCH_REMAINDERS:
    raise ConfigError(
        f"Unknown data.epoch_remainder {config.epoch_remainder!r}: use 'pad' (official) or 'drop'.")
  _require_int(config, "image_size", 1)
  _require_int(config, "num_workers", 1)
  _require_int(config, "prefetch", 0)
  _require_int(config, "num_processes", 0)
  _require_int(config, "shapes_num_examples", 1)
  _require_int(config, "shapes_seed", 0)
  mid_reso = config.mid_reso
  if isinstance(mid_reso, bool) or not isinstance(mid_reso, (int, float)) or mid_reso < 1:
    raise ConfigError(
        f"data.mid_reso must be a number >= 1 (the resize before the crop; official 1.125), "
        f"got {mid_reso!r}.")
  if config.source == "tfds" and not config.name:
    raise ConfigError("data.name is empty: name the TFDS data set, e.g. 'imagenet2012'.")
  if config.source in ("folder", "pretokenized") and not config.data_dir:
    raise ConfigError(
        f"data.data_dir is empty: data.source={config.source!r} reads its files from data_dir.")
