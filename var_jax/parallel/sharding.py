"""Device mesh, logical-axis rules, sharded init and global batches for pjit-style training.

Everything a trainer needs to place arrays on a (possibly multi-host, multi-slice) TPU mesh
(joining the hosts first is `var_jax.parallel.distributed`):

* `make_mesh` turns `config.mesh` (e.g. `[("data", -1), ("fsdp", 1), ("tensor", 1)]`) into a
  `jax.sharding.Mesh`, with the data axis over DCN when `config.mesh_dcn` asks for multislice.
* `logical_axis_rules` maps the model's logical axis names (`batch`, `embed`, `mlp`, ...) to
  mesh axes; defaults below, overridable from `config.rules`.
* `init_sharded` initialises a boxed (logically partitioned) state directly into its shardings,
  so no unsharded copy ever exists; `abstract_sharded_state` gives the same shapes without
  allocating, for checkpoint restores.
* `make_global_batch` assembles per-host numpy batches into global `jax.Array`s.
* `param_sharding_report` / `assert_params_sufficiently_sharded` check at train start that the
  parameters are really spread over the model-parallel axes.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from var_jax.errors import ConfigError
from var_jax.mesh_axes import BATCH_AXES

MeshAxes = None | str | tuple[str, ...]
LogicalRules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_MESH: tuple[tuple[str, int], ...] = (("data", -1), ("fsdp", 1), ("tensor", 1))

# Batch dims go over every data-like axis; weights are split over "fsdp" along their embed dim
# (ZeRO-3 style) and over "tensor" along mlp/heads/vocab (Megatron style). Flax applies the rules
# in order and skips a rule whose mesh axis is already taken in the same array, so an activation
# (batch, length, embed) gets P(("data", "fsdp"), None, None) while a weight (embed, mlp) gets
# P("fsdp", "tensor").
DEFAULT_LOGICAL_AXIS_RULES: LogicalRules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vae_embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("layers", None),
    ("scales", None),
    ("classes", None),
    ("norm", None),
    ("cache_batch", BATCH_AXES),
    ("cache_heads", "tensor"),
    ("cache_sequence", None),
    ("cache_kv", None),
)

# The mesh axes a parameter can be split over (the data axes only ever split the batch).
MODEL_PARALLEL_AXES: tuple[str, ...] = ("fsdp", "tensor")

# ---------------------------------------------------------------------------------------------
# Mesh.


def _parse_axes(mesh_config: Sequence[Sequence[Any]], what: str) -> tuple[list[str], list[int]]:
  """Splits [(name, size), ...] into names and int sizes, checking each entry."""
  names, sizes = [], []
  for entry in mesh_config:
    if (isinstance(entry, str) or len(entry) != 2 or not isinstance(entry[0], str)
        or not entry[0]):
      raise ConfigError(
          f"{what} entries must be (axis_name, size) pairs, got {entry!r} in {list(mesh_config)}.")
    size = entry[1]
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (
        size < 1 and size != -1):
      raise ConfigError(
          f"{what} axis {entry[0]!r} has size {size!r}; use a positive int, or -1 for "
          "'all remaining devices'.")
    names.append(entry[0])
    sizes.append(int(size))
  if len(set(names)) != len(names):
    raise ConfigError(f"{what} repeats an axis name: {names}.")
  if sizes.count(-1) > 1:
    raise ConfigError(f"{what} has more than one -1 size: {list(mesh_config)}; at most one axis "
                      "can take the remaining devices.")
  return names, sizes


def _resolve_sizes(names: Sequence[str], sizes: Sequence[int], total: int, what: str,
                   unit: str = "devices") -> tuple[int, ...]:
  """Replaces a -1 by total // product(others) and checks the product equals `total`."""
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise ConfigError(
          f"{what} {dict(zip(names, sizes))}: the fixed axes multiply to {known}, which does not "
          f"divide the {total} available {unit}. Choose sizes whose product divides {total}.")
    sizes = [total // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != total:
    raise ConfigError(
        f"{what} {dict(zip(names, sizes))} needs {math.prod(sizes)} {unit} but {total} are "
        f"available. Make the product of the sizes equal {total}, or set one axis to -1.")
  return tuple(sizes)


def _num_granules(devices: Sequence[Any]) -> tuple[int, str]:
  """Number of slices (or processes where devices carry no slice_index) the devices span."""
  attr = "slice_index" if hasattr(devices[0], "slice_index") else "process_index"
  return len({getattr(d, attr) for d in devices}), attr


def make_device_grid(
    mesh_config: Sequence[Sequence[Any]],
    devices: Sequence[Any] | None = None,
    dcn_mesh_config: Sequence[Sequence[Any]] | None = None,
    *,
    allow_split_physical_axes: bool = False,
) -> tuple[np.ndarray, tuple[str, ...]]:
  """Lays `devices` out as an ndarray whose axes are the configured mesh axes.

  Args:
    mesh_config: the in-slice (ICI) mesh, [(axis_name, size)] with at most one size -1,
      which takes whatever the other axes leave of the devices of one slice.
    devices: devices to use (default `jax.devices()`).
    dcn_mesh_config: for multislice, the across-slice (DCN) factor of some axes, e.g.
      `[("data", -1)]` (-1 = number of slices); unnamed axes get 1. The mesh axis size is the
      product of its ICI and DCN factors. Devices without `slice_index` (GPU clusters) are
      grouped by process instead.
    allow_split_physical_axes: passed to `mesh_utils`; lets a TPU topology be split when the
      requested shape does not map onto the physical torus.

  Returns:
    (device ndarray, axis names).

  Raises:
    ConfigError: if the sizes do not fit the devices or slices.
  """
  devices = list(jax.devices() if devices is None else devices)
  names, ici_sizes = _parse_axes(mesh_config, "mesh")
  dcn_by_name = {}
  if dcn_mesh_config:
    dcn_names, dcn_sizes = _parse_axes(dcn_mesh_config, "mesh_dcn")
    unknown = sorted(set(dcn_names) - set(names))
    if unknown:
      raise ConfigError(f"mesh_dcn names axes {unknown} that are not in mesh {names}.")
    dcn_by_name = dict(zip(dcn_names, dcn_sizes))
  num_granules, granule_attr = _num_granules(devices)
  dcn_sizes = [dcn_by_name.get(n, 1) for n in names]
  if dcn_by_name:
    unit = "slices" if granule_attr == "slice_index" else "processes"
    dcn_sizes = _resolve_sizes(names, dcn_sizes, num_granules, "mesh_dcn", unit)
  num_dcn = math.prod(dcn_sizes)
  if num_dcn == 1 and num_granules > 1 and granule_attr == "slice_index":
    raise ConfigError(
        f"The {len(devices)} devices span {num_granules} TPU slices but mesh_dcn is not set. "
        f"Set config.mesh_dcn, e.g. [('data', {num_granules})], so that only data parallelism "
        "crosses the slow network between slices.")
  per_granule = len(devices) // num_granules
  ici_sizes = _resolve_sizes(names, ici_sizes, per_granule if num_dcn > 1 else len(devices),
                             "mesh (per slice)" if num_dcn > 1 else "mesh")
  try:
    if num_dcn > 1:
      grid = mesh_utils.create_hybrid_device_mesh(
          ici_sizes, dcn_sizes, devices, process_is_granule=granule_attr == "process_index",
          allow_split_physical_axes=allow_split_physical_axes)
    else:
      grid = mesh_utils.create_device_mesh(
          ici_sizes, devices, allow_split_physical_axes=allow_split_physical_axes)
  except (ValueError, NotImplementedError, AssertionError) as e:
    raise ConfigError(
        f"Cannot lay out mesh {dict(zip(names, ici_sizes))} (DCN {dict(zip(names, dcn_sizes))}) "
        f"on {len(devices)} {devices[0].platform} devices: {e}. Try other axis sizes or set "
        "config.mesh_allow_split_physical_axes=True.") from e
  return grid, tuple(names)


def make_mesh(
    mesh_config: Sequence[Sequence[Any]] = DEFAULT_MESH,
    devices: Sequence[Any] | None = None,
    dcn_mesh_config: Sequence[Sequence[Any]] | None = None,
    *,
    allow_split_physical_axes: bool = False,
) -> Mesh:
  """Builds the device `Mesh` from config (see `make_device_grid` for the arguments).

  All axes are `AxisType.Auto`: `jax.make_mesh` defaults to Explicit axes, under which
  `nn.with_logical_constraint` fails.
  """
  grid, names = make_device_grid(mesh_config, devices, dcn_mesh_config,
                                 allow_split_physical_axes=allow_split_physical_axes)
  return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


# ---------------------------------------------------------------------------------------------
# Logical axis rules.


def _normalize_mesh_axes(axes: Any, name: str) -> MeshAxes:
  if axes is None or isinstance(axes, str):
    return axes
  if isinstance(axes, (list, tuple)) and all(isinstance(a, str) for a in axes):
    return tuple(axes)
  raise ConfigError(
      f"Logical axis {name!r} maps to {axes!r}; use None, a mesh axis name, or a list of names.")


def logical_axis_rules(
    overrides: Sequence[Sequence[Any]] | Mapping[str, Any] | None = None,
    mesh: Mesh | None = None,
    base: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES,
) -> LogicalRules:
  """Returns `base` with `overrides` applied, checked against `mesh`.

  Args:
    overrides: [(logical_name, mesh_axes)] or {logical_name: mesh_axes}. A name already in
      `base` is replaced in place (keeping its priority); a new name is appended. mesh_axes is
      None (replicated), a mesh axis name, or a list of them. Lists from JSON become tuples.
    mesh: if given, every mesh axis the rules use must be one of its axes.
    base: the rules to start from.

  Raises:
    ConfigError: on a malformed rule or a mesh axis the mesh does not have.
  """
  items = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides or ())
  rules = [(name, _normalize_mesh_axes(axes, name)) for name, axes in base]
  index = {name: i for i, (name, _) in enumerate(rules)}
  for item in items:
    if len(item) != 2 or not isinstance(item[0], str):
      raise ConfigError(f"A logical axis rule must be (logical_name, mesh_axes), got {item!r}.")
    name, axes = item[0], _normalize_mesh_axes(item[1], item[0])
    if name in index:
      rules[index[name]] = (name, axes)
    else:
      index[name] = len(rules)
      rules.append((name, axes))
  if mesh is not None:
    for name, axes in rules:
      used = (axes,) if isinstance(axes, str) else (axes or ())
      missing = [a for a in used if a not in mesh.axis_names]
      if missing:
        raise ConfigError(
            f"Logical axis {name!r} maps to mesh axes {missing} that mesh {mesh.axis_names} "
            "does not have. Add them to config.mesh (size 1 is fine) or change config.rules.")
  return tuple(rules)


