"""Samples a model class-balanced over every device of every host and takes the ADM Inception
features of each batch on the devices it was sampled on (no image file round trip).

Image i (global index) has class i % num_classes and is drawn from fold_in(key(seed), i), as in
`var-jax sample`: the features do not depend on the batch size, the device count or the host
count. Each host samples a contiguous share of the indices (`parallel.distributed.host_share`) in
calls of `batch` images; after every call the host saves the call's features (and, when asked, its
uint8 images) as one chunk file under `chunk_dir/process_<k>/`. A run that stops resumes at the
first call some host has not saved (hosts agree on it, since sampling is collective), and
`settings.json` in `chunk_dir` refuses a resume with other settings. `gather` collects every
host's features on every host, in global index order.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import zipfile
from typing import Callable, Iterator

import jax
import numpy as np

from var_jax.errors import InputError
from var_jax.eval.adm import ADMFeatures
from var_jax.parallel.distributed import host_share

SETTINGS_FILE = "settings.json"


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """Everything the sampled images depend on (recorded beside the chunks)."""
  model: str
  num_samples: int
  seed: int
  cfg: float
  top_k: int
  top_p: float
  more_smooth: bool
  batch: int
  inception_dtype: str = "float32"
  refiner: str = ""  # collaborative decoding: the refiner model ("" = none) and its draft scales
  draft_scales: int = -1


def class_balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """Label of global image i: i % num_classes (every class equally often, in any prefix too)."""
  return (np.arange(num_samples) % num_classes).astype(np.int32)


def _calls(share: range, batch: int) -> list[range]:
  return [range(s, min(s + batch, share.stop)) for s in range(share.start, share.stop, batch)]


def _chunk_path(chunk_dir: pathlib.Path, call: range) -> pathlib.Path:
  return chunk_dir / f"process_{jax.process_index()}" / f"chunk_{call.start:08d}_{call.stop:08d}.npz"


def _save_chunk(path: pathlib.Path, **arrays) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)  # a chunk is on disk whole or not at all


def _load_chunk(path: pathlib.Path, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in keys}
  except (OSError, ValueError, KeyError, zipfile.BadZipFile):
    return None  # missing, or cut short: sampled again


def _check_settings(chunk_dir: pathlib.Path, settings: SamplingSettings) -> None:
  path = chunk_dir / SETTINGS_FILE
  mine = dataclasses.asdict(settings)
  if path.is_file():
    # Settings files from before a field existed hold its default.
    defaults = {f.name: f.default for f in dataclasses.fields(SamplingSettings)
                if f.default is not dataclasses.MISSING}
    saved = {**defaults, **json.loads(path.read_text())}
    if saved != mine:
      diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
      raise InputError(
          f"{chunk_dir} holds features sampled with other settings ({', '.join(f'{k}: {a!r} then, {b!r} now' for k, (a, b) in diff.items())}). "
          "Pass another --features-dir, or delete that one to start over.")
  elif jax.process_index() == 0:
    chunk_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=2))


def _agreed_resume_call(done_calls: int) -> int:
  """The first call index every host has saved (the minimum over hosts)."""
  if jax.process_count() == 1:
    return done_calls
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.min(multihost_utils.process_allgather(np.asarray(done_calls, np.int32))))


def sample_features(model, settings: SamplingSettings, features: ADMFeatures | None, *, mesh,
                    chunk_dir: str | os.PathLike, keep_images: bool = False,
                    progress: Callable[[int], None] | None = None,
                    refiner=None) -> Iterator[dict[str, np.ndarray]]:
  """Samples this host's share and yields its chunks in order: {"pool", "spatial"[, "images"]}
  ({"images"} alone without `features`).

  refiner: collaborative decoding's second model (`var_jax.sample`'s `refiner`), drafting
  `settings.draft_scales` scales with `model`.

  Chunks already saved by an earlier run with the same settings are read back instead of sampled.
  `progress(n)` is called with the number of images of each chunk as it completes.
  """
  from var_jax.inference.sampler import sample  # pylint: disable=g-import-not-at-top
  if settings.num_samples < 1 or settings.batch < 1:
    raise InputError(f"num_samples and batch must be >= 1, got {settings.num_samples} and "
                     f"{settings.batch}.")
  chunk_dir = pathlib.Path(chunk_dir)
  _check_settings(chunk_dir, settings)
  keys = (("pool", "spatial") if features is not None else ()) + (
      ("images",) if keep_images or features is None else ())
  labels = class_balanced_labels(settings.num_samples, model.config.num_classes)
  share = host_share(settings.num_samples, jax.process_index(), jax.process_count())
  calls = _calls(share, settings.batch)
  saved = []
  for call in calls:
    chunk = _load_chunk(_chunk_path(chunk_dir, call), keys)
    if chunk is None:
      break
    saved.append(chunk)
  # Every host runs the same number of (collective) sampling calls: the same call count per host
  # (shares differ by at most one image), and a common resume point.
  n_calls = len(_calls(host_share(settings.num_samples, 0, jax.process_count()), settings.batch))
  resume = _agreed_resume_call(len(saved))
  key = jax.random.key(settings.seed)
  for i in range(n_calls):
    call = calls[i] if i < len(calls) else range(share.stop, share.stop)
    if i < resume:
      chunk = saved[i]
    else:
      idx = np.arange(call.start, call.stop)
      if len(idx) == 0:  # this host's share is one call shorter: sample a dummy batch, drop it
        idx = np.asarray([share.start if len(share) else 0])
      padded = np.concatenate([idx, np.full(settings.batch - len(idx), idx[-1])])
      image_keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(padded.astype(np.uint32))
      images = sample(model, labels[padded], rng=image_keys, cfg=settings.cfg, top_k=settings.top_k,
                      top_p=settings.top_p, more_smooth=settings.more_smooth, mesh=mesh,
                      refiner=refiner,
                      draft_scales=settings.draft_scales if refiner is not None else None)
      n = len(call)
      chunk = {}
      if features is not None:
        pool, spatial = features.device_features(images)
        chunk.update(pool=np.asarray(pool)[:n], spatial=np.asarray(spatial)[:n])
      if "images" in keys:
        chunk["images"] = np.asarray(images)[:n]
      if n:
        _save_chunk(_chunk_path(chunk_dir, call), **chunk)
    if len(call):
      if progress is not None:
        progress(len(call))
      yield chunk


def gather(local_NX: np.ndarray) -> np.ndarray:
  """Every host's rows, concatenated in host order (global index order), on every host."""
  if jax.process_count() == 1:
    return local_NX
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  counts = np.asarray(multihost_utils.process_allgather(np.asarray(len(local_NX), np.int32)))
  padded = np.zeros((int(counts.max()),) + local_NX.shape[1:], local_NX.dtype)
  padded[:len(local_NX)] = local_NX
  everything = np.asarray(multihost_utils.process_allgather(padded))
  return np.concatenate([everything[p, :c] for p, c in enumerate(counts)])


