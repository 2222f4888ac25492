"""The official VAR optimizer as optax: AdamW, per-step LR and WD schedules, clipping, accumulation.

Follows VAR_SPEC.md §5.3 (`train.py: build_everything`, `utils/lr_control.py`):

* AdamW, betas (0.9, 0.95), eps 1e-8, decoupled weight decay applied as lr·wd·w (PyTorch
  semantics; `optax.adamw` multiplies its decay by the learning rate the same way).
* Peak LR = tblr · global_batch · grad_accum_steps / 256. The official `tlr = ac·tblr·bs/256`
  counts the *micro*-batch `bs`; with accumulation each update averages `ac` micro-batches, so
  this is tblr · (samples per update) / 256, the usual linear scaling rule.
* The LR factor: linear warm-up from wp0 = 0.005, then 'lin0' (default), 'lin', 'lin00', 'cos',
  'exp' or 'lin<T>', ending at wpe. WD follows a cosine from twd to twde over the whole run.
  The official loop evaluates both at every micro-iteration `g_it` and steps the optimizer at
  the last micro-iteration of each update, so update `k` uses `g_it = k·ac + ac − 1` with
  `max_it = total_steps·ac`. With ac = 1 (every released recipe) `g_it` is the update index.
* No weight decay for 1-D parameters, names ending in "bias", and names containing one of the
  official no-decay substrings (`OFFICIAL_NO_DECAY_KEYS`). Under a scanned stack ("blocks") the
  leading axis is the layer axis, so dimensionality is judged per layer.
* Global-norm clipping at tclip = 2.0, with the pre-clip norm kept in the optimizer state.
* Gradient accumulation with `optax.MultiSteps`, EMA of the parameters kept outside the optimizer.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from var_jax.errors import ConfigError

# `utils/lr_control.py: filter_params` is called with these `nowd_keys` in `train.py`.
OFFICIAL_NO_DECAY_KEYS: tuple[str, ...] = (
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
    "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")

# Top-level module names whose parameters are stacked over layers by `nn.scan` (leading axis).
DEFAULT_SCANNED_PREFIXES: tuple[str, ...] = ("blocks",)

SCHEDULES_FIXED: tuple[str, ...] = ("lin0", "lin", "lin00", "cos", "exp")


def default_config() -> ml_collections.ConfigDict:
  """The official optimizer defaults (`utils/arg_util.py: Args`); experiment configs override."""
  c = ml_collections.ConfigDict()
  c.tblr = 1e-4               # base LR per 256 samples
  c.grad_accum_steps = 1      # `ac`: micro-batches per optimizer update
  c.schedule = "lin0"         # 'lin0', 'lin', 'lin00', 'cos', 'exp' or 'lin<T>' with 0 < T < 1
  c.warmup_steps = -1         # optimizer updates; -1 = the official ep/50, i.e. 2% of the run
  c.wp0 = 0.005               # LR factor at the first warm-up step
  c.wpe = 0.01                # LR factor at the end (d16/d20 recipes use 0.1)
  c.twd = 0.05                # weight decay at the start
  c.twde = ml_collections.config_dict.placeholder(float)  # at the end; None = twd (constant)
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  c.clip_norm = 2.0           # `tclip`; <= 0 turns clipping off, as in the official code
  c.mu_dtype = "float32"      # dtype of Adam's first moment ("bfloat16" halves its memory)
  c.ema_decay = 0.0           # 0 = no EMA (the official code has none)
  c.no_decay_keys = OFFICIAL_NO_DECAY_KEYS
  c.scanned_prefixes = DEFAULT_SCANNED_PREFIXES
  return c


class Optimizer(NamedTuple):
  """What `make_optimizer` builds.

  Attributes:
    tx: the optax transformation (wrapped in `optax.MultiSteps` when grad_accum_steps > 1).
    learning_rate: update index -> LR (jnp-traceable), for logging.
    weight_decay: update index -> WD coefficient (jnp-traceable), for logging.
    peak_learning_rate: tblr · global_batch · grad_accum_steps / 256.
    grad_accum_steps: micro-batches per update.
  """
  tx: optax.GradientTransformation
  learning_rate: Callable[[Any], jax.Array]
  weight_decay: Callable[[Any], jax.Array]
  peak_learning_rate: float
  grad_accum_steps: int


# ---------------------------------------------------------------------------------------------
# Schedules.


def peak_learning_rate(tblr: float, global_batch_size: int, grad_accum_steps: int = 1) -> float:
  """tblr scaled linearly by the samples per optimizer update over 256 (official `tlr`)."""
  if not tblr > 0:
    raise ConfigError(f"optim.tblr must be > 0, got {tblr}.")
  if global_batch_size < 1:
    raise ConfigError(f"global batch size must be >= 1, got {global_batch_size}.")
  if grad_accum_steps < 1:
    raise ConfigError(f"optim.grad_accum_steps must be >= 1, got {grad_accum_steps}.")
  return tblr * global_batch_size * grad_accum_steps / 256


def _check_schedule(schedule: str, wp0: float, wpe: float) -> float | None:
  """Validates the schedule name and factors; returns T for 'lin<T>' and None otherwise."""
  if not 0 <= wp0 <= 1:
    raise ConfigError(f"optim.wp0 must be in [0, 1], got {wp0}.")
  if not 0 <= wpe <= 1:
    raise ConfigError(f"optim.wpe must be in [0, 1], got {wpe}.")
  if schedule == "exp" and wpe <= 0:
    raise ConfigError("optim.schedule='exp' decays to wpe through log(wpe); set optim.wpe > 0.")
  if schedule in SCHEDULES_FIXED:
    return None
  if schedule.startswith("lin"):
    try:
      t = float(schedule[3:])
    except ValueError:
      t = math.nan
    if 0 < t < 1:
      return t
  raise ConfigError(
      f"optim.schedule={schedule!r} is unknown; use one of {SCHEDULES_FIXED} or 'lin<T>' with "
      "0 < T < 1 (e.g. 'lin0.5', the progressive-training shape).")


# The shapes below are written out rather than built from optax.join_schedules: optax has no
# plateau-then-linear or 'lin<T>' piece, and one formula per shape is easy to check line by
# line against `lr_wd_annealing`.
def lr_factor(it: Any, *, schedule: str, warmup_it: int, max_it: int, wp0: float,
              wpe: float) -> jax.Array:
  """The official LR multiplier at micro-iteration `it` (`utils/lr_control.py`).

  Warm-up: wp0 + (1 − wp0)·it/warmup_it for it < warmup_it. After it, with
  p = (it − warmup_it)/(max_it − 1 − warmup_it):
    'lin0'/'lin': 1 while p < 0.05/0.15, then wpe + (1 − wpe)·(1 − p)/(1 − T);
    'lin00': wpe + (1 − wpe)·(1 − p);
    'cos': wpe + (1 − wpe)·(½ + ½·cos πp);
    'exp': 1 while p < 0.15, then exp((p − 0.15)/0.85 · ln wpe);
    'lin<T>': m = (1 + wpe + (1 − wpe)(1 − T))/2; 1 + (m − 1)·p/T for p < T, else
      wpe + (m − wpe)·(1 − p)/(1 − T).
  Two guards where the official code would divide by zero or run past its end: the denominator
  of p is at least 1, and p is clipped to [0, 1].
  """
  t_lin = _check_schedule(schedule, wp0, wpe)
  it = jnp.asarray(it, jnp.float32)
  warm = wp0 + (1 - wp0) * it / max(warmup_it, 1)
  p = jnp.clip((it - warmup_it) / max(max_it - 1 - warmup_it, 1), 0.0, 1.0)
  rest = 1 - p

  def plateau_then_linear(t):
    return jnp.where(p < t, 1.0, wpe + (1 - wpe) * rest / (1 - t))

  if schedule == "lin0":
    after = plateau_then_linear(0.05)
  elif schedule == "lin":
    after = plateau_then_linear(0.15)
  elif schedule == "lin00":
    after = wpe + (1 - wpe) * rest
  elif schedule == "cos":
    after = wpe + (1 - wpe) * (0.5 + 0.5 * jnp.cos(jnp.pi * p))
  elif schedule == "exp":
    after = jnp.where(p < 0.15, 1.0, jnp.exp((p - 0.15) / 0.85 * math.log(wpe)))
  else:
    mid = (1 + wpe + (1 - wpe) * (1 - t_lin)) / 2
    after = jnp.where(p < t_lin, 1 + (mid - 1) * p / t_lin,
                      wpe + (mid - wpe) * rest / (1 - t_lin))
  return jnp.where(it < warmup_it, warm, after)


def wd_value(it: Any, *, max_it: int, twd: float, twde: float) -> jax.Array:
  """Official WD at micro-iteration `it`: twde + (twd − twde)(½ + ½·cos(π·it/(max_it − 1)))."""
  frac = jnp.clip(jnp.asarray(it, jnp.float32) / max(max_it - 1, 1), 0.0, 1.0)
  return twde + (twd - twde) * (0.5 + 0.5 * jnp.cos(jnp.pi * frac))


def _run_length(config: ml_collections.ConfigDict, total_steps: int) -> tuple[int, int, int]:
  """(accumulation steps, max_it, warmup_it) in micro-iterations."""
  ac = int(config.grad_accum_steps)
  if ac < 1:
    raise ConfigError(f"optim.grad_accum_steps must be >= 1, got {ac}.")
  if total_steps < 1:
    raise ConfigError(f"total_steps (optimizer updates) must be >= 1, got {total_steps}.")
  max_it = total_steps * ac
  warmup = int(config.warmup_steps)
  if warmup == -1:
    warmup_it = round(max_it / 50)
  elif 0 <= warmup <= total_steps:
    warmup_it = warmup * ac
  else:
    raise ConfigError(f"optim.warmup_steps={warmup} must be -1 (official ep/50) or in "
                      f"[0, total_steps={total_steps}].")
  return ac, max_it, warmup_it


def warmup_iterations(config: ml_collections.ConfigDict, total_steps: int) -> int:
  """The LR warm-up length in micro-iterations (the official `wp_it`), for `total_steps` updates."""
  return _run_length(config, total_steps)[2]


def make_lr_schedule(config: ml_collections.ConfigDict, *, global_batch_size: int,
                     total_steps: int) -> Callable[[Any], jax.Array]:
  """Update index -> LR, reproducing the official per-iteration schedule (module docstring)."""
  ac, max_it, warmup_it = _run_length(config, total_steps)
  peak = peak_learning_rate(config.tblr, global_batch_size, ac)
  _check_schedule(config.schedule, config.wp0, config.wpe)

  def schedule(step):
    it = jnp.asarray(step) * ac + (ac - 1)
    return peak * lr_factor(it, schedule=config.schedule, warmup_it=warmup_it, max_it=max_it,
                            wp0=config.wp0, wpe=config.wpe)

  return schedule


def make_wd_schedule(config: ml_collections.ConfigDict, *,
                     total_steps: int) -> Callable[[Any], jax.Array]:
  """Update index -> weight-decay coefficient (cosine twd -> twde over the whole run)."""
  ac, max_it, _ = _run_length(config, total_steps)
  twd = float(config.twd)
  twde = twd if config.twde is None else float(config.twde)
  if twd < 0 or twde < 0:
    raise ConfigError(f"optim.twd and optim.twde must be >= 0, got {twd} and {twde}.")

  def schedule(step):
    return wd_value(jnp.asarray(step) * ac + (ac - 1), max_it=max_it, twd=twd, twde=twde)

  return schedule


# ---------------------------------------------------------------------------------------------
# Weight-decay mask.


def param_path(path: Sequence[Any]) -> str:
  """'blocks/attn/q_bias'-style name of a pytree key path."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def decays(name: str, shape: Sequence[int], *,
           no_decay_keys: Sequence[str] = OFFICIAL_NO_DECAY_KEYS,
           scanned_prefixes: Sequence[str] = DEFAULT_SCANNED_PREFIXES) -> bool:
  """The official rule for one parameter: decay unless 1-D, a bias, or a no-decay name.

  `name` is the '/'-joined path. If one of its components is in `scanned_prefixes`, the
  leading axis is the layer axis and does not count towards the dimensionality.
  """
  ndim = len(shape)
  if any(part in scanned_prefixes for part in name.split("/")):
    ndim -= 1
  if ndim <= 1 or name.endswith("bias"):
    return False
  return not any(key in name for key in no_decay_keys)


