"""VAR training: `var-jax train --config configs/var_d16.py --workdir DIR [--config.x=y ...]`.

The official recipe (VAR_SPEC §5): a frozen tokenizer turns images into token maps inside the step
(or pre-tokenized maps are read from disk), teacher forcing over all L tokens, cross-entropy with
label smoothing (default 0), label dropout 0.1, AdamW with the official LR/WD schedules and no-decay
set, clipping at 2.0, bfloat16 compute with float32 parameters, optional EMA. Optional progressive
training (`config.progressive`, off by default; `var_jax/train/progressive.py`) trains on a growing
prefix of scales, one compiled step per stage.
"""
from __future__ import annotations

import dataclasses

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
from var_jax.models import var as var_model
from var_jax.models.var import VAR
from var_jax.models.var_config import VARConfig
from var_jax.models.vqvae import VQVAE
from var_jax.models.vqvae_config import VQVAEConfig
from var_jax.train import fid_hook, guidance_free, loop, optim, progressive
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


def teacher_forcing_inputs(vae: VQVAE, patch_nums, batch, vae_params):
  """(x_BlCv, targets_BL) of a batch: its token maps (read from "tokens", or the tokenizer's
  encoding of "image"), as the transformer's inputs and targets; no gradient flows into them."""
  if "tokens" in batch:
    flat = batch["tokens"].astype(jnp.int32)
    maps, start = [], 0
    for pn in patch_nums:
      maps.append(flat[:, start:start + pn * pn].reshape(-1, pn, pn))
      start += pn * pn
  else:
    images = scale_to_model_range(batch["image"])
    maps = vae.apply({"params": vae_params}, images, method=VQVAE.encode)
  maps = [jax.lax.stop_gradient(m) for m in maps]
  x_BlCv = jax.lax.stop_gradient(
      vae.apply({"params": vae_params}, maps, method=VQVAE.indices_to_var_input))
  targets_BL = jnp.concatenate([m.reshape(m.shape[0], -1) for m in maps], axis=1)
  return x_BlCv, targets_BL


