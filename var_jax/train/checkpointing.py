"""Orbax checkpoints of the train state: async save, keep-N, auto-resume, preemption.

Layout: `WORKDIR/checkpoints/<step>/{state, meta, data}`; `state` is the train-state pytree
(`StandardSave`), `meta` a small JSON object (step, config hash, data position, ...), `data` the
input iterator's position, one `process_<i>-of-<n>.json` per host (grain's Orbax handler; absent
from checkpoints of runs that predate it, which resume from the step alone).

Restore order (`Checkpointer.restore_or_init`): the latest step in this workdir (auto-resume
after preemption) → `init_from` (parameters only, from another run's checkpoint) → fresh init.
Arrays are restored straight into the shardings of the abstract state, so nothing is ever
materialised unsharded.

Nothing here deletes or rewrites a saved step: a checkpoint that does not fit the model, or
that cannot be read, raises `CheckpointError` naming the directory and the problem, and the
files stay as they are. (Orbax itself only removes steps beyond `max_to_keep` after a newer
save has completed.)

Paths go through `etils.epath`, so `gs://bucket/run` workdirs work as local ones do.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import signal
import threading
from typing import Any, Callable, Mapping

import jax
import numpy as np
import grain
import orbax.checkpoint as ocp
from etils import epath

from var_jax.checkpoints import runs
from var_jax.checkpoints.runs import (CHECKPOINT_SUBDIR, STATE_ITEM, as_absolute, describe_mismatch,
                                     shapes_by_path, short_error)
from var_jax.errors import CheckpointError, ConfigError

META_ITEM = "meta"
DATA_ITEM = "data"


class _SavedIteratorState:
  """What grain's checkpoint handler saves and restores in place of a live iterator.

  Saving: the state is read when `save` is called, not when the (asynchronous) write runs, so it is
  the position after exactly the batches of the saved step. Restoring: the handler hands the JSON
  to `set_state` and calls `start_prefetch`, which go to the target iterator.
  """

  def __init__(self, state: Mapping[str, Any] | None = None, target: Any = None):
    self._json = json.dumps(state).encode() if state is not None else None
    self._target = target

  def get_state(self) -> bytes:
    return self._json

  def set_state(self, state: bytes) -> None:
    self._target.set_state(state)

  def start_prefetch(self) -> None:
    self._target.start_prefetch()


def config_hash(config: Any) -> str:
  """Short stable hash of a config (ConfigDict, dict or JSON-able value) for the meta record."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  text = json.dumps(config, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class RestoreResult:
  """What `Checkpointer.restore_or_init` did.

  Attributes:
    state: the train state.
    meta: the JSON meta record of the restored step ({} for init_from and fresh starts).
    source: "resume", "init_from" or "fresh".
    step: the restored step (None for a fresh start; the source step for init_from).
  """
  state: Any
  meta: dict[str, Any]
  source: str
  step: int | None


