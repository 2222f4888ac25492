"""The official VAR optimizer: LR/WD schedules, no-decay mask, AdamW numerics, accumulation, EMA."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.errors import ConfigError
from var_jax.train import optim

# -- reference formulas (VAR_SPEC.md §5.3, written out independently of the module) ------------


def official_factor(it, sche, wp_it, max_it, wp0=0.005, wpe=0.1):
  if it < wp_it:
    return wp0 + (1 - wp0) * it / wp_it
  p = (it - wp_it) / (max_it - 1 - wp_it)
  if sche in ("lin0", "lin"):
    t = 0.05 if sche == "lin0" else 0.15
    return 1.0 if p < t else wpe + (1 - wpe) * (1 - p) / (1 - t)
  if sche == "lin00":
    return wpe + (1 - wpe) * (1 - p)
  if sche == "cos":
    return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * p))
  if sche == "exp":
    return 1.0 if p < 0.15 else math.exp((p - 0.15) / 0.85 * math.log(wpe))
  t = float(sche[3:])
  m = (1 + wpe + (1 - wpe) * (1 - t)) / 2
  return 1 + (m - 1) * p / t if p < t else wpe + (m - wpe) * (1 - p) / (1 - t)


def official_wd(it, max_it, twd, twde):
  return twde + (twd - twde) * (0.5 + 0.5 * math.cos(math.pi * it / (max_it - 1)))


def torch_style_adamw(params, grads_per_step, decay, lrs, wds, clip=2.0, b1=0.9, b2=0.95,
                      eps=1e-8):
  """float64 AdamW as PyTorch does it: clip_grad_norm_, p *= 1 - lr*wd, bias-corrected Adam."""
  p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, (grads, lr, wd) in enumerate(zip(grads_per_step, lrs, wds), start=1):
    norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))
    coef = min(1.0, clip / (norm + 1e-6))
    for k in p:
      g = np.asarray(grads[k], np.float64) * coef
      if decay[k]:
        p[k] *= 1 - lr * wd
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
      p[k] -= lr * m_hat / (np.sqrt(v_hat) + eps)
  return p


def config(**overrides):
  c = optim.default_config()
  c.wpe = 0.1
  c.update(overrides)
  return c


# -- learning rate ------------------------------------------------------------------------------


def test_peak_lr_follows_the_official_scaling():
  assert optim.peak_learning_rate(1e-4, 768) == pytest.approx(3e-4)       # d16 recipe
  assert optim.peak_learning_rate(8e-5, 1024) == pytest.approx(3.2e-4)    # d30 recipe
  # ac micro-batches per update: tlr = ac * tblr * bs / 256.
  assert optim.peak_learning_rate(1e-4, 768, grad_accum_steps=4) == pytest.approx(1.2e-3)
  opt = optim.make_optimizer(config(), global_batch_size=768, total_steps=100)
  assert opt.peak_learning_rate == pytest.approx(3e-4)


# warmup 20 updates, 1021 updates in all: p = (it - 20) / 1000.
HAND_COMPUTED = [
    ("lin0", 0, 0.005), ("lin0", 10, 0.5025), ("lin0", 20, 1.0), ("lin0", 69, 1.0),
    ("lin0", 520, 0.1 + 0.9 * 0.5 / 0.95), ("lin0", 1020, 0.1),
    ("lin", 120, 1.0), ("lin", 520, 0.1 + 0.9 * 0.5 / 0.85), ("lin", 1020, 0.1),
    ("lin00", 20, 1.0), ("lin00", 520, 0.55), ("lin00", 1020, 0.1),
    ("cos", 270, 0.1 + 0.9 * (0.5 + 0.5 * math.sqrt(0.5))), ("cos", 520, 0.55),
    ("cos", 1020, 0.1),
    ("exp", 169, 1.0), ("exp", 595, math.sqrt(0.1)), ("exp", 1020, 0.1),
    ("lin0.5", 270, 0.8875), ("lin0.5", 520, 0.775), ("lin0.5", 770, 0.4375),
    ("lin0.5", 1020, 0.1),
]


@pytest.mark.parametrize("schedule, step, factor", HAND_COMPUTED)
def test_lr_schedule_at_key_steps(schedule, step, factor):
  lr = optim.make_lr_schedule(config(schedule=schedule, warmup_steps=20, tblr=1e-4),
                              global_batch_size=256, total_steps=1021)
  assert float(lr(step)) == pytest.approx(1e-4 * factor, rel=1e-5)


@pytest.mark.parametrize("schedule", ["lin0", "lin", "lin00", "cos", "exp", "lin0.3"])
def test_lr_schedule_matches_the_official_curve_everywhere(schedule):
  lr = optim.make_lr_schedule(config(schedule=schedule, warmup_steps=37, tblr=2e-4),
                              global_batch_size=512, total_steps=800)
  steps = np.arange(800)
  got = np.asarray(jax.jit(jax.vmap(lr))(steps))
  want = [4e-4 * official_factor(int(s), schedule, 37, 800) for s in steps]
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12)


def test_accumulation_evaluates_the_schedule_at_the_official_micro_iteration():
  # Update k runs at micro-iteration g_it = k*ac + ac - 1 of a max_it = total*ac run.
  lr = optim.make_lr_schedule(config(grad_accum_steps=4, warmup_steps=5),
                              global_batch_size=256, total_steps=100)
  for k in (0, 3, 4, 50, 99):
    want = 4e-4 * official_factor(4 * k + 3, "lin0", 20, 400)
    assert float(lr(k)) == pytest.approx(want, rel=1e-5)


def test_default_warmup_is_two_percent_of_the_run():
  lr = optim.make_lr_schedule(config(), global_batch_size=256, total_steps=1000)
  assert float(lr(19)) == pytest.approx(1e-4 * (0.005 + 0.995 * 19 / 20), rel=1e-6)
  assert float(lr(20)) == pytest.approx(1e-4)


def test_lr_never_goes_negative_past_the_end():
  lr = optim.make_lr_schedule(config(), global_batch_size=256, total_steps=100)
  assert float(lr(150)) == pytest.approx(1e-5)  # held at wpe


# -- weight decay schedule ----------------------------------------------------------------------


def test_wd_is_a_cosine_over_the_whole_run():
  wd = optim.make_wd_schedule(config(twd=0.05, twde=0.08), total_steps=1001)
  assert float(wd(0)) == pytest.approx(0.05)
  assert float(wd(500)) == pytest.approx(0.065)
  assert float(wd(1000)) == pytest.approx(0.08)
  assert float(wd(250)) == pytest.approx(official_wd(250, 1001, 0.05, 0.08), rel=1e-6)


def test_wd_is_constant_when_twde_is_unset():
  wd = optim.make_wd_schedule(config(twd=0.05), total_steps=10)
  assert [float(wd(s)) for s in (0, 5, 9)] == pytest.approx([0.05] * 3)


@pytest.mark.parametrize("overrides, words", [
    ({"schedule": "linear"}, "unknown"),
    ({"schedule": "lin1.5"}, "unknown"),
    ({"schedule": "exp", "wpe": 0.0}, "wpe > 0"),
    ({"warmup_steps": 500}, "warmup_steps=500"),
    ({"tblr": 0.0}, "tblr"),
    ({"grad_accum_steps": 0}, "grad_accum_steps"),
    ({"wp0": 1.5}, "wp0"),
    ({"b2": 1.0}, "b2"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"mu_dtype": "float16"}, "mu_dtype"),
])
def test_bad_optimizer_config_is_refused(overrides, words):
  with pytest.raises(ConfigError, match=words):
    optim.make_optimizer(config(**overrides), global_batch_size=256, total_steps=100)


# -- no-decay mask ------------------------------------------------------------------------------

LAYERS, C, H, D, V = 2, 8, 2, 4, 16


def fake_var_params(shared_aln: bool):
  """The VAR parameter tree's names and layouts, blocks stacked on a leading layers axis."""
  z = np.zeros
  blocks = {
      "attn": {"mat_qkv": {"kernel": z((LAYERS, C, 3, H, D))}, "q_bias": z((LAYERS, H, D)),
               "v_bias": z((LAYERS, H, D)), "scale_mul_1H11": z((LAYERS, H)),
               "proj": {"kernel": z((LAYERS, H, D, C)), "bias": z((LAYERS, C))}},
      "ffn": {"fc1": {"kernel": z((LAYERS, C, 4 * C)), "bias": z((LAYERS, 4 * C))},
              "fc2": {"kernel": z((LAYERS, 4 * C, C)), "bias": z((LAYERS, C))}},
      "layer_gain": z((LAYERS, C)),  # 1-D per layer, no telltale name
  }
  tree = {
      "word_embed": {"kernel": z((32, C)), "bias": z((C,))},
      "class_emb": {"embedding": z((11, C))},
      "pos_start": z((1, 1, C)), "pos_1LC": z((1, 30, C)), "lvl_embed": {"embedding": z((4, C))},
      "gain_table": z((LAYERS, C)),  # 2-D outside the scanned stack
      "blocks": blocks,
      "head_nm": {"ada_lin": {"kernel": z((C, 2 * C)), "bias": z((2 * C,))}},
      "head": {"kernel": z((C, V)), "bias": z((V,))},
  }
  if shared_aln:
    blocks["ada_gss"] = z((LAYERS, 6, C))
    tree["shared_ada_lin"] = {"kernel": z((C, 6 * C)), "bias": z((6 * C,))}
  else:
    blocks["ada_lin"] = {"kernel": z((LAYERS, C, 6 * C)), "bias": z((LAYERS, 6 * C))}
  return tree


