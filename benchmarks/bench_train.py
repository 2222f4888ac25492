"""Training-step throughput (steps/s, tokens/s) of the VAR trainer, optionally vs the official step.

  JAX_PLATFORMS=cpu python benchmarks/bench_train.py                            # ours only
  JAX_PLATFORMS=cpu VAR_REF=/path/to/VAR python benchmarks/bench_train.py       # + official

Ours is the step `var-jax train` runs: `train_var.build_task(config)` jitted exactly as
`train.loop.run` jits it (mesh and logical rules from the config over this backend's devices,
sharded init, donated state, the tokenizer params as a frozen argument), compiled ahead of time
so that trace+lower and XLA compile times print separately from the steady-state steps. Models:
* tiny: configs/var_tiny.py (depth 2, patch_nums 1..4, a ch-32 tokenizer with V=64, Cvae=8,
  10 classes, float32), global batch --tiny-batch;
* d16: configs/var_d16.py with the released tokenizer architecture (V=4096, Cvae=32, ch=160,
  random weights), float32 compute on CPU ("bf16 off"), global batches --batch-sizes.
Each step maps a batch of token maps ({"tokens": int32 (B, L), "label"}, the pre-tokenized input
path; `--input images` feeds uint8 images through the tokenizer's encoder instead) through
indices_to_var_input, the training-mode forward (label dropout, drop path), cross-entropy over
all L tokens, backward, global-norm clipping at 2.0 and AdamW.

With VAR_REF set (a checkout of the official VAR repository) and torch importable, the official
step is timed on the same architecture and batch: `build_vae_var` from VAR_REF/models with the
same depth, V, Cvae, ch, patch_nums and classes, random weights (the VQVAE's, which
build_vae_var leaves uninitialised, drawn from N(0, 0.02)), flash and fused kernels off, float32,
on CPU, model in train mode. Its step: `quantize.idxBl_to_var_input` (or `img_to_idxBl` first with
--input images), `var(label_B, x)`, per-token CrossEntropyLoss weighted 1/L and summed (the
official trainer's loss), then the official `utils.amp_sc.AmpOptimizer.backward_clip_step`
(backward, clip_grad_norm_ 2.0, AdamW(betas=(0.9, 0.95)) step, zero_grad) with weight decay 0.05
on the official decay group (>= 2-D weights outside its no-decay names) and 0 elsewhere. The
ratio printed is official step time / ours (> 1: ours is faster).
Model FLOP/s use `var_jax.models.flops.flops_per_example` (what the trainer's logged MFU counts).
Timing: `--warmup` untimed steps, then `--steps` steps each waited for (block_until_ready /
synchronous torch); medians are reported. CPU timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import pathlib
import statistics
import sys
import time
import warnings

import flax.linen as nn
import jax
import numpy as np

import _common
from var_jax.models import flops
from var_jax.parallel import sharding
from var_jax.train import config_lib
from var_jax.models.vqvae_config import VQVAEConfig
from var_jax.train import train_var

REPO = pathlib.Path(__file__).resolve().parents[1]
NO_DECAY_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC",
                 "pos_start", "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias",
                 "scale_mul")  # the official train.py's nowd_keys
WEIGHT_DECAY = 0.05
LEARNING_RATE = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="tiny,d16",
                      help="comma-separated: tiny, d16 (default both)")
  parser.add_argument("--batch-sizes", default="2", help="global batches of d16 (default 2)")
  parser.add_argument("--tiny-batch", type=int, default=16,
                      help="global batch of tiny (default 16)")
  parser.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
  parser.add_argument("--warmup", type=int, default=1,
                      help="untimed steps after compiling (default 1)")
  parser.add_argument("--input", choices=("tokens", "images"), default="tokens",
                      help="token maps (pre-tokenized path, default) or images encoded in the step")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="d16 compute dtype (default float32: bf16 off on CPU)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--var-ref", default=os.environ.get("VAR_REF", ""),
                      help="official VAR checkout (default $VAR_REF; empty: ours only)")
  parser.add_argument("--no-official", action="store_true", help="skip the official step")
  args = parser.parse_args(argv)
  args.models = [m for m in args.models.split(",") if m]
  bad = sorted(set(args.models) - {"tiny", "d16"})
  if bad:
    parser.error(f"unknown models {bad}; choose from tiny, d16")
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
  return args


def model_config(name: str, batch: int, args):
  """The training config of `name` at global batch `batch`."""
  if name == "tiny":
    spec = importlib.util.spec_from_file_location("var_tiny", REPO / "configs" / "var_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"batch={batch}")
  else:
    config = config_lib.var_imagenet_config(16)
    config.tokenizer = dict(path="random", seed=args.seed, overrides={})  # released architecture
    config.model["dtype"] = args.dtype
    config.global_batch_size = batch
  config.seed = args.seed
  config.data.source = "pretokenized" if args.input == "tokens" else config.data.source
  return config


def make_batch(config, var_cfg, batch: int, seed: int) -> dict[str, np.ndarray]:
  """Random token maps (or uint8 images) and labels, as the input pipeline yields them."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, var_cfg.num_classes, (batch,), dtype=np.int32)
  if config.data.source == "pretokenized":
    return {"tokens": rng.integers(0, var_cfg.vocab_size, (batch, var_cfg.seq_len), dtype=np.int32),
            "label": labels}
  size = var_cfg.image_size
  return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), "label": labels}


