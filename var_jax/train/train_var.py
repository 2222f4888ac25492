"""VAR training: `var-jax train --config configs/var_d16.py --workdir DIR [--config.x=y ...]`.

The official recipe (VAR_SPEC §5): a frozen tokenizer turns images into token maps inside the step
(or pre-tokenized maps are read from disk), teacher forcing over all L tokens, cross-entropy with
label smoothing (default 0), label dropout 0.1, AdamW with the official LR/WD schedules and no-decay
set, clipping at 2.0, bfloat16 compute with float32 parameters, optional EMA. Optional progressive
training (`config.progressive`, off by default; `var_jax/train/progressive.py`) trains on a growing
prefix of scales, one compiled step per stage.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax.core import meta

from var_jax import scales
from var_jax.models import flops
from var_jax.data.augment import scale_to_model_range
from var_jax.errors import ConfigError
from var_jax.models.var import VAR
from var_jax.models.var_config import VARConfig
from var_jax.models.vqvae import VQVAE
from var_jax.models.vqvae_config import VQVAEConfig
from var_jax.train import fid_hook, loop, optim, progressive
from var_jax.train.state import TrainState


# -- the tokenizer -----------------------------------------------------------------------------

def load_tokenizer(config: ml_collections.ConfigDict):
  """(VQVAEConfig, params) from config.tokenizer: an official .pth, an exported or converted dir, a
  tokenizer training workdir, or "random" (tests and smoke runs only)."""
  from var_jax.inference.training_runs import tokenizer_from_spec
  tok = tokenizer_from_spec(config.tokenizer, config.patch_nums)
  return tok.config, tok.params


def var_config_from(config: ml_collections.ConfigDict, vae_cfg: VQVAEConfig) -> VARConfig:
  from var_jax.inference.training_runs import var_config_of
  return var_config_of({"model": dict(config.model)}, vae_cfg)


# -- the step ----------------------------------------------------------------------------------

def cross_entropy(logits_BLV, targets_BL, label_smoothing: float):
  """Per-token CE in float32, optionally label-smoothed (the official `--ls`)."""
  logp = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets_BL[..., None], axis=-1)[..., 0]
  if label_smoothing:
    nll = (1 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
  return nll


def make_train_step(var_cfg: VARConfig, vae_cfg: VQVAEConfig, tx, config: ml_collections.ConfigDict,
                    prog_si: int | None = None):
  """(state, batch, vae_params, rng[, stage_inputs]) -> (state, metrics).

  Args:
    var_cfg: the VAR architecture.
    vae_cfg: the tokenizer's.
    tx: the optax transformation.
    config: the training config (label_smoothing, optim.ema_decay).
    prog_si: progressive stage (static): train on scales 0..prog_si, i.e. the first ed tokens, with
      the official stage loss (`progressive.stage_loss`). None or K - 1: all L tokens, the plain
      mean cross-entropy.

  The step takes an optional `stage_inputs` mapping, {"prog_wp": scalar}, the newest scale's loss
  multiplier (default 1); when given, the metrics also carry prog_si and prog_wp.
  """
  vae = VQVAE(vae_cfg)
  patch_nums = var_cfg.patch_nums
  last_stage = var_cfg.num_scales - 1
  stage = last_stage if prog_si is None else prog_si
  if isinstance(stage, bool) or not 0 <= stage <= last_stage:
    raise ConfigError(f"prog_si must be in [0, {last_stage}] or None, got {prog_si!r}.")
  full = stage == last_stage
  model = VAR(var_cfg, train=True, prog_si=None if full else stage)
  end = progressive.stage_end(patch_nums, stage)
  last_begin = scales.begin_ends(patch_nums)[-1][0]
  ema_decay = float(config.optim.ema_decay)
  smoothing = float(config.get("label_smoothing", 0.0))

  def token_maps(batch, vae_params):
    if "tokens" in batch:
      flat = batch["tokens"].astype(jnp.int32)
      maps, start = [], 0
      for pn in patch_nums:
        maps.append(flat[:, start:start + pn * pn].reshape(-1, pn, pn))
        start += pn * pn
      return maps
    images = scale_to_model_range(batch["image"])
    return vae.apply({"params": vae_params}, images, method=VQVAE.encode)

  def step(state: TrainState, batch, vae_params, rng, stage_inputs=None):
    maps = [jax.lax.stop_gradient(m) for m in token_maps(batch, vae_params)]
    x_BlCv = jax.lax.stop_gradient(vae.apply({"params": vae_params}, maps, method=VQVAE.indices_to_var_input))
    targets_BL = jnp.concatenate([m.reshape(m.shape[0], -1) for m in maps], axis=1)
    if not full:  # later scales' inputs and targets go unused (XLA can prune their computation)
      x_BlCv, targets_BL = x_BlCv[:, :end - var_cfg.first_l], targets_BL[:, :end]
    labels = batch["label"].astype(jnp.int32)
    prog_wp = 1.0 if stage_inputs is None else stage_inputs["prog_wp"]

    def loss_fn(params):
      logits = model.apply({"params": params}, labels, x_BlCv, rngs={"dropout": rng})
      nll_BL = cross_entropy(logits, targets_BL, smoothing)
      if full:
        return jnp.mean(nll_BL), (logits, nll_BL)
      return progressive.stage_loss(nll_BL, patch_nums, stage, prog_wp), (logits, nll_BL)

    (loss, (logits, nll_BL)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = optim.ema_update(ema, params, ema_decay, optim.optimizer_updated(opt_state))
    correct_BL = (jnp.argmax(logits, axis=-1) == targets_BL).astype(jnp.float32)
    stats = optim.last_update_stats(opt_state)
    metrics = {
        "loss": loss, "accuracy": jnp.mean(correct_BL),
        "learning_rate": stats["learning_rate"], "weight_decay": stats["weight_decay"],
        "grad_norm": stats["grad_norm"],
    }
    if full:  # a progressive stage has no last scale (the official logs -1 there)
      metrics["loss_last_scale"] = jnp.mean(nll_BL[:, last_begin:])
      metrics["accuracy_last_scale"] = jnp.mean(correct_BL[:, last_begin:])
    if stage_inputs is not None:
      metrics["prog_si"] = jnp.float32(stage)
      metrics["prog_wp"] = jnp.asarray(prog_wp, jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new_state, metrics

  return step


def make_init_state(var_cfg: VARConfig, tx, ema: bool):
  L = var_cfg.seq_len

  def init(rng):
    variables = VAR(var_cfg).init(rng, jnp.zeros((1,), jnp.int32),
                                  jnp.zeros((1, L - var_cfg.first_l, var_cfg.z_channels), jnp.float32))
    params = variables["params"]  # boxed: the loop reads the logical axes off it
    return TrainState.create(params, tx, ema=ema)

  return init


# -- periodic sample grids -----------------------------------------------------------------------

def make_sample_hook(var_cfg: VARConfig, vae_cfg: VQVAEConfig, vae_params, config):
  """A hook writing a grid of samples of the current (EMA) weights to workdir/samples/.

  It calls `var_jax.sample` on the training mesh (taken from the params' sharding), so any
  number of sample classes works on any mesh (the batch is padded to its batch shards).
  """
  from jax.experimental import multihost_utils
  from var_jax.inference import images as image_io
  from var_jax.inference.sampler import sample
  from var_jax.inference.tokenizer import Tokenizer
  from var_jax.inference.var_model import VARModel
  classes = np.asarray(list(config.get("sample_classes") or range(min(var_cfg.num_classes, 8))))
  tokenizer = Tokenizer(vae_cfg, vae_params)

  def hook(state: TrainState, step: int, workdir: epath.Path):
    params = state.ema_params if state.ema_params is not None else state.params
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    model = VARModel(var_cfg, params, tokenizer)
    top_k = config.sample_top_k if config.sample_top_k < var_cfg.vocab_size else 0  # 0: all
    imgs = sample(model, classes, rng=jax.random.key(0), cfg=float(config.sample_cfg), top_k=int(top_k),
                  top_p=float(config.sample_top_p), mesh=mesh)
    imgs = np.asarray(multihost_utils.process_allgather(imgs, tiled=True))
    if jax.process_index() == 0:
      path = image_io.save_png(image_io.make_grid(imgs), workdir / "samples" / f"step_{step:08d}.png")
      logging.info("Wrote sample grid %s", path)

  return hook


# -- entry points --------------------------------------------------------------------------------

def make_staging(var_cfg: VARConfig, vae_cfg: VQVAEConfig, tx, config: ml_collections.ConfigDict,
                 schedule: progressive.Schedule) -> loop.Staging:
  """The loop's stages for progressive training: stage prog_si, input prog_wp, ed tokens and
  their model FLOPs (`flops.flops_per_example(var_cfg, prog_si)`)."""

  def stage_at(step: int) -> loop.Stage:
    prog_si, prog_wp = schedule(step)
    return loop.Stage(key=prog_si, inputs={"prog_wp": prog_wp},
                      tokens_per_example=progressive.stage_end(var_cfg.patch_nums, prog_si),
                      flops_per_example=flops.flops_per_example(var_cfg, prog_si))

  def make_step(prog_si: int):
    return make_train_step(var_cfg, vae_cfg, tx, config, prog_si=prog_si)

  return loop.Staging(stage_at=stage_at, make_step=make_step)


def progressive_schedule(config: ml_collections.ConfigDict,
                         var_cfg: VARConfig) -> progressive.Schedule:
  """The progressive stage schedule of this run (a disabled one when config.progressive is off)."""
  updates = config.total_steps // max(1, config.optim.grad_accum_steps)
  return progressive.Schedule.from_config(
      config.get("progressive"), num_scales=var_cfg.num_scales,
      warmup_it=optim.warmup_iterations(config.optim, updates), max_it=config.total_steps)


def build_task(config: ml_collections.ConfigDict) -> tuple[loop.TrainTask, VARConfig]:
  vae_cfg, vae_params = load_tokenizer(config)
  if config.data.source != "pretokenized" and config.data.image_size != vae_cfg.image_size:
    raise ConfigError(f"data.image_size {config.data.image_size} must be the tokenizer's image size "
                      f"{vae_cfg.image_size} (16 x the last patch number for the official layout).")
  var_cfg = var_config_from(config, vae_cfg)
  schedule = progressive_schedule(config, var_cfg)
  optim_config = config.optim
  lr_schedule = progressive.effective_lr_schedule(config)
  if lr_schedule != optim_config.schedule:
    optim_config = config.optim.copy_and_resolve_references()
    optim_config.schedule = lr_schedule
    logging.info("Progressive training (pg=%g): LR schedule %r, as the official trainer.",
                 schedule.pg, lr_schedule)
  opt = optim.make_optimizer(optim_config, global_batch_size=config.global_batch_size,
                             total_steps=config.total_steps // max(1, config.optim.grad_accum_steps))
  ema = config.optim.ema_decay > 0
  init = make_init_state(var_cfg, opt.tx, ema)
  num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(
      meta.unbox(jax.eval_shape(init, jax.random.key(0)).params))))
  hooks = {}
  if config.get("sample_every", 0):
    hooks["samples"] = (config.sample_every, make_sample_hook(var_cfg, vae_cfg, vae_params, config))
  fid_settings = fid_hook.fid_eval_settings(config)
  if fid_settings is not None:
    from var_jax.inference.tokenizer import Tokenizer
    hooks["fid"] = (fid_settings.every,
                    fid_hook.make_fid_hook(var_cfg, Tokenizer(vae_cfg, vae_params), fid_settings))
  task = loop.TrainTask(
      init_state=init, train_step=make_train_step(var_cfg, vae_cfg, opt.tx, config), frozen=vae_params,
      tokens_per_example=var_cfg.seq_len, flops_per_example=flops.flops_per_example(var_cfg),
      hooks=hooks, data_kwargs={"patch_nums": var_cfg.patch_nums, "vocab_size": var_cfg.vocab_size},
      staging=(make_staging(var_cfg, vae_cfg, opt.tx, config, schedule)
               if schedule.enabled else None))
  logging.info("VAR: depth %d, %s params, %.4g model GFLOP per image (fwd+bwd, for MFU), "
               "peak lr %.3g", var_cfg.depth, f"{num_params:,}", task.flops_per_example / 1e9,
               opt.peak_learning_rate)
  return task, var_cfg


def train(config: ml_collections.ConfigDict, workdir) -> dict[str, float]:
  """Trains VAR per `config` in `workdir` (resuming from its latest checkpoint if any)."""
  from var_jax.parallel.distributed import maybe_initialize_distributed
  maybe_initialize_distributed(config.get("distributed", "auto"))
  task, _ = build_task(config)
  return loop.run(config, workdir, task)
