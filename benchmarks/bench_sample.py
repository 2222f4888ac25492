"""Class-conditional sampling throughput (images/s) of VAR-d16 + the 256 px tokenizer, random weights.

  JAX_PLATFORMS=cpu python benchmarks/bench_sample.py                          # ours only
  JAX_PLATFORMS=cpu VAR_REF=/path/to/VAR python benchmarks/bench_sample.py     # + official

Times `var_jax.sample` (all 10 scales with the KV cache, classifier-free guidance, top-k/top-p
filtering and the VQVAE decode, one jit) at each batch size: the first call (trace + compile +
run) separately from steady-state calls, and, after jax.clear_caches(), the ahead-of-time
`sampler.build_sample_call(...).lower()` (trace + lower) and `.compile()` (XLA) times with the executable's
memory_analysis(). With VAR_REF and torch, the official
`var.autoregressive_infer_cfg(B, label_B, g_seed=0, cfg, top_k, top_p)` runs on the same weights
and labels and the speed ratio ours/official is printed (> 1: ours faster).

FLOPs per image: the transformer's matmuls counted analytically (guidance doubles the batch; per
scale: linear layers 2 x params x tokens, attention 4 x pn² x kv_len x C per layer, the head,
the AdaLN projections), plus the decoder's FLOPs from XLA's cost_analysis() of the decode. The
achieved FLOP/s is printed next to a measured float32 matmul rate of this backend.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import _common
import var_jax
from var_jax.inference import sampler
from var_jax.models import flops as var_flops
from var_jax.models.vqvae import VQVAE

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
  parser.add_argument("--profile-dir", default="",
                      help="also record a jax.profiler trace of one steady call per batch size here "
                           "(TensorBoard / Perfetto)")
  parser.add_argument("--no-flops", action="store_true",
                      help="skip the decoder cost analysis and the matmul-rate measurement")
  return parser.parse_args(argv)


# -- FLOPs -------------------------------------------------------------------------------------

def decoder_flops_per_image(tok) -> float | None:
  """XLA's FLOP count of decoding one f_hat to an image (post_quant_conv + decoder)."""
  size = tok.config.latent_size
  f_hat = jnp.zeros((1, size, size, tok.config.z_channels), jnp.float32)
  fn = jax.jit(lambda p, f: tok.module.apply({"params": p}, f, method=VQVAE.decode_fhat))
  cost = fn.lower(tok.params, f_hat).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return None if not cost or "flops" not in cost else float(cost["flops"])


# -- timing ------------------------------------------------------------------------------------

def time_ours(model, labels: np.ndarray, args) -> dict:
  """var_jax.sample: first call (compile) and steady state, from clean caches."""
  jax.clear_caches()
  key = jax.random.key(args.seed)
  kwargs = dict(rng=key, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
  _common.reset_peak_rss()
  timing = _common.time_calls(lambda: var_jax.sample(model, labels, **kwargs), args.iters)
  result = {"timing": timing, "peak_rss": _common.peak_rss_since_reset(),
            "device_peak": _common.device_peak_bytes()}
  if args.profile_dir:
    with jax.profiler.trace(f"{args.profile_dir}/batch{labels.shape[0]}", create_perfetto_trace=True):
      jax.block_until_ready(var_jax.sample(model, labels, **kwargs))
  return result


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


def time_official(official: _common.Official, labels: np.ndarray, args) -> dict:
  """The official autoregressive_infer_cfg on the same weights and labels."""
  torch = official.torch
  label_B = torch.from_numpy(labels.astype(np.int64))
  B = labels.shape[0]

  def run():
    return official.var.autoregressive_infer_cfg(B, label_B, g_seed=args.seed, cfg=args.cfg,
                                                 top_k=args.top_k, top_p=args.top_p)

  _common.reset_peak_rss()
  with torch.inference_mode():
    timing = _common.time_torch(run, args.iters, args.torch_warmup)
  return {"timing": timing, "peak_rss": _common.peak_rss_since_reset()}


# -- report ------------------------------------------------------------------------------------

def report_goals(rows: list[dict]) -> None:
  """The brief's goals: faster than official at batch 1, no slower at batch 8, compile < 60 s."""
  print("goals (CPU):")
  for batch, want in ((1, "faster than"), (8, "no slower than")):
    row = next((r for r in rows if r["batch"] == batch), None)
    if row is None or row.get("speedup") is None:
      print(f"  batch {batch}: {want} official - not measured")
      continue
    ok = row["speedup"] > 1.0 if batch == 1 else row["speedup"] >= 1.0
    print(f"  batch {batch}: {want} official - ours {row['ours_images_per_s']:.4f} img/s vs official "
          f"{row['official_images_per_s']:.4f} img/s (x{row['speedup']:.2f}): {'MET' if ok else 'NOT MET'}")
  for row in rows:
    estimate = row["ours_compile_s"]
    aot = None if row.get("ours_aot_compile_s") is None else row["ours_aot_lower_s"] + row["ours_aot_compile_s"]
    worst = max(estimate, aot or 0.0)
    aot_text = "-" if aot is None else f"{aot:.1f} s"
    print(f"  batch {row['batch']}: compile < {COMPILE_GOAL_S:.0f} s - first call - steady {estimate:.1f} s, "
          f"AOT lower+compile {aot_text}: {'MET' if worst < COMPILE_GOAL_S else 'NOT MET'}")


def measure_flops(args, official, tok, cfg, env) -> tuple[dict[str, float], float | None]:
  """Analytic transformer FLOPs per image; decoder FLOPs (XLA) and matmul rates unless --no-flops."""
  flops = var_flops.sampler_flops_per_image(cfg)
  decoder_flops = None
  if not args.no_flops:
    decoder_flops = decoder_flops_per_image(tok)
    jax_mm = _common.matmul_flops_per_s()
    torch_mm = _common.torch_matmul_flops_per_s(official.torch) if official is not None else None
    print(f"float32 2048^3 matmul rate: JAX {jax_mm / 1e9:.1f} GFLOP/s"
          + (f", torch {torch_mm / 1e9:.1f} GFLOP/s" if torch_mm else ""))
    _common.emit({"bench": "sample", "op": "matmul_2048_f32", "jax_flops_per_s": jax_mm,
                  "torch_flops_per_s": torch_mm, **env})
  print("transformer FLOPs per image (guidance, KV cache): "
        + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in flops.items())
        + (f"; decoder (XLA cost analysis) {decoder_flops / 1e9:.1f} G" if decoder_flops else ""))
  return flops, decoder_flops


