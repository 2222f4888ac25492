"""Multi-host start-up: join the hosts of a pod (`jax.distributed.initialize`) before any JAX call."""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
from typing import Callable, Mapping

import jax

from var_jax.errors import ConfigError

_TRUE_STRINGS = ("1", "true", "yes", "on")


def _on_cloud_tpu_vm(environ: Mapping[str, str]) -> bool:
  """True on a Cloud TPU VM (libtpu installed and TPU chips visible), but not on Colab."""
  if "COLAB_RELEASE_TAG" in environ:
    return False
  if importlib.util.find_spec("libtpu") is None:  # found, not imported: loading it is JAX's job
    return False
  # v2-v4 and v5p expose /dev/accel*, v5e/v6e expose VFIO groups.
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _distributed_env_present(environ: Mapping[str, str]) -> bool:
  """True when the environment says this process is one of several JAX processes."""
  if environ.get("JAX_COORDINATOR_ADDRESS") or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  if environ.get("VAR_JAX_DISTRIBUTED", "").lower() in _TRUE_STRINGS:
    return True
  hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h.strip()]) > 1


def maybe_initialize_distributed(
    mode: str = "auto",
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    aot: bool = False,
    environ: Mapping[str, str] | None = None,
    on_tpu_vm: Callable[[Mapping[str, str]], bool] = _on_cloud_tpu_vm,
) -> bool:
  """Calls `jax.distributed.initialize` when this run spans several hosts.

  Must run before anything touches a JAX backend (device lists, arrays, jit).

  Args:
    mode: "auto" initialises on a Cloud TPU VM (every pod worker, as MaxText does; a
      single-host VM is harmless) or when the environment names a coordinator
      (`JAX_COORDINATOR_ADDRESS`, `MEGASCALE_COORDINATOR_ADDRESS`, several `TPU_WORKER_HOSTNAMES`,
      or `VAR_JAX_DISTRIBUTED=1` set by our launch scripts) or when `coordinator_address` is
      given; "on" always initialises; "off" never does.
    coordinator_address: "host:port" of process 0; None lets JAX auto-detect (TPU, SLURM, ...).
    num_processes: total number of processes, or None to auto-detect.
    process_id: this process's index, or None to auto-detect.
    aot: True for ahead-of-time compilation against a TPU topology on a host without TPUs;
      never initialises then.
    environ: environment to read (default `os.environ`); tests pass a dict.
    on_tpu_vm: detector for a Cloud TPU VM; tests replace it.

  Returns:
    True if this call initialised the distributed system, False if it was skipped or had
    already been done.

  Raises:
    ConfigError: for an unknown `mode`.
  """
  if mode not in ("auto", "on", "off"):
    raise ConfigError(f"distributed mode must be 'auto', 'on' or 'off', got {mode!r}.")
  env = os.environ if environ is None else environ
  if aot or mode == "off":
    return False
  if jax.distributed.is_initialized():
    return False
  if mode == "auto" and not (
      coordinator_address or _distributed_env_present(env) or on_tpu_vm(env)):
    logging.info("Single-host run: skipping jax.distributed.initialize().")
    return False
  # Outside managed clusters (TPU pods, SLURM, ...) JAX cannot detect the process layout; our
  # launchers and tests then give it as JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
  if coordinator_address is None and env.get("JAX_COORDINATOR_ADDRESS"):
    coordinator_address = env["JAX_COORDINATOR_ADDRESS"]
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  # CPU-only multi-process runs (tests, debugging) need a collectives backend; TPUs ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id)
  logging.info("jax.distributed initialised: process %d of %d.",
               jax.process_index(), jax.process_count())
  return True


def host_share(count: int, process_index: int, process_count: int) -> range:
  """The contiguous range of `count` global indices (images to sample, say) that one host
  handles; shares differ in size by at most 1 and cover every index once."""
  per, extra = divmod(count, process_count)
  start = process_index * per + min(process_index, extra)
  return range(start, start + per + (process_index < extra))
