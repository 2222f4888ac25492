"""Ahead-of-time TPU compilation on a machine without TPUs: meshes, the VAR train step, the sampler.

libtpu's compile-only client (`jax.experimental.topologies.get_topology_desc`) hands out device
objects for any TPU slice. A jit lowered with shardings over them is partitioned, fused, given
its Mosaic (Pallas) kernels and memory-planned exactly as on that slice, but never run. Every
argument here is a `jax.ShapeDtypeStruct` carrying its sharding, so no model, optimizer state or
tokenizer is ever materialised on this host (a VAR-d30 does not fit in its memory anyway).

* `topology_devices` / `topology_mesh`: a ("data", "fsdp", "tensor") mesh (AxisType.Auto, built by
  `sharding.make_mesh` as training builds it) over e.g. "v5e:4x4" or "v5p-128".
* `compile_train_step`: the step `train.loop.run` jits for a VAR training config (same state,
  batch, frozen-tokenizer and rng shardings, state donated), from abstract inputs.
* `lower_sample` / `lower_edit`: the lowered program of `var_jax.sample` / `var_jax.edit` on a
  mesh, through the public calls' own argument checks and placement (`sampler.build_*_call`);
  `compile_sampler` compiles it for a batch of an abstract model (`abstract_model`).
* `analyze`: XLA's per-chip memory (`memory_analysis`) and cost (`cost_analysis`) of a compiled
  program, the Mosaic kernels it calls, and a roofline time against the chip's peak FLOP/s and
  HBM bandwidth. XLA's TPU cost analysis charges a while loop's body once, so the scanned blocks
  are counted once rather than depth times; `loop_corrected` fixes that from a second compile
  with the block scan unrolled by 2 (`unroll=2`).
* `attention_flops_per_example`: analytic FLOPs of the splash kernel, which declares no cost
  estimate to XLA. Model FLOPs (the MFU numerator) come from `var_jax.models.flops`.

Used by tests/test_aot_tpu.py and benchmarks/aot_tpu.py. Needs libtpu (the `tpu` extra).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import time
from typing import Any, Iterator, Sequence
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from var_jax.models import flops as var_flops
from var_jax import scales
from var_jax.parallel import sharding
from var_jax.inference import edit, sampler
from var_jax.inference import placement
from var_jax.errors import ConfigError
from var_jax.models.var import VAR
from var_jax.models.var_config import VARConfig
from var_jax.models.vqvae import VQVAE
from var_jax.models.vqvae_config import VQVAEConfig
from var_jax.inference.tokenizer import Tokenizer
from var_jax.train import optim, train_var
from var_jax.train.metrics import PEAK_BF16_FLOPS_PER_DEVICE
from var_jax.inference.var_model import VARModel

GIB = 2**30
MOSAIC_CALL = "tpu_custom_call"  # the HLO custom-call target of a Pallas TPU (Mosaic) kernel


# -- chips and topologies ------------------------------------------------------------------------

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


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _with_sharding(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves with `shardings` (a matching tree, or one)."""
  struct = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: struct(x, shardings), tree)
  return jax.tree.map(struct, tree, shardings)


# -- abstract inputs -----------------------------------------------------------------------------

def tokenizer_config(config: ml_collections.ConfigDict) -> VQVAEConfig:
  """The tokenizer architecture of a training config, without reading any file.

  `config.tokenizer.overrides` over the VQVAEConfig defaults (the released vae_ch160v4096z32
  tokenizer, which is what an official .pth gives) with the config's patch_nums. A converted or
  self-trained tokenizer of another architecture must spell it out in `overrides` for AOT.
  """
  overrides = dict(config.tokenizer.get("overrides", {}) or {})
  return VQVAEConfig.from_mapping({**overrides, "patch_nums": tuple(config.patch_nums)})


def abstract_tokenizer_params(vae_cfg: VQVAEConfig, mesh: Mesh):
  """The tokenizer's params as ShapeDtypeStructs, replicated (as `loop.run` places them)."""
  size = vae_cfg.image_size

  def init(key):
    return VQVAE(vae_cfg).init(key, jnp.zeros((1, size, size, vae_cfg.in_channels)))["params"]

  return _with_sharding(meta.unbox(jax.eval_shape(init, jax.random.key(0))), replicated(mesh))