def decayed_names(mask):
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  return {optim.param_path(path) for path, on in flat if on}


COMMON_DECAYED = {
    "word_embed/kernel", "class_emb/embedding", "gain_table", "blocks/attn/mat_qkv/kernel",
    "blocks/attn/proj/kernel", "blocks/ffn/fc1/kernel", "blocks/ffn/fc2/kernel",
    "head_nm/ada_lin/kernel", "head/kernel"}


def test_mask_decays_exactly_the_official_set():
  assert decayed_names(optim.weight_decay_mask(fake_var_params(False))) == (
      COMMON_DECAYED | {"blocks/ada_lin/kernel"})
  assert decayed_names(optim.weight_decay_mask(fake_var_params(True))) == (
      COMMON_DECAYED | {"shared_ada_lin/kernel"})


def test_mask_keeps_boxes_and_agrees_with_the_unboxed_mask():
  params = fake_var_params(False)
  boxed = jax.tree.map(lambda x: nn.LogicallyPartitioned(x, (None,) * x.ndim), params)
  mask = optim.weight_decay_mask(boxed)
  leaves = jax.tree.leaves(mask, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
  assert nn.unbox(mask) == optim.weight_decay_mask(params)


# -- one AdamW run against a hand-written PyTorch-style reference --------------------------------


def small_problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {"dense/kernel": rng.normal(size=(3, 4)), "dense/bias": rng.normal(size=(4,)),
            "pos_1LC": rng.normal(size=(1, 5, 4))}
  grads = [{k: rng.normal(size=v.shape) * scale for k, v in params.items()}
           for scale in (3.0, 0.1, 0.5)]  # the first step is clipped (norm >> 2)
  as_tree = lambda flat: {"dense": {"kernel": flat["dense/kernel"], "bias": flat["dense/bias"]},
                          "pos_1LC": flat["pos_1LC"]}
  return params, grads, as_tree


def run_optax(opt, params, grads, as_tree):
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), as_tree(params))
  state = opt.tx.init(p)
  norms = []
  update = jax.jit(opt.tx.update)
  for g in grads:
    updates, state = update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), as_tree(g)),
                            state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
    norms.append(float(optim.last_update_stats(state)["grad_norm"]))
  return p, state, norms


