"""The FID Inception network: InceptionV3 as used for FID, as a Flax linen module, NHWC.

FID (Heusel et al., 2017) compares the statistics of 2048-d "pool3" features of one fixed network:
the TensorFlow InceptionV3 graph of 2015-12-05. pytorch-fid ported that graph to PyTorch
(`pt_inception-2015-12-05-6726825d.pth`), and its numbers are the ones papers report. That graph
differs from the torchvision ImageNet InceptionV3 in three ways, all reproduced here:

  * the 3x3 average pools inside the A, C and E blocks leave the zero padding out of the average
    (TensorFlow's behaviour, `count_include_pad=False` in PyTorch terms);
  * the last block (Mixed_7c) pools its pool branch with a 3x3 max pool, not an average pool;
  * the classifier has 1008 outputs (unused here: features are taken before it).

Every convolution has no bias and is followed by batch norm (eps 1e-3, inference statistics) and
a ReLU. The features are the spatial mean of the last block ("pool_3"), (B, 2048) float32.

Two ways in, one network (`input_format`):

  * "pytorch_fid": images in [-1, 1], resized to 299x299 like PyTorch's
    `F.interpolate(mode='bilinear', align_corners=False)`; pytorch-fid's pipeline, used for rFID
    during training.
  * "adm": pixel values in [0, 255] (uint8 images cast to float), resized to 299x299 by TensorFlow
    1's `ResizeBilinear` (half_pixel_centers=False) and mapped by (x - 128) / 128: what the 2015
    graph does behind its `ExpandDims` input, which OpenAI's ADM evaluator (guided-diffusion
    `evaluations/evaluator.py`, the numbers VAR and its successors report) feeds 256x256 images to.

`spatial_features` also returns the ADM evaluator's sFID tap, "mixed_6/conv": the 1x1 branch of
the graph's seventh mixed block (Mixed_6d here) after its ReLU, first 7 channels, 17x17x7 = 2023
values per image flattened in (h, w, c) order. `classifier_from_torch` reads the 1008-way softmax
weights for the Inception Score.

Parameter names follow the PyTorch module names so that the state dict maps key by key:
`Mixed_5b.branch1x1.conv.weight` -> params["Mixed_5b"]["branch1x1"]["conv"]["kernel"] (OIHW ->
HWIO), `...bn.weight/bias/running_mean/running_var` -> ["bn"]["scale"/"bias"/"mean"/"var"].
The network is never trained here.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from var_jax.errors import CheckpointError, InputError
from var_jax.ops.resize import resize
from var_jax.checkpoints.torch_pickle import load_torch_checkpoint

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
# Output width of the FID network's classifier; torchvision's ImageNet InceptionV3 has 1000.
FID_NUM_CLASSES = 1008
# The ADM evaluator's sFID features: mixed_6/conv[..., :7] on the 17x17 grid.
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
INPUT_FORMATS = ("pytorch_fid", "adm")

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_HINT = (
    f"pytorch-fid's FID Inception weights, {WEIGHTS_FILENAME} (a release asset of the "
    "mseitzer/pytorch-fid GitHub project, 'fid_weights'; `pytorch_fid.inception.FID_WEIGHTS_URL` "
    "names it)")
RESAVE_HINT = (
    "If the file is in PyTorch's pre-1.6 format, which var_jax does not read, re-save it once on "
    "a machine with torch: `torch.save(torch.load(path, map_location='cpu'), path)`.")

_HIGHEST = jax.lax.Precision.HIGHEST

# Flax leaf (module, parameter) -> state-dict suffix.
_TORCH_LEAF_NAMES: Mapping[tuple[str, str], str] = {
    ("conv", "kernel"): "conv.weight",
    ("bn", "scale"): "bn.weight",
    ("bn", "bias"): "bn.bias",
    ("bn", "mean"): "bn.running_mean",
    ("bn", "var"): "bn.running_var",
}


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics: (x - mean) / sqrt(var + eps) * scale + bias, per channel.

  The statistics stay float32; the output has the input's dtype.
  """
  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    c = x_BHWC.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
    var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
    gain = scale * jax.lax.rsqrt(var + self.eps)
    return (x_BHWC * gain + (bias - mean * gain)).astype(x_BHWC.dtype)