def abstract_batch(config: ml_collections.ConfigDict, var_cfg: VARConfig, global_batch: int,
                   mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """One global batch as the input pipeline yields it, split over ("data", "fsdp").

  Images {"image": uint8 (B, S, S, 3), "label": int32 (B,)}, or pre-tokenized
  {"tokens": int32 (B, L), "label": int32 (B,)}.
  """
  batch_sh = sharding.batch_sharding(mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % shards:
    raise ConfigError(f"Global batch {global_batch} does not split over the {shards} batch shards "
                      f"of mesh {dict(mesh.shape)}.")
  labels = jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=batch_sh)
  if config.data.source == "pretokenized":
    return {"tokens": jax.ShapeDtypeStruct((global_batch, var_cfg.seq_len), jnp.int32,
                                           sharding=batch_sh), "label": labels}
  size = var_cfg.image_size
  images = jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.uint8, sharding=batch_sh)
  return {"image": images, "label": labels}


def abstract_key(mesh: Mesh) -> jax.ShapeDtypeStruct:
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(mesh))


# -- the train step ------------------------------------------------------------------------------

def attention_flops_per_example(var_cfg: VARConfig, remat: bool) -> float:
  """FLOPs a flash-style kernel runs for one image's attention, forward + backward.

  Per visible (query, key) pair and layer: 4 C forward (QK^T, PV), 10 C backward (QK^T again,
  dO V^T, P^T dO, dS K, dS^T Q), 4 C more when remat recomputes the forward. Whole masked tiles
  are skipped; the partly visible ones are charged as visible only, so this is a lower bound.
  """
  visible = float(scales.block_causal_mask(var_cfg.patch_nums).sum())
  return (14.0 + (4.0 if remat else 0.0)) * var_cfg.depth * var_cfg.embed_dim * visible

def sampler_flops_per_image(var_cfg: VARConfig, guidance: bool = True) -> dict[str, float]:
  """Matmul FLOPs of one image's KV-cached sampling pass, by part (a multiply-add = 2 FLOPs).

  Per scale and sequence (two with classifier-free guidance): the block linears on the scale's
  rows, attention's 4 C per (query row, visible key) pair and layer, the head, the per-sequence
  AdaLN projections and the word embedding of the scale's input.
  """
  C, depth, V, Cv = var_cfg.embed_dim, var_cfg.depth, var_cfg.vocab_size, var_cfg.z_channels
  seqs = 2 if guidance else 1
  linear_params_per_token = var_flops.block_weights_per_token(var_cfg)  # qkv, proj, fc1, fc2
  ada_params = var_flops.adaln_weights(var_cfg)
  parts = {"linear": 0.0, "attention": 0.0, "head": 0.0, "adaln": 0.0, "word_embed": 0.0}
  for si, (begin, end) in enumerate(scales.begin_ends(var_cfg.patch_nums)):
    rows = end - begin
    parts["linear"] += seqs * rows * depth * 2 * linear_params_per_token
    parts["attention"] += seqs * depth * 4 * rows * end * C
    parts["head"] += seqs * rows * 2 * C * V
    parts["adaln"] += seqs * 2 * ada_params
    if si > 0:
      parts["word_embed"] += seqs * rows * 2 * Cv * C
  parts["total"] = sum(parts.values())
  return parts


def sampler_min_bytes(var_cfg: VARConfig, batch: int, param_bytes: int,
                      guidance: bool = True) -> float:
  """HBM bytes a KV-cached sampling call of `batch` images must move, at the least.

  The VAR weights once per scale (they do not fit in on-chip memory), every key and value
  written once and each layer's visible cache prefix read once per scale, and the float32
  logits written once and read once. Activations, the filter's sort and the decode are left out
  (the decode is charged separately), so this is a lower bound.
  """
  seqs = (2 if guidance else 1) * batch
  C, depth = var_cfg.embed_dim, var_cfg.depth
  item = jnp.dtype(var_cfg.dtype).itemsize
  kv_row = 2 * depth * C * item  # keys and values of one token, all layers
  visible = sum(end for _, end in scales.begin_ends(var_cfg.patch_nums))
  cache = seqs * kv_row * (var_cfg.seq_len + visible)
  logits = 2 * seqs * var_cfg.seq_len * var_cfg.vocab_size * 4
  return float(var_cfg.num_scales * param_bytes + cache + logits)


