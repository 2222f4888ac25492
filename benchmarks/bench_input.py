"""Input pipeline throughput per host against what the train steps consume (issue 14).

  python benchmarks/bench_input.py                                   # images, tfds, tokens
  python benchmarks/bench_input.py --part images --sizes 256 --threads 1,2 --processes 0
  python benchmarks/bench_input.py --part appetite --refresh-appetite   # AOT compiles, ~1 h on 2 cores

Every measurement goes through `var_jax.data.make_input_iterator`, the call the trainer makes
(one host of one: process_index 0 of 1, train=True, seed 0), with `data.num_workers` threads and,
where the data config has the field, `data.num_processes` grain worker processes. After the first
batch (start-up, incl. spawning the workers) and a warm-up that drains what was read ahead, it
times `--steps` batches of `--batch` examples: examples/s on this machine, and the CPU seconds the
whole process tree spent on them (this process and its worker processes, from /proc), whose
inverse, examples per CPU-second, is the figure that scales with a host's cores.

Data (generated once under --data-root, default /work/scratch/bench_input/, then reused):
* images: `<root>/images/train/<synset>/<synset>_<i>.JPEG`, ImageNet-like JPEGs (400-500 x
  333-375 px, a quarter of them portrait, quality 90) cut from scikit-image's bundled photos
  (`skimage.data`: random crops, resizes and flips, so real image content), read by
  data.source="folder": PIL decode + the official augmentation (shorter side to 1.125 x size with
  LANCZOS, random crop; `var_jax/data/augment.py`).
* tfds: the same JPEGs as a real `imagenet2012` TFDS data set in the array_record format, built by
  TFDS's own imagenet2012 builder from an ILSVRC2012_img_train.tar made of them, read by
  data.source="tfds" (`tfds.data_source` random access). `tfds.testing.mock_data` is not used:
  under it `tfds.data_source` reads no file (this script checks and prints why).
* tokens: pre-tokenized records (d16 layout: patch_nums 1..16, L = 680, vocab 4096, 10 variants;
  `--token-layouts 512` adds the d36 layout, L = 2240) of random token ids, written with the
  package's writer when it has one for synthetic data (format v2), else in the v1 npz layout.

Appetite: global batch / step time / hosts of the d16, d30 and d36 train steps on their target
slices (d16: v5p-32, 4 hosts; d30 and d36: v5p-128, 16 hosts; 4 chips per host as libtpu's
compile-only devices say), with the step time from `var_jax.aot.train_step_report` (the TPU
roofline of the loop-corrected XLA costs: a lower bound on the step, so the appetite is an upper
bound) and at 50% MFU of the model FLOPs. Image rows compare with the step that encodes images
(configs/var_d*.py), token rows with the `:pretokenized` step. Compiling them takes long on a
small CPU, so the figures are cached in benchmarks/results/input_appetite.json;
`--refresh-appetite` recompiles.

This machine's CPUs are few (2 here), so the headroom is printed twice: measured here / appetite,
and projected / appetite where projected = examples per CPU-second x the vCPUs of the slice's
host (v5p 208, v5e 112; see HOST_VCPUS). The projection assumes linear scaling over all vCPUs,
which is an upper bound: a vCPU is a hyperthread, and the trainer itself needs some of them.
Timings on a shared machine are noisy; the CPU-second figures much less so.
JSON lines (starting with `{`) follow each table.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from typing import Any, Callable, Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no device is used; AOT needs only libtpu
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_ROOT = "/work/scratch/bench_input"
APPETITE_JSON = os.path.join(HERE, "results", "input_appetite.json")

PATCH_NUMS = {256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}
VOCAB_SIZE = 4096
NUM_VARIANTS = 10

# model: (depth, target slice, why that slice)
TARGETS = {
    # v5e:4x4 (benchmarks/aot_tpu.py's d16 case) does not fit batch 768: 70 GB of temporaries
    # per chip against 16 GB; 16 v5p chips of 95 GB do (README: d16 evaluated on v5p-32).
    "d16": (16, "v5p-32", "16 v5p chips hold the recipe's batch 768 (v5e:4x4 does not)"),
    "d30": (30, "v5p-128", "README's `var-jax aot --config configs/var_d30.py --topology v5p-128`"),
    "d36": (36, "v5p-128", "benchmarks/aot_tpu.py's d36 case"),
}
MODEL_SIZE = {"d16": 256, "d30": 256, "d36": 512}
# vCPUs of one TPU VM (4 chips) per generation, and where the figure comes from.
HOST_VCPUS = {
    "v5p": (208, "Cloud TPU docs (tpu/docs/v5p): 208 vCPUs, 448 GB RAM per 4-chip VM"),
    "v5e": (112, "Cloud TPU docs (tpu/docs/v5e): ct5lp-hightpu-4t, 112 vCPUs, 192 GB per 4-chip VM"),
    "v4": (240, "assumption (not found in the docs searched)"),
}
REALISTIC_MFU = 0.5


# -- CPU time of this process tree ---------------------------------------------------------------

def _children(pid: int) -> list[int]:
  kids = []
  try:
    for tid in os.listdir(f"/proc/{pid}/task"):
      with open(f"/proc/{pid}/task/{tid}/children") as f:
        kids.extend(int(k) for k in f.read().split())
  except OSError:
    pass
  return kids


def _cpu_seconds(pid: int) -> float:
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return 0.0
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def tree_cpu_seconds() -> dict[int, float]:
  """CPU seconds of this process and each live descendant, by pid (Linux /proc)."""
  out, todo = {}, [os.getpid()]
  while todo:
    pid = todo.pop()
    out[pid] = _cpu_seconds(pid)
    todo.extend(_children(pid))
  return out


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
  """CPU seconds between two readings; processes born in between count from zero."""
  return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


# -- generated data: the image folder --------------------------------------------------------------

def _photos() -> list[np.ndarray]:
  """scikit-image's bundled photos as uint8 RGB arrays (gray ones replicated to 3 channels)."""
  try:
    from skimage import data as skdata
  except ImportError:
    raise SystemExit("the image data needs scikit-image's bundled photos: pip install scikit-image")
  names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
           "retina", "colorwheel", "camera", "coins", "moon", "brick", "grass", "gravel", "clock",
           "cell")
  photos = []
  for name in names:
    try:
      image = np.asarray(getattr(skdata, name)())
    except Exception:  # a photo that needs pooch (not bundled) is skipped
      continue
    if image.dtype != np.uint8:
      continue
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=2)
    photos.append(np.ascontiguousarray(image[..., :3]))
  try:
    left, right, _ = skdata.stereo_motorcycle()
    photos += [left, right]
  except Exception:
    pass
  if len(photos) < 4:
    raise SystemExit(f"only {len(photos)} photos in skimage.data; need a fuller scikit-image install")
  return photos


