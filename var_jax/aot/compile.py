"""Ahead-of-time compiles of the VAR train step and sampler, from abstract inputs only.

Every argument here is a `jax.ShapeDtypeStruct` carrying its sharding, so no model, optimizer state
or tokenizer is ever materialised on this host (a VAR-d30 does not fit in its memory anyway); the
mesh is usually one over a TPU slice's compile-only devices (`topologies.topology_mesh`).

* `compile_train_step`: the step `train.loop.run` jits for a VAR training config (same state,
  batch, frozen-tokenizer and rng shardings, state donated).
* `lower_sample` / `lower_edit`: the lowered program of `var_jax.sample` / `var_jax.edit` on a
  mesh, through the public calls' own argument checks and placement (`sampler.build_*_call`);
  `compile_sampler` compiles it for a batch of an abstract model (`abstract_model`).
* `compile_decoder`: the tokenizer decode alone (the sampler's last step).
* `scan_unroll`: unrolls the block scan while tracing, for the cost reports (`report.py`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Iterator
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from var_jax.models import flops as var_flops
from var_jax.parallel import sharding
from var_jax.inference import edit, sampler
from var_jax.inference import placement
from var_jax.errors import ConfigError
from var_jax.models import var as var_model
from var_jax.models.var_config import VARConfig
from var_jax.models import vqvae
from var_jax.models.vqvae_config import VQVAEConfig
from var_jax.inference.tokenizer import Tokenizer
from var_jax.train import guidance_free, optim, train_var
from var_jax.inference.var_model import VARModel


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
  abstract = vqvae.param_shapes(vae_cfg)
  return _with_sharding(meta.unbox(abstract), replicated(mesh))


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
      `flops.flops_per_example` x batch; sampler: `flops.sampler_flops_per_image` x batch, the
      transformer's matmuls; decoder: None).
    lower_s: seconds to trace and lower.
    compile_s: seconds XLA took to compile.
    lowered: the `jax.stages.Lowered` it was compiled from (its StableHLO: what was traced).
  """
  compiled: Any
  mesh: Mesh
  var_config: VARConfig | None
  batch: int
  num_params: int
  model_flops: float | None
  lower_s: float
  compile_s: float
  lowered: Any = None


@contextlib.contextmanager
def scan_unroll(unroll: int, length: int | None = None, *,
                slice_each_step: bool = False) -> Iterator[None]:
  """While tracing, every `flax.linen.scan` without an explicit `unroll` unrolls by `unroll`
  (only scans of `length` steps when given: one model's blocks in a two-model program).

  VAR stacks its blocks with `nn.scan`; unroll=2 gives a loop of depth/2 trips over two blocks,
  unroll=depth no loop. Only the cost reports need this: the train step's `loop_corrected` tells
  the per-block cost apart from the rest with unroll=2; the sampler's report compiles with its
  block scans fully unrolled (`slice_each_step=True`).

  `lax.scan`'s own partial unroll (1 < unroll < length) slices a block of `unroll` steps out of
  every stacked input per trip and indexes into it; with two consumers XLA copies that block (a
  stacked weight read 5x per block as TPU's cost analysis charges it: 84 MB against 17 MB of
  weights in a 2-matmul toy), which the program as it runs (unroll=1, one dynamic slice per step
  fused into its matmul) never does, so the correction overcounts. `slice_each_step=True` unrolls
  instead by indexing every step's inputs out of the whole stack, as unroll=1 does (the toy then
  corrects to the fully unrolled figure exactly), unroll=length too (one trip over every step,
  which XLA inlines); not for differentiated programs, whose
  closed-over stacks would take a full-size cotangent per step.
  """
  if unroll == 1:
    yield
    return
  original = nn.scan

  def patched(*args, **kwargs):
    if length is None or kwargs.get("length") == length:
      kwargs.setdefault("unroll", unroll)
    return original(*args, **kwargs)

  with contextlib.ExitStack() as stack:
    stack.enter_context(mock.patch.object(nn, "scan", patched))
    if slice_each_step:
      stack.enter_context(mock.patch.object(jax.lax, "scan", _step_sliced_scan(jax.lax.scan)))
    yield