@dataclasses.dataclass
class CompiledProgram:
  """A compiled program and what the figures need.

  Attributes:
    compiled: the `jax.stages.Compiled`.
    mesh: the mesh it was compiled for.
    var_config: the VAR architecture.
    batch: global batch (images per step, or sampled images per call).
    num_params: VAR parameters.
    model_flops: analytic model FLOPs of one call over all chips (train:
      `flops.flops_per_example` x batch; sampler: None).
    lower_s: seconds to trace and lower.
    compile_s: seconds XLA took to compile.
  """
  compiled: Any
  mesh: Mesh
  var_config: VARConfig | None
  batch: int
  num_params: int
  model_flops: float | None
  lower_s: float
  compile_s: float


@contextlib.contextmanager
def scan_unroll(unroll: int) -> Iterator[None]:
  """While tracing, every `flax.linen.scan` without an explicit `unroll` unrolls by `unroll`.

  VAR stacks its blocks with `nn.scan`; unroll=2 gives a loop of depth/2 trips over two blocks.
  Only `loop_corrected` needs this: it is how the per-block cost is told apart from the rest.
  """
  if unroll == 1:
    yield
    return
  original = nn.scan

  def patched(*args, **kwargs):
    kwargs.setdefault("unroll", unroll)
    return original(*args, **kwargs)

  with mock.patch.object(nn, "scan", patched):
    yield


def _lower_and_compile(jitted, *args, unroll: int = 1) -> tuple[Any, float, float]:
  t0 = time.perf_counter()
  with scan_unroll(unroll):
    lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t1


def compile_train_step(config: ml_collections.ConfigDict, mesh: Mesh, *,
                       global_batch: int | None = None, unroll: int = 1) -> CompiledProgram:
  """AOT-compiles the VAR train step of `config` for `mesh`, from abstract inputs only.

  The program is the one `train.loop.run` jits for `train_var.build_task(config)`: the same
  `make_train_step` / `make_init_state` / optimizer pieces (built here directly, because
  `build_task` loads real tokenizer weights), the rng folded with the step, the state donated,
  in/out shardings from `config.rules` over `mesh`, the tokenizer params replicated.

  Args:
    config: a VAR training config (configs/var_*.py); `config.mesh` is ignored in favour of `mesh`.
    mesh: e.g. `topology_mesh("v5p-128", config.mesh)`.
    global_batch: images per step; default `config.global_batch_size`.
    unroll: unroll factor of the scan over blocks (`scan_unroll`); 1 is the training program.
  """
  global_batch = int(global_batch or config.global_batch_size)
  rules = sharding.logical_axis_rules(config.get("rules"), mesh)
  vae_cfg = tokenizer_config(config)
  var_cfg = train_var.var_config_from(config, vae_cfg)
  total_updates = config.total_steps // max(1, config.optim.grad_accum_steps)
  opt = optim.make_optimizer(config.optim, global_batch_size=global_batch,
                             total_steps=total_updates)
  init = train_var.make_init_state(var_cfg, opt.tx, config.optim.ema_decay > 0)
  train_step = train_var.make_train_step(var_cfg, vae_cfg, opt.tx, config)

  init_rng, _ = jax.random.split(jax.random.key(config.seed))
  state, boxed_shardings = sharding.abstract_sharded_state(init, init_rng, mesh, rules)
  state_shardings = nn.unbox(boxed_shardings)
  num_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)))
  vae_params = abstract_tokenizer_params(vae_cfg, mesh)
  batch = abstract_batch(config, var_cfg, global_batch, mesh)
  repl = replicated(mesh)

  def step_fn(state, batch, frozen, rng):  # as in loop.run
    return train_step(state, batch, frozen, jax.random.fold_in(rng, state.step))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jitted = jax.jit(step_fn,
                     in_shardings=(state_shardings, sharding.batch_sharding(mesh),
                                   jax.tree.map(lambda _: repl, vae_params), repl),
                     out_shardings=(state_shardings, repl), donate_argnums=0)
    compiled, lower_s, compile_s = _lower_and_compile(jitted, state, batch, vae_params,
                                                      abstract_key(mesh), unroll=unroll)
  model_flops = var_flops.flops_per_example(var_cfg) * global_batch
  return CompiledProgram(compiled, mesh, var_cfg, global_batch, num_params, model_flops,
                         lower_s, compile_s)


