"""This host's stream of batches: parallel example loading, read-ahead, skipping of corrupt records.

Examples are loaded by a thread pool (image decoding and resizing in PIL, and numpy copies, release
the GIL, so threads use several cores without the start-up and pickling costs of processes). The
examples of the next `prefetch` batches are queued on the pool while the current one is consumed.

A record that cannot be read is replaced by the next record of the epoch's stream order (see
`skipping`), so batch shapes never change and the replacement is the same on every run. Each bad
record is logged once and the skips are counted in `stats`.
"""
from __future__ import annotations

import collections
import concurrent.futures
from typing import Protocol

import numpy as np

from var_jax.data.order import GlobalOrder, local_batch_size
from var_jax.data.skipping import SkipCounts, UnreadableRecords, load_skipping_unreadable
from var_jax.errors import ConfigError


class Examples(Protocol):
  """Loads one example of a data set by record index and epoch."""
  num_classes: int

  @property
  def num_records(self) -> int:
    """Number of records."""

  def record_id(self, index: int) -> str:
    """A name for record `index` in logs."""

  def load(self, index: int, epoch: int) -> dict[str, np.ndarray]:
    """The example's arrays; raises UnreadableRecordError when the record is corrupt."""


class BatchIterator:
  """Yields this host's part of global batches start_step, start_step + 1, ... as numpy dicts.

  Attributes:
    examples: loads the examples (holds the source, e.g. `examples.source.class_names`).
    order: the global record order (shared by all hosts).
    local_batch: examples per batch on this host (global_batch // process_count).
    steps_per_epoch: global batches per epoch.
    num_classes: labels lie in [0, num_classes).
    step: the step of the batch the next `next()` returns.
  """

  def __init__(self, examples: Examples, order: GlobalOrder, *, start_step: int, process_index: int,
               process_count: int, num_workers: int, prefetch: int, num_steps: int | None = None,
               with_mask: bool = False):
    """Starts reading.

    Args:
      examples: loads one example by (record index, epoch).
      order: which records make up each global batch.
      start_step: the first step to yield; a resumed run passes the step it resumes at.
      process_index: this host, in [0, process_count).
      process_count: number of hosts reading slices of every global batch.
      num_workers: threads loading examples.
      prefetch: batches read ahead of the current one.
      num_steps: stop before this step (None: never stop).
      with_mask: add "mask", bool (b,), False on the padding that completes a final partial
        batch (for evaluation over exactly the data set).
    """
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
      raise ConfigError(f"start_step must be a non-negative int, got {start_step!r}.")
    if num_workers < 1 or prefetch < 0:
      raise ConfigError(
          f"num_workers must be >= 1 and prefetch >= 0, got {num_workers} and {prefetch}.")
    self.local_batch = local_batch_size(order.global_batch, process_count)
    if not 0 <= process_index < process_count:
      raise ConfigError(
          f"process_index={process_index} is outside [0, process_count={process_count}).")
    self.order = order
    self.steps_per_epoch = order.steps_per_epoch
    self.num_classes = examples.num_classes
    self.step = start_step
    self.examples = examples
    self._process_index = process_index
    self._process_count = process_count
    self._prefetch = prefetch
    self._num_steps = num_steps
    self._with_mask = with_mask
    self._next_to_submit = start_step
    self._pending = collections.deque()
    self._permutations = {}
    self._unreadable = UnreadableRecords()
    self._skip_counts = SkipCounts()
    self._pool = concurrent.futures.ThreadPoolExecutor(
        num_workers, thread_name_prefix="var_jax_data")
    self._closed = False
    self._submit_ahead()

  @property
  def stats(self) -> dict[str, int]:
    """Counts for logging over the batches returned so far: "corrupt_skipped" (times a bad record
    was replaced) and "corrupt_records" (distinct bad records among them), on this host."""
    return self._skip_counts.stats()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._closed or not (self._pending or self._submit_next()):
      raise StopIteration
    futures, mask = self._pending.popleft()
    loaded = [future.result() for future in futures]
    for _, _, skipped in loaded:
      if skipped:
        self._skip_counts.add(skipped)
    examples = [example for _, example, _ in loaded]
    self.step += 1
    self._submit_ahead()
    batch = {key: np.stack([example[key] for example in examples]) for key in examples[0]}
    if self._with_mask:
      batch["mask"] = mask
    return batch

  def close(self) -> None:
    """Stops the worker threads; pending reads are dropped."""
    self._closed = True
    self._pending.clear()
    self._pool.shutdown(wait=False, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      if len(self._permutations) >= 2:
        del self._permutations[min(self._permutations)]
      self._permutations[epoch] = self.order.permutation(epoch)
    return self._permutations[epoch]

  def _submit_next(self) -> bool:
    """Queues the examples of the next batch on the pool; False when there is none left."""
    if self._num_steps is not None and self._next_to_submit >= self._num_steps:
      return False
    epoch, positions = self.order.host_positions(
        self._next_to_submit, self._process_index, self._process_count)
    permutation = self._permutation(epoch)
    futures = [self._pool.submit(self._load, epoch, permutation, int(position))
               for position in positions]
    self._pending.append((futures, positions < self.order.num_records))
    self._next_to_submit += 1
    return True

  def _submit_ahead(self) -> None:
    """Keeps `prefetch` batches beyond the one last returned in flight."""
    while len(self._pending) < self._prefetch and self._submit_next():
      pass

  def _load(self, epoch: int, permutation: np.ndarray, position: int):
    return load_skipping_unreadable(
        lambda index: self.examples.load(index, epoch), permutation, position, self._unreadable,
        self.examples.record_id)