def synsets(count: int) -> list[str]:
  """The first `count` ImageNet synsets (TFDS's imagenet2012 label order)."""
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
  with open(imagenet_common.label_names_file()) as f:
    names = [line.strip() for line in f if line.strip()]
  return names[:count]


def _make_jpeg(photos: list[np.ndarray], seed: int, index: int) -> bytes:
  from PIL import Image
  rng = np.random.default_rng((seed, index))
  src = photos[int(rng.integers(len(photos)))]
  width, height = int(rng.integers(400, 501)), int(rng.integers(333, 376))
  if rng.random() < 0.25:
    width, height = height, width
  sh, sw = src.shape[:2]
  # The largest crop of the target's aspect ratio, scaled by sqrt(area fraction in [0.3, 1]).
  scale = math.sqrt(rng.uniform(0.3, 1.0))
  cw = min(sw, sh * width / height) * scale
  ch = cw * height / width
  left, top = rng.uniform(0, sw - cw), rng.uniform(0, sh - ch)
  image = Image.fromarray(src).resize((width, height), Image.Resampling.BICUBIC,
                                      box=(left, top, left + cw, top + ch))
  if rng.random() < 0.5:
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def ensure_image_folder(root: str, num_images: int, num_classes: int, seed: int = 0) -> str:
  """`<root>/images` with train/<synset>/<synset>_<i>.JPEG; made once, reused when complete."""
  folder = os.path.join(root, "images")
  marker = os.path.join(folder, "complete.json")
  want = {"num_images": num_images, "num_classes": num_classes, "seed": seed, "version": 1}
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == want:
        return folder
    raise SystemExit(f"{folder} holds another image set ({marker}); use another --data-root or "
                     "delete it")
  classes = synsets(num_classes)
  photos = _photos()
  t0 = time.perf_counter()

  def write(i: int) -> int:
    synset = classes[i % num_classes]
    path = os.path.join(folder, "train", synset, f"{synset}_{i}.JPEG")
    data = _make_jpeg(photos, seed, i)
    with open(path, "wb") as f:
      f.write(data)
    return len(data)

  for synset in classes:
    os.makedirs(os.path.join(folder, "train", synset), exist_ok=True)
  with concurrent.futures.ThreadPoolExecutor(cpu_count()) as pool:
    sizes = list(pool.map(write, range(num_images)))
  with open(marker, "w") as f:
    json.dump(want, f)
  print(f"wrote {num_images} JPEGs ({np.mean(sizes) / 1024:.0f} KiB on average) in {folder} in "
        f"{time.perf_counter() - t0:.0f} s", flush=True)
  return folder


