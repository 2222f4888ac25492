"""Class-conditional sampling throughput (images/s) of VAR-d16 + the 256 px tokenizer, random weights.

  JAX_PLATFORMS=cpu python benchmarks/bench_sample.py                          # ours only
  JAX_PLATFORMS=cpu VAR_REF=/path/to/VAR python benchmarks/bench_sample.py     # + official

Times `var_jax.sample` (all 10 scales with the KV cache, classifier-free guidance, top-k/top-p
filtering and the VQVAE decode, one jit) at each batch size: the first call (trace + compile +
run) separately from steady-state calls, and, after jax.clear_caches(), the ahead-of-time
`sampler.build_sample_call(...).lower()` (trace + lower) and `.compile()` (XLA) times with the executable's
memory_analysis(). With VAR_REF and torch, the official
`var.autoregressive_infer_cfg(B, label_B, g_seed=0, cfg, top_k, top_p)` runs on the same weights
and labels and the speed ratio ours/official is printed (> 1: ours faster). On CPU the two
sides' steady calls take turns (official, ours, official, ...), so that a host whose speed drifts
meets both alike, and the median of the turns' own ratios is printed beside the ratio of the
medians; --sequential times all of the official's calls first, as on a GPU. Each
steady call's system CPU seconds and minor page faults (the kernel's share: fresh memory mapped
and zeroed, `_common.HostUsage`) go into the row too, for both sides.

The bound (`var_jax.inference.bound`): the least time one call can take on this machine, the
larger of its FLOPs (the transformer's analytic matmuls, attention over the visible pairs only,
and the decoder's convolutions and attention) at the measured peak matmul rate of the sampling
dtype (a 4096^3 matmul, float32 accumulation; the decoder's at the rate of --tokenizer-dtype when
that differs) and its least bytes (the weights once per scale, KV cache, logits and activations
once) at the measured memory bandwidth (a 1 GiB sum). Printed per batch: achieved FLOP/s (bound
FLOPs / measured time) and its share of the peak (the FLOPs' time at their peaks / measured
time), ours and the official, and measured / bound. Each is charged the convolutions it runs:
ours the multiplies of this backend's algorithm per decoder conv (Winograd on CPU,
`ops.conv.conv3x3_multiplies`), the official's direct convolutions.

--dtype bfloat16 samples with bf16 weights and activations (float32 accumulation, softmax,
norms and logits), tokenizer included, against the official under
`torch.autocast(device, dtype=torch.bfloat16)`; both also sample greedily (top_k=1) in float32
and in bfloat16 on the same labels, and the share of bf16 greedy tokens equal to the float32 ones
is printed for each (the same run).

--tpu v5e:2x2,v5p:2x2x1 also compiles the same call ahead of time for those slices
(`aot.sampler_report`: `aot.lower_sample`, the public call's placement; its costs from the same
program with the block scans fully unrolled) at --tpu-batch-sizes and prints the compiled roofline against the bound per chip
(`aot.sampler_bound`, the chip's peak FLOP/s and HBM bandwidth) and achieved / peak FLOP/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np

import _common
import var_jax
from var_jax.inference import sampler
from var_jax.inference.bound import SamplerBound

COMPILE_GOAL_S = 60.0


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  _common.add_common_flags(parser, batch_sizes="1,8", iters=1)
  parser.add_argument("--depth", type=int, default=16, help="VAR depth (default 16)")
  parser.add_argument("--cfg", type=float, default=1.5, help="guidance scale (default 1.5)")
  parser.add_argument("--top-k", type=int, default=900, help="top-k (default 900)")
  parser.add_argument("--top-p", type=float, default=0.96, help="top-p (default 0.96)")
  parser.add_argument("--aot-batch-sizes", type=_common.int_list, default=[1],
                      help="batch sizes at which to also time lower()/compile() ahead of time "
                           "(one extra compile each; default 1)")
  parser.add_argument("--no-aot", action="store_true", help="skip the ahead-of-time compile timing")
  parser.add_argument("--sequential", action="store_true",
                      help="time the official's calls, then ours (the default on CPU: their "
                           "steady calls in turns; a GPU is always sequential)")
  parser.add_argument("--profile-dir", default="",
                      help="also record a jax.profiler trace of one steady call per batch size here "
                           "(TensorBoard / Perfetto)")
  parser.add_argument("--no-flops", action="store_true",
                      help="skip the bound (the peak matmul rate and bandwidth measurements)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="sampling dtype of ours (and torch.autocast of the official for bf16)")
  parser.add_argument("--tokenizer-dtype", choices=("float32", "bfloat16"), default=None,
                      help="the decoder's dtype (default: --dtype; a bf16 decoder on CPU runs "
                           "its convs as row-block matmuls, ops/conv_rows.py)")
  parser.add_argument("--greedy-batch", type=int, default=8,
                      help="with --dtype bfloat16: labels of the greedy float32-vs-bf16 token "
                           "check (0: skip)")
  parser.add_argument("--tpu", type=lambda t: [x for x in t.split(",") if x], default=[],
                      help="comma-separated TPU slices to compile the sampler for ahead of time "
                           "(e.g. v5e:2x2,v5p:2x2x1; needs libtpu)")
  parser.add_argument("--no-cpu", action="store_true",
                      help="only the --tpu ahead-of-time rows (no timing on this host)")
  parser.add_argument("--tpu-batch-sizes", type=_common.int_list, default=[8, 64],
                      help="global batch sizes of the TPU compiles (default 8,64)")
  return parser.parse_args(argv)


# -- the bound ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Peaks:
  """This backend's measured peaks: the matmul rate in the sampling dtype, the read bandwidth, and
  the matmul rate in the tokenizer's dtype when it decodes in another (torch's float32 matmul rate
  is printed beside them, for reference)."""
  flops: float
  bandwidth: float
  decoder_flops: float | None = None


def measure_peaks(args, official) -> Peaks:
  # A GPU runs a 4096^3 bf16 matmul or a 1 GiB read in well under a millisecond, where the call's
  # own overhead would show: there, 8192^3 and 4 GiB.
  n, gib = (8192, 4.0) if jax.default_backend() == "gpu" else (4096, 1.0)
  jax_mm = _common.matmul_flops_per_s(n, dtype=args.dtype)
  decoder_mm = (_common.matmul_flops_per_s(n, dtype=args.tokenizer_dtype)
                if args.tokenizer_dtype != args.dtype else None)
  bandwidth = _common.stream_bytes_per_s(gib)
  torch_mm = (_common.torch_matmul_flops_per_s(official, n) if official is not None
              else None)
  print(f"peaks of this backend: {args.dtype} {n}^3 matmul {jax_mm / 1e9:.1f} GFLOP/s (JAX)"
        + (f", {args.tokenizer_dtype} (the decoder's) {decoder_mm / 1e9:.1f} GFLOP/s (JAX)"
           if decoder_mm else "")
        + (f", float32 {torch_mm / 1e9:.1f} GFLOP/s (torch, {official.device})" if torch_mm else "")
        + f"; memory read {bandwidth / 1e9:.1f} GB/s")
  return Peaks(jax_mm, bandwidth, decoder_mm)


def bound_of(model, batch: int, peaks: Peaks, guidance: bool, platform: str | None) -> SamplerBound:
  """The bound of one call on this host (one device: the whole batch), its decoder's convolutions
  charged as they run on `platform` (ours: this backend, Winograd on CPU; None: all direct, the
  official's). Weights once per scale: a VAR's weights are far larger than a CPU's caches."""
  return SamplerBound.for_model(model, batch, peak_flops=peaks.flops, bandwidth=peaks.bandwidth,
                                guidance=guidance, decoder_peak_flops=peaks.decoder_flops,
                                platform=platform)


# -- timing ------------------------------------------------------------------------------------

def _ours_call(model, labels: np.ndarray, args):
  """The timed public call: var_jax.sample on `labels` with the flags' seed, cfg and filters."""
  kwargs = dict(rng=jax.random.key(args.seed), cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
  return lambda: var_jax.sample(model, labels, **kwargs)


def _profile_ours(model, labels: np.ndarray, args) -> None:
  if args.profile_dir:
    with jax.profiler.trace(f"{args.profile_dir}/batch{labels.shape[0]}", create_perfetto_trace=True):
      jax.block_until_ready(_ours_call(model, labels, args)())


def time_ours(model, labels: np.ndarray, args) -> dict:
  """var_jax.sample: first call (compile) and steady state, from clean caches."""
  jax.clear_caches()
  _common.reset_peak_rss()
  usage = []
  timing = _common.time_calls(_common.recording_host_usage(_ours_call(model, labels, args), usage),
                              args.iters)
  result = {"timing": timing, "peak_rss": _common.peak_rss_since_reset(),
            "device_peak": _common.device_peak_bytes(), "host_usage": usage}
  _profile_ours(model, labels, args)
  return result


def time_both_alternately(official: _common.Official, model, labels: np.ndarray,
                          args) -> tuple[dict, dict]:
  """(ours, official) as `time_ours` and `time_official` give them, with the steady calls in
  turns: official, ours, official, ours, ... after ours' first call (compile) and the official's
  warm-up calls. The speed of this CPU host drifts between phases minutes long (its memory
  bandwidth measured 35-50 GB/s on one day, and a batch-8 call of either moved with it), so one
  side timed after the other carries the drift into the ratio; in turns both meet each phase
  (the ratio still moves with it: ours slowed more than the official in the slow phases).
  Each side's peak RSS is taken over its own first calls, before the turns. A failing official
  (out of memory) raises before any turn, as `time_official` does."""
  jax.clear_caches()
  ours_usage, theirs_usage = [], []
  ours = _common.recording_host_usage(_ours_call(model, labels, args), ours_usage)
  _common.reset_peak_rss()
  ours_first = _common.call_seconds(ours)
  ours_peak, device_peak = _common.peak_rss_since_reset(), _common.device_peak_bytes()
  theirs = _common.recording_host_usage(_official_call(official, labels, args), theirs_usage)
  _common.reset_peak_rss()
  warm_s = [_common.call_seconds(theirs) for _ in range(args.torch_warmup)]
  theirs_peak = _common.peak_rss_since_reset()
  times = _common.time_alternately({"official": theirs, "ours": ours}, args.iters)
  theirs_first = (warm_s or times["official"])[0]
  _profile_ours(model, labels, args)
  return ({"timing": _common.Timing(ours_first, times["ours"]), "peak_rss": ours_peak,
           "device_peak": device_peak, "host_usage": ours_usage},
          {"timing": _common.Timing(theirs_first, times["official"]), "peak_rss": theirs_peak,
           "host_usage": theirs_usage})


def aot_compile_ours(model, labels: np.ndarray, args) -> dict:
  """Trace+lower and XLA compile of exactly what `sample` runs (`sampler.build_sample_call`, the
  public call's placement), from clean caches."""
  jax.clear_caches()
  call = sampler.build_sample_call(model, labels, rng=jax.random.key(args.seed), cfg=args.cfg,
                                    top_k=args.top_k, top_p=args.top_p)
  t0 = time.perf_counter()
  lowered = call.lower(fresh=True)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return {"lower_s": t1 - t0, "compile_s": time.perf_counter() - t1,
          "memory": _common.memory_analysis(compiled)}


def greedy_token_shares(official, model32, model16, labels: np.ndarray, args) -> dict:
  """Share of bf16 greedy tokens (top_k=1, cfg as timed) equal to the float32 ones: ours, and the
  official's under autocast against its own float32, on the same labels."""
  key = jax.random.key(args.seed)
  opts = dict(rng=key, cfg=args.cfg, top_k=1, top_p=0.0, return_tokens=True)
  flat = lambda maps: np.concatenate([np.asarray(m).reshape(len(labels), -1) for m in maps], 1)
  ours32 = flat(var_jax.sample(model32, labels, **opts)[1])
  ours16 = flat(var_jax.sample(model16, labels, **opts)[1])
  out = {"ours_bf16_greedy_equal": float((ours32 == ours16).mean()),
         "ours_f32_vs_official_f32_greedy_equal": None, "official_bf16_greedy_equal": None}
  if official is not None:
    label_B = official.tensor(labels, np.int64)

    def official_tokens(dtype):
      with official.torch.inference_mode(), official.autocast(dtype):
        return _official_greedy_tokens(official, label_B, args)

    theirs32, theirs16 = official_tokens("float32"), official_tokens("bfloat16")
    out["official_bf16_greedy_equal"] = float((theirs32 == theirs16).mean())
    out["ours_f32_vs_official_f32_greedy_equal"] = float((theirs32 == ours32).mean())
  return out


def _official_call(official: _common.Official, labels: np.ndarray, args):
  """The official autoregressive_infer_cfg on the same weights and labels (under inference mode
  and, for --dtype bfloat16, autocast), waiting for its device; returns None."""
  label_B = official.tensor(labels, np.int64)
  B = labels.shape[0]

  def run():
    with official.torch.inference_mode(), official.autocast(args.dtype):
      official.var.autoregressive_infer_cfg(B, label_B, g_seed=args.seed, cfg=args.cfg,
                                            top_k=args.top_k, top_p=args.top_p)
    official.synchronize()

  return run


def time_official(official: _common.Official, labels: np.ndarray, args) -> dict:
  """The official sampler alone: its warm-up calls, then --iters timed ones."""
  _common.reset_peak_rss()
  usage = []
  timing = _common.time_torch(  # the call synchronizes
      _common.recording_host_usage(_official_call(official, labels, args), usage), args.iters,
      args.torch_warmup)
  return {"timing": timing, "peak_rss": _common.peak_rss_since_reset(),
          "host_usage": usage}


def _official_greedy_tokens(official, label_B, args) -> np.ndarray:
  """The official sampler's greedy tokens (B, L), recorded from `sample_with_top_k_top_p_`'s
  output at each scale (its loop returns only the images)."""
  import models.var as official_var  # the official checkout's module, through VAR_REF
  recorded = []
  original = official_var.sample_with_top_k_top_p_

  def recording(*a, **kw):
    idx = original(*a, **kw)
    recorded.append(idx[:, :, 0].cpu().numpy())
    return idx

  official_var.sample_with_top_k_top_p_ = recording
  try:
    official.var.autoregressive_infer_cfg(len(label_B), label_B, g_seed=args.seed, cfg=args.cfg,
                                          top_k=1, top_p=0.0)
  finally:
    official_var.sample_with_top_k_top_p_ = original
  return np.concatenate(recorded, axis=1)


# -- report ------------------------------------------------------------------------------------

SPEEDUP_GOALS = {1: 1.4, 8: 1.5}  # float32 VAR-d16 against the official on a quiet CPU (issue 16)


def report_goals(rows: list[dict]) -> None:
  """The goals: ours / official at batch 1 and 8, and the first call's compile under 60 s."""
  print("goals (CPU):")
  for batch, want in SPEEDUP_GOALS.items():
    row = next((r for r in rows if r["batch"] == batch), None)
    if row is None or row.get("speedup") is None:
      print(f"  batch {batch}: >= {want}x the official - not measured")
      continue
    ok = row["speedup"] >= want
    # The goal's time against the least time of our algorithms on this host: below it, no
    # program of them can meet the goal.
    target_s = row["official_steady_s"] / want
    reach = ("" if row.get("bound_s") is None else
             f"; the goal's {target_s:.2f} s is {'above' if target_s >= row['bound_s'] else 'BELOW'}"
             f" our bound {row['bound_s']:.2f} s")
    turns = ("" if row.get("speedup_turns") is None else
             f"; per turn x{min(row['speedup_turns']):.2f}-x{max(row['speedup_turns']):.2f}, "
             f"median x{row['speedup_turn_median']:.2f}")
    print(f"  batch {batch}: >= {want}x the official - ours {row['ours_images_per_s']:.4f} img/s vs "
          f"official {row['official_images_per_s']:.4f} img/s (x{row['speedup']:.2f}): "
          f"{'MET' if ok else 'NOT MET'}{reach}{turns}")
  for row in rows:
    estimate = row["ours_compile_s"]
    aot = None if row.get("ours_aot_compile_s") is None else row["ours_aot_lower_s"] + row["ours_aot_compile_s"]
    worst = max(estimate, aot or 0.0)
    aot_text = "-" if aot is None else f"{aot:.1f} s"
    print(f"  batch {row['batch']}: compile < {COMPILE_GOAL_S:.0f} s - first call - steady {estimate:.1f} s, "
          f"AOT lower+compile {aot_text}: {'MET' if worst < COMPILE_GOAL_S else 'NOT MET'}")


def alternate(args, official) -> bool:
  """Whether ours and the official take turns (`time_both_alternately`): on CPU unless
  --sequential; never on a GPU, where each side's allocator must have the device to itself."""
  return (not args.sequential and official.device == "cpu"
          and jax.default_backend() == "cpu")


def host_usage_fields(side: str, usage: list[_common.HostUsage], iters: int) -> dict:
  """Row fields of one side's steady calls, the last `iters` of its recorded calls (the first and
  warm-up calls come before them): each call's system CPU seconds and minor page faults, and
  their medians (the kernel's share of a call, `_common.HostUsage`)."""
  system_s = [u.system_s for u in usage[-iters:]]
  faults = [u.minor_faults for u in usage[-iters:]]
  return {f"{side}_calls_system_s": [round(x, 2) for x in system_s],
          f"{side}_calls_minor_faults": faults, f"{side}_system_s": statistics.median(system_s),
          f"{side}_minor_faults": statistics.median(faults)}


def measure_batch(args, official, model, batch: int, peaks: Peaks | None) -> dict:
  """Ours (first call, steady state, optionally AOT) and the official at one batch size: one row."""
  cfg = model.config
  labels = np.random.default_rng(args.seed + batch).integers(0, cfg.num_classes, (batch,)).astype(np.int32)
  # Sequential (off CPU, or --sequential): the official first. JAX's GPU allocator keeps what it
  # grew to, torch's hands its cache back (`release_memory`), so in this order both find room at
  # large batches. On CPU both share the host's memory and the steady calls alternate
  # (`time_both_alternately`). The official's failure (running out of memory at a batch ours
  # fits) is recorded in the row instead of losing ours.
  theirs, ours, official_error = None, None, None
  alternated = official is not None and alternate(args, official)
  if official is not None:
    try:
      if alternated:
        ours, theirs = time_both_alternately(official, model, labels, args)
      else:
        theirs = time_official(official, labels, args)
    except (RuntimeError, MemoryError) as err:  # torch.OutOfMemoryError is a RuntimeError
      official_error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
      print(f"batch {batch}: the official failed ({official_error}); timing ours alone", flush=True)
    official.release_memory()
  if ours is None:
    ours = time_ours(model, labels, args)
  t = ours["timing"]
  row = {
      "bench": "sample", "depth": cfg.depth, "batch": batch, "iters": args.iters, "cfg": args.cfg,
      "top_k": args.top_k, "top_p": args.top_p, "dtype": args.dtype,
      "tokenizer_dtype": args.tokenizer_dtype,
      "ours_images_per_s": batch / t.median_s, "ours_steady_s": t.median_s, "ours_steady_min_s": t.min_s,
      "ours_calls_s": [round(x, 3) for x in t.steady_s], "turns": alternated and theirs is not None,
      "ours_first_call_s": t.first_s, "ours_compile_s": t.first_minus_steady_s,
      "ours_peak_rss_bytes": ours["peak_rss"], "ours_device_peak_bytes": ours["device_peak"],
      **host_usage_fields("ours", ours["host_usage"], args.iters),
  }
  bound = direct = None
  if peaks is not None:
    bound = bound_of(model, batch, peaks, guidance=args.cfg != 0, platform=jax.default_backend())
    direct = bound_of(model, batch, peaks, guidance=args.cfg != 0, platform=None)
    row.update({"bound_s": bound.seconds, "bound": bound.bound, "bound_flops": bound.total_flops,
                "bound_bytes": bound.total_bytes, "direct_bound_s": direct.seconds,
                "direct_bound_flops": direct.total_flops, "peak_flops_per_s": peaks.flops,
                "bandwidth_bytes_per_s": peaks.bandwidth,
                "decoder_peak_flops_per_s": peaks.decoder_flops,
                "ours_flops_per_s": bound.total_flops / t.median_s,
                # achieved / peak: the FLOPs' time at their peaks over the measured time
                "ours_of_peak": bound.compute_s / t.median_s,
                "ours_over_bound": t.median_s / bound.seconds})
  if official_error is not None:
    row["official_error"] = official_error
  if theirs is not None:
    o = theirs["timing"]
    row.update({"official_images_per_s": batch / o.median_s, "official_steady_s": o.median_s,
                "official_first_call_s": o.first_s, "official_peak_rss_bytes": theirs["peak_rss"],
                "official_calls_s": [round(x, 3) for x in o.steady_s],
                "speedup": _common.speedup(t.median_s, o.median_s),
                **host_usage_fields("official", theirs["host_usage"], args.iters)})
    if alternated:  # the i-th steady calls of the two sides ran in one turn
      turns = _common.turn_speedups(t.steady_s, o.steady_s)
      row.update({"speedup_turns": [round(x, 3) for x in turns],
                  "speedup_turn_median": statistics.median(turns)})
    if direct is not None:  # the official convolves directly (its own bound)
      row.update({"official_flops_per_s": direct.total_flops / o.median_s,
                  "official_of_peak": direct.compute_s / o.median_s,
                  "official_over_bound": o.median_s / direct.seconds})
  if not args.no_aot and batch in args.aot_batch_sizes:
    aot = aot_compile_ours(model, labels, args)
    row.update({"ours_aot_lower_s": aot["lower_s"], "ours_aot_compile_s": aot["compile_s"],
                **{f"ours_{k}": v for k, v in aot["memory"].items()}})
  return row


def tpu_rows(model, args) -> list[dict]:
  """The same call compiled ahead of time for each --tpu slice: compiled roofline vs the bound."""
  from var_jax import aot  # needs libtpu only here
  if not aot.libtpu_available():
    raise SystemExit("--tpu needs libtpu (pip install '.[tpu]').")
  abstract = aot.abstract_model(model.config, model.tokenizer.config)
  rows = []
  for topology in args.tpu:
    chip = aot.chip_spec(topology)
    mesh = aot.topology_mesh(topology, aot.mesh_config())
    for batch in args.tpu_batch_sizes:
      report = aot.sampler_report(abstract.config, abstract.tokenizer.config, mesh, chip, batch,
                                  model=abstract)
      bound = aot.sampler_bound(abstract, mesh, chip, batch, guidance=args.cfg != 0)
      cost = report.cost
      rows.append({
          "bench": "sample_tpu_aot", "topology": topology, "batch": batch, "dtype": args.dtype,
          "mesh": dict(mesh.shape), "fits": report.fits, "compiled_s": cost.roofline_s,
          "compiled_bound": cost.bound, "compiled_flops": cost.flops,
          "compiled_bytes": cost.bytes_accessed, "bound_s": bound.seconds, "bound": bound.bound,
          "bound_flops": bound.total_flops, "bound_bytes": bound.total_bytes,
          "compiled_over_bound": cost.roofline_s / bound.seconds,
          "of_peak": bound.compute_s / cost.roofline_s,
          "ms_per_image": cost.roofline_s * mesh.size / batch * 1e3})
      r = rows[-1]
      print(f"  {topology} batch {batch}: compiled roofline {r['compiled_s'] * 1e3:.2f} ms/call "
            f"({cost.bound}-bound: {cost.flops / 1e12:.3f} TFLOP, {cost.bytes_accessed / 1e9:.2f} GB "
            f"per chip) vs bound {bound.seconds * 1e3:.2f} ms ({bound.bound}-bound: "
            f"{bound.total_flops / 1e12:.3f} TFLOP, {bound.total_bytes / 1e9:.2f} GB): "
            f"x{r['compiled_over_bound']:.2f}; achieved/peak {100 * r['of_peak']:.1f}%", flush=True)
  return rows


def print_tables(rows: list[dict], depth: int, iters: int, env: dict) -> None:
  _common.print_table(
      f"VAR-d{depth} sampling, {env['backend']} ({env['device']}), median of {iters} steady calls"
      + (" (ours and the official's in turns)" if any(r.get("turns") for r in rows) else ""),
      rows,
      [("batch", "batch", "d"), ("ours img/s", "ours_images_per_s", ".4f"), ("ours s", "ours_steady_s", ".2f"),
       ("first call s", "ours_first_call_s", ".1f"), ("compile s", "ours_compile_s", ".1f"),
       ("AOT lower s", "ours_aot_lower_s", ".1f"), ("AOT compile s", "ours_aot_compile_s", ".1f"),
       ("official img/s", "official_images_per_s", ".4f"), ("official s", "official_steady_s", ".2f"),
       ("ours/official", "speedup", ".2f"), ("per turn", "speedup_turn_median", ".2f")])
  _common.print_table(
      "the bound (FLOPs at the peak matmul rate, least bytes at the measured bandwidth), achieved "
      "FLOP/s = bound FLOPs / measured time, the kernel's share of a call (medians of its system "
      "CPU seconds and minor page faults) and memory (MiB)",
      [{**r, **{k: _common.mib(r.get(k)) for k in r if k.endswith("_bytes") and k != "bound_bytes"},
        **{k: r[k] / 1e9 for k in r if k.endswith("_flops_per_s") and r[k] is not None},
        **{k: 100 * r[k] for k in r if k.endswith("_of_peak") and r[k] is not None},
        "bound_tflop": r.get("bound_flops", 0) / 1e12, "bound_gb": r.get("bound_bytes", 0) / 1e9}
       for r in rows],
      [("batch", "batch", "d"), ("bound TFLOP", "bound_tflop", ".3f"), ("bound GB", "bound_gb", ".2f"),
       ("bound s", "bound_s", ".2f"), ("", "bound", ""),
       ("ours GFLOP/s", "ours_flops_per_s", ".1f"), ("ours % peak", "ours_of_peak", ".1f"),
       ("ours / bound", "ours_over_bound", ".2f"),
       ("official GFLOP/s", "official_flops_per_s", ".1f"), ("official % peak", "official_of_peak", ".1f"),
       ("ours sys s", "ours_system_s", ".2f"), ("ours faults", "ours_minor_faults", ".0f"),
       ("official sys s", "official_system_s", ".2f"),
       ("official faults", "official_minor_faults", ".0f"),
       ("XLA temp", "ours_temp_bytes", ""), ("ours peak RSS", "ours_peak_rss_bytes", ""),
       ("official peak RSS", "official_peak_rss_bytes", "")])
  for r in rows:
    if r.get("direct_bound_flops") and r["direct_bound_flops"] != r["bound_flops"]:
      print(f"batch {r['batch']}: ours is bound by the multiplies of this backend's convolution "
            f"algorithms ({r['bound_flops'] / 1e12:.3f} TFLOP, {r['bound_s']:.2f} s); the "
            f"official's by direct convolutions ({r['direct_bound_flops'] / 1e12:.3f} TFLOP, "
            f"{r['direct_bound_s']:.2f} s; inference/bound.py)")


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.iters < 1:
    raise SystemExit("--iters must be >= 1")
  env = _common.environment()
  _common.print_environment(env)
  official, why, tok, model32 = _common.models(args, depth=args.depth, need_var=True)
  print(f"official comparison: {'on' if official is not None else 'off'} ({why})")
  model = model32
  args.tokenizer_dtype = args.tokenizer_dtype or args.dtype
  if args.dtype != "float32" or args.tokenizer_dtype != "float32":  # the same weights
    tok16 = var_jax.Tokenizer(dataclasses.replace(tok.config, dtype=args.tokenizer_dtype),
                              tok.params)
    model = var_jax.VARModel(dataclasses.replace(model32.config, dtype=args.dtype), model32.params,
                             tok16)
  cfg = model.config
  print(f"VAR-d{cfg.depth}: {model.num_params() / 1e6:.1f} M params, {args.dtype} (tokenizer "
        f"{args.tokenizer_dtype}); cfg={args.cfg}, "
        f"top_k={args.top_k}, top_p={args.top_p}")
  if args.no_cpu:
    args.batch_sizes, args.greedy_batch, official = [], 0, None
  peaks = None if args.no_flops or args.no_cpu else measure_peaks(args, official)
  rows = []
  for batch in args.batch_sizes:
    rows.append(measure_batch(args, official, model, batch, peaks))
    _common.emit({**rows[-1], **env})
  if rows:
    print_tables(rows, cfg.depth, args.iters, env)
    report_goals(rows)
  if args.dtype != "float32" and args.greedy_batch > 0:
    labels = np.arange(args.greedy_batch, dtype=np.int32) * 97 % cfg.num_classes
    shares = greedy_token_shares(official, model32, model, labels, args)
    _common.emit({"bench": "sample_greedy_bf16", "batch": args.greedy_batch, **shares, **env})
    fmt = lambda v: "-" if v is None else f"{100 * v:.2f}%"
    print(f"greedy tokens (top_k=1, cfg {args.cfg}, batch {args.greedy_batch}) equal between "
          f"{args.dtype} and float32: ours {fmt(shares['ours_bf16_greedy_equal'])}, official "
          f"(autocast) {fmt(shares['official_bf16_greedy_equal'])}; ours float32 = official "
          f"float32: {fmt(shares['ours_f32_vs_official_f32_greedy_equal'])}")
  if args.tpu:
    print("TPU, ahead of time (per chip; the compiled roofline is XLA's cost analysis of the "
          "program with its block scans fully unrolled):")
    for r in tpu_rows(model, args):
      _common.emit({**r, **env})


if __name__ == "__main__":
  main()
