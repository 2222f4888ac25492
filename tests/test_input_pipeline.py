"""The grain input pipeline: the same batches as before grain, worker processes, exact resume."""
import hashlib
import io
import json
import tarfile

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from var_jax.data import default_data_config, make_input_iterator
from var_jax.errors import CheckpointError, ConfigError
from var_jax.train import checkpointing

FIXTURE = "pre_grain_pipeline_batches.json"


@pytest.fixture(name="golden", scope="module")
def fixture_golden(request):
  path = request.path.parent / "fixtures" / FIXTURE
  return json.loads(path.read_text())


@pytest.fixture(name="png_root", scope="module")
def fixture_png_root(tmp_path_factory):
  """3 classes x 5 PNGs of random sizes and pixels, one of them corrupt (as the fixture was made)."""
  root = tmp_path_factory.mktemp("png")
  rng = np.random.default_rng(1234)
  for name in ["ant", "bee", "cat"]:
    folder = root / "train" / name
    folder.mkdir(parents=True)
    for i in range(5):
      width, height = int(rng.integers(20, 41)), int(rng.integers(20, 41))
      pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(folder / f"im{i}.png")
  (root / "train" / "bee" / "im2.png").write_bytes(b"\x89PNG broken")
  return root


def _folder_config(root, **overrides):
  config = default_data_config()
  config.update(source="folder", data_dir=str(root), image_size=16, hflip=True, num_workers=2,
                eval_split="train")
  config.update(overrides)
  return config


def _digest(batch):
  return {key: hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]
          for key, value in sorted(batch.items())}


def _digests(iterator, num_batches=None):
  with iterator:
    if num_batches is None:
      return [_digest(batch) for batch in iterator]
    return [_digest(next(iterator)) for _ in range(num_batches)]


def test_batches_are_those_of_the_pipeline_before_grain(png_root, golden):
  config = _folder_config(png_root)
  for count in (1, 2):
    for index in range(count):
      iterator = make_input_iterator(config, global_batch=6, seed=7, process_index=index,
                                     process_count=count)
      assert _digests(iterator, 7) == golden[f"folder_p{index}of{count}"], (index, count)
  eval_iterator = make_input_iterator(config, global_batch=6, seed=7, train=False)
  assert _digests(eval_iterator) == golden["folder_eval"]
  shapes = default_data_config()
  shapes.update(source="shapes", image_size=32, hflip=True, shapes_num_examples=10,
                num_workers=2)
  assert _digests(make_input_iterator(shapes, global_batch=4, seed=3), 5) == golden["shapes"]


def test_worker_processes_read_the_same_batches_and_their_state_resumes(png_root, golden):
  config = _folder_config(png_root, num_processes=2)
  expected = golden["folder_p1of2"]
  with make_input_iterator(config, global_batch=6, seed=7, process_index=1,
                           process_count=2) as iterator:
    first = [_digest(next(iterator)) for _ in range(3)]
    state = iterator.get_state()
    rest = [_digest(next(iterator)) for _ in range(4)]
    stats = iterator.stats
  assert first + rest == expected
  assert state["step"] == 3 and state["grain"] is not None
  # Back in worker processes from grain's own state, and in-process from the step alone.
  for num_processes in (2, 0):
    resumed = make_input_iterator(_folder_config(png_root, num_processes=num_processes),
                                  global_batch=6, seed=7, process_index=1, process_count=2)
    resumed.set_state(json.dumps(state).encode())
    assert resumed.step == 3
    assert _digests(resumed, 4) == expected[3:], num_processes
    assert resumed.stats == stats, num_processes


def test_state_round_trip_keeps_the_stream_and_the_skip_counts(png_root, golden):
  config = _folder_config(png_root, num_workers=3, prefetch=1)
  iterator = make_input_iterator(config, global_batch=6, seed=7)
  with iterator:
    fresh_state = iterator.get_state()
    head = [_digest(next(iterator)) for _ in range(4)]
    state = json.loads(json.dumps(iterator.get_state()))
  assert head == golden["folder_p0of1"][:4] and fresh_state["step"] == 0
  # The corrupt file sits at stream positions the fixture's first 4 batches cross once per epoch.
  assert state["stats"]["corrupt_skipped"] >= 1 and state["stats"]["corrupt_records"]
  resumed = make_input_iterator(config, global_batch=6, seed=7)
  resumed.set_state(state)
  assert _digests(resumed, 3) == golden["folder_p0of1"][4:]
  assert resumed.stats["corrupt_records"] == len(state["stats"]["corrupt_records"])
  assert resumed.stats["corrupt_skipped"] >= state["stats"]["corrupt_skipped"]
  restarted = make_input_iterator(config, global_batch=6, seed=7)
  restarted.set_state(fresh_state)
  assert _digests(restarted, 2) == golden["folder_p0of1"][:2]


