"""Exceptions raised on bad input. Each message says what was wrong and what to do about it."""


class VarJaxError(Exception):
  """Base class of every error var_jax raises on purpose."""


class ConfigError(VarJaxError, ValueError):
  """A config value is missing, out of range or inconsistent with another one."""


class CheckpointError(VarJaxError, ValueError):
  """A checkpoint file is unreadable, truncated, or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
  """A pickle inside a checkpoint asked for something other than tensors and plain containers."""


class InputError(VarJaxError, ValueError):
  """An array handed to a public function has the wrong shape, dtype or value range."""


class MissingDependencyError(VarJaxError, ImportError):
  """An optional dependency of the feature being used is not installed (the message names the extra)."""