class SampleBatchWriter:
  """Writes an ADM sample batch (.npz with `arr_0`, uint8 (N, H, W, 3)) chunk by chunk, so a
  50,000-image batch is never held in memory. The file appears (atomically) on `close`."""

  def __init__(self, path: str | os.PathLike, count: int, image_shape: tuple[int, int, int]):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._tmp = self.path.with_name(self.path.name + ".tmp")
    self._zip = zipfile.ZipFile(self._tmp, "w", allowZip64=True)
    self._member = self._zip.open("arr_0.npy", "w", force_zip64=True)
    np.lib.format.write_array_header_2_0(
        self._member, {"descr": "|u1", "fortran_order": False, "shape": (count, *image_shape)})
    self._expected, self._written, self._shape = count, 0, tuple(image_shape)

  def write(self, images_NHWC: np.ndarray) -> None:
    images = np.ascontiguousarray(images_NHWC, np.uint8)
    if images.shape[1:] != self._shape:
      raise InputError(f"images of shape {images.shape[1:]} in a batch of {self._shape}.")
    self._member.write(images.tobytes())
    self._written += len(images)

  def close(self) -> pathlib.Path:
    self._member.close()
    self._zip.close()
    if self._written != self._expected:
      self._tmp.unlink()
      raise InputError(f"sample batch {self.path}: {self._written} images written, "
                       f"{self._expected} announced.")
    os.replace(self._tmp, self.path)
    return self.path
