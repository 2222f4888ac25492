"""One host's batch of a step, as the map of a grain pipeline: step -> {"image" | "tokens", "label"}.

`LoadHostBatch` is the grain transform the input pipeline maps over the steps: for step s it
reads this host's positions of global batch s (`order.GlobalOrder.host_positions`), loads those
examples (replacing unreadable records as `skipping` says) and stacks them. A batch is a pure
function of (seed, step, process_index, process_count), wherever and in whichever thread or
worker process it is loaded.

The batch also carries SKIPPED_KEY: int64 (k,), the records replaced in it, which the iterator
removes and counts (workers run in other processes, so the counts travel with the batches).
"""
from __future__ import annotations

from typing import Protocol

import grain
import numpy as np

from var_jax.data.order import GlobalOrder, local_batch_size
from var_jax.data.records import UnreadableRecordError
from var_jax.data.skipping import UnreadableRecords, load_skipping_unreadable
from var_jax.errors import ConfigError

SKIPPED_KEY = "_skipped_records"


class Examples(Protocol):
  """Loads the examples of a data set by record index and epoch.

  Implementations are pickled into grain's worker processes: keep them cheap to pickle (reopen
  files in the worker rather than carrying their contents).
  """
  num_classes: int

  @property
  def num_records(self) -> int:
    """Number of records."""

  def record_id(self, index: int) -> str:
    """A name for record `index` in logs."""

  def load(self, index: int, epoch: int) -> dict[str, np.ndarray]:
    """The example's arrays; raises UnreadableRecordError when the record is corrupt."""

  # Optional: load_batch(indices, epoch) -> list of examples, raising UnreadableRecordError when
  # any of them is bad; used when present (one parallel read of many records, e.g. array_record).


class LoadHostBatch(grain.transforms.Map):
  """Maps a step to this host's batch of it (a grain `Map` transform over the steps)."""

  def __init__(self, examples: Examples, order: GlobalOrder, *, process_index: int,
               process_count: int, with_mask: bool = False):
    """
    Args:
      examples: loads one example by (record index, epoch).
      order: which records make up each global batch.
      process_index: this host, in [0, process_count).
      process_count: hosts reading slices of every global batch.
      with_mask: add "mask", bool (b,), False on the padding that completes a final partial batch
        (for evaluation over exactly the data set).
    """
    self.local_batch = local_batch_size(order.global_batch, process_count)
    if not 0 <= process_index < process_count:
      raise ConfigError(
          f"process_index={process_index} is outside [0, process_count={process_count}).")
    self.examples = examples
    self.order = order
    self.process_index = process_index
    self.process_count = process_count
    self.with_mask = with_mask
    self._reset_caches()

  def _reset_caches(self) -> None:
    # Per process: the bad records found so far (so each is read and logged once per process) and
    # the permutations of the last epochs seen.
    self._unreadable = UnreadableRecords()
    self._permutations = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_unreadable"], state["_permutations"]  # a lock, and arrays a worker recomputes
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._reset_caches()

  def _permutation(self, epoch: int) -> np.ndarray:
    permutation = self._permutations.get(epoch)
    if permutation is None:
      permutation = self.order.permutation(epoch)
      # Threads may race here; both compute the same array. Keep the two newest epochs.
      self._permutations = {e: p for e, p in self._permutations.items() if e >= epoch - 1}
      self._permutations[epoch] = permutation
    return permutation

  def map(self, step: int) -> dict[str, np.ndarray]:
    epoch, positions = self.order.host_positions(int(step), self.process_index, self.process_count)
    permutation = self._permutation(epoch)
    examples, skipped = self._load(epoch, permutation, positions)
    batch = {key: np.stack([example[key] for example in examples]) for key in examples[0]}
    if self.with_mask:
      batch["mask"] = positions < self.order.num_records
    batch[SKIPPED_KEY] = np.asarray(skipped, np.int64)
    return batch

  def _load(self, epoch: int, permutation: np.ndarray,
            positions: np.ndarray) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """The examples at `positions` of the epoch's stream, and the records skipped for them."""
    load_batch = getattr(self.examples, "load_batch", None)
    if load_batch is not None:
      indices = [int(permutation[q % len(permutation)]) for q in positions]
      if not any(self._unreadable.is_known_bad(index) for index in indices):
        try:
          return load_batch(indices, epoch), []
        except UnreadableRecordError:
          pass  # Record by record below: finds the bad ones and replaces them.
    examples, skipped = [], []
    for position in positions:
      _, example, skipped_here = load_skipping_unreadable(
          lambda index: self.examples.load(index, epoch), permutation, int(position),
          self._unreadable, self.examples.record_id)
      examples.append(example)
      skipped.extend(skipped_here)
    return examples, skipped