def weight_decay_mask(
    params: Any, *, no_decay_keys: Sequence[str] = OFFICIAL_NO_DECAY_KEYS,
    scanned_prefixes: Sequence[str] = DEFAULT_SCANNED_PREFIXES,
) -> Any:
  """Tree of bools (True = decay), same structure as `params`; boxed leaves stay boxed."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)

  def leaf_mask(path, leaf):
    value = leaf.unbox() if is_box(leaf) else leaf
    decision = decays(param_path(path), jnp.shape(value), no_decay_keys=no_decay_keys,
                      scanned_prefixes=scanned_prefixes)
    return leaf.replace_boxed(decision) if is_box(leaf) else decision

  return jax.tree_util.tree_map_with_path(leaf_mask, params, is_leaf=is_box)


# ---------------------------------------------------------------------------------------------
# The transformation.


class PreClipNormState(NamedTuple):
  """Global L2 norm of the gradient of the last update, before clipping."""
  pre_clip_grad_norm: jax.Array


def record_global_norm() -> optax.GradientTransformation:
  """Identity on the updates that stores their global norm in its state.

  optax's `clip_by_global_norm` keeps no state, and under `MultiSteps` only the inner chain sees
  the averaged gradient, so this is where the official log value (`clip_grad_norm_`'s return)
  can be kept.
  """

  def init_fn(params):
    del params
    return PreClipNormState(jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None):
    del state, params
    return updates, PreClipNormState(optax.tree.norm(updates).astype(jnp.float32))

  return optax.GradientTransformation(init_fn, update_fn)


def _mu_dtype(name: str | None):
  if name in (None, "", "float32"):
    return None
  if name == "bfloat16":
    return jnp.bfloat16
  raise ConfigError(f"optim.mu_dtype must be 'float32' or 'bfloat16', got {name!r}.")


def make_optimizer(config: ml_collections.ConfigDict, *, global_batch_size: int,
                   total_steps: int) -> Optimizer:
  """Builds the official VAR optimizer.

  Args:
    config: optimizer config (fields of `default_config`).
    global_batch_size: samples per micro-step over all hosts.
    total_steps: optimizer updates in the whole run (micro-steps / grad_accum_steps).

  Returns:
    `Optimizer`. Feed `tx` one micro-batch gradient per call; with grad_accum_steps > 1 the
    parameters change only every grad_accum_steps calls (`optimizer_updated`).

  Raises:
    ConfigError: on any invalid value.
  """
  for name in ("b1", "b2"):
    if not 0 <= config[name] < 1:
      raise ConfigError(f"optim.{name} must be in [0, 1), got {config[name]}.")
  if not config.eps > 0:
    raise ConfigError(f"optim.eps must be > 0, got {config.eps}.")
  if not 0 <= config.ema_decay < 1:
    raise ConfigError(f"optim.ema_decay must be in [0, 1) (0 = off), got {config.ema_decay}.")
  lr = make_lr_schedule(config, global_batch_size=global_batch_size, total_steps=total_steps)
  wd = make_wd_schedule(config, total_steps=total_steps)
  no_decay_keys = tuple(config.no_decay_keys)
  scanned_prefixes = tuple(config.scanned_prefixes)
  mask = lambda params: weight_decay_mask(
      params, no_decay_keys=no_decay_keys, scanned_prefixes=scanned_prefixes)
  adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask", "mu_dtype"))(
      learning_rate=lr, weight_decay=wd, b1=config.b1, b2=config.b2, eps=config.eps,
      mu_dtype=_mu_dtype(config.mu_dtype), mask=mask)
  # optax clips with max/‖g‖ when ‖g‖ > max; PyTorch's clip_grad_norm_ with max/(‖g‖ + 1e-6)
  # capped at 1, a relative difference of 1e-6/‖g‖ in the clipped update.
  parts = [record_global_norm()]
  if config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts.append(adamw)
  tx = optax.chain(*parts)
  ac = int(config.grad_accum_steps)
  if ac > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=ac).gradient_transformation()
  return Optimizer(tx=tx, learning_rate=lr, weight_decay=wd,
                   peak_learning_rate=peak_learning_rate(config.tblr, global_batch_size, ac),
                   grad_accum_steps=ac)


# ---------------------------------------------------------------------------------------------
# State queries and EMA.


def optimizer_updated(opt_state: Any) -> jax.Array:
  """Whether the last `tx.update` changed the parameters (False mid-accumulation)."""
  if isinstance(opt_state, optax.MultiStepsState):
    return jnp.logical_and(opt_state.mini_step == 0, opt_state.gradient_step > 0)
  return jnp.asarray(True)


def last_update_stats(opt_state: Any) -> dict[str, jax.Array]:
  """LR, WD and pre-clip gradient norm used by the most recent parameter update."""
  hyper = optax.tree_utils.tree_get(opt_state, "hyperparams")
  return {
      "learning_rate": hyper["learning_rate"],
      "weight_decay": hyper["weight_decay"],
      "grad_norm": optax.tree_utils.tree_get(opt_state, "pre_clip_grad_norm"),
  }


def ema_update(ema_params: Any, params: Any, decay: float, updated: Any = True) -> Any:
  """ema ← decay·ema + (1 − decay)·params, only where `updated` (e.g. `optimizer_updated`)."""
  new = optax.incremental_update(params, ema_params, step_size=1.0 - decay)
  return jax.tree.map(lambda n, o: jnp.where(updated, n, o), new, ema_params)
