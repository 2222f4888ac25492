"""The training loop shared by VAR and tokenizer training.

A task (`TrainTask`) says how to build the state and how one step maps (state, batch) to the next;
this module does the rest the same way for both: the mesh and logical rules from config, sharded
init or auto-resume, the per-host input iterator positioned at the resumed step (its state is
saved in every checkpoint and restored with it), the jitted step with donated state, metrics
(TensorBoard, stdout, metrics.jsonl) read one step late, periodic and preemption-triggered
checkpoints, and periodic task hooks (sample grids), run after their step's
checkpoint so that a failing hook costs no training. Before any array is allocated, a config
whose parameters would replicate more than `max_replicated_param_gb` per chip is refused.

A task may also be staged (`Staging`, e.g. VAR's progressive training): each step belongs to a
stage that is a pure function of the step, each stage has its own statically shaped step, jitted
the first time the stage comes up (so at most one compile per stage), and the stage's per-step
scalars go in as traced arguments.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Hashable, Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from var_jax.parallel import sharding
from var_jax.data.pipeline import make_input_iterator
from var_jax.errors import CheckpointError, ConfigError
from var_jax.train import checkpointing, metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class Stage:
  """What the loop needs about the stage of one step.

  Attributes:
    key: static and hashable; the loop compiles one step per distinct key.
    inputs: scalars handed to the stage's step as float32 arrays (they may change every step
      without a recompile).
    tokens_per_example: tokens one example contributes at this stage (for tokens/s).
    flops_per_example: model FLOPs of one example at this stage (for MFU), or None.
  """
  key: Hashable
  inputs: Mapping[str, float]
  tokens_per_example: int
  flops_per_example: float | None = None


@dataclasses.dataclass(frozen=True)
class Staging:
  """A staged task: `stage_at(step)` -> Stage, a pure function of the global step (so resuming
  needs no extra state); `make_step(key)` -> (state, batch, frozen, rng, inputs) -> (state,
  metrics), the step of that stage."""
  stage_at: Callable[[int], Stage]
  make_step: Callable[[Hashable], Callable[..., tuple[Any, Mapping[str, jax.Array]]]]


@dataclasses.dataclass
class TrainTask:
  """What a trainer plugs into `run`.

  Attributes:
    init_state: rng -> boxed TrainState (params annotated with logical axes); jitted with the
      shardings the rules give, so no unsharded copy exists.
    train_step: (state, batch, frozen, rng) -> (state, metrics dict of scalars); pure.
    frozen: arrays the step reads but never updates (e.g. the tokenizer's params), passed as a
      non-donated argument (closing over them would copy them into the executable).
    frozen_shardings: shardings of `frozen` (None: replicated), or a function (frozen, state
      shardings) -> them (e.g. a frozen copy of the model split as the trained params are).
    initial_params: a fresh run's starting params instead of `init_state`'s, as a function
      (abstract sharded params) -> (description, params) (e.g. a released model to fine-tune);
      config.init_from takes precedence, a resume always does.
    tokens_per_example: for tokens/s.
    flops_per_example: model FLOPs of one example's forward+backward (for MFU), or None.
    hooks: {name: (every_steps, fn(state, step, workdir))}, run on every host (the functions
      may be collective) after the step's checkpoint is saved; writing files is the hook's
      business (host 0). A hook may return a dict of scalars (e.g. evaluation metrics): they are
      logged at that step, in the same record as the training metrics when the step is also a
      log step. A hook that raises is logged and skipped (config.stop_on_hook_error=True stops
      the run instead).
    data_kwargs: extra keyword arguments for `make_input_iterator` (patch_nums, vocab_size).
    staging: None (one step for the whole run), or the stages; then the loop runs
      `staging.make_step(key)` instead of `train_step`, and tokens/s and MFU follow the stages.
  """
  init_state: Callable[[jax.Array], Any]
  train_step: Callable[..., tuple[Any, Mapping[str, jax.Array]]]
  frozen: Any = None
  frozen_shardings: Any = None
  initial_params: Callable[[Any], tuple[str, Any]] | None = None
  tokens_per_example: int = 1
  flops_per_example: float | None = None
  hooks: Mapping[str, tuple[int, Callable[[Any, int, epath.Path], Mapping[str, float] | None]]] = (
      dataclasses.field(default_factory=dict))
  data_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  staging: Staging | None = None

  def stage_at(self, step: int) -> Stage:
    """The stage of `step` (key None, no inputs, the task's own figures when not staged)."""
    if self.staging is None:
      return Stage(None, {}, self.tokens_per_example, self.flops_per_example)
    return self.staging.stage_at(step)


# Defaults of the loop's optional config fields (config_lib.base_train_config sets them too).
# max_replicated_param_gb: float32 VAR params are 1.24 GB for d16 and 2.4 GB for d20, which the
# official configs train pure data-parallel; d24 (4.1 GB) and up are fsdp over the whole slice
# (config_lib.var_imagenet_config). Adam's two moments, the gradients and an EMA copy follow each
# parameter's sharding, so the train state replicates ~4-5x this figure per chip.
DEFAULT_MAX_REPLICATED_PARAM_GB = 3.0


def validate_run_config(config: ml_collections.ConfigDict) -> None:
  """Checks the loop's own fields once at start-up.

  Required: global_batch_size, total_steps, log_every, checkpoint_every (ints >= 1).
  Optional:
    stop_on_hook_error (bool, default False): a task hook that raises stops the run (after the
      step's checkpoint is saved) instead of being logged and skipped.
    max_replicated_param_gb (float > 0, default DEFAULT_MAX_REPLICATED_PARAM_GB): the most
      parameter bytes (1e9) each chip may hold unsplit over the model axes (fsdp, tensor); more
      fails before init or restore, naming the largest such parameters.
    allow_replicated_params (bool, default False): skips that check.
  """
  for name in ("global_batch_size", "total_steps", "log_every", "checkpoint_every"):
    value = config.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"config.{name} must be an int >= 1, got {value!r}.")
  for name in ("stop_on_hook_error", "allow_replicated_params"):
    if not isinstance(config.get(name, False), bool):
      raise ConfigError(f"config.{name} must be True or False, got {config.get(name)!r}.")
  limit = config.get("max_replicated_param_gb", DEFAULT_MAX_REPLICATED_PARAM_GB)
  if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
    raise ConfigError(f"config.max_replicated_param_gb must be a number > 0 (GB per chip), got "
                      f"{limit!r}; set config.allow_replicated_params=True to skip the check.")
  if config.global_batch_size % jax.process_count():
    raise ConfigError(f"global_batch_size {config.global_batch_size} does not split over "
                      f"{jax.process_count()} hosts.")


def save_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def run(config: ml_collections.ConfigDict, workdir, task: TrainTask) -> dict[str, float]:
  """Trains until `config.total_steps` or a preemption; returns the last logged scalars."""
  workdir = epath.Path(workdir)
  validate_run_config(config)
  save_config(config, workdir)
  mesh = sharding.make_mesh(config.mesh, dcn_mesh_config=config.get("dcn_mesh"))
  rules = sharding.logical_axis_rules(config.get("rules"), mesh)
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)

  abstract, boxed_shardings = sharding.abstract_sharded_state(task.init_state, init_rng, mesh, rules)
  state_shardings = nn.unbox(boxed_shardings)
  report = check_replicated_params(config, abstract.params, mesh)  # before anything is allocated

  def init_fn():
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return nn.unbox(jax.jit(task.init_state, out_shardings=boxed_shardings)(init_rng))

  ckpt = checkpointing.Checkpointer(
      workdir, save_interval_steps=config.checkpoint_every, max_to_keep=config.get("keep_checkpoints", 3),
      async_save=config.get("async_checkpointing", True),
      config_hash=checkpointing.config_hash(config))
  restored = ckpt.restore_or_init(abstract, init_fn,
                                  init_from=config.get("init_from") or task.initial_params or None)
  state = restored.state
  start_step = int(jax.device_get(state.step))
  logging.info("Train state: %s at step %d; %s", restored.source, start_step, report.summary())
  if start_step >= config.total_steps:
    ckpt.close()
    logging.info("Already finished at step %d (total_steps=%d) in %s: nothing to do. Raise "
                 "total_steps (--config.total_steps=N) to train on.", start_step,
                 config.total_steps, workdir)
    return {}

  data = make_input_iterator(config.data, global_batch=config.global_batch_size, seed=config.seed,
                             start_step=start_step, process_index=jax.process_index(),
                             process_count=jax.process_count(), train=True, **task.data_kwargs)
  if restored.source == "resume" and ckpt.restore_data(start_step, data) and data.step != start_step:
    data.close()
    raise CheckpointError(
        f"Checkpoint step {start_step} in {ckpt.directory} holds an input-pipeline state at step "
        f"{data.step}: the checkpoint's items disagree. Nothing was changed on disk; move its "
        f"'{checkpointing.DATA_ITEM}' directory aside to restart the pipeline at the step.")
  data.start_prefetch()
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  frozen_shardings = task.frozen_shardings
  if callable(frozen_shardings):
    frozen_shardings = frozen_shardings(task.frozen, state_shardings)
  if frozen_shardings is None:
    frozen_shardings = jax.tree.map(lambda _: repl, task.frozen)
  frozen = jax.device_put(task.frozen, frozen_shardings)
  batch_sh = sharding.batch_sharding(mesh)

  steps = _StepCache(task, mesh, rules, (state_shardings, batch_sh, frozen_shardings, repl),
                     (state_shardings, repl))
  logger = metrics_lib.MetricsLogger(workdir)
  peak = (metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind)
          if task.stage_at(start_step).flops_per_example else None)
  pending = None  # (step, device metrics, host stats) of the last logged step, read one step late
  last_scalars: dict[str, float] = {}
  t_log, window = time.perf_counter(), _Window()
  t_start = t_log
  step = start_step
  try:
    for step in range(start_step, config.total_steps):
      local = next(data)
      batch = sharding.make_global_batch(local, mesh)
      stage = task.stage_at(step)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, step_metrics = steps.run(stage, state, batch, frozen, step_rng)
      window.add(stage, config.global_batch_size)
      done = step + 1
      if pending is not None:
        last_scalars = _write(logger, *pending)
        pending = None
      if done % config.log_every == 0 or done == config.total_steps:
        now = time.perf_counter()
        elapsed = max(now - t_log, 1e-9)
        host = {"steps_per_sec": window.steps / elapsed, "tokens_per_sec": window.tokens / elapsed,
                "data_corrupt_skipped": float(data.stats.get("corrupt_skipped", 0))}
        if window.flops and peak:
          host["mfu"] = metrics_lib.model_flops_utilization(window.flops, 1 / elapsed, peak,
                                                            jax.device_count())
        pending = (done, step_metrics, host)
        t_log, window = now, _Window()
      # The step's checkpoint first, then the hooks: a hook that fails (or kills the process)
      # cannot cost the step, and a rerun resumes after it instead of failing there again.
      meta = {"data_step": done}
      preempted = ckpt.should_stop_and_save(done)
      if preempted or done == config.total_steps:
        ckpt.save_now(done, state, meta, data=data)
      else:
        ckpt.save(done, state, meta, data=data)
      due = [(name, hook) for name, (every, hook) in task.hooks.items() if every and done % every == 0]
      if due:
        ckpt.wait_until_finished()  # an asynchronous save of this step is on disk before hooks
        hook_scalars = _run_hooks(due, state, done, workdir, mesh, rules,
                                  stop_on_error=config.get("stop_on_hook_error", False))
        if hook_scalars:
          if pending is not None and pending[0] == done:
            pending = (done, pending[1], {**pending[2], **hook_scalars})
          else:
            last_scalars = {**last_scalars, **logger.write_scalars(done, hook_scalars)}
      if preempted:
        if pending is not None:
          last_scalars = _write(logger, *pending)
          pending = None
        logging.warning("Stopped at step %d on a preemption signal; checkpoint saved.", done)
        return last_scalars
    if pending is not None:
      last_scalars = _write(logger, *pending)
    ckpt.save_now(config.total_steps, state, {"data_step": config.total_steps}, data=data)
    _log_summary(start_step, config.total_steps, time.perf_counter() - t_start, last_scalars, workdir)
    return last_scalars
  finally:
    ckpt.close()
    logger.close()
    if hasattr(data, "close"):
      data.close()


