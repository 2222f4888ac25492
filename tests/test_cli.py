"""`var-jax sample` and `var-jax edit` on the converted fixture model, called in-process."""
import jax
import numpy as np
import pytest
from PIL import Image

import helpers
import var_jax
from var_jax import cli
from var_jax.cli import common as cli_common
from var_jax.cli import sample as cli_sample
from var_jax.inference.pretrained import convert_files, save_converted

SIZE = 64  # the fixture model: 64 px, 10 classes, vocabulary 64, patch_nums (1, 2, 3, 4)
_COMPILES = []


def _count_compile(event, duration, **kwargs):
  del duration, kwargs
  if event.endswith("backend_compile_duration"):
    _COMPILES.append(event)


def _count_cache_hit(event, **kwargs):
  """A program loaded from the persistent compilation cache (conftest) counts as compiled."""
  del kwargs
  if event == "/jax/compilation_cache/cache_hits":
    _COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_count_compile)
jax.monitoring.register_event_listener(_count_cache_hit)


@pytest.fixture(name="model_dir", scope="module")
def fixture_model_dir(tmp_path_factory):
  """The official tiny fixture converted to a var-jax directory, once for the module."""
  model = convert_files(helpers.FIXTURES / "official_tiny_vae.pth",
                        helpers.FIXTURES / "official_tiny_seed0_var.pth", patch_nums=helpers.PATCH_NUMS)
  return str(save_converted(model, tmp_path_factory.mktemp("model") / "tiny"))


@pytest.fixture(name="refiner_dir", scope="module")
def fixture_refiner_dir(tmp_path_factory):
  """The official tiny_saln fixture (same tokenizer as tiny) as a directory: a refiner."""
  model = convert_files(helpers.FIXTURES / "official_tiny_vae.pth",
                        helpers.FIXTURES / "official_tiny_saln_seed0_var.pth",
                        patch_nums=helpers.PATCH_NUMS)
  return str(save_converted(model, tmp_path_factory.mktemp("refiner") / "tiny_saln"))