def test_bad_states_and_settings_are_clear_errors(png_root):
  iterator = make_input_iterator(_folder_config(png_root), global_batch=6, seed=7)
  with pytest.raises(CheckpointError, match="not JSON"):
    iterator.set_state(b"{not json")
  with pytest.raises(CheckpointError, match="not a var_jax.input_iterator state"):
    iterator.set_state({"next_index": 3})
  with pytest.raises(CheckpointError, match="version 99"):
    iterator.set_state({**iterator.get_state(), "version": 99})
  with pytest.raises(ConfigError, match="num_processes must be an int >= 0"):
    make_input_iterator(_folder_config(png_root, num_processes=-1), global_batch=6, seed=7)


def test_checkpoints_keep_each_hosts_iterator_state(png_root, golden, tmp_path):
  config = _folder_config(png_root)
  state = {"w": jnp.arange(4.0)}
  ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, handle_sigterm=False)
  try:
    data = make_input_iterator(config, global_batch=6, seed=7)
    with data:
      for step in range(1, 3):
        next(data)
        ckpt.save(step, state, {"data_step": step}, data=data)
    ckpt.save_now(3, state, {"data_step": 3})  # no iterator: an older run's checkpoint
  finally:
    ckpt.close()
  saved = tmp_path / "checkpoints" / "2" / checkpointing.DATA_ITEM / "process_0-of-1.json"
  assert json.loads(saved.read_text())["step"] == 2

  ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, handle_sigterm=False)
  try:
    resumed = make_input_iterator(config, global_batch=6, seed=7, start_step=2)
    assert ckpt.restore_data(2, resumed) and resumed.step == 2
    assert _digests(resumed, 2) == golden["folder_p0of1"][2:4]
    untouched = make_input_iterator(config, global_batch=6, seed=7, start_step=3)
    assert not ckpt.restore_data(3, untouched) and untouched.step == 3
    saved.write_text("{broken")
    with pytest.raises(CheckpointError, match="Cannot restore the input-pipeline state"):
      ckpt.restore_data(2, make_input_iterator(config, global_batch=6, seed=7))
    assert saved.read_text() == "{broken"  # nothing rewritten
  finally:
    ckpt.close()


def _jpeg_bytes(rng, size):
  buffer = io.BytesIO()
  pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def _add_bytes(archive, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  archive.addfile(info, io.BytesIO(data))


@pytest.fixture(name="imagenet_dir", scope="module")
def fixture_imagenet_dir(tmp_path_factory):
  """TFDS imagenet2012 prepared (array_record) from archives in the manual-download layout:
  ILSVRC2012_img_train.tar holding <synset>.tar of JPEGs, and ILSVRC2012_img_val.tar."""
  tfds = pytest.importorskip("tensorflow_datasets")
  root = tmp_path_factory.mktemp("imagenet")
  manual = root / "manual"
  manual.mkdir()
  rng = np.random.default_rng(3)
  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train:
    for synset in ["n01440764", "n01443537", "n01484850"]:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as images:
        for i in range(4):
          size = (int(rng.integers(24, 48)), int(rng.integers(24, 48)))
          _add_bytes(images, f"{synset}_{i}.JPEG", _jpeg_bytes(rng, size))
      _add_bytes(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
    for i in range(2):
      _add_bytes(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg_bytes(rng, (32, 32)))
  builder = tfds.builder("imagenet2012", data_dir=str(root / "tfds"), file_format="array_record")
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  except ModuleNotFoundError as error:  # e.g. importlib_resources on some TFDS versions
    pytest.skip(f"TFDS cannot build imagenet2012 here: {error}")
  return root / "tfds"


def test_tfds_imagenet_in_the_manual_layout_through_worker_processes(imagenet_dir):
  config = default_data_config()
  config.update(source="tfds", name="imagenet2012", data_dir=str(imagenet_dir), image_size=16,
                hflip=True, num_workers=2)
  with make_input_iterator(config, global_batch=4, seed=5) as iterator:
    assert iterator.num_classes == 1000
    threads = [next(iterator) for _ in range(4)]
  config.num_processes = 1
  with make_input_iterator(config, global_batch=4, seed=5) as iterator:
    processes = [next(iterator) for _ in range(4)]
  for a, b in zip(threads, processes):
    assert a.keys() == b.keys() == {"image", "label"}
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Synsets n01440764, n01443537, n01484850 are ImageNet classes 0, 1 and 2; each epoch
  # (3 steps of 4 of the 12 images) shows every image once.
  epoch = np.concatenate([batch["label"] for batch in threads[:3]])
  np.testing.assert_array_equal(np.bincount(epoch, minlength=3), [4, 4, 4])
