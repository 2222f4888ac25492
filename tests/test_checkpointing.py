"""Orbax checkpoints of a sharded train state: round trip, keep-N, errors, init_from, SIGTERM."""
import os
import signal

import flax.linen as nn
import jax
import numpy as np
import pytest

import toy_model
from var_jax.parallel import sharding
from var_jax.errors import CheckpointError, ConfigError
from var_jax.train import checkpointing, optim


@pytest.fixture(scope="module")
def setup():
  """Mesh 2x2x2, a toy state after one sharded train step, and its abstract form."""
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 2), ("tensor", 2)])
  rules = sharding.logical_axis_rules(mesh=mesh)
  model = toy_model.ToyModel()
  opt = optim.make_optimizer(toy_model.optimizer_config(), global_batch_size=8, total_steps=10)
  init_fn = toy_model.make_init_fn(model, opt.tx, with_ema=True)
  rng = jax.random.key(0)
  state, state_sh = sharding.init_sharded(init_fn, rng, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jax.jit(toy_model.make_train_step(model, ema_decay=0.5),
                   in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, None))
    state, _ = step(state, sharding.make_global_batch(toy_model.make_batch(0), mesh))
  abstract, _ = sharding.abstract_sharded_state(init_fn, rng, mesh, rules)
  return dict(mesh=mesh, rules=rules, init_fn=init_fn, rng=rng, state=state, abstract=abstract,
              fresh=lambda: sharding.init_sharded(init_fn, rng, mesh, rules)[0])


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def snapshot(directory):
  """{relative path: (size, mtime)} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
  return out


def test_round_trip_into_the_sharded_abstract_state(setup, tmp_path):
  state = setup["state"]
  with checkpointing.Checkpointer(tmp_path, save_interval_steps=1, config_hash="abc") as ckpt:
    assert ckpt.save(1, state, meta={"data_position": np.int64(123)})
  with checkpointing.Checkpointer(tmp_path, config_hash="abc") as ckpt:
    assert ckpt.latest_step() == 1
    restored, meta = ckpt.restore(setup["abstract"])
  assert meta == {"data_position": 123, "step": 1, "config_hash": "abc"}
  assert_trees_equal(restored, state)
  jax.tree.map(lambda x, a: (x.sharding == a.sharding) or pytest.fail(f"{x.sharding}"),
               restored, setup["abstract"])
  assert restored.params["embedding"].sharding.spec == jax.sharding.PartitionSpec(
      "tensor", "fsdp")


def test_async_saves_survive_donation_and_keep_the_newest_n(setup, tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=2,
                                    async_save=True)
  host_copies = {}
  for step in (1, 2, 3):
    state = jax.tree.map(lambda x, s=step: x + s, setup["state"])
    host_copies[step] = jax.tree.map(np.asarray, state)
    assert ckpt.save(step, state)
    # What donating `state` to the next train step does: its buffers are gone.
    jax.tree.map(lambda x: x.delete(), state)
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [2, 3]
  restored, meta = ckpt.restore(setup["abstract"], step=3)
  assert meta["step"] == 3
  assert_trees_equal(restored, host_copies[3])
  assert not ckpt.save(3, setup["state"], force=True)  # never overwrites a saved step
  ckpt.close()


def test_saves_follow_the_interval_unless_forced(setup, tmp_path):
  with checkpointing.Checkpointer(tmp_path, save_interval_steps=3) as ckpt:
    assert ckpt.save(3, setup["state"])
    assert not ckpt.save(4, setup["state"])
    assert ckpt.save(5, setup["state"], force=True)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3, 5]


def test_mismatched_checkpoint_gives_a_clear_error_and_stays_intact(setup, tmp_path):
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, setup["state"], force=True)
  before = snapshot(tmp_path)
  smaller = toy_model.ToyModel(mlp=16)
  opt = optim.make_optimizer(toy_model.optimizer_config(), global_batch_size=8, total_steps=10)
  abstract, _ = sharding.abstract_sharded_state(
      toy_model.make_init_fn(smaller, opt.tx, with_ema=True), setup["rng"], setup["mesh"],
      setup["rules"])
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError) as err:
      ckpt.restore_or_init(abstract, init_fn=lambda: pytest.fail("must not fall back"))
  message = str(err.value)
  assert "params/blocks/fc1/kernel: saved shape (2, 8, 32), model expects (2, 8, 16)" in message
  assert str(tmp_path / "checkpoints") in message and "left untouched" in message
  assert snapshot(tmp_path) == before
  with checkpointing.Checkpointer(tmp_path) as ckpt:  # the right config still restores it
    assert_trees_equal(ckpt.restore(setup["abstract"])[0], setup["state"])


def test_structure_mismatch_names_the_missing_entries(setup, tmp_path):
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, setup["state"], force=True)
    other = optim.make_optimizer(toy_model.optimizer_config(grad_accum_steps=2),
                                 global_batch_size=8, total_steps=10)
    abstract, _ = sharding.abstract_sharded_state(
        toy_model.make_init_fn(toy_model.ToyModel(), other.tx, with_ema=True), setup["rng"],
        setup["mesh"], setup["rules"])
    with pytest.raises(CheckpointError, match=r"opt_state/acc_grads/embedding: expected"):
      ckpt.restore(abstract)


# tensorstore's reader threads complain about the closed event loop after the failed read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_gives_a_clear_error_and_is_not_deleted(setup, tmp_path):
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, setup["state"], force=True)
  manifest = tmp_path / "checkpoints" / "1" / "state" / "manifest.ocdbt"
  manifest.write_bytes(b"not a manifest")
  before = snapshot(tmp_path)
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match=r"step 1 in .*checkpoints.*Nothing was changed"):
      ckpt.restore(setup["abstract"])
  assert snapshot(tmp_path) == before


def test_restore_order_resume_then_init_from_then_fresh(setup, tmp_path):
  first, second = tmp_path / "first", tmp_path / "second"
  with checkpointing.Checkpointer(first) as ckpt:
    fresh = ckpt.restore_or_init(setup["abstract"], setup["fresh"])
    assert (fresh.source, fresh.step, fresh.meta) == ("fresh", None, {})
    ckpt.save(4, setup["state"], meta={"data_position": 9}, force=True)
  with checkpointing.Checkpointer(first) as ckpt:
    resumed = ckpt.restore_or_init(setup["abstract"], setup["fresh"], init_from=second)
    assert (resumed.source, resumed.step, resumed.meta["data_position"]) == ("resume", 4, 9)
  with checkpointing.Checkpointer(second) as ckpt:
    warm = ckpt.restore_or_init(setup["abstract"], setup["fresh"], init_from=first)
  assert (warm.source, warm.step) == ("init_from", 4)
  assert_trees_equal(warm.state.params, setup["state"].params)
  assert_trees_equal(warm.state.ema_params, setup["state"].params)
  assert int(warm.state.step) == 0  # optimizer state and step start fresh
  mu = jax.tree.leaves(warm.state.opt_state)
  assert all(float(np.abs(np.asarray(x)).max()) == 0 for x in mu if np.ndim(x) > 1)
  assert warm.state.params["head"]["kernel"].sharding == setup["abstract"].params["head"][
      "kernel"].sharding


def test_init_from_errors(setup, tmp_path):
  with pytest.raises(CheckpointError, match="holds no checkpoint"):
    checkpointing.restore_params(tmp_path, setup["abstract"].params)
  with checkpointing.Checkpointer(tmp_path / "src") as ckpt:
    ckpt.save(2, setup["state"], force=True)
  bigger = toy_model.ToyModel(embed=16)
  params = jax.eval_shape(lambda r: nn.unbox(bigger.init(r, np.zeros((1, 6), np.int32))),
                          setup["rng"])["params"]
  with pytest.raises(CheckpointError, match=r"embedding: saved shape \(16, 8\), model expects"):
    checkpointing.restore_params(tmp_path / "src" / "checkpoints" / "2", params)


def test_sigterm_sets_the_flag_and_the_preemption_path_saves(setup, tmp_path):
  previous = signal.getsignal(signal.SIGTERM)
  ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=100, handle_sigterm=True)
  try:
    assert signal.getsignal(signal.SIGTERM) == ckpt._on_sigterm  # pylint: disable=protected-access
    assert not ckpt.should_stop_and_save(7)
    os.kill(os.getpid(), signal.SIGTERM)
    assert ckpt.sigterm_received
    assert ckpt.should_stop_and_save(7)
    ckpt.save_now(7, setup["state"], meta={"data_position": 70})
    assert ckpt.latest_step() == 7
    assert (tmp_path / "checkpoints" / "7" / "state").is_dir()
  finally:
    ckpt.close()
  assert signal.getsignal(signal.SIGTERM) == previous
  with checkpointing.Checkpointer(tmp_path) as again:
    state, meta = again.restore(setup["abstract"])
  assert meta["data_position"] == 70
  assert_trees_equal(state, setup["state"])


def test_config_hash_is_stable_and_sensitive():
  config = optim.default_config()
  same = optim.default_config()
  assert checkpointing.config_hash(config) == checkpointing.config_hash(same)
  same.tblr = 2e-4
  assert checkpointing.config_hash(config) != checkpointing.config_hash(same)


def test_bad_manager_options_are_config_errors(tmp_path):
  with pytest.raises(ConfigError, match="save_interval_steps"):
    checkpointing.Checkpointer(tmp_path, save_interval_steps=0)
  with pytest.raises(ConfigError, match="max_to_keep"):
    checkpointing.Checkpointer(tmp_path, max_to_keep=0)
  assert not (tmp_path / "checkpoints").exists()
