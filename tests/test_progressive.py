"""Progressive training (VAR_SPEC §5.4): the stage schedule, the truncated forward, the stage loss,
a short staged run, and the config checks."""
import dataclasses
import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.models import flops
from var_jax.errors import ConfigError
from var_jax.models.var import VAR
from var_jax.models.var_config import VARConfig
from var_jax.train import loop, progressive, train_var

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "var_tiny.py"
PATCH_NUMS = (1, 2, 3, 4)  # ends of the stages: 1, 5, 14, 30


def _tiny_config(arg: str = "steps=6,batch=8", **progressive_fields):
  spec = importlib.util.spec_from_file_location("var_tiny", TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.progressive.update(progressive_fields)
  return config


# -- the schedule ---------------------------------------------------------------------------------

# K = 10, pg0 = 4, pg = 0.5 of max_it = 1000, LR warm-up 20 steps, stage warm-up 10 steps. Past
# the warm-up, prog_si = 4 + round(5 (g - 20) / 480). The rounding of 0.5, 1.5, 2.5, 3.5, 4.5 (at
# g = 68, 164, 260, 356, 452) is Python's, halves to even: 0, 2, 2, 4, 4.
OFFICIAL_LIKE = progressive.Schedule(pg=0.5, pg0=4, num_scales=10, warmup_it=20, max_it=1000,
                                     pgwp_it=10)
HAND_TABLE = [
    # step, prog_si, prog_wp
    (0, 4, 1.0),      # first stage: no loss warm-up
    (20, 4, 1.0),     # g <= warm-up
    (21, 4, 1.0),     # 5/480 rounds to 0
    (68, 4, 1.0),     # 5 * 48/480 = 0.5 rounds to 0
    (69, 5, 0.1),     # 0.51 -> 1; first step of stage 5: prog_it = 1, 1/10
    (70, 5, 0.2),
    (78, 5, 1.0),     # prog_it = 10
    (163, 5, 1.0),    # 5 * 143/480 = 1.49 -> 1
    (164, 6, 0.1),    # 1.5 -> 2: the stage starts over its warm-up
    (260, 6, 1.0),    # 2.5 -> 2
    (261, 7, 0.1),    # 2.51 -> 3
    (356, 8, 0.1),    # 3.5 -> 4
    (452, 8, 1.0),    # 4.5 -> 4
    (453, 9, 1.0),    # 4.51 -> 5: the last stage, all scales, plain loss
    (499, 9, 1.0),
    (500, 9, 1.0),    # g >= pg * max_it
    (999, 9, 1.0),
]


@pytest.mark.parametrize("step,prog_si,prog_wp", HAND_TABLE)
def test_schedule_hand_table(step, prog_si, prog_wp):
  si, wp = OFFICIAL_LIKE(step)
  assert si == prog_si
  assert wp == pytest.approx(prog_wp)


def test_schedule_stage_starts_and_floor():
  assert OFFICIAL_LIKE.stage_start(70) == 69
  assert OFFICIAL_LIKE.stage_start(170) == 164
  assert OFFICIAL_LIKE.stage_start(50) == 0
  slow = dataclasses.replace(OFFICIAL_LIKE, pgwp_it=1000)
  assert slow.prog_wp(69) == 0.01  # 1/1000, floored at 0.01
  assert slow.prog_wp(69 + 19) == pytest.approx(0.02)


def test_schedule_matches_the_official_counters():
  """The official trainer counts prog_it and a first-stage flag across iterations; the pure
  function must give the same prog_wp at every step."""
  sched = dataclasses.replace(OFFICIAL_LIKE, pgwp_it=7.5)
  last_si, prog_it, first = -1, 0, True
  for step in range(1000):
    si = sched.stage(step)
    if si != last_si:
      first = first and last_si == -1
      last_si, prog_it = si, 0
    prog_it += 1
    expected = 1.0 if first or si == 9 else max(min(prog_it / 7.5, 1), 0.01)
    assert sched.prog_wp(step) == expected, step


def test_schedule_off_and_from_config():
  off = progressive.Schedule.from_config(None, num_scales=10, warmup_it=20, max_it=1000)
  assert not off.enabled and off(0) == (9, 1.0) and off(999) == (9, 1.0)
  cfg = progressive.default_config()
  cfg.update(pg=0.5, pg0=2)
  on = progressive.Schedule.from_config(cfg, num_scales=10, warmup_it=20, max_it=3000)
  assert on.pgwp_it == 10  # pgwp = 0: the official ep/300, 1/300 of the run
  assert on(0) == (2, 1.0)


@pytest.mark.parametrize("field,value,match", [
    ("pg", 1.5, r"pg must be in \[0, 1\]"),
    ("pg", -0.1, r"pg must be in \[0, 1\]"),
    ("pg0", 4, r"pg0 must be an int in \[0, 3\]"),
    ("pg0", -1, r"pg0 must be an int in \[0, 3\]"),
    ("pgwp", -1.0, r"pgwp must be >= 0"),
    ("pg", 1.0, r"lin_schedule=False"),
])
def test_bad_values_raise_config_error(field, value, match):
  cfg = progressive.default_config()
  cfg.update(pg=0.5, pg0=1)
  cfg[field] = value
  with pytest.raises(ConfigError, match=match):
    progressive.validate(cfg, num_scales=4)


def test_bad_values_fail_the_task_build():
  config = _tiny_config(pg=0.5, pg0=4)  # var_tiny has 4 scales
  var_cfg = VARConfig(depth=2, num_classes=10, vocab_size=64, z_channels=8, patch_nums=PATCH_NUMS)
  with pytest.raises(ConfigError, match="progressive.pg0"):
    train_var.progressive_schedule(config, var_cfg)
  off = _tiny_config(pg0=4)  # pg = 0: pg0 is not used, so not checked
  assert not train_var.progressive_schedule(off, var_cfg).enabled


def test_lr_schedule_follows_pg():
  assert progressive.effective_lr_schedule(_tiny_config()) == "lin0"
  assert progressive.effective_lr_schedule(_tiny_config(pg=0.8, pg0=1)) == "lin0.8"
  kept = _tiny_config(pg=0.8, pg0=1, lin_schedule=False)
  assert progressive.effective_lr_schedule(kept) == "lin0"


# -- the truncated forward and the stage loss ----------------------------------------------------

def _model_inputs():
  cfg = VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=10, vocab_size=64, z_channels=8,
                  patch_nums=PATCH_NUMS, init_adaln_gamma=0.5)
  labels = jnp.asarray([1, 2, 3], jnp.int32)
  x = jax.random.normal(jax.random.key(1), (3, cfg.seq_len - 1, 8))
  params = jax.jit(VAR(cfg).init)(jax.random.key(0), labels, x)["params"]
  return cfg, params, labels, x


