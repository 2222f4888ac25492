"""A small multi-scale VQVAE for the generated shapes data set (64 px), trainable on CPU.

  var-jax train-tokenizer --config configs/vqvae_shapes.py --workdir /tmp/vqvae_shapes
No download: the data are generated, LPIPS is off (its VGG weights are a download).
Args: steps, batch.
"""
from var_jax.train import config_lib
from var_jax.train import rfid_eval
from var_jax.train.losses import vqgan


def get_config(arg=None):
  args = config_lib.parse_arg(arg, steps=1000, batch=32, seed=0)
  c = config_lib.base_train_config()
  c.seed = args.seed
  # Three down-samplings (ch_mult of length 4, the official has 5) give an 8x8 latent at 64 px:
  # shapes need more than the 4x4 grid of the official x16 layout.
  c.patch_nums = (1, 2, 3, 4, 6, 8)
  c.vqvae = dict(vocab_size=128, z_channels=16, ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1,
                 num_groups=8, beta=0.25, quant_resi=0.5, share_quant_resi=4)
  c.data.source = "shapes"
  c.data.image_size = 64
  c.data.num_workers = 2
  c.data.shapes_num_examples = 50_000
  c.global_batch_size = args.batch
  c.total_steps = args.steps
  c.log_every = 50
  c.checkpoint_every = 500
  c.reconstruct_every = 1000
  c.loss = vqgan.default_loss_config()
  c.loss.perceptual_weight = 0.0
  c.loss.pixel_loss = "l1"
  c.loss.disc_weight = 0.0
  c.loss.disc_start_step = 10**9
  c.loss.reseed_dead_codes = True
  c.loss.reseed_every_steps = 200
  c.optim.tblr = 1e-3 * 256 / 32  # peak lr 1e-3 at batch 32
  c.optim.schedule = "cos"
  c.optim.warmup_steps = min(50, args.steps // 10)
  c.optim.wpe = 0.05
  c.optim.twd = 0.0
  c.optim.b2 = 0.99
  c.optim.clip_norm = 1.0
  c.optim.ema_decay = 0.99
  c.disc_optim = c.optim.copy_and_resolve_references()
  c.eval = rfid_eval.default_eval_config()  # rFID: set eval.fid_inception_path
  c.eval.fid_num_images = 1000
  c.eval.every = 1000
  return c