def measure_batch(args, official, model, batch: int, flops: dict[str, float],
                  decoder_flops: float | None) -> dict:
  """Ours (first call, steady state, optionally AOT) and the official at one batch size: one row."""
  cfg = model.config
  total_flops = None if decoder_flops is None else flops["total"] + decoder_flops
  per_s = lambda f, seconds: None if f is None else f * batch / seconds
  labels = np.random.default_rng(args.seed + batch).integers(0, cfg.num_classes, (batch,)).astype(np.int32)
  ours = time_ours(model, labels, args)
  t = ours["timing"]
  row = {
      "bench": "sample", "depth": cfg.depth, "batch": batch, "iters": args.iters, "cfg": args.cfg,
      "top_k": args.top_k, "top_p": args.top_p,
      "ours_images_per_s": batch / t.median_s, "ours_steady_s": t.median_s, "ours_steady_min_s": t.min_s,
      "ours_first_call_s": t.first_s, "ours_compile_s": t.first_minus_steady_s,
      "ours_peak_rss_bytes": ours["peak_rss"], "ours_device_peak_bytes": ours["device_peak"],
      "transformer_flops_per_image": flops["total"], "decoder_flops_per_image": decoder_flops,
      "ours_transformer_flops_per_s": per_s(flops["total"], t.median_s),
      "ours_total_flops_per_s": per_s(total_flops, t.median_s),
  }
  if official is not None:
    theirs = time_official(official, labels, args)
    o = theirs["timing"]
    row.update({"official_images_per_s": batch / o.median_s, "official_steady_s": o.median_s,
                "official_first_call_s": o.first_s, "official_peak_rss_bytes": theirs["peak_rss"],
                "official_total_flops_per_s": per_s(total_flops, o.median_s),
                "speedup": _common.speedup(t.median_s, o.median_s)})
  if not args.no_aot and batch in args.aot_batch_sizes:
    aot = aot_compile_ours(model, labels, args)
    row.update({"ours_aot_lower_s": aot["lower_s"], "ours_aot_compile_s": aot["compile_s"],
                **{f"ours_{k}": v for k, v in aot["memory"].items()}})
  return row


def print_tables(rows: list[dict], depth: int, iters: int, env: dict) -> None:
  _common.print_table(
      f"VAR-d{depth} sampling, {env['backend']} ({env['device']}), median of {iters} steady calls",
      rows,
      [("batch", "batch", "d"), ("ours img/s", "ours_images_per_s", ".4f"), ("ours s", "ours_steady_s", ".2f"),
       ("first call s", "ours_first_call_s", ".1f"), ("compile s", "ours_compile_s", ".1f"),
       ("AOT lower s", "ours_aot_lower_s", ".1f"), ("AOT compile s", "ours_aot_compile_s", ".1f"),
       ("official img/s", "official_images_per_s", ".4f"), ("official s", "official_steady_s", ".2f"),
       ("ours/official", "speedup", ".2f")])
  _common.print_table(
      "FLOP/s (transformer analytic + decoder from XLA) and memory (MiB)",
      [{**r, **{k: _common.mib(r.get(k)) for k in r if k.endswith("_bytes")},
        **{k: r[k] / 1e9 for k in r if k.endswith("_flops_per_s") and r[k] is not None}} for r in rows],
      [("batch", "batch", "d"), ("ours GFLOP/s", "ours_total_flops_per_s", ".1f"),
       ("of which transformer", "ours_transformer_flops_per_s", ".1f"),
       ("official GFLOP/s", "official_total_flops_per_s", ".1f"), ("XLA temp", "ours_temp_bytes", ""),
       ("XLA args", "ours_argument_bytes", ""), ("ours peak RSS", "ours_peak_rss_bytes", ""),
       ("official peak RSS", "official_peak_rss_bytes", "")])


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.iters < 1:
    raise SystemExit("--iters must be >= 1")
  env = _common.environment()
  _common.print_environment(env)
  official, why, tok, model = _common.models(args, depth=args.depth, need_var=True)
  print(f"official comparison: {'on' if official is not None else 'off'} ({why})")
  cfg = model.config
  print(f"VAR-d{cfg.depth}: {model.num_params() / 1e6:.1f} M params; cfg={args.cfg}, top_k={args.top_k}, "
        f"top_p={args.top_p}")
  flops, decoder_flops = measure_flops(args, official, tok, cfg, env)
  rows = []
  for batch in args.batch_sizes:
    rows.append(measure_batch(args, official, model, batch, flops, decoder_flops))
    _common.emit({**rows[-1], **env})
  print_tables(rows, cfg.depth, args.iters, env)
  report_goals(rows)


if __name__ == "__main__":
  main()