# -- the sampler ---------------------------------------------------------------------------------

def abstract_model(var_cfg: VARConfig, vae_cfg: VQVAEConfig) -> VARModel:
  """A VARModel whose params are `jax.ShapeDtypeStruct`s: nothing allocated, for AOT lowering.

  `var_cfg.dtype` is the compute dtype; the placement stores the matmul weights in it, as
  `var_jax.sample` does for a model of that dtype.
  """
  L = var_cfg.seq_len
  size = vae_cfg.image_size

  def var_init(key):
    return VAR(dataclasses.replace(var_cfg, attention_impl="xla")).init(
        key, jnp.zeros((1,), jnp.int32), jnp.zeros((1, L - var_cfg.first_l, var_cfg.z_channels)))["params"]

  def vae_init(key):
    return VQVAE(vae_cfg).init(key, jnp.zeros((1, size, size, vae_cfg.in_channels)))["params"]

  var_params = meta.unbox(jax.eval_shape(var_init, jax.random.key(0)))
  vae_params = meta.unbox(jax.eval_shape(vae_init, jax.random.key(0)))
  return VARModel(var_cfg, var_params, Tokenizer(vae_cfg, vae_params))


def lower_sample(model: VARModel, labels, *, mesh: Mesh, **sample_options) -> jax.stages.Lowered:
  """The lowered program `var_jax.sample(model, labels, mesh=mesh, **sample_options)` runs.

  The same argument checks and the same placement (`sampler.build_sample_call`): weights split
  by their logical axes over `mesh`, the batch padded to and split over its batch axes, kernels
  under shard_map; on the abstract view of `model` (concrete params are never transferred), so
  `mesh` may hold devices this host cannot run on (a compile-only TPU slice).

  Args:
    model: a VARModel with concrete or ShapeDtypeStruct params (`abstract_model`).
    labels: class ids (B,), or an int (B,) ShapeDtypeStruct.
    mesh: the devices, e.g. `topology_mesh("v5e:2x2", mesh_config(1, 1, 4))`.
    **sample_options: `sample`'s keywords (rng defaults to key 0; return_tokens is ignored).
  """
  sample_options = {"rng": jax.random.key(0), **sample_options}
  sample_options.pop("return_tokens", None)
  return sampler.build_sample_call(placement.abstract_view(model), labels, mesh=mesh,
                                    **sample_options).lower(fresh=True)


def lower_edit(model: VARModel, images, mask, labels, *, mesh: Mesh,
               **edit_options) -> jax.stages.Lowered:
  """The lowered program `var_jax.edit(model, images, mask, labels, mesh=mesh, **edit_options)`
  runs (as `lower_sample`); `images` may be a float32 (B, H, W, 3) ShapeDtypeStruct."""
  edit_options = {"rng": jax.random.key(0), **edit_options}
  edit_options.pop("return_tokens", None)
  return edit.build_edit_call(placement.abstract_view(model), images, mask, labels, mesh=mesh,
                                  **edit_options).lower(fresh=True)