# -- generated data: a real imagenet2012 TFDS build of the same JPEGs -----------------------------

def check_tfds_mock() -> str:
  """What `tfds.data_source` reads under `tfds.testing.mock_data` (a sentence for the output)."""
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=4):
    source = tfds.data_source("imagenet2012", split="train",
                              decoders={"image": tfds.decode.SkipDecoding()})
    reader = type(getattr(source, "data_source", None)).__name__
    record = source[0]
  image = record.get("image")
  return (f"tfds.testing.mock_data: tfds.data_source('imagenet2012')'s reader is a {reader}, not "
          f"array_record's ArrayRecordDataSource: each access generates and encodes a random "
          f"example in memory ({type(image).__name__} image of {len(image)} bytes), no file is "
          "read, so it cannot measure random access; a real array_record imagenet2012 is built "
          "instead")


def ensure_tfds(root: str, folder: str) -> str:
  """A prepared imagenet2012 (array_record) in `<root>/tfds` holding the folder's JPEGs as its
  train split, built by TFDS's imagenet2012 builder from a synthetic ILSVRC2012_img_train.tar."""
  import tensorflow_datasets as tfds
  data_dir = os.path.join(root, "tfds")
  builder = tfds.builder("imagenet2012", data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return data_dir
  manual = os.path.join(root, "tfds_manual")
  os.makedirs(manual, exist_ok=True)
  tar_path = os.path.join(manual, "ILSVRC2012_img_train.tar")
  t0 = time.perf_counter()
  train = os.path.join(folder, "train")
  with tarfile.open(tar_path + ".tmp", "w") as outer:
    for synset in sorted(os.listdir(train)):
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
        for name in sorted(os.listdir(os.path.join(train, synset))):
          inner.add(os.path.join(train, synset, name), arcname=name)
      info = tarfile.TarInfo(f"{synset}.tar")
      info.size = inner_bytes.tell()
      inner_bytes.seek(0)
      outer.addfile(info, inner_bytes)
  os.replace(tar_path + ".tmp", tar_path)
  # The builder reads the validation tar's names even when it builds only train: give it a small one
  # (ILSVRC2012_val_%08d.JPEG, labelled by TFDS's validation label list in name order).
  files = sorted(os.path.join(train, s, n) for s in os.listdir(train)
                 for n in os.listdir(os.path.join(train, s)))
  val_path = os.path.join(manual, "ILSVRC2012_img_val.tar")
  with tarfile.open(val_path + ".tmp", "w") as val:
    for i, path in enumerate(files[::20]):
      val.add(path, arcname=f"ILSVRC2012_val_{i + 1:08d}.JPEG")
  os.replace(val_path + ".tmp", val_path)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  except ModuleNotFoundError as error:  # TFDS 4.9 builds import it but declare it for py<3.9 only
    raise SystemExit(f"TFDS cannot build ({error}): pip install importlib_resources") from error
  print(f"built imagenet2012 (array_record) from {tar_path} in {data_dir} in "
        f"{time.perf_counter() - t0:.0f} s", flush=True)
  return data_dir


# -- generated data: pre-tokenized records ---------------------------------------------------------

def _seq_len(patch_nums: Sequence[int]) -> int:
  return sum(p * p for p in patch_nums)


def _meta(count: int, num_shards: int, patch_nums: Sequence[int], version: int) -> dict:
  image_size = 16 * patch_nums[-1]
  return {
      "format": "var_jax.pretokenized", "format_version": version,
      "patch_nums": list(patch_nums), "seq_len": _seq_len(patch_nums), "vocab_size": VOCAB_SIZE,
      "token_dtype": "int16", "image_size": image_size, "mid_reso": 1.125, "hflip": False,
      "num_variants": NUM_VARIANTS, "num_shards": num_shards, "count": count,
      "num_classes": 1000, "seed": 0,
      "source": {"source": "synthetic", "name": "bench_input", "split": "train", "data_dir": ""},
  }


def _shard_arrays(rng: np.random.Generator, start: int, end: int,
                  seq_len: int) -> dict[str, np.ndarray]:
  n = end - start
  return {"tokens": rng.integers(0, VOCAB_SIZE, (n, NUM_VARIANTS, seq_len), dtype=np.int16),
          "labels": rng.integers(0, 1000, (n,), dtype=np.int32),
          "source_indices": np.arange(start, end, dtype=np.int64)}


def write_tokens_v1(directory: str, count: int, patch_nums: Sequence[int], num_shards: int,
                    seed: int = 0) -> None:
  """A v1 set (today's and 3b19fe8's `token_shards` layout) written directly with np.savez:
  meta.json + tokens-SSSSS-of-TTTTT.npz holding tokens (n, K, L) int16, labels, source_indices;
  shard s holds records [s * N // T, (s + 1) * N // T). Needs no var_jax import."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  seq_len = _seq_len(patch_nums)
  for shard in range(num_shards):
    start, end = shard * count // num_shards, (shard + 1) * count // num_shards
    path = os.path.join(directory, f"tokens-{shard:05d}-of-{num_shards:05d}.npz")
    with open(path + ".tmp", "wb") as f:
      np.savez(f, **_shard_arrays(rng, start, end, seq_len))
    os.replace(path + ".tmp", path)
  with open(os.path.join(directory, "meta.json"), "w") as f:
    json.dump(_meta(count, num_shards, patch_nums, 1), f, indent=2, sort_keys=True)


def token_writer_version() -> int:
  """The pre-tokenized format this checkout reads (token_shards.FORMAT_VERSION)."""
  from var_jax.data import token_shards
  return int(token_shards.FORMAT_VERSION)


def write_tokens_package(directory: str, count: int, patch_nums: Sequence[int], num_shards: int,
                         seed: int = 0) -> int:
  """A set in the format this checkout reads: v1 (npz) directly, v2 (array_record) with the
  package's shard writer (token_shards.write_shard / encode_records). Returns the version written."""
  from var_jax.data import token_shards
  version = int(token_shards.FORMAT_VERSION)
  if version == 1:
    write_tokens_v1(directory, count, patch_nums, num_shards, seed)
    return 1
  out = token_shards.epath.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  seq_len = _seq_len(patch_nums)
  for shard in range(num_shards):
    start, end = token_shards.shard_bounds(shard, num_shards, count)
    arrays = _shard_arrays(rng, start, end, seq_len)
    token_shards.write_shard(
        out / token_shards.shard_file_name(shard, num_shards),
        token_shards.encode_records(arrays["tokens"], arrays["labels"], arrays["source_indices"],
                                    VOCAB_SIZE))
  token_shards.write_json_atomically(out / token_shards.META_FILE,
                                     _meta(count, num_shards, patch_nums, version))
  return version


def ensure_tokens(root: str, count: int, size: int, num_shards: int = 8) -> str:
  """`<root>/tokens_v<version>_<size>_<count>`: a synthetic set this checkout reads, made once."""
  version = token_writer_version()
  directory = os.path.join(root, f"tokens_v{version}_{size}_{count}")
  if os.path.exists(os.path.join(directory, "meta.json")):
    return directory
  t0 = time.perf_counter()
  write_tokens_package(directory, count, PATCH_NUMS[size], num_shards)
  print(f"wrote {count} token records (v{version}, L={_seq_len(PATCH_NUMS[size])}, "
        f"{NUM_VARIANTS} variants) in {directory} in {time.perf_counter() - t0:.0f} s", flush=True)
  return directory


# -- measurement -------------------------------------------------------------------------------------

def has_num_processes() -> bool:
  from var_jax.data import default_data_config
  return "num_processes" in default_data_config()


def measure(data_config, *, batch: int, steps: int, warmup: int, min_seconds: float,
            **kwargs) -> dict[str, float]:
  """examples/s and CPU seconds per example of `make_input_iterator(data_config, ...)`: at least
  `steps` batches and `min_seconds` timed, after the first batch and `warmup` more."""
  from var_jax.data import make_input_iterator
  before_all = tree_cpu_seconds()
  t0 = time.perf_counter()
  iterator = make_input_iterator(data_config, global_batch=batch, seed=0, start_step=0,
                                 process_index=0, process_count=1, train=True, **kwargs)
  try:
    next(iterator)
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
      next(iterator)
    before = tree_cpu_seconds()
    t1 = time.perf_counter()
    timed = 0
    while timed < steps or time.perf_counter() - t1 < min_seconds:
      next(iterator)
      timed += 1
    wall = time.perf_counter() - t1
    cpu = cpu_spent(before, tree_cpu_seconds())
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()
  examples = timed * batch
  return {"timed_batches": timed, "examples_per_s": examples / wall, "cpu_s_per_example": cpu / examples,
          "examples_per_cpu_s": examples / cpu if cpu > 0 else float("nan"),
          "cpu_busy": cpu / wall, "first_batch_s": first_s, "timed_s": wall,
          "startup_cpu_s": cpu_spent(before_all, before)}


def worker_grid(threads: Sequence[int], processes: Sequence[int]) -> list[tuple[int, int]]:
  return [(t, p) for p in processes for t in threads]


def run_source(label: str, make_config: Callable[[int], Any], sizes: Sequence[int], args,
               grid: list[tuple[int, int]], extra: Callable[[int], dict] = lambda size: {},
               env: dict | None = None) -> list[dict]:
  rows = []
  for size in sizes:
    for threads, procs in grid:
      config = make_config(size)
      config.num_workers = threads
      config.prefetch = args.prefetch
      if procs:
        config.num_processes = procs
      warmup = args.warmup if args.warmup is not None else threads * max(1, procs) + args.prefetch
      try:
        result = measure(config, batch=args.batch, steps=args.steps, warmup=warmup,
                         min_seconds=args.min_seconds, **extra(size))
      except Exception as error:  # a broken configuration is a row, not the end of the run
        result = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
      row = {"part": "throughput", "source": label, "size": size, "threads": threads,
             "processes": procs, "batch": args.batch, "warmup": warmup,
             "cpu_cores": cpu_count(), **(env or {}), **result}
      rows.append(row)
      if "error" in row:
        print(f"  {label} {size}px threads={threads} processes={procs}: {row['error']}", flush=True)
      else:
        print(f"  {label} {size}px threads={threads} processes={procs}: "
              f"{row['examples_per_s']:.1f} ex/s, {row['examples_per_cpu_s']:.1f} ex/CPU-s, "
              f"first batch {row['first_batch_s']:.1f} s", flush=True)
  return rows


def part_images(args, grid) -> list[dict]:
  from var_jax.data import default_data_config
  folder = ensure_image_folder(args.data_root, args.num_images, args.num_classes)

  def make_config(size):
    c = default_data_config()
    c.source, c.data_dir, c.split, c.image_size = "folder", folder, "train", size
    return c

  return run_source("folder JPEG", make_config, args.sizes, args, grid)


def part_tfds(args, grid) -> list[dict]:
  from var_jax.data import default_data_config
  print(check_tfds_mock(), flush=True)
  folder = ensure_image_folder(args.data_root, args.num_images, args.num_classes)
  data_dir = ensure_tfds(args.data_root, folder)

  def make_config(size):
    c = default_data_config()
    c.source, c.name, c.data_dir, c.split, c.image_size = "tfds", "imagenet2012", data_dir, "train", size
    return c

  return run_source("tfds array_record", make_config, args.tfds_sizes, args, grid)


def part_tokens(args, grid) -> list[dict]:
  from var_jax.data import default_data_config
  dirs = {size: ensure_tokens(args.data_root, args.token_records, size)
          for size in args.token_layouts}
  version = token_writer_version()

  def make_config(size):
    c = default_data_config()
    c.source, c.data_dir, c.image_size = "pretokenized", dirs[size], size
    return c

  return run_source(f"tokens v{version}", make_config, args.token_layouts, args, grid,
                    extra=lambda size: {"patch_nums": PATCH_NUMS[size], "vocab_size": VOCAB_SIZE},
                    env={"token_records": args.token_records, "format_version": version})


# -- appetite ----------------------------------------------------------------------------------------

def _appetite_meta() -> dict:
  import jax
  try:
    import libtpu
    libtpu_version = getattr(libtpu, "__version__", "?")
  except ImportError:
    libtpu_version = None
  commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
  return {"about": "AOT train-step figures for bench_input.py's appetite "
                   "(python benchmarks/bench_input.py --part appetite --refresh-appetite)",
          "jax": jax.__version__, "libtpu": libtpu_version, "commit": commit,
          "date": time.strftime("%Y-%m-%d")}


def _store_program(entry: dict) -> None:
  """Merges one program's figures into APPETITE_JSON (replacing the same model and input), so
  that an interrupted refresh keeps what it compiled and several refreshes may run at once."""
  figures = {"programs": []}
  if os.path.exists(APPETITE_JSON):
    with open(APPETITE_JSON) as f:
      figures = json.load(f)
  figures.update(_appetite_meta())
  figures["programs"] = [p for p in figures.get("programs", [])
                         if (p["model"], p["input"]) != (entry["model"], entry["input"])] + [entry]
  figures["programs"].sort(key=lambda p: (list(TARGETS).index(p["model"]), p["input"]))
  os.makedirs(os.path.dirname(APPETITE_JSON), exist_ok=True)
  with open(APPETITE_JSON + ".tmp", "w") as f:
    json.dump(figures, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(APPETITE_JSON + ".tmp", APPETITE_JSON)


def compute_appetite(models: Sequence[str], inputs: Sequence[str]) -> None:
  """AOT-compiles each model's train step for its target slice (image and/or token input) and
  stores each program's figures in APPETITE_JSON as soon as it is done."""
  from var_jax import aot
  from var_jax.aot import report as aot_report
  from var_jax.train import config_lib
  if not aot.libtpu_available():
    raise SystemExit("--refresh-appetite needs libtpu (pip install 'var-jax[tpu]')")
  for model in models:
    depth, topology, why = TARGETS[model]
    for kind in inputs:
      config = config_lib.var_imagenet_config(depth, False, kind == "tokens")
      # d30/d36's fsdp 8 needs a split torus axis on v5p-128 (4x4x4; `loop.run` builds its mesh
      # without allowing one); the roofline does not model the collectives, so it is the same.
      mesh = aot.topology_mesh(topology, config.mesh, allow_split_physical_axes=True)
      chip = aot.chip_spec(topology)
      devices = list(mesh.devices.flat)
      hosts = len({d.process_index for d in devices})
      entry = {"model": model, "input": kind, "topology": topology, "why": why,
               "generation": chip.generation, "chips": len(devices), "hosts": hosts,
               "chips_per_host": len(devices) // hosts, "global_batch": config.global_batch_size,
               "image_size": config.data.image_size, "mesh": dict(mesh.shape),
               "allow_split_physical_axes": True, "peak_flops_per_chip": chip.peak_flops}
      print(f"compiling the {model} train step ({kind}) for {topology} ...", flush=True)
      t0 = time.perf_counter()
      try:
        rep = aot.train_step_report(config, mesh, chip, log=lambda m: print(f"  {m}", flush=True))
      except aot_report.DoesNotFitError as error:
        entry["error"] = str(error)
      else:
        rec = rep.record()
        entry.update(roofline_s=rec["roofline_s"], bound=rec["bound"],
                     cost_model_s=rec["cost_model_s"], model_flops=rec["model_flops"],
                     mfu_ceiling=rec["mfu_ceiling"], loop_corrected=rec["loop_corrected"],
                     live_gib=rec["live_bytes"] / 2**30, fits=rec["fits"])
      entry["wall_s"] = time.perf_counter() - t0
      print(f"  {json.dumps(entry)}", flush=True)
      _store_program(entry)


def load_appetite(args) -> dict | None:
  if args.refresh_appetite:
    compute_appetite(args.appetite_models, args.appetite_inputs)
  if not os.path.exists(APPETITE_JSON):
    print(f"no {APPETITE_JSON}: run with --part appetite --refresh-appetite for the appetite")
    return None
  with open(APPETITE_JSON) as f:
    return json.load(f)


def appetite_rows(figures: dict) -> list[dict]:
  """Examples/s per host each program consumes: at its roofline, and at REALISTIC_MFU."""
  rows = []
  for p in figures.get("programs", []):
    row = {k: p.get(k) for k in ("model", "input", "topology", "generation", "chips", "hosts",
                                 "global_batch", "image_size", "bound", "error")}
    if "roofline_s" in p:
      row["step_roofline_ms"] = p["roofline_s"] * 1e3
      row["appetite_roofline"] = p["global_batch"] / p["roofline_s"] / p["hosts"]
      if p.get("cost_model_s", -1) > 0:
        row["step_cost_model_ms"] = p["cost_model_s"] * 1e3
        row["appetite_cost_model"] = p["global_batch"] / p["cost_model_s"] / p["hosts"]
      mfu_step = p["model_flops"] / (p["chips"] * p["peak_flops_per_chip"] * REALISTIC_MFU)
      row["step_at_mfu_ms"] = mfu_step * 1e3
      row["appetite_at_mfu"] = p["global_batch"] / mfu_step / p["hosts"]
    vcpus = HOST_VCPUS.get(p.get("generation"), (None, ""))[0]
    row["host_vcpus"] = vcpus
    rows.append(row)
  return rows


# -- tables ------------------------------------------------------------------------------------------

def print_table(title: str, rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
  cells = [[h for h, _, _ in columns]]
  for row in rows:
    cells.append(["-" if row.get(k) is None else (format(row[k], f) if f else str(row[k]))
                  for _, k, f in columns])
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  print(f"\n== {title} ==")
  for i, r in enumerate(cells):
    print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    if i == 0:
      print("  ".join("-" * w for w in widths))
  print(flush=True)


def headroom(rows: list[dict], appetite: list[dict]) -> None:
  """Adds, per model whose input matches the row, appetite and measured (projected) / appetite."""
  by_key = {(a["model"], a["input"]): a for a in appetite if a.get("appetite_roofline")}
  for row in rows:
    if "error" in row:
      continue
    kind = "tokens" if row["source"].startswith("tokens") else "images"
    for model, size in MODEL_SIZE.items():
      a = by_key.get((model, kind))
      if a is None or size != row["size"]:
        continue
      vcpus = a["host_vcpus"]
      projected = row["examples_per_cpu_s"] * vcpus if vcpus else None
      row[f"{model}_appetite"] = a["appetite_roofline"]
      row[f"{model}_headroom_here"] = row["examples_per_s"] / a["appetite_roofline"]
      if projected is not None:
        row[f"{model}_projected"] = projected
        row[f"{model}_headroom_projected"] = projected / a["appetite_roofline"]
        row[f"{model}_headroom_projected_at_mfu"] = projected / a["appetite_at_mfu"]


def _int_list(text: str) -> list[int]:
  try:
    values = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
  if not values or any(v < 0 for v in values):
    raise argparse.ArgumentTypeError(f"expected non-negative ints, got {text!r}")
  return values


def _str_list(choices: Sequence[str]):
  def parse(text: str) -> list[str]:
    values = [t.strip() for t in text.split(",") if t.strip()]
    bad = [v for v in values if v not in choices]
    if not values or bad:
      raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
    return values
  return parse


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--part", type=_str_list(("images", "tfds", "tokens", "appetite")),
                 default=["images", "tfds", "tokens"],
                 help="comma-separated parts (default images,tfds,tokens; the appetite table is "
                      "printed whenever the cached figures exist)")
  p.add_argument("--data-root", default=DEFAULT_ROOT, help=f"generated data (default {DEFAULT_ROOT})")
  p.add_argument("--sizes", type=_int_list, default=[256, 512], help="image sizes (default 256,512)")
  p.add_argument("--tfds-sizes", type=_int_list, default=[256], help="tfds image sizes (default 256)")
  p.add_argument("--token-layouts", type=_int_list, default=[256],
                 help="token layouts by image size: 256 = d16's patch_nums (L=680), 512 = d36's "
                      "(L=2240) (default 256)")
  p.add_argument("--threads", type=_int_list, default=[1, 2, 4], help="data.num_workers (default 1,2,4)")
  p.add_argument("--processes", type=_int_list, default=[0, 1, 2],
                 help="data.num_processes, where the config has it (default 0,1,2)")
  p.add_argument("--batch", type=int, default=32, help="examples per batch (default 32)")
  p.add_argument("--steps", type=int, default=20,
                 help="timed batches per measurement, at least (default 20)")
  p.add_argument("--min-seconds", type=float, default=4.0,
                 help="timed seconds per measurement, at least (default 4)")
  p.add_argument("--warmup", type=int, default=None,
                 help="untimed batches after the first (default threads x processes + prefetch)")
  p.add_argument("--prefetch", type=int, default=2, help="data.prefetch (default 2)")
  p.add_argument("--num-images", type=int, default=4000, help="generated JPEGs (default 4000)")
  p.add_argument("--num-classes", type=int, default=100, help="their classes (default 100)")
  p.add_argument("--token-records", type=int, default=20_000,
                 help="synthetic pre-tokenized records (default 20000)")
  p.add_argument("--refresh-appetite", action="store_true",
                 help=f"recompile the train steps and rewrite {os.path.relpath(APPETITE_JSON, REPO)}")
  p.add_argument("--reprint", metavar="OUTPUT",
                 help="measure nothing: print the tables of an earlier run's saved output (its "
                      "JSON lines) against the appetite cached now")
  p.add_argument("--appetite-models", type=_str_list(tuple(TARGETS)), default=list(TARGETS))
  p.add_argument("--appetite-inputs", type=_str_list(("images", "tokens")),
                 default=["images", "tokens"])
  return p.parse_args(argv)


def run(argv=None) -> int:
  args = parse_args(argv)
  processes = args.processes if has_num_processes() else [0]
  if processes != args.processes:
    print("this checkout's data config has no num_processes: threads only")
  grid = worker_grid([t for t in args.threads if t > 0], processes)
  import jax
  print(f"environment: {cpu_count()} CPU cores (this machine; the figures per core scale to a TPU "
        f"host's vCPUs, see the projected columns), jax {jax.__version__}, python "
        f"{sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}", flush=True)
  rows: list[dict] = []
  if args.reprint:  # an earlier run's throughput lines, against the appetite cached now
    with open(args.reprint) as f:
      rows = [json.loads(line) for line in f if line.startswith('{"part": "throughput"')]
    args.part = []
  if "images" in args.part:
    rows += part_images(args, grid)
  if "tfds" in args.part:
    rows += part_tfds(args, grid)
  if "tokens" in args.part:
    rows += part_tokens(args, grid)
  figures = load_appetite(args) if ("appetite" in args.part or rows or args.refresh_appetite) else None
  appetite = appetite_rows(figures) if figures else []
  if appetite:
    print_table(
        f"appetite: examples/s per host the train steps consume (cached {figures.get('date')}, "
        f"commit {figures.get('commit')}, jax {figures.get('jax')})", appetite,
        [("model", "model", ""), ("input", "input", ""), ("slice", "topology", ""),
         ("chips", "chips", "d"), ("hosts", "hosts", "d"), ("vCPUs/host", "host_vcpus", "d"),
         ("batch", "global_batch", "d"), ("px", "image_size", "d"),
         ("roofline ms", "step_roofline_ms", ".1f"), ("bound", "bound", ""),
         ("ex/s/host @roofline", "appetite_roofline", ",.0f"),
         (f"ms @{REALISTIC_MFU:.0%} MFU", "step_at_mfu_ms", ".1f"),
         (f"ex/s/host @{REALISTIC_MFU:.0%} MFU", "appetite_at_mfu", ",.0f"),
         ("cost model ms", "step_cost_model_ms", ".1f"), ("error", "error", "")])
    for a in appetite:
      print(json.dumps({"part": "appetite", **a}))
    for gen, (vcpus, source) in HOST_VCPUS.items():
      print(f"host vCPUs {gen}: {vcpus} ({source})")
  if rows:
    headroom(rows, appetite)
    columns = [("source", "source", ""), ("px", "size", "d"), ("threads", "threads", "d"),
               ("procs", "processes", "d"), ("ex/s here", "examples_per_s", ",.1f"),
               ("ex/CPU-s", "examples_per_cpu_s", ",.1f"), ("CPU busy", "cpu_busy", ".2f"),
               ("1st batch s", "first_batch_s", ".1f")]
    for model in MODEL_SIZE:
      columns += [(f"{model} appetite", f"{model}_appetite", ",.0f"),
                  (f"{model} here/app", f"{model}_headroom_here", ".3f"),
                  (f"{model} proj/app", f"{model}_headroom_projected", ".2f")]
    print_table(f"throughput per host through make_input_iterator (batch {args.batch}; this machine "
                f"has {cpu_count()} cores; proj = ex/CPU-s x the target host's vCPUs; appetite at "
                "the roofline)", rows, columns + [("error", "error", "")])
    for row in rows:
      print(json.dumps(row))
  return 0


if __name__ == "__main__":
  sys.exit(run())
