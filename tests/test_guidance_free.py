"""Guidance-free fine-tuning (CCA): the objective against the paper's formula, the step on a mesh
starting from a converted model held frozen as the reference, config errors, the AOT program."""
import json
import math

import jax
import numpy as np
import pytest

import helpers
from var_jax import aot
from var_jax.errors import ConfigError
from var_jax.inference.pretrained import convert_files, save_converted
from var_jax.train import guidance_free, train_var


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _paper_loss(gap_pos, gap_neg, neg_is_pos, beta, lam, uncond_ratio):
  """The CCA loss written out per pair in float64 (thu-ml/CCA's VAR trainer)."""
  B = len(gap_pos)
  pos = -sum(_log_sigmoid(beta * g) for g in gap_pos) / B
  if uncond_ratio == 0:
    return pos - lam * sum(_log_sigmoid(-beta * g) for g in gap_neg) / B
  neg = 0.0
  for g, flip in zip(gap_neg, neg_is_pos):
    neg -= (1.0 if flip else lam) * _log_sigmoid((1.0 if flip else -1.0) * beta * g)
  return (pos + neg / B) / max(lam, 1.0)


@pytest.mark.parametrize("uncond_ratio", [0.0, 0.1])
def test_cca_loss_is_the_papers_formula(uncond_ratio):
  rng = np.random.default_rng(0)
  gap_pos, gap_neg = rng.normal(0, 40, 8), rng.normal(0, 40, 8)
  neg_is_pos = np.array([0, 1, 0, 0, 1, 0, 0, 0], bool)
  got = guidance_free.cca_loss(gap_pos, gap_neg, neg_is_pos, beta=0.02, lambda_=50.0,
                               uncond_ratio=uncond_ratio)
  want = _paper_loss(gap_pos, gap_neg, neg_is_pos, 0.02, 50.0, uncond_ratio)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_negatives_are_the_next_images_class():
  np.testing.assert_array_equal(guidance_free.negative_labels(np.array([3, 1, 4, 1])), [1, 4, 1, 3])


def test_sequence_log_likelihood_sums_the_targets_log_probabilities():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = [sum(logp[b, t, targets[b, t]] for t in range(5)) for b in range(2)]
  np.testing.assert_allclose(guidance_free.sequence_log_likelihood(logits, targets), want, rtol=1e-5)


# -- the step on the official tiny fixture -------------------------------------------------------

@pytest.fixture(name="reference_dir", scope="module")
def fixture_reference_dir(tmp_path_factory):
  model = convert_files(helpers.FIXTURES / "official_tiny_vae.pth",
                        helpers.FIXTURES / "official_tiny_seed0_var.pth", patch_nums=helpers.PATCH_NUMS)
  return str(save_converted(model, tmp_path_factory.mktemp("reference") / "tiny"))