def apply_gradients(state: TrainState, grads, tx, ema_decay: float):
  """(params, opt_state, ema_params) after one optimizer update (the EMA follows real updates
  only: gradient accumulation's intermediate steps leave it alone)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = optim.ema_update(ema, params, ema_decay, optim.optimizer_updated(opt_state))
  return params, opt_state, ema


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

  def step(state: TrainState, batch, vae_params, rng, stage_inputs=None):
    x_BlCv, targets_BL = teacher_forcing_inputs(vae, patch_nums, batch, vae_params)
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
    params, opt_state, ema = apply_gradients(state, grads, tx, ema_decay)
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


def make_cca_train_step(var_cfg: VARConfig, vae_cfg: VQVAEConfig, tx,
                        config: ml_collections.ConfigDict):
  """(state, batch, frozen, rng) -> (state, metrics): one CCA step (`guidance_free`).

  frozen: {"vae": tokenizer params, "reference": the frozen reference VAR's params}. The policy
  and the reference run the same 2B sequences (B positive pairs, then B negative ones) with label
  dropout off (uncond_ratio replaces it) and the policy's drop path (the paper's reference runs in
  training mode too).
  """
  vae = VQVAE(vae_cfg)
  model = VAR(dataclasses.replace(var_cfg, cond_drop_rate=0.0), train=True)
  cca = config.cca
  beta, lambda_, uncond_ratio = float(cca.beta), float(cca.lambda_), float(cca.uncond_ratio)
  ema_decay = float(config.optim.ema_decay)
  smoothing = float(config.get("label_smoothing", 0.0))
  null = var_cfg.num_classes

  def step(state: TrainState, batch, frozen, rng):
    x_BlCv, targets_BL = teacher_forcing_inputs(vae, var_cfg.patch_nums, batch, frozen["vae"])
    labels_B = batch["label"].astype(jnp.int32)
    negatives_B = guidance_free.negative_labels(labels_B)
    rng_null, rng_policy, rng_ref = jax.random.split(rng, 3)
    unconditional_B = jnp.zeros(labels_B.shape, bool)
    if uncond_ratio > 0:
      unconditional_B = jax.random.uniform(rng_null, labels_B.shape) < uncond_ratio
      labels_B = jnp.where(unconditional_B, null, labels_B)
      negatives_B = jnp.where(unconditional_B, null, negatives_B)
    negative_is_positive_B = unconditional_B | (negatives_B == labels_B)
    B = labels_B.shape[0]
    labels_2B = jnp.concatenate([labels_B, negatives_B])
    x_2BlCv = jnp.concatenate([x_BlCv, x_BlCv])
    targets_2BL = jnp.concatenate([targets_BL, targets_BL])
    ref_logits = model.apply({"params": frozen["reference"]}, labels_2B, x_2BlCv,
                             rngs={"dropout": rng_ref})
    ref_logp_2B = jax.lax.stop_gradient(
        guidance_free.sequence_log_likelihood(ref_logits, targets_2BL))

    def loss_fn(params):
      logits = model.apply({"params": params}, labels_2B, x_2BlCv, rngs={"dropout": rng_policy})
      gap_2B = guidance_free.sequence_log_likelihood(logits, targets_2BL) - ref_logp_2B
      loss = guidance_free.cca_loss(gap_2B[:B], gap_2B[B:], negative_is_positive_B, beta=beta,
                                    lambda_=lambda_, uncond_ratio=uncond_ratio)
      return loss, (logits[:B], gap_2B)

    (loss, (logits_BLV, gap_2B)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state, ema = apply_gradients(state, grads, tx, ema_decay)
    stats = optim.last_update_stats(opt_state)
    gap_pos, gap_neg = gap_2B[:B], gap_2B[B:]
    contrastive = ~negative_is_positive_B
    n_contrastive = jnp.maximum(jnp.sum(contrastive), 1)
    metrics = {
        "loss": loss,
        # The policy's cross-entropy and accuracy on the positive pairs (comparable to training).
        "cross_entropy": jnp.mean(cross_entropy(logits_BLV, targets_BL, smoothing)),
        "accuracy": jnp.mean((jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)),
        # Log-likelihood gaps to the reference: positives rise, real negatives fall.
        "gap_positive": jnp.mean(gap_pos),
        "gap_negative": jnp.sum(jnp.where(contrastive, gap_neg, 0.0)) / n_contrastive,
        "pair_accuracy": jnp.sum(jnp.where(contrastive, gap_pos > gap_neg, False)) / n_contrastive,
        "learning_rate": stats["learning_rate"], "weight_decay": stats["weight_decay"],
        "grad_norm": stats["grad_norm"],
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new_state, metrics

  return step


def make_step_for(config: ml_collections.ConfigDict, var_cfg: VARConfig, vae_cfg: VQVAEConfig, tx):
  """The run's train step: cross-entropy (`make_train_step`) or CCA (`make_cca_train_step`)."""
  if guidance_free.check_config(config) == "cca":
    return make_cca_train_step(var_cfg, vae_cfg, tx, config)
  return make_train_step(var_cfg, vae_cfg, tx, config)


def frozen_shardings_for(config: ml_collections.ConfigDict):
  """The frozen inputs' shardings given the state's: the tokenizer replicated, and for CCA the
  reference params split exactly as the policy's (`loop.TrainTask.frozen_shardings`)."""
  def shardings(frozen, state_shardings):
    mesh = jax.tree.leaves(state_shardings.params)[0].mesh
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if guidance_free.check_config(config) != "cca":
      return jax.tree.map(lambda _: repl, frozen)
    return {"vae": jax.tree.map(lambda _: repl, frozen["vae"]), "reference": state_shardings.params}
  return shardings


