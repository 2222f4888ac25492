"""Released-checkpoint handling: convert once, load by directory or name (hub cache, torch/), errors."""
import dataclasses
import json
import os
import shutil

import huggingface_hub
import jax
import numpy as np
import pytest

import helpers
from var_jax import cli
from var_jax.inference import pretrained
from var_jax.errors import CheckpointError, ConfigError, InputError
from var_jax.inference.pretrained import convert_files, load_converted, load_pretrained, save_converted

VAE = helpers.FIXTURES / "official_tiny_vae.pth"
VAR = helpers.FIXTURES / "official_tiny_seed0_var.pth"
PATCH_NUMS = helpers.PATCH_NUMS
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(name="converted", scope="module")
def fixture_converted(tmp_path_factory):
  """(model, directory): the fixture .pth pair converted and saved once for the module."""
  model = convert_files(VAE, VAR, patch_nums=PATCH_NUMS)
  return model, save_converted(model, tmp_path_factory.mktemp("converted") / "tiny")


@pytest.fixture(name="no_download", autouse=True)
def fixture_no_download(monkeypatch):
  """Every hub call in these tests must stay local."""
  real = huggingface_hub.hf_hub_download

  def local_only(*args, **kwargs):
    assert kwargs.get("local_files_only"), "a test tried to download from the hub"
    return real(*args, **kwargs)

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", local_only)


def _assert_same_params(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    assert np.asarray(y).dtype == np.float32
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_same_model(a, b):
  assert a.config == b.config and a.tokenizer.config == b.tokenizer.config
  _assert_same_params(a.params, b.params)
  _assert_same_params(a.tokenizer.params, b.tokenizer.params)


def _logits(model):
  ref = helpers.reference("tiny")
  return np.asarray(model.logits(ref["tf_label"], helpers.split_tokens(ref["vae_idx_BL"])))


def test_converted_directory_round_trips(converted):
  model, directory = converted
  assert sorted(p.name for p in directory.iterdir()) == ["config.json", "params"]
  meta = json.loads((directory / "config.json").read_text())
  assert meta["format"] == pretrained.FORMAT and meta["version"] == pretrained.FORMAT_VERSION
  assert meta["var"]["patch_nums"] == list(PATCH_NUMS) and meta["vae"]["vocab_size"] == 64
  _assert_same_model(model, helpers.model("tiny"))
  loaded = load_converted(directory)
  _assert_same_model(model, loaded)
  _assert_same_model(model, load_pretrained(str(directory)))
  logits = _logits(loaded)
  np.testing.assert_array_equal(logits, _logits(model))
  np.testing.assert_allclose(logits, helpers.reference("tiny")["tf_logits"], atol=1e-4)


def test_runtime_overrides_apply_and_others_are_rejected(converted):
  _, directory = converted
  assert load_converted(directory, dtype="bfloat16").config.dtype == "bfloat16"
  with pytest.raises(InputError, match=r"cannot override \['depth'\] when loading; allowed: "):
    load_converted(directory, depth=3)
  with pytest.raises(InputError, match=r"cannot override \['num_classes'\]"):
    load_pretrained(directory, num_classes=3)
  with pytest.raises(ConfigError, match=r"Unknown VAR config fields \['no_such_field'\]"):
    convert_files(VAE, VAR, patch_nums=PATCH_NUMS, no_such_field=1)
  with pytest.raises(ConfigError, match=r"Unknown VQVAE config fields \['no_such_field'\]"):
    convert_files(VAE, VAR, patch_nums=PATCH_NUMS, vae_no_such_field=1)


def test_tokenizer_dtype_sets_the_tokenizer_alone(converted):
  model, directory = converted
  loaded = load_pretrained(str(directory), dtype="bfloat16", tokenizer_dtype="bfloat16")
  assert loaded.config.dtype == "bfloat16" and loaded.tokenizer.config.dtype == "bfloat16"
  assert load_pretrained(str(directory), dtype="bfloat16").tokenizer.config.dtype == "float32"
  # Only the dtype changes: the same weights (kept float32), the same other fields.
  assert dataclasses.replace(loaded.tokenizer.config, dtype="float32") == model.tokenizer.config
  _assert_same_params(model.tokenizer.params, loaded.tokenizer.params)
  # A bf16 decode of the fixture's tokens is the float32 one to within a few bf16 steps.
  idx = helpers.split_tokens(helpers.reference("tiny")["vae_idx_BL"])
  want = np.asarray(model.tokenizer.decode(idx))
  got = np.asarray(loaded.tokenizer.decode(idx), np.float32)
  # (bf16 steps are 2^-8 to 2^-7 of values in [0.5, 1); a few layers add a few of them.)
  assert np.abs(got - want).max() < 0.08 and np.abs(got - want).mean() < 0.01, np.abs(got - want).mean()
  with pytest.raises(ConfigError, match=r"tokenizer_dtype must be one of \('float32', 'bfloat16'\), got 'float16'"):
    load_pretrained(str(directory), tokenizer_dtype="float16")


def test_bfloat16_storage_loads_as_float32(converted, tmp_path):
  model, _ = converted
  loaded = load_converted(save_converted(model, tmp_path / "bf16", storage_dtype="bfloat16"))
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16).astype(np.float32),
                         model.params)
  _assert_same_params(rounded, loaded.params)


