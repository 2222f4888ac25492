"""The training loop with the toy model: failing hooks, and the replicated-params check at start."""
import json
import logging

import jax
import numpy as np
import pytest

import toy_model
from var_jax.train import config_lib
from var_jax.errors import ConfigError
from var_jax.train import loop


class _ToyData:
  """Stands in for the input pipeline: toy batches, a pure function of the step."""

  def __init__(self, start_step: int):
    self.step, self.stats = start_step, {}

  def __next__(self):
    self.step += 1
    return toy_model.make_batch(self.step)

  # The rest of the input iterator's protocol that the loop uses: its state goes into checkpoints.
  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = int(json.loads(state)["step"])

  def start_prefetch(self):
    pass

  def close(self):
    pass


@pytest.fixture(autouse=True)
def toy_data(monkeypatch):
  monkeypatch.setattr(loop, "make_input_iterator",
                      lambda data_config, *, start_step, **kwargs: _ToyData(start_step))


def _config(**overrides):
  config = config_lib.base_train_config()
  config.update(global_batch_size=8, total_steps=4, log_every=1, checkpoint_every=2,
                async_checkpointing=True)
  config.update(overrides)
  return config


def _task(hooks):
  model = toy_model.ToyModel()
  tx = toy_model.optim.make_optimizer(toy_model.optimizer_config(), global_batch_size=8,
                                      total_steps=4).tx
  step = toy_model.make_train_step(model)
  return loop.TrainTask(init_state=toy_model.make_init_fn(model, tx),
                        train_step=lambda state, batch, frozen, rng: step(state, batch),
                        frozen={}, tokens_per_example=6, hooks=hooks)


def _saved(workdir):
  path = workdir / "checkpoints"
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def _hooks(workdir, seen):
  def boom(state, step, wd):
    seen.append(("boom", step, step in _saved(workdir)))  # the step's checkpoint is on disk
    raise RuntimeError("the sample hook broke")

  def fine(state, step, wd):
    seen.append(("fine", step, step in _saved(workdir)))
    return {"eval_metric": float(step)}

  return {"boom": (2, boom), "fine": (2, fine)}


def test_a_raising_hook_is_logged_and_the_run_goes_on(tmp_path, caplog):
  seen = []
  with caplog.at_level(logging.ERROR):
    scalars = loop.run(_config(), tmp_path, _task(_hooks(tmp_path, seen)))
  assert {2, 4} <= set(_saved(tmp_path))
  assert seen == [("boom", 2, True), ("fine", 2, True), ("boom", 4, True), ("fine", 4, True)]
  failures = [r for r in caplog.records if "Hook 'boom' raised at step" in r.getMessage()]
  assert [("at step 2;" in r.getMessage(), "at step 4;" in r.getMessage()) for r in failures] == [
      (True, False), (False, True)]
  assert all(r.exc_info and "the sample hook broke" in str(r.exc_info[1]) for r in failures)
  assert np.isfinite(scalars["loss"]) and scalars["eval_metric"] == 4.0


def test_stop_on_hook_error_raises_after_the_checkpoint(tmp_path):
  seen = []
  with pytest.raises(RuntimeError, match="the sample hook broke"):
    loop.run(_config(stop_on_hook_error=True), tmp_path, _task(_hooks(tmp_path, seen)))
  assert max(_saved(tmp_path)) == 2
  assert seen == [("boom", 2, True)]
  # A rerun resumes after step 2 (the hook does not fail the same step again).
  seen.clear()
  loop.run(_config(), tmp_path, _task(_hooks(tmp_path, seen)))
  assert [(name, step) for name, step, _ in seen] == [("boom", 4), ("fine", 4)]


def test_too_many_replicated_params_fail_before_step_0(tmp_path):
  """Pure data parallelism replicates every toy param (~5 kB); a 1 kB limit refuses it."""
  config = _config(max_replicated_param_gb=1e-6)
  with pytest.raises(ConfigError, match=r"would hold 0\.0\d GB.*allowed 0\.00 GB.*"
                                        r"Largest replicated parameters: \['blocks'\]"):
    loop.run(config, tmp_path, _task({}))
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
  config.allow_replicated_params = True  # the opt-out
  config.total_steps = 1
  assert np.isfinite(loop.run(config, tmp_path, _task({}))["loss"])


@pytest.mark.parametrize("field, value", [("max_replicated_param_gb", 0.0),
                                          ("max_replicated_param_gb", "big"),
                                          ("stop_on_hook_error", "yes"),
                                          ("allow_replicated_params", 1)])
def test_bad_loop_fields_are_config_errors(field, value):
  config = _config()
  del config[field]  # ConfigDict keeps a field's type; the bad value gets a fresh field
  config[field] = value
  with pytest.raises(ConfigError, match=field):
    loop.validate_run_config(config)


def test_official_configs_pass_the_replicated_params_check():
  """d16 and d20 train pure data-parallel as the official recipe does; d24 (and up) with its
  recipe's mesh, fsdp over every chip."""
  from var_jax.models.var import VAR
  from var_jax.models.var_config import VARConfig
  from var_jax.parallel import sharding
  import jax.numpy as jnp
  mesh_dp = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  mesh_fsdp = sharding.make_mesh(config_lib.var_imagenet_config(24).mesh)
  assert dict(mesh_fsdp.shape) == {"data": 1, "fsdp": 8, "tensor": 1}  # the 8 CPU devices
  rules = lambda mesh: sharding.logical_axis_rules(None, mesh)

  def abstract_params(depth, mesh):
    cfg = VARConfig(depth=depth)
    init = lambda rng: VAR(cfg).init(rng, jnp.zeros((1,), jnp.int32),
                                     jnp.zeros((1, cfg.seq_len - 1, cfg.z_channels)))["params"]
    return sharding.abstract_sharded_state(init, jax.random.key(0), mesh, rules(mesh))[0]

  config = _config()
  for depth in (16, 20):
    report = loop.check_replicated_params(config, abstract_params(depth, mesh_dp), mesh_dp)
    assert report.replicated_fraction == 1.0
  with pytest.raises(ConfigError, match=r"would hold 4\.\d+ GB"):
    loop.check_replicated_params(config, abstract_params(24, mesh_dp), mesh_dp)
  report = loop.check_replicated_params(config, abstract_params(24, mesh_fsdp), mesh_fsdp)
  assert report.replicated_bytes < 0.01e9
