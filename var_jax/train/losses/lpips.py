"""LPIPS perceptual distance (VGG16 variant, v0.1) as a Flax linen module, NHWC.

LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric",
CVPR 2018) compares two images through a frozen ImageNet classifier:

  1. both images, in [-1, 1], are shifted and scaled per channel (the paper's ScalingLayer) so
     that they match the statistics the classifier was trained on;
  2. the VGG16 convolution trunk gives five feature maps (relu1_2, relu2_2, relu3_3, relu4_3,
     relu5_3);
  3. each feature vector is divided by its L2 norm over channels;
  4. the squared difference of the two normalised maps is weighted per channel by a learned
     non-negative 1x1 convolution without bias (one per layer, "lin0" .. "lin4"), averaged over
     space, and the five layer scores are summed.

Weights come from two PyTorch files read with the torch-free `load_torch_checkpoint`: torchvision's
ImageNet VGG16 (`vgg16-397923af.pth`, keys `features.<i>.weight/bias`) and the LPIPS v0.1 linear
layers (`vgg.pth`, keys `lin<k>.model.1.weight`). The trunk is never trained: `make_perceptual_loss`
wraps the parameters in `stop_gradient`, so gradients reach only the input images.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from var_jax.errors import CheckpointError, ConfigError, InputError
from var_jax.checkpoints.torch_pickle import load_torch_checkpoint
from var_jax.models import precision

# Output widths of the five VGG16 blocks and how many 3x3 convolutions each block has.
VGG16_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
VGG16_BLOCK_DEPTHS: tuple[int, ...] = (2, 2, 3, 3, 3)

# Positions of the 13 convolutions inside torchvision's `vgg16().features` Sequential (the ReLUs
# and max-pools between them have no parameters but still take an index).
TORCHVISION_CONV_INDICES: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)

# The LPIPS ScalingLayer: x -> (x - shift) / scale, for inputs in [-1, 1], channel order RGB.
SCALING_SHIFT: tuple[float, float, float] = (-0.030, -0.088, -0.188)
SCALING_SCALE: tuple[float, float, float] = (0.458, 0.448, 0.450)

# Added inside and outside the square root of the channel norm. Outside it matches the reference
# (x / (||x|| + eps)); inside it keeps the gradient finite where a feature vector is all zeros
# (common after a ReLU), where d sqrt(s)/ds is infinite. The value change is below 1e-10 relative.
NORM_EPS = 1e-10

# Smallest image side for which relu5_3 (after four 2x2 max-pools) is non-empty.
MIN_SIDE = 16

VGG_WEIGHTS_HINT = (
    "torchvision's ImageNet VGG16 weights, vgg16-397923af.pth (what "
    "`torchvision.models.vgg16(weights='IMAGENET1K_V1')` downloads)")
LIN_WEIGHTS_HINT = (
    "the LPIPS v0.1 linear layers, vgg.pth (shipped inside the `lpips` pip package as "
    "lpips/weights/v0.1/vgg.pth)")
RESAVE_HINT = (
    "Both released files predate torch 1.6 and use its legacy format, which var_jax does not "
    "read: re-save each once on a machine with torch: "
    "`torch.save(torch.load(path, map_location='cpu'), path)`.")


def conv_names(block_depths: Sequence[int] = VGG16_BLOCK_DEPTHS) -> list[str]:
  """Flax module names of the trunk's convolutions, in order: conv1_1, conv1_2, conv2_1, ..."""
  return [f"conv{b + 1}_{i + 1}" for b, depth in enumerate(block_depths) for i in range(depth)]


class VGG16Trunk(nn.Module):
  """The convolutional part of VGG16; returns the last ReLU output of each of the five blocks.

  Attributes:
    channels: width of each block (VGG16: 64, 128, 256, 512, 512). Tests use narrower trunks.
    dtype: compute dtype of the convolutions; parameters stay float32.
  """
  channels: tuple[int, ...] = VGG16_CHANNELS
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> list[jax.Array]:
    _check_channels(self.channels)
    names = iter(conv_names())
    features = []
    h = x_BHWC.astype(self.dtype)
    for block, (width, depth) in enumerate(zip(self.channels, VGG16_BLOCK_DEPTHS)):
      if block > 0:
        h = nn.max_pool(h, window_shape=(2, 2), strides=(2, 2), padding="VALID")
      for _ in range(depth):
        h = precision.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                           name=next(names))(h)
        h = nn.relu(h)
      features.append(h)
    return features


def _check_channels(channels: Sequence[int]) -> None:
  if len(channels) != len(VGG16_BLOCK_DEPTHS) or any(int(c) < 1 for c in channels):
    raise ConfigError(f"The VGG16 trunk needs {len(VGG16_BLOCK_DEPTHS)} positive block widths, "
                      f"got channels={tuple(channels)}.")


