"""Pre-tokenized data as array_record: lazy reads, the v1 conversion, the stream before grain, errors."""
import hashlib
import json
import pickle

import numpy as np
import pytest
from array_record.python import array_record_data_source, array_record_module

from helpers import read_token_shard, write_v1_token_set
from var_jax import cli
from var_jax.data import default_data_config, make_input_iterator
from var_jax.errors import InputError

PATCH_NUMS = (1, 2, 3)
SEQ_LEN = 14
GOLDEN = "pre_grain_pipeline_batches.json"


def _v1_token_set():
  """The v1 set the fixture's `tokens_*` digests were read from (tests/fixtures/README.md)."""
  rng = np.random.default_rng(5)
  count, num_variants = 13, 3
  tokens = rng.integers(0, 4096, (count, num_variants, SEQ_LEN)).astype(np.int16)
  labels = rng.integers(0, 5, (count,)).astype(np.int32)
  sources = np.arange(count, dtype=np.int64)
  meta = {"format": "var_jax.pretokenized", "format_version": 1, "patch_nums": list(PATCH_NUMS),
          "seq_len": SEQ_LEN, "vocab_size": 4096, "token_dtype": "int16", "image_size": 16,
          "mid_reso": 1.125, "hflip": True, "num_variants": num_variants, "num_shards": 2,
          "count": count, "num_classes": 5, "seed": 0,
          "source": {"source": "folder", "name": "", "split": "train", "data_dir": "x"}}
  shards = [dict(tokens=tokens[a:b], labels=labels[a:b], source_indices=sources[a:b])
            for a, b in ((0, 6), (6, 13))]
  return meta, shards


def _token_config(directory, **overrides):
  config = default_data_config()
  config.update(source="pretokenized", data_dir=str(directory), image_size=16, num_workers=2)
  config.update(overrides)
  return config


def _iterator(directory, **kwargs):
  overrides = {key: kwargs.pop(key) for key in ("num_processes", "num_workers")
               if key in kwargs}
  return make_input_iterator(_token_config(directory, **overrides), global_batch=4, seed=11,
                             patch_nums=PATCH_NUMS, vocab_size=4096, **kwargs)


def _digest(batch):
  return {key: hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]
          for key, value in sorted(batch.items())}


def _convert(capsys, src, out, *extra):
  code = cli.main(["pretokenize", "--convert-from", str(src), "--out", str(out), *extra])
  return code, capsys.readouterr()


@pytest.fixture(name="converted", scope="module")
def fixture_converted(tmp_path_factory):
  """(v1 dir, converted dir, v1 shards)."""
  root = tmp_path_factory.mktemp("tokens")
  meta, shards = _v1_token_set()
  write_v1_token_set(root / "v1", meta, shards)
  assert cli.main(["pretokenize", "--convert-from", str(root / "v1"), "--out", str(root / "v2")]) == 0
  return root / "v1", root / "v2", shards


def test_conversion_keeps_every_record(converted):
  _, out, shards = converted
  meta = json.loads((out / "meta.json").read_text())
  assert meta["format_version"] == 2 and meta["converted_from"]["format_version"] == 1
  assert (meta["count"], meta["num_variants"], meta["num_shards"]) == (13, 3, 2)
  for shard, arrays in enumerate(shards):
    read = read_token_shard(out / f"tokens-0000{shard}-of-00002.array_record", 3, SEQ_LEN)
    for key in ("tokens", "labels", "source_indices"):
      np.testing.assert_array_equal(read[key], arrays[key])


def test_converted_set_reads_the_batches_of_the_pipeline_before_grain(converted, request):
  golden = json.loads((request.path.parent / "fixtures" / GOLDEN).read_text())
  _, out, _ = converted
  for count in (1, 2):
    for index in range(count):
      with _iterator(out, process_index=index, process_count=count) as iterator:
        digests = [_digest(next(iterator)) for _ in range(8)]
      assert digests == golden[f"tokens_p{index}of{count}"], (index, count)
  with _iterator(out, train=False) as iterator:
    assert [_digest(batch) for batch in iterator] == golden["tokens_eval"]
  # A grain worker process gets the examples pickled and reopens the shards itself.
  with _iterator(out, process_index=1, process_count=2, num_processes=1) as iterator:
    assert [_digest(next(iterator)) for _ in range(8)] == golden["tokens_p1of2"]


