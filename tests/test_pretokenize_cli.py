"""`var-jax pretokenize`: the fixture tokenizer's tokens of the shapes data, written and read back."""
import contextlib
import io
import json
import pathlib

import ml_collections
import numpy as np
import pytest

import helpers
from var_jax import cli
from var_jax.data import default_data_config, make_input_iterator
from var_jax.data import token_shards
from var_jax.data.image_examples import ImageExamples
from var_jax.data.sources import make_image_source
from var_jax.errors import ConfigError
from var_jax.cli import pretokenize

ROOT = pathlib.Path(__file__).parent.parent
CONFIG = str(ROOT / "configs" / "var_tiny.py")
VAE = str(helpers.FIXTURES / "official_tiny_vae.pth")
SEQ_LEN = 30  # 1 + 4 + 9 + 16
NUM_RECORDS = 6
# The shapes set, small, with flips so that the two variants of a record can differ.
DATA_OVERRIDES = [f"--config.data.shapes_num_examples={NUM_RECORDS}", "--config.data.hflip=True"]


def _run(capsys, *args):
  code = cli.main(["pretokenize", "--config", CONFIG, *args])
  out, err = capsys.readouterr()
  return code, out, err


def _shard(out, shard):
  return helpers.read_token_shard(out / f"tokens-{shard:05d}-of-00002.array_record", 2, SEQ_LEN)


def _data_config(**overrides):
  """configs/var_tiny.py's data section with DATA_OVERRIDES."""
  config = default_data_config()
  config.update(source="shapes", image_size=64, num_workers=2, shapes_num_examples=NUM_RECORDS,
                hflip=True)
  config.update(overrides)
  return config


@pytest.fixture(name="written", scope="module")
def fixture_written(tmp_path_factory):
  """Pre-tokenizes the 6 shapes images x 2 variants into 2 shards with the fixture tokenizer."""
  out = tmp_path_factory.mktemp("tokens")
  argv = ["pretokenize", "--config", CONFIG, "--tokenizer", VAE, "--out", str(out), "--variants", "2",
          "--num-shards", "2", "--batch-size", "4", *DATA_OVERRIDES]
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert cli.main(argv) == 0
  return out, printed.getvalue()


def test_writes_shards_and_meta(written):
  out, printed = written
  assert str(out) in printed and "data.source=pretokenized" in printed and f"data.data_dir={out}" in printed
  meta = json.loads((out / "meta.json").read_text())
  assert meta["format"] == token_shards.FORMAT_NAME
  assert meta["patch_nums"] == [1, 2, 3, 4] and meta["seq_len"] == SEQ_LEN and meta["vocab_size"] == 64
  assert meta["token_dtype"] == "int16" and meta["image_size"] == 64 and meta["hflip"] is True
  assert (meta["count"], meta["num_variants"], meta["num_shards"]) == (NUM_RECORDS, 2, 2)
  assert meta["seed"] == 0 and meta["num_classes"] == 10
  assert meta["source"]["source"] == "shapes" and meta["source"]["split"] == "train"
  for shard in range(2):
    arrays = helpers.read_token_shard(out / f"tokens-0000{shard}-of-00002.array_record", 2, SEQ_LEN)
    assert arrays["tokens"].shape == (3, 2, SEQ_LEN)
    np.testing.assert_array_equal(arrays["source_indices"], np.arange(3 * shard, 3 * shard + 3))


def test_tokens_are_the_tokenizers_encode_of_the_augmented_images(written):
  out, _ = written
  shards = [_shard(out, s) for s in range(2)]
  tokens = np.concatenate([s["tokens"] for s in shards])
  labels = np.concatenate([s["labels"] for s in shards])
  # Variant v of record i is the training augmentation of epoch v, seeded by the config's seed 0.
  examples = ImageExamples(make_image_source(_data_config(), "train"), image_size=64, mid_reso=1.125,
                           hflip=True, seed=0, train=True)
  loaded = [examples.load(i, v) for i in range(NUM_RECORDS) for v in range(2)]
  images = np.stack([e["image"] for e in loaded]).astype(np.float32) / 127.5 - 1
  expected = helpers.concat_tokens(helpers.tokenizer().encode(images)).reshape(NUM_RECORDS, 2, SEQ_LEN)
  np.testing.assert_array_equal(tokens, expected)
  np.testing.assert_array_equal(labels, [e["label"] for e in loaded[::2]])
  assert not np.array_equal(tokens[:, 0], tokens[:, 1])  # the flips differ between the variants