ADAM_CONFIG = dict(tblr=0.01, warmup_steps=1, twd=0.05, twde=0.5, schedule="lin0")


def test_adamw_steps_match_the_pytorch_semantics_with_changing_wd():
  params, grads, as_tree = small_problem()
  opt = optim.make_optimizer(config(**ADAM_CONFIG), global_batch_size=256, total_steps=4)
  got, state, norms = run_optax(opt, params, grads, as_tree)
  lrs = [0.01 * official_factor(it, "lin0", 1, 4) for it in range(3)]
  wds = [official_wd(it, 4, 0.05, 0.5) for it in range(3)]
  assert len(set(np.round(wds, 6))) == 3  # the WD really changes between steps
  decay = {"dense/kernel": True, "dense/bias": False, "pos_1LC": False}
  want = as_tree(torch_style_adamw(params, grads, decay, lrs, wds))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
  stats = optim.last_update_stats(state)
  assert float(stats["learning_rate"]) == pytest.approx(lrs[-1], rel=1e-6)
  assert float(stats["weight_decay"]) == pytest.approx(wds[-1], rel=1e-6)
  want_norms = [math.sqrt(sum(np.sum(np.square(x)) for x in g.values())) for g in grads]
  np.testing.assert_allclose(norms, want_norms, rtol=1e-5)  # pre-clip norms
  assert norms[0] > 2.0