def _unit_normalize(f_BHWC: jax.Array) -> jax.Array:
  """Divides each feature vector (over channels) by its L2 norm, in float32."""
  f = f_BHWC.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True) + NORM_EPS * NORM_EPS)
  return f / (norm + NORM_EPS)


def scale_inputs(x_BHWC: jax.Array) -> jax.Array:
  """The LPIPS ScalingLayer for images in [-1, 1] (RGB, channels last)."""
  shift = jnp.asarray(SCALING_SHIFT, jnp.float32)
  scale = jnp.asarray(SCALING_SCALE, jnp.float32)
  return (x_BHWC.astype(jnp.float32) - shift) / scale


class LPIPS(nn.Module):
  """LPIPS distance between two image batches in [-1, 1]: (B, H, W, 3) x 2 -> (B,) float32.

  Parameters: {"vgg": {"conv1_1": {kernel, bias}, ...}, "lin_0": {kernel (1, 1, C0, 1)}, ...}.

  Attributes:
    channels: VGG block widths (the pretrained weights need the default).
    dtype: compute dtype of the VGG convolutions (bfloat16 is fine on TPU); the normalisation,
      the difference and the lin layers run in float32.
  """
  channels: tuple[int, ...] = VGG16_CHANNELS
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, y_BHWC: jax.Array) -> jax.Array:
    _check_images(x_BHWC, y_BHWC)
    batch = x_BHWC.shape[0]
    # One trunk pass over both batches: half the launches, same result.
    both = jnp.concatenate([scale_inputs(x_BHWC), scale_inputs(y_BHWC)], axis=0)
    features = VGG16Trunk(self.channels, self.dtype, name="vgg")(both)
    total_B = jnp.zeros((batch,), jnp.float32)
    for k, f_2BHWC in enumerate(features):
      f_x, f_y = _unit_normalize(f_2BHWC[:batch]), _unit_normalize(f_2BHWC[batch:])
      diff_BHWC = jnp.square(f_x - f_y)
      lin = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, name=f"lin_{k}",
                    precision=jax.lax.Precision.HIGHEST)
      total_B = total_B + jnp.mean(lin(diff_BHWC), axis=(1, 2, 3))
    return total_B


def _check_images(x_BHWC: jax.Array, y_BHWC: jax.Array) -> None:
  if x_BHWC.shape != y_BHWC.shape:
    raise InputError(f"LPIPS needs two image batches of one shape, got {x_BHWC.shape} and "
                     f"{y_BHWC.shape}.")
  if x_BHWC.ndim != 4 or x_BHWC.shape[-1] != 3:
    raise InputError(f"LPIPS takes (B, H, W, 3) RGB images in [-1, 1], got shape {x_BHWC.shape}.")
  if min(x_BHWC.shape[1:3]) < MIN_SIDE:
    raise InputError(f"LPIPS needs images of at least {MIN_SIDE}x{MIN_SIDE} (VGG16 pools four "
                     f"times), got {x_BHWC.shape[1]}x{x_BHWC.shape[2]}.")


# -- weights --------------------------------------------------------------------------------------

def _expected_torch_shapes(channels: Sequence[int]) -> tuple[dict[str, tuple], dict[str, tuple]]:
  """State-dict keys and shapes the two files must have for a trunk of these widths."""
  vgg, lin = {}, {}
  in_ch = 3
  conv = 0
  for block, (width, depth) in enumerate(zip(channels, VGG16_BLOCK_DEPTHS)):
    for _ in range(depth):
      index = TORCHVISION_CONV_INDICES[conv]
      vgg[f"features.{index}.weight"] = (width, in_ch, 3, 3)
      vgg[f"features.{index}.bias"] = (width,)
      in_ch = width
      conv += 1
    lin[f"lin{block}.model.1.weight"] = (1, width, 1, 1)
  return vgg, lin


def _shape_problems(sd: Mapping[str, np.ndarray], expected: Mapping[str, tuple],
                    what: str) -> list[str]:
  problems = []
  for key, shape in expected.items():
    if key not in sd:
      problems.append(f"{what}: missing '{key}' (expected shape {shape})")
    elif tuple(np.shape(sd[key])) != shape:
      problems.append(f"{what}: '{key}' has shape {tuple(np.shape(sd[key]))}, expected {shape}")
  return problems


