"""From a training run to a model: `var-jax train` -> `var-jax export` -> `load_pretrained` /
`var-jax sample`, a tokenizer run exported and trained on, and the errors.

Expected weights are read from the run's Orbax checkpoint directly (a full restore of the step's
state), not through var-jax's loaders.
"""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from var_jax import cli
from var_jax.errors import CheckpointError, InputError
from var_jax.inference.pretrained import load_pretrained


def _saved_state(workdir, step):
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(workdir / "checkpoints" / str(step) / "state")


def _assert_trees_equal(got, want):
  got, want = jax.tree.leaves_with_path(got), dict(jax.tree.leaves_with_path(want))
  assert len(got) == len(want)
  for path, leaf in got:
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want[path]), err_msg=str(path))


@pytest.fixture(scope="module")
def var_run(tmp_path_factory):
  """A 3-step tiny VAR run with EMA, checkpoints at steps 2 and 3."""
  workdir = tmp_path_factory.mktemp("var_run")
  assert cli.main(["train", "--config", "var_tiny:steps=3,batch=8", "--workdir", str(workdir),
                   "--config.optim.ema_decay=0.9", "--config.checkpoint_every=2",
                   "--noconfig.async_checkpointing"]) == 0
  return workdir


def test_export_writes_the_ema_weights_that_load_and_sample(var_run, tmp_path, capsys):
  out = tmp_path / "model"
  assert cli.main(["export", "--workdir", str(var_run), "--out", str(out)]) == 0
  assert "step 3 (ema_params)" in capsys.readouterr().out
  state = _saved_state(var_run, 3)
  exported = load_pretrained(str(out))
  _assert_trees_equal(exported.params, state["ema_params"])
  # The raw params differ from the EMA ones, and --no-ema / --step pick them.
  assert cli.main(["export", "--workdir", str(var_run), "--out", str(tmp_path / "raw2"),
                   "--step", "2", "--no-ema"]) == 0
  _assert_trees_equal(load_pretrained(str(tmp_path / "raw2")).params, _saved_state(var_run, 2)["params"])
  # The workdir itself loads: the latest step's EMA weights, the same tokenizer.
  direct = load_pretrained(str(var_run))
  _assert_trees_equal(direct.params, state["ema_params"])
  _assert_trees_equal(direct.tokenizer.params, exported.tokenizer.params)
  _assert_trees_equal(load_pretrained(str(var_run), step=2, use_ema=False).params,
                      _saved_state(var_run, 2)["params"])
  with pytest.raises(InputError, match="training workdir only"):
    load_pretrained(str(out), step=2)
  assert cli.main(["sample", "--model", str(out), "--classes", "1,2", "--per-class", "1",
                   "--out", str(tmp_path / "grid.png")]) == 0
  assert (tmp_path / "grid.png").stat().st_size > 0


