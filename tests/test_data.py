"""Tests of var_jax/data: sources, augmentation, global order, resume, hosts, pre-tokenized data."""
import json
import logging

import ml_collections
import numpy as np
import pytest
from PIL import Image

from var_jax.data import augment
from var_jax.data import default_data_config, make_input_iterator, scale_to_model_range
from var_jax.data.order import GlobalOrder
from var_jax.data.pretokenize import write_pretokenized
from var_jax.errors import ConfigError, InputError
from helpers import read_token_shard

IMAGE_SIZE = 16
PATCH_NUMS = (1, 2, 3)
SEQ_LEN = 14


def _write_image(path, size, seed, fmt):
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, format=fmt)


@pytest.fixture(name="image_root")
def fixture_image_root(tmp_path):
  """<root>/train/{b_dog,a_cat}/..., 11 images of mixed sizes and formats, one corrupt file."""
  root = tmp_path / "images"
  sizes = [(40, 30), (24, 48), (20, 20), (33, 21), (50, 26)]
  for class_index, class_name in enumerate(["b_dog", "a_cat"]):
    class_dir = root / "train" / class_name
    (class_dir / "nested").mkdir(parents=True)
    for i, size in enumerate(sizes):
      fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "JPG")
      folder = class_dir / "nested" if i == 4 else class_dir
      _write_image(folder / f"img{i}.{ext}", size, 10 * class_index + i, fmt)
    (class_dir / "notes.txt").write_text("not an image")
  (root / "train" / "a_cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
  return root


def _folder_config(root, **overrides):
  config = default_data_config()
  config.source = "folder"
  config.data_dir = str(root)
  config.image_size = IMAGE_SIZE
  config.num_workers = 2
  config.update(overrides)
  return config


def _take(iterator, num_batches):
  with iterator:
    return [next(iterator) for _ in range(num_batches)]


def _assert_batches_equal(first, second):
  assert len(first) == len(second)
  for batch_a, batch_b in zip(first, second):
    assert batch_a.keys() == batch_b.keys()
    for key in batch_a:
      np.testing.assert_array_equal(batch_a[key], batch_b[key])


# Augmentation.


def test_eval_augmentation_is_the_official_resize_and_center_crop():
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8))
  out = augment.augment_image(image, final_reso=32, mid_reso=1.125, rng=None, hflip=True)
  # Shorter side 60 -> round(1.125 * 32) = 36, longer side int(36 * 100 / 60) = 60; crop at
  # top = round((36 - 32) / 2) = 2, left = round((60 - 32) / 2) = 14; no flip in eval.
  expected = np.asarray(image.resize((60, 36), Image.Resampling.LANCZOS))[2:34, 14:46]
  assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
  np.testing.assert_array_equal(out, expected)


def test_train_augmentation_is_a_deterministic_random_crop_of_the_resized_image():
  rng = np.random.default_rng(1)
  image = Image.fromarray(rng.integers(0, 256, (80, 50, 3), dtype=np.uint8))
  resized = np.asarray(augment.resize_shorter_side(image, 36))
  assert resized.shape == (57, 36, 3)  # int(36 * 80 / 50) = 57

  def view(epoch, index, hflip=False):
    return augment.augment_image(image, final_reso=32, mid_reso=1.125, hflip=hflip,
                                 rng=augment.example_rng(7, epoch, index))

  crops = [view(epoch, 3) for epoch in range(8)]
  np.testing.assert_array_equal(crops[0], view(0, 3))
  assert len({crop.tobytes() for crop in crops}) > 1
  for crop in crops:
    windows = [resized[top:top + 32, left:left + 32]
               for top in range(57 - 31) for left in range(36 - 31)]
    assert any(np.array_equal(crop, window) for window in windows)
  flipped = [view(epoch, 3, hflip=True) for epoch in range(8)]
  assert any(np.array_equal(f, c[:, ::-1]) for f, c in zip(flipped, crops))
  assert any(np.array_equal(f, c) for f, c in zip(flipped, crops))


def test_scale_to_model_range_maps_uint8_to_minus_one_one():
  scaled = np.asarray(scale_to_model_range(np.array([0, 127, 255], np.uint8)))
  assert scaled.dtype == np.float32
  np.testing.assert_allclose(scaled, [-1.0, 127 / 127.5 - 1, 1.0], atol=1e-7)


# Image folder source.


