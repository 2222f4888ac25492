"""Training metrics: TensorBoard + stdout via clu, a JSON-lines copy, MFU, finiteness checks.

`MetricsLogger` writes each logged step's scalars
* to clu's default writer (TensorBoard event files in the workdir plus absl logging; other hosts
  only log), and
* as one JSON object per line to `WORKDIR/metrics.jsonl` (host 0 only, flushed every write),
  which is easy to read back from notebooks and tests. Paths go through `etils.epath`, so
  `gs://` workdirs work (on GCS each flush re-uploads the file, cheap at log-step rates).

MFU: model FLOPs per step (VAR's analytic count, `var_jax.models.flops`; `compiled_flops_per_step`
gives the hardware FLOPs XLA runs, remat included) × steps/s ÷ (peak FLOP/s per device × devices).
"""
from __future__ import annotations

import json
import math
import re
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from etils import epath

from var_jax.errors import ConfigError, MissingDependencyError

try:  # clu's writers need tensorflow and tensorboard: the `train` extra, not the base install
  from clu import metric_writers
except ImportError as error:
  raise MissingDependencyError(
      f"training needs the `train` extra ({error}): pip install 'var-jax[train]' "
      "(or '.[train]' in a clone).") from error

METRICS_FILENAME = "metrics.jsonl"

# Dense bf16 peak FLOP/s of one JAX device (= one chip on these generations), from the Cloud
# TPU system-architecture pages.
PEAK_BF16_FLOPS_PER_DEVICE: dict[str, float] = {
    "v4": 275e12,
    "v5e": 197e12,
    "v5p": 459e12,
    "v6e": 918e12,
}

# `jax.Device.device_kind` strings of those generations.
_DEVICE_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"v4", "v4"),
    (r"v5\s*(lite|e)", "v5e"),
    (r"v5\s*p?$", "v5p"),
    (r"v6\s*(lite|e)", "v6e"),
)


# ---------------------------------------------------------------------------------------------
# Checks.


def check_finite(step: int, scalars: Mapping[str, Any],
                 keys: Sequence[str] = ("loss", "grad_norm")) -> None:
  """Raises FloatingPointError if any of `keys` present in `scalars` is NaN or infinite."""
  bad = {k: float(np.asarray(scalars[k])) for k in keys if k in scalars
         and not np.all(np.isfinite(np.asarray(scalars[k])))}
  if bad:
    raise FloatingPointError(
        f"Non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}. Training "
        "stopped; the last checkpoint before this step is intact. Lower the learning rate, "
        "check the inputs of this step, or resume from that checkpoint.")


def _to_float(name: str, value: Any) -> float:
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"Metric {name!r} must be a scalar, got shape {array.shape}.")
  return float(array.reshape(()))


# ---------------------------------------------------------------------------------------------
# Logger.


class MetricsLogger:
  """clu writer (TensorBoard + log) plus `metrics.jsonl`, both fed by `write_scalars`."""

  def __init__(self, workdir: epath.PathLike, *, process_index: int | None = None,
               asynchronous: bool = True, finite_keys: Sequence[str] = ("loss", "grad_norm")):
    """Creates the writers.

    Args:
      workdir: run directory (local or gs://); created if missing on host 0.
      process_index: this host's index (default `jax.process_index()`); only host 0 writes
        files, other hosts just log.
      asynchronous: let clu write TensorBoard events from a background thread.
      finite_keys: scalars that must be finite; `write_scalars` raises after logging them.
    """
    self.workdir = epath.Path(workdir)
    self.process_index = jax.process_index() if process_index is None else process_index
    self.finite_keys = tuple(finite_keys)
    is_writer = self.process_index == 0
    if is_writer:
      self.workdir.mkdir(parents=True, exist_ok=True)
    self._writer = metric_writers.create_default_writer(
        str(self.workdir), just_logging=not is_writer, asynchronous=asynchronous)
    self._jsonl = (self.workdir / METRICS_FILENAME).open("a") if is_writer else None

  @property
  def jsonl_path(self) -> epath.Path:
    return self.workdir / METRICS_FILENAME

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> dict[str, float]:
    """Writes scalars for `step` everywhere, then raises if a `finite_keys` value is not finite.

    Values may be Python numbers, numpy or jax scalars (read back here, so call this only at
    log steps). Returns the floats written.

    Raises:
      FloatingPointError: naming the step, for a NaN/inf loss or gradient norm.
    """
    values = {name: _to_float(name, v) for name, v in scalars.items()}
    self._writer.write_scalars(int(step), values)
    if self._jsonl is not None:
      record = {"step": int(step), "wall_time": time.time(), **values}
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    check_finite(step, values, self.finite_keys)
    return values

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records the run's hyper-parameters (TensorBoard HParams tab)."""
    self._writer.write_hparams(dict(hparams))

  def flush(self) -> None:
    self._writer.flush()
    if self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    self._writer.close()
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None

  def __enter__(self) -> MetricsLogger:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(workdir: epath.PathLike) -> list[dict[str, Any]]:
  """The records of `WORKDIR/metrics.jsonl`, in order."""
  text = (epath.Path(workdir) / METRICS_FILENAME).read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# MFU.


def tpu_generation(device_kind: str) -> str | None:
  """'v4' / 'v5e' / 'v5p' / 'v6e' for a `device_kind` like 'TPU v5 lite', else None."""
  kind = device_kind.strip().lower()
  if not kind.startswith("tpu"):
    return None
  kind = kind[3:].strip()
  for pattern, generation in _DEVICE_KIND_PATTERNS:
    if re.match(pattern, kind):
      return generation
  return None


def peak_flops_per_device(device_kind: str | None = None,
                          override: float | None = None) -> float | None:
  """Peak bf16 FLOP/s of one device: `override` if given, else from the table, else None.

  Args:
    device_kind: e.g. 'TPU v4'; default the kind of `jax.devices()[0]`.
    override: a number to use instead (other accelerators, or a different precision).

  Raises:
    ConfigError: for a non-positive override.
  """
  if override is not None:
    if not override > 0:
      raise ConfigError(f"peak FLOP/s override must be > 0, got {override}.")
    return float(override)
  kind = jax.devices()[0].device_kind if device_kind is None else device_kind
  generation = tpu_generation(kind)
  return PEAK_BF16_FLOPS_PER_DEVICE.get(generation) if generation else None


def compiled_flops_per_step(compiled: Any, num_devices: int) -> float | None:
  """Global FLOPs of one call of a compiled (`jit(...).lower(...).compile()`) step.

  XLA's cost analysis describes the partitioned per-device program, so it is scaled by the
  device count. It counts what actually runs, rematerialised forwards included. Returns None
  where the backend gives no estimate.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax returned one dict per program
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  if flops is None or not flops > 0:
    return None
  return float(flops) * num_devices


def model_flops_utilization(flops_per_step: float, steps_per_second: float,
                            peak_flops_per_device: float, num_devices: int) -> float:
  """Achieved FLOP/s as a fraction of the devices' peak."""
  if not (peak_flops_per_device > 0 and num_devices > 0):
    raise ConfigError(
        f"MFU needs a positive peak FLOP/s and device count, got {peak_flops_per_device} and "
        f"{num_devices}.")
  if not math.isfinite(steps_per_second) or steps_per_second < 0:
    raise ValueError(f"steps_per_second must be finite and >= 0, got {steps_per_second}.")
  return flops_per_step * steps_per_second / (peak_flops_per_device * num_devices)