def median(values) -> float:
  return statistics.median(values)


def peak_rss_gib() -> float | None:
  """Peak RSS in GiB since the last `_common.reset_peak_rss`, None where unknown."""
  peak = _common.peak_rss_since_reset()
  return None if peak is None else peak / 2**30


def time_ours(config, global_batch: int, args) -> dict:
  """Compiles and times the trainer's step; returns timings, the model's config and the batch."""
  _common.reset_peak_rss()
  task, var_cfg = train_var.build_task(config)
  batch_np = make_batch(config, var_cfg, global_batch, args.seed)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config.get("rules"), mesh)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  state, state_shardings = sharding.init_sharded(task.init_state, init_rng, mesh, rules)
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  frozen_shardings = jax.tree.map(lambda _: repl, task.frozen)
  if callable(task.frozen_shardings):  # as in loop.run (e.g. CCA's reference, split as the params)
    frozen_shardings = task.frozen_shardings(task.frozen, state_shardings)
  frozen = jax.device_put(task.frozen, frozen_shardings)
  batch = sharding.make_global_batch(batch_np, mesh)

  def step_fn(state, batch, frozen, rng):  # as in loop.run
    return task.train_step(state, batch, frozen, jax.random.fold_in(rng, state.step))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh),
                                            frozen_shardings, repl),
                     out_shardings=(state_shardings, repl), donate_argnums=0)
    t0 = time.perf_counter()
    lowered = jitted.lower(state, batch, frozen, step_rng)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    times, loss = [], None
    for i in range(args.warmup + args.steps):
      t = time.perf_counter()
      state, metrics = compiled(state, batch, frozen, step_rng)
      loss = float(jax.block_until_ready(metrics["loss"]))
      if i >= args.warmup:
        times.append(time.perf_counter() - t)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return {"lower_s": t1 - t0, "compile_s": t2 - t1, "step_s": median(times), "steps": times,
          "loss": loss, "params": num_params, "var_cfg": var_cfg, "batch": batch_np,
          "peak_rss_gib": peak_rss_gib()}


# -- the official step -------------------------------------------------------------------------

def load_torch(args):
  """(torch, build_vae_var, AmpOptimizer) from VAR_REF, or (None, reason)."""
  torch, why = _common.import_official(args)
  if torch is None:
    return None, why
  # The official checkout's own modules, found through VAR_REF (never copied here).
  from models import build_vae_var  # pylint: disable=import-outside-toplevel
  from utils.amp_sc import AmpOptimizer  # pylint: disable=import-outside-toplevel
  warnings.filterwarnings("ignore", category=FutureWarning)
  return (torch, build_vae_var, AmpOptimizer), why