class ConvBN(nn.Module):
  """Convolution without bias, frozen batch norm, ReLU (torchvision's BasicConv2d)."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    ph, pw = self.padding
    h = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False, dtype=x_BHWC.dtype,
                precision=_HIGHEST if x_BHWC.dtype == jnp.float32 else None,
                name="conv")(x_BHWC)
    return nn.relu(FrozenBatchNorm(name="bn")(h))


def _avg_pool_3x3_same(x_BHWC: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool over the unpadded window (TensorFlow SAME pooling)."""
  return nn.avg_pool(x_BHWC, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3(x_BHWC: jax.Array, stride: int) -> jax.Array:
  padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
  return nn.max_pool(x_BHWC, (3, 3), strides=(stride, stride), padding=padding)


class BlockA(nn.Module):
  """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pooled branches."""
  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = ConvBN(64, (1, 1), name="branch1x1")(x)
    b5 = ConvBN(48, (1, 1), name="branch5x5_1")(x)
    b5 = ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class BlockB(nn.Module):
  """35x35 -> 17x17 reduction (Mixed_6a)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = ConvBN(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = ConvBN(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class BlockC(nn.Module):
  """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
    b1 = ConvBN(192, (1, 1), name="branch1x1")(x)
    self.sow("intermediates", "branch1x1_out", b1)  # Mixed_6d's is the sFID tap (mixed_6/conv)
    b7 = ConvBN(c7, (1, 1), name="branch7x7_1")(x)
    b7 = ConvBN(c7, **row, name="branch7x7_2")(b7)
    b7 = ConvBN(192, **col, name="branch7x7_3")(b7)
    bd = ConvBN(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = ConvBN(c7, **col, name="branch7x7dbl_2")(bd)
    bd = ConvBN(c7, **row, name="branch7x7dbl_3")(bd)
    bd = ConvBN(c7, **col, name="branch7x7dbl_4")(bd)
    bd = ConvBN(192, **row, name="branch7x7dbl_5")(bd)
    bp = ConvBN(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class BlockD(nn.Module):
  """17x17 -> 8x8 reduction (Mixed_7a)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = ConvBN(192, (1, 1), name="branch3x3_1")(x)
    b3 = ConvBN(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = ConvBN(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class BlockE(nn.Module):
  """8x8 block with split 1x3 / 3x1 outputs (Mixed_7b, Mixed_7c).

  Attributes:
    pool: "avg" (Mixed_7b, padding excluded from the mean) or "max" (Mixed_7c in the FID graph).
  """
  pool: str = "avg"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = ConvBN(320, (1, 1), name="branch1x1")(x)
    b3 = ConvBN(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _max_pool_3x3(x, 1) if self.pool == "max" else _avg_pool_3x3_same(x)
    bp = ConvBN(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """(B, H, W, 3) images of any size -> pool3 features (B, 2048) float32.

  Attributes:
    input_format: "pytorch_fid" (images in [-1, 1]) or "adm" (pixel values in [0, 255]); see the
      module docstring.
    dtype: computation dtype of the trunk (float32, or bfloat16 for speed at some cost in FID
      agreement); the input scaling and resize are float32, the parameters stay float32.
  """
  input_format: str = "pytorch_fid"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    if x_BHWC.ndim != 4 or x_BHWC.shape[-1] != 3:
      raise InputError("The FID Inception network takes (B, H, W, 3) RGB images, got shape "
                       f"{x_BHWC.shape}.")
    if self.input_format == "pytorch_fid":
      h = resize(x_BHWC.astype(jnp.float32), INPUT_SIZE, "bilinear")
    elif self.input_format == "adm":
      h = resize(x_BHWC.astype(jnp.float32), INPUT_SIZE, "tf1_bilinear")
      h = (h - 128.0) * (1.0 / 128.0)
    else:
      raise InputError(f"input_format must be one of {INPUT_FORMATS}, got {self.input_format!r}.")
    h = h.astype(self.dtype)
    h = ConvBN(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(h)
    h = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(h)
    h = ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(h)
    h = _max_pool_3x3(h, 2)
    h = ConvBN(80, (1, 1), name="Conv2d_3b_1x1")(h)
    h = ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(h)
    h = _max_pool_3x3(h, 2)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      h = BlockA(pool_features, name=name)(h)
    h = BlockB(name="Mixed_6a")(h)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      h = BlockC(c7, name=name)(h)
    h = BlockD(name="Mixed_7a")(h)
    h = BlockE("avg", name="Mixed_7b")(h)
    h = BlockE("max", name="Mixed_7c")(h)
    return jnp.mean(h.astype(jnp.float32), axis=(1, 2))


def pool_and_spatial_features(module: FIDInceptionV3, params: Mapping, x_BHWC: jax.Array
                              ) -> tuple[jax.Array, jax.Array]:
  """(pool3 features (B, 2048), sFID features (B, 2023)) float32, from one pass."""
  pool, state = module.apply({"params": params}, x_BHWC, mutable=["intermediates"])
  (tap,) = state["intermediates"]["Mixed_6d"]["branch1x1_out"]
  spatial = tap[..., :SPATIAL_CHANNELS].astype(jnp.float32)
  return pool, spatial.reshape(spatial.shape[0], -1)


# -- weights --------------------------------------------------------------------------------------

def abstract_params() -> dict:
  """The parameter tree's shapes (jax.ShapeDtypeStruct leaves), without computing anything."""
  images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda x: FIDInceptionV3().init(jax.random.key(0), x), images)["params"]


def _torch_key(path: tuple[str, ...]) -> str:
  return ".".join(path[:-2] + (_TORCH_LEAF_NAMES[path[-2:]],))


def params_from_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
  """Converts pytorch-fid's FID Inception state dict into `FIDInceptionV3` parameters (numpy).

  Only the trunk is read; `fc.*` (the 1008-way classifier) and `*.num_batches_tracked` are not
  needed. A features-only dict without `fc.*` is accepted.

  Raises:
    CheckpointError: listing the missing and mis-shaped keys, or saying that the file is
      torchvision's ImageNet InceptionV3 (1000 classes, auxiliary head), whose trunk has the same
      key names but other weights and would give FIDs nobody else reports.
  """
  fc_shape = tuple(np.shape(state_dict["fc.weight"])) if "fc.weight" in state_dict else None
  wrong_network = None
  if fc_shape is not None and fc_shape != (FID_NUM_CLASSES, FEATURE_DIM):
    wrong_network = f"a classifier of shape {fc_shape} (fc.weight), not ({FID_NUM_CLASSES}, 2048)"
  elif any(k.startswith("AuxLogits.") for k in state_dict):
    wrong_network = "an auxiliary classifier (AuxLogits.*)"
  if wrong_network:
    raise CheckpointError(
        f"These are not the FID Inception weights: the state dict has {wrong_network}, like "
        "torchvision's ImageNet InceptionV3, whose features differ from those of the network FID "
        f"is defined with. Use {WEIGHTS_HINT}.")
  expected = jax.tree_util.tree_flatten_with_path(abstract_params())[0]
  missing, mis_shaped, leaves = [], [], {}
  for key_path, leaf in expected:
    path = tuple(k.key for k in key_path)
    key = _torch_key(path)
    torch_shape = (leaf.shape[::-1][:2] + leaf.shape[:2]) if path[-1] == "kernel" else leaf.shape
    if key not in state_dict:
      missing.append(f"missing '{key}' (expected shape {torch_shape})")
    elif tuple(np.shape(state_dict[key])) != torch_shape:
      mis_shaped.append(
          f"'{key}' has shape {tuple(np.shape(state_dict[key]))}, expected {torch_shape}")
    else:
      value = np.asarray(state_dict[key], np.float32)
      leaves[path] = value.transpose(2, 3, 1, 0) if path[-1] == "kernel" else value
  problems = mis_shaped + missing
  if problems:
    shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
    raise CheckpointError(
        f"The weights do not fit the FID Inception network ({len(problems)} problems):\n  "
        + "\n  ".join(shown) + f"\nExpected {WEIGHTS_HINT}.")
  params: dict = {}
  for path, value in leaves.items():
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(value)
  return params


def _read_state_dict(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isfile(path):
    raise CheckpointError(f"FID Inception weights not found at {path!r}: download {WEIGHTS_HINT} "
                          "and pass its local path.")
  try:
    return load_torch_checkpoint(path)
  except CheckpointError as e:
    raise CheckpointError(f"Cannot read the FID Inception weights: {e} {RESAVE_HINT}") from e


def classifier_from_torch(state_dict: Mapping[str, np.ndarray]) -> np.ndarray:
  """The 1008-way softmax weights, (2048, 1008) float32, from `fc.weight`.

  The ADM evaluator's Inception Score multiplies pool3 features by the graph's
  `softmax/logits/MatMul` weights alone: the classifier bias (`fc.bias`) is not used, here either.

  Raises:
    CheckpointError: the state dict has no `fc.weight` of shape (1008, 2048).
  """
  weight = state_dict.get("fc.weight")
  if weight is None or tuple(np.shape(weight)) != (FID_NUM_CLASSES, FEATURE_DIM):
    found = "no 'fc.weight'" if weight is None else f"'fc.weight' of shape {np.shape(weight)}"
    raise CheckpointError(
        f"The Inception Score needs the FID Inception network's 1008-way classifier, "
        f"'fc.weight' of shape ({FID_NUM_CLASSES}, {FEATURE_DIM}); the weights file has {found}. "
        f"Use {WEIGHTS_HINT}.")
  return np.ascontiguousarray(np.asarray(weight, np.float32).T)


def load_fid_inception(path: str | os.PathLike) -> tuple[FIDInceptionV3, dict]:
  """Reads the pytorch-fid weights file; returns (module, parameters as numpy float32 arrays).

  Raises:
    CheckpointError: the file is missing (the message says where to get it), unreadable, or does
      not hold the FID Inception weights.
  """
  return FIDInceptionV3(), params_from_torch(_read_state_dict(path))


@dataclasses.dataclass(frozen=True)
class ADMInception:
  """The network as the ADM evaluator runs it: module ("adm" input format), trunk parameters and
  the (2048, 1008) softmax weights of the Inception Score (None for a features-only weights
  file: no Inception Score then), numpy float32."""
  module: FIDInceptionV3
  params: dict
  classifier_DK: np.ndarray | None


def load_adm_inception(path: str | os.PathLike, *, dtype=jnp.float32) -> ADMInception:
  """Reads pytorch-fid's weights file for ADM-exact evaluation. A file without the classifier
  (`fc.*`, e.g. from scripts/convert_tf_inception.py) gives every metric but the Inception Score.

  Raises:
    CheckpointError: as `load_fid_inception`.
  """
  state_dict = _read_state_dict(path)
  classifier = classifier_from_torch(state_dict) if "fc.weight" in state_dict else None
  return ADMInception(FIDInceptionV3(input_format="adm", dtype=jnp.dtype(dtype)),
                      params_from_torch(state_dict), classifier)


def make_feature_fn(module: FIDInceptionV3) -> Callable[[Mapping, jax.Array], jax.Array]:
  """Jitted (params, images_BHWC in [-1, 1]) -> features (B, 2048) float32.

  The parameters are an argument, not a constant of the executable, so they can be placed once
  (e.g. replicated over a mesh) and shared by every call.
  """

  @jax.jit
  def features(params: Mapping, x_BHWC: jax.Array) -> jax.Array:
    return module.apply({"params": params}, x_BHWC)

  return features


def make_image_features(module: FIDInceptionV3, params: Mapping, batch_size: int
                        ) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 images (N, H, W, 3) -> features (N, 2048) float32 numpy, on the default device.

  Images go through in jitted chunks of `batch_size`; the last chunk is padded by repeating its
  last image, so every call reuses one executable.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise InputError(f"batch_size must be a positive int, got {batch_size!r}.")
  features_fn = make_feature_fn(module)
  device_params = jax.device_put(params)

  def image_features(images_NHWC: np.ndarray) -> np.ndarray:
    images = np.asarray(images_NHWC)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise InputError(f"FID features take uint8 (N, H, W, 3) images, got {images.dtype} "
                       f"{images.shape}.")
    out = []
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      pad = batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      x = chunk.astype(np.float32) / 127.5 - 1.0
      out.append(np.asarray(features_fn(device_params, x))[:batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)

  return image_features
