"""Guidance-free fine-tuning: the Condition Contrastive Alignment objective (CCA, Chen et al.,
ICLR 2025, arXiv:2410.09347).

A short fine-tune of a trained VAR (the *reference*, frozen) after which sampling without
classifier-free guidance (`var_jax.sample(..., cfg=0)`, B sequences instead of 2B) matches guided
sampling of the reference. Each image x with its class c is a positive pair and, with the class of
the next image in the batch (a roll by one), a negative pair c'. With the log-likelihood gaps
  g(x, c) = log p_theta(x | c) - log p_ref(x | c)      (sums over all L tokens)
the loss is
  -log sigmoid(beta * g(x, c)) - lambda * log sigmoid(-beta * g(x, c')).
To keep the null class usable (so guidance still works after fine-tuning), a fraction
`uncond_ratio` of the pairs have both classes replaced by the null class; those negatives, and
negatives whose rolled class equals the image's own, count as positives with weight 1, and the loss
is divided by max(lambda, 1) (the paper's implementation, thu-ml/CCA). The model's own label
dropout is off during CCA: `uncond_ratio` takes its place.

Config block `config.cca` (used when `config.objective == "cca"`):
  reference: the model to fine-tune and to hold frozen as the reference: anything
    `var_jax.load_pretrained` takes (a released name such as "d16", a converted or exported
    directory, a `var-jax train` workdir). The policy starts from these weights; with
    `config.tokenizer.path` empty the run uses the reference's tokenizer (else it must be the same).
  beta (0.02), lambda_ (50; the paper uses 50 for d16/d20, 100 for d24, 1000 for d30),
  uncond_ratio (0.1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from var_jax.errors import ConfigError

OBJECTIVES = ("cross_entropy", "cca")


def default_config() -> ml_collections.ConfigDict:
  """The `config.cca` block with the paper's d16 settings."""
  return ml_collections.ConfigDict(dict(reference="", beta=0.02, lambda_=50.0, uncond_ratio=0.1))


def check_config(config: ml_collections.ConfigDict) -> str:
  """The objective of a VAR training config, checked ("cross_entropy" or "cca")."""
  objective = config.get("objective", "cross_entropy")
  if objective not in OBJECTIVES:
    raise ConfigError(f"config.objective must be one of {OBJECTIVES}, got {objective!r}.")
  if objective != "cca":
    return objective
  cca = config.get("cca")
  if cca is None:
    raise ConfigError("config.objective='cca' needs a config.cca block (reference, beta, lambda_, "
                      "uncond_ratio): see var_jax/train/guidance_free.py.")
  if not isinstance(cca.get("reference"), str) or not cca.get("reference"):
    raise ConfigError("config.cca.reference must name the model to fine-tune (e.g. d16, a "
                      "converted directory or a var-jax train workdir): CCA starts from it and keeps "
                      "it frozen as the reference.")
  for name, low in (("beta", 0.0), ("lambda_", 0.0)):
    value = cca.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
      raise ConfigError(f"config.cca.{name} must be a number > 0, got {value!r}.")
  ratio = cca.get("uncond_ratio")
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
    raise ConfigError(f"config.cca.uncond_ratio must be in [0, 1), got {ratio!r}.")
  if config.get("init_from"):
    raise ConfigError("config.init_from and config.objective='cca' both set the starting weights: "
                      "CCA starts from config.cca.reference; clear init_from.")
  progressive = config.get("progressive")
  if progressive is not None and float(progressive.get("pg", 0.0)) > 0:
    raise ConfigError("progressive training (config.progressive.pg > 0) does not apply to CCA "
                      "fine-tuning: set config.progressive.pg=0.")
  return objective


def negative_labels(labels_B: jax.Array) -> jax.Array:
  """Each image's negative class: the next image's class (a roll by one, as the paper's code; a
  random permutation biases small batches)."""
  return jnp.roll(labels_B, -1, axis=0)


def sequence_log_likelihood(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
  """log p(x | c) of each sequence: the sum over its L tokens of the target's log-probability."""
  logp = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.take_along_axis(logp, targets_BL[..., None], axis=-1)[..., 0], axis=-1)


def cca_loss(gap_pos_B: jax.Array, gap_neg_B: jax.Array, negative_is_positive_B: jax.Array, *,
             beta: float, lambda_: float, uncond_ratio: float) -> jax.Array:
  """The CCA loss from the log-likelihood gaps (policy - reference) of positive and negative pairs.

  negative_is_positive_B: pairs whose negative counts as a positive (null-class pairs, or a rolled
    class equal to the image's own); used when uncond_ratio > 0, as the paper's code does.
  """
  pos_term = -jnp.mean(jax.nn.log_sigmoid(beta * gap_pos_B))
  if uncond_ratio > 0:
    sign = jnp.where(negative_is_positive_B, 1.0, -1.0)
    weight = jnp.where(negative_is_positive_B, 1.0, lambda_)
    neg_term = -jnp.mean(weight * jax.nn.log_sigmoid(sign * beta * gap_neg_B))
    return (pos_term + neg_term) / max(lambda_, 1.0)
  return pos_term - lambda_ * jnp.mean(jax.nn.log_sigmoid(-beta * gap_neg_B))