def time_official(official, config, var_cfg, batch_np, args) -> dict:
  """The official training step on the same architecture and batch (float32, CPU)."""
  torch, build_vae_var, AmpOptimizer = official
  _common.reset_peak_rss()
  vae_cfg = VQVAEConfig.from_mapping(  # the "random" tokenizer's architecture, as build_task's
      {**dict(config.tokenizer.get("overrides", {}) or {}), "patch_nums": tuple(config.patch_nums)})
  torch.manual_seed(args.seed)
  with contextlib.redirect_stdout(io.StringIO()):
    vae, var = build_vae_var(
        device="cpu", patch_nums=tuple(var_cfg.patch_nums), V=vae_cfg.vocab_size,
        Cvae=vae_cfg.z_channels, ch=vae_cfg.ch, share_quant_resi=vae_cfg.share_quant_resi,
        num_classes=var_cfg.num_classes, depth=var_cfg.depth, shared_aln=var_cfg.shared_aln,
        attn_l2_norm=var_cfg.attn_l2_norm, flash_if_available=False, fused_if_available=False,
        init_adaln=var_cfg.init_adaln, init_adaln_gamma=var_cfg.init_adaln_gamma,
        init_head=var_cfg.init_head)
  with torch.no_grad():
    for p in vae.parameters():  # build_vae_var leaves the VQVAE uninitialised
      p.normal_(0.0, 0.02)
  vae.eval()
  var.train()
  decay, no_decay, names, paras = [], [], [], []
  for name, p in var.named_parameters():
    names.append(name)
    paras.append(p)
    skip = p.ndim == 1 or name.endswith("bias") or any(k in name for k in NO_DECAY_KEYS)
    (no_decay if skip else decay).append(p)
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=LEARNING_RATE, betas=(0.9, 0.95), fused=False)
  amp_opt = AmpOptimizer(mixed_precision=0, optimizer=opt, names=names, paras=paras, grad_clip=2.0)
  ce = torch.nn.CrossEntropyLoss(reduction="none")
  L, V = var_cfg.seq_len, var_cfg.vocab_size
  loss_weight = torch.ones(1, L) / L
  labels = torch.from_numpy(batch_np["label"].astype(np.int64))
  if "tokens" in batch_np:
    flat = torch.from_numpy(batch_np["tokens"].astype(np.int64))
    sizes = [pn * pn for pn in var_cfg.patch_nums]
    idx_Bl = list(torch.split(flat, sizes, dim=1))
    images = None
  else:
    images = torch.from_numpy(batch_np["image"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0

  def step():
    idx = vae.img_to_idxBl(images) if images is not None else idx_Bl
    gt_BL = torch.cat(idx, dim=1)
    x = vae.quantize.idxBl_to_var_input(idx)
    logits = var(labels, x)
    loss = ce(logits.view(-1, V), gt_BL.view(-1)).view(labels.shape[0], -1)
    loss = loss.mul(loss_weight).sum(dim=-1).mean()
    amp_opt.backward_clip_step(stepping=True, loss=loss)
    return loss.detach().item()

  times, loss = [], None
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    loss = step()
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  return {"step_s": median(times), "steps": times, "loss": loss,
          "params": sum(p.numel() for p in var.parameters()), "peak_rss_gib": peak_rss_gib()}


def _step_line(timing: dict, tokens: int) -> str:
  steps = ", ".join(f"{t * 1e3:.0f}" for t in timing["steps"])
  step_s = timing["step_s"]
  rss = timing.get("peak_rss_gib")
  return (f"step {step_s * 1e3:.1f} ms (median of [{steps}] ms) -> {1 / step_s:.3f} steps/s, "
          f"{tokens / step_s:.0f} tokens/s; loss {timing['loss']:.4f}"
          + (f"; peak RSS {rss:.1f} GiB" if rss is not None else ""))


def main(argv=None) -> int:
  args = parse_args(argv)
  dev = jax.devices()[0]
  print(f"environment: backend={jax.default_backend()}, device={dev.device_kind}, "
        f"devices={jax.device_count()}, cpu_cores={_common.cpu_count()}, jax={jax.__version__}")
  official, why = load_torch(args)
  print(f"official: {why}")
  runs = [(m, b) for m in args.models
          for b in ([args.tiny_batch] if m == "tiny" else args.batch_sizes)]
  for name, batch in runs:
    config = model_config(name, batch, args)
    print(f"\n== {name}: global batch {batch}, input {args.input}, {config.model['dtype']} ==",
          flush=True)
    ours = time_ours(config, batch, args)
    var_cfg, batch_np = ours["var_cfg"], ours["batch"]
    tokens = batch * var_cfg.seq_len
    row = {"model": name, "batch": batch, "input": args.input, "dtype": config.model["dtype"],
           "params": ours["params"], "L": var_cfg.seq_len, "lower_s": ours["lower_s"],
           "compile_s": ours["compile_s"], "step_s": ours["step_s"],
           "steps_per_s": 1.0 / ours["step_s"], "tokens_per_s": tokens / ours["step_s"],
           "loss": ours["loss"], "peak_rss_gib": ours["peak_rss_gib"],
           "model_flops_per_example": flops.flops_per_example(var_cfg),
           "model_flops_per_s": flops.flops_per_example(var_cfg) * batch / ours["step_s"]}
    print(f"  ours: {ours['params'] / 1e6:.2f} M params, trace+lower {ours['lower_s']:.1f} s, "
          f"compile {ours['compile_s']:.1f} s; {_step_line(ours, tokens)}; "
          f"{row['model_flops_per_s'] / 1e9:.1f} model GFLOP/s (var_jax.models.flops, the trainer's MFU "
          "numerator)", flush=True)
    if official is not None:
      theirs = time_official(official, config, var_cfg, batch_np, args)
      row.update(official_step_s=theirs["step_s"],
                 official_tokens_per_s=tokens / theirs["step_s"],
                 official_params=theirs["params"], official_loss=theirs["loss"],
                 official_peak_rss_gib=theirs["peak_rss_gib"],
                 ratio=theirs["step_s"] / ours["step_s"])
      print(f"  official: {theirs['params'] / 1e6:.2f} M params; {_step_line(theirs, tokens)}")
      print(f"  official / ours step time: {row['ratio']:.2f}x "
            f"({'ours faster' if row['ratio'] > 1 else 'official faster'})")
    print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