def test_truncated_forward_is_the_prefix_of_the_full_forward():
  cfg, params, labels, x = _model_inputs()
  rngs = {"dropout": jax.random.key(5)}  # label dropout and drop path draw the same either way
  full = jax.jit(VAR(cfg, train=True).apply)({"params": params}, labels, x, rngs=rngs)
  for si in range(cfg.num_scales - 1):
    ed = progressive.stage_end(PATCH_NUMS, si)
    apply = jax.jit(VAR(cfg, train=True, prog_si=si).apply)
    out = apply({"params": params}, labels, x[:, :ed - 1], rngs=rngs)
    assert out.shape == (3, ed, cfg.vocab_size)
    np.testing.assert_allclose(out, full[:, :ed], atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="x_BlCv of shape"):
    VAR(cfg, prog_si=1).apply({"params": params}, labels, x)


def test_loss_weights_are_official():
  w = np.asarray(progressive.loss_weights(PATCH_NUMS, 2, 0.25))
  np.testing.assert_allclose(w, [1 / 30] * 5 + [0.25 / 30] * 9)
  np.testing.assert_allclose(progressive.loss_weights(PATCH_NUMS, 1, 3.0), [1 / 30] * 5)  # clamped


def _numpy_nll(logits, targets):
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@pytest.fixture(scope="module")
def tiny_task():
  """The tiny config over 8 steps, LR warm-up 1 step, pg = 0.5, pg0 = 1, pgwp = 4 steps: stage
  pg0 = 1 up to g = 1, 1 + round(2 (g - 1)/3) = 2 at g = 2, 3, the last stage 3 from g = 4 on."""
  config = _tiny_config("steps=8,batch=8", pg=0.5, pg0=1, pgwp=4.0)
  config.optim.warmup_steps = 1
  config.model["init_adaln_gamma"] = 0.5
  task, var_cfg = train_var.build_task(config)
  state = nn.unbox(jax.jit(task.init_state)(jax.random.key(0)))
  return config, task, var_cfg, state


