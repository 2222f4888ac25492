"""Run a per-device kernel function under shard_map over the active mesh.

A Pallas (Mosaic or Triton) call is opaque to XLA's SPMD partitioner, so under a sharded jit it
must sit inside shard_map, where every device runs it on its own shard. The model runs under
`jax.set_mesh(mesh)` with batch sharded over ("data", "fsdp") and heads over "tensor"; attention
needs nothing across the batch or across heads, so the per-device function sees (B/dp, H/tp, ·, D)
and the outputs are the matching shards, with no communication. The tokenizer's convolution
kernel needs nothing across the batch either (`shard_map_over_batch`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
from jax.sharding import AxisType, PartitionSpec

from var_jax.errors import ConfigError, InputError
from var_jax.mesh_axes import BATCH_AXES, HEAD_AXIS


def _usable_axes(mesh, names):
  """The axes in `names` that the mesh has and that are not already manual (inside shard_map)."""
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  return tuple(n for n in names if n in types and types[n] != AxisType.Manual)


def batch_axes() -> tuple[str, ...]:
  """The active mesh's batch axes (`mesh_axes.BATCH_AXES` it has) not yet manual; () without a
  mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  return () if mesh.empty else _usable_axes(mesh, BATCH_AXES)


def batch_shards() -> int:
  """How many shards the active mesh splits a batch into (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[n] for n in batch_axes())


def shard_map_over_batch_and_heads(per_device_fn: Callable, *arrays_BH, kernel: str = "kernel",
                                   interpret: bool = False,
                                   batch_dims: Sequence[int | None] | None = None):
  """Calls `per_device_fn(*arrays)` on every device's (batch, head) shard of the (B, H, ...) arrays.

  `batch_dims` (default all 0) gives each array's batch axis, its heads axis following it (1 for
  a stacked (layers, B, H, ...) cache); None marks an array every device gets whole (a scalar).

  With a one-device mesh, or inside shard_map already (every axis manual), the function is called
  directly. Without an active mesh it is called directly only when this process has a single
  device: with several, a jit may partition the call over them, and XLA cannot partition a Pallas
  kernel ("Mosaic kernels cannot be automatically partitioned", found only when lowering on a
  pod), so that is a ConfigError here, at trace time (not for `interpret` kernels, which are plain
  XLA). Returns an array laid out like the first argument's batch and heads.
  """
  return _shard_map(per_device_fn, arrays_BH, kernel, interpret, batch_dims, split_heads=True)


def shard_map_over_batch(per_device_fn: Callable, *arrays_B, kernel: str = "kernel",
                         interpret: bool = False, batch_dims: Sequence[int | None] | None = None):
  """`shard_map_over_batch_and_heads` for arrays split over the batch only (images, whose axis
  after the batch is a spatial one); every device gets the arrays whose batch_dims entry is None
  (weights) whole."""
  return _shard_map(per_device_fn, arrays_B, kernel, interpret, batch_dims, split_heads=False)


def _shard_map(per_device_fn, arrays, kernel, interpret, batch_dims, *, split_heads: bool):
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    if jax.device_count() > 1 and not interpret:
      raise ConfigError(
          f"The {kernel} kernel was traced without an active mesh on a process with "
          f"{jax.device_count()} devices, where a jit may split it over devices and XLA cannot "
          "partition a Pallas kernel. Trace under `with jax.set_mesh(mesh):` (var_jax.sample, "
          "edit, VARModel.logits and the trainers do), or use the 'xla' implementation.")
    return per_device_fn(*arrays)
  if mesh.size == 1 or all(t == AxisType.Manual for t in mesh.axis_types):
    return per_device_fn(*arrays)
  split_axes = batch_axes()
  head_axes = _usable_axes(mesh, (HEAD_AXIS,)) if split_heads else ()
  shards = batch_shards()
  head_shards = mesh.shape[HEAD_AXIS] if head_axes else 1
  if batch_dims is None:
    batch_dims = (0,) * len(arrays)
  for x, bd in zip(arrays, batch_dims):
    if bd is None:
      continue
    if x.shape[bd] % shards:
      raise InputError(
          f"Batch {x.shape[bd]} (array shape {x.shape}) is not divisible by the {shards} "
          f"shards of mesh axes {split_axes}; pick a batch that is a multiple of {shards}."
      )
    if split_heads and x.shape[bd + 1] % head_shards:
      raise InputError(
          f"{x.shape[bd + 1]} heads (array shape {x.shape}) are not divisible by the {head_shards} "
          f"shards of mesh axis {HEAD_AXIS!r}."
      )
  split = (split_axes or None,) + ((head_axes[0] if head_axes else None,) if split_heads else ())
  specs = tuple(PartitionSpec() if bd is None else PartitionSpec(*((None,) * bd + split))
                for bd in batch_dims)
  # Every axis not already manual becomes manual: XLA must not try to partition the Pallas call.
  newly_manual = frozenset(
      n for n, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual)
  return jax.shard_map(
      per_device_fn,
      mesh=mesh,
      in_specs=specs,
      out_specs=specs[0],
      axis_names=newly_manual,
      check_vma=False,
  )(*arrays)
