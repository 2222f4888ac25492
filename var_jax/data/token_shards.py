"""Pre-tokenized data on disk: the array_record shard format, its meta.json, and lazy reading.

A directory holds `meta.json` and shards `tokens-SSSSS-of-TTTTT.array_record`. Shard s holds the
records [s * N // T, (s + 1) * N // T) of the source split in index order, one array_record record
per image (written with group_size 1 and no compression, so any record is one seek away). A record
is the bytes of one element of the packed little-endian structured dtype `record_dtype(...)`:
  label: int32;
  source_index: int64, the source record actually encoded (a corrupt image is replaced by the next
    readable record, see `skipping`);
  tokens: (K, L) int16 when vocab_size <= 32767, else int32; K augmentation variants per image,
    each the concatenated multi-scale index maps (L = sum of pn**2 over patch_nums).

Reading is lazy and random-access (grain's ArrayRecordDataSource): opening the set reads meta.json
and stats the shards, and a host then reads only the records of its own batches, so memory does not
grow with the set and start-up reads no tokens.

Version 1 of the format (npz shards, read whole into every host's memory) is converted with
`var-jax pretokenize --convert-from OLD_DIR --out NEW_DIR` (`convert_v1`).

Paths may be local or gs:// for meta.json and for writing. array_record reads local files only (its
reader has no GCS support yet): train from a gs:// set through a gcsfuse mount of the bucket.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from typing import Iterable, Sequence

import numpy as np
from etils import epath

from var_jax import paths, scales
from var_jax.data import augment
from var_jax.data.records import UnreadableRecordError
from var_jax.errors import ConfigError, InputError

META_FILE = "meta.json"
FORMAT_NAME = "var_jax.pretokenized"
FORMAT_VERSION = 2
INT16_MAX_VOCAB = 32767
# Domain tag of the per-(epoch, index) variant choice (see augment.example_rng).
VARIANT_STREAM = 2
# group_size 1: every record is its own chunk, so a random read decodes one record. Uncompressed:
# token ids are near their codebook's entropy (zstd saves ~14% on 4096-way ids) and a read then
# costs 2.5x less CPU (6.7 vs 16.7 us per d16 record here); it also bounds a shard's size from below
# by its records' bytes, which the reader checks.
WRITER_OPTIONS = "group_size:1,uncompressed"


def shard_file_name(shard: int, num_shards: int) -> str:
  return f"tokens-{shard:05d}-of-{num_shards:05d}.array_record"


def v1_shard_file_name(shard: int, num_shards: int) -> str:
  return f"tokens-{shard:05d}-of-{num_shards:05d}.npz"


def shard_bounds(shard: int, num_shards: int, count: int) -> tuple[int, int]:
  """[start, end) record range of `shard`."""
  return shard * count // num_shards, (shard + 1) * count // num_shards


def token_dtype(vocab_size: int) -> np.dtype:
  """int16 when every token id fits, else int32."""
  return np.dtype("<i2" if vocab_size <= INT16_MAX_VOCAB else "<i4")


def record_dtype(num_variants: int, seq_len: int, vocab_size: int) -> np.dtype:
  """The packed structured dtype of one record (see the module docstring)."""
  return np.dtype([("label", "<i4"), ("source_index", "<i8"),
                   ("tokens", token_dtype(vocab_size), (num_variants, seq_len))])


def encode_records(tokens: np.ndarray, labels: np.ndarray, source_indices: np.ndarray,
                   vocab_size: int) -> list[bytes]:
  """One record's bytes per image: tokens (n, K, L), labels (n,), source_indices (n,)."""
  n, num_variants, seq_len = tokens.shape
  rows = np.empty((n,), record_dtype(num_variants, seq_len, vocab_size))
  rows["label"], rows["source_index"], rows["tokens"] = labels, source_indices, tokens
  return [row.tobytes() for row in rows]


def write_json_atomically(path: epath.Path, value: dict) -> None:
  temporary = path.parent / f".{path.name}.tmp"
  temporary.write_text(json.dumps(value, indent=2, sort_keys=True))
  temporary.rename(path)