def _log_summary(start_step: int, end_step: int, seconds: float, scalars: dict[str, float],
                 workdir: epath.Path) -> None:
  loss = f", final loss {scalars['loss']:.4f}" if "loss" in scalars else ""
  logging.info("Finished: steps %d-%d in %.1f s (%.2f steps/s)%s; checkpoint %d and metrics.jsonl "
               "in %s.", start_step + 1, end_step, seconds, (end_step - start_step) / max(seconds, 1e-9),
               loss, end_step, workdir)


def check_replicated_params(config: ml_collections.ConfigDict, params, mesh) -> sharding.ShardingReport:
  """Fails if each chip would hold more than config.max_replicated_param_gb of parameters that
  are split over none of the model axes (see `validate_run_config`), naming the largest.

  `params` may be abstract (ShapeDtypeStructs with shardings), so this runs before any array is
  allocated. Pure data parallelism replicates every parameter: small models pass, large ones
  need fsdp (or tensor) > 1 in config.mesh.
  """
  limit_gb = config.get("max_replicated_param_gb", DEFAULT_MAX_REPLICATED_PARAM_GB)
  allow = config.get("allow_replicated_params", False)
  report = sharding.assert_params_sufficiently_sharded(
      params, mesh, max_replicated_fraction=None,
      max_replicated_bytes=None if allow else float(limit_gb) * 1e9,
      remedy=("set config.mesh to split the params over 'fsdp' (e.g. [('data', -1), ('fsdp', 8), "
              "('tensor', 1)]) or map their logical axes there with config.rules; or raise "
              "config.max_replicated_param_gb, or set config.allow_replicated_params=True"))
  if allow and report.replicated_bytes > float(limit_gb) * 1e9:
    logging.warning("%.2f GB of parameters are replicated on every chip (over "
                    "max_replicated_param_gb=%g); allowed by config.allow_replicated_params.",
                    report.replicated_bytes / 1e9, limit_gb)
  return report