def test_convert_files_needs_patch_nums_off_the_released_schedules():
  with pytest.raises(CheckpointError, match="30 token positions match neither released schedule"):
    convert_files(VAE, VAR)


def test_convert_cli_writes_the_same_directory(converted, tmp_path, capsys):
  model, directory = converted
  out = tmp_path / "cli"
  argv = ["convert", "--vae", str(VAE), "--var", str(VAR), "--out", str(out), "--patch-nums", "1,2,3,4"]
  assert cli.main(argv) == 0
  assert str(out) in capsys.readouterr().out
  assert json.loads((out / "config.json").read_text()) == json.loads((directory / "config.json").read_text())
  _assert_same_model(model, load_converted(out))
  # Converting over it, or without the scales of a non-released schedule: exit 2, no traceback.
  assert cli.main(argv) == 2
  assert "already holds a converted model" in capsys.readouterr().err
  assert cli.main(argv[:-2] + ["--out", str(tmp_path / "other")]) == 2
  assert "pass patch_nums" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv[:-1] + ["1,two"])
  assert exit_info.value.code == 2 and "--patch-nums takes comma-separated ints" in capsys.readouterr().err


def _hub_cache(cache_dir):
  """The fixture files in the hub's cache layout: blobs/, snapshots/<commit>/ links, refs/main."""
  repo = cache_dir / "hub" / ("models--" + pretrained.HF_REPO.replace("/", "--"))
  snapshot = repo / "snapshots" / COMMIT
  snapshot.mkdir(parents=True)
  (repo / "blobs").mkdir()
  for source, name in ((VAE, pretrained.VAE_FILE), (VAR, pretrained.RELEASED["d16"])):
    blob = repo / "blobs" / f"{name}.blob"
    shutil.copyfile(source, blob)
    (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(COMMIT)  # The hub writes the hash with no newline.
  return snapshot


def test_released_name_found_in_the_hub_cache_and_converted_once(tmp_path, monkeypatch):
  snapshot = _hub_cache(tmp_path)
  for name in (pretrained.VAE_FILE, "var_d16.pth"):  # huggingface_hub reads the layout the same way
    assert huggingface_hub.try_to_load_from_cache(pretrained.HF_REPO, name, cache_dir=tmp_path / "hub") \
        == str(snapshot / name)
  model = load_pretrained("d16", cache_dir=tmp_path, patch_nums=PATCH_NUMS, allow_download=False)
  _assert_same_model(model, helpers.model("tiny"))
  converted = tmp_path / "converted" / "d16"
  assert (converted / "config.json").is_file() and (converted / "params").is_dir()

  # The second call reads the converted copy: the .pth files and the converter are not needed.
  shutil.rmtree(tmp_path / "hub")
  monkeypatch.setattr(pretrained, "convert_files", lambda *a, **k: pytest.fail("converted again"))
  again = load_pretrained("d16", cache_dir=tmp_path, patch_nums=PATCH_NUMS, allow_download=False)
  _assert_same_model(model, again)
  assert load_pretrained("d16", cache_dir=tmp_path, dtype="bfloat16").config.dtype == "bfloat16"
  # Overrides the cached copy cannot honour are errors, not silently dropped.
  with pytest.raises(InputError, match=r"patch_nums=\(1, 2, 4\) differs from the cached converted copy"):
    load_pretrained("d16", cache_dir=tmp_path, patch_nums=(1, 2, 4))
  with pytest.raises(InputError, match="unknown override dtpye='bfloat16'"):
    load_pretrained("d16", cache_dir=tmp_path, dtpye="bfloat16")
  with pytest.raises(InputError, match="unknown override vae_chanels=8"):
    load_pretrained("d16", cache_dir=tmp_path, vae_chanels=8)
  assert (converted / "config.json").is_file()  # the cached copy is kept


def test_released_name_found_in_the_torch_folder(tmp_path, monkeypatch):
  torch_dir = tmp_path / "torch"
  torch_dir.mkdir()
  shutil.copyfile(VAE, torch_dir / pretrained.VAE_FILE)
  shutil.copyfile(VAR, torch_dir / "var_d16.pth")
  monkeypatch.setenv("VAR_JAX_CACHE", str(tmp_path))  # The default cache folder.
  model = load_pretrained("d16", patch_nums=PATCH_NUMS, allow_download=False)
  _assert_same_model(model, helpers.model("tiny"))
  assert (tmp_path / "converted" / "d16" / "config.json").is_file()


def test_offline_with_nothing_cached_names_the_files_and_the_folder(tmp_path):
  with pytest.raises(CheckpointError) as error:
    load_pretrained("d20", cache_dir=tmp_path, allow_download=False)
  message = str(error.value)
  assert f"Fetch {pretrained.VAE_FILE}, var_d20.pth from https://huggingface.co/{pretrained.HF_REPO}" in message
  assert f"{tmp_path / 'torch'}/" in message
  assert not (tmp_path / "converted").exists()
  # With the tokenizer placed by hand, only the VAR file is missing.
  (tmp_path / "torch").mkdir()
  shutil.copyfile(VAE, tmp_path / "torch" / pretrained.VAE_FILE)
  with pytest.raises(CheckpointError, match="Fetch var_d20.pth from"):
    load_pretrained("d20", cache_dir=tmp_path, allow_download=False)


def test_broken_converted_directories_are_clear_errors(converted, tmp_path):
  _, directory = converted
  good_config = (directory / "config.json").read_text()

  def make(name, config_text, params=True):
    d = tmp_path / name
    d.mkdir()
    if config_text is not None:
      (d / "config.json").write_text(config_text)
    if params:
      (d / "params").mkdir()
    return d

  with pytest.raises(CheckpointError, match=r"is not valid JSON"):
    load_pretrained(make("corrupt", good_config[:40]))
  with pytest.raises(CheckpointError, match=r"needs config.json and params/.*var-jax convert"):
    load_converted(make("no_params", good_config, params=False))
  with pytest.raises(CheckpointError, match=r"needs config.json and params/"):
    load_converted(make("no_config", None))
  with pytest.raises(CheckpointError, match=r"not a var-jax converted model config \(format='other'\)"):
    load_converted(make("format", json.dumps({**json.loads(good_config), "format": "other"})))
  with pytest.raises(CheckpointError, match=r"could not restore .*Re-run `var-jax convert`"):
    load_converted(make("empty_params", good_config))


def test_bad_names_and_paths_are_clear_errors(tmp_path):
  with pytest.raises(InputError, match=r"'d17' is neither a shipped model .* nor a directory"):
    load_pretrained("d17", cache_dir=tmp_path)
  with pytest.raises(InputError, match=r"single .pth file: pass \(vae.pth, var.pth\)"):
    load_pretrained(str(VAR), cache_dir=tmp_path)
  with pytest.raises(InputError, match=r"\(vae.pth, var.pth\)"):
    load_pretrained((VAE, VAR, VAR))
  _assert_same_model(load_pretrained((VAE, VAR), patch_nums=PATCH_NUMS), helpers.model("tiny"))


def test_model_directory_paths_keep_urls_and_make_local_ones_absolute(tmp_path, monkeypatch):
  """gs:// model directories reach Orbax as URLs (pathlib would give a local 'gs:/bucket/...')."""
  from var_jax.inference import model_dirs
  remote = model_dirs.as_path("gs://bucket/models/d16")
  assert str(remote) == "gs://bucket/models/d16" and str(remote / "params") == "gs://bucket/models/d16/params"
  monkeypatch.chdir(tmp_path)
  assert model_dirs.as_path("models/d16") == tmp_path / "models" / "d16"