def test_folder_batches_have_fixed_shapes_and_sorted_class_labels(image_root):
  iterator = make_input_iterator(_folder_config(image_root), global_batch=4, seed=0)
  assert iterator.num_classes == 2 and iterator.steps_per_epoch == 3  # ceil(11 / 4)
  assert iterator.examples.source.class_names == ["a_cat", "b_dog"]
  for batch in _take(iterator, 4):
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 16, 16, 3)
    assert batch["label"].dtype == np.int32 and set(batch["label"]) <= {0, 1}


def test_corrupt_file_is_skipped_counted_and_warned_once(image_root, caplog):
  config = _folder_config(image_root)
  with caplog.at_level(logging.WARNING):
    iterator = make_input_iterator(config, global_batch=11, seed=3)
    batches = _take(iterator, 3)
  assert all(batch["image"].shape == (11, 16, 16, 3) for batch in batches)
  assert iterator.stats == {"corrupt_skipped": 3, "corrupt_records": 1}
  warnings = [r.getMessage() for r in caplog.records if "broken.jpg" in r.getMessage()]
  assert len(warnings) == 1
  # Each epoch holds 10 distinct good images; the bad one is replaced by its successor.
  images = [{img.tobytes() for img in batch["image"]} for batch in batches]
  assert all(len(distinct) == 10 for distinct in images)


def test_folder_eval_pass_covers_each_record_once_with_a_mask(image_root):
  config = _folder_config(image_root, split="unused", eval_split="train")
  iterator = make_input_iterator(config, global_batch=4, seed=0, train=False)
  batches = list(iterator)
  assert len(batches) == 3
  mask = np.concatenate([batch["mask"] for batch in batches])
  np.testing.assert_array_equal(mask, np.arange(12) < 11)
  labels = np.concatenate([batch["label"] for batch in batches])[mask]
  np.testing.assert_array_equal(labels, [0] * 6 + [1] * 5)  # a_cat has the corrupt extra file


# Global order, resume, hosts.


@pytest.mark.parametrize("remainder", ["pad", "drop"])
def test_resume_reproduces_the_uninterrupted_stream(image_root, remainder):
  config = _folder_config(image_root, hflip=True, epoch_remainder=remainder, prefetch=1)
  full = _take(make_input_iterator(config, global_batch=4, seed=5), 7)
  resumed = _take(make_input_iterator(config, global_batch=4, seed=5, start_step=4), 3)
  _assert_batches_equal(full[4:], resumed)
  other_seed = _take(make_input_iterator(config, global_batch=4, seed=6), 7)
  assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(full, other_seed))


def test_batches_do_not_depend_on_threads_or_prefetch(image_root):
  reference = _take(make_input_iterator(
      _folder_config(image_root, num_workers=1, prefetch=0), global_batch=4, seed=1), 4)
  threaded = _take(make_input_iterator(
      _folder_config(image_root, num_workers=3, prefetch=3), global_batch=4, seed=1), 4)
  _assert_batches_equal(reference, threaded)


def test_host_slices_concatenate_to_the_global_batch(image_root):
  config = _folder_config(image_root, prefetch=0)
  whole = _take(make_input_iterator(config, global_batch=6, seed=2, start_step=1), 3)
  parts = [_take(make_input_iterator(config, global_batch=6, seed=2, start_step=1,
                                     process_index=p, process_count=2), 3) for p in range(2)]
  for step, batch in enumerate(whole):
    for key in ("image", "label"):
      assert parts[0][step][key].shape[0] == 3
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), batch[key])


def test_epoch_stream_is_a_permutation_padded_from_its_head():
  order = GlobalOrder(num_records=10, global_batch=4, seed=0)
  assert order.steps_per_epoch == 3
  permutation = order.permutation(1)
  assert sorted(permutation) == list(range(10))
  assert not np.array_equal(permutation, order.permutation(0))
  epoch, positions = order.host_positions(5, process_index=1, process_count=2)
  assert epoch == 1
  np.testing.assert_array_equal(positions, [10, 11])  # records permutation[0], permutation[1]
  assert GlobalOrder(num_records=10, global_batch=4, seed=0, remainder="drop").steps_per_epoch == 2


# TFDS source (mocked, never the network).