def write_shard(path: epath.Path, records: Iterable[bytes]) -> int:
  """Writes `records` as the array_record file `path` (local or gs://), all or nothing.

  The file appears under its name only once complete (written to a temporary name and renamed), so
  a shard that exists is finished. Returns the number of records written.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  path = epath.Path(path)
  temporary = path.parent / f".{path.name}.tmp"
  # array_record writes local files only: a gs:// shard is written locally, then copied.
  local = (tempfile.NamedTemporaryFile(suffix=".array_record", delete=False).name
           if paths.is_url(path) else os.fspath(temporary))
  count = 0
  try:
    writer = array_record_module.ArrayRecordWriter(local, WRITER_OPTIONS)
    try:
      for record in records:
        writer.write(record)
        count += 1
    finally:
      writer.close()
    if paths.is_url(path):
      epath.Path(local).copy(temporary, overwrite=True)
    temporary.rename(path)
  finally:
    if paths.is_url(path):
      epath.Path(local).unlink(missing_ok=True)
  return count


def read_meta(directory: str | epath.Path, *, version: int = FORMAT_VERSION) -> dict:
  """The meta.json of a pre-tokenized directory of format `version`.

  Raises:
    InputError: there is no readable meta.json of this format and version in `directory`.
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
  if meta.get("format") != FORMAT_NAME:
    raise InputError(f"{path} is not a {FORMAT_NAME} meta file (format {meta.get('format')!r}): "
                     "point at a directory written by `var-jax pretokenize`.")
  if meta.get("format_version") != version:
    if meta.get("format_version") == 1 and version == FORMAT_VERSION:
      raise InputError(
          f"{directory!s} holds pre-tokenized data of format v1 (npz shards, read whole into "
          f"memory), which this version no longer reads: convert it once with `var-jax "
          f"pretokenize --convert-from {directory!s} --out NEW_DIR` and train on NEW_DIR.")
    raise InputError(f"{path} is format v{meta.get('format_version')!r}, expected v{version}: "
                     "rewrite it with this version of `var-jax pretokenize`.")
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


def meta_record_dtype(meta: dict) -> np.dtype:
  return record_dtype(int(meta["num_variants"]), int(meta["seq_len"]), int(meta["vocab_size"]))


class TokenExamples:
  """Pre-tokenized examples: {"tokens": int32 (L,), "label": int32 ()} by (record index, epoch).

  Records are read on demand from the array_record shards; the object pickles small (the readers
  reopen in each grain worker process). In training, the variant of record i in epoch e is drawn
  from (seed, e, i) alone; in evaluation it is variant 0.
  """

  def __init__(self, directory: str, *, patch_nums: Sequence[int], vocab_size: int,
               image_size: int | None, seed: int, train: bool):
    from grain.sources import ArrayRecordDataSource  # pylint: disable=g-import-not-at-top
    self.directory = epath.Path(directory)
    self.meta = read_meta(self.directory)
    check_meta(self.meta, patch_nums=patch_nums, vocab_size=vocab_size, image_size=image_size,
               where=str(directory))
    self.num_variants = int(self.meta["num_variants"])
    self.num_classes = int(self.meta["num_classes"])
    self._dtype = meta_record_dtype(self.meta)
    if paths.is_url(self.directory):
      raise InputError(
          f"{directory}: array_record reads local files only; mount the bucket with gcsfuse (e.g. "
          "`gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`) and set data.data_dir to the mounted "
          "directory.")
    count, num_shards = int(self.meta["count"]), int(self.meta["num_shards"])
    instructions = []
    for shard in range(num_shards):
      start, end = shard_bounds(shard, num_shards, count)
      path = self.directory / shard_file_name(shard, num_shards)
      self._check_shard_file(path, end - start)
      # "path[start:end]" tells the data source the record count: it opens no file until a read.
      instructions.append(f"{path}[0:{end - start}]")
    self._records = ArrayRecordDataSource(instructions)
    self._seed = seed
    self._train = train

  def _check_shard_file(self, path: epath.Path, num_records: int) -> None:
    """A stat, not a read: the shard exists and is large enough for its records."""
    if not path.exists():
      raise InputError(
          f"Shard {path} is missing: the pretokenize run did not finish on every host; re-run it "
          "with the same arguments to write the missing shards.")
    size = path.stat().length
    if size < num_records * self._dtype.itemsize:
      raise InputError(
          f"Shard {path} is {size} bytes, too small for its {num_records} records of "
          f"{self._dtype.itemsize} bytes from {META_FILE}: it belongs to another run or was cut "
          "short; delete it and re-run `var-jax pretokenize` with the same arguments.")

  @property
  def num_records(self) -> int:
    return len(self._records)

  def record_id(self, index: int) -> str:
    return f"{self.directory}[{index}]"

  def variant(self, index: int, epoch: int) -> int:
    """Which augmentation variant record `index` shows in `epoch`."""
    if not self._train or self.num_variants == 1:
      return 0
    rng = augment.example_rng(self._seed, epoch, index, stream=VARIANT_STREAM)
    return int(rng.integers(self.num_variants))

  def _decode(self, data: bytes, index: int) -> np.ndarray:
    if len(data) != self._dtype.itemsize:
      raise UnreadableRecordError(
          self.record_id(index),
          f"{len(data)} bytes, expected {self._dtype.itemsize} from {META_FILE}")
    return np.frombuffer(data, self._dtype)[0]

  def _example(self, row: np.ndarray, index: int, epoch: int) -> dict[str, np.ndarray]:
    return {"tokens": row["tokens"][self.variant(index, epoch)].astype(np.int32),
            "label": np.int32(row["label"])}

  def load(self, index: int, epoch: int) -> dict[str, np.ndarray]:
    try:
      data = self._records[index]
    except (RuntimeError, OSError, ValueError) as error:
      raise UnreadableRecordError(self.record_id(index),
                                  f"{type(error).__name__}: {error}") from error
    return self._example(self._decode(data, index), index, epoch)

  def load_batch(self, indices: Sequence[int], epoch: int) -> list[dict[str, np.ndarray]]:
    """The examples of `indices`, read in one call (the shards are read in parallel)."""
    try:
      data = self._records.__getitems__(list(indices))
    except (RuntimeError, OSError, ValueError) as error:
      raise UnreadableRecordError(f"{self.directory}[{len(indices)} records]",
                                  f"{type(error).__name__}: {error}") from error
    return [self._example(self._decode(item, index), index, epoch)
            for item, index in zip(data, indices)]


