"""What an ADM evaluation (`var-jax evaluate`) costs: images/s of sampling + Inception features on
this machine, the effect of a bfloat16 Inception on the metrics, and the AOT cost of a 50,000-image
VAR-d16 evaluation on TPU slices.

  python benchmarks/bench_evaluate.py --part cpu                  # shapes-tiny, random Inception
  python benchmarks/bench_evaluate.py --part cpu --fid-inception W.pth --num-images 1000
  python benchmarks/bench_evaluate.py --part aot --topology v5e-8 --topology v5p-32

cpu: times `var_jax.eval.sample_features.sample_features`, the engine of `var-jax evaluate`
(sampling, then the features of each batch on the devices it was sampled on), after a first
(compiling) call, split into sampling alone, features alone and both; then the features of the
same samples and of a shapes reference in float32 and bfloat16, and every metric with each.
Without --fid-inception the Inception weights are random (pytorch-fid's layout), so the bf16
figures say little about real FIDs; pass real weights for those.

aot: the d16 sampler (`aot.compile_sampler`, through `lower_sample`: the public call's placement,
loop-corrected FLOPs) and the feature program (`ADMFeatures.lower`: the jitted program
`device_features` runs) compiled for the slice from abstract inputs, each call's roofline (max of
FLOPs / peak and bytes / HBM bandwidth, per chip) and the TPU cost model's estimate, and
50,000 / batch calls of both: a lower bound on the evaluation's device time (the host work, the
metrics and the reference's features come on top; the metrics take ~1-2 minutes on a host CPU).
JSON lines (starting with `{`) follow each table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def _random_weights(path: str) -> str:
  from test_fid import random_state_dict, write_pth  # the suite's random weights, torch-free
  import pathlib
  return str(write_pth(pathlib.Path(path), random_state_dict(0)))


def cpu_part(args) -> None:
  from var_jax.eval import adm, inception, reference_images, sample_features as sf
  from var_jax.inference.placement import sampling_mesh
  from var_jax.inference.pretrained import load_pretrained
  weights = args.fid_inception or _random_weights(os.path.join(tempfile.mkdtemp(), "w.pth"))
  model = load_pretrained("shapes-tiny")
  mesh = sampling_mesh()
  batch = args.batch
  n = args.num_images
  rows = []
  for dtype in ("float32", "bfloat16"):
    network = inception.load_adm_inception(weights, dtype=jnp.dtype(dtype))
    extract = adm.ADMFeatures(network, batch_size=batch, mesh=mesh)
    for mode in (("sampling", None), ("sampling+features", extract)):
      with tempfile.TemporaryDirectory() as d:
        settings = sf.SamplingSettings(model="shapes-tiny", num_samples=n, seed=0, cfg=1.5,
                                       top_k=900, top_p=0.96, more_smooth=False, batch=batch,
                                       inception_dtype=dtype)
        times, chunks = [], []
        t = time.perf_counter()
        for chunk in sf.sample_features(model, settings, mode[1], mesh=mesh, chunk_dir=d,
                                        keep_images=True):
          now = time.perf_counter()
          times.append(now - t)
          t = now
          chunks.append(chunk)
      steady = sum(times[1:])
      rate = (n - len(chunks[0]["images"])) / steady if steady > 0 else float("nan")
      rows.append(dict(part="cpu", what=mode[0], inception_dtype=dtype, batch=batch,
                       images_per_s=round(rate, 2), first_call_s=round(times[0], 2)))
      if mode[1] is not None:
        images = np.concatenate([c["images"] for c in chunks])
        t = time.perf_counter()
        extract(images)
        rows.append(dict(part="cpu", what="features alone", inception_dtype=dtype, batch=batch,
                         images_per_s=round(len(images) / (time.perf_counter() - t), 2)))
        _, ref_batches = reference_images.shapes_batches(args.ref_images, 64, batch, seed=0)
        ref_pool, ref_spatial = adm.compute_features(ref_batches, extract)
        ref = adm.Reference(*adm.statistics(ref_pool), *adm.statistics(ref_spatial),
                            pool_features=ref_pool)
        pool = np.concatenate([c["pool"] for c in chunks])
        spatial = np.concatenate([c["spatial"] for c in chunks])
        metrics = adm.metrics(pool, spatial, ref, network.classifier_DK)
        rows.append(dict(part="cpu", what="metrics", inception_dtype=dtype,
                         weights="given" if args.fid_inception else "random",
                         **{k: round(metrics[k], 4) for k in adm.METRIC_KEYS
                            if metrics[k] is not None},
                         num_samples=n, num_reference=args.ref_images))
  print(f"{jax.device_count()} {jax.devices()[0].platform} devices, batch {batch}, {n} images")
  for r in rows:
    print("  " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "part"))
  for r in rows:
    print(json.dumps(r))


def aot_part(args) -> None:
  from var_jax import aot
  from var_jax.aot import analysis
  from var_jax.eval import adm, inception
  from var_jax.train import config_lib, train_var
  if not aot.libtpu_available():
    raise SystemExit("the aot part needs libtpu (pip install 'var-jax[tpu]').")
  config = config_lib.var_imagenet_config(16, False, False)
  vae_cfg = aot.tokenizer_config(config)
  var_cfg = train_var.var_config_from(config, vae_cfg)
  network = inception.ADMInception(
      inception.FIDInceptionV3(input_format="adm", dtype=jnp.dtype(args.inception_dtype)),
      inception.abstract_params(), np.zeros((inception.FEATURE_DIM, inception.FID_NUM_CLASSES),
                                            np.float32))
  for topology in args.topology:
    mesh = aot.topology_mesh(topology, aot.mesh_config(-1, 1, 1))
    chip = aot.chip_spec(topology)
    chips = mesh.devices.size
    batch = args.per_chip * chips
    extract = adm.ADMFeatures(network, batch_size=batch, mesh=mesh)
    t0 = time.perf_counter()
    compiled = extract.lower(vae_cfg.image_size).compile()
    features = analysis.analyze(compiled, chip)
    feat_compile_s = time.perf_counter() - t0
    print(f"{topology}: features of {batch} images compiled in {feat_compile_s:.0f} s: roofline "
          f"{features.roofline_s * 1e3:.1f} ms ({features.bound}-bound), peak "
          f"{features.peak_bytes / 2**30:.2f} GiB/chip", flush=True)
    sampler = aot.sampler_report(var_cfg, vae_cfg, mesh, chip, batch, log=lambda m: print(
        f"{topology}: {m}", flush=True))
    calls = math.ceil(args.num_samples / batch)
    s_call = sampler.cost.roofline_s
    f_call = features.roofline_s
    s_model = sampler.cost.optimal_s
    f_model = features.optimal_s
    total_roofline = calls * (s_call + f_call)
    total_model = calls * (s_model + f_model) if s_model > 0 and f_model > 0 else float("nan")
    s_model, f_model = (max(v, -1.0) for v in (s_model, f_model))  # -1: no estimate
    row = dict(part="aot", topology=topology, chips=chips, batch_per_call=batch, calls=calls,
               sampler_peak_gib=round(sampler.cost.peak_bytes / 2**30, 2),
               sampler_roofline_s=round(s_call, 4), sampler_bound=sampler.cost.bound,
               sampler_cost_model_s=round(s_model, 4),
               features_peak_gib=round(features.peak_bytes / 2**30, 2),
               features_roofline_s=round(f_call, 4), features_bound=features.bound,
               features_cost_model_s=round(f_model, 4), features_compile_s=round(feat_compile_s, 1),
               inception_dtype=args.inception_dtype,
               minutes_50k_roofline=round(total_roofline / 60, 2),
               minutes_50k_cost_model=round(total_model / 60, 2))
    print(f"{topology} ({chips} chips, {chip.generation}): {calls} calls of {batch} images")
    print(f"  sampler  per call: roofline {s_call * 1e3:.1f} ms ({sampler.cost.bound}-bound), cost "
          f"model {s_model * 1e3:.1f} ms, peak {sampler.cost.peak_bytes / 2**30:.2f} GiB/chip")
    print(f"  features per call: roofline {f_call * 1e3:.1f} ms ({features.bound}-bound), cost "
          f"model {f_model * 1e3:.1f} ms, peak {features.peak_bytes / 2**30:.2f} GiB/chip")
    print(f"  {args.num_samples:,} images: >= {total_roofline / 60:.2f} min (roofline)"
          + (f", {total_model / 60:.2f} min (cost model)" if total_model == total_model else
             " (the TPU cost model gives no estimate for these programs)"))
    print(json.dumps(row))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--part", choices=("cpu", "aot"), required=True)
  p.add_argument("--fid-inception", default=None, help="real Inception weights (cpu part)")
  p.add_argument("--num-images", type=int, default=64, help="samples (cpu part)")
  p.add_argument("--ref-images", type=int, default=256, help="shapes reference images (cpu part)")
  p.add_argument("--batch", type=int, default=16, help="images per call (cpu part)")
  p.add_argument("--topology", action="append", default=None, help="TPU slices (aot part)")
  p.add_argument("--per-chip", type=int, default=16, help="images per chip per call (aot part)")
  p.add_argument("--num-samples", type=int, default=50_000)
  p.add_argument("--inception-dtype", default="float32", choices=("float32", "bfloat16"))
  args = p.parse_args(argv)
  if args.part == "cpu":
    cpu_part(args)
  else:
    args.topology = args.topology or ["v5e-8", "v5p-32"]
    aot_part(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