def _run_hooks(due, state, step: int, workdir: epath.Path, mesh, rules, *,
               stop_on_error: bool) -> dict[str, float]:
  """Runs the hooks due at `step` (after its checkpoint); returns their scalars.

  A hook that raises is logged with its name and step and skipped, unless `stop_on_error`
  (config.stop_on_hook_error), when the exception propagates and ends the run.

  Multi-host hazard: hooks run on every host and may be collective (the sample hook gathers its
  images across hosts). An exception raised on some hosts only, before a collective the others
  enter, leaves those others waiting in it (a hang, or with stop_on_error a partial exit), and
  the hosts' hook scalars may then differ. Hooks should do their collective work first and keep
  host-local side effects (writing files on host 0) last, where a failure is harmless.
  """
  scalars: dict[str, float] = {}
  for name, hook in due:
    try:
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = hook(state, step, workdir)
    except Exception:  # pylint: disable=broad-except
      if stop_on_error:
        logging.error("Hook %r raised at step %d; stopping (config.stop_on_hook_error=True). "
                      "The checkpoint of step %d is saved.", name, step, step)
        raise
      logging.exception("Hook %r raised at step %d; training goes on (the step's checkpoint is "
                        "saved; set config.stop_on_hook_error=True to stop instead).", name, step)
      continue
    if out:
      scalars.update(out)
  return scalars


