"""Putting a VARModel on a device mesh once: sharded, device-resident weights for inference.

`var_jax.sample`, `var_jax.edit`, `VARModel.logits` and the ahead-of-time lowering in `var_jax.aot`
all go through `place` and `batch_context`, so what runs on a chip and what is compiled for a
slice are one program:

* `default_mesh()`: every local device on the "data" axis (a ("data", "fsdp", "tensor") mesh built
  once per process). Pass your own mesh (e.g. `var_jax.sampling_mesh(tensor=4)`) to split the
  weights of models that do not fit one chip.
* `place(model, mesh)`: the VAR params split by their logical axis names (`embed` over "fsdp",
  heads / mlp / vocab over "tensor"; replicated when those axes have size 1), the tokenizer params
  replicated. The matmul weights the model casts to its compute dtype at use are stored in that
  dtype (bfloat16 models hold half the bytes, with bit-identical results; on TPU the blocks'
  bfloat16 stacks are held as their uint16 bit patterns, `held_as_bits`; on CPU each block weight
  is held as one array per layer, `held_per_layer`, which the model reads in place; for params
  already on one CPU device those arrays share the model's stacks, `_layer`). The placement
  is cached on the model per mesh, so later calls transfer no weights. With `jax.ShapeDtypeStruct` params
  (a model that was never materialised, for AOT compiles) the placement is abstract.
* `pad_batch` / `batch_shards`: any batch on any device count: the batch is padded to a multiple of
  the mesh's batch shards ("data" x "fsdp") and the padding dropped afterwards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from var_jax import mesh_axes
from var_jax.parallel import sharding
from var_jax.errors import InputError
from var_jax.models import var as var_model
from var_jax.models import vqvae
from var_jax.ops import attention
from var_jax.ops import float_bits

# Param leaves that the model only ever uses after casting them to its compute dtype (the
# einsum weights of attention and the kernels of Dense layers with an explicit dtype). Storing
# them in that dtype changes no result. `word_embed` has no compute dtype (it runs in float32).
_CAST_AT_USE = ("mat_qkv", "proj_kernel", "kernel")
_FLOAT32_MODULES = ("word_embed",)


@functools.lru_cache(maxsize=None)
def default_mesh() -> Mesh:
  """All local devices on the "data" axis (fsdp = tensor = 1), built once per process.

  Local, not global: on a multi-host slice each host samples its own images with its own chips,
  and no collective ever spans hosts (see `var-jax sample` for how a pod splits a label list).
  """
  return sharding.make_mesh(sharding.DEFAULT_MESH, devices=jax.local_devices())


def sampling_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *,
                  devices: Sequence[Any] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: the local ones) for inference.

  tensor > 1 splits attention heads, MLP and vocabulary over chips (the usual choice for models
  that do not fit one chip, e.g. VAR-d30 on 16 GB v5e chips with tensor=4); fsdp > 1 splits every
  weight along its width and gathers it per layer. The batch is split over data x fsdp. -1 takes
  the remaining devices; sizes that multiply to fewer than the devices take the first ones.
  """
  devices = jax.local_devices() if devices is None else list(devices)
  if -1 not in (data, fsdp, tensor) and 0 < data * fsdp * tensor < len(devices):
    devices = devices[:data * fsdp * tensor]  # fixed sizes: the first devices
  return sharding.make_mesh([("data", data), ("fsdp", fsdp), ("tensor", tensor)], devices=devices)


def check_mesh(mesh: Any) -> Mesh:
  if mesh is None:
    return default_mesh()
  if not isinstance(mesh, Mesh):
    raise InputError(f"mesh must be a jax.sharding.Mesh (e.g. var_jax.sampling_mesh(tensor=4)), "
                     f"got {type(mesh).__name__}.")
  if mesh.size < 1:
    raise InputError("mesh has no devices.")
  return mesh