def compile_sampler(var_cfg: VARConfig, vae_cfg: VQVAEConfig, mesh: Mesh, batch: int, *,
                    more_smooth: bool = False, unroll: int = 1,
                    model: VARModel | None = None) -> CompiledProgram:
  """AOT-compiles what `var_jax.sample(model, labels, mesh=mesh)` runs for `batch` labels.

  Through `lower_sample`, so the placement is the public call's: the batch padded to and split
  over ("data", "fsdp"), the VAR weights split by their logical axes (replicated when fsdp and
  tensor are 1), stored in `var_cfg.dtype` where the model casts them at use.

  Args:
    var_cfg: the VAR architecture (its dtype and attention_impl are used as given).
    vae_cfg: the tokenizer architecture (patch_nums must match).
    mesh: e.g. `topology_mesh("v5e:2x2", mesh_config(1, 1, 4))`.
    batch: class labels per call (any size; the model runs 2 x padded batch sequences).
    more_smooth: the Gumbel-softmax smoothing variant.
    unroll: unroll factor of the scan over blocks (`scan_unroll`); 1 is the sampling program.
    model: the model to compile for (default `abstract_model(var_cfg, vae_cfg)`).
  """
  model = abstract_model(var_cfg, vae_cfg) if model is None else model
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  t0 = time.perf_counter()
  with scan_unroll(unroll):
    lowered = lower_sample(model, labels, mesh=mesh, more_smooth=more_smooth)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  num_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(model.params)))
  return CompiledProgram(compiled, mesh, model.config, batch, num_params, None, t1 - t0,
                         time.perf_counter() - t1)


def compile_decoder(vae_cfg: VQVAEConfig, mesh: Mesh, batch: int) -> CompiledProgram:
  """AOT-compiles the tokenizer decode of `batch` f_hat maps (the sampler's last step) alone.

  Its cost is what the sampler spends after the transformer; `benchmarks/aot_tpu.py` uses it for
  the decode's share of the sampler's ideal roofline. The batch is split over ("data", "fsdp").
  """
  vae_params = abstract_tokenizer_params(vae_cfg, mesh)
  size = vae_cfg.latent_size
  f_hat = jax.ShapeDtypeStruct((batch, size, size, vae_cfg.z_channels), jnp.float32,
                               sharding=sharding.batch_sharding(mesh))
  decode = lambda p, f: VQVAE(vae_cfg).apply({"params": p}, f, method=VQVAE.decode_fhat)
  with jax.set_mesh(mesh):
    compiled, lower_s, compile_s = _lower_and_compile(jax.jit(decode), vae_params, f_hat)
  num_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(vae_params)))
  return CompiledProgram(compiled, mesh, None, batch, num_params, None, lower_s, compile_s)


# -- figures -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Analysis:
  """Per-chip figures of a compiled SPMD program (XLA describes one device's partitioned program).

  Attributes:
    argument_bytes, output_bytes, alias_bytes, temp_bytes, code_bytes: `memory_analysis()`.
    peak_bytes: argument + output - alias + temp + code: live HBM at the program's peak, an
      upper bound that counts donated outputs once.
    hbm_bytes: the chip's HBM.
    flops, bytes_accessed, transcendentals: `cost_analysis()`; Pallas calls count only what their
      CostEstimate declares (splash declares nothing).
    optimal_s: the TPU cost model's time estimate (-1 where it has none).
    mosaic_calls: Mosaic (Pallas TPU) custom-call sites in the optimized HLO.
    kernels: ((kernel name, call sites), ...) of those: ours (splash_mha_*, var_prefix_attention)
      and any XLA emits itself (e.g. "online-softmax" for a softmax feeding a matmul).
    peak_flops, hbm_bandwidth: the chip's peaks.
  """
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  hbm_bytes: int
  flops: float
  bytes_accessed: float
  transcendentals: float
  optimal_s: float
  mosaic_calls: int
  peak_flops: float
  hbm_bandwidth: float
  kernels: tuple[tuple[str, int], ...] = ()

  @property
  def peak_bytes(self) -> int:
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.hbm_bytes

  @property
  def compute_s(self) -> float:
    return self.flops / self.peak_flops

  @property
  def memory_s(self) -> float:
    return self.bytes_accessed / self.hbm_bandwidth

  @property
  def roofline_s(self) -> float:
    """max(flops / peak FLOP/s, bytes / HBM bandwidth): a lower bound on one call's time."""
    return max(self.compute_s, self.memory_s)

  @property
  def bound(self) -> str:
    return "compute" if self.compute_s >= self.memory_s else "memory"