def _step_sliced_scan(lax_scan):
  """`lax.scan` whose partial unroll indexes each step's xs from the whole stack (`scan_unroll`)."""
  def scan(f, init, xs=None, length=None, reverse=False, unroll=1, **kwargs):
    n = length if length is not None else jax.tree.leaves(xs)[0].shape[0]
    if isinstance(unroll, bool) or unroll <= 1 or unroll > n or n % unroll:
      return lax_scan(f, init, xs, length=length, reverse=reverse, unroll=unroll, **kwargs)

    def trip(carry, t):
      ys = {}
      for j in (reversed(range(unroll)) if reverse else range(unroll)):
        x = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, t * unroll + j, 0, False), xs)
        carry, ys[j] = f(carry, x)
      return carry, jax.tree.map(lambda *y: jnp.stack(y), *(ys[j] for j in range(unroll)))

    carry, ys = lax_scan(trip, init, jnp.arange(n // unroll), reverse=reverse)
    return carry, jax.tree.map(lambda y: y.reshape((n,) + y.shape[2:]), ys)

  return scan


def _lower_and_compile(jitted, *args, unroll: int = 1) -> tuple[Any, Any, float, float]:
  t0 = time.perf_counter()
  with scan_unroll(unroll):
    lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return lowered, compiled, t1 - t0, time.perf_counter() - t1


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
  train_step = train_var.make_step_for(config, var_cfg, vae_cfg, opt.tx)

  init_rng, _ = jax.random.split(jax.random.key(config.seed))
  state, boxed_shardings = sharding.abstract_sharded_state(init, init_rng, mesh, rules)
  state_shardings = nn.unbox(boxed_shardings)
  num_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)))
  vae_params = abstract_tokenizer_params(vae_cfg, mesh)
  batch = abstract_batch(config, var_cfg, global_batch, mesh)
  repl = replicated(mesh)
  frozen = vae_params
  model_flops = var_flops.flops_per_example(var_cfg) * global_batch
  if guidance_free.check_config(config) == "cca":  # the reference: a frozen copy of the params
    frozen = {"vae": vae_params, "reference": state.params}
    model_flops *= 8 / 3  # as train_var.build_task: policy fwd + bwd and reference fwd on 2B
  frozen_shardings = train_var.frozen_shardings_for(config)(frozen, state_shardings)

  def step_fn(state, batch, frozen, rng):  # as in loop.run
    return train_step(state, batch, frozen, jax.random.fold_in(rng, state.step))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jitted = jax.jit(step_fn,
                     in_shardings=(state_shardings, sharding.batch_sharding(mesh),
                                   frozen_shardings, repl),
                     out_shardings=(state_shardings, repl), donate_argnums=0)
    lowered, compiled, lower_s, compile_s = _lower_and_compile(
        jitted, state, batch, frozen, abstract_key(mesh), unroll=unroll)
  return CompiledProgram(compiled, mesh, var_cfg, global_batch, num_params, model_flops,
                         lower_s, compile_s, lowered)


# -- the sampler ---------------------------------------------------------------------------------

def abstract_model(var_cfg: VARConfig, vae_cfg: VQVAEConfig) -> VARModel:
  """A VARModel whose params are `jax.ShapeDtypeStruct`s: nothing allocated, for AOT lowering.

  `var_cfg.dtype` is the compute dtype; the placement stores the matmul weights in it, as
  `var_jax.sample` does for a model of that dtype.
  """
  var_params = meta.unbox(var_model.param_shapes(var_cfg))
  vae_params = meta.unbox(vqvae.param_shapes(vae_cfg))
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
  if sample_options.get("refiner") is not None:
    sample_options["refiner"] = placement.abstract_view(sample_options["refiner"])
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
  with scan_unroll(unroll, slice_each_step=True):
    lowered = lower_sample(model, labels, mesh=mesh, more_smooth=more_smooth)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  num_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(model.params)))
  model_flops = var_flops.sampler_flops_per_image(model.config)["total"] * batch
  return CompiledProgram(compiled, mesh, model.config, batch, num_params, model_flops, t1 - t0,
                         time.perf_counter() - t1, lowered)


def compile_decoder(vae_cfg: VQVAEConfig, mesh: Mesh, batch: int) -> CompiledProgram:
  """AOT-compiles the tokenizer decode of `batch` f_hat maps (the sampler's last step) alone.

  Its cost is what the sampler spends after the transformer (tests/test_aot_tpu.py compiles it
  alone). The batch is split over ("data", "fsdp").
  """
  vae_params = abstract_tokenizer_params(vae_cfg, mesh)
  size = vae_cfg.latent_size
  f_hat = jax.ShapeDtypeStruct((batch, size, size, vae_cfg.z_channels), jnp.float32,
                               sharding=sharding.batch_sharding(mesh))
  decode = lambda p, f: vqvae.VQVAE(vae_cfg).apply({"params": p}, f, method=vqvae.VQVAE.decode_fhat)
  with jax.set_mesh(mesh):
    lowered, compiled, lower_s, compile_s = _lower_and_compile(jax.jit(decode), vae_params, f_hat)
  num_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(vae_params)))
  return CompiledProgram(compiled, mesh, None, batch, num_params, None, lower_s, compile_s, lowered)
