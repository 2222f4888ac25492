"""TPU slices without TPUs: chip figures, slice names, libtpu's compile-only devices, meshes over them.

libtpu's compile-only client (`jax.experimental.topologies.get_topology_desc`) hands out device
objects for any TPU slice; a program compiled for a mesh over them is partitioned, fused and
memory-planned as on that slice, but never run. A slice is named either as libtpu takes it,
generation:chip grid ("v5e:2x2", "v4:2x2x4"), or as Cloud TPU sells it ("v5p-128", "v4-32",
"v5litepod-16", "v5e-4"): for v4 and v5p the number counts TensorCores (two per chip), for
v5e / v5litepod / v6e it counts chips.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
from typing import Any, Sequence

from jax.sharding import Mesh

from var_jax.errors import ConfigError
from var_jax.parallel import sharding
from var_jax.train.metrics import PEAK_BF16_FLOPS_PER_DEVICE

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """One TPU generation's per-chip figures (Cloud TPU documentation).

  Attributes:
    generation: "v4", "v5e", "v5p" or "v6e".
    hbm_bytes: HBM per chip.
    peak_flops: peak bfloat16 FLOP/s per chip.
    hbm_bandwidth: HBM bytes/s per chip.
    chip_config: libtpu chip configuration; "megacore" for v4 makes one JAX device per chip (as a
      Cloud TPU v4 VM does) instead of one per TensorCore.
    cores_in_name: whether slice names count TensorCores ("v4-32" = 16 chips) or chips.
  """
  generation: str
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float
  chip_config: str = "default"
  cores_in_name: bool = False


CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", 32 * GIB, PEAK_BF16_FLOPS_PER_DEVICE["v4"], 1200e9, "megacore", True),
    "v5e": ChipSpec("v5e", 16 * GIB, PEAK_BF16_FLOPS_PER_DEVICE["v5e"], 819e9),
    "v5p": ChipSpec("v5p", 95 * GIB, PEAK_BF16_FLOPS_PER_DEVICE["v5p"], 2765e9, "default", True),
    "v6e": ChipSpec("v6e", 32 * GIB, PEAK_BF16_FLOPS_PER_DEVICE["v6e"], 1640e9),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v6lite": "v6e"}

# Physical chip grids of the standard slices: 3-D tori (v4, v5p) and 2-D (v5e, v6e) by chip count.
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_DEFAULT_HOST_BOUNDS = (2, 2, 1)  # libtpu's default chips per host
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}


def parse_topology(name: str) -> tuple[str, ChipSpec]:
  """Reads "v5e:4x4" (generation:chip grid) or a Cloud TPU slice name ("v5p-128", "v4-32").

  Returns:
    (the topology string libtpu takes, e.g. "v5p:4x4x4", the chip's ChipSpec).

  Raises:
    ConfigError: for an unknown generation or slice size.
  """
  text = name.strip().lower()
  match = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text)
  if match:
    generation, grid = _ALIASES.get(match.group(1), match.group(1)), match.group(2)
  else:
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if not match:
      raise ConfigError(f"Topology {name!r}: use generation:grid (e.g. 'v5e:4x4', 'v4:2x2x4') or "
                        "a slice name (e.g. 'v5p-128', 'v4-32', 'v5e-256').")
    generation = _ALIASES.get(match.group(1), match.group(1))
    if generation not in CHIPS:
      raise ConfigError(f"Unknown TPU generation in {name!r}; known: {sorted(CHIPS)}.")
    count = int(match.group(2))
    chips = count // 2 if CHIPS[generation].cores_in_name else count
    shapes = _SHAPES_2D if generation in ("v5e", "v6e") else _SHAPES_3D
    per_chip = 2 if CHIPS[generation].cores_in_name else 1
    if chips not in shapes or count % per_chip:
      raise ConfigError(f"No standard {generation} slice {name!r}; known sizes: "
                        f"{sorted(k * per_chip for k in shapes)}.")
    grid = shapes[chips]
  if generation not in CHIPS:
    raise ConfigError(f"Unknown TPU generation in {name!r}; known: {sorted(CHIPS)}.")
  return f"{generation}:{grid}", CHIPS[generation]


def chip_spec(topology: str) -> ChipSpec:
  return parse_topology(topology)[1]


@functools.lru_cache(maxsize=None)
def topology_devices(topology: str) -> tuple[Any, ...]:
  """The compile-only devices (one per chip) of a TPU slice, e.g. "v5e:2x2" or "v5p-128"."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  # A compile-only client opens no TPU, so several processes may hold one (a test next to a
  # benchmark); without this the second fails on libtpu's single-process lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  canonical, spec = parse_topology(topology)
  grid = [int(n) for n in canonical.split(":")[1].split("x")]
  grid += [1] * (3 - len(grid))
  kwargs = {}
  if any(g < h for g, h in zip(grid, _DEFAULT_HOST_BOUNDS)):  # e.g. one chip: a one-chip host
    kwargs["chips_per_host_bounds"] = tuple(min(g, h) for g, h in zip(grid, _DEFAULT_HOST_BOUNDS))
  desc = topologies.get_topology_desc(platform="tpu", topology_name=canonical,
                                      chip_config_name=spec.chip_config, **kwargs)
  return tuple(desc.devices)


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> list[tuple[str, int]]:
  """[("data", d), ("fsdp", f), ("tensor", t)], the form `config.mesh` takes (-1: the rest)."""
  return [("data", data), ("fsdp", fsdp), ("tensor", tensor)]


def topology_mesh(topology: str, mesh: Sequence[Sequence[Any]] = sharding.DEFAULT_MESH, *,
                  allow_split_physical_axes: bool = False) -> Mesh:
  """A Mesh over a TPU slice's devices, laid out by `sharding.make_mesh` as training does.

  Args:
    topology: "v5e:4x4", "v4-32", "v5p-128", ...
    mesh: [(axis name, size)] with at most one -1, e.g. `config.mesh` or `mesh_config(...)`.
    allow_split_physical_axes: let one mesh axis take part of a physical torus axis.
  """
  return sharding.make_mesh(mesh, devices=list(topology_devices(topology)),
                            allow_split_physical_axes=allow_split_physical_axes)


def libtpu_available() -> bool:
  """Whether libtpu imports (AOT TPU compilation needs it, TPU hardware not)."""
  try:
    importlib.import_module("libtpu")
  except ImportError:
    return False
  return True
