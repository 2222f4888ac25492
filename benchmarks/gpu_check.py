"""GPU check: every attention path against XLA, then sampler and train-step throughput per path.

  python benchmarks/gpu_check.py                   # on a GPU machine: writes
                                                   # benchmarks/results/gpu_check_<device>.json
  JAX_PLATFORMS=cpu python benchmarks/gpu_check.py --allow-cpu --tiny      # smoke run, no GPU

`impl="auto"` picks XLA on GPU (`var_jax.ops.attention.GPU_AUTO_IMPL`) until this script's output
from a real GPU is committed under benchmarks/results/: the Pallas Triton kernel
(`var_jax/kernels/gpu_flash.py`) has only run in interpret mode and been lowered to Triton on CPU.

1. Numerics, float32 and bfloat16, at VAR-d16 sizes (16 heads of 64, L = 680, the cache of 768):
   * the XLA path's forward against a float64 numpy reference on the host (it is the reference of
     the rest, so it is checked first);
   * "pallas_gpu" against the XLA path at the same dtype: the block-causal training attention
     (output and dq, dk, dv of sum(out * a random cotangent)) and the prefix (sampling) attention
     of every scale, the cache past the prefix filled with junk.
   Error = max |x - reference| / max |reference|, allowed 1e-5 (float32) and 4 bfloat16 steps
   (4 x 2^-8), as tests/test_attention.py allows in interpret mode. The fwd+bwd and the all-scales
   prefix call of each path are also timed.
2. Sampler throughput: `var_jax.sample` (cfg 1.5, top-k 900, top-p 0.96, the decode included) on a
   random-weight VAR-d16 + the released tokenizer architecture, built as benchmarks/bench_sample.py
   builds them (`_common.random_tokenizer` / `random_var_model`), per attention path.
3. Train-step throughput: the step `var-jax train` runs for configs/var_d16.py (random tokenizer,
   token-map input), jitted as benchmarks/bench_train.py does, per attention path; model FLOP/s from
   `var_jax.models.flops` and MFU against the GPU's dense bfloat16 peak (table below, or --peak-tflops).

Without a GPU it refuses to run (exit 2) unless --allow-cpu; with --tiny everything shrinks (depth 2,
patch_nums 1..4, a ch-32 tokenizer with V = 64) and on CPU the Pallas GPU kernel runs in interpret
mode: a smoke run of this script, whose timings mean nothing. Exit 1 when a pallas_gpu numerics
check fails or the kernel does not run, else 0. One JSON (--out) holds every row and a verdict.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import pathlib
import re
import sys
import time
import traceback
from typing import Any, Callable
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import _common
import var_jax
from var_jax import scales
from var_jax.models import flops
from var_jax.ops import attention

REPO = pathlib.Path(__file__).resolve().parents[1]
IMPLS = ("xla", "pallas_gpu")
DTYPES = ("float32", "bfloat16")
D16 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
TINY = (1, 2, 3, 4)
# Worst |x - reference| / max |reference| allowed (tests/test_attention.py's TOL).
TOLERANCE = {"float32": 1e-5, "bfloat16": 4 * 2.0**-8}
# Dense bfloat16 peak FLOP/s of GPUs (vendor datasheets, SXM parts, no sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=None,
                      help="JSON output (default on a GPU: benchmarks/results/gpu_check_<device>.json; "
                           "elsewhere or with --tiny: none)")
  parser.add_argument("--allow-cpu", action="store_true",
                      help="run without a GPU (the Pallas GPU kernel in interpret mode)")
  parser.add_argument("--tiny", action="store_true", help="tiny sizes (a smoke run)")
  parser.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                      help="compute dtype of the sampler and train-step timings (default bfloat16)")
  parser.add_argument("--sample-batch-sizes", type=_common.int_list, default=None,
                      help="sampler batches (default 8,32; --tiny: 2)")
  parser.add_argument("--train-batch", type=int, default=None,
                      help="train-step global batch (default 32; --tiny: 4)")
  parser.add_argument("--iters", type=int, default=None,
                      help="timed calls after the first (default 5; --tiny: 1)")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="dense bf16 peak TFLOP/s of this GPU for MFU (default: a table of "
                           f"{sorted(PEAK_BF16_FLOPS)})")
  parser.add_argument("--skip", default="", help="comma-separated sections to skip: "
                                                 "numerics, sampler, train")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  args.sample_batch_sizes = args.sample_batch_sizes or ([2] if args.tiny else [8, 32])
  args.train_batch = args.train_batch or (4 if args.tiny else 32)
  args.iters = args.iters or (1 if args.tiny else 5)
  args.skip = {s for s in args.skip.split(",") if s}
  bad = args.skip - {"numerics", "sampler", "train"}
  if bad:
    parser.error(f"unknown sections {sorted(bad)}")
  return args


def device_slug(kind: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or "unknown"


def peak_flops(kind: str, override_tflops: float | None) -> float | None:
  if override_tflops:
    return override_tflops * 1e12
  return next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind.upper()), None)


@contextlib.contextmanager
def gpu_kernel_interpreted(enabled: bool):
  """Without a GPU, impl="pallas_gpu" runs the kernel in interpret mode (through the model too)."""
  if not enabled:
    yield
    return
  block_causal, prefix = attention.block_causal_attention, attention.prefix_attention

  def interpreted(fn):
    @functools.wraps(fn)
    def call(*args, impl="auto", interpret=False, **kwargs):
      return fn(*args, impl=impl, interpret=interpret or impl == "pallas_gpu", **kwargs)
    return call

  with mock.patch.object(attention, "block_causal_attention", interpreted(block_causal)), \
       mock.patch.object(attention, "prefix_attention", interpreted(prefix)):
    yield


def record(rows: list[dict], row: dict) -> None:
  """Keeps a row and prints it as one JSON line at once, so a run killed at its limit keeps it."""
  rows.append(row)
  print(json.dumps(row), flush=True)


def _timed(fn: Callable[[], Any], iters: int) -> _common.Timing:
  return _common.time_calls(fn, iters)


def _error(actual, reference) -> float:
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  reference = np.asarray(jnp.asarray(reference, jnp.float32), np.float64)
  if not np.all(np.isfinite(actual)):
    return float("inf")
  return float(np.max(np.abs(actual - reference)) / max(np.max(np.abs(reference)), 1e-30))


# -- 1. numerics ---------------------------------------------------------------------------------

def _qkv(seed: int, batch: int, heads: int, q_len: int, kv_len: int, dtype):
  """VAR-like inputs: l2-normalised q and k, q times a per-head scale in [4, 30]; v normal."""
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  normalize = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  scale_H = jnp.linspace(4.0, 30.0, heads)[None, :, None, None]
  q = normalize(jax.random.normal(kq, (batch, heads, q_len, 64))) * scale_H
  k = normalize(jax.random.normal(kk, (batch, heads, kv_len, 64)))
  v = jax.random.normal(kv, (batch, heads, kv_len, 64))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _numpy_attention(q, k, v, visible) -> np.ndarray:
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  logits = np.where(visible, np.einsum("bhqd,bhkd->bhqk", q, k), -np.inf)
  probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return np.einsum("bhqk,bhkd->bhqd", probs / probs.sum(axis=-1, keepdims=True), v)


def _training_fn(impl: str, patch_nums):
  """jit: (q, k, v, cotangent) -> (out, (dq, dk, dv)) of sum(out * cotangent)."""
  def attend(q, k, v):
    return attention.block_causal_attention(q, k, v, patch_nums=patch_nums, impl=impl)

  def fn(q, k, v, ct):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(ct)
  return jax.jit(fn)


def _prefix_fn(impl: str, patch_nums):
  """jit: the prefix attention of every scale (queries of scale si against the first end rows)."""
  ranges = scales.begin_ends(patch_nums)

  def fn(qs, k, v):
    return [attention.prefix_attention(q, k, v, kv_len=end, impl=impl)
            for q, (_, end) in zip(qs, ranges)]
  return jax.jit(fn)


def check_numerics(args, patch_nums, rows: list[dict]) -> None:
  L = scales.seq_len(patch_nums)
  heads, batch = (2, 1) if args.tiny else (16, 4)
  cache = attention.kv_cache_len(patch_nums)
  ranges = scales.begin_ends(patch_nums)
  visible = scales.block_causal_mask(patch_nums)
  for dtype_name in DTYPES:
    dtype, tol = jnp.dtype(dtype_name), TOLERANCE[dtype_name]
    q, k, v = _qkv(args.seed, batch, heads, L, L, dtype)
    ct = jax.random.normal(jax.random.key(args.seed + 1), q.shape).astype(dtype)
    qs = [_qkv(args.seed + 2 + si, batch, heads, pn * pn, cache, dtype)[0]
          for si, pn in enumerate(patch_nums)]
    _, kc, vc = _qkv(args.seed + 99, batch, heads, 1, cache, dtype)
    shape = dict(batch=batch, heads=heads, L=L, head_dim=64, cache=cache)
    results = {}
    for impl in IMPLS:
      base = dict(section="numerics", impl=impl, dtype=dtype_name, **shape)
      print(f"numerics: {impl} {dtype_name} ...", flush=True)
      try:
        train, prefix = _training_fn(impl, patch_nums), _prefix_fn(impl, patch_nums)
        out, grads = jax.block_until_ready(train(q, k, v, ct))
        # Junk past each prefix: rows a scale must not see (later scales, unwritten cache).
        outs = []
        for q_s, (_, end) in zip(qs, ranges):
          k_j = kc.at[:, :, end:].set(jnp.asarray(40.0, dtype))
          v_j = vc.at[:, :, end:].set(jnp.asarray(1e4, dtype))
          outs.append(jax.jit(functools.partial(
              lambda q, k, v, end: attention.prefix_attention(q, k, v, kv_len=end, impl=impl),
              end=end))(q_s, k_j, v_j))
        results[impl] = (out, grads, outs)
        t_train = _timed(lambda: train(q, k, v, ct), args.iters)
        t_prefix = _timed(lambda: prefix(qs, kc, vc), args.iters)
        record(rows, dict(base, path="timing", fwd_bwd_ms=1e3 * t_train.median_s,
                               all_scales_prefix_ms=1e3 * t_prefix.median_s,
                               compile_s=t_train.first_minus_steady_s))
      except Exception as err:  # pylint: disable=broad-except  (a kernel that does not run)
        traceback.print_exc()
        record(rows, dict(base, path="run", ok=False, error=f"{type(err).__name__}: {err}"[:2000]))
        continue
    if "xla" in results:  # the reference itself, against float64 numpy
      out = results["xla"][0]
      err = _error(out, _numpy_attention(q, k, v, visible))
      record(rows, dict(section="numerics", impl="xla", dtype=dtype_name, path="training fwd vs float64",
                             error=err, tolerance=tol, ok=err <= tol, **shape))
      for si, (q_s, (_, end)) in enumerate(zip(qs, ranges)):
        ref = _numpy_attention(q_s, kc[:, :, :end], vc[:, :, :end], True)
        err = _error(results["xla"][2][si], ref)
        record(rows, dict(section="numerics", impl="xla", dtype=dtype_name,
                               path=f"prefix scale {si} vs float64", error=err, tolerance=tol,
                               ok=err <= tol, **shape))
    if "xla" in results and "pallas_gpu" in results:
      (out_r, grads_r, outs_r), (out, grads, outs) = results["xla"], results["pallas_gpu"]
      checks = [("training out", out, out_r)]
      checks += [(f"training d{n}", g, g_r) for n, g, g_r in zip("qkv", grads, grads_r)]
      checks += [(f"prefix scale {si} ({pn * pn} rows, {end} keys)", o, o_r) for si, (pn, (_, end), o, o_r)
                 in enumerate(zip(patch_nums, ranges, outs, outs_r))]
      for path, actual, reference in checks:
        err = _error(actual, reference)
        record(rows, dict(section="numerics", impl="pallas_gpu", dtype=dtype_name, path=path + " vs xla",
                               error=err, tolerance=tol, ok=err <= tol, **shape))


# -- 2. sampler ----------------------------------------------------------------------------------

def time_sampler(args, rows: list[dict]) -> None:
  if args.tiny:
    tok = _common.random_tokenizer(args.seed, ch=32, vocab_size=64, z_channels=8, patch_nums=TINY)
    base = _common.random_var_model(2, tok, args.seed, num_classes=10)
  else:
    tok = _common.random_tokenizer(args.seed)
    base = _common.random_var_model(16, tok, args.seed)
  for impl in IMPLS:
    cfg = dataclasses.replace(base.config, attention_impl=impl, dtype=args.dtype)
    model = var_jax.VARModel(cfg, base.params, tok)
    for batch in args.sample_batch_sizes:
      labels = np.arange(batch, dtype=np.int32) % cfg.num_classes
      row = dict(section="sampler", impl=impl, dtype=args.dtype, batch=batch, depth=cfg.depth)
      try:
        jax.clear_caches()
        t = _timed(lambda: var_jax.sample(model, labels, rng=jax.random.key(args.seed), cfg=1.5,
                                          top_k=900, top_p=0.96), args.iters)
      except Exception as err:  # pylint: disable=broad-except
        traceback.print_exc()
        record(rows, dict(row, ok=False, error=f"{type(err).__name__}: {err}"[:2000]))
        continue
      record(rows, dict(row, ok=True, first_call_s=t.first_s, median_s=t.median_s,
                             images_per_s=batch / t.median_s,
                             device_peak_bytes=_common.device_peak_bytes()))


# -- 3. train step -------------------------------------------------------------------------------

def time_train(args, rows: list[dict], peak: float | None) -> None:
  # Imported here: the trainer's input stack (grain, clu, TensorFlow) is needed by this section
  # alone, and a GPU image may lack it while the other sections run.
  import bench_train  # pylint: disable=import-outside-toplevel
  bench_args = argparse.Namespace(seed=args.seed, dtype=args.dtype, input="tokens", warmup=1,
                                  steps=args.iters)
  for impl in IMPLS:
    config = bench_train.model_config("tiny" if args.tiny else "d16", args.train_batch, bench_args)
    config.model["dtype"] = args.dtype
    config.model["attention_impl"] = impl
    row = dict(section="train", impl=impl, dtype=args.dtype, batch=args.train_batch,
               model="tiny" if args.tiny else "d16")
    try:
      jax.clear_caches()
      ours = bench_train.time_ours(config, args.train_batch, bench_args)
    except Exception as err:  # pylint: disable=broad-except
      traceback.print_exc()
      record(rows, dict(row, ok=False, error=f"{type(err).__name__}: {err}"[:2000]))
      continue
    var_cfg = ours["var_cfg"]
    model_flops = flops.flops_per_example(var_cfg) * args.train_batch / ours["step_s"]
    record(rows, dict(row, ok=True, compile_s=ours["compile_s"], step_s=ours["step_s"],
                           steps_per_s=1 / ours["step_s"],
                           tokens_per_s=args.train_batch * var_cfg.seq_len / ours["step_s"],
                           loss=ours["loss"], model_tflops_per_s=model_flops / 1e12,
                           mfu=None if peak is None or args.dtype != "bfloat16"
                           else model_flops / (peak * jax.device_count()),
                           device_peak_bytes=_common.device_peak_bytes()))


# -- report --------------------------------------------------------------------------------------

def verdict(rows: list[dict]) -> dict[str, Any]:
  kernel = [r for r in rows if r["section"] == "numerics" and r["impl"] == "pallas_gpu"
            and "ok" in r]
  ok = all(r["ok"] for r in kernel) if kernel else None  # None: the numerics were skipped

  def speedup(section: str, key: str, larger_is_better: bool) -> dict[str, float]:
    out = {}
    for r in rows:
      if r["section"] == section and r["impl"] == "pallas_gpu" and r.get("ok"):
        twin = next((x for x in rows if x["section"] == section and x["impl"] == "xla"
                     and x.get("ok") and x.get("batch") == r.get("batch")), None)
        if twin:
          ratio = r[key] / twin[key] if larger_is_better else twin[key] / r[key]
          out[f"batch {r.get('batch')}"] = ratio
    return out

  return {"pallas_gpu_numerics_ok": ok,
          "pallas_gpu_ran": all(r.get("ok", True) for r in rows if r["impl"] == "pallas_gpu"),
          "pallas_gpu_sampler_speedup_vs_xla": speedup("sampler", "images_per_s", True),
          "pallas_gpu_train_speedup_vs_xla": speedup("train", "steps_per_s", True)}


def print_report(rows: list[dict], result: dict) -> None:
  numerics = [r for r in rows if r["section"] == "numerics" and "error" in r and "tolerance" in r]
  _common.print_table("numerics (max |x - ref| / max |ref|)", numerics,
                      [("impl", "impl", ""), ("dtype", "dtype", ""), ("check", "path", ""),
                       ("error", "error", ".2e"), ("allowed", "tolerance", ".1e"), ("ok", "ok", "")])
  failed = [r for r in rows if r.get("ok") is False and "error" in r and isinstance(r["error"], str)]
  for r in failed:
    print(f"  FAILED TO RUN: {r['section']} {r['impl']} {r['dtype']}: {r['error'][:300]}")
  _common.print_table("attention timings (median)", [r for r in rows if r.get("path") == "timing"],
                      [("impl", "impl", ""), ("dtype", "dtype", ""),
                       ("train fwd+bwd ms", "fwd_bwd_ms", ".3f"),
                       ("prefix, all scales ms", "all_scales_prefix_ms", ".3f")])
  _common.print_table("sampler (var_jax.sample)", [r for r in rows if r["section"] == "sampler"],
                      [("impl", "impl", ""), ("dtype", "dtype", ""), ("batch", "batch", "d"),
                       ("first call s", "first_call_s", ".1f"), ("images/s", "images_per_s", ".2f")])
  _common.print_table("train step", [r for r in rows if r["section"] == "train"],
                      [("impl", "impl", ""), ("dtype", "dtype", ""), ("batch", "batch", "d"),
                       ("compile s", "compile_s", ".1f"), ("steps/s", "steps_per_s", ".3f"),
                       ("tokens/s", "tokens_per_s", ".0f"),
                       ("model TFLOP/s", "model_tflops_per_s", ".2f"), ("MFU", "mfu", ".3f")])
  print("verdict: " + json.dumps(result["verdict"]))


def main(argv=None) -> int:
  args = parse_args(argv)
  backend = jax.default_backend()
  if backend != "gpu" and not args.allow_cpu:
    print(f"gpu_check: no GPU here (JAX backend {backend!r}, devices {jax.devices()}). It checks the "
          "GPU attention paths on a GPU; for a smoke run of the script elsewhere pass --allow-cpu "
          "(with --tiny for small sizes).", file=sys.stderr)
    return 2
  env = _common.environment()
  _common.print_environment(env)
  interpret = backend != "gpu"
  if interpret:
    print("no GPU: the Pallas GPU kernel runs in interpret mode; the timings mean nothing.")
  kind = jax.devices()[0].device_kind
  peak = peak_flops(kind, args.peak_tflops)
  rows: list[dict] = []
  t0 = time.perf_counter()
  with gpu_kernel_interpreted(interpret):
    if "numerics" not in args.skip:
      check_numerics(args, TINY if args.tiny else D16, rows)
    if "sampler" not in args.skip:
      time_sampler(args, rows)
    if "train" not in args.skip:
      time_train(args, rows, peak)
  result = {"environment": env, "tiny": args.tiny, "pallas_gpu_interpreted": interpret,
            "dtype_timed": args.dtype, "iters": args.iters, "peak_bf16_flops": peak,
            "wall_s": time.perf_counter() - t0, "gpu_auto_impl": attention.GPU_AUTO_IMPL,
            "rows": rows}
  result["verdict"] = verdict(rows)
  print_report(rows, result)
  out = args.out
  if out is None and backend == "gpu" and not args.tiny:
    out = str(REPO / "benchmarks" / "results" / f"gpu_check_{device_slug(kind)}.json")
  if out:
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
  v = result["verdict"]
  return 0 if v["pallas_gpu_numerics_ok"] is not False and v["pallas_gpu_ran"] else 1


if __name__ == "__main__":
  sys.exit(main())