class Checkpointer:
  """Owns `WORKDIR/checkpoints`: periodic async saves, auto-resume and preemption saves.

  Usage in a trainer:

    ckpt = Checkpointer(workdir, save_interval_steps=..., max_to_keep=...,
                        config_hash=config_hash(config))
    result = ckpt.restore_or_init(abstract_state, init_fn, init_from=config.init_from)
    for step in range(start, total):
      state, metrics = p_step(state, batch, rng)
      ckpt.save(step + 1, state, meta={"data_position": ...})      # every step; orbax decides
      if ckpt.should_stop_and_save(step + 1):
        ckpt.save_now(step + 1, state, meta=...)                     # forced save + wait
        break
    ckpt.close()

  The SIGTERM handler (single-host runs) only sets a flag; the save happens in the training
  loop at the next `should_stop_and_save`, where the state is consistent. On multi-host runs
  JAX's preemption service owns SIGTERM (and TPU maintenance events) and all hosts agree on
  the save step through `reached_preemption`; a per-host flag would make one host save alone
  and hang the collective write, so no Python handler is installed there.
  """

  def __init__(
      self,
      workdir: epath.PathLike,
      *,
      save_interval_steps: int = 1000,
      max_to_keep: int | None = 3,
      async_save: bool = True,
      config_hash: str | None = None,
      handle_sigterm: bool | None = None,
  ):
    """Opens (creating if needed) `workdir/checkpoints`.

    Args:
      workdir: run directory, local or gs://.
      save_interval_steps: `save` writes only every this many steps (unless forced).
      max_to_keep: newest steps to keep; None keeps all.
      async_save: write in a background thread after the device→host copy.
      config_hash: stored in each meta record; a resume with another hash logs a warning.
      handle_sigterm: install the SIGTERM flag handler; None = only on single-host runs.

    Raises:
      ConfigError: on a bad interval / keep count.
    """
    if save_interval_steps < 1:
      raise ConfigError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
    if max_to_keep is not None and max_to_keep < 1:
      raise ConfigError(f"max_to_keep must be >= 1 or None (keep all), got {max_to_keep}.")
    self.directory = as_absolute(workdir) / CHECKPOINT_SUBDIR
    self.config_hash = config_hash
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps, max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                       META_ITEM: ocp.JsonCheckpointHandler(),
                       DATA_ITEM: grain.checkpoint.CheckpointHandler()})
    self._sigterm = threading.Event()
    self._handler_installed = False
    self._previous_handler = None
    if handle_sigterm is None:
      handle_sigterm = jax.process_count() == 1
    if handle_sigterm:
      self._install_sigterm_handler()

  # -- preemption ------------------------------------------------------------------------------

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: will save a checkpoint at the next step and stop.")
    self._sigterm.set()

  def _install_sigterm_handler(self):
    try:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    except ValueError:  # signal handlers can only be set from the main thread
      logging.warning("Not in the main thread: SIGTERM will not trigger a checkpoint save.")
    else:
      self._handler_installed = True

  @property
  def sigterm_received(self) -> bool:
    return self._sigterm.is_set()

  def should_stop_and_save(self, step: int) -> bool:
    """True when the run must save now and exit (SIGTERM, or a pod-wide preemption point).

    Call it at every step on every host: `reached_preemption` is a collective agreement on
    the step at which all hosts save.
    """
    preempted = self._manager.reached_preemption(step)
    return preempted or self._sigterm.is_set()

  # -- saving ----------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def _meta_record(self, step: int, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    record = dict(meta or {})
    record["step"] = int(step)
    record["config_hash"] = self.config_hash
    # numpy / jax scalars (a data position read off the device, say) become plain JSON values.
    return json.loads(json.dumps(record, default=lambda x: np.asarray(x).tolist()))

  def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None, *,
           force: bool = False, data: Any = None) -> bool:
    """Saves `state` at `step` if the interval says so (or `force`); returns whether it did.

    Asynchronous: returns once the arrays are copied off the devices, so `state` may be
    donated to the next step right away. A step that already exists is never overwritten.

    Args:
      step: the step the state has reached.
      state: the train state.
      meta: small JSON-able record stored beside it.
      force: save even off the interval.
      data: the input iterator (`get_state()` -> JSON-able dict); its position after `step`'s
        batch is saved too, per host, and `restore_data` puts it back.
    """
    if step in self._manager.all_steps():
      return False
    items = {STATE_ITEM: ocp.args.StandardSave(state),
             META_ITEM: ocp.args.JsonSave(self._meta_record(step, meta))}
    if data is not None:
      # Read on every call (a small dict): asking orbax first whether it will save would run its
      # multi-host preemption check a second time for the step.
      items[DATA_ITEM] = grain.checkpoint.CheckpointSave(_SavedIteratorState(data.get_state()))
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def save_now(self, step: int, state: Any, meta: Mapping[str, Any] | None = None, *,
               data: Any = None) -> None:
    """Forced save (unless `step` is already saved) and wait until it is on disk."""
    self.save(step, state, meta, force=True, data=data)
    self._manager.wait_until_finished()

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, closes the manager and puts the old SIGTERM handler back."""
    self._manager.wait_until_finished()
    self._manager.close()
    if self._handler_installed:
      # None means the old handler was not set from Python; the default is the best we can do.
      previous = signal.SIG_DFL if self._previous_handler is None else self._previous_handler
      signal.signal(signal.SIGTERM, previous)
      self._handler_installed = False

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- restoring -------------------------------------------------------------------------------

  def _read_metadata(self, step: int) -> Any:
    try:
      saved = self._manager.item_metadata(step)[STATE_ITEM]
      saved = saved.tree if hasattr(saved, "tree") else saved
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
      raise CheckpointError(
          f"Cannot read the metadata of checkpoint step {step} in {self.directory} "
          f"({short_error(e)}). Nothing was changed on disk. Move that step directory aside to "
          "resume from an older step, or start in a new workdir.") from e
    if not shapes_by_path(saved):
      raise CheckpointError(
          f"Checkpoint step {step} in {self.directory} has no readable state metadata (a file "
          "is missing or corrupt). Nothing was changed on disk. Move that step directory aside "
          "to resume from an older step, or start in a new workdir.")
    return saved

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores step `step` (default: latest) into the shapes and shardings of `abstract_state`.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` (see
        `var_jax.parallel.sharding.abstract_sharded_state`), or of real arrays to take those from.
      step: which step; None = the latest.

    Returns:
      (state, meta).

    Raises:
      CheckpointError: no checkpoint, a structure/shape mismatch (each one listed), or an
        unreadable checkpoint. The files on disk are left untouched.
    """
    self._manager.wait_until_finished()  # a step still being written is not readable yet
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise CheckpointError(
          f"No checkpoint step {step} in {self.directory} (have {self.all_steps()}).")
    abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    saved = self._read_metadata(step)
    problems = describe_mismatch(saved, abstract_state)
    if problems:
      raise CheckpointError(
          f"Checkpoint step {step} in {self.directory} does not fit the current model/optimizer "
          f"config ({len(problems)} differences): " + "; ".join(problems[:20]) +
          ". The checkpoint was left untouched. Use the config it was saved with, or start a "
          "new workdir (optionally with init_from pointing here for the parameters).")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardRestore(abstract_state),
          META_ITEM: ocp.args.JsonRestore()}))
    except Exception as e:  # corrupt or truncated files surface as various orbax errors
      raise CheckpointError(
          f"Cannot restore checkpoint step {step} from {self.directory} ({short_error(e)}). Nothing "
          "was changed on disk. Move that step directory aside to resume from an older step, "
          "or start in a new workdir.") from e
    meta = dict(restored[META_ITEM] or {})
    if self.config_hash and meta.get("config_hash") not in (None, self.config_hash):
      logging.warning("Resuming step %d saved with config hash %s under config hash %s.",
                      step, meta.get("config_hash"), self.config_hash)
    return restored[STATE_ITEM], meta

  def restore_data(self, step: int, data: Any) -> bool:
    """Puts the input iterator saved with `step` (this host's file) into `data` (`set_state`).

    Returns False, leaving `data` as it is, when the step holds no iterator state for this host
    (a checkpoint from before iterator states were saved, or one written by another number of
    hosts): a batch is a function of its step, so starting `data` at `step` reads the same.

    Raises:
      CheckpointError: the saved state cannot be read.
    """
    self._manager.wait_until_finished()
    item_dir = self.directory / str(step) / DATA_ITEM
    process_file = item_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not process_file.exists():
      logging.info("Checkpoint step %d has no input-pipeline state for this host (%s): the "
                   "pipeline starts at the step.", step, process_file)
      return False
    try:
      self._manager.restore(step, args=ocp.args.Composite(**{
          DATA_ITEM: grain.checkpoint.CheckpointRestore(_SavedIteratorState(target=data))}))
    except Exception as e:  # the iterator's CheckpointError, or orbax's wrapping of the handler's
      raise CheckpointError(
          f"Cannot restore the input-pipeline state of checkpoint step {step} from "
          f"{process_file} ({short_error(e)}). Nothing was changed on disk. Move that file aside "
          "to restart the pipeline at the step (same batches), or resume from an older step.") from e
    return True

  def restore_or_init(
      self,
      abstract_state: Any,
      init_fn: Callable[[], Any],
      init_from: epath.PathLike | None = None,
  ) -> RestoreResult:
    """Latest step here → parameters from `init_from` → `init_fn()`.

    Args:
      abstract_state: abstract sharded train state (what `init_fn` returns, as shapes).
      init_fn: () -> fresh sharded train state (e.g. `var_jax.parallel.sharding.init_sharded`).
      init_from: another run's workdir, its `checkpoints` directory or one step directory;
        only `params` are taken from it (also copied into `ema_params` if the state has one). Or
        a function (abstract params) -> (description, params) giving them (host or device
        arrays of the abstract params' shapes; they are put in its shardings).

    Raises:
      CheckpointError: as `restore` and `restore_params`.
    """
    step = self.latest_step()
    if step is not None:
      state, meta = self.restore(abstract_state, step)
      logging.info("Resumed from %s step %d.", self.directory, step)
      return RestoreResult(state, meta, "resume", step)
    if init_from:
      if callable(init_from):
        source, params = init_from(abstract_state.params)
        params = _put_params(params, abstract_state.params, source)
        source_step = -1
      else:
        source_step, params = restore_params(init_from, abstract_state.params)
        source = f"{init_from} step {source_step}"
      state = init_fn()
      updates = {"params": params}
      if getattr(state, "ema_params", None) is not None:
        # Own buffers: the step donates the state, and one buffer cannot be donated twice.
        updates["ema_params"] = jax.tree.map(lambda x: x.copy(), params)
      logging.info("Initialised params from %s.", source)
      return RestoreResult(state.replace(**updates), {}, "init_from", source_step)
    return RestoreResult(init_fn(), {}, "fresh", None)


