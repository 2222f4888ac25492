"""Mesh, logical rules, sharded init, global batches and the sharded train step on 8 CPU devices."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import toy_model
from var_jax.parallel import distributed, sharding
from var_jax.errors import ConfigError
from var_jax.train import optim

MESH_2x2x2 = [("data", -1), ("fsdp", 2), ("tensor", 2)]


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(MESH_2x2x2)


@pytest.fixture(scope="module")
def rules(mesh):
  return sharding.logical_axis_rules(mesh=mesh)


# -- mesh ---------------------------------------------------------------------------------------


def test_mesh_resolves_minus_one_and_uses_auto_axes(mesh):
  assert jax.device_count() == 8
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_default_mesh_is_pure_data_parallel():
  assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("bad, words", [
    ([("data", 3), ("fsdp", -1)], "does not divide"),
    ([("data", 2), ("fsdp", 2)], "needs 4 devices but 8"),
    ([("data", -1), ("fsdp", -1)], "more than one -1"),
    ([("data", -1), ("data", 2)], "repeats"),
    ([("data", 0)], "positive int"),
    ([("data",)], "(axis_name, size) pairs"),
    (["da"], "(axis_name, size) pairs"),
])
def test_mesh_errors_say_what_is_wrong(bad, words):
  with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
    sharding.make_mesh(bad)


@dataclasses.dataclass(frozen=True)
class _SliceDevice:
  """A CPU device that claims to sit in TPU slice `slice_index` (for the multislice layout)."""
  device: object
  slice_index: int

  def __getattr__(self, name):
    return getattr(self.device, name)


def test_multislice_grid_puts_slices_on_the_dcn_axis():
  devices = [_SliceDevice(d, d.id // 4) for d in jax.devices()]
  grid, names = sharding.make_device_grid(
      [("data", -1), ("fsdp", 2)], devices, dcn_mesh_config=[("data", -1)])
  assert names == ("data", "fsdp")
  assert grid.shape == (4, 2)  # data = 2 per slice x 2 slices
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)
  np.testing.assert_array_equal(slice_of, [[0, 0], [0, 0], [1, 1], [1, 1]])


def test_multislice_without_dcn_config_is_refused():
  devices = [_SliceDevice(d, d.id // 4) for d in jax.devices()]
  with pytest.raises(ConfigError, match="span 2 TPU slices.*mesh_dcn"):
    sharding.make_device_grid([("data", -1)], devices)


def test_dcn_config_must_match_the_slice_count():
  with pytest.raises(ConfigError, match="needs 2 processes but 1"):
    sharding.make_mesh([("data", -1)], dcn_mesh_config=[("data", 2)])


# -- rules --------------------------------------------------------------------------------------


def test_rules_overrides_replace_in_place_and_normalise_lists(mesh):
  rules = sharding.logical_axis_rules({"embed": None, "mlp": ["fsdp", "tensor"], "extra": "data"},
                                      mesh=mesh)
  as_dict = dict(rules)
  assert as_dict["embed"] is None and as_dict["mlp"] == ("fsdp", "tensor")
  assert [name for name, _ in rules][:4] == ["batch", "embed", "vae_embed", "mlp"]
  assert rules[-1] == ("extra", "data")


def test_rules_refuse_unknown_mesh_axes():
  small = sharding.make_mesh([("data", -1)])
  with pytest.raises(ConfigError, match="'fsdp'.*config.mesh"):
    sharding.logical_axis_rules(mesh=small)


def test_activation_rules_do_not_reuse_a_mesh_axis(mesh, rules):
  with nn.logical_axis_rules(rules):
    spec = nn.logical_to_mesh_axes(("batch", "length", "embed"))
  assert spec == P(("data", "fsdp"), None, None)


# -- sharded init -------------------------------------------------------------------------------


def _toy_setup(**optim_overrides):
  model = toy_model.ToyModel()
  opt = optim.make_optimizer(toy_model.optimizer_config(**optim_overrides), global_batch_size=8,
                             total_steps=10)
  return model, opt, toy_model.make_init_fn(model, opt.tx)


def test_params_and_optimizer_state_land_with_the_expected_shardings(mesh, rules):
  _, _, init_fn = _toy_setup()
  state, shardings = sharding.init_sharded(init_fn, jax.random.key(0), mesh, rules)
  expected = {
      "embedding": P("tensor", "fsdp"),
      "blocks": {"fc1": {"kernel": P(None, "fsdp", "tensor"), "bias": P(None, "tensor")},
                 "fc2": {"kernel": P(None, "tensor", "fsdp"), "bias": P(None, "fsdp")}},
      "head": {"kernel": P("fsdp", "tensor"), "bias": P("tensor")},
  }
  assert jax.tree.map(lambda x: x.sharding.spec, state.params) == expected
  assert jax.tree.map(lambda s: s.spec, shardings.params) == expected
  mu = optax.tree_utils.tree_get(state.opt_state, "mu")
  assert jax.tree.map(lambda x: x.sharding.spec, mu) == expected
  assert state.step.sharding.spec == P()
  # Every device holds only its shard: (16, 8) embedding split 2 x 2 -> (8, 4) per device.
  assert state.params["embedding"].addressable_shards[0].data.shape == (8, 4)


def test_abstract_state_matches_real_init(mesh, rules):
  _, _, init_fn = _toy_setup()
  abstract, _ = sharding.abstract_sharded_state(init_fn, jax.random.key(0), mesh, rules)
  state, _ = sharding.init_sharded(init_fn, jax.random.key(0), mesh, rules)
  jax.tree.map(lambda a, x: (a.shape == x.shape and a.sharding == x.sharding) or pytest.fail(
      f"{a} vs {x.shape} {x.sharding}"), abstract, state)


def test_sharded_init_equals_unsharded_init(mesh, rules):
  _, _, init_fn = _toy_setup()
  state, _ = sharding.init_sharded(init_fn, jax.random.key(0), mesh, rules)
  plain = nn.unbox(jax.jit(init_fn)(jax.random.key(0)))
  jax.tree.map(np.testing.assert_array_equal, state.params, plain.params)


# -- global batches -----------------------------------------------------------------------------


def test_global_batch_is_split_over_the_batch_axes(mesh):
  local = {"tokens": np.arange(8 * 6, dtype=np.int32).reshape(8, 6), "labels": np.arange(8)}
  batch = sharding.make_global_batch(local, mesh)
  assert batch["tokens"].shape == (8, 6)
  assert batch["tokens"].sharding == NamedSharding(mesh, P(("data", "fsdp")))
  np.testing.assert_array_equal(np.asarray(batch["tokens"]), local["tokens"])
  # 4 batch shards, each replicated over "tensor": a device holds 2 rows.
  assert batch["labels"].addressable_shards[0].data.shape == (2,)


def test_global_batch_must_split_evenly(mesh):
  with pytest.raises(ConfigError, match=r"global batch of 6.*4 batch shards"):
    sharding.make_global_batch({"x": np.zeros((6, 2))}, mesh)


# -- sharding report ----------------------------------------------------------------------------


def test_sufficiently_sharded_params_pass(mesh, rules):
  _, _, init_fn = _toy_setup()
  state, _ = sharding.init_sharded(init_fn, jax.random.key(0), mesh, rules)
  report = sharding.assert_params_sufficiently_sharded(state.params, mesh)
  assert report.replicated_fraction == 0.0
  assert report.model_parallel_size == 4
  assert report.total_bytes == 4 * sum(x.size for x in jax.tree.leaves(state.params))


class _ReplicatedTable(nn.Module):
  @nn.compact
  def __call__(self, x):
    big = self.param("big", nn.with_logical_partitioning(nn.initializers.ones, ("norm", "norm2")),
                     (64, 64))
    small = self.param("small", nn.with_logical_partitioning(nn.initializers.ones,
                                                             ("embed", "mlp")), (8, 8))
    return x @ big[:8, :8] @ small


def test_mostly_replicated_params_fail_with_the_culprit_named(mesh):
  rules = sharding.logical_axis_rules({"norm2": None}, mesh=mesh)
  init_fn = lambda rng: _ReplicatedTable().init(rng, jnp.ones((1, 8)))["params"]
  params, _ = sharding.init_sharded(init_fn, jax.random.key(0), mesh, rules)
  with pytest.raises(ConfigError, match=r"98\.5% of the parameter bytes.*\['big'\]"):
    sharding.assert_params_sufficiently_sharded(params, mesh)
  # Pure data parallelism cannot shard parameters, so it is accepted.
  dp_mesh = sharding.make_mesh()
  dp_params, _ = sharding.init_sharded(
      init_fn, jax.random.key(0), dp_mesh, sharding.logical_axis_rules({"norm2": None}))
  assert sharding.assert_params_sufficiently_sharded(dp_params, dp_mesh).replicated_fraction == 1


def test_replicated_bytes_limit_applies_to_abstract_params_and_pure_data_parallelism(mesh):
  init_fn = lambda rng: _ReplicatedTable().init(rng, jnp.ones((1, 8)))["params"]
  rules = sharding.logical_axis_rules({"norm2": None}, mesh=mesh)
  abstract, _ = sharding.abstract_sharded_state(init_fn, jax.random.key(0), mesh, rules)
  assert isinstance(abstract["big"], jax.ShapeDtypeStruct)  # nothing allocated
  # 'big' (64 x 64 float32 = 16.4 kB) is replicated, 'small' is split over fsdp and tensor.
  report = sharding.assert_params_sufficiently_sharded(
      abstract, mesh, max_replicated_fraction=None, max_replicated_bytes=16384)
  assert report.replicated == (("['big']", 16384),)
  with pytest.raises(ConfigError, match=r"0\.00 GB.*\['big'\] \(16\.38 kB\).*To fix: shard it"):
    sharding.assert_params_sufficiently_sharded(
        abstract, mesh, max_replicated_fraction=None, max_replicated_bytes=16383,
        remedy="shard it")
  # Under pure data parallelism every parameter counts, 'small' too.
  dp_mesh = sharding.make_mesh()
  dp_abstract, _ = sharding.abstract_sharded_state(
      init_fn, jax.random.key(0), dp_mesh, sharding.logical_axis_rules({"norm2": None}))
  with pytest.raises(ConfigError, match=r"\['big'\] \(16\.38 kB\), \['small'\] \(256 B\)"):
    sharding.assert_params_sufficiently_sharded(dp_abstract, dp_mesh, max_replicated_bytes=16384)


# -- sharded train step -------------------------------------------------------------------------


def test_sharded_train_step_matches_unsharded(mesh, rules):
  """Three steps of the real optimizer: sharded over 2x2x2 vs one device, rtol 1e-5."""
  model, _, init_fn = _toy_setup(twde=0.2)
  train_step = toy_model.make_train_step(model)
  batches = [toy_model.make_batch(seed) for seed in range(3)]

  state, state_sh = sharding.init_sharded(init_fn, jax.random.key(1), mesh, rules)
  batch_sh = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    p_step = jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                     donate_argnums=0)
    sharded_losses = []
    for b in batches:
      state, metrics = p_step(state, sharding.make_global_batch(b, mesh))
      sharded_losses.append(float(metrics["loss"]))

  ref = nn.unbox(jax.jit(init_fn)(jax.random.key(1)))
  ref_step = jax.jit(train_step)
  ref_losses = []
  for b in batches:
    ref, ref_metrics = ref_step(ref, jax.tree.map(jnp.asarray, b))
    ref_losses.append(float(ref_metrics["loss"]))

  np.testing.assert_allclose(sharded_losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=1e-6), state.params, ref.params)
  assert jax.tree.map(lambda x: x.sharding, state.params) == state_sh.params
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(ref_metrics["grad_norm"]),
                             rtol=1e-5)


# -- distributed start-up -----------------------------------------------------------------------


@pytest.fixture
def init_calls(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  return calls


@pytest.mark.parametrize("environ, mode, aot, expect", [
    ({}, "auto", False, False),                                     # laptop / Colab CPU
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "auto", False, True),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, "auto", False, True),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "auto", False, True),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, "auto", False, False),
    ({"VAR_JAX_DISTRIBUTED": "1"}, "auto", False, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "auto", True, False),  # AOT never
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "off", False, False),
    ({}, "on", False, True),
])
def test_distributed_initialisation_is_env_gated(init_calls, environ, mode, aot, expect):
  did = distributed.maybe_initialize_distributed(mode, aot=aot, environ=environ,
                                              on_tpu_vm=lambda env: False)
  assert did is expect
  assert len(init_calls) == int(expect)


def test_distributed_initialises_on_a_tpu_vm_and_passes_explicit_args(init_calls):
  assert distributed.maybe_initialize_distributed(environ={}, on_tpu_vm=lambda env: True)
  distributed.maybe_initialize_distributed(
      "on", coordinator_address="h:1", num_processes=4, process_id=2, environ={})
  assert init_calls[1] == {"coordinator_address": "h:1", "num_processes": 4, "process_id": 2}


def test_distributed_mode_is_checked():
  with pytest.raises(ConfigError, match="'auto', 'on' or 'off'"):
    distributed.maybe_initialize_distributed("sometimes")
