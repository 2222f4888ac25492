"""`var-jax evaluate`: class consistency of samples, tokenizer reconstruction PSNR, optional FID.

For models of the synthetic shapes data (e.g. the shipped `shapes-tiny`), a deterministic pixel
classifier (`var_jax.data.shapes.classify`) tells each sample's class; class consistency is the
share of samples classified as the class they were generated for. Reconstruction PSNR is measured
on held-out generated images (a seed the training data never used).

With --fid-inception (pytorch-fid's FID Inception weights, a local file) it also reports the
tokenizer's reconstruction FID (rFID: held-out images vs their reconstructions) and the FID of the
samples against --fid-ref-stats (an .npz of mu and sigma) or, without it, the held-out images.
"""
from __future__ import annotations

import json
import sys

from var_jax.cli import common
from var_jax.errors import InputError

PROG = "var-jax evaluate"


def build_parser():
  parser = common.new_parser(PROG, __doc__)
  parser.add_argument("--model", default="shapes-tiny")
  parser.add_argument("--per-class", type=int, default=50)
  parser.add_argument("--batch-size", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cfg", type=float, default=1.5)
  parser.add_argument("--top-k", type=int, default=900)
  parser.add_argument("--top-p", type=float, default=0.96)
  parser.add_argument("--psnr-images", type=int, default=500)
  parser.add_argument("--fid-inception", default=None, metavar="PATH",
                      help="pytorch-fid's FID Inception weights, a local file "
                           "(pt_inception-2015-12-05-6726825d.pth): also report rFID and sample FID")
  parser.add_argument("--fid-ref-stats", default=None, metavar="PATH.npz",
                      help="reference statistics (arrays mu, sigma) for the sample FID; default: "
                           "the held-out images")
  parser.add_argument("--fid-images", type=int, default=500, help="held-out images for rFID")
  parser.add_argument("--json", default=None, help="also write the results here")
  return parser


def main(argv=None) -> int:
  from var_jax.eval import fid, inception
  from var_jax.eval.generation import class_consistency, reconstruction_fid, reconstruction_psnr
  argv = list(sys.argv if argv is None else argv)
  parser = build_parser()
  args = parser.parse_args(argv[1:])
  common.check_output_file(args.json, "--json")
  if args.fid_ref_stats and not args.fid_inception:
    raise InputError("--fid-ref-stats needs --fid-inception (the network the statistics are of).")
  image_features = ref_stats = sample_stats = None
  if args.fid_inception:  # read the files before the long sampling run
    if args.fid_images < 2:
      raise InputError(f"--fid-images must be >= 2, got {args.fid_images}.")
    if args.fid_ref_stats:
      ref_stats = fid.load_stats(args.fid_ref_stats)
      if ref_stats[0].shape != (inception.FEATURE_DIM,):
        raise InputError(f"--fid-ref-stats {args.fid_ref_stats!r} has {ref_stats[0].shape[0]}-d "
                         f"statistics; FID Inception features are {inception.FEATURE_DIM}-d.")
    image_features = inception.make_image_features(
        *inception.load_fid_inception(args.fid_inception), args.batch_size)
    sample_stats = fid.FeatureStats(inception.FEATURE_DIM)
  model = common.load_model(args.model)
  result = class_consistency(model, per_class=args.per_class, seed=args.seed, batch_size=args.batch_size,
                             cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                             on_images=(lambda images: sample_stats.update(image_features(images)))
                             if image_features else None)
  result["reconstruction_psnr_db"] = reconstruction_psnr(model.tokenizer, num_images=args.psnr_images,
                                                         batch_size=args.batch_size)
  result["settings"] = dict(model=args.model, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                            per_class=args.per_class, seed=args.seed)
  print(f"class consistency: {result['class_consistency']:.2%} of {result['num_samples']} samples "
        f"(cfg {args.cfg}, top-k {args.top_k}, top-p {args.top_p})")
  for name, acc in result["per_class"].items():
    print(f"  {name:14s} {acc:.2%}")
  print(f"tokenizer reconstruction PSNR on {args.psnr_images} held-out images: "
        f"{result['reconstruction_psnr_db']:.2f} dB")
  if image_features is not None:
    rfid, held_out_stats = reconstruction_fid(model.tokenizer, image_features,
                                              num_images=args.fid_images,
                                              batch_size=args.batch_size)
    reference = args.fid_ref_stats or f"{args.fid_images} held-out images"
    sample_fid = fid.frechet_distance(*(held_out_stats if ref_stats is None else ref_stats),
                                      *sample_stats.stats())
    result.update(reconstruction_rfid=rfid, sample_fid=sample_fid, fid_reference=reference)
    print(f"tokenizer reconstruction FID on {args.fid_images} held-out images: {rfid:.3f}")
    print(f"sample FID of {sample_stats.count} samples against {reference}: {sample_fid:.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0
