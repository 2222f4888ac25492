"""This host's stream of batches, read by a grain pipeline, with a checkpointable state.

The pipeline is `grain.MapDataset.range(start_step, stop).map(LoadHostBatch(...))`: element s is
this host's batch of step s (`host_batches`). grain reads it ahead with `num_threads` threads,
each loading whole batches (`to_iter_dataset`), and, with `num_processes` > 0, in that many worker
processes (`mp_prefetch`; each worker takes every num_processes-th step and grain interleaves
them back into step order). A batch does not depend on how it was loaded.

Why grain's `IndexSampler` / `ShardByJaxProcess` are not used: they shard the records per host
and shuffle within each host's shard, so the global batch of a step would depend on the number
of hosts and a run could not change slice size and keep its stream. `order.GlobalOrder` keeps the
property that host slices concatenate to one global batch that is a function of (seed, step)
alone; grain runs the loading.

The state (`get_state`, JSON) holds the next step, grain's own iterator state and the layout
both were made with. The trainer saves it in every Orbax checkpoint (one file per host, grain's
checkpoint handler) and `set_state` restores grain's position exactly; since a batch is a pure
function of its step, a state saved under another layout (hosts, worker processes) is restored by
restarting at its step, which gives the same batches.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import grain
from absl import flags
import numpy as np

from var_jax.data.host_batches import SKIPPED_KEY, Examples, LoadHostBatch
from var_jax.data.order import GlobalOrder
from var_jax.data.skipping import SkipCounts
from var_jax.errors import CheckpointError, ConfigError

STATE_FORMAT = "var_jax.input_iterator"
STATE_VERSION = 1
# The stop of an endless training stream (grain's datasets have a length): 2**62 steps.
ENDLESS = 1 << 62


class InputIterator:
  """Yields this host's part of global batches start_step, start_step + 1, ... as numpy dicts.

  Attributes:
    examples: loads the examples (holds the source, e.g. `examples.source.class_names`).
    order: the global record order (shared by all hosts).
    local_batch: examples per batch on this host (global_batch // process_count).
    steps_per_epoch: global batches per epoch.
    num_classes: labels lie in [0, num_classes).
    step: the step of the batch the next `next()` returns.
  """

  def __init__(self, examples: Examples, order: GlobalOrder, *, start_step: int,
               process_index: int, process_count: int, num_threads: int, prefetch: int,
               num_processes: int = 0, num_steps: int | None = None, with_mask: bool = False):
    """Sets up the pipeline; reading starts at the first `next()` (or `start_prefetch()`).

    Args:
      examples: loads one example by (record index, epoch).
      order: which records make up each global batch.
      start_step: the first step to yield; a resumed run passes the step it resumes at.
      process_index: this host, in [0, process_count).
      process_count: number of hosts reading slices of every global batch.
      num_threads: threads per process, each loading whole batches.
      prefetch: batches read ahead beyond those the threads are loading.
      num_processes: grain worker processes (0: load in this process).
      num_steps: stop before this step (None: never stop).
      with_mask: add "mask", bool (b,), False on the padding of a final partial batch.
    """
    for value, name, minimum in ((start_step, "start_step", 0), (num_threads, "num_workers", 1),
                                 (prefetch, "prefetch", 0), (num_processes, "num_processes", 0)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}.")
    self._load = LoadHostBatch(examples, order, process_index=process_index,
                               process_count=process_count, with_mask=with_mask)
    self.examples = examples
    self.order = order
    self.local_batch = self._load.local_batch
    self.steps_per_epoch = order.steps_per_epoch
    self.num_classes = examples.num_classes
    self.step = int(start_step)
    self._num_threads = num_threads
    self._prefetch = prefetch
    self._num_processes = num_processes
    self._stop = ENDLESS if num_steps is None else num_steps
    self._start_step = self.step  # the first step of the current grain pipeline
    self._iterator = None
    self._skip_counts = SkipCounts()
    self._closed = False

  # -- the grain pipeline ----------------------------------------------------------------------

  def _pipeline(self, start_step: int) -> grain.IterDataset:
    steps = grain.MapDataset.range(start_step, max(start_step, self._stop))
    # Each thread loads one whole batch: num_threads batches load at once, `prefetch` more wait.
    dataset = steps.map(self._load).to_iter_dataset(grain.ReadOptions(
        num_threads=self._num_threads, prefetch_buffer_size=self._num_threads + self._prefetch))
    if self._num_processes:
      # grain's multiprocessing reads its absl flags; a program that never parsed absl flags (our
      # argparse CLI, a notebook) gets their defaults instead of UnparsedFlagAccessError.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._num_processes, per_worker_buffer_size=max(1, self._prefetch)))
    return dataset

  def _start(self, start_step: int, grain_state: dict | None = None) -> None:
    self._close_iterator()
    self._start_step = start_step
    self._iterator = iter(self._pipeline(start_step))
    if grain_state is not None:
      self._iterator.set_state(grain_state)

  def start_prefetch(self) -> None:
    """Starts reading ahead now instead of at the first `next()`."""
    if self._iterator is None and not self._closed:
      self._start(self.step)

  # -- iteration -------------------------------------------------------------------------------

  @property
  def stats(self) -> dict[str, int]:
    """Counts over the batches returned so far (carried across resumes by the state): times a bad
    record was replaced ("corrupt_skipped") and distinct bad records ("corrupt_records")."""
    return self._skip_counts.stats()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._closed:
      raise StopIteration
    if self._iterator is None:
      self._start(self.step)
    batch = next(self._iterator)
    skipped = batch.pop(SKIPPED_KEY)
    if skipped.size:
      self._skip_counts.add(tuple(int(index) for index in skipped))
    self.step += 1
    return batch

  def _close_iterator(self) -> None:
    if self._iterator is not None and hasattr(self._iterator, "close"):
      self._iterator.close()  # stops mp_prefetch's worker processes
    self._iterator = None

  def close(self) -> None:
    """Stops the reading threads and worker processes; batches read ahead are dropped."""
    self._closed = True
    self._close_iterator()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  # -- state -----------------------------------------------------------------------------------

  def _layout(self) -> dict[str, Any]:
    """What a saved grain state is only valid under (the stream itself depends on the order)."""
    return {"num_records": self.order.num_records, "global_batch": self.order.global_batch,
            "seed": self.order.seed, "shuffle": self.order.shuffle,
            "remainder": self.order.remainder, "process_index": self._load.process_index,
            "process_count": self._load.process_count, "num_threads": self._num_threads,
            "prefetch": self._prefetch, "num_processes": self._num_processes}

  def get_state(self) -> dict[str, Any]:
    """The position after the batches returned so far, as a JSON-able dict."""
    grain_state = None
    if self._iterator is not None and self.step > self._start_step:
      grain_state = self._iterator.get_state()
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "step": self.step,
            "start_step": self._start_step, "grain": grain_state, "layout": self._layout(),
            "stats": {"corrupt_skipped": self._skip_counts.stats()["corrupt_skipped"],
                      "corrupt_records": sorted(self._skip_counts.records())}}

  def set_state(self, state: dict[str, Any] | bytes | str) -> None:
    """Continues from a `get_state()` result (or its JSON).

    Raises:
      CheckpointError: the state is not one this iterator wrote.
    """
    if isinstance(state, (bytes, str)):
      try:
        state = json.loads(state)
      except ValueError as error:
        raise CheckpointError(f"The saved input-pipeline state is not JSON ({error}).") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
      raise CheckpointError(
          f"The saved input-pipeline state is not a {STATE_FORMAT} state: {str(state)[:200]}")
    if state.get("version") != STATE_VERSION:
      raise CheckpointError(
          f"The saved input-pipeline state has version {state.get('version')!r}; this version "
          f"reads {STATE_VERSION}. Resume with the version that wrote it.")
    step = int(state["step"])
    stats = state.get("stats") or {}
    self._skip_counts = SkipCounts()
    self._skip_counts.restore(int(stats.get("corrupt_skipped", 0)),
                              stats.get("corrupt_records", ()))
    if state.get("grain") is not None and state.get("layout") == self._layout():
      self._start(int(state["start_step"]), state["grain"])
    else:
      if state.get("grain") is not None:
        logging.info("The saved input-pipeline state was made under another layout (%s, now %s): "
                     "restarting the pipeline at its step %d, which reads the same batches.",
                     state.get("layout"), self._layout(), step)
      self._close_iterator()
    self.step = step