def test_tfds_source_through_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  config = default_data_config()
  config.update(source="tfds", name="cifar10", image_size=IMAGE_SIZE, num_workers=2)
  with tfds.testing.mock_data(num_examples=10):
    first = _take(make_input_iterator(config, global_batch=4, seed=0), 4)
    iterator = make_input_iterator(config, global_batch=4, seed=0, start_step=2)
    assert iterator.num_classes == 10 and iterator.steps_per_epoch == 3
    resumed = _take(iterator, 2)
    with pytest.raises(ConfigError, match="Unknown TFDS data set"):
      make_input_iterator(_with(config, name="no_such_data_set_xyz"), global_batch=4, seed=0)
  _assert_batches_equal(first[2:], resumed)
  for batch in first:
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["label"].min() >= 0
    assert batch["label"].max() < 10


def _with(config, **overrides):
  copy = ml_collections.ConfigDict(config.to_dict())
  copy.update(overrides)
  return copy


# Shapes source.


def test_shapes_source_renders_at_the_final_size():
  shapes = pytest.importorskip("var_jax.data.shapes")
  config = default_data_config()
  config.update(source="shapes", image_size=32, shapes_num_examples=20, num_workers=2)
  iterator = make_input_iterator(config, global_batch=4, seed=0, train=False)
  assert iterator.num_classes == shapes.NUM_CLASSES
  batch = _take(iterator, 1)[0]
  # The eval split ("validation") is drawn from shapes_seed + 1; eval reads records in order.
  images, labels = shapes.generate(np.arange(4), seed=1, image_size=32)
  np.testing.assert_array_equal(batch["image"], images)
  np.testing.assert_array_equal(batch["label"], labels)


# Pre-tokenized data.


def _fake_encode(vocab_size):
  def encode(images):
    flat = images.reshape(images.shape[0], -1)[:, :SEQ_LEN].astype(np.int64)
    return (flat * 131 + np.arange(SEQ_LEN)) % vocab_size
  return encode


def test_pretokenized_round_trip(image_root, tmp_path):
  config = _folder_config(image_root)
  out = tmp_path / "tokens"
  result = write_pretokenized(config, _fake_encode(4096), str(out), patch_nums=PATCH_NUMS,
                              vocab_size=4096, num_variants=3, num_shards=2, batch_size=4, seed=1)
  assert result["shards_written"] == [0, 1] and result["corrupt_skipped"] == 3
  meta = json.loads((out / "meta.json").read_text())
  assert meta["patch_nums"] == list(PATCH_NUMS) and meta["vocab_size"] == 4096
  assert meta["count"] == 11 and meta["num_variants"] == 3 and meta["image_size"] == IMAGE_SIZE
  assert meta["format_version"] == 2 and meta["token_dtype"] == "int16"
  shard = read_token_shard(out / "tokens-00001-of-00002.array_record", 3, SEQ_LEN)
  assert shard["tokens"].shape == (6, 3, SEQ_LEN)
  # Variant v of a record is the training augmentation of epoch v, with the writer's seed.
  images = make_input_iterator(config, global_batch=1, seed=1).examples
  record = int(shard["source_indices"][2])
  np.testing.assert_array_equal(
      shard["tokens"][2, 1], _fake_encode(4096)(images.load(record, 1)["image"][None])[0])
  assert shard["labels"][2] == images.load(record, 0)["label"]

  token_config = _with(config, source="pretokenized", data_dir=str(out))
  again = write_pretokenized(config, _fake_encode(4096), str(out), patch_nums=PATCH_NUMS,
                             vocab_size=4096, num_variants=3, num_shards=2, batch_size=4, seed=1)
  assert again["shards_kept"] == [0, 1] and not again["shards_written"]
  kwargs = dict(global_batch=4, seed=9, patch_nums=PATCH_NUMS, vocab_size=4096)
  full = _take(make_input_iterator(token_config, **kwargs), 6)
  resumed = _take(make_input_iterator(token_config, start_step=3, **kwargs), 3)
  _assert_batches_equal(full[3:], resumed)
  for batch in full:
    assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (4, SEQ_LEN)
    assert batch["label"].dtype == np.int32
  examples = make_input_iterator(token_config, **kwargs).examples
  assert len({examples.variant(0, epoch) for epoch in range(12)}) > 1
  all_tokens = np.concatenate([read_token_shard(out / f"tokens-0000{s}-of-00002.array_record",
                                                3, SEQ_LEN)["tokens"] for s in range(2)])
  np.testing.assert_array_equal(examples.load(5, 4)["tokens"],
                                all_tokens[5, examples.variant(5, 4)])


