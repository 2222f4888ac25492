"""Tokenizer training: `var-jax train-tokenizer --config configs/vqvae_*.py --workdir DIR`.

The official release has no VQVAE training code. This trains the multi-scale VQVAE with the
VQGAN-style compound loss (`losses/vqgan`): pixel L1/L2 + LPIPS + the multi-scale VQ loss
(commitment beta 0.25) + a hinge PatchGAN started after `loss.disc_start_step` with taming's
adaptive weight. Codebook usage is tracked with an EMA of hits; dead codes are counted and can be
re-seeded from encoder outputs. It runs on the same loop as VAR training (`loop.run`): the same
mesh, checkpointing and auto-resume, SIGTERM handling, metrics and input pipeline. With
`config.eval.fid_inception_path` set, reconstruction FID and PSNR on held-out images are logged
periodically (`rfid_eval`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from var_jax.data.augment import scale_to_model_range
from var_jax.errors import ConfigError
from var_jax.models.vqvae import VQVAE
from var_jax.models.vqvae_config import VQVAEConfig
from var_jax.train import loop, optim, rfid_eval
from var_jax.train.losses import vqgan as vl
from var_jax.train.state import TrainState


def vqvae_config_from(config: ml_collections.ConfigDict) -> VQVAEConfig:
  from var_jax.inference.training_runs import vqvae_config_of
  return vqvae_config_of({"vqvae": dict(config.vqvae), "patch_nums": config.patch_nums})


def make_init_state(vae_cfg: VQVAEConfig, disc, tx, disc_tx, *, ema: bool):
  size = vae_cfg.image_size

  def init(rng):
    k_vae, k_disc = jax.random.split(rng)
    images = jnp.zeros((1, size, size, vae_cfg.in_channels), jnp.float32)
    params = VQVAE(vae_cfg).init(k_vae, images)["params"]
    extra = {"ema_hits": jnp.zeros((vae_cfg.vocab_size,), jnp.float32)}
    if disc is not None:
      disc_params = disc.init(k_disc, images)["params"]
      extra.update(disc_params=disc_params, disc_opt_state=disc_tx.init(disc_params))
    return TrainState.create(params, tx, ema=ema, extra=extra)

  return init


def make_train_step(vae_cfg: VQVAEConfig, loss_cfg: ml_collections.ConfigDict, tx, disc, disc_tx,
                    perceptual_fn, ema_decay: float):
  vae = VQVAE(vae_cfg)
  use_gan = disc is not None

  def step(state: TrainState, batch, frozen, rng):
    del frozen
    images = scale_to_model_range(batch["image"])
    extra = state.extra
    disc_logits_fn = (lambda x: disc.apply({"params": extra["disc_params"]}, x)) if use_gan else None

    def gen_loss(params):
      forward = lambda p: (lambda r, v, h: (r, (v, h)))(*vae.apply({"params": p}, images))
      recon, (vq_loss, hits), vjp = vl.forward_with_last_layer_vjp(forward, params)
      loss, metrics = vl.vqgan_generator_loss(
          images, recon, vq_loss, config=loss_cfg, step=state.step, perceptual_fn=perceptual_fn,
          disc_logits_fn=disc_logits_fn, last_layer_vjp=vjp if use_gan else None)
      return loss, (metrics, recon, hits)

    (_, (metrics, recon, hits)), grads = jax.value_and_grad(gen_loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_extra = dict(extra)
    if use_gan:
      fake = jax.lax.stop_gradient(recon)

      def disc_loss(dp):
        real_logits = disc.apply({"params": dp}, images)
        fake_logits = disc.apply({"params": dp}, fake)
        return vl.vqgan_discriminator_loss(real_logits, fake_logits, config=loss_cfg, step=state.step)

      (_, d_metrics), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(extra["disc_params"])
      d_updates, d_opt = disc_tx.update(d_grads, extra["disc_opt_state"], extra["disc_params"])
      new_extra.update(disc_params=optax.apply_updates(extra["disc_params"], d_updates), disc_opt_state=d_opt)
      metrics = {**metrics, **{f"disc_{k}" if not k.startswith("disc") else k: v for k, v in d_metrics.items()}}
    ema_hits = vl.update_ema_hits(extra["ema_hits"], hits, float(loss_cfg.ema_hits_decay))
    if loss_cfg.reseed_dead_codes:
      every = int(loss_cfg.reseed_every_steps)

      def reseed(args):
        params, ema_hits = args
        f = vae.apply({"params": params}, images, method=VQVAE.encode_to_latent)
        result = vl.reseed_dead_codes(params["quantize"]["embedding"]["embedding"], ema_hits,
                                      f.reshape(-1, f.shape[-1]), rng, float(loss_cfg.dead_code_threshold))
        quantize = {**params["quantize"], "embedding": {"embedding": result.codebook_VC}}
        return {**params, "quantize": quantize}, result.ema_hits_V

      do = (state.step > 0) & ((state.step + 1) % every == 0)
      params, ema_hits = jax.lax.cond(do, reseed, lambda a: a, (params, ema_hits))
    new_extra["ema_hits"] = ema_hits
    usage = vl.codebook_usage(hits, ema_hits, float(loss_cfg.dead_code_threshold))
    ema_params = state.ema_params
    if ema_params is not None:
      ema_params = optim.ema_update(ema_params, params, ema_decay, optim.optimizer_updated(opt_state))
    stats = optim.last_update_stats(opt_state)
    metrics = {**metrics, "psnr": jnp.mean(vl.psnr(recon, images)), "codebook_usage": usage["usage"],
               "dead_codes": usage["dead_codes"].astype(jnp.float32),
               "learning_rate": stats["learning_rate"], "grad_norm": stats["grad_norm"]}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_params, extra=new_extra)
    return new_state, metrics

  return step


def make_reconstruction_hook(vae_cfg: VQVAEConfig, config):
  """Writes originals (top) and reconstructions (bottom) of a fixed batch as a PNG grid."""
  from var_jax.inference import images as image_io
  from var_jax.data.pipeline import make_input_iterator
  n = 8
  batch = next(make_input_iterator(config.data, global_batch=n, seed=config.seed + 1, train=True))
  images = jnp.asarray(batch["image"])

  @jax.jit
  def reconstruct(params, images):
    x = scale_to_model_range(images)
    idx = VQVAE(vae_cfg).apply({"params": params}, x, method=VQVAE.encode)
    out = VQVAE(vae_cfg).apply({"params": params}, idx, method=VQVAE.decode)
    return jnp.clip(jnp.round((out + 1) * 127.5), 0, 255).astype(jnp.uint8)

  def hook(state: TrainState, step: int, workdir: epath.Path):
    params = state.ema_params if state.ema_params is not None else state.params
    rec = np.asarray(jax.device_get(reconstruct(params, images)))
    if jax.process_index() == 0:
      grid = image_io.make_grid(np.concatenate([np.asarray(images), rec]), ncols=n)
      image_io.save_png(grid, workdir / "reconstructions" / f"step_{step:08d}.png")

  return hook


def build_task(config: ml_collections.ConfigDict) -> loop.TrainTask:
  vae_cfg = vqvae_config_from(config)
  if config.data.image_size != vae_cfg.image_size:
    raise ConfigError(f"data.image_size {config.data.image_size} must equal the tokenizer's image "
                      f"size {vae_cfg.image_size} (16 x last patch number x 2**(len(ch_mult)-5)).")
  loss_cfg = config.loss
  vl.validate_loss_config(loss_cfg)
  total_updates = config.total_steps // max(1, config.optim.grad_accum_steps)
  opt = optim.make_optimizer(config.optim, global_batch_size=config.global_batch_size,
                             total_steps=total_updates)
  use_gan = float(loss_cfg.disc_weight) > 0
  disc = vl.build_discriminator(loss_cfg) if use_gan else None
  disc_tx = None
  if use_gan:
    disc_tx = optim.make_optimizer(config.disc_optim, global_batch_size=config.global_batch_size,
                                   total_steps=total_updates).tx
  perceptual_fn = vl.build_perceptual_loss(loss_cfg)
  ema = config.optim.ema_decay > 0
  hooks = {}
  if config.get("reconstruct_every", 0):
    hooks["reconstructions"] = (config.reconstruct_every, make_reconstruction_hook(vae_cfg, config))
  if rfid_eval.rfid_enabled(config):
    hooks["rfid"] = (rfid_eval.eval_every(config), rfid_eval.make_rfid_hook(vae_cfg, config))
  return loop.TrainTask(
      init_state=make_init_state(vae_cfg, disc, opt.tx, disc_tx, ema=ema),
      train_step=make_train_step(vae_cfg, loss_cfg, opt.tx, disc, disc_tx, perceptual_fn,
                                 float(config.optim.ema_decay)),
      frozen={}, tokens_per_example=sum(p * p for p in vae_cfg.patch_nums), hooks=hooks)


def train(config: ml_collections.ConfigDict, workdir) -> dict[str, float]:
  from var_jax.parallel.distributed import maybe_initialize_distributed
  maybe_initialize_distributed(config.get("distributed", "auto"))
  return loop.run(config, workdir, build_task(config))


def load_trained_tokenizer(workdir, *, patch_nums=None, use_ema: bool = True):
  """(VQVAEConfig, params) from a `train-tokenizer` workdir's latest checkpoint (EMA weights when
  the run kept them)."""
  from var_jax.inference.training_runs import tokenizer_from_run
  tok, step, key = tokenizer_from_run(workdir, patch_nums=patch_nums, use_ema=use_ema)
  logging.info("Loaded tokenizer %s from %s step %d.", key, workdir, step)
  return tok.config, tok.params