def test_training_input_pipeline_reads_them_back(written):
  out, _ = written
  tokens = np.concatenate([_shard(out, s)["tokens"] for s in range(2)])
  config = _data_config(source="pretokenized", data_dir=str(out))
  kwargs = dict(global_batch=NUM_RECORDS, seed=0, patch_nums=helpers.PATCH_NUMS, vocab_size=64)
  with make_input_iterator(config, train=False, **kwargs) as iterator:
    batch = next(iterator)  # evaluation: variant 0, in index order
  assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (NUM_RECORDS, SEQ_LEN)
  np.testing.assert_array_equal(batch["tokens"], tokens[:, 0])
  with make_input_iterator(config, train=True, **kwargs) as iterator:
    examples = iterator.examples
    batch = next(iterator)
  assert examples.num_variants == 2 and batch["tokens"].shape == (NUM_RECORDS, SEQ_LEN)
  np.testing.assert_array_equal(examples.load(4, 3)["tokens"], tokens[4, examples.variant(4, 3)])


def test_rerun_keeps_finished_shards(written, capsys):
  out, _ = written
  before = {p.name: p.stat().st_mtime_ns for p in out.glob("tokens-*")}
  code, printed, _ = _run(capsys, "--tokenizer", VAE, "--out", str(out), "--variants", "2",
                          "--num-shards", "2", "--batch-size", "4", *DATA_OVERRIDES)
  assert code == 0 and "wrote shards []" in printed and "kept the finished shards [0, 1]" in printed
  assert {p.name: p.stat().st_mtime_ns for p in out.glob("tokens-*")} == before


def test_hosts_split_the_shards(tmp_path, capsys):
  out = tmp_path / "tokens"
  code, printed, _ = _run(capsys, "--tokenizer", VAE, "--out", str(out), "--num-shards", "3",
                          "--batch-size", "2", "--process-index", "1", "--process-count", "2",
                          "--patch-nums", "1,2,3,4", *DATA_OVERRIDES)
  assert code == 0 and "host 1 of 2" in printed
  assert sorted(p.name for p in out.glob("tokens-*")) == ["tokens-00001-of-00003.array_record"]
  assert not (out / "meta.json").exists()  # host 0 writes it


@pytest.mark.parametrize("args, message", [
    (["--tokenizer", "/no/such/vae.pth"], "no such file or directory"),
    (["--tokenizer", VAE, "--config.data.source=pretokenized", "--config.data.data_dir=/tmp"],
     "pass --config.data.source=tfds, folder or shapes"),
    (["--tokenizer", VAE, "--patch-nums", "1,2,3,5"], "data.image_size 64 is not the tokenizer's image size 80"),
    (["--tokenizer", VAE, "--variants", "0"], "--variants must be a positive int"),
    (["--tokenizer", VAE, "--process-index", "2", "--process-count", "2"], "outside [0, --process-count 2)"),
])
def test_bad_settings_are_clear_errors(tmp_path, capsys, args, message):
  code, _, err = _run(capsys, "--out", str(tmp_path / "tokens"), *args)
  assert code == 2 and message in err and err.startswith("var-jax pretokenize: error:")
  assert not (tmp_path / "tokens" / "meta.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--config.data.no_such_field=1"], "no_such_field"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--patch-nums", "1,x"], "--patch-nums takes comma-separated ints"),
])
def test_bad_flags_exit_2(tmp_path, capsys, args, message):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["pretokenize", "--config", CONFIG, "--tokenizer", VAE, "--out", str(tmp_path), *args])
  assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_config_file_exits_2(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["pretokenize", "--config", str(tmp_path / "nope.py"), "--out", str(tmp_path)])
  assert exit_info.value.code == 2 and "nope.py" in capsys.readouterr().err


def test_tokenizer_spec_follows_the_config_unless_given():
  config = ml_collections.ConfigDict({
      "patch_nums": (1, 2, 3, 4),
      "tokenizer": {"path": "random", "seed": 3, "overrides": {"ch": 32, "vocab_size": 64}}})
  spec = pretokenize.tokenizer_spec(config, None, None)
  assert spec.patch_nums == (1, 2, 3, 4) and spec.tokenizer.path == "random"
  assert spec.tokenizer.seed == 3 and spec.tokenizer.overrides.to_dict() == {"ch": 32, "vocab_size": 64}
  # --tokenizer replaces the path; the config's overrides described its own tokenizer.
  spec = pretokenize.tokenizer_spec(config, VAE, (1, 2, 4))
  assert spec.tokenizer.path == VAE and not spec.tokenizer.overrides and spec.patch_nums == (1, 2, 4)
  with pytest.raises(ConfigError, match="no tokenizer: pass --tokenizer"):
    pretokenize.tokenizer_spec(ml_collections.ConfigDict({"patch_nums": (1, 2)}), None, None)
  with pytest.raises(ConfigError, match="the config has no patch_nums: pass --patch-nums"):
    pretokenize.tokenizer_spec(ml_collections.ConfigDict({"tokenizer": {"path": VAE}}), None, None)