# ---------------------------------------------------------------------------------------------
# Sharded init.


def abstract_sharded_state(
    init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh, rules: LogicalRules,
) -> tuple[Any, Any]:
  """Shapes and shardings of `init_fn(rng)` without running it.

  Args:
    init_fn: rng -> pytree whose leaves may be boxed with `nn.with_logical_partitioning`.
    rng: the rng `init_fn` will be called with.
    mesh: target mesh.
    rules: logical axis rules.

  Returns:
    (abstract, shardings): the unboxed tree of `jax.ShapeDtypeStruct` with `.sharding` set
    (what checkpoint restores want) and the matching tree of `NamedSharding` for the boxed
    output (what `jax.jit(init_fn, out_shardings=...)` wants). Unboxed leaves are replicated.
  """
  boxed = jax.eval_shape(init_fn, rng)
  specs = nn.get_partition_spec(boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.unbox(boxed), nn.unbox(shardings))
  return abstract, shardings


def init_sharded(
    init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh, rules: LogicalRules,
) -> tuple[Any, Any]:
  """Runs `init_fn(rng)` with every output created directly in its target sharding.

  Returns:
    (state, shardings): the unboxed state and the unboxed tree of its `NamedSharding`s (use it
    for the `in_shardings`/`out_shardings` of the train step).
  """
  _, shardings = abstract_sharded_state(init_fn, rng, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(init_fn, out_shardings=shardings)(rng)
  return nn.unbox(state), nn.unbox(shardings)


# ---------------------------------------------------------------------------------------------
# Global batches.


def batch_sharding(mesh: Mesh, batch_axes: MeshAxes = BATCH_AXES) -> NamedSharding:
  """Sharding that splits the leading (batch) dim over `batch_axes` and replicates the rest."""
  return NamedSharding(mesh, PartitionSpec(batch_axes))


def make_global_batch(
    local_batch: Any, mesh: Mesh, batch_axes: MeshAxes = BATCH_AXES,
) -> Any:
  """Turns this host's numpy batch (a pytree) into global arrays split over `batch_axes`.

  Each host passes only its own rows (global batch // process_count); the global array is
  assembled with `jax.make_array_from_process_local_data`, never through `jnp.array`.

  Raises:
    ConfigError: if the global batch does not split evenly over the batch shards.
  """
  sharding = batch_sharding(mesh, batch_axes)
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
  num_shards = math.prod(mesh.shape[a] for a in axes)

  def to_global(path, x):
    x = np.asarray(x)
    global_rows = x.shape[0] * jax.process_count() if x.ndim else 0
    if x.ndim == 0 or global_rows % num_shards:
      raise ConfigError(
          f"Batch leaf {jax.tree_util.keystr(path) or '<root>'} has shape {x.shape} on each of "
          f"{jax.process_count()} hosts, i.e. a global batch of {global_rows}, which does not "
          f"split over the {num_shards} batch shards {dict((a, mesh.shape[a]) for a in axes)}. "
          "Make the global batch size a multiple of that.")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map_with_path(to_global, local_batch)


# ---------------------------------------------------------------------------------------------
# Sharding report.


@dataclasses.dataclass(frozen=True)
class ShardingReport:
  """How much parameter memory the model-parallel axes fail to split.

  Attributes:
    total_bytes: bytes of all parameters (one full copy).
    per_device_bytes: parameter bytes each device holds.
    replicated_bytes: bytes of the parameters split over none of the model-parallel axes.
    replicated_fraction: replicated_bytes / total_bytes.
    model_parallel_size: product of the model-parallel mesh axis sizes; 1 means pure data
      parallelism, where every parameter is necessarily replicated.
    lines: one human-readable line per parameter (path, shape, spec, bytes per device).
    replicated: (path, bytes) of every replicated parameter, largest first.
  """
  total_bytes: int
  per_device_bytes: int
  replicated_bytes: int
  replicated_fraction: float
  model_parallel_size: int
  lines: tuple[str, ...]
  replicated: tuple[tuple[str, int], ...]

  def summary(self) -> str:
    return (f"params {self.total_bytes / 2**20:.2f} MiB total, "
            f"{self.per_device_bytes / 2**20:.2f} MiB per device; "
            f"{100 * self.replicated_fraction:.2f}% of the bytes replicated over the model axes "
            f"(model-parallel size {self.model_parallel_size}).")


def _leaf_sharding(leaf: Any) -> jax.sharding.Sharding | None:
  return getattr(leaf, "sharding", None)


def param_sharding_report(
    params: Any, mesh: Mesh, model_axes: Sequence[str] = MODEL_PARALLEL_AXES,
) -> ShardingReport:
  """Measures the sharding of `params` (jax.Arrays or ShapeDtypeStructs with shardings).

  A parameter counts as replicated when its `PartitionSpec` uses none of the `model_axes`
  of size > 1.

  Raises:
    ConfigError: if a leaf carries no NamedSharding.
  """
  model_axes = tuple(a for a in model_axes if a in mesh.shape and mesh.shape[a] > 1)
  model_parallel_size = math.prod(mesh.shape[a] for a in model_axes)
  total = per_device = 0
  lines, replicated = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    sharding = _leaf_sharding(leaf)
    if not isinstance(sharding, NamedSharding):
      raise ConfigError(
          f"Parameter {jax.tree_util.keystr(path)} has sharding {sharding!r}; expected a "
          "NamedSharding. Build params with init_sharded or restore them with shardings.")
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    used = set()
    for entry in sharding.spec:
      used.update((entry,) if isinstance(entry, str) else (entry or ()))
    shards = math.prod(mesh.shape[a] for a in used)
    total += nbytes
    per_device += nbytes // shards
    if not used.intersection(model_axes):
      replicated.append((jax.tree_util.keystr(path), nbytes))
    lines.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {sharding.spec} "
                 f"{nbytes // shards} B/device")
  replicated_bytes = sum(nbytes for _, nbytes in replicated)
  return ShardingReport(
      total_bytes=total, per_device_bytes=per_device, replicated_bytes=replicated_bytes,
      replicated_fraction=replicated_bytes / total if total else 0.0,
      model_parallel_size=model_parallel_size, lines=tuple(lines),
      replicated=tuple(sorted(replicated, key=lambda item: -item[1])))


