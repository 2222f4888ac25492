"""The multi-scale VQVAE's hyper-parameters as a frozen dataclass (hashable, so jit can key on it)."""
from __future__ import annotations

import dataclasses

from var_jax import scales
from var_jax.errors import ConfigError
from var_jax.models.config_mapping import FromMapping
from var_jax.ops.conv import CONV_IMPLS

# The released tokenizer, vae_ch160v4096z32.pth (VAR_SPEC §0, §2).
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)

# Compute dtypes of the models (parameters are always float32). No float16: nothing here scales
# losses for it, and VAR's attention paths take float32 and bfloat16 only.
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class VQVAEConfig(FromMapping):
  """Architecture of the official multi-scale VQVAE (encoder, decoder, residual quantizer)."""
  KIND = "VQVAE"  # not a field (no annotation)
  vocab_size: int = 4096
  z_channels: int = 32          # Cvae: latent and codebook width.
  ch: int = 160
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2       # The decoder uses one more per level.
  num_groups: int = 32          # GroupNorm groups.
  using_sa: bool = True         # Attention at the lowest resolution.
  using_mid_sa: bool = True
  in_channels: int = 3
  quant_conv_ks: int = 3
  beta: float = 0.25            # Commitment weight.
  quant_resi: float = 0.5       # Phi mixing ratio; |r| <= 1e-6 means no Phi at all.
  share_quant_resi: int = 4     # 0: one Phi per scale, 1: one shared, n: n partially shared.
  patch_nums: tuple[int, ...] = PATCH_NUMS_256
  dtype: str = "float32"        # Compute dtype (COMPUTE_DTYPES); parameters are always float32.
  # How the resnet blocks', upsamplers' and heads' 3x3 convolutions run (ops.conv.CONV_IMPLS):
  # "auto" is the fused GroupNorm-SiLU-conv Pallas kernel on TPU for small per-chip batches; on
  # CPU Winograd (F(2x2) or F(4x4), 3x3; ops/conv_winograd.py) at >= 160 channels, except bfloat16
  # on CPUs with AMX, and row-block matmuls (ops/conv_rows.py) for the other bfloat16 convs;
  # XLA's convolution elsewhere (ops.conv.resolve_impl).
  conv_impl: str = "auto"

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    try:
      object.__setattr__(self, "patch_nums", scales.validate_patch_nums(self.patch_nums))
    except ValueError as e:
      raise ConfigError(str(e)) from None
    for name in ("vocab_size", "z_channels", "ch", "num_res_blocks", "num_groups", "in_channels"):
      if int(getattr(self, name)) < 1:
        raise ConfigError(f"VQVAEConfig.{name} must be >= 1, got {getattr(self, name)}.")
    if not self.ch_mult:
      raise ConfigError("VQVAEConfig.ch_mult is empty.")
    for width in {self.ch * m for m in (1,) + self.ch_mult}:
      if width % self.num_groups:
        raise ConfigError(f"GroupNorm needs every width divisible by num_groups={self.num_groups}, "
                          f"but ch={self.ch} x ch_mult={self.ch_mult} gives {width}.")
    if self.share_quant_resi < 0:
      raise ConfigError(f"share_quant_resi must be >= 0, got {self.share_quant_resi}.")
    if self.conv_impl not in CONV_IMPLS:
      raise ConfigError(f"VQVAEConfig.conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}.")
    if self.dtype not in COMPUTE_DTYPES:
      raise ConfigError(f"VQVAEConfig.dtype must be float32 or bfloat16, got {self.dtype!r}"
                        + (" (it is untested, and tokenizer training has no loss scaling)." if self.dtype == "float16" else "."))

  @property
  def downsample(self) -> int:
    """Image side / latent side."""
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def latent_size(self) -> int:
    return self.patch_nums[-1]

  @property
  def image_size(self) -> int:
    return self.latent_size * self.downsample

  @property
  def num_scales(self) -> int:
    return len(self.patch_nums)

  @property
  def num_phi(self) -> int:
    """How many Phi convolutions exist (0 when quant_resi is off)."""
    if abs(self.quant_resi) <= 1e-6:
      return 0
    if self.share_quant_resi == 0:
      return self.num_scales
    return self.share_quant_resi

  @property
  def phi_table(self) -> tuple[int, ...]:
    """Phi index used by each scale."""
    if self.num_phi == 0:
      return ()
    if self.share_quant_resi == 1:
      return (0,) * self.num_scales
    return scales.phi_index_table(self.num_scales, self.num_phi)