def read_v1_shard(path: epath.Path) -> dict[str, np.ndarray]:
  """The arrays of a v1 npz shard: tokens (n, K, L), labels (n,), source_indices (n,)."""
  with path.open("rb") as file:
    data = io.BytesIO(file.read())
  with np.load(data, allow_pickle=False) as arrays:
    return {key: arrays[key] for key in arrays.files}


def convert_v1(src_dir: str, out_dir: str, *, process_index: int = 0,
               process_count: int = 1) -> dict:
  """Rewrites a v1 (npz) pre-tokenized directory in this format; the tokens do not change.

  Hosts can share the work as in pretokenize (host p converts the shards s with s % P == p);
  finished shards are kept, so a re-run only converts what is missing. The source is only read.

  Returns:
    {"meta": the new meta.json content, "shards_written": [...], "shards_kept": [...]}.

  Raises:
    InputError: the source is not a complete v1 directory, or `out_dir` holds other data.
  """
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} is outside [0, process_count={process_count}).")
  src, out = epath.Path(src_dir), epath.Path(out_dir)
  old = read_meta(src, version=1)
  meta = {**old, "format_version": FORMAT_VERSION,
          "token_dtype": token_dtype(int(old["vocab_size"])).name,
          "converted_from": {"data_dir": os.fspath(src), "format_version": 1}}
  out.mkdir(parents=True, exist_ok=True)
  meta_path = out / META_FILE
  if meta_path.exists():
    if read_meta(out) != meta:
      raise InputError(f"{out} already holds other pre-tokenized data: choose an empty directory.")
  elif process_index == 0:
    write_json_atomically(meta_path, meta)
  count, num_shards = int(meta["count"]), int(meta["num_shards"])
  want = (int(meta["num_variants"]), int(meta["seq_len"]))
  written, kept = [], []
  for shard in range(process_index, num_shards, process_count):
    path = out / shard_file_name(shard, num_shards)
    if path.exists():
      kept.append(shard)
      continue
    source = src / v1_shard_file_name(shard, num_shards)
    if not source.exists():
      raise InputError(f"Shard {source} is missing: the v1 set is incomplete; finish writing it "
                       "(or re-run `var-jax pretokenize` on the images) before converting.")
    arrays = read_v1_shard(source)
    start, end = shard_bounds(shard, num_shards, count)
    tokens = arrays.get("tokens")
    if tokens is None or tokens.shape != (end - start,) + want or "labels" not in arrays:
      raise InputError(
          f"Shard {source} holds tokens of shape {None if tokens is None else tokens.shape}, "
          f"expected {(end - start,) + want} from its {META_FILE}: it belongs to another run.")
    write_shard(path, encode_records(tokens, arrays["labels"], arrays["source_indices"],
                                     int(meta["vocab_size"])))
    logging.info("Converted %s to %s.", source, path)
    written.append(shard)
  return {"meta": meta, "shards_written": written, "shards_kept": kept}