def test_v1_sets_are_refused_with_the_conversion_command(converted, capsys):
  v1, out, _ = converted
  with pytest.raises(InputError, match=r"format v1 .* `var-jax pretokenize --convert-from"):
    _iterator(v1)
  before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  code, printed = _convert(capsys, v1, out)
  assert code == 0 and "wrote shards []" in printed.out and "kept the finished shards [0, 1]" in printed.out
  assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
  with pytest.raises(SystemExit) as exited:
    _convert(capsys, v1, out, "--variants", "2")
  assert exited.value.code == 2 and "drop --variants" in capsys.readouterr().err
  code, printed = _convert(capsys, out, out.parent / "again")
  assert code == 2 and "format v2, expected v1" in printed.err


def test_start_up_reads_no_records_and_a_step_reads_only_this_hosts(converted, monkeypatch):
  _, out, shards = converted
  reads = []
  source_class = array_record_data_source.ArrayRecordDataSource
  original_items, original_item = source_class.__getitems__, source_class.__getitem__
  monkeypatch.setattr(source_class, "__getitems__",
                      lambda self, keys: reads.append(list(keys)) or original_items(self, keys))
  monkeypatch.setattr(source_class, "__getitem__",
                      lambda self, key: reads.append([key]) or original_item(self, key))
  opened = []
  reader_class = array_record_module.ArrayRecordReader
  monkeypatch.setattr(array_record_module, "ArrayRecordReader",
                      lambda *args, **kwargs: opened.append(args[0]) or reader_class(*args, **kwargs))
  iterator = _iterator(out, process_index=1, process_count=2, num_workers=1)  # reads in step order
  assert not reads and not opened
  assert len(pickle.dumps(iterator.examples)) < 4096  # what a worker process is sent: no tokens
  with iterator:
    batch = next(iterator)
  # One read per step (the iterator reads a few steps ahead), of the host's 2 records alone.
  assert reads and all(len(keys) == 2 for keys in reads)
  labels = np.concatenate([arrays["labels"] for arrays in shards])
  np.testing.assert_array_equal(batch["label"], labels[reads[0]])


def _write_shard_records(path, records):
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()


def test_a_corrupt_record_is_replaced_by_the_next_and_counted(converted, tmp_path):
  _, out, shards = converted
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "meta.json").write_text((out / "meta.json").read_text())
  layout = np.dtype([("label", "<i4"), ("source_index", "<i8"), ("tokens", "<i2", (3, SEQ_LEN))])
  for shard, arrays in enumerate(shards):
    rows = np.empty((len(arrays["labels"]),), layout)
    rows["label"], rows["source_index"], rows["tokens"] = (
        arrays["labels"], arrays["source_indices"], arrays["tokens"])
    records = [row.tobytes() for row in rows]
    if shard == 0:
      records[2] = records[2][:-5]  # record 2 is cut short
    _write_shard_records(bad / f"tokens-0000{shard}-of-00002.array_record", records)
  with _iterator(bad, train=False) as iterator:
    batch = next(iterator)
    stats = iterator.stats
  all_tokens = np.concatenate([arrays["tokens"][:, 0] for arrays in shards])
  np.testing.assert_array_equal(batch["tokens"], all_tokens[[0, 1, 3, 3]])
  assert stats["corrupt_skipped"] == 1


def test_missing_and_cut_short_shards_are_clear_errors(converted, tmp_path):
  _, out, _ = converted
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "meta.json").write_text((out / "meta.json").read_text())
  (broken / "tokens-00000-of-00002.array_record").write_bytes(
      (out / "tokens-00000-of-00002.array_record").read_bytes())
  with pytest.raises(InputError, match=r"tokens-00001-of-00002.array_record is missing.*re-run"):
    _iterator(broken)
  (broken / "tokens-00001-of-00002.array_record").write_bytes(b"x" * 100)
  with pytest.raises(InputError, match=r"too small for its 7 records of 96 bytes"):
    _iterator(broken)
  meta = json.loads((out / "meta.json").read_text())
  with pytest.raises(InputError, match="format v7, expected v2"):
    (broken / "meta.json").write_text(json.dumps({**meta, "format_version": 7}))
    _iterator(broken)