def reference_params(config: ml_collections.ConfigDict, reference, var_cfg: VARConfig,
                     vae_cfg: VQVAEConfig, vae_params):
  """The params of the CCA reference (a VARModel), checked against the run's model and tokenizer."""
  from var_jax.inference.tokenizer import Tokenizer
  spec = config.cca.reference
  wanted = meta.unbox(var_model.param_shapes(var_cfg))
  if reference.config.num_classes != var_cfg.num_classes or \
      jax.tree.structure(reference.params) != jax.tree.structure(wanted):
    raise ConfigError(f"config.cca.reference {spec!r} is not this run's model: it has depth "
                      f"{reference.config.depth}, width {reference.config.embed_dim}, "
                      f"{reference.config.num_classes} classes; set config.model to match it.")
  bad = [jax.tree_util.keystr(p) for (p, x), y in zip(
      jax.tree_util.tree_flatten_with_path(reference.params)[0], jax.tree.leaves(wanted))
      if tuple(x.shape) != tuple(y.shape)]
  if bad:
    raise ConfigError(f"config.cca.reference {spec!r} does not have this run's model shapes "
                      f"({', '.join(bad[:4])} differ): set config.model to the reference's "
                      f"architecture (depth {reference.config.depth}, width "
                      f"{reference.config.embed_dim}).")
  from var_jax.inference.sampler import same_tokenizer
  if not same_tokenizer(reference.tokenizer, Tokenizer(vae_cfg, vae_params)):
    raise ConfigError(f"config.cca.reference {spec!r} was trained on another tokenizer than "
                      f"config.tokenizer: point config.tokenizer at the reference's tokenizer.")
  return jax.tree.map(lambda x: np.asarray(x, np.float32), reference.params)


def make_init_state(var_cfg: VARConfig, tx, ema: bool):
  def init(rng):
    params = var_model.init_params(var_cfg, rng)  # boxed: the loop reads the logical axes off it
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
  fid_settings = fid_hook.fid_eval_settings(config)  # a bad fid_eval fails before any loading
  reference = None
  if guidance_free.check_config(config) == "cca":
    from var_jax.inference.pretrained import load_pretrained
    reference = load_pretrained(config.cca.reference)
  if reference is not None and not config.tokenizer.get("path"):
    # CCA without a tokenizer named: the reference's own, recorded in the run's config (saved
    # next) so that the run loads as a model.
    from var_jax.inference.pretrained import tokenizer_spec_of
    spec = tokenizer_spec_of(config.cca.reference)
    with config.unlocked():
      config.tokenizer = ml_collections.ConfigDict(spec)
    logging.info("CCA: the reference's tokenizer, %s", spec.get("path"))
    vae_cfg, vae_params = reference.tokenizer.config, reference.tokenizer.params
  else:
    vae_cfg, vae_params = load_tokenizer(config)
  if config.data.source != "pretokenized" and config.data.image_size != vae_cfg.image_size:
    raise ConfigError(f"data.image_size {config.data.image_size} must be the tokenizer's image size "
                      f"{vae_cfg.image_size} (16 x the last patch number for the official layout).")
  var_cfg = var_config_from(config, vae_cfg)
  objective = guidance_free.check_config(config)
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
  if fid_settings is not None:
    from var_jax.inference.tokenizer import Tokenizer
    hooks["fid"] = (fid_settings.every,
                    fid_hook.make_fid_hook(var_cfg, Tokenizer(vae_cfg, vae_params), fid_settings))
  frozen, initial_params = vae_params, None
  flops_per_example = flops.flops_per_example(var_cfg)
  if objective == "cca":
    reference = reference_params(config, reference, var_cfg, vae_cfg, vae_params)
    frozen = {"vae": vae_params, "reference": reference}
    initial_params = lambda abstract_params: (f"the CCA reference {config.cca.reference}", reference)
    # The policy's forward + backward on 2B sequences and the reference's forward on them: 8/3 of
    # a cross-entropy step's forward + backward on B.
    flops_per_example = flops_per_example * 8 / 3
    logging.info("CCA fine-tuning from %s (beta %g, lambda %g, uncond_ratio %g): sample it with "
                 "cfg=0.", config.cca.reference, config.cca.beta, config.cca.lambda_,
                 config.cca.uncond_ratio)
  task = loop.TrainTask(
      init_state=init, train_step=make_step_for(config, var_cfg, vae_cfg, opt.tx), frozen=frozen,
      frozen_shardings=frozen_shardings_for(config), initial_params=initial_params,
      tokens_per_example=var_cfg.seq_len, flops_per_example=flops_per_example,
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
