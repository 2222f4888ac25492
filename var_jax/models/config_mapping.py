"""Model configs to and from plain mappings (config.json, ml_collections), shared by both configs."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from var_jax.errors import ConfigError


class FromMapping:
  """Mixin for a frozen config dataclass: `from_mapping` refuses unknown fields, lists -> tuples."""
  KIND = "model"  # names the config in errors

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"Unknown {cls.KIND} config fields {unknown}; known fields: {sorted(known)}.")
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()})

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
