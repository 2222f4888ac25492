"""The VAR transformer's hyper-parameters as a frozen dataclass (hashable, so jit can key on it)."""
from __future__ import annotations

import dataclasses
import math

from var_jax import scales
from var_jax.errors import ConfigError
from var_jax.models.config_mapping import FromMapping
from var_jax.models.vqvae_config import COMPUTE_DTYPES, PATCH_NUMS_256

ATTENTION_IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu")
REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


@dataclasses.dataclass(frozen=True)
class VARConfig(FromMapping):
  """Architecture and numerics of the VAR transformer (VAR_SPEC §4)."""
  KIND = "VAR"  # not a field (no annotation)
  depth: int = 16
  embed_dim: int = 0             # 0: 64 * depth, as every released model.
  num_heads: int = 0             # 0: depth.
  mlp_ratio: float = 4.0
  num_classes: int = 1000        # class_emb has one more row: the null class for guidance.
  vocab_size: int = 4096         # From the tokenizer.
  z_channels: int = 32           # Cvae, from the tokenizer.
  patch_nums: tuple[int, ...] = PATCH_NUMS_256
  shared_aln: bool = False       # d36 shares one AdaLN projection over all blocks.
  attn_l2_norm: bool = True
  norm_eps: float = 1e-6
  drop_path_rate: float = -1.0   # < 0: 0.1 * depth / 24, the official rule.
  cond_drop_rate: float = 0.1    # Training-time label dropout to the null class.
  # Official init (VAR_SPEC §4.9); only matters when training from scratch.
  init_adaln: float = 0.5
  init_adaln_gamma: float = 1e-5
  init_head: float = 0.02
  init_std: float = -1.0         # < 0: sqrt(1 / (3 C)).
  # Numerics and layout.
  dtype: str = "float32"         # Compute dtype, float32 or bfloat16 (TPU); params stay float32.
  remat_policy: str = "none"
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.depth < 1:
      raise ConfigError(f"VARConfig.depth must be >= 1, got {self.depth}.")
    if self.embed_dim == 0:
      object.__setattr__(self, "embed_dim", 64 * self.depth)
    if self.num_heads == 0:
      object.__setattr__(self, "num_heads", self.depth)
    if self.embed_dim % self.num_heads:
      raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}.")
    if self.drop_path_rate < 0:
      object.__setattr__(self, "drop_path_rate", 0.1 * self.depth / 24)
    try:
      object.__setattr__(self, "patch_nums", scales.validate_patch_nums(self.patch_nums))
    except ValueError as e:
      raise ConfigError(str(e)) from None
    for name in ("num_classes", "vocab_size", "z_channels"):
      if getattr(self, name) < 1:
        raise ConfigError(f"VARConfig.{name} must be >= 1, got {getattr(self, name)}.")
    if not 0.0 <= self.cond_drop_rate < 1.0:
      raise ConfigError(f"cond_drop_rate must be in [0, 1), got {self.cond_drop_rate}.")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")
    if self.dtype not in COMPUTE_DTYPES:
      raise ConfigError(f"VARConfig.dtype must be float32 or bfloat16, got {self.dtype!r}"
                        + (" (VAR's attention takes float32 or bfloat16 only, and training has no loss scaling)." if self.dtype == "float16" else "."))
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}.")

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return round(self.embed_dim * self.mlp_ratio)

  @property
  def seq_len(self) -> int:
    return scales.seq_len(self.patch_nums)

  @property
  def first_l(self) -> int:
    return self.patch_nums[0] ** 2

  @property
  def num_scales(self) -> int:
    return len(self.patch_nums)

  @property
  def init_sigma(self) -> float:
    return self.init_std if self.init_std >= 0 else math.sqrt(1 / self.embed_dim / 3)

  @property
  def image_size(self) -> int:
    return 16 * self.patch_nums[-1]