def test_adamw_matches_torch_optim_adamw_when_torch_is_installed():
  torch = pytest.importorskip("torch")
  params, grads, as_tree = small_problem(seed=1)
  opt = optim.make_optimizer(config(**ADAM_CONFIG), global_batch_size=256, total_steps=4)
  got, _, _ = run_optax(opt, params, grads, as_tree)
  tparams = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float32))
             for k, v in params.items()}
  decayed = [tparams["dense/kernel"]]
  not_decayed = [tparams["dense/bias"], tparams["pos_1LC"]]
  topt = torch.optim.AdamW([{"params": decayed, "wd_sc": 1.0},
                            {"params": not_decayed, "wd_sc": 0.0}],
                           betas=(0.9, 0.95), eps=1e-8)
  for it, g in enumerate(grads):
    for group in topt.param_groups:
      group["lr"] = 0.01 * official_factor(it, "lin0", 1, 4)
      group["weight_decay"] = official_wd(it, 4, 0.05, 0.5) * group["wd_sc"]
    for k, p in tparams.items():
      p.grad = torch.tensor(g[k], dtype=torch.float32)
    torch.nn.utils.clip_grad_norm_(list(tparams.values()), 2.0)
    topt.step()
  want = as_tree({k: p.detach().numpy() for k, p in tparams.items()})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


# -- accumulation and EMA -----------------------------------------------------------------------


def test_accumulation_averages_micro_batches_into_one_update():
  params, grads, as_tree = small_problem(seed=2)
  opt = optim.make_optimizer(config(**ADAM_CONFIG, grad_accum_steps=2), global_batch_size=128,
                             total_steps=4)
  assert opt.peak_learning_rate == pytest.approx(0.01)
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), as_tree(params))
  state = opt.tx.init(p)
  updates, state = opt.tx.update(jax.tree.map(jnp.asarray, as_tree(grads[1])), state, p)
  assert not bool(optim.optimizer_updated(state))
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
  updates, state = opt.tx.update(jax.tree.map(jnp.asarray, as_tree(grads[2])), state, p)
  assert bool(optim.optimizer_updated(state))
  got = jax.tree.map(lambda a, u: a + u, p, updates)
  mean_grad = {k: (grads[1][k] + grads[2][k]) / 2 for k in params}
  # Update 0 of an ac=2 run is micro-iteration 1 of max_it = 8, warm-up 2 micro-iterations.
  lr = 0.01 * official_factor(1, "lin0", 2, 8)
  wd = official_wd(1, 8, 0.05, 0.5)
  decay = {"dense/kernel": True, "dense/bias": False, "pos_1LC": False}
  want = as_tree(torch_style_adamw(params, [mean_grad], decay, [lr], [wd]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


def test_ema_update_moves_towards_params_only_after_an_update():
  ema = {"w": jnp.zeros(3)}
  params = {"w": jnp.ones(3)}
  np.testing.assert_allclose(optim.ema_update(ema, params, 0.9)["w"], 0.1)
  np.testing.assert_allclose(optim.ema_update(ema, params, 0.9, jnp.asarray(False))["w"], 0.0)
