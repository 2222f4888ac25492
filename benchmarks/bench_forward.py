"""Teacher-forcing forward and forward+backward throughput (tokens/s) of VAR-d16, random weights.

  JAX_PLATFORMS=cpu python benchmarks/bench_forward.py                          # ours only
  JAX_PLATFORMS=cpu VAR_REF=/path/to/VAR python benchmarks/bench_forward.py     # + official

Both modes run the model in training mode (label dropout cond_drop_rate and drop path on) and
compute the mean cross-entropy of all L tokens against random targets:
  fwd      jit(loss)                    official: var(label_B, x_BLCv_wo_first_l) + CE, inference_mode
  fwd+bwd  jit(value_and_grad(loss))    official: the same + loss.backward()
Ours is compiled ahead of time, so trace+lower and XLA compile times are printed separately from
the first and steady-state calls. Memory: the executable's memory_analysis() (temp, argument,
output bytes), the process peak RSS during the timed calls (Linux VmHWM, reset before each
measurement; getrusage's lifetime peak is in the JSON), and on GPU/TPU the device's
peak_bytes_in_use. d16 fwd+bwd on a few CPU cores takes tens of seconds per step: keep --iters low.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import _common
from var_jax.models.var import VAR
from var_jax.models.vqvae import VQVAE

MODES = ("fwd", "fwd+bwd")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  _common.add_common_flags(parser, batch_sizes="2,4", iters=2)
  parser.add_argument("--depth", type=int, default=16, help="VAR depth (default 16)")
  parser.add_argument("--modes", default=",".join(MODES),
                      help=f"comma-separated subset of {MODES} (default both)")
  args = parser.parse_args(argv)
  args.modes = [m for m in args.modes.split(",") if m]
  bad = sorted(set(args.modes) - set(MODES))
  if bad:
    parser.error(f"unknown modes {bad}; choose from {MODES}")
  return args


def make_loss_fn(config):
  """Mean cross-entropy of the training-mode logits against the target tokens."""
  module = VAR(config, train=True)

  def loss_fn(params, labels_B, x_BlCv, targets_BL, key):
    logits_BLV = module.apply({"params": params}, labels_B, x_BlCv, rngs={"dropout": key})
    logp_BLV = jax.nn.log_softmax(logits_BLV, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1))

  return loss_fn


def make_inputs(tok, config, batch: int, seed: int):
  """Labels (B,), the teacher-forcing input (B, L - first_l, Cvae) and the targets (B, L)."""
  idx_maps = _common.random_index_maps(seed, batch, config.patch_nums, config.vocab_size)
  x_BlCv = tok.apply([jnp.asarray(m) for m in idx_maps], method=VQVAE.indices_to_var_input)
  targets_BL = np.concatenate([m.reshape(batch, -1) for m in idx_maps], axis=1)
  labels_B = np.random.default_rng(seed).integers(0, config.num_classes, (batch,), dtype=np.int32)
  return labels_B, np.asarray(x_BlCv), targets_BL


def time_ours(model, mode: str, inputs, iters: int, seed: int) -> dict:
  """AOT-compiles the mode, then times it; returns timings, compile times and memory."""
  loss_fn = make_loss_fn(model.config)
  fn = jax.jit(loss_fn if mode == "fwd" else jax.value_and_grad(loss_fn))
  args = (model.params, *(jnp.asarray(a) for a in inputs), jax.random.key(seed))
  compiled, lower_s, compile_s = _common.aot_compile(fn, *args)
  _common.reset_peak_rss()
  timing = _common.time_calls(lambda: compiled(*args), iters)
  return {"timing": timing, "lower_s": lower_s, "compile_s": compile_s,
          "peak_rss": _common.peak_rss_since_reset(), "memory": _common.memory_analysis(compiled),
          "device_peak": _common.device_peak_bytes()}


def time_official(official: _common.Official, mode: str, inputs, iters: int, warmup: int) -> dict:
  """The official var(label_B, x) in train mode + CE (+ backward) on the same inputs."""
  torch = official.torch
  var = official.var
  labels_B, x_BlCv, targets_BL = inputs
  label = official.tensor(labels_B, np.int64)
  x = official.tensor(x_BlCv, np.float32)
  targets = official.tensor(targets_BL, np.int64).reshape(-1)
  V = var.V
  var.train()

  def fwd():
    with torch.inference_mode():
      return torch.nn.functional.cross_entropy(var(label, x).reshape(-1, V), targets)

  def fwd_bwd():
    var.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(var(label, x).reshape(-1, V), targets)
    loss.backward()
    return loss

  _common.reset_peak_rss()
  timing = _common.time_torch(fwd if mode == "fwd" else fwd_bwd, iters, warmup, official.synchronize)
  peak = _common.peak_rss_since_reset()
  var.zero_grad(set_to_none=True)
  var.eval()
  return {"timing": timing, "peak_rss": peak}


def measure(args, official, model, tok, batch: int, mode: str) -> dict:
  """Ours (and the official) for one batch size and mode: one row."""
  cfg = model.config
  inputs = make_inputs(tok, cfg, batch, args.seed + batch)
  tokens = batch * cfg.seq_len
  ours = time_ours(model, mode, inputs, args.iters, args.seed)
  t = ours["timing"]
  row = {
      "bench": "forward", "mode": mode, "depth": cfg.depth, "batch": batch, "tokens": tokens,
      "iters": args.iters, "ours_tokens_per_s": tokens / t.median_s, "ours_steady_s": t.median_s,
      "ours_steady_min_s": t.min_s, "ours_first_call_s": t.first_s, "ours_lower_s": ours["lower_s"],
      "ours_compile_s": ours["compile_s"], "ours_peak_rss_bytes": ours["peak_rss"],
      "lifetime_peak_rss_bytes": _common.lifetime_peak_rss(),
      "ours_device_peak_bytes": ours["device_peak"], **{f"ours_{k}": v for k, v in ours["memory"].items()},
  }
  if official is not None:
    theirs = time_official(official, mode, inputs, args.iters, args.torch_warmup)
    o = theirs["timing"]
    row.update({"official_tokens_per_s": tokens / o.median_s, "official_steady_s": o.median_s,
                "official_first_call_s": o.first_s, "official_peak_rss_bytes": theirs["peak_rss"],
                "speedup": _common.speedup(t.median_s, o.median_s)})
  return row


def print_tables(rows: list[dict], depth: int, iters: int, env: dict) -> None:
  _common.print_table(
      f"VAR-d{depth} teacher forcing, {env['backend']} ({env['device']}), median of {iters} steady calls",
      rows,
      [("mode", "mode", ""), ("batch", "batch", "d"), ("ours tok/s", "ours_tokens_per_s", ".0f"),
       ("ours s", "ours_steady_s", ".2f"), ("lower s", "ours_lower_s", ".1f"),
       ("compile s", "ours_compile_s", ".1f"), ("official tok/s", "official_tokens_per_s", ".0f"),
       ("official s", "official_steady_s", ".2f"), ("ours/official", "speedup", ".2f")])
  _common.print_table(
      "memory (MiB)",
      [{**r, **{k: _common.mib(r.get(k)) for k in r if k.endswith("_bytes")}} for r in rows],
      [("mode", "mode", ""), ("batch", "batch", "d"), ("XLA temp", "ours_temp_bytes", ""),
       ("XLA args", "ours_argument_bytes", ""), ("XLA out", "ours_output_bytes", ""),
       ("ours peak RSS", "ours_peak_rss_bytes", ""), ("device peak", "ours_device_peak_bytes", ""),
       ("official peak RSS", "official_peak_rss_bytes", "")])
  print("peak RSS: process high-water mark during the timed calls (reset before each; includes "
        "everything resident, e.g. both models' weights when comparing).")


def main(argv=None) -> None:
  args = parse_args(argv)
  env = _common.environment()
  _common.print_environment(env)
  official, why, tok, model = _common.models(args, depth=args.depth, need_var=True)
  print(f"official comparison: {'on' if official is not None else 'off'} ({why})")
  cfg = model.config
  print(f"VAR-d{cfg.depth}: {model.num_params() / 1e6:.1f} M params, L={cfg.seq_len} tokens, "
        f"V={cfg.vocab_size}")
  rows = []
  for batch in args.batch_sizes:
    for mode in args.modes:
      rows.append(measure(args, official, model, tok, batch, mode))
      _common.emit({**rows[-1], **env})
  print_tables(rows, cfg.depth, args.iters, env)


if __name__ == "__main__":
  main()
