"""Writes pre-tokenized data (`var-jax pretokenize`): K augmented views per image, as tokens.

Variant v of record i is the training augmentation of epoch v, i.e. seeded by (seed, v, i), so the
set is reproducible. The caller supplies `encode_fn`, e.g. the jitted tokenizer that maps uint8
images to the concatenated multi-scale index maps. The format is described in `token_shards`.

Several hosts can share the work: host p writes the shards s with s % process_count == p. A shard
is written to a temporary name and renamed when complete, so finished shards are kept and a re-run
with the same arguments only writes what is missing. Images are encoded and written a chunk at a
time: memory does not grow with the shard.
"""
from __future__ import annotations

import concurrent.futures
import logging
from typing import Callable, Iterator, Sequence

import ml_collections
import numpy as np
from etils import epath

from var_jax import scales
from var_jax.data import token_shards
from var_jax.data.config import validate_data_config
from var_jax.data.image_examples import ImageExamples
from var_jax.data.skipping import SkipCounts, UnreadableRecords, load_skipping_unreadable
from var_jax.data.sources import make_image_source
from var_jax.errors import ConfigError, InputError

EncodeFn = Callable[[np.ndarray], np.ndarray]


def _check_positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f"{name} must be a positive int, got {value!r}.")
  return value


def _check_tokens(tokens, num_images: int, seq_len: int, vocab_size: int) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.shape != (num_images, seq_len) or not np.issubdtype(tokens.dtype, np.integer):
    raise InputError(
        f"encode_fn returned {tokens.dtype} {tokens.shape} for {num_images} images; it must return "
        f"integer tokens of shape ({num_images}, {seq_len}) (the index maps of every scale of "
        "patch_nums, concatenated).")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise InputError(
        f"encode_fn returned token ids in [{tokens.min()}, {tokens.max()}], outside "
        f"[0, vocab_size={vocab_size}): check vocab_size and the tokenizer.")
  return tokens


def _planned_meta(data_config, split: str, *, count: int, num_classes: int,
                  patch_nums: Sequence[int], vocab_size: int, num_variants: int, num_shards: int,
                  seed: int) -> dict:
  return {
      "format": token_shards.FORMAT_NAME,
      "format_version": token_shards.FORMAT_VERSION,
      "patch_nums": list(patch_nums),
      "seq_len": scales.seq_len(patch_nums),
      "vocab_size": vocab_size,
      "token_dtype": token_shards.token_dtype(vocab_size).name,
      "image_size": data_config.image_size,
      "mid_reso": data_config.mid_reso,
      "hflip": data_config.hflip,
      "num_variants": num_variants,
      "num_shards": num_shards,
      "count": count,
      "num_classes": num_classes,
      "seed": seed,
      "source": {"source": data_config.source, "name": data_config.name, "split": split,
                 "data_dir": data_config.data_dir},
  }