def test_stage_loss_equals_hand_computation_on_pretokenized_batch(tiny_task):
  config, task, var_cfg, state = tiny_task
  assert task.staging is not None
  B, L, prog_si, prog_wp = 4, var_cfg.seq_len, 2, 0.3
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (B, L), 0, var_cfg.vocab_size),
                      np.int32)
  batch = {"tokens": tokens, "label": np.arange(B, dtype=np.int32)}
  rng = jax.random.key(3)
  step = jax.jit(task.staging.make_step(prog_si))
  _, metrics = step(state, batch, task.frozen, rng, {"prog_wp": np.float32(prog_wp)})

  # By hand: the full-length forward with the same dropout draws, its first ed rows, the weights.
  from var_jax.models.vqvae import VQVAE
  from var_jax.models.vqvae_config import VQVAEConfig
  maps = [jnp.asarray(tokens[:, b:e].reshape(B, p, p)) for (b, e), p in
          zip([(0, 1), (1, 5), (5, 14), (14, 30)], PATCH_NUMS)]
  vae_cfg = VQVAEConfig.from_mapping({**config.tokenizer.overrides, "patch_nums": PATCH_NUMS})
  x = VQVAE(vae_cfg).apply({"params": task.frozen}, maps, method=VQVAE.indices_to_var_input)
  logits = jax.jit(VAR(var_cfg, train=True).apply)({"params": state.params}, batch["label"], x,
                                                   rngs={"dropout": rng})
  nll = _numpy_nll(logits, tokens)[:, :14]
  weights = np.full(14, 1 / L)
  weights[5:14] *= prog_wp
  expected = (nll * weights).sum(-1).mean()  # normalised by L, not ed, as the official
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
  correct = np.asarray(logits).argmax(-1)[:, :14] == tokens[:, :14]
  np.testing.assert_allclose(float(metrics["accuracy"]), correct.mean(), rtol=1e-6)
  assert float(metrics["prog_si"]) == prog_si
  assert float(metrics["prog_wp"]) == pytest.approx(prog_wp)
  assert "loss_last_scale" not in metrics


def test_flops_and_tokens_follow_the_stage(tiny_task):
  _, task, var_cfg, _ = tiny_task
  full = flops.flops_per_example(var_cfg)
  assert flops.flops_per_example(var_cfg, var_cfg.num_scales - 1) == full
  assert flops.flops_per_example(var_cfg, 1) < full
  stage = task.stage_at(0)
  assert (stage.key, stage.tokens_per_example) == (1, 5)
  # The loop's MFU figures are var_jax.models.flops' of each stage.
  assert [task.stage_at(g).flops_per_example for g in (0, 2, 5)] == [
      flops.flops_per_example(var_cfg, s) for s in (1, 2, 3)]
  assert task.flops_per_example == full
  assert [task.stage_at(g).key for g in range(8)] == [1, 1, 2, 2, 3, 3, 3, 3]
  assert task.stage_at(5).tokens_per_example == 30


def test_off_by_default_builds_no_stages():
  config = _tiny_config()
  assert config.progressive.pg == 0.0
  task, _ = train_var.build_task(config)
  assert task.staging is None


# -- a short progressive run through the loop ------------------------------------------------------

@pytest.mark.slow  # ~1 min on 2 cores (run by hand: pytest -m slow)
def test_progressive_run_changes_stages_and_compiles_once_per_stage(tmp_path, tiny_task):
  """Images through the tokenizer in the step; 8 steps over stages 1, 1, 2, 2, 3, 3, 3, 3."""
  config, task, _, _ = tiny_task
  built, traces = [], {}
  original = task.staging.make_step

  def make_step(key):
    built.append(key)
    inner = original(key)

    def counted(*args):
      traces[key] = traces.get(key, 0) + 1
      return inner(*args)

    return counted

  task = dataclasses.replace(task, staging=dataclasses.replace(task.staging, make_step=make_step))
  loop.run(config, tmp_path, task)
  assert built == [1, 2, 3]
  assert traces == {1: 1, 2: 1, 3: 1}
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert [r["prog_si"] for r in rows] == [1, 1, 2, 2, 3, 3, 3, 3]
  assert [r["prog_wp"] for r in rows] == pytest.approx([1, 1, 0.25, 0.5, 1, 1, 1, 1])
  assert all(np.isfinite(r["loss"]) and r["tokens_per_sec"] > 0 for r in rows)
  assert "loss_last_scale" in rows[-1] and "loss_last_scale" not in rows[0]
