"""`var-jax sample`: class-conditional samples to a PNG grid, or one PNG per image plus an ADM
sample-batch .npz. Image i of the command is drawn with fold_in(seed key, i): the images do not
depend on --batch-size, the device count or the number of hosts; on a pod each host samples its
own contiguous share and writes it once."""
from __future__ import annotations

import sys
import time

from var_jax.cli import common
from var_jax.parallel.distributed import host_share
from var_jax.errors import InputError

PROG = "var-jax sample"


def add_sampling_flags(p) -> None:
  """The flags `sample` and `edit` share: the model and the sampler's options."""
  p.add_argument("--model", default=common.DEFAULT_MODEL,
                 help="shapes-tiny (shipped), d16|d20|d24|d30|d36 (released), or a converted directory")
  common.add_sampler_flags(p)


# Images per device in one sampling call when --batch-size is 0: what a 16 GB chip holds for
# VAR-d16 at 256 px with guidance (AOT: batch 8 on one v5e chip lives in 5.1 GiB, weights included),
# and a few on CPU, where larger batches gain nothing and cost memory.
PER_DEVICE_BATCH = {"cpu": 4, "gpu": 16, "tpu": 16}


def default_batch(mesh) -> int:
  """Images per call: PER_DEVICE_BATCH of the platform x the mesh's batch shards."""
  from var_jax.inference import placement
  platform = mesh.devices.flat[0].platform
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  return PER_DEVICE_BATCH.get(platform, 4) * placement.batch_shards(mesh)


def cmd_sample(args) -> int:
  import jax
  import numpy as np
  from tqdm import tqdm
  from var_jax.inference import images as image_io
  from var_jax.inference.placement import sampling_mesh
  from var_jax.inference.filters import check_sampling_options
  from var_jax.inference.sampler import sample

  if args.per_class < 1 or args.batch_size < 0:
    raise InputError(f"--per-class must be >= 1 and --batch-size >= 0, got {args.per_class} and {args.batch_size}.")
  common.check_output_file(args.out, "--out", remote_ok=False)
  common.check_output_dir(args.out_dir, "--out-dir", remote_ok=False)
  from var_jax.parallel.distributed import maybe_initialize_distributed
  maybe_initialize_distributed("auto")  # every host of a pod joins before any JAX call
  model = common.load_model(args.model, args.dtype, args.tokenizer_dtype)
  refiner, draft_scales = common.load_refiner(args.refiner, args.draft_scales, model, args.dtype,
                                              args.tokenizer_dtype)
  classes = args.classes if args.classes is not None else list(range(model.config.num_classes))
  model.check_labels(np.asarray(classes), allow_null=False)
  check_sampling_options(model, args.cfg, args.top_k, args.top_p)
  mesh = sampling_mesh(*args.mesh)
  labels = np.repeat(np.asarray(classes, np.int64), args.per_class)
  # Global image i is drawn with key fold_in(seed key, i): the images do not depend on
  # --batch-size, the device count or the number of hosts; each host samples its own share.
  mine = host_share(len(labels), jax.process_index(), jax.process_count())
  batch = min(args.batch_size or default_batch(mesh), max(len(mine), 1))
  key = jax.random.key(args.seed)
  outputs = []
  bar = tqdm(total=len(mine), unit="img", desc="sampling (compiling)", disable=jax.process_index() > 0)
  t_start, n_timed = None, 0
  for start in range(mine.start, mine.stop, batch):
    idx = np.arange(start, min(start + batch, mine.stop))
    padded = np.concatenate([idx, np.full(batch - len(idx), idx[-1])])  # one shape: one compile
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(padded.astype(np.uint32))
    imgs = sample(model, labels[padded], rng=keys, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                  more_smooth=args.more_smooth, mesh=mesh, refiner=refiner,
                  draft_scales=draft_scales)
    outputs.append(np.asarray(imgs)[:len(idx)])
    if t_start is None:
      t_start = time.perf_counter()  # rates after the first (compiling) call
      bar.set_description("sampling")
    else:
      n_timed += len(idx)
    bar.update(len(idx))
  bar.close()
  images = np.concatenate(outputs) if outputs else np.zeros((0,) * 4, np.uint8)
  index = np.arange(mine.start, mine.stop)
  elapsed = time.perf_counter() - t_start if t_start else 0.0
  rate = (f"{n_timed / elapsed:.2f} images/s after compile" if n_timed and elapsed > 0
          else "(one call: no rate without the compile)")
  host = f" (this host: {len(images)})" if jax.process_count() > 1 else ""
  n_classes = f"{len(classes)} class{'es' if len(classes) != 1 else ''}"
  print(f"sampled {len(labels)} images of {n_classes}{host} in calls of {batch}, {rate}")
  if args.out and jax.process_index() == 0:
    ncols = args.per_class if args.per_class > 1 else None
    path = image_io.save_png(image_io.make_grid(images, ncols=ncols), args.out)
    print(f"wrote the sample grid{' of host 0' if host else ''} to {common.shown(path)}")
  if args.out_dir:
    import pathlib
    out_dir = pathlib.Path(args.out_dir)
    for i, img in zip(index, images):
      image_io.save_png(img, out_dir / f"{i:06d}_class{labels[i]}.png")
    name = "samples.npz" if jax.process_count() == 1 else f"samples_process{jax.process_index()}.npz"
    npz = image_io.save_npz_batch(images, out_dir / name)
    print(f"wrote {len(images)} PNGs and {pathlib.Path(npz).name} (arr_0: uint8 {images.shape}) to {common.shown(out_dir)}")
  if args.model == common.DEFAULT_MODEL:
    print("This is the small model shipped with var-jax (10 synthetic shape classes). For ImageNet "
          "models use --model d16 (or d20, d24, d30, d36): released weights download from the "
          "Hugging Face hub (FoundationVision/var) on first use; see README.md.")
  return 0


def build_parser():
  p = common.new_parser(PROG, __doc__)
  add_sampling_flags(p)
  p.add_argument("--classes", type=common.int_list("--classes", "207,360,388"), default=None,
                 help="class ids, e.g. 207,360,388 (default: all)")
  p.add_argument("--per-class", type=int, default=4, help="images of each class")
  p.add_argument("--batch-size", type=int, default=0,
                 help="images per jitted call (0: %s per device of the mesh's batch axes)"
                 % ", ".join(f"{v} on {k.upper()}" for k, v in PER_DEVICE_BATCH.items()))
  p.add_argument("--out", default="samples.png", help="PNG grid path ('' to skip)")
  p.add_argument("--out-dir", default=None, help="also write one PNG per image and samples.npz here")
  common.add_refiner_flags(p)
  return p


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  return cmd_sample(build_parser().parse_args(argv[1:]))