def test_export_errors_are_clear_and_overwrite_nothing(var_run, tmp_path, capsys):
  def fails(args, message):
    capsys.readouterr()
    assert cli.main(["export", *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err

  fails(["--workdir", str(var_run), "--out", str(tmp_path / "x"), "--step", "7"],
        "has no checkpoint of step 7; it has steps 1, 2, 3")
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text((var_run / "config.json").read_text())
  fails(["--workdir", str(empty), "--out", str(tmp_path / "x")], "holds no checkpoint")
  fails(["--workdir", str(tmp_path), "--out", str(tmp_path / "x")], "is not a training run")
  # A VAR run whose tokenizer is gone.
  orphan = tmp_path / "orphan"
  shutil.copytree(var_run, orphan)
  config = json.loads((orphan / "config.json").read_text())
  config["tokenizer"]["path"] = str(tmp_path / "deleted_tokenizer")
  (orphan / "config.json").write_text(json.dumps(config))
  fails(["--workdir", str(orphan), "--out", str(tmp_path / "x")], "tokenizer of the run")
  with pytest.raises(CheckpointError, match="deleted_tokenizer"):
    load_pretrained(str(orphan))
  # An --out that holds a model is left as it is.
  out = tmp_path / "model"
  assert cli.main(["export", "--workdir", str(var_run), "--out", str(out)]) == 0
  before = (out / "config.json").read_bytes()
  fails(["--workdir", str(var_run), "--out", str(out)], "already holds a model")
  assert (out / "config.json").read_bytes() == before
  assert not (tmp_path / "x").exists()


def test_a_tokenizer_run_exports_to_a_tokenizer_path_var_training_takes(tmp_path, capsys):
  """The fast version of the slow test below: a tokenizer run's workdir as its trainer lays it out
  (config.json; a checkpoint of its train state's structure, filled with random numbers so the EMA
  weights differ from the params), without the training (initialising the VQVAE alone takes ~20 s
  on CPU)."""
  from var_jax.train import checkpointing, config_lib, train_var, train_vqvae
  tok_run = tmp_path / "tok_run"
  config = config_lib.load_config_file("vqvae_tiny:steps=2,batch=8")
  tok_run.mkdir()
  (tok_run / "config.json").write_text(config.to_json_best_effort(indent=2))
  rng = np.random.default_rng(0)

  def fill(leaf):
    if np.issubdtype(leaf.dtype, np.floating):
      return jax.numpy.asarray(rng.standard_normal(leaf.shape, np.float32).astype(leaf.dtype))
    return jax.numpy.zeros(leaf.shape, leaf.dtype)
  state = jax.tree.map(fill, jax.eval_shape(train_vqvae.build_task(config).init_state,
                                            jax.random.key(0)))
  assert state.ema_params is not None
  with checkpointing.Checkpointer(tok_run) as ckpt:
    ckpt.save(1, state, force=True)
  tok_dir = tmp_path / "tokenizer"
  assert cli.main(["export", "--workdir", str(tok_run), "--out", str(tok_dir),
                   "--storage-dtype", "bfloat16"]) == 0
  assert "tokenizer of step 1 (ema_params)" in capsys.readouterr().out
  want = _saved_state(tok_run, 1)["ema_params"]
  var_config = config_lib.load_config_file("var_tiny", [f"--config.tokenizer.path={tok_dir}",
                                                        "--config.patch_nums=(1,2,4,8)"])
  vae_cfg, params = train_var.load_tokenizer(var_config)  # what `var-jax train` builds its step on
  assert vae_cfg.vocab_size == 64 and vae_cfg.patch_nums == (1, 2, 4, 8)
  bf16 = jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16).astype(np.float32), want)
  _assert_trees_equal(params, bf16)
  with pytest.raises(InputError, match="holds a tokenizer alone"):
    load_pretrained(str(tok_dir))
  with pytest.raises(InputError, match="tokenizer training run"):
    load_pretrained(str(tok_run))


@pytest.mark.slow  # ~2 min: a tokenizer run and a VAR run on it (run by hand: pytest -m slow)
def test_a_tokenizer_run_exports_to_what_var_training_takes(tmp_path, capsys):
  tok_run = tmp_path / "tok_run"
  assert cli.main(["train-tokenizer", "--config", "vqvae_tiny:steps=2,batch=8", "--workdir",
                   str(tok_run), "--noconfig.async_checkpointing"]) == 0
  tok_dir = tmp_path / "tokenizer"
  assert cli.main(["export", "--workdir", str(tok_run), "--out", str(tok_dir)]) == 0
  state = _saved_state(tok_run, 2)
  key = "ema_params" if state.get("ema_params") else "params"
  from var_jax.inference.model_dirs import load_tokenizer_dir
  _assert_trees_equal(load_tokenizer_dir(tok_dir).params, state[key])
  with pytest.raises(InputError, match="holds a tokenizer alone"):
    load_pretrained(str(tok_dir))
  with pytest.raises(InputError, match="tokenizer training run"):
    load_pretrained(str(tok_run))
  var_run = tmp_path / "var_on_it"
  assert cli.main(["train", "--config", "var_tiny:steps=2,batch=8", "--workdir", str(var_run),
                   f"--config.tokenizer.path={tok_dir}", "--config.patch_nums=(1,2,4,8)",
                   "--config.data.image_size=32", "--noconfig.async_checkpointing"]) == 0
  model = load_pretrained(str(var_run))
  _assert_trees_equal(model.tokenizer.params, state[key])