def write_pretokenized(data_config: ml_collections.ConfigDict, encode_fn: EncodeFn,
                       out_dir: str, *, patch_nums: Sequence[int], vocab_size: int,
                       num_variants: int = 1, num_shards: int = 8, batch_size: int = 64,
                       seed: int = 0, split: str | None = None, process_index: int = 0,
                       process_count: int = 1) -> dict:
  """Encodes `num_variants` augmented views of every image of a split and writes them as shards.

  Args:
    data_config: an image source ("tfds", "folder" or "shapes"), see default_data_config().
    encode_fn: uint8 (n, H, W, 3) images -> integer tokens (n, L), ids in [0, vocab_size).
    out_dir: directory (local or gs://) to write meta.json and the shards into.
    patch_nums: the tokenizer's scales; L = sum of pn**2.
    vocab_size: the tokenizer's codebook size.
    num_variants: augmented views per image (K).
    num_shards: number of shard files.
    batch_size: images per encode_fn call.
    seed: seeds the augmentations.
    split: split to encode; default data_config.split.
    process_index: this host, in [0, process_count).
    process_count: hosts sharing the work.

  Returns:
    {"meta": the meta.json content, "shards_written": [...], "shards_kept": [...] (already
    complete), "corrupt_skipped": skips of unreadable images on this host}.
  """
  validate_data_config(data_config)
  patch_nums = scales.validate_patch_nums(patch_nums)
  for value, name in ((vocab_size, "vocab_size"), (num_variants, "num_variants"),
                      (num_shards, "num_shards"), (batch_size, "batch_size"),
                      (process_count, "process_count")):
    _check_positive_int(value, name)
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ConfigError(f"seed must be a non-negative int, got {seed!r}.")
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} is outside [0, {process_count}).")
  if data_config.source == "pretokenized":
    raise ConfigError(
        "data.source='pretokenized' cannot be pre-tokenized again: use an image source.")
  split = split or data_config.split
  examples = ImageExamples(
      make_image_source(data_config, split), image_size=data_config.image_size,
      mid_reso=data_config.mid_reso, hflip=data_config.hflip, seed=seed, train=True)
  count = examples.num_records
  if num_shards > count:
    raise ConfigError(f"num_shards={num_shards} exceeds the {count} records of split {split!r}.")
  meta = _planned_meta(data_config, split, count=count, num_classes=examples.num_classes,
                       patch_nums=patch_nums, vocab_size=vocab_size, num_variants=num_variants,
                       num_shards=num_shards, seed=seed)
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  meta_path = out / token_shards.META_FILE
  if meta_path.exists():
    existing = token_shards.read_meta(out)
    if existing != meta:
      raise ConfigError(
          f"{out} already holds pre-tokenized data made with other settings: choose an empty "
          "directory, or delete it to start over.")
  elif process_index == 0:
    token_shards.write_json_atomically(meta_path, meta)

  writer = _ShardWriter(examples, encode_fn, out, meta, batch_size=batch_size,
                        num_workers=data_config.num_workers)
  written, kept = [], []
  try:
    for shard in range(process_index, num_shards, process_count):
      if writer.write(shard):
        written.append(shard)
      else:
        kept.append(shard)
  finally:
    writer.close()
  return {"meta": meta, "shards_written": written, "shards_kept": kept,
          "corrupt_skipped": writer.skip_counts.stats()["corrupt_skipped"]}


class _ShardWriter:
  """Encodes and writes one shard at a time, loading images on a thread pool."""

  def __init__(self, examples: ImageExamples, encode_fn: EncodeFn, out: epath.Path, meta: dict, *,
               batch_size: int, num_workers: int):
    self.skip_counts = SkipCounts()
    self._unreadable = UnreadableRecords()
    self._examples = examples
    self._encode_fn = encode_fn
    self._out = out
    self._meta = meta
    self._batch_size = batch_size
    self._stream = np.arange(examples.num_records, dtype=np.int64)
    self._pool = concurrent.futures.ThreadPoolExecutor(
        num_workers, thread_name_prefix="var_jax_pretokenize")

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)

  def _load(self, position: int, variant: int) -> tuple[int, dict[str, np.ndarray]]:
    """(source index used, example) for record `position`, variant `variant`."""
    index, example, skipped = load_skipping_unreadable(
        lambda index: self._examples.load(index, variant), self._stream, position,
        self._unreadable, self._examples.record_id)
    self.skip_counts.add(skipped)
    return index, example

  def write(self, shard: int) -> bool:
    """Writes `shard` unless it exists; returns whether it was written."""
    num_shards, count = self._meta["num_shards"], self._meta["count"]
    path = self._out / token_shards.shard_file_name(shard, num_shards)
    if path.exists():
      logging.info("Keeping the existing shard %s.", path)
      return False
    start, end = token_shards.shard_bounds(shard, num_shards, count)
    written = token_shards.write_shard(path, self._records(start, end))
    logging.info("Wrote %s (%d records x %d variants).", path, written, self._meta["num_variants"])
    return True

  def _records(self, start: int, end: int) -> Iterator[bytes]:
    """The encoded records [start, end), a chunk of batch_size images at a time."""
    num_variants, seq_len = self._meta["num_variants"], self._meta["seq_len"]
    vocab_size = self._meta["vocab_size"]
    for chunk_start in range(start, end, self._batch_size):
      chunk = range(chunk_start, min(chunk_start + self._batch_size, end))
      tokens = np.empty((len(chunk), num_variants, seq_len), np.int64)
      for variant in range(num_variants):
        loaded = list(self._pool.map(lambda position, v=variant: self._load(position, v), chunk))
        images = np.stack([example["image"] for _, example in loaded])
        tokens[:, variant] = _check_tokens(self._encode_fn(images), len(chunk), seq_len, vocab_size)
        if variant == 0:
          labels = [example["label"] for _, example in loaded]
          source_indices = [index for index, _ in loaded]
      yield from token_shards.encode_records(tokens, np.asarray(labels), np.asarray(source_indices),
                                             vocab_size)