def lpips_params_from_torch(vgg16_state_dict: Mapping[str, np.ndarray],
                            lpips_linear_state_dict: Mapping[str, np.ndarray],
                            channels: Sequence[int] = VGG16_CHANNELS) -> dict:
  """Converts the two PyTorch state dicts into the `LPIPS` parameter tree (numpy float32).

  Args:
    vgg16_state_dict: torchvision VGG16 weights; only the `features.*` keys are read, so the full
      classifier file and a features-only file both work. Conv kernels go OIHW -> HWIO.
    lpips_linear_state_dict: the LPIPS `vgg.pth` dict, `lin<k>.model.1.weight` of shape
      (1, C_k, 1, 1) -> kernel (1, 1, C_k, 1).
    channels: VGG block widths; the default is VGG16's.

  Returns:
    {"vgg": {...}, "lin_0": {...}, ...} ready for `LPIPS(channels).apply({"params": ...}, x, y)`.

  Raises:
    CheckpointError: listing every missing or mis-shaped key of both files at once; or negative
      (or NaN) lin weights, which no LPIPS file has.
    ConfigError: `channels` is not five positive widths.
  """
  _check_channels(channels)
  channels = tuple(int(c) for c in channels)
  expected_vgg, expected_lin = _expected_torch_shapes(channels)
  problems = (_shape_problems(vgg16_state_dict, expected_vgg, "VGG16 state dict")
              + _shape_problems(lpips_linear_state_dict, expected_lin, "LPIPS linear state dict"))
  if problems:
    raise CheckpointError(
        "The LPIPS weights do not fit the VGG16 LPIPS model:\n  " + "\n  ".join(problems)
        + f"\nExpected {VGG_WEIGHTS_HINT} and {LIN_WEIGHTS_HINT}.")
  vgg = {}
  for name, index in zip(conv_names(), TORCHVISION_CONV_INDICES):
    w_OIHW = np.asarray(vgg16_state_dict[f"features.{index}.weight"], np.float32)
    vgg[name] = {"kernel": np.ascontiguousarray(w_OIHW.transpose(2, 3, 1, 0)),
                 "bias": np.asarray(vgg16_state_dict[f"features.{index}.bias"], np.float32)}
  params = {"vgg": vgg}
  negative = []
  for k in range(len(channels)):
    w_1C11 = np.asarray(lpips_linear_state_dict[f"lin{k}.model.1.weight"], np.float32)
    if not np.all(w_1C11 >= 0):  # also catches NaN
      negative.append(f"lin{k}.model.1.weight (min {np.nanmin(w_1C11):.3g})")
    params[f"lin_{k}"] = {"kernel": np.ascontiguousarray(w_1C11.transpose(2, 3, 1, 0))}
  if negative:
    raise CheckpointError(
        "LPIPS linear weights must be non-negative (LPIPS clamps them in training, so a distance "
        f"can never go below 0), but {', '.join(negative)} are not: this is not "
        f"{LIN_WEIGHTS_HINT}.")
  return params


def load_lpips(vgg_path: str | os.PathLike, lin_path: str | os.PathLike,
               dtype: jnp.dtype = jnp.float32) -> tuple[LPIPS, dict]:
  """Reads both weight files and returns (LPIPS module, its parameters as numpy arrays).

  Raises:
    CheckpointError: a file is missing (the message says which and where to get it), unreadable
      (e.g. still in the legacy torch format), or does not hold the expected keys and shapes.
  """
  vgg_path, lin_path = os.path.expanduser(os.fspath(vgg_path)), os.path.expanduser(
      os.fspath(lin_path))
  missing = [f"  {path!r}: {hint}" for path, hint in ((vgg_path, VGG_WEIGHTS_HINT),
                                                      (lin_path, LIN_WEIGHTS_HINT))
             if not os.path.isfile(path)]
  if missing:
    raise CheckpointError(
        "LPIPS weight files not found:\n" + "\n".join(missing)
        + "\nDownload them, then point the loss config's lpips_vgg_path / lpips_lin_path at them "
        "(or set perceptual_weight = 0 to train without the perceptual loss). " + RESAVE_HINT)
  state_dicts = []
  for path in (vgg_path, lin_path):
    try:
      state_dicts.append(load_torch_checkpoint(path))
    except CheckpointError as e:
      raise CheckpointError(f"Cannot read LPIPS weights: {e}") from e
  params = lpips_params_from_torch(*state_dicts)
  return LPIPS(dtype=dtype), params


def make_perceptual_loss(module: LPIPS, params: Mapping) -> Callable[[jax.Array, jax.Array],
                                                                      jax.Array]:
  """(x_BHWC, y_BHWC) -> batch-mean LPIPS, with the LPIPS weights frozen by stop_gradient.

  Gradients flow into both images, never into `params`, even when the caller differentiates
  with respect to a pytree that happens to contain them.
  """
  frozen = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params

  def perceptual_loss(x_BHWC: jax.Array, y_BHWC: jax.Array) -> jax.Array:
    variables = {"params": jax.lax.stop_gradient(frozen)}
    return jnp.mean(module.apply(variables, x_BHWC, y_BHWC))

  return perceptual_loss
