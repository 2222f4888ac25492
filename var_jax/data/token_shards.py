"""Pre-tokenized data on disk: the shard format, its meta.json, and reading examples back.

A directory holds `meta.json` and shards `tokens-SSSSS-of-TTTTT.npz`. Shard s holds records
[s * N // T, (s + 1) * N // T) of the source split in index order, with arrays
  tokens: (n, K, L) int16 when vocab_size <= 32767, else int32; K augmentation variants per
    image, each the concatenated multi-scale index maps (L = sum of pn**2 over patch_nums);
  labels: (n,) int32;
  source_indices: (n,) int64, the source record actually encoded (a corrupt image is replaced by
    the next readable record, see `skipping`).
Paths may be local or gs:// (etils.epath).

Reading loads every shard into memory, since the per-epoch permutation touches all of them:
N * K * L * 2 bytes per host (1.74 GB per variant for ImageNet-1k at 256 px).
"""
from __future__ import annotations

import io
import json
from typing import Sequence

import numpy as np
from etils import epath

from var_jax import scales
from var_jax.data import augment
from var_jax.errors import ConfigError, InputError

META_FILE = "meta.json"
FORMAT_NAME = "var_jax.pretokenized"
FORMAT_VERSION = 1
INT16_MAX_VOCAB = 32767
# Domain tag of the per-(epoch, index) variant choice (see augment.example_rng).
VARIANT_STREAM = 2


def shard_file_name(shard: int, num_shards: int) -> str:
  return f"tokens-{shard:05d}-of-{num_shards:05d}.npz"


def shard_bounds(shard: int, num_shards: int, count: int) -> tuple[int, int]:
  """[start, end) record range of `shard`."""
  return shard * count // num_shards, (shard + 1) * count // num_shards


def token_dtype(vocab_size: int) -> np.dtype:
  """int16 when every token id fits, else int32."""
  return np.dtype(np.int16 if vocab_size <= INT16_MAX_VOCAB else np.int32)


def write_json_atomically(path: epath.Path, value: dict) -> None:
  temporary = path.parent / f".{path.name}.tmp"
  temporary.write_text(json.dumps(value, indent=2, sort_keys=True))
  temporary.rename(path)


def read_meta(directory: str | epath.Path) -> dict:
  """The meta.json of a pre-tokenized directory.

  Raises:
    InputError: there is no readable meta.json of this format in `directory`.
  """
  path = epath.Path(directory) / META_FILE
  if not path.exists():
    raise InputError(
        f"No {META_FILE} in {directory!s}: data.data_dir must be a directory written by "
        "`var-jax pretokenize` (var_jax.data.pretokenize.write_pretokenized).")
  try:
    meta = json.loads(path.read_text())
  except ValueError as error:
    raise InputError(f"{path} is not valid JSON ({error}): rewrite the directory.") from error
  if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
    raise InputError(
        f"{path} is not a {FORMAT_NAME} v{FORMAT_VERSION} meta file (format "
        f"{meta.get('format')!r} v{meta.get('format_version')!r}): rewrite it with this version.")
  return meta


def check_meta(meta: dict, *, patch_nums: Sequence[int], vocab_size: int,
               image_size: int | None = None, where: str = "") -> None:
  """Raises ConfigError when the tokens were made for another tokenizer layout than the model's."""
  expected = {"patch_nums": list(scales.validate_patch_nums(patch_nums)),
              "vocab_size": int(vocab_size)}
  if image_size is not None:
    expected["image_size"] = int(image_size)
  mismatched = {key: (meta.get(key), value) for key, value in expected.items()
                if meta.get(key) != value}
  if mismatched:
    details = "; ".join(f"{key}: data has {have!r}, model expects {want!r}"
                        for key, (have, want) in mismatched.items())
    raise ConfigError(
        f"Pre-tokenized data{' in ' + where if where else ''} does not fit the model ({details}). "
        "Re-run `var-jax pretokenize` with the model's tokenizer, or point data.data_dir at "
        "matching tokens.")


def read_shard(path: epath.Path) -> dict[str, np.ndarray]:
  with path.open("rb") as file:
    data = io.BytesIO(file.read())
  with np.load(data, allow_pickle=False) as arrays:
    return {key: arrays[key] for key in arrays.files}


class TokenExamples:
  """Pre-tokenized examples: {"tokens": int32 (L,), "label": int32 ()} by (record index, epoch).

  In training, the variant of record i in epoch e is drawn from (seed, e, i) alone; in evaluation
  it is variant 0.
  """

  def __init__(self, directory: str, *, patch_nums: Sequence[int], vocab_size: int,
               image_size: int | None, seed: int, train: bool):
    self.directory = epath.Path(directory)
    self.meta = read_meta(self.directory)
    check_meta(self.meta, patch_nums=patch_nums, vocab_size=vocab_size, image_size=image_size,
               where=str(directory))
    count, num_shards = int(self.meta["count"]), int(self.meta["num_shards"])
    self.num_variants = int(self.meta["num_variants"])
    self.num_classes = int(self.meta["num_classes"])
    seq_len = scales.seq_len(self.meta["patch_nums"])
    self._tokens = np.empty((count, self.num_variants, seq_len), token_dtype(vocab_size))
    self._labels = np.empty((count,), np.int32)
    for shard in range(num_shards):
      start, end = shard_bounds(shard, num_shards, count)
      self._fill_from_shard(shard, start, end)
    self._seed = seed
    self._train = train

  def _fill_from_shard(self, shard: int, start: int, end: int) -> None:
    path = self.directory / shard_file_name(shard, int(self.meta["num_shards"]))
    if not path.exists():
      raise InputError(
          f"Shard {path} is missing: the pretokenize run did not finish on every host; re-run it "
          "with the same arguments to write the missing shards.")
    arrays = read_shard(path)
    want = (end - start,) + self._tokens.shape[1:]
    tokens = arrays.get("tokens")
    if tokens is None or tokens.shape != want or "labels" not in arrays:
      raise InputError(
          f"Shard {path} holds tokens of shape {None if tokens is None else tokens.shape}, "
          f"expected {want} from {META_FILE}: the shard belongs to another run; rewrite the "
          "directory.")
    self._tokens[start:end] = tokens
    self._labels[start:end] = arrays["labels"]

  @property
  def num_records(self) -> int:
    return self._labels.shape[0]

  def record_id(self, index: int) -> str:
    return f"{self.directory}[{index}]"

  def variant(self, index: int, epoch: int) -> int:
    """Which augmentation variant record `index` shows in `epoch`."""
    if not self._train or self.num_variants == 1:
      return 0
    rng = augment.example_rng(self._seed, epoch, index, stream=VARIANT_STREAM)
    return int(rng.integers(self.num_variants))

  def load(self, index: int, epoch: int) -> dict[str, np.ndarray]:
    tokens = self._tokens[index, self.variant(index, epoch)].astype(np.int32)
    return {"tokens": tokens, "label": self._labels[index]}
