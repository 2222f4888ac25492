"""A small VAR on the generated shapes data set, on top of a tokenizer from configs/vqvae_shapes.py.

  var-jax train --config configs/var_shapes.py --workdir /tmp/var_shapes \
      --config.tokenizer.path=/tmp/vqvae_shapes
This is the recipe of the shipped `shapes-tiny` model (scripts/train_shapes_tiny.py runs both).
Args: steps, batch, depth, width.
"""
from var_jax.train import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, steps=3000, batch=32, depth=4, width=192, seed=0)
  c = config_lib.base_train_config()
  c.seed = args.seed
  c.patch_nums = (1, 2, 3, 4, 6, 8)
  c.model = dict(depth=args.depth, embed_dim=args.width, num_heads=max(1, args.width // 64),
                 num_classes=10, dtype="float32", remat_policy="none", attention_impl="auto",
                 cond_drop_rate=0.1, drop_path_rate=0.0, init_adaln_gamma=1e-3)
  c.tokenizer = dict(path="", overrides={})
  c.data.source = "shapes"
  c.data.image_size = 64
  c.data.num_workers = 2
  c.data.shapes_num_examples = 50_000
  c.global_batch_size = args.batch
  c.total_steps = args.steps
  c.log_every = 50
  c.checkpoint_every = 500
  c.sample_every = 1000
  c.sample_classes = list(range(10))
  c.sample_cfg, c.sample_top_k, c.sample_top_p = 1.5, 900, 0.96
  c.label_smoothing = 0.0
  c.progressive = config_lib.progressive_config()  # off (pg=0)
  config_lib.add_objective_fields(c)  # cross-entropy; objective=cca: guidance-free fine-tuning
  c.optim.tblr = 1e-3 * 256 / 32
  c.optim.schedule = "cos"
  c.optim.warmup_steps = min(100, args.steps // 10)
  c.optim.wpe = 0.05
  c.optim.clip_norm = 2.0
  c.optim.ema_decay = 0.995
  return c