def test_pretokenized_large_vocab_uses_int32_and_hosts_split_the_shards(tmp_path):
  pytest.importorskip("var_jax.data.shapes")
  config = default_data_config()
  config.update(source="shapes", image_size=32, shapes_num_examples=6, num_workers=2)
  out = str(tmp_path / "tokens")
  kwargs = dict(patch_nums=PATCH_NUMS, vocab_size=40_000, num_shards=3, batch_size=4)
  parts = [write_pretokenized(config, _fake_encode(40_000), out, process_index=p,
                              process_count=2, **kwargs) for p in range(2)]
  assert parts[0]["shards_written"] == [0, 2] and parts[1]["shards_written"] == [1]
  shard = read_token_shard(f"{out}/tokens-00000-of-00003.array_record", 1, SEQ_LEN, "<i4")
  assert shard["tokens"].shape == (2, 1, SEQ_LEN)  # records of int32 tokens (the layout's size)


def test_pretokenized_meta_mismatch_is_a_clear_error(image_root, tmp_path):
  config = _folder_config(image_root)
  out = str(tmp_path / "tokens")
  write_pretokenized(config, _fake_encode(4096), out, patch_nums=PATCH_NUMS, vocab_size=4096,
                     num_shards=1)
  token_config = _with(config, source="pretokenized", data_dir=out)
  with pytest.raises(ConfigError, match=r"vocab_size: data has 4096, model expects 8192"):
    make_input_iterator(token_config, global_batch=2, seed=0, patch_nums=PATCH_NUMS,
                        vocab_size=8192)
  with pytest.raises(ConfigError, match=r"patch_nums: data has \[1, 2, 3\]"):
    make_input_iterator(token_config, global_batch=2, seed=0, patch_nums=(1, 2, 4),
                        vocab_size=4096)
  with pytest.raises(ConfigError, match="needs the model's patch_nums"):
    make_input_iterator(token_config, global_batch=2, seed=0)
  with pytest.raises(ConfigError, match="other settings"):
    write_pretokenized(config, _fake_encode(4096), out, patch_nums=PATCH_NUMS, vocab_size=4096,
                       num_shards=1, num_variants=2)


def test_encode_fn_with_wrong_output_is_a_clear_error(image_root, tmp_path):
  config = _folder_config(image_root)
  with pytest.raises(InputError, match=r"integer tokens of shape \(4, 14\)"):
    write_pretokenized(config, lambda images: np.zeros((len(images), 5), np.int32),
                       str(tmp_path / "a"), patch_nums=PATCH_NUMS, vocab_size=16, batch_size=4,
                       num_shards=1)
  with pytest.raises(InputError, match="outside"):
    write_pretokenized(config, lambda images: np.full((len(images), SEQ_LEN), 16),
                       str(tmp_path / "b"), patch_nums=PATCH_NUMS, vocab_size=16, batch_size=4,
                       num_shards=1)


# Bad inputs.


def test_bad_inputs_raise_clear_errors(image_root, tmp_path):
  with pytest.raises(InputError, match="does not exist"):
    make_input_iterator(_folder_config(tmp_path / "missing"), global_batch=2, seed=0)
  with pytest.raises(ConfigError, match="Unknown data.source 'webdataset'"):
    make_input_iterator(_folder_config(image_root, source="webdataset"), global_batch=2, seed=0)
  with pytest.raises(ConfigError, match="not divisible by process_count=4"):
    make_input_iterator(_folder_config(image_root), global_batch=6, seed=0, process_count=4)
  with pytest.raises(ConfigError, match="mid_reso"):
    make_input_iterator(_folder_config(image_root, mid_reso=0.5), global_batch=2, seed=0)
  with pytest.raises(InputError, match="No meta.json"):
    make_input_iterator(_folder_config(tmp_path, source="pretokenized"), global_batch=2, seed=0,
                        patch_nums=PATCH_NUMS, vocab_size=16)
  with pytest.raises(InputError, match="fewer than one global batch"):
    make_input_iterator(_folder_config(image_root, epoch_remainder="drop"), global_batch=12,
                        seed=0)
  bad_config = ml_collections.ConfigDict({"source": "folder"})
  with pytest.raises(ConfigError, match="default_data_config"):
    make_input_iterator(bad_config, global_batch=2, seed=0)
