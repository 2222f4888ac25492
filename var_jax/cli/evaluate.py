"""`var-jax evaluate`: FID, sFID, Inception Score, precision and recall as OpenAI's ADM evaluator
computes them (the numbers VAR's paper reports), of a model or of an ADM sample batch.

  var-jax evaluate --model d16 --num-samples 50000 --cfg 1.5 --top-k 900 --top-p 0.96 \\
      --ref VIRTUAL_imagenet256_labeled.npz --fid-inception pt_inception-2015-12-05-6726825d.pth \\
      --out d16.json
  var-jax evaluate --sample-batch samples.npz --ref REF.npz --fid-inception W.pth --out R.json

With --model, images are sampled class-balanced (image i: class i % num_classes, key
fold_in(seed, i)) over every device of every host, and their Inception features are taken on the
devices right behind the sampler. Features are saved in chunks under --features-dir: a run that
stops continues where it left off when started again with the same flags. --save-samples also
writes the images as an ADM sample batch, for the official evaluator.

Models of the synthetic shapes data (e.g. the shipped shapes-tiny) also get class consistency (a
pixel classifier tells each sample's class) and tokenizer reconstruction PSNR; those two need no
Inception weights, so `var-jax evaluate` alone runs offline.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from var_jax.cli import common
from var_jax.errors import InputError

PROG = "var-jax evaluate"
# Images per device in one feature call of --sample-batch (the Inception network at 299 px).
FEATURE_BATCH_PER_DEVICE = 32


def build_parser():
  from var_jax.cli.sample import PER_DEVICE_BATCH
  p = common.new_parser(PROG, __doc__)
  what = p.add_mutually_exclusive_group()
  what.add_argument("--model", default=None,
                    help="a model to sample: shapes-tiny, d16..d36, a converted directory or a "
                         "training workdir (default: shapes-tiny)")
  what.add_argument("--sample-batch", default=None, metavar="S.npz",
                    help="evaluate these images instead (ADM sample batch: arr_0, uint8 N x H x W x 3)")
  p.add_argument("--ref", default=None, metavar="REF.npz",
                 help="reference batch: ADM's (e.g. VIRTUAL_imagenet256_labeled.npz) or one "
                      "written by `var-jax fid-stats`")
  p.add_argument("--fid-inception", default=None, metavar="W.pth",
                 help="pytorch-fid's FID Inception weights, pt_inception-2015-12-05-6726825d.pth "
                      "(a local file)")
  p.add_argument("--out", default=None, metavar="R.json", help="write the results here (JSON)")
  s = p.add_argument_group("sampling (--model)")
  s.add_argument("--num-samples", type=common.positive_int, default=50_000)
  common.add_sampler_flags(s)
  common.add_refiner_flags(s)
  s.add_argument("--batch-size", type=int, default=0,
                 help="images per sampling call over all local devices (0: %s per device)"
                 % ", ".join(f"{v} on {k.upper()}" for k, v in PER_DEVICE_BATCH.items()))
  s.add_argument("--features-dir", default=None,
                 help="where the features are saved in chunks (resumable); default: next to "
                      "--out, else ./evaluation_features")
  s.add_argument("--save-samples", default=None, metavar="S.npz",
                 help="also write the samples as an ADM sample batch")
  s.add_argument("--psnr-images", type=int, default=500,
                 help="shapes models: held-out images for the tokenizer PSNR (0: skip)")
  p.add_argument("--inception-dtype", choices=("float32", "bfloat16"), default="float32",
                 help="the Inception network's compute dtype (bfloat16: faster, see README)")
  return p


def _check_args(args) -> None:
  # The metrics, the sample batch and the features go through pathlib / numpy: local disk only.
  common.check_output_file(args.out, "--out", remote_ok=False)
  common.check_output_file(args.save_samples, "--save-samples", remote_ok=False)
  common.check_output_dir(args.features_dir, "--features-dir", remote_ok=False)
  if args.sample_batch and args.save_samples:
    raise InputError("--save-samples goes with --model (the images of --sample-batch are already a batch).")
  if bool(args.ref) != bool(args.fid_inception):
    raise InputError("--ref and --fid-inception go together: the reference batch's features are "
                     "those of that network.")
  if args.sample_batch and not args.ref:
    raise InputError("--sample-batch needs --ref and --fid-inception.")
  if args.batch_size < 0 or args.psnr_images < 0:
    raise InputError("--batch-size and --psnr-images must be >= 0.")


def _features_dir(args) -> pathlib.Path:
  if args.features_dir:
    return pathlib.Path(args.features_dir)
  if args.out:
    out = pathlib.Path(args.out)
    return out.with_name(out.stem + ".features")
  return pathlib.Path("evaluation_features")


def _reference(args, extract, features_dir: pathlib.Path):
  """The reference batch; features of an image-only (ADM) batch are computed once and kept."""
  import jax
  import numpy as np
  from var_jax.eval import adm
  ref_path = os.path.abspath(os.path.expanduser(args.ref))
  cache = features_dir / "reference_features.npz"
  stat = os.stat(ref_path) if os.path.isfile(ref_path) else None
  tag = f"{ref_path}|{stat.st_size}|{int(stat.st_mtime)}|{args.inception_dtype}" if stat else ""
  if cache.is_file():
    with np.load(cache, allow_pickle=False) as data:
      if str(data["tag"]) == tag:
        return adm.Reference(**{k: data[k] for k in adm.STAT_KEYS},
                             pool_features=data[adm.POOL_KEY], source=ref_path)
  print(f"reading the reference batch {common.shown(ref_path)}", flush=True)
  ref = adm.read_reference(ref_path, extract)
  if jax.process_index() == 0:
    features_dir.mkdir(parents=True, exist_ok=True)
    with open(cache.with_suffix(".tmp"), "wb") as f:
      np.savez(f, tag=np.asarray(tag), **{k: getattr(ref, k) for k in adm.STAT_KEYS},
               **{adm.POOL_KEY: ref.pool_features})
    os.replace(cache.with_suffix(".tmp"), cache)
  return ref


def _print_metrics(result: dict) -> None:
  if "fid" in result:
    score = result["inception_score"]
    is_text = f"{score:.2f}" if score is not None else "n/a (the weights file has no classifier)"
    print(f"FID {result['fid']:.4f}   sFID {result['sfid']:.4f}   IS {is_text}"
          f"   precision {result['precision']:.4f}   recall {result['recall']:.4f}"
          f"   ({result['num_samples']} samples vs {result['num_reference_images']} reference "
          "images)")
  if "class_consistency" in result:
    print(f"class consistency: {result['class_consistency']:.2%} of {result['num_samples']} samples")
    for name, acc in result["per_class"].items():
      print(f"  {name:14s} {acc:.2%}")
  if "reconstruction_psnr_db" in result:
    print(f"tokenizer reconstruction PSNR on {result['settings']['psnr_images']} held-out images: "
          f"{result['reconstruction_psnr_db']:.2f} dB")


def _evaluate_sample_batch(args, network) -> dict:
  from var_jax.eval import adm
  from var_jax.inference.placement import batch_shards, sampling_mesh
  mesh = sampling_mesh()
  shards = batch_shards(mesh)
  count, _ = adm.iter_image_batches(args.sample_batch, 1)  # checks the file before the reference
  per_call = min(FEATURE_BATCH_PER_DEVICE, -(-count // shards)) * shards
  extract = adm.ADMFeatures(network, batch_size=per_call, mesh=mesh)
  features_dir = _features_dir(args)
  reference = _reference(args, extract, features_dir)
  count, batches = adm.iter_image_batches(args.sample_batch, extract.batch_size)
  print(f"computing the features of {count} images of {common.shown(args.sample_batch)}", flush=True)
  t0 = time.perf_counter()
  pool, spatial = adm.compute_features(batches, extract)
  seconds = time.perf_counter() - t0
  result = adm.metrics(pool, spatial, reference, network.classifier_DK)
  result["settings"] = dict(sample_batch=common.shown(args.sample_batch))
  result["timing"] = dict(features_s=round(seconds, 2), images_per_s=round(count / seconds, 2))
  return result


def _evaluate_model(args, network) -> dict | None:
  import jax
  import numpy as np
  from tqdm import tqdm
  from var_jax.cli.sample import default_batch
  from var_jax.data import shapes
  from var_jax.eval import adm, generation, sample_features as sf
  from var_jax.inference.filters import check_sampling_options
  from var_jax.inference.placement import sampling_mesh
  name = args.model or common.DEFAULT_MODEL
  features_dir = _features_dir(args)
  mesh = sampling_mesh(*args.mesh)
  batch = args.batch_size or default_batch(mesh)
  extract = adm.ADMFeatures(network, batch_size=batch, mesh=mesh) if network else None
  # Only host 0 computes the metrics: it alone reads the reference (and, for an image-only ADM
  # batch, computes its features once).
  reference = (_reference(args, extract, features_dir)
               if network and jax.process_index() == 0 else None)
  if network is not None and args.num_samples <= 3:
    raise InputError(f"--num-samples must be > 3 for precision and recall, got {args.num_samples}.")
  model = common.load_model(name, args.dtype, args.tokenizer_dtype)
  check_sampling_options(model, args.cfg, args.top_k, args.top_p)
  refiner, draft_scales = common.load_refiner(args.refiner, args.draft_scales, model, args.dtype,
                                              args.tokenizer_dtype)
  is_shapes = model.config.num_classes == shapes.NUM_CLASSES and model.tokenizer.config.image_size == 64
  if network is None and not is_shapes:
    raise InputError("FID and the other ADM metrics need --ref REF.npz and --fid-inception W.pth "
                     "(see README: Reproducing the paper's numbers).")
  settings = sf.SamplingSettings(
      model=common.shown(name) if os.path.exists(name) else name, num_samples=args.num_samples,
      seed=args.seed, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
      more_smooth=args.more_smooth, batch=batch, inception_dtype=args.inception_dtype,
      refiner=(common.shown(args.refiner) if os.path.exists(args.refiner) else args.refiner)
      if refiner is not None else "",
      draft_scales=draft_scales if refiner is not None else -1)
  keep_images = is_shapes or bool(args.save_samples)
  share = sf.host_share(args.num_samples, jax.process_index(), jax.process_count())
  writer = None
  if args.save_samples:
    path = pathlib.Path(args.save_samples)
    if jax.process_count() > 1:
      path = path.with_name(f"{path.stem}_process{jax.process_index()}{path.suffix}")
    size = model.tokenizer.config.image_size
    writer = sf.SampleBatchWriter(path, len(share), (size, size, 3))
  bar = tqdm(total=len(share), unit="img", desc="sampling + features", disable=jax.process_index() > 0)
  chunks, t0 = [], time.perf_counter()
  for chunk in sf.sample_features(model, settings, extract, mesh=mesh, chunk_dir=features_dir,
                                  keep_images=keep_images, progress=bar.update, refiner=refiner):
    if writer is not None:
      writer.write(chunk["images"])
    chunks.append(chunk if is_shapes else {k: v for k, v in chunk.items() if k != "images"})
  bar.close()
  seconds = time.perf_counter() - t0
  if writer is not None:
    print(f"wrote the ADM sample batch {common.shown(writer.close())} ({len(share)} images)")
  local = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
  result = {"num_samples": args.num_samples}
  if network is not None:
    pool = sf.gather(local["pool"])
    spatial = sf.gather(local["spatial"])
    if jax.process_index() == 0:
      result.update(adm.metrics(pool, spatial, reference, network.classifier_DK))
  if is_shapes:
    images = sf.gather(local["images"])
    labels = sf.class_balanced_labels(args.num_samples, model.config.num_classes)
    result.update(generation.class_consistency(images, labels))
    if args.psnr_images:
      result["reconstruction_psnr_db"] = generation.reconstruction_psnr(
          model.tokenizer, num_images=args.psnr_images, batch_size=min(batch, 64))
  result["settings"] = dict(vars(args), model=settings.model, batch_size=batch,
                            features_dir=common.shown(features_dir))
  result["timing"] = dict(sampling_and_features_s=round(seconds, 2),
                          images_per_s_this_host=round(len(share) / max(seconds, 1e-9), 2))
  return result if jax.process_index() == 0 else None


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  args = build_parser().parse_args(argv[1:])
  _check_args(args)
  from var_jax.parallel.distributed import maybe_initialize_distributed
  maybe_initialize_distributed("auto")  # every host of a pod joins before any JAX call
  network = None
  if args.fid_inception:  # read the weights before anything long
    import jax.numpy as jnp
    from var_jax.eval import inception
    network = inception.load_adm_inception(args.fid_inception, dtype=jnp.dtype(args.inception_dtype))
  if args.sample_batch:
    result = _evaluate_sample_batch(args, network)
  else:
    result = _evaluate_model(args, network)
  if result is None:  # hosts other than 0
    return 0
  if args.ref:
    result["reference"] = common.shown(args.ref)
    result["fid_inception"] = common.shown(args.fid_inception)
  _print_metrics(result)
  if args.out:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {common.shown(out)}")
  return 0