def assert_params_sufficiently_sharded(
    params: Any, mesh: Mesh, max_replicated_fraction: float | None = 0.02,
    model_axes: Sequence[str] = MODEL_PARALLEL_AXES, *,
    max_replicated_bytes: float | None = None, remedy: str | None = None,
) -> ShardingReport:
  """Logs the parameter shardings and fails if too many bytes are replicated.

  Two limits, each skipped when None:
  * `max_replicated_fraction`: of all parameter bytes, the share split over none of the
    model-parallel axes. Pure data parallelism (no model axis larger than 1) passes it as is.
  * `max_replicated_bytes`: the bytes of those parameters, i.e. what every chip holds in full.
    It applies under pure data parallelism too (where every parameter is replicated), so a model
    too large to replicate fails however the mesh is laid out.

  `params` may be jax.Arrays or ShapeDtypeStructs with shardings (e.g. from
  `abstract_sharded_state`), so the check can run before anything is allocated.

  Raises:
    ConfigError: when a limit is exceeded, naming the largest replicated parameters; `remedy`
      (default: give them logical axes that config.rules maps to 'fsdp' or 'tensor') is the
      advice it ends with.
  """
  report = param_sharding_report(params, mesh, model_axes)
  for line in report.lines:
    logging.info("param sharding: %s", line)
  logging.info("%s", report.summary())
  remedy = remedy or ("give those parameters logical axis names that config.rules maps to "
                      "'fsdp' or 'tensor'")
  largest = ", ".join(f"{path} ({_human_bytes(nbytes)})" for path, nbytes in report.replicated[:10])
  if (max_replicated_fraction is not None and report.model_parallel_size > 1
      and report.replicated_fraction > max_replicated_fraction):
    raise ConfigError(
        f"{100 * report.replicated_fraction:.1f}% of the parameter bytes are replicated over "
        f"the model axes {tuple(model_axes)} (allowed {100 * max_replicated_fraction:.1f}%). "
        f"Largest replicated parameters: {largest}. To fix: {remedy}.")
  if max_replicated_bytes is not None and report.replicated_bytes > max_replicated_bytes:
    axes = {a: mesh.shape[a] for a in model_axes if a in mesh.shape}
    raise ConfigError(
        f"Every chip would hold {report.replicated_bytes / 1e9:.2f} GB of parameters split over "
        f"none of the model axes {axes} (allowed {max_replicated_bytes / 1e9:.2f} GB; optimizer "
        f"moments, gradients and EMA copies add as much again, several times). Largest "
        f"replicated parameters: {largest}. To fix: {remedy}.")
  return report


def _human_bytes(nbytes: int) -> str:
  for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if nbytes >= size:
      return f"{nbytes / size:.2f} {unit}"
  return f"{nbytes} B"
