"""The ADM evaluator's statistics, computed the way OpenAI's guided-diffusion
`evaluations/evaluator.py` computes them: the numbers VAR, CoDe, FlexVAR and other papers report.

  * FID: Fréchet distance between the sample pool3 features and the reference batch's stored
    (mu, sigma) (`var_jax.eval.fid`).
  * sFID: the same on the 2023 spatial features of mixed_6/conv (`inception.SPATIAL_DIM`), against
    (mu_s, sigma_s).
  * Inception Score: `var_jax.eval.inception_score`, splits of 5,000.
  * Precision / recall: k = 3 manifolds of pool3 features, the reference side from the reference
    batch's images (`var_jax.eval.manifold`).

Features come from `var_jax.eval.inception` with input_format "adm" (uint8 pixel values, the
TF1 resize of the 2015 graph), `ADMFeatures` below runs it jitted over a device mesh.

A reference batch is an .npz. ADM's (e.g. VIRTUAL_imagenet256_labeled.npz) holds `arr_0`, uint8
(N, H, W, 3) images, and `mu`, `sigma`, `mu_s`, `sigma_s`, statistics of the whole data set; it
is read as it is, the pool features of its images computed once (`--ref` of `var-jax evaluate`).
`write_reference` (`var-jax fid-stats`) writes the same four statistics plus `pool_features`
(N, 2048), so that precision and recall need no images and no second pass.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import zipfile
from typing import Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.errors import InputError
from var_jax.eval import fid, inception, inception_score, manifold

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
POOL_KEY = "pool_features"
IMAGES_KEY = "arr_0"
METRIC_KEYS = ("fid", "sfid", "inception_score", "precision", "recall")


# -- features --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _jitted_features(module: inception.FIDInceptionV3, mesh):
  """One jitted program per (network, mesh), kept: later extractors in the process reuse its
  compiled executables."""

  def features(params, images_BHWC):
    return inception.pool_and_spatial_features(module, params, images_BHWC.astype(jnp.float32))

  if mesh is None:
    return jax.jit(features)
  from var_jax.inference import placement  # pylint: disable=g-import-not-at-top
  batch = placement.batch_sharding(mesh)
  return jax.jit(features, out_shardings=(batch, batch))


class ADMFeatures:
  """uint8 images (B, H, W, 3) -> (pool3 (B, 2048), spatial (B, 2023)) float32, jitted.

  The network's parameters are placed once, replicated over `mesh` (None: the default device);
  images that already live sharded over the mesh (the sampler's output) are used where they are,
  so samples go from the sampler into the network without leaving the devices. Batches of
  any size are padded to `batch_size` (one compile) and the padding dropped.
  """

  def __init__(self, network: inception.ADMInception, *, batch_size: int, mesh=None):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise InputError(f"batch_size must be a positive int, got {batch_size!r}.")
    self.network = network
    self.batch_size = batch_size
    self.mesh = mesh
    self._fn = _jitted_features(network.module, mesh)
    if mesh is None:
      self._params = jax.device_put(network.params)
    else:
      from var_jax.inference import placement  # pylint: disable=g-import-not-at-top
      self._params = jax.tree.map(lambda x: placement.put_replicated(x, mesh), network.params)
      self._batch_sharding = placement.batch_sharding(mesh)

  def device_features(self, images_BHWC) -> tuple[jax.Array, jax.Array]:
    """Features of one batch of at most `batch_size` images, as device arrays."""
    n = images_BHWC.shape[0]
    if images_BHWC.ndim != 4 or images_BHWC.shape[-1] != 3 or images_BHWC.dtype != jnp.uint8:
      raise InputError(f"ADM features take uint8 (B, H, W, 3) images, got {images_BHWC.dtype} "
                       f"{tuple(images_BHWC.shape)}.")
    if n > self.batch_size:
      raise InputError(f"{n} images exceed the feature batch of {self.batch_size}.")
    if n < self.batch_size:
      pad = jnp.repeat(jnp.asarray(images_BHWC)[-1:], self.batch_size - n, axis=0)
      images_BHWC = jnp.concatenate([jnp.asarray(images_BHWC), pad])
    if self.mesh is not None and not (isinstance(images_BHWC, jax.Array)
                                      and images_BHWC.sharding == self._batch_sharding):
      images_BHWC = jax.device_put(images_BHWC, self._batch_sharding)
    pool, spatial = self._fn(self._params, images_BHWC)
    return pool[:n], spatial[:n]

  def lower(self, image_size: int) -> jax.stages.Lowered:
    """The Lowered of exactly what `device_features` runs for a full batch of uint8
    image_size x image_size images; with ShapeDtypeStruct parameters (e.g.
    `inception.abstract_params()`) and a mesh of compile-only TPU devices this is the AOT
    program of that slice (`benchmarks/bench_evaluate.py`)."""
    images = jax.ShapeDtypeStruct((self.batch_size, image_size, image_size, 3), jnp.uint8,
                                  sharding=getattr(self, "_batch_sharding", None))
    return self._fn.lower(self._params, images)

  def __call__(self, images_NHWC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features of any number of images, as numpy arrays."""
    pools, spatials = [], []
    for start in range(0, len(images_NHWC), self.batch_size):
      pool, spatial = self.device_features(images_NHWC[start:start + self.batch_size])
      pools.append(np.asarray(pool))
      spatials.append(np.asarray(spatial))
    if not pools:
      return (np.zeros((0, inception.FEATURE_DIM), np.float32),
              np.zeros((0, inception.SPATIAL_DIM), np.float32))
    return np.concatenate(pools), np.concatenate(spatials)


# -- reference batches ------------------------------------------------------------------------------

@dataclasses.dataclass
class Reference:
  """What the metrics need of a reference batch: the stats of FID and sFID, and pool features of
  reference images for precision/recall."""
  mu: np.ndarray
  sigma: np.ndarray
  mu_s: np.ndarray
  sigma_s: np.ndarray
  pool_features: np.ndarray
  source: str = ""


def _open_npz(path: str) -> np.lib.npyio.NpzFile:
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise InputError(f"Reference or sample batch not found: {path!r}.")
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise InputError(f"Cannot read {path!r} as an .npz file ({e}).") from e
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise InputError(f"{path!r} holds a single array (.npy), not an .npz batch.")
  return data


def _read_npy_header(member, path: str) -> tuple[tuple[int, ...], bool, np.dtype]:
  version = np.lib.format.read_magic(member)
  readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
  if version not in readers:
    raise InputError(f"{path!r}: unsupported .npy format version {version} of its images.")
  return readers[version](member)


def iter_image_batches(path: str, batch_size: int, key: str = IMAGES_KEY
                       ) -> tuple[int, Iterator[np.ndarray]]:
  """(count, batches of uint8 (b, H, W, 3)) of an ADM batch's images, streamed from the .npz
  member batch by batch: a 50,000-image batch is 9.8 GB at 256 px and is never held whole
  (numpy can memory-map .npy files, not members of an .npz)."""
  path = os.path.expanduser(path)
  with _open_npz(path) as data:
    names = data.files
  if key not in names:
    raise InputError(f"{path!r} has no '{key}' array (uint8 N x H x W x 3 images); found "
                     f"{sorted(names)}.")
  with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
    shape, fortran, dtype = _read_npy_header(member, path)
  if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
    raise InputError(f"{path!r}['{key}'] must be uint8 (N, H, W, 3) images in C order, got "
                     f"{dtype} {shape}{' (Fortran order)' if fortran else ''}.")
  count, image_bytes = shape[0], int(np.prod(shape[1:]))

  def batches():
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
      _read_npy_header(member, path)
      for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        raw = member.read(n * image_bytes)
        if len(raw) != n * image_bytes:
          raise InputError(f"{path!r}['{key}'] is truncated: image {start + len(raw) // image_bytes} "
                           f"of {count} is incomplete.")
        yield np.frombuffer(raw, np.uint8).reshape((n,) + tuple(shape[1:]))

  return count, batches()


def compute_features(batches: Iterable[np.ndarray], extract: Callable[[np.ndarray], tuple],
                     ) -> tuple[np.ndarray, np.ndarray]:
  pools, spatials = [], []
  for images in batches:
    pool, spatial = extract(images)
    pools.append(np.asarray(pool, np.float32))
    spatials.append(np.asarray(spatial, np.float32))
  if not pools:
    raise InputError("No images to compute features of.")
  return np.concatenate(pools), np.concatenate(spatials)


def statistics(features_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) float64 of features, sigma normalised by N - 1 (as np.cov)."""
  stats = fid.FeatureStats(features_ND.shape[1])
  for start in range(0, len(features_ND), 8192):
    stats.update(features_ND[start:start + 8192])
  return stats.stats()


def write_reference(path: str | os.PathLike, pool_ND: np.ndarray, spatial_ND: np.ndarray,
                    images_NHWC: np.ndarray | None = None) -> str:
  """Writes a reference batch: mu, sigma, mu_s, sigma_s and pool_features, and with `images` also
  `arr_0`, which makes the file a complete ADM reference batch (the official evaluator reads it)
  and a sample batch for `var-jax evaluate --sample-batch`."""
  pool = np.asarray(pool_ND, np.float32)
  spatial = np.asarray(spatial_ND, np.float32)
  if pool.ndim != 2 or spatial.ndim != 2 or len(pool) != len(spatial) or len(pool) < 2:
    raise InputError(f"A reference batch needs matching pool and spatial features of at least 2 "
                     f"images, got {pool.shape} and {spatial.shape}.")
  extra = {}
  if images_NHWC is not None:
    images = np.asarray(images_NHWC)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(pool):
      raise InputError(f"images must be uint8 (N, H, W, 3) with N = {len(pool)}, got "
                       f"{images.dtype} {images.shape}.")
    extra[IMAGES_KEY] = images
  mu, sigma = statistics(pool)
  mu_s, sigma_s = statistics(spatial)
  path = os.path.expanduser(os.fspath(path))
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append ".npz"
    np.savez(f, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool_features=pool, **extra)
  os.replace(tmp, path)
  return path


def read_reference(path: str, extract: Callable[[np.ndarray], tuple] | None = None, *,
                   batch_size: int = 64) -> Reference:
  """Reads a reference batch (ADM's or `write_reference`'s).

  Pool features come from `pool_features` if present, else from the images in `arr_0` through
  `extract` (uint8 images -> (pool, spatial)); statistics from `mu`, `sigma`, `mu_s`, `sigma_s` if
  present (ADM: statistics of the whole data set), else from those features.

  Raises:
    InputError: the file is missing or unreadable, has neither features nor images, or holds
      arrays of the wrong shapes.
  """
  data = _open_npz(path)
  with data:
    names = set(data.files)
    stats = {k: np.asarray(data[k], np.float64) for k in STAT_KEYS if k in names}
    pool = np.asarray(data[POOL_KEY], np.float32) if POOL_KEY in names else None
  partial = sorted(set(STAT_KEYS) - set(stats))
  if stats and partial:
    raise InputError(f"Reference batch {path!r} has {sorted(stats)} but lacks {partial}.")
  spatial = None
  if pool is None:
    if IMAGES_KEY not in names:
      raise InputError(f"Reference batch {path!r} has neither '{POOL_KEY}' nor images "
                       f"('{IMAGES_KEY}'): precision and recall need one of them. Found "
                       f"{sorted(names)}; write one with `var-jax fid-stats`.")
    if extract is None:
      raise InputError(f"Reference batch {path!r} holds images only: pass the Inception network "
                       "to compute their features.")
    _, batches = iter_image_batches(path, batch_size)
    pool, spatial = compute_features(batches, extract)
  if pool.ndim != 2 or pool.shape[1] != inception.FEATURE_DIM or len(pool) <= manifold.NEIGHBOURHOOD:
    raise InputError(f"Reference batch {path!r}: pool features must be (N > "
                     f"{manifold.NEIGHBOURHOOD}, {inception.FEATURE_DIM}), got {pool.shape}.")
  if not stats:
    if spatial is None:
      raise InputError(f"Reference batch {path!r} has pool features but no statistics.")
    stats = dict(zip(("mu", "sigma"), statistics(pool)))
    stats.update(zip(("mu_s", "sigma_s"), statistics(spatial)))
  for name, dim in (("mu", inception.FEATURE_DIM), ("mu_s", inception.SPATIAL_DIM)):
    if stats[name].shape != (dim,):
      raise InputError(f"Reference batch {path!r}: '{name}' has shape {stats[name].shape}, "
                       f"expected ({dim},).")
  return Reference(**stats, pool_features=pool, source=os.fspath(path))


# -- the metrics ------------------------------------------------------------------------------------

def metrics(sample_pool_ND: np.ndarray, sample_spatial_ND: np.ndarray, reference: Reference,
            classifier_DK: np.ndarray | None) -> dict:
  """FID, sFID, Inception Score, precision and recall of sample features against a reference.

  Returns:
    {"fid", "sfid", "inception_score", "precision", "recall", "num_samples",
     "num_reference_images"}; inception_score is None without the classifier.
  """
  pool = np.asarray(sample_pool_ND, np.float32)
  spatial = np.asarray(sample_spatial_ND, np.float32)
  if pool.shape != (len(pool), inception.FEATURE_DIM) or spatial.shape != (
      len(pool), inception.SPATIAL_DIM):
    raise InputError(f"Sample features must be pool (N, {inception.FEATURE_DIM}) and spatial "
                     f"(N, {inception.SPATIAL_DIM}), got {pool.shape} and {spatial.shape}.")
  if len(pool) <= manifold.NEIGHBOURHOOD:
    raise InputError(f"The metrics need more than {manifold.NEIGHBOURHOOD} samples, got {len(pool)}.")
  mu, sigma = statistics(pool)
  mu_s, sigma_s = statistics(spatial)
  precision, recall = manifold.precision_recall(reference.pool_features, pool)
  return {
      "fid": fid.frechet_distance(mu, sigma, reference.mu, reference.sigma),
      "sfid": fid.frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s),
      "inception_score": (None if classifier_DK is None
                          else inception_score.inception_score(pool, classifier_DK)),
      "precision": precision,
      "recall": recall,
      "num_samples": int(len(pool)),
      "num_reference_images": int(len(reference.pool_features)),
  }


def as_reference_view(data: Mapping[str, np.ndarray]) -> Reference:
  """A `Reference` from in-memory arrays with the file's key names (tests, hooks)."""
  return Reference(**{k: np.asarray(data[k], np.float64) for k in STAT_KEYS},
                   pool_features=np.asarray(data[POOL_KEY], np.float32))
