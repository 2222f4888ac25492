"""The train state: one pytree that the step maps to the next, checkpointed whole."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """step: optimizer micro-steps done; ema_params: None when EMA is off; extra: task state
  outside the optimizer (e.g. codebook hit EMAs, a discriminator's own params and opt state)."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None
  extra: Any = None

  @classmethod
  def create(cls, params, tx, *, ema: bool = False, extra: Any = None) -> "TrainState":
    return cls(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
               ema_params=jax.tree.map(jnp.copy, params) if ema else None, extra=extra)
