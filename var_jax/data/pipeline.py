"""The input pipeline's entry point: the iterator over this host's batches for a data config.

The batches come from a grain pipeline (`input_iterator`): an image or pre-tokenized source
read by random access, this host's records of each step (`order`), loaded by threads and optional
worker processes, with a state the trainer checkpoints."""
from __future__ import annotations

from typing import Sequence

import ml_collections

from var_jax.data.config import validate_data_config
from var_jax.data.image_examples import ImageExamples
from var_jax.data.input_iterator import InputIterator
from var_jax.data.order import GlobalOrder, local_batch_size
from var_jax.data.sources import make_image_source
from var_jax.errors import ConfigError


def make_input_iterator(data_config: ml_collections.ConfigDict, *, global_batch: int, seed: int,
                        start_step: int = 0, process_index: int = 0, process_count: int = 1,
                        train: bool = True, patch_nums: Sequence[int] | None = None,
                        vocab_size: int | None = None) -> InputIterator:
  """Returns the iterator over this host's part of every global batch.

  Training (train=True) runs forever over seeded per-epoch permutations (see `order`): global batch
  s is a pure function of (seed, s), so start_step=k yields exactly the batches an uninterrupted
  run yields from step k. Evaluation (train=False) reads `data_config.eval_split` once in index
  order, with center crops, and pads the last batch: batches then carry "mask", bool (b,), False
  on the padding.

  Batches are numpy dicts of local_batch = global_batch // process_count examples:
    image sources: {"image": uint8 (b, S, S, 3), "label": int32 (b,)}, S = data_config.image_size;
      `augment.scale_to_model_range` maps images to [-1, 1] on device;
    "pretokenized": {"tokens": int32 (b, L), "label": int32 (b,)}.
  The iterator's `stats` counts skipped corrupt records, `steps_per_epoch` and `num_classes`
  describe the data, and `get_state()` / `set_state()` save and restore its position (the trainer
  keeps it in every checkpoint).

  Args:
    data_config: see default_data_config() for its fields.
    global_batch: examples per step over all hosts; a multiple of process_count.
    seed: seeds the order and the augmentations; the same on every host.
    start_step: first step to yield (the step a resumed run continues at).
    process_index: this host (jax.process_index()).
    process_count: number of hosts (jax.process_count()).
    train: training stream (True) or one evaluation pass (False).
    patch_nums: the model's scales; required for "pretokenized", checked against its meta.json.
    vocab_size: the model's codebook size; required for "pretokenized", checked likewise.

  Raises:
    ConfigError: a config value or argument is bad, or pre-tokenized data does not fit the model.
    InputError: the data is missing or empty.
  """
  validate_data_config(data_config)
  local_batch_size(global_batch, process_count)
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ConfigError(f"seed must be a non-negative int, got {seed!r}.")
  split = data_config.split if train else data_config.eval_split
  if data_config.source == "pretokenized":
    if patch_nums is None or vocab_size is None:
      raise ConfigError(
          "data.source='pretokenized' needs the model's patch_nums and vocab_size to check the "
          "tokens against: pass them to make_input_iterator.")
    from var_jax.data import token_shards  # pylint: disable=g-import-not-at-top
    examples = token_shards.TokenExamples(
        data_config.data_dir, patch_nums=patch_nums, vocab_size=vocab_size,
        image_size=data_config.image_size, seed=seed, train=train)
  else:
    examples = ImageExamples(
        make_image_source(data_config, split), image_size=data_config.image_size,
        mid_reso=data_config.mid_reso, hflip=data_config.hflip, seed=seed, train=train)
  order = GlobalOrder(
      num_records=examples.num_records, global_batch=global_batch, seed=seed, shuffle=train,
      remainder=data_config.epoch_remainder if train else "pad")
  return InputIterator(
      examples, order, start_step=start_step, process_index=process_index,
      process_count=process_count, num_threads=data_config.num_workers,
      prefetch=data_config.prefetch, num_processes=data_config.num_processes,
      num_steps=None if train else order.steps_per_epoch, with_mask=not train)
