"""Periodic ADM metrics of the VAR being trained: FID, sFID, IS, precision and recall of
`fid_eval.num_samples` class-balanced samples of the current (EMA) weights against a reference
batch, logged with the training metrics.

Enabled by `config.fid_eval.every > 0` with `fid_eval.ref` (an ADM reference batch, or one from
`var-jax fid-stats`) and `fid_eval.inception_path` (pytorch-fid's FID Inception weights, with its
classifier for IS). Sampling and features run on the training mesh, every host its share, exactly
as `var-jax evaluate` does (`var_jax.eval.sample_features`); the features are kept under
`WORKDIR/fid_eval/step_N/` while the hook runs and removed after. Numbers on a few thousand samples
are biased against 50k-sample numbers: compare them only with each other.
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from var_jax.errors import ConfigError


def default_fid_eval_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      every=0,                # steps between evaluations (0: off)
      num_samples=1000,       # class-balanced samples per evaluation (> 3)
      ref="",                 # reference batch .npz (ADM's or `var-jax fid-stats`')
      inception_path="",      # pt_inception-2015-12-05-6726825d.pth
      cfg=1.5, top_k=900, top_p=0.96, seed=0,
      batch_per_device=16,    # images per device in one sampling call
  ))


def fid_eval_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """`config.fid_eval` over its defaults, checked; None when off.

  Raises:
    ConfigError: a file is missing or a value is out of range (before training starts).
  """
  given = config.get("fid_eval")
  if given is None or not given.get("every", 0):
    return None
  settings = default_fid_eval_config()
  unknown = sorted(set(given.keys()) - set(settings.keys()))
  if unknown:
    raise ConfigError(f"config.fid_eval has unknown fields {unknown}; known: {sorted(settings.keys())}.")
  settings.update(dict(given))
  for name, minimum in (("every", 1), ("num_samples", 4), ("batch_per_device", 1)):
    value = settings[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ConfigError(f"config.fid_eval.{name} must be an int >= {minimum}, got {value!r}.")
  for name, what in (("ref", "a reference batch .npz (ADM's, or `var-jax fid-stats --out`)"),
                     ("inception_path", "pytorch-fid's pt_inception-2015-12-05-6726825d.pth")):
    path = os.path.expanduser(str(settings[name]))
    if not path or not os.path.isfile(path):
      raise ConfigError(f"config.fid_eval.{name}: no file at {path!r}; it must name {what} on "
                        "this machine (or set fid_eval.every=0).")
  return settings


def make_fid_hook(var_cfg, tokenizer, settings: ml_collections.ConfigDict
                  ) -> Callable[..., Mapping[str, float]]:
  """Reads the network and the reference now (a bad file fails before training); returns the hook
  (state, step, workdir) -> {"fid", "sfid", "inception_score", "precision", "recall"}."""
  from var_jax.eval import adm, inception, sample_features as sf
  from var_jax.inference import placement
  from var_jax.inference.var_model import VARModel
  network = inception.load_adm_inception(settings.inception_path)
  reference = adm.read_reference(os.path.expanduser(settings.ref),
                                 adm.ADMFeatures(network, batch_size=64))
  top_k = settings.top_k if settings.top_k < var_cfg.vocab_size else 0

  def hook(state, step: int, workdir: epath.Path) -> Mapping[str, float]:
    params = state.ema_params if state.ema_params is not None else state.params
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    batch = settings.batch_per_device * placement.batch_shards(mesh)
    model = VARModel(var_cfg, params, tokenizer)
    chunk_dir = epath.Path(workdir) / "fid_eval" / f"step_{step:08d}"
    run = sf.SamplingSettings(model=f"step {step}", num_samples=settings.num_samples,
                              seed=settings.seed, cfg=float(settings.cfg), top_k=int(top_k),
                              top_p=float(settings.top_p), more_smooth=False, batch=batch)
    extract = adm.ADMFeatures(network, batch_size=batch, mesh=mesh)
    chunks = list(sf.sample_features(model, run, extract, mesh=mesh, chunk_dir=chunk_dir))
    pool = sf.gather(np.concatenate([c["pool"] for c in chunks]))
    spatial = sf.gather(np.concatenate([c["spatial"] for c in chunks]))
    result = adm.metrics(pool, spatial, reference, network.classifier_DK)
    shutil.rmtree(chunk_dir / f"process_{jax.process_index()}", ignore_errors=True)
    if jax.process_index() == 0:
      shutil.rmtree(chunk_dir, ignore_errors=True)
    if jax.process_index() == 0:
      logging.info("step %d: FID %.3f, IS %s, precision %.3f, recall %.3f on %d samples",
                   step, result["fid"], result["inception_score"], result["precision"],
                   result["recall"], result["num_samples"])
    return {k: float(result[k]) for k in adm.METRIC_KEYS if result[k] is not None}

  return hook
