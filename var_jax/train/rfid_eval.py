"""Reconstruction FID (rFID) of the tokenizer during training, on held-out images.

Enabled by `config.eval.fid_inception_path` (see `default_eval_config`). Every `eval.every` steps
the hook reconstructs the first `eval.fid_num_images` images of `data.eval_split` (center crops,
the evaluation pass of the input pipeline), runs originals and reconstructions through the FID
Inception network and returns

  rfid       Fréchet distance between the Inception features of originals and reconstructions;
  eval_psnr  mean PSNR (dB) of those reconstructions,

which the training loop logs next to the training metrics. Reconstructions are rounded to uint8
levels first, as they would be when saved as images. The originals' statistics are computed on
the first evaluation and reused. The work is data-parallel over the training mesh: each batch is
split over the batch axes like a training batch, and features come back replicated, so every
host accumulates the same statistics.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from var_jax.eval import fid
from var_jax.parallel import sharding
from var_jax.data.augment import scale_to_model_range
from var_jax.errors import ConfigError
from var_jax.eval import inception
from var_jax.models.vqvae import VQVAE
from var_jax.models.vqvae_config import VQVAEConfig
from var_jax.train.losses import vqgan as vl


def default_eval_config() -> ml_collections.ConfigDict:
  """The `config.eval` block of tokenizer training.

  Fields:
    fid_inception_path: local path of pytorch-fid's FID Inception weights
      (pt_inception-2015-12-05-6726825d.pth); empty = no rFID.
    fid_num_images: held-out images per rFID evaluation (fewer if the eval split is smaller).
      rFID is biased upward at small counts: compare runs at the same count.
    fid_batch_size: global batch of the evaluation; 0 = global_batch_size.
    every: steps between evaluations; 0 = every checkpoint_every steps.
  """
  c = ml_collections.ConfigDict()
  c.fid_inception_path = ""
  c.fid_num_images = 10_000
  c.fid_batch_size = 0
  c.every = 0
  return c


def rfid_enabled(config: ml_collections.ConfigDict) -> bool:
  """Checks `config.eval` (absent = off); True when rFID is configured.

  Raises:
    ConfigError: the weights file does not exist, or a count is out of range. Raised when the
      task is built, before training starts.
  """
  eval_cfg = config.get("eval")
  if eval_cfg is None or not eval_cfg.get("fid_inception_path"):
    return False
  path = os.path.expanduser(str(eval_cfg.fid_inception_path))
  if not os.path.isfile(path):
    raise ConfigError(
        f"config.eval.fid_inception_path: no file at {path!r}. Download "
        f"{inception.WEIGHTS_HINT} to this machine and point the key at it, or set it to '' to "
        "train without rFID.")
  for name, minimum in (("fid_num_images", 2), ("fid_batch_size", 0), ("every", 0)):
    value = eval_cfg.get(name, default_eval_config()[name])
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ConfigError(f"config.eval.{name} must be an int >= {minimum}, got {value!r}.")
  batch = eval_cfg.get("fid_batch_size", 0) or config.global_batch_size
  if batch % jax.process_count():
    raise ConfigError(f"config.eval.fid_batch_size {batch} does not split over "
                      f"{jax.process_count()} hosts.")
  return True


def eval_every(config: ml_collections.ConfigDict) -> int:
  """Steps between rFID evaluations."""
  return config.eval.get("every", 0) or config.checkpoint_every


def make_rfid_hook(vae_cfg: VQVAEConfig, config: ml_collections.ConfigDict
                   ) -> Callable[..., Mapping[str, float]]:
  """Loads the Inception weights now; returns the hook (state, step, workdir) -> scalars.

  Raises:
    CheckpointError: the weights file is unreadable or not the FID Inception weights.
  """
  from var_jax.data.pipeline import make_input_iterator
  eval_cfg = config.eval
  net, net_params_np = inception.load_fid_inception(eval_cfg.fid_inception_path)
  batch_size = eval_cfg.get("fid_batch_size", 0) or config.global_batch_size
  num_images = int(eval_cfg.get("fid_num_images", default_eval_config().fid_num_images))
  vae = VQVAE(vae_cfg)

  def evaluate_batch(params, net_params, batch, with_originals: bool):
    x = scale_to_model_range(batch["image"])
    idx = vae.apply({"params": params}, x, method=VQVAE.encode)
    rec = vae.apply({"params": params}, idx, method=VQVAE.decode)
    rec = jnp.round((jnp.clip(rec.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0
    images = jnp.concatenate([x, rec]) if with_originals else rec
    feats = net.apply({"params": net_params}, images)
    n = x.shape[0]
    real = feats[:n] if with_originals else None
    return real, feats[-n:], vl.psnr(rec, x), batch["mask"]

  cache: dict = {}

  def hook(state, step: int, workdir: epath.Path) -> dict[str, float]:
    del workdir
    mesh = jax.sharding.get_mesh()
    if mesh.empty:
      raise ConfigError("the rFID hook runs inside the training loop's mesh (jax.set_mesh).")
    if "net_params" not in cache:
      repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      cache["net_params"] = jax.device_put(net_params_np, repl)
      cache["fns"] = {flag: jax.jit(functools.partial(evaluate_batch, with_originals=flag),
                                    out_shardings=repl) for flag in (True, False)}
    with_originals = "reference" not in cache
    fn = cache["fns"][with_originals]
    params = state.ema_params if state.ema_params is not None else state.params
    real = fid.FeatureStats(inception.FEATURE_DIM)
    fake = fid.FeatureStats(inception.FEATURE_DIM)
    psnr_sum, seen = 0.0, 0
    data = make_input_iterator(config.data, global_batch=batch_size, seed=config.seed,
                               train=False, process_index=jax.process_index(),
                               process_count=jax.process_count())
    try:
      for local in data:
        global_batch = sharding.make_global_batch(
            {"image": local["image"], "mask": local["mask"]}, mesh)
        f_real, f_fake, psnr_B, mask = jax.device_get(
            fn(params, cache["net_params"], global_batch))
        keep = np.flatnonzero(mask)[:num_images - seen]
        if f_real is not None:
          real.update(f_real[keep])
        fake.update(f_fake[keep])
        psnr_sum += float(np.sum(psnr_B[keep]))
        seen += len(keep)
        if seen >= num_images:
          break
    finally:
      data.close()
    if seen < num_images and "warned" not in cache:
      cache["warned"] = True
      logging.warning("rFID: data.eval_split %r has %d images, fewer than eval.fid_num_images %d; "
                      "using all of them.", config.data.eval_split, seen, num_images)
    if with_originals:
      cache["reference"] = fid.FrechetReference(*real.stats())
    rfid = cache["reference"].distance(*fake.stats())
    logging.info("Step %d: rFID %.4f on %d held-out images.", step, rfid, seen)
    return {"rfid": rfid, "eval_psnr": psnr_sum / seen}

  return hook
