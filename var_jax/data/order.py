"""Which records make up global batch `step`, and which part of it each host reads.

The order is a pure function of (seed, step): every host computes the same seeded permutation of
the records for each epoch, global batch s is the contiguous chunk [s' * B, s' * B + B) of its
epoch's stream (s' = s mod steps_per_epoch), and host p of P reads the contiguous slice
[p * B/P, (p + 1) * B/P) of that chunk. Resuming at any step therefore reproduces the batches an
uninterrupted run would have seen, and the host slices concatenate to the global batch.

The epoch stream is the permutation itself, followed, with epoch_remainder="pad", by its head
again up to a whole number of batches (as the official `DistInfiniteBatchSampler`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from var_jax.errors import ConfigError, InputError

# Domain tag of the per-epoch permutation stream (see augment.example_rng for the other streams).
PERMUTATION_STREAM = 0


def local_batch_size(global_batch: int, process_count: int) -> int:
  """global_batch // process_count, or ConfigError when it does not divide evenly."""
  if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
    raise ConfigError(f"global_batch must be a positive int, got {global_batch!r}.")
  if isinstance(process_count, bool) or not isinstance(process_count, int) or process_count < 1:
    raise ConfigError(f"process_count must be a positive int, got {process_count!r}.")
  if global_batch % process_count:
    raise ConfigError(
        f"global_batch={global_batch} is not divisible by process_count={process_count}: every "
        f"host reads global_batch / process_count examples; use a multiple of {process_count}.")
  return global_batch // process_count


@dataclasses.dataclass(frozen=True)
class GlobalOrder:
  """The record order of a seeded, epoch-based stream of global batches.

  Attributes:
    num_records: N, records in the data set.
    global_batch: B, examples per step over all hosts.
    seed: seeds the per-epoch permutations; the same on every host.
    shuffle: False keeps the records in index order every epoch (evaluation).
    remainder: "pad" (ceil(N / B) steps per epoch, the last batch filled from the epoch's head) or
      "drop" (N // B steps per epoch, the leftover records skipped that epoch).
  """
  num_records: int
  global_batch: int
  seed: int
  shuffle: bool = True
  remainder: str = "pad"

  def __post_init__(self):
    if self.num_records < 1:
      raise InputError("The data set is empty: check the data dir, split and source.")
    if self.global_batch < 1:
      raise ConfigError(f"global_batch must be positive, got {self.global_batch}.")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
      raise ConfigError(f"The data seed must be a non-negative int, got {self.seed!r}.")
    if self.remainder not in ("pad", "drop"):
      raise ConfigError(f"remainder must be 'pad' or 'drop', got {self.remainder!r}.")
    if self.remainder == "drop" and self.num_records < self.global_batch:
      raise InputError(
          f"The data set has {self.num_records} records, fewer than one global batch of "
          f"{self.global_batch}, so dropping the remainder leaves no step: use a smaller batch "
          "or epoch_remainder='pad'.")

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per epoch."""
    if self.remainder == "drop":
      return self.num_records // self.global_batch
    return -(-self.num_records // self.global_batch)

  def permutation(self, epoch: int) -> np.ndarray:
    """int64 (N,): the records of `epoch` in stream order."""
    if not self.shuffle:
      return np.arange(self.num_records, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence((PERMUTATION_STREAM, self.seed, epoch)))
    return rng.permutation(self.num_records).astype(np.int64)

  def host_positions(self, step: int, process_index: int,
                     process_count: int) -> tuple[int, np.ndarray]:
    """(epoch, int64 (B / P,) positions in that epoch's stream) read by one host at `step`.

    Position q holds record permutation(epoch)[q % N]; q >= N only on padded batches.
    """
    if step < 0:
      raise ConfigError(f"step must be >= 0, got {step}.")
    if not 0 <= process_index < process_count:
      raise ConfigError(
          f"process_index={process_index} is outside [0, process_count={process_count}).")
    local = local_batch_size(self.global_batch, process_count)
    epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
    start = step_in_epoch * self.global_batch + process_index * local
    return epoch, np.arange(start, start + local, dtype=np.int64)
