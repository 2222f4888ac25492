"""Progressive training (VAR_SPEC §5.4): train on a growing prefix of scales. Off by default.

With `progressive.pg` > 0 the run starts on the first `pg0 + 1` scales and adds scales until,
at `pg` of the run, it trains on all of them. Each step of stage `prog_si` sees only the tokens
[0, ed) of scales 0..prog_si: the teacher-forcing input, the targets and the block-causal mask are
all cut to that prefix, so a stage is its own statically shaped (separately compiled) step.

The schedule, as the official trainer computes it per micro-iteration `g_it`
(`train.py: train_one_ep`, `trainer.py: VARTrainer.train_step`), with K scales:
  * prog_si = pg0 while g_it <= warmup_it; K - 1 once g_it >= pg·max_it; in between
    pg0 + round(clip((g_it − warmup_it)/(pg·max_it − warmup_it), 0, 1)·(K − 1 − pg0)), with
    Python's round (halves to even);
  * prog_wp = clip(prog_it/pgwp_it, 0.01, 1), where prog_it counts the iterations since the stage
    began (1 on its first iteration); prog_wp = 1 throughout the first stage (the LR warm-up
    covers it);
  * stage K − 1 is plain training: all L tokens, uniform loss weights (prog_wp unused, so 1 here).
The stage is a non-decreasing function of the step, so prog_it (and whether the first stage is
still running) follows from the step alone: resuming from a checkpoint needs no extra state.

The loss at stage prog_si < K − 1 (`trainer.py: train_step`): per-token cross-entropy over the ed
tokens, weighted 1/L each (L of the full sequence, not renormalised to ed), the newest scale's
tokens [bg, ed) weighted by clip(prog_wp, 0, 1) as well, summed over tokens, averaged over the
batch.

The official run also switches the LR schedule to 'lin<pg>' when pg > 0 (`utils/arg_util.py`);
`lin_schedule` keeps that behaviour (`effective_lr_schedule`).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import ml_collections

from var_jax import scales
from var_jax.errors import ConfigError

# The official default stage warm-up, ep/300 epochs, is this fraction of the run.
DEFAULT_PGWP_FRACTION = 1 / 300
# prog_wp never drops below this (the official floor).
MIN_PROG_WP = 0.01


def default_config() -> ml_collections.ConfigDict:
  """The official defaults (`utils/arg_util.py: Args`): progressive training off."""
  c = ml_collections.ConfigDict()
  c.pg = 0.0    # in [0, 1]; > 0: scales are added over the first `pg` of the run (`--pg`)
  c.pg0 = 4     # in [0, K - 1]: the first stage trains scales 0..pg0 (`--pg0`)
  c.pgwp = 0.0  # loss warm-up of a new scale in steps (config.total_steps units; the official
                # `--pgwp` counts epochs); 0 = the official default, 1/300 of the run
  c.lin_schedule = True  # as the official: pg > 0 sets optim.schedule to 'lin<pg>'
  return c


def _number(config: ml_collections.ConfigDict, name: str) -> float:
  value = config.get(name)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ConfigError(f"progressive.{name} must be a finite number, got {value!r}.")
  return float(value)


def validate(config: ml_collections.ConfigDict | None, num_scales: int) -> None:
  """Raises ConfigError unless `config` (the `progressive` block) is usable with K = num_scales."""
  if config is None:
    return
  pg = _number(config, "pg")
  if not 0 <= pg <= 1:
    raise ConfigError(f"progressive.pg must be in [0, 1] (the fraction of the run over which "
                      f"scales are added; 0 = off), got {pg}.")
  pgwp = _number(config, "pgwp")
  if pgwp < 0:
    raise ConfigError(f"progressive.pgwp must be >= 0 (steps of loss warm-up per new scale; 0 = "
                      f"the official default of 1/300 of the run), got {pgwp}.")
  if pg == 0:
    return  # off: pg0 is unused, and its default (4) may exceed a small model's scales
  pg0 = config.get("pg0")
  if isinstance(pg0, bool) or not isinstance(pg0, int) or not 0 <= pg0 <= num_scales - 1:
    raise ConfigError(f"progressive.pg0 must be an int in [0, {num_scales - 1}] (the last scale of "
                      f"the first stage, for {num_scales} scales), got {pg0!r}.")
  if pg == 1 and config.get("lin_schedule", True):
    raise ConfigError("progressive.pg = 1 makes the official LR schedule 'lin1', which is "
                      "undefined (it divides by 1 - pg); use pg < 1 or set "
                      "progressive.lin_schedule=False.")


def enabled(config: ml_collections.ConfigDict | None) -> bool:
  """Whether `config` (the `progressive` block, possibly absent) turns progressive training on."""
  return config is not None and float(config.get("pg", 0.0)) > 0


def effective_lr_schedule(config: ml_collections.ConfigDict) -> str:
  """optim.schedule, or 'lin<pg>' when progressive training is on with lin_schedule (official)."""
  prog = config.get("progressive")
  if enabled(prog) and prog.get("lin_schedule", True):
    return f"lin{float(prog.pg):g}"
  return config.optim.schedule


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The official stage schedule over one run; every method is a pure function of the step.

  Attributes:
    pg: fraction of the run that is progressive; 0 = off (always the last stage).
    pg0: the first stage.
    num_scales: K.
    warmup_it: the LR warm-up length, in steps.
    max_it: the run length, in steps.
    pgwp_it: loss warm-up of a new stage, in steps (> 0).
  """
  pg: float
  pg0: int
  num_scales: int
  warmup_it: float
  max_it: int
  pgwp_it: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict | None, *, num_scales: int,
                  warmup_it: float, max_it: int) -> Schedule:
    """From the `progressive` block (None: off); pgwp = 0 resolves to max_it/300."""
    if config is None:
      config = default_config()
    validate(config, num_scales)
    pg = float(config.pg)
    pgwp = float(config.pgwp) or max_it * DEFAULT_PGWP_FRACTION
    return cls(pg=pg, pg0=int(config.pg0) if pg > 0 else num_scales - 1, num_scales=num_scales,
               warmup_it=warmup_it, max_it=max_it, pgwp_it=pgwp)

  @property
  def last_stage(self) -> int:
    return self.num_scales - 1

  @property
  def enabled(self) -> bool:
    return self.pg > 0

  def stage(self, step: int) -> int:
    """prog_si at `step` in [0, K − 1]; K − 1 means all scales (the official −1)."""
    if not self.enabled:
      return self.last_stage
    if step <= self.warmup_it:
      return self.pg0
    if step >= self.max_it * self.pg:
      return self.last_stage
    delta = self.last_stage - self.pg0
    progress = min(max((step - self.warmup_it) / (self.max_it * self.pg - self.warmup_it), 0), 1)
    return self.pg0 + round(progress * delta)

  def stage_start(self, step: int) -> int:
    """The first step of the stage `step` is in (bisection; the stage never decreases)."""
    target = self.stage(step)
    lo, hi = 0, step
    while lo < hi:
      mid = (lo + hi) // 2
      if self.stage(mid) >= target:
        hi = mid
      else:
        lo = mid + 1
    return lo

  def prog_wp(self, step: int) -> float:
    """The newest scale's loss multiplier at `step` (1 in the first and in the last stage)."""
    si = self.stage(step)
    if si == self.last_stage or si == self.stage(0):
      return 1.0
    prog_it = step - self.stage_start(step) + 1
    return max(min(prog_it / self.pgwp_it, 1.0), MIN_PROG_WP)

  def __call__(self, step: int) -> tuple[int, float]:
    """(prog_si, prog_wp) at `step`."""
    return self.stage(step), self.prog_wp(step)


def stage_end(patch_nums, prog_si: int) -> int:
  """ed: the number of tokens of scales 0..prog_si."""
  return scales.begin_ends(patch_nums)[prog_si][1]


def loss_weights(patch_nums, prog_si: int, prog_wp) -> jnp.ndarray:
  """Per-token weights (ed,) of stage prog_si: 1/L, times clip(prog_wp, 0, 1) on its newest scale."""
  L = scales.seq_len(patch_nums)
  begin, end = scales.begin_ends(patch_nums)[prog_si]
  newest = jnp.clip(jnp.asarray(prog_wp, jnp.float32), 0.0, 1.0)
  is_newest = jnp.arange(end) >= begin
  return jnp.full((end,), 1.0 / L, jnp.float32) * jnp.where(is_newest, newest, 1.0)


def stage_loss(nll_BL: jnp.ndarray, patch_nums, prog_si: int, prog_wp) -> jnp.ndarray:
  """The official stage loss: sum over the ed tokens of nll·weight, mean over the batch."""
  weights = loss_weights(patch_nums, prog_si, prog_wp)
  return jnp.mean(jnp.sum(nll_BL * weights, axis=-1))