class _StepCache:
  """The jitted step of each stage, built the first time the stage comes up."""

  def __init__(self, task: TrainTask, mesh, rules, in_shardings, out_shardings):
    self._task, self._mesh, self._rules = task, mesh, rules
    self._in_shardings, self._out_shardings = in_shardings, out_shardings
    self._steps: dict[Hashable, Callable] = {}

  def _build(self, key: Hashable) -> Callable:
    task = self._task
    if task.staging is None:
      def step_fn(state, batch, frozen, rng):
        return task.train_step(state, batch, frozen, jax.random.fold_in(rng, state.step))
      in_shardings = self._in_shardings
    else:
      stage_step = task.staging.make_step(key)
      def step_fn(state, batch, frozen, rng, inputs):
        return stage_step(state, batch, frozen, jax.random.fold_in(rng, state.step), inputs)
      in_shardings = (*self._in_shardings, self._in_shardings[-1])  # inputs: replicated
      logging.info("Building the step of stage %r (compiled at its first call).", key)
    with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
      return jax.jit(step_fn, in_shardings=in_shardings, out_shardings=self._out_shardings,
                     donate_argnums=0)

  def run(self, stage: Stage, state, batch, frozen, rng):
    if stage.key not in self._steps:
      self._steps[stage.key] = self._build(stage.key)
    fn = self._steps[stage.key]
    if self._task.staging is None:
      return fn(state, batch, frozen, rng)
    inputs = {k: np.float32(v) for k, v in stage.inputs.items()}
    return fn(state, batch, frozen, rng, inputs)


class _Window:
  """Steps, tokens and model FLOPs run since the last log line."""

  def __init__(self):
    self.steps, self.tokens, self.flops = 0, 0, 0.0

  def add(self, stage: Stage, global_batch: int) -> None:
    self.steps += 1
    self.tokens += global_batch * stage.tokens_per_example
    if stage.flops_per_example:
      self.flops += global_batch * stage.flops_per_example


def _write(logger, step, device_metrics, host):
  scalars = {k: float(v) for k, v in jax.device_get(dict(device_metrics)).items()}
  scalars.update(host)
  return logger.write_scalars(step, scalars)  # raises on a non-finite loss / grad norm
