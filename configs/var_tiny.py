"""A tiny VAR trained on CPU on generated shapes (no download), for tests and smoke runs.

  var-jax train --config configs/var_tiny.py --workdir /tmp/var_tiny
The tokenizer is randomly initialised unless tokenizer.path names a trained one.
"""
from var_jax.train import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, steps=20, batch=16, depth=2, seed=0)
  c = config_lib.base_train_config()
  c.seed = args.seed
  c.patch_nums = (1, 2, 3, 4)
  c.model = dict(depth=args.depth, num_classes=10, dtype="float32", remat_policy="none",
                 attention_impl="auto", cond_drop_rate=0.1, init_adaln_gamma=1e-3)
  c.tokenizer = dict(path="random", seed=0, overrides=dict(ch=32, vocab_size=64, z_channels=8))
  c.data.source = "shapes"
  c.data.image_size = 64
  c.data.num_workers = 2
  c.data.prefetch = 1
  c.global_batch_size = args.batch
  c.total_steps = args.steps
  c.log_every = 1
  c.checkpoint_every = 5
  c.sample_every = 0
  c.sample_cfg, c.sample_top_k, c.sample_top_p = 1.5, 900, 0.96
  c.label_smoothing = 0.0
  c.progressive = config_lib.progressive_config()  # off (pg=0)
  config_lib.add_objective_fields(c)  # cross-entropy; objective=cca: guidance-free fine-tuning
  c.optim.tblr = 1e-3
  c.optim.warmup_steps = 2
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  return c
