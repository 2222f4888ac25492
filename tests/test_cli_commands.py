"""The var-jax commands as a newcomer meets them: help everywhere, output paths checked before any
work, shipped configs by name from anywhere, the top-level dispatcher's errors."""
import os
import pathlib

import pytest

from var_jax import cli
from var_jax.cli import common
from var_jax.errors import ConfigError
from var_jax.train import config_lib

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", ["sample", "edit", "convert", "train", "train-tokenizer",
                                     "pretokenize", "evaluate", "fid-stats", "export", "aot"])
def test_every_command_prints_help(command, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main([command, "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith(f"usage: var-jax {command}"), out[:300]


def test_sample_help_shows_defaults(capsys):
  with pytest.raises(SystemExit):
    cli.main(["sample", "--help"])
  out = " ".join(capsys.readouterr().out.split())
  assert "(default: 900)" in out and "(default: shapes-tiny)" in out and "(default: 0.96)" in out


@pytest.mark.parametrize("command", ["sample", "edit", "evaluate", "train", "aot"])
def test_help_says_each_default_once_and_never_none(command, capsys):
  with pytest.raises(SystemExit):
    cli.main([command, "--help"])
  out = " ".join(capsys.readouterr().out.split())
  assert "(default: None)" not in out
  for flag_help in out.split(" --")[1:]:
    assert flag_help.count("default") <= 1, flag_help


def test_unknown_command_exits_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["smaple"])
  assert exit_info.value.code == 2
  assert "invalid choice: 'smaple'" in capsys.readouterr().err


@pytest.fixture
def no_model_loading(monkeypatch):
  """A command that reaches the model loader has started its work: fail the test then."""
  def refuse(*args, **kwargs):
    raise AssertionError("the model was loaded before the output path was checked")
  monkeypatch.setattr(common, "load_model", refuse)


def _error(capsys) -> str:
  return " ".join(capsys.readouterr().err.split())


def test_sample_out_that_is_a_directory_fails_before_loading(tmp_path, no_model_loading, capsys):
  assert cli.main(["sample", "--out", str(tmp_path)]) == 2
  assert f"--out {tmp_path} is a directory; give a file path." in _error(capsys)


def test_sample_out_dir_that_is_a_file_fails_before_loading(tmp_path, no_model_loading, capsys):
  f = tmp_path / "taken.png"
  f.write_bytes(b"x")
  assert cli.main(["sample", "--out", "", "--out-dir", str(f)]) == 2
  assert f"--out-dir {f} is a file; give a directory." in _error(capsys)
  assert cli.main(["sample", "--out", str(f / "grid.png")]) == 2  # a parent that is a file
  assert f"{f} is a file, not a directory" in _error(capsys)


def test_edit_out_that_is_a_directory_fails_before_loading(tmp_path, no_model_loading, capsys):
  args = ["edit", "--image", "a.png", "--mask", "m.png", "--out", str(tmp_path)]
  assert cli.main(args) == 2
  assert "is a directory; give a file path" in _error(capsys)


def test_convert_out_that_is_a_file_fails_before_reading(tmp_path, capsys):
  f = tmp_path / "model"
  f.write_text("")
  # The .pth files do not exist: the --out error must come first.
  assert cli.main(["convert", "--vae", "no.pth", "--var", "no.pth", "--out", str(f)]) == 2
  assert f"--out {f} is a file; give a directory." in _error(capsys)


@pytest.mark.parametrize("argv", [
    ["convert", "--vae", "no.pth", "--var", "no.pth", "--out", "gs://bucket/d16"],
    ["export", "--workdir", "no_run", "--out", "gs://bucket/d16"],
    ["sample", "--out", "gs://bucket/grid.png"],
    ["sample", "--out", "", "--out-dir", "gs://bucket/samples"],
    ["edit", "--image", "a.png", "--mask", "m.png", "--out", "gs://bucket/edited.png"],
    ["evaluate", "--out", "gs://bucket/metrics.json"],
    ["evaluate", "--save-samples", "gs://bucket/samples.npz"],
    ["evaluate", "--features-dir", "gs://bucket/features"],
    ["fid-stats", "--shapes", "8", "--fid-inception", "no.pth", "--out", "gs://bucket/ref.npz"],
])
def test_local_only_outputs_refuse_a_url_before_any_work(argv, tmp_path, monkeypatch,
                                                         no_model_loading, capsys):
  """These commands write with local file APIs: a gs:// output is an error naming the way round,
  not a local folder named 'gs:'."""
  monkeypatch.chdir(tmp_path)
  assert cli.main(argv) == 2
  err = _error(capsys)
  assert "gs://bucket/" in err and "writes to local disk only" in err and "gsutil" in err, err
  assert list(tmp_path.iterdir()) == []


def test_train_workdir_that_is_a_file_fails_before_training(tmp_path, capsys):
  f = tmp_path / "workdir"
  f.write_text("")
  assert cli.main(["train", "--config", "var_tiny", "--workdir", str(f)]) == 2
  assert f"--workdir {f} is a file; give a directory." in _error(capsys)
  assert not (tmp_path / "workdir.orbax-checkpoint-tmp").exists()


def test_shipped_config_by_name_from_anywhere(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  expected = REPO / "configs" / "var_tiny.py"
  for name in ("var_tiny", "var_tiny.py", "configs/var_tiny.py"):
    assert pathlib.Path(config_lib.resolve_config_path(name)).samefile(expected), name
  config = config_lib.load_config_file("var_tiny:steps=3", ["--config.seed=7"])
  assert config.total_steps == 3 and config.seed == 7


def test_a_local_file_wins_over_the_shipped_config_of_that_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "configs").mkdir()
  own = tmp_path / "configs" / "var_tiny.py"
  own.write_text((REPO / "configs" / "var_tiny.py").read_text())
  assert os.path.samefile(config_lib.resolve_config_path("configs/var_tiny.py"), own)


def test_unknown_config_name_lists_the_shipped_ones():
  with pytest.raises(ConfigError, match=r"no such config file.*shipped: .*var_d16.*var_tiny"):
    config_lib.resolve_config_path("var_d17")


def test_train_bad_override_exits_2_with_usage(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["train", "--config", "var_tiny", "--workdir", "/tmp/unused", "--config.no_such_field=1"])
  assert exit_info.value.code == 2
  err = _error(capsys)
  assert "usage: var-jax train" in err and "no_such_field" in err


def test_shown_paths_are_absolute_and_normalised(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert common.shown("a/../b/./c.png") == str(tmp_path / "b" / "c.png")
  assert common.shown("gs://bucket/x/../y") == "gs://bucket/x/../y"
