"""A tiny logically partitioned language model and train step for the training-machinery tests.

Stands in for the VAR model: its parameters carry the same logical axis names (vocab, embed,
mlp, layers) and it has a scanned block stack under "blocks", so sharding, optimizer masks and
checkpoints see the same kinds of trees.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from var_jax.train import optim


def _dense(features: int, names: tuple[str, str], name: str) -> nn.Dense:
  return nn.Dense(
      features, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.2), names),
      bias_init=nn.with_logical_partitioning(nn.initializers.normal(0.1), names[1:]))


class Block(nn.Module):
  """Residual MLP; `nn.scan` stacks its params on a leading "layers" axis."""
  mlp: int

  @nn.compact
  def __call__(self, x, _):
    h = nn.gelu(_dense(self.mlp, ("embed", "mlp"), "fc1")(x))
    x = x + _dense(x.shape[-1], ("mlp", "embed"), "fc2")(h)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class ToyModel(nn.Module):
  """tokens (B, T) int -> logits (B, T, vocab)."""
  vocab: int = 16
  embed: int = 8
  mlp: int = 32
  layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    table = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        (self.vocab, self.embed))
    x = nn.with_logical_constraint(table[tokens], ("batch", "length", "embed"))
    blocks = nn.scan(
        Block, variable_axes={"params": 0}, split_rngs={"params": True},
        length=self.layers, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = blocks(self.mlp, name="blocks")(x, None)
    return _dense(self.vocab, ("embed", "vocab"), "head")(x)


class TrainState(train_state.TrainState):
  """flax TrainState plus optional EMA parameters (kept outside the optimizer)."""
  ema_params: Any = None


def optimizer_config(**overrides):
  config = optim.default_config()
  config.warmup_steps = 1
  config.tblr = 0.05
  config.update(overrides)
  return config


def make_init_fn(model: ToyModel, tx: optax.GradientTransformation, seq_len: int = 6,
                 with_ema: bool = False):
  """rng -> boxed TrainState (params and optimizer state keep their logical names)."""

  def init_fn(rng):
    params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             ema_params=params if with_ema else None)

  return init_fn


def make_train_step(model: ToyModel, ema_decay: float = 0.0):
  """(state, batch) -> (state, metrics): next-token cross-entropy, the optimizer's update."""

  def train_step(state, batch):
    def loss_fn(params):
      logits = model.apply({"params": params}, batch["tokens"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    new_state = state.apply_gradients(grads=grads)
    if state.ema_params is not None:
      new_state = new_state.replace(ema_params=optim.ema_update(
          state.ema_params, new_state.params, ema_decay,
          optim.optimizer_updated(new_state.opt_state)))
    return new_state, {"loss": loss, **optim.last_update_stats(new_state.opt_state)}

  return train_step


def make_batch(seed: int, batch: int = 8, seq_len: int = 6, vocab: int = 16) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