def _put_params(params: Any, abstract_params: Any, source: str) -> Any:
  """`params` placed in the shardings (and dtypes) of `abstract_params`, after checking shapes."""
  if jax.tree.structure(params) != jax.tree.structure(abstract_params):
    raise CheckpointError(f"The params of {source} do not have this run's layout: set the model "
                          "config to that model's architecture.")
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  for (path, want), got in zip(flat, jax.tree.leaves(params)):
    if tuple(np.shape(got)) != tuple(want.shape):
      raise CheckpointError(f"{source}: param {jax.tree_util.keystr(path)} has shape "
                            f"{tuple(np.shape(got))}, this run's model {tuple(want.shape)}: set the "
                            "model config to that model's architecture.")
  def put(x, a):
    if isinstance(x, jax.Array):
      return jax.device_put(x.astype(a.dtype), a.sharding)
    host = np.asarray(x, a.dtype)  # every host holds the whole array: each places its own shards
    return jax.make_array_from_callback(host.shape, a.sharding, lambda index: host[index])
  return jax.tree.map(put, params, abstract_params)


def _find_step_dir(path: epath.Path) -> epath.Path:
  """The step directory `path` names: itself, or the latest step under it (or its checkpoints)."""
  if (path / STATE_ITEM).exists():
    return path
  for root in (path, path / CHECKPOINT_SUBDIR):
    if root.is_dir():
      steps = sorted((int(p.name), p) for p in root.iterdir()
                     if p.name.isdigit() and (p / STATE_ITEM).exists())
      if steps:
        return steps[-1][1]
  raise CheckpointError(
      f"init_from={path} holds no checkpoint: expected a step directory with a '{STATE_ITEM}' "
      f"item, or a workdir / '{CHECKPOINT_SUBDIR}' directory containing numbered steps.")


def restore_params(init_from: epath.PathLike, abstract_params: Any, *, key: str = "params") -> tuple[int, Any]:
  """Loads only the `key` subtree (default `params`; or `ema_params`) of another run's checkpoint.

  Returns:
    (source step, params) with params in the shardings of `abstract_params`.

  Raises:
    CheckpointError: if there is no checkpoint, or its params do not fit.
  """
  step_dir = _find_step_dir(as_absolute(init_from))
  params = runs.restore_subtree(step_dir, abstract_params, key, hint=(
      " Point init_from at a complete checkpoint of a run trained with the same model config."))
  return int(step_dir.name) if step_dir.name.isdigit() else -1, params
