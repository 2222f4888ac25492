"""`var-jax fid-stats`: a reference batch for `var-jax evaluate --ref`, from images.

  var-jax fid-stats --images DIR --fid-inception W.pth --out REF.npz
  var-jax fid-stats --tfds imagenet2012:validation --fid-inception W.pth --out REF.npz
  var-jax fid-stats --sample-batch X.npz --fid-inception W.pth --out REF.npz
  var-jax fid-stats --shapes 10000 --fid-inception W.pth --out shapes_ref.npz

The file holds mu, sigma (pool3), mu_s, sigma_s (sFID's spatial features), as ADM's reference
batches do, and pool_features (N, 2048) for precision and recall. Images that are not
--image-size square are centre-cropped as ADM built its reference batches. ADM's own reference
batches (VIRTUAL_imagenet256_labeled.npz, ...) need no conversion: pass them to --ref as they are.
"""
from __future__ import annotations

import sys
import time

from var_jax.cli import common
from var_jax.errors import InputError

PROG = "var-jax fid-stats"


def build_parser():
  p = common.new_parser(PROG, __doc__)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--images", metavar="DIR", help="a folder of images (searched recursively)")
  src.add_argument("--tfds", metavar="NAME:SPLIT", help="a TFDS split, e.g. imagenet2012:validation")
  src.add_argument("--sample-batch", metavar="X.npz", help="an ADM batch (arr_0: uint8 N x H x W x 3)")
  src.add_argument("--shapes", type=common.positive_int, metavar="N",
                   help="the first N images of the synthetic shapes data set (--shapes-seed)")
  p.add_argument("--fid-inception", required=True, metavar="W.pth",
                 help="pytorch-fid's FID Inception weights (pt_inception-2015-12-05-6726825d.pth)")
  p.add_argument("--out", required=True, metavar="REF.npz")
  p.add_argument("--image-size", type=common.positive_int, default=256,
                 help="side of the square images (folder / TFDS images are centre-cropped to it; "
                      "shapes are rendered at it)")
  p.add_argument("--max-images", type=common.positive_int, default=None,
                 help="use at most this many images of --images / --tfds")
  p.add_argument("--tfds-data-dir", default="", help="TFDS data_dir (default: $TFDS_DATA_DIR)")
  p.add_argument("--shapes-seed", type=int, default=0,
                 help="seed of the shapes data set (the shipped model trained on seed 0; "
                      "var_jax.eval.generation.HELD_OUT_SEED names images no training used)")
  p.add_argument("--with-images", action="store_true",
                 help="also store the images (arr_0): a complete ADM reference batch that the "
                      "official evaluator reads, and a sample batch for `evaluate --sample-batch` "
                      "(N x S x S x 3 bytes, held in memory)")
  p.add_argument("--batch-size", type=common.positive_int, default=64)
  p.add_argument("--inception-dtype", choices=("float32", "bfloat16"), default="float32")
  return p


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  args = build_parser().parse_args(argv[1:])
  common.check_output_file(args.out, "--out", remote_ok=False)  # adm.write_reference: local disk
  import jax.numpy as jnp
  import numpy as np
  from var_jax.eval import adm, inception, reference_images
  from var_jax.inference.placement import batch_shards, sampling_mesh
  network = inception.load_adm_inception(args.fid_inception, dtype=jnp.dtype(args.inception_dtype))
  if args.images:
    count, batches = reference_images.folder_batches(args.images, args.image_size, args.batch_size,
                                                     args.max_images)
    what = common.shown(args.images)
  elif args.tfds:
    count, batches = reference_images.tfds_batches(args.tfds, args.image_size, args.batch_size,
                                                   args.max_images, data_dir=args.tfds_data_dir)
    what = f"TFDS {args.tfds}"
  elif args.sample_batch:
    count, batches = adm.iter_image_batches(args.sample_batch, args.batch_size)
    what = common.shown(args.sample_batch)
  else:
    count, batches = reference_images.shapes_batches(args.shapes, args.image_size, args.batch_size,
                                                     seed=args.shapes_seed)
    what = f"the shapes data set (seed {args.shapes_seed}, {args.image_size} px)"
  if count < 4:
    raise InputError(f"A reference batch needs at least 4 images (precision/recall use 3 "
                     f"neighbours); {what} has {count}.")
  mesh = sampling_mesh()
  shards = batch_shards(mesh)
  per_call = -(-min(args.batch_size, count) // shards) * shards  # a multiple of the devices
  extract = adm.ADMFeatures(network, batch_size=per_call, mesh=mesh)
  print(f"computing the features of {count} images of {what}", flush=True)
  t0 = time.perf_counter()
  kept = []
  if args.with_images:
    batches = (kept.append(b) or b for b in batches)
  pool, spatial = adm.compute_features(batches, extract)
  seconds = time.perf_counter() - t0
  path = adm.write_reference(args.out, pool, spatial, np.concatenate(kept) if kept else None)
  print(f"wrote {common.shown(path)}: mu, sigma, mu_s, sigma_s and pool_features"
        f"{' and the images' if kept else ''} of {len(pool)} images ({len(pool) / seconds:.1f} "
        "images/s)")
  return 0