def inference_rules(mesh: Mesh) -> sharding.LogicalRules:
  """The default logical axis rules, with every mesh axis the mesh lacks mapped to None."""
  def keep(axes):
    if axes is None or isinstance(axes, str):
      return axes if axes is None or axes in mesh.axis_names else None
    kept = tuple(a for a in axes if a in mesh.axis_names)
    return kept or None
  return tuple((name, keep(axes)) for name, axes in sharding.DEFAULT_LOGICAL_AXIS_RULES)


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The batch axes (`mesh_axes.BATCH_AXES`) that `mesh` has."""
  return tuple(a for a in mesh_axes.BATCH_AXES if a in mesh.axis_names)


def batch_shards(mesh: Mesh) -> int:
  """How many pieces the batch is split into: the product of the mesh's batch axes."""
  return math.prod(mesh.shape[a] for a in _batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(_batch_axes(mesh) or None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def padded_size(batch: int, mesh: Mesh) -> int:
  shards = batch_shards(mesh)
  return -(-batch // shards) * shards


def pad_batch(x: Any, size: int) -> Any:
  """Pads the leading axis of a numpy array (or ShapeDtypeStruct) to `size` by repeating row 0."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((size,) + tuple(x.shape[1:]), x.dtype)
  x = np.asarray(x)
  if x.shape[0] == size:
    return x
  return np.concatenate([x, np.repeat(x[:1], size - x.shape[0], axis=0)])


def put_batch(x: Any, mesh: Mesh) -> Any:
  """A batch-leading array split over the mesh's batch axes (abstract for ShapeDtypeStructs)."""
  sh = batch_sharding(mesh)
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
  return jax.device_put(x, sh)


def put_replicated(x: Any, mesh: Mesh) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh))
  return jax.device_put(x, replicated(mesh))


@contextlib.contextmanager
def batch_context(mesh: Mesh) -> Iterator[None]:
  """The context every inference program is traced and run in: the mesh and its logical rules.

  Attention kernels reach the mesh through it (they run under shard_map over its axes).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(inference_rules(mesh)):
    yield


# -- weights -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Placement:
  """A model's weights on one mesh.

  Attributes:
    mesh: the mesh.
    var_params: the VAR params, split by their logical axes (device arrays, or ShapeDtypeStructs
      carrying their shardings for an abstract model).
    source: (VAR params, tokenizer params) this was made from: assigning new params to the
      model places them anew.
    tokenizer_config: the tokenizer's config.

  The tokenizer's part (`vae_params`, `decoding_vae_params`) is placed on first use and kept: a
  placement that only runs the transformer (a refiner's in collaborative decoding) holds none.
  """
  mesh: Mesh
  var_params: Any
  source: Any
  tokenizer_config: Any

  @functools.cached_property
  def vae_params(self) -> Any:
    """The tokenizer params, replicated."""
    target = replicated(self.mesh)
    return jax.tree.map(lambda x: _put_leaf(x, target, np.dtype(x.dtype)), self.source[1])

  @functools.cached_property
  def decoding_vae_params(self) -> Any:
    """`vae_params` as a program that decodes reads them: on CPU with the decoder's Winograd
    kernels transformed once beside them (`vqvae.winograd_kernels`, replicated), which its convs
    read instead of transforming every kernel in every call; elsewhere `vae_params`. Made on
    first use: a placement that decodes nothing (a refiner's, `VARModel.logits`') never holds
    them (~560 MB for the released tokenizer in float32)."""
    if attention.computation_platform(self.mesh) != "cpu":
      return self.vae_params
    if _is_abstract_tree(self.vae_params):
      kernels = jax.eval_shape(vqvae.winograd_kernels, self.tokenizer_config, self.vae_params)
    else:
      kernels = vqvae.winograd_kernels(self.tokenizer_config, self.vae_params)
    target = replicated(self.mesh)
    kernels = jax.tree.map(lambda x: _put_leaf(x, target, np.dtype(x.dtype)), kernels)
    return vqvae.with_winograd_kernels(self.vae_params, kernels)


def var_param_shardings(var_config, mesh: Mesh) -> Any:
  """NamedShardings of the VAR params (an unboxed tree like `model.params`) on `mesh`."""
  boxed = var_model.param_shapes(var_config)
  specs = nn.get_partition_spec(boxed)
  return meta.unbox(nn.logical_to_mesh_sharding(specs, mesh, inference_rules(mesh)))


def _path_names(path: tuple) -> list[str]:
  return [getattr(k, "key", getattr(k, "name", str(k))) for k in path]


def stored_dtype(path: tuple, leaf: Any, compute_dtype: str) -> np.dtype:
  """The dtype a VAR param is held in on device: the compute dtype where the model casts it at use."""
  names = _path_names(path)
  if (names and names[-1] in _CAST_AT_USE and not any(m in names for m in _FLOAT32_MODULES)):
    return np.dtype(jnp.dtype(compute_dtype))
  return np.dtype(leaf.dtype)


def held_as_bits(path: tuple, dtype: np.dtype, var_config, mesh: Mesh) -> bool:
  """Whether a VAR param is held as the uint16 bit patterns of its bfloat16 values: the blocks'
  bfloat16 stacks where the decode loop slices them as uint16 (`var.stacks_as_uint16`): on TPU
  (CPU holds them per layer, `held_per_layer`, as bfloat16).

  Held so, the sampling program starts from them as they are (bitcasting them in the program was
  a copy of every stack per call on TPU); the model reads uint16 block params as the bfloat16
  values they hold in every mode, so logits and editing take the same placement.
  """
  return (dtype == np.dtype(jnp.bfloat16) and _path_names(path)[:1] == ["blocks"]
          and not held_per_layer(path, mesh)
          and var_model.stacks_as_uint16(var_config, attention.computation_platform(mesh)))


def held_per_layer(path: tuple, mesh: Mesh) -> bool:
  """Whether a VAR param is held as one array per layer (a tuple of `depth` arrays, each split
  like a layer of the stack): the blocks' params where the model reads them in place that way
  (`var.weights_per_layer`, on CPU). Such leaves are never held as uint16 bit patterns."""
  return (_path_names(path)[:1] == ["blocks"]
          and var_model.weights_per_layer(attention.computation_platform(mesh)))


def _layer(x: Any, i: int) -> Any:
  """Layer i of a stacked param (host, device or abstract).

  A stack in one CPU device's memory (what `var_jax.load_pretrained` gives) yields a read-only
  host view of that memory, which `jax.device_put` onto a CPU device wraps without a copy: the
  per-layer weights a CPU placement holds (`held_per_layer`) then share the model's stacks
  instead of doubling them (1.16 GB for VAR-d16 in float32; where a copy is needed, for another
  device or dtype, `_put_leaf` makes it as before)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  if isinstance(x, jax.Array):
    devices = x.sharding.device_set
    if len(devices) == 1 and next(iter(devices)).platform == "cpu":
      return np.asarray(x)[i]
    return x[i]
  return np.asarray(x)[i]


def _put_var_leaf(path: tuple, x: Any, target: NamedSharding, dtype: np.dtype, var_config,
                  mesh: Mesh) -> Any:
  """A VAR param as `place` holds it: per layer, as bit patterns, or as it is (in `dtype`)."""
  if held_per_layer(path, mesh):
    layer_target = NamedSharding(mesh, PartitionSpec(*tuple(target.spec)[1:]))
    return tuple(_put_leaf(_layer(x, i), layer_target, dtype) for i in range(x.shape[0]))
  return _put_leaf(x, target, dtype, held_as_bits(path, dtype, var_config, mesh))


def _put_leaf(x: Any, target: NamedSharding, dtype: np.dtype, as_bits: bool = False) -> Any:
  """x on `target` in `dtype`; with `as_bits` (dtype bfloat16), as its uint16 bit patterns."""
  held = np.dtype(np.uint16) if as_bits else dtype
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, held, sharding=target)
  if isinstance(x, jax.Array):  # e.g. a training state's params: reshard on device, then cast
    y = jax.device_put(x, target)
    if y.dtype == held:
      return y
    cast = lambda a: a.astype(dtype)
    if as_bits:
      cast = lambda a: float_bits.to_bits(a.astype(dtype))
    return jax.jit(cast, out_shardings=target)(y)
  host = np.asarray(x)
  if host.dtype != dtype:
    host = host.astype(dtype)  # on the host: each device then receives only its shard
  return jax.device_put(host.view(np.uint16) if as_bits else host, target)


def _check_tree(params: Any, shardings: Any) -> None:
  got = jax.tree.structure(params)
  want = jax.tree.structure(shardings)
  if got != want:
    raise InputError(f"the model's VAR params do not have the layout of its config "
                     f"({got.num_leaves} leaves vs {want.num_leaves} expected); rebuild the model "
                     "with VARModel.from_torch or var_jax.load_pretrained.")
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not hasattr(x, "shape"):
      raise InputError(f"VAR param {jax.tree_util.keystr(path)} is not an array.")


def place(model: Any, mesh: Mesh | None = None) -> Placement:
  """The model's weights on `mesh` (default `default_mesh()`), placed once and cached per mesh.

  Abstract params (`jax.ShapeDtypeStruct` leaves) give an abstract placement, never cached.
  """
  mesh = check_mesh(mesh)
  cfg = model.config
  for axis, dims in (("tensor", {"heads": cfg.num_heads, "MLP width": cfg.mlp_dim}),
                     ("fsdp", {"width": cfg.embed_dim})):
    size = mesh.shape.get(axis, 1)
    bad = {name: n for name, n in dims.items() if n % size}
    if bad:
      raise InputError(f"mesh axis {axis!r} has size {size}, which does not divide this model's "
                       f"{', '.join(f'{k} {v}' for k, v in bad.items())}; pick a {axis} size that "
                       f"does (e.g. {_divisors(min(bad.values()))}).")
  cached = model.placements.get(mesh)
  if (cached is not None and cached.source[0] is model.params
      and cached.source[1] is model.tokenizer.params):
    return cached
  shardings = var_param_shardings(model.config, mesh)
  _check_tree(model.params, shardings)
  paths_leaves = jax.tree_util.tree_flatten_with_path(model.params)[0]
  treedef = jax.tree.structure(model.params)
  dtypes = [stored_dtype(path, x, model.config.dtype) for path, x in paths_leaves]
  var_params = jax.tree.unflatten(treedef, [
      _put_var_leaf(path, x, s, dtype, model.config, mesh)
      for (path, x), s, dtype in zip(paths_leaves, jax.tree.leaves(shardings), dtypes)])
  placed = Placement(mesh, var_params, (model.params, model.tokenizer.params),
                     model.tokenizer.config)
  if not is_abstract(model):
    model.placements[mesh] = placed
  return placed


def abstract_view(model: Any) -> Any:
  """The same model with every param replaced by a `jax.ShapeDtypeStruct` (nothing allocated).

  What `var_jax.aot.lower_sample` places: the program is built for the mesh's devices (e.g. a
  compile-only TPU slice) without transferring anything.
  """
  struct = lambda x: (x if isinstance(x, jax.ShapeDtypeStruct)
                      else jax.ShapeDtypeStruct(np.shape(x), np.dtype(x.dtype)))
  tokenizer = type(model.tokenizer)(model.tokenizer.config, jax.tree.map(struct, model.tokenizer.params))
  return type(model)(model.config, jax.tree.map(struct, model.params), tokenizer)


def as_abstract(x: Any) -> jax.ShapeDtypeStruct:
  """A ShapeDtypeStruct of an array (typed PRNG keys included), or x if it is one already."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)


def _divisors(n: int) -> str:
  return ", ".join(str(d) for d in range(1, min(n, 16) + 1) if n % d == 0)


def is_abstract(model: Any) -> bool:
  """True when the model's params are ShapeDtypeStructs (a model for AOT compiles only)."""
  return _is_abstract_tree(model.params)


def _is_abstract_tree(tree: Any) -> bool:
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))