def analyze(compiled: Any, chip: ChipSpec) -> Analysis:
  """Per-chip memory and cost figures of `compiled` for `chip`."""
  memory = compiled.memory_analysis()
  if isinstance(memory, (list, tuple)):
    memory = memory[0]
  if memory is None:
    raise RuntimeError("memory_analysis() returned None for this executable.")
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return Analysis(
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      code_bytes=int(memory.generated_code_size_in_bytes),
      hbm_bytes=chip.hbm_bytes,
      flops=float(cost.get("flops", 0.0)),
      bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      transcendentals=float(cost.get("transcendentals", 0.0)),
      optimal_s=float(cost.get("optimal_seconds", -1.0)),
      mosaic_calls=compiled.as_text().count(MOSAIC_CALL),
      peak_flops=chip.peak_flops,
      hbm_bandwidth=chip.hbm_bandwidth,
      kernels=tuple(sorted(mosaic_kernels(compiled).items())),
  )


def mosaic_kernels(compiled: Any) -> dict[str, int]:
  """{kernel name: call sites} of the Mosaic custom calls in `compiled`'s optimized HLO.

  The name is the HLO instruction's without its ".N" suffix: "splash_mha_fwd_residuals",
  "var_prefix_attention", or XLA's own "online-softmax".
  """
  counts: dict[str, int] = {}
  for line in compiled.as_text().splitlines():
    if f'custom_call_target="{MOSAIC_CALL}"' not in line:
      continue
    name = re.sub(r"\.\d+$", "", line.split("=", 1)[0].strip().lstrip("%"))
    counts[name] = counts.get(name, 0) + 1
  return counts


def uses_kernel(analysis: Analysis, prefix: str) -> bool:
  """Whether a Mosaic kernel whose name starts with `prefix` (e.g. "splash") is called."""
  return any(name.startswith(prefix) for name, _ in analysis.kernels)


def loop_corrected(looped: Analysis, unrolled2: Analysis, trips: int) -> Analysis:
  """Costs of a program whose scanned blocks XLA's cost analysis counted only once.

  The TPU `cost_analysis()` charges a while loop's body once, whatever its trip count. With the
  same program compiled with the block scan unrolled by 2 (`unroll=2`; every loop body then holds
  two blocks), the difference of the two analyses is one trip of every block loop (the forward
  and backward loops of training; the loop of each sampled scale). Adding (trips - 1) of it gives
  the full program. Memory figures stay those of `looped`, the real program.

  Args:
    looped: analysis of the program as it runs (unroll=1).
    unrolled2: analysis of the same program compiled with unroll=2.
    trips: the scans' length (the model depth; must be even for unroll=2 to divide it).
  """
  if trips % 2:
    raise ConfigError(f"loop_corrected needs an even trip count (depth), got {trips}.")
  def full(name: str) -> float:
    once, twice = getattr(looped, name), getattr(unrolled2, name)
    return once + (trips - 1) * (twice - once)

  optimal = full("optimal_s") if looped.optimal_s >= 0 and unrolled2.optimal_s >= 0 else -1.0
  return dataclasses.replace(looped, flops=full("flops"), bytes_accessed=full("bytes_accessed"),
                             transcendentals=full("transcendentals"), optimal_s=optimal)


def while_loops(compiled: Any) -> int:
  """Number of while loops in the optimized HLO of `compiled`."""
  return sum(" while(" in line for line in compiled.as_text().splitlines())


def mfu_ceiling(model_flops: float, num_chips: int, analysis: Analysis) -> float:
  """Model FLOPs per chip / (roofline time x peak FLOP/s): the best MFU the program allows."""
  return model_flops / num_chips / (analysis.roofline_s * analysis.peak_flops)


def libtpu_available() -> bool:
  """Whether libtpu imports (AOT TPU compilation needs it, TPU hardware not)."""
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True
