"""Skipping unreadable records: deterministic replacement, a warning per bad record, counts.

A record that cannot be read is replaced by the record that follows it in the stream order (and, if
that one is bad too, the one after), so batches keep their shape and every run, resumed or not,
makes the same replacement.

Hand-written rather than grain's `filter`: a filtered element changes the batch it would have
been in (grain's batching closes over the next element instead), so batch contents would depend
on which records are bad and on the worker layout.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import numpy as np

from var_jax.data.records import UnreadableRecordError
from var_jax.errors import InputError

_LOGGER = logging.getLogger(__name__)

# More unreadable records than this in a row means the data, not a few files, is broken.
MAX_CONSECUTIVE_UNREADABLE = 100


class UnreadableRecords:
  """Thread-safe set of the bad records found so far; each is logged once, when first found."""

  def __init__(self):
    self._lock = threading.Lock()
    self._bad = set()

  def is_known_bad(self, index: int) -> bool:
    with self._lock:
      return index in self._bad

  def add(self, index: int, error: UnreadableRecordError) -> None:
    with self._lock:
      first_time = index not in self._bad
      self._bad.add(index)
    if first_time:
      _LOGGER.warning("Skipping an unreadable record (the next record takes its place): %s", error)


class SkipCounts:
  """Counts for the trainer's logs, over the examples actually delivered (not those read ahead)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._skipped = 0
    self._records = set()

  def add(self, skipped_records) -> None:
    with self._lock:
      self._skipped += len(skipped_records)
      self._records.update(skipped_records)

  def stats(self) -> dict[str, int]:
    """"corrupt_skipped": skips so far; "corrupt_records": distinct bad records among them."""
    with self._lock:
      return {"corrupt_skipped": self._skipped, "corrupt_records": len(self._records)}

  def records(self) -> frozenset[int]:
    """The distinct bad records counted so far."""
    with self._lock:
      return frozenset(self._records)

  def restore(self, skipped: int, records) -> None:
    """Continues counting from a saved `stats()["corrupt_skipped"]` and `records()`."""
    with self._lock:
      self._skipped = int(skipped)
      self._records = {int(index) for index in records}


def load_skipping_unreadable(
    load: Callable[[int], dict[str, np.ndarray]], stream: np.ndarray, position: int,
    unreadable: UnreadableRecords, record_id: Callable[[int], str],
) -> tuple[int, dict[str, np.ndarray], tuple[int, ...]]:
  """Loads the record at stream[position % N], or the first readable one after it.

  Args:
    load: loads a record by index; raises UnreadableRecordError for a bad one.
    stream: int (N,) record indices in stream order (an epoch's permutation, or arange(N)).
    position: where in the stream to start; wraps around at N.
    unreadable: the bad records found so far (skipped without another read).
    record_id: names a record in the error raised when too many records in a row are bad.

  Returns:
    (index of the record loaded, its example, indices of the bad records skipped before it).

  Raises:
    InputError: MAX_CONSECUTIVE_UNREADABLE records in a row (or all of them) are unreadable.
  """
  num_records = len(stream)
  attempts = min(num_records, MAX_CONSECUTIVE_UNREADABLE)
  skipped = []
  for offset in range(attempts):
    index = int(stream[(position + offset) % num_records])
    if not unreadable.is_known_bad(index):
      try:
        return index, load(index), tuple(skipped)
      except UnreadableRecordError as error:
        unreadable.add(index, error)
    skipped.append(index)
  raise InputError(
      f"{attempts} records in a row are unreadable, from "
      f"{record_id(int(stream[position % num_records]))} on: the data set looks broken; check the "
      "data dir and the files' format.")