def _cca_config(reference_dir, **updates):
  import importlib.util
  spec = importlib.util.spec_from_file_location("var_tiny", helpers.FIXTURES.parents[1] / "configs" / "var_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("steps=3,batch=8")
  m = helpers.model("tiny")
  config.model = dict(depth=m.config.depth, embed_dim=m.config.embed_dim,
                      num_heads=m.config.num_heads, num_classes=m.config.num_classes,
                      dtype="float32", remat_policy="none", attention_impl="auto",
                      drop_path_rate=0.0)
  config.tokenizer = dict(path=str(helpers.FIXTURES / "official_tiny_vae.pth"), overrides={})
  config.objective = "cca"
  config.cca.reference = reference_dir
  config.optim.tblr = 3e-3
  config.optim.warmup_steps = 0
  config.optim.ema_decay = 0.9  # the EMA starts as its own copy of the reference's weights
  config.mesh = [("data", 4), ("fsdp", 2), ("tensor", 1)]
  config.update(updates)
  return config


def test_cca_run_starts_at_the_reference(reference_dir, tmp_path):
  """`var-jax train` with objective=cca on a 4 x 2 (data x fsdp) mesh from the converted official
  tiny model: the first step's policy is the reference (zero gaps, the loss of zero gaps)."""
  config = _cca_config(reference_dir, total_steps=2)
  config.tokenizer.path = ""  # none named: the reference's
  train_var.train(config, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  first, last = rows[0], rows[-1]
  assert first["step"] == 1 and last["step"] == 2
  assert abs(first["gap_positive"]) < 1e-3 and abs(first["gap_negative"]) < 1e-3
  # Zero gaps: every log-sigmoid is log(1/2), so loss = log 2 (1 + mean weight) / lambda with
  # each negative's weight 1 (null-class or same-class pairs) or lambda.
  lam = config.cca.lambda_
  assert math.log(2) * 2 / lam - 1e-6 <= first["loss"] <= math.log(2) * (1 + lam) / lam + 1e-6
  assert last["gap_positive"] != 0.0 and np.isfinite(last["loss"])
  # The run loads as a model, on the reference's tokenizer.
  from var_jax.inference.pretrained import load_pretrained
  from var_jax.inference.sampler import same_tokenizer
  tuned = load_pretrained(str(tmp_path))
  assert same_tokenizer(tuned.tokenizer, helpers.tokenizer())
  assert not np.array_equal(np.asarray(tuned.params["head"]["kernel"]),
                            np.asarray(helpers.model("tiny").params["head"]["kernel"]))


def test_cca_steps_on_one_batch_separate_positive_from_negative_pairs(reference_dir):
  """The jitted CCA step, repeated on one batch on a 4 x 2 mesh: the loss falls and the positive
  pairs' likelihood gap rises above the negative pairs'."""
  import flax.linen as nn
  from var_jax.data.pipeline import make_input_iterator
  from var_jax.parallel import sharding
  config = _cca_config(reference_dir, global_batch_size=16)
  config.cca.uncond_ratio = 0.0
  task, _ = train_var.build_task(config)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
  rules = sharding.logical_axis_rules(None, mesh)
  state, shardings = sharding.init_sharded(task.init_state, jax.random.key(0), mesh, rules)
  _, params = task.initial_params(None)
  state = state.replace(params=jax.device_put(params, shardings.params))
  frozen_sh = task.frozen_shardings(task.frozen, shardings)
  frozen = jax.device_put(task.frozen, frozen_sh)
  local = next(make_input_iterator(config.data, global_batch=16, seed=0, **task.data_kwargs))
  batch = sharding.make_global_batch(local, mesh)
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jax.jit(task.train_step, in_shardings=(shardings, sharding.batch_sharding(mesh),
                                                  frozen_sh, repl), out_shardings=(shardings, repl))
    history = []
    for _ in range(6):
      state, metrics = step(state, batch, frozen, jax.random.key(1))
      history.append({k: float(v) for k, v in metrics.items()})
  first, last = history[0], history[-1]
  assert abs(first["gap_positive"]) < 1e-3
  assert last["loss"] < first["loss"]
  assert last["gap_positive"] - last["gap_negative"] > 0.5, history
  assert last["pair_accuracy"] > 0.5


def test_cca_reference_is_split_like_the_policy(reference_dir):
  config = _cca_config(reference_dir)
  task, _ = train_var.build_task(config)
  assert set(task.frozen) == {"vae", "reference"}
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
  from var_jax.parallel import sharding
  rules = sharding.logical_axis_rules(None, mesh)
  _, boxed = sharding.abstract_sharded_state(task.init_state, jax.random.key(0), mesh, rules)
  import flax.linen as nn
  state_shardings = nn.unbox(boxed)
  frozen = task.frozen_shardings(task.frozen, state_shardings)
  assert frozen["reference"] is state_shardings.params
  qkv = frozen["reference"]["blocks"]["attn"]["mat_qkv"]
  assert "fsdp" in str(qkv.spec)  # split over fsdp, as the policy's
  # The policy starts from the reference's weights.
  _, params = task.initial_params(None)
  want = helpers.model("tiny").params
  np.testing.assert_array_equal(params["head"]["kernel"], np.asarray(want["head"]["kernel"]))


@pytest.mark.parametrize("updates, message", [
    (dict(objective="dpo"), "config.objective must be one of"),
    (dict(init_from="/somewhere"), "config.init_from and config.objective='cca' both set"),
])
def test_bad_cca_configs_are_refused(reference_dir, updates, message):
  with pytest.raises(ConfigError, match=message):
    train_var.build_task(_cca_config(reference_dir, **updates))


@pytest.mark.parametrize("field, value, message", [
    ("reference", "", "config.cca.reference must name the model"),
    ("beta", 0.0, "config.cca.beta must be a number > 0"),
    ("uncond_ratio", 1.0, r"config.cca.uncond_ratio must be in \[0, 1\)"),
])
def test_bad_cca_fields_are_refused(reference_dir, field, value, message):
  config = _cca_config(reference_dir)
  config.cca[field] = value
  with pytest.raises(ConfigError, match=message):
    train_var.build_task(config)


def test_reference_of_another_architecture_is_refused(reference_dir):
  config = _cca_config(reference_dir)
  config.model["depth"] = 3
  with pytest.raises(ConfigError, match="is not this run's model|does not have this run's model"):
    train_var.build_task(config)


@pytest.mark.slow  # ~1 min on 2 cores: a TPU compile (run by hand: pytest -m slow)
def test_cca_step_compiles_for_a_tpu_slice_with_the_reference_beside_the_policy(reference_dir):
  """The CCA train step, AOT for v5e:2x2 through aot.compile_train_step (the loop's program): it
  takes the frozen reference as an argument of the params' shapes, not donated (the state is),
  and counts the policy's and the reference's passes in its model FLOPs."""
  from var_jax.models import flops
  config = _cca_config(reference_dir)
  config.mesh = [("data", 2), ("fsdp", 2), ("tensor", 1)]
  program = aot.compile_train_step(config, aot.topology_mesh("v5e:2x2", config.mesh))
  (state, _, frozen, _), _ = program.compiled.args_info
  shapes = lambda tree: [tuple(a.shape) for a in jax.tree.leaves(tree)]
  assert set(frozen) == {"vae", "reference"}
  assert shapes(frozen["reference"]) == shapes(state.params)
  assert all(a.donated for a in jax.tree.leaves(state))
  assert not any(a.donated for a in jax.tree.leaves(frozen))
  var_cfg = program.var_config
  assert program.model_flops == pytest.approx(
      flops.flops_per_example(var_cfg) * 8 / 3 * config.global_batch_size)