@pytest.fixture(name="image_and_mask", scope="module")
def fixture_image_and_mask(tmp_path_factory):
  """A 64 px RGB image and a mask that keeps its left half (white = keep)."""
  d = tmp_path_factory.mktemp("edit_inputs")
  pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(d / "image.png")
  mask = np.zeros((SIZE, SIZE), np.uint8)
  mask[:, :SIZE // 2] = 255
  Image.fromarray(mask).save(d / "mask.png")
  return d / "image.png", d / "mask.png"


def _grid(path):
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def test_sample_writes_the_grid_pngs_and_npz(model_dir, tmp_path, capsys):
  out_dir = tmp_path / "samples"
  argv = ["sample", "--model", model_dir, "--classes", "1,2", "--per-class", "2", "--seed", "7",
          "--out", str(tmp_path / "grid.png"), "--out-dir", str(out_dir)]
  jax.clear_caches()  # a program another test file compiled in this worker would not compile here
  compiles = len(_COMPILES)
  assert cli.main(argv) == 0
  assert len(_COMPILES) > compiles  # the listener the error tests rely on sees compiles
  printed = capsys.readouterr().out
  assert "sampled 4 images of 2 classes" in printed and str(out_dir) in printed

  grid = _grid(tmp_path / "grid.png")
  assert grid.shape == (2 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2, 3)  # 2 x 2 tiles, 2 px padding
  with np.load(out_dir / "samples.npz") as npz:
    assert npz.files == ["arr_0"]
    images = npz["arr_0"]
  assert images.dtype == np.uint8 and images.shape == (4, SIZE, SIZE, 3)
  names = sorted(p.name for p in out_dir.glob("*.png"))
  assert names == ["000000_class1.png", "000001_class1.png", "000002_class2.png", "000003_class2.png"]
  for i, name in enumerate(names):
    np.testing.assert_array_equal(_grid(out_dir / name), images[i])
    row, col = divmod(i, 2)
    top, left = 2 + row * (SIZE + 2), 2 + col * (SIZE + 2)
    np.testing.assert_array_equal(grid[top:top + SIZE, left:left + SIZE], images[i])

  # The same seed gives the same grid; another seed another one.
  assert cli.main(argv[:-4] + ["--out", str(tmp_path / "again.png")]) == 0
  np.testing.assert_array_equal(_grid(tmp_path / "again.png"), grid)
  assert cli.main(argv[:-4] + ["--seed", "8", "--out", str(tmp_path / "other.png")]) == 0
  assert not np.array_equal(_grid(tmp_path / "other.png"), grid)


def test_sample_images_do_not_depend_on_the_batch_size(model_dir, tmp_path):
  """Global image i is drawn with fold_in(seed key, i), so calls of 1 or of 3 give the same set."""
  def run(batch, name):
    out_dir = tmp_path / name
    assert cli.main(["sample", "--model", model_dir, "--classes", "1,2,3", "--per-class", "2",
                     "--seed", "4", "--batch-size", str(batch), "--out", "", "--out-dir",
                     str(out_dir)]) == 0
    with np.load(out_dir / "samples.npz") as npz:
      return npz["arr_0"]
  one, three = run(1, "b1"), run(3, "b3")
  assert one.shape == (6, SIZE, SIZE, 3)
  np.testing.assert_array_equal(one, three)
  assert not np.array_equal(one[0], one[1])  # same class, different keys


def test_sample_tokenizer_dtype_decodes_the_same_tokens_in_bfloat16(model_dir, tmp_path, monkeypatch):
  """--tokenizer-dtype reaches the model `sample` builds: the same tokens (float32 transformer),
  decoded by a bf16 tokenizer, give images within a few 8-bit levels of the float32 ones."""
  loaded = []
  load = cli_common.load_model

  def recording(*args):
    loaded.append(load(*args))
    return loaded[-1]

  monkeypatch.setattr(cli_common, "load_model", recording)

  def run(extra, name):
    out_dir = tmp_path / name
    assert cli.main(["sample", "--model", model_dir, "--classes", "1,2", "--per-class", "2",
                     "--seed", "3", "--out", "", "--out-dir", str(out_dir), *extra]) == 0
    with np.load(out_dir / "samples.npz") as npz:
      return npz["arr_0"].astype(np.int16)
  f32, bf16 = run([], "f32"), run(["--tokenizer-dtype", "bfloat16"], "bf16")
  assert [m.tokenizer.config.dtype for m in loaded] == ["float32", "bfloat16"]
  assert loaded[1].config.dtype == "float32"
  diff = np.abs(bf16 - f32)
  assert diff.max() <= 8 and diff.mean() < 1.5, (diff.max(), diff.mean())


@pytest.mark.slow  # ~50 s: five CLI runs (tests/test_fast_sampling.py checks the API the same way)
def test_sample_with_a_refiner_at_the_ends_equals_each_model(model_dir, refiner_dir, tmp_path):
  """--refiner with --draft-scales 4 (all of the fixture's scales) is --model alone; with 0 it is
  the refiner alone; in between it differs from both."""
  def run(name, *flags):
    out_dir = tmp_path / name
    assert cli.main(["sample", "--classes", "1,2", "--per-class", "1", "--seed", "3", "--out", "",
                     "--out-dir", str(out_dir), *flags]) == 0
    with np.load(out_dir / "samples.npz") as npz:
      return npz["arr_0"]
  drafter, refiner = run("drafter", "--model", model_dir), run("refiner", "--model", refiner_dir)
  both = ["--model", model_dir, "--refiner", refiner_dir]
  np.testing.assert_array_equal(run("k4", *both, "--draft-scales", "4"), drafter)
  np.testing.assert_array_equal(run("k0", *both, "--draft-scales", "0"), refiner)
  mixed = run("k2", *both)  # default: all but the last two scales drafted
  assert not np.array_equal(mixed, drafter) and not np.array_equal(mixed, refiner)


@pytest.mark.parametrize("flags, message", [
    (["--draft-scales", "2"], "--draft-scales needs --refiner MODEL"),
    (["--refiner", "REFINER", "--draft-scales", "5"], "draft_scales must be an int in [0, 4]"),
])
def test_sample_bad_refiner_flags_exit_2_before_compiling(model_dir, refiner_dir, tmp_path, capsys,
                                                          flags, message):
  flags = [refiner_dir if f == "REFINER" else f for f in flags]
  compiles = len(_COMPILES)
  assert cli.main(["sample", "--model", model_dir, "--out", str(tmp_path / "g.png"), *flags]) == 2
  err = capsys.readouterr().err
  assert err.startswith("var-jax sample: error: ") and message in err, err
  assert len(_COMPILES) == compiles and not (tmp_path / "g.png").exists()


def test_host_share_splits_the_images_once():
  shares = [cli_sample.host_share(10, p, 4) for p in range(4)]
  assert [len(s) for s in shares] == [3, 3, 2, 2]
  assert [i for s in shares for i in s] == list(range(10))


@pytest.mark.parametrize("args, message", [
    (["--classes", "1,10"], "class ids [10] are outside [0, 10) for this model with 10 classes"),
    (["--classes", "-1"], "class ids [-1] are outside [0, 10)"),
    (["--cfg", "-1"], "cfg (guidance scale) must be a finite number >= 0, got -1.0"),
    (["--top-k", "-1"], "top_k must be an int >= 0 (0 or >= 64, the vocabulary size: keep all), got -1"),
    (["--top-p", "1.5"], "top_p must be a number in [0, 1] (0 = off), got 1.5"),
    (["--per-class", "0"], "--per-class must be >= 1"),
    (["--mesh=-1,3,1"], "which does not divide the 8 available devices"),
    (["--model", "d17"], "'d17' is neither a shipped model"),
    (["--tokenizer-dtype", "float16"], "tokenizer_dtype must be one of ('float32', 'bfloat16')"),
])
def test_sample_bad_input_exits_2_before_compiling(model_dir, tmp_path, capsys, args, message):
  argv = ["sample", "--model", model_dir, "--classes", "1,2", "--per-class", "2",
          "--out", str(tmp_path / "grid.png"), *args]
  compiles = len(_COMPILES)
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("var-jax sample: error: ") and message in err, err
  assert len(_COMPILES) == compiles and not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("args", [["--classes", "1,x"], ["--cfg", "high"], ["--no-such-flag"]])
def test_sample_unparsable_flags_exit_2(args, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["sample", *args])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and "usage: var-jax" in err and args[-1] in err


def test_edit_writes_what_var_jax_edit_gives(model_dir, image_and_mask, tmp_path, capsys):
  """The written PNG is var_jax.edit's output for the same image, keep-mask, class and options."""
  image, mask = image_and_mask
  pixels = _grid(image)[None]
  white = (_grid(mask)[..., 0] >= 128).astype(np.float32)  # the left half
  out = tmp_path / "edited.png"
  argv = ["edit", "--model", model_dir, "--image", str(image), "--mask", str(mask), "--seed", "5",
          "--cfg", "2.5", "--top-k", "8", "--top-p", "0.9", "--class", "3", "--out", str(out)]
  assert cli.main(argv) == 0
  assert str(out) in capsys.readouterr().out
  with Image.open(out) as im:
    assert im.mode == "RGB" and im.size == (SIZE, SIZE)
  m = helpers.model("tiny")
  expected = var_jax.edit(m, pixels, white, [3], rng=jax.random.key(5), cfg=2.5, top_k=8, top_p=0.9)
  np.testing.assert_array_equal(_grid(out), np.asarray(expected)[0])

  # --white-is-generate: white is regenerated, black kept; no --class is the null class; the
  # sampling options default to the library's.
  inverted = tmp_path / "inverted.png"
  assert cli.main(argv[:7] + ["--white-is-generate", "--out", str(inverted)]) == 0
  expected_inv = var_jax.edit(m, pixels, 1.0 - white, [10], rng=jax.random.key(0))
  np.testing.assert_array_equal(_grid(inverted), np.asarray(expected_inv)[0])
  not_inverted = var_jax.edit(m, pixels, white, [10], rng=jax.random.key(0))
  assert not np.array_equal(np.asarray(not_inverted), np.asarray(expected_inv))  # the flag matters


def test_edit_on_a_pod_joins_before_loading_and_only_process_0_writes(model_dir, image_and_mask,
                                                                     tmp_path, monkeypatch):
  """On a pod every host runs the command: each joins jax.distributed first (before the model
  loads), and a host other than process 0 writes no image file. (`var-jax sample` does the same
  through the same two lines; its own share logic is tested above.)"""
  from var_jax.parallel import distributed
  events = []
  monkeypatch.setattr(distributed, "maybe_initialize_distributed",
                      lambda mode="auto", **kw: events.append(("init", mode)) or False)
  real_load = cli_common.load_model

  def load_as_process_1_of_2(*args):
    events.append(("load",))
    model = real_load(*args)  # read as the single process this test is; then play host 1 of 2
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    return model

  monkeypatch.setattr(cli_common, "load_model", load_as_process_1_of_2)
  image, mask = image_and_mask
  out = tmp_path / "out.png"
  argv = ["edit", "--model", model_dir, "--out", str(out), "--image", str(image), "--mask", str(mask)]
  assert cli.main(argv) == 0
  assert events == [("init", "auto"), ("load",)]
  assert not out.exists()


def test_edit_bad_files_exit_2_before_compiling(model_dir, image_and_mask, tmp_path, capsys):
  image, mask = image_and_mask
  small_mask = tmp_path / "small_mask.png"
  Image.fromarray(np.full((32, 32), 255, np.uint8)).save(small_mask)
  not_an_image = tmp_path / "notes.png"
  not_an_image.write_text("not an image")
  cases = [
      (["--image", str(image), "--mask", str(small_mask)], "is 32x32 but the model takes 64x64"),
      (["--image", str(not_an_image), "--mask", str(mask)], "is not a readable image"),
      (["--image", str(tmp_path / "missing.png"), "--mask", str(mask)], "no such image file"),
      (["--image", str(image), "--mask", str(mask), "--class", "11"], "class ids [11] are outside [0, 11)"),
  ]
  for args, message in cases:
    compiles = len(_COMPILES)
    code = cli.main(["edit", "--model", model_dir, "--out", str(tmp_path / "edited.png"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("var-jax edit: error: ") and message in err, (args, err)
    assert len(_COMPILES) == compiles and not (tmp_path / "edited.png").exists()
