"""A tiny multi-scale VQVAE on 32 px generated shapes: tests and CPU smoke runs (no download).

  var-jax train-tokenizer --config configs/vqvae_tiny.py --workdir /tmp/vqvae_tiny
Args: steps, batch, gan (turn the PatchGAN on from step 2).
"""
from var_jax.train import config_lib
from var_jax.train import rfid_eval
from var_jax.train.losses import vqgan


def get_config(arg=None):
  args = config_lib.parse_arg(arg, steps=200, batch=8, seed=0, gan=False)
  c = config_lib.base_train_config()
  c.seed = args.seed
  c.patch_nums = (1, 2, 4, 8)
  c.vqvae = dict(vocab_size=64, z_channels=8, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, num_groups=4,
                 using_sa=False, using_mid_sa=True, beta=0.25, quant_resi=0.5, share_quant_resi=4)
  c.data.source = "shapes"
  c.data.image_size = 32
  c.data.num_workers = 2
  c.data.prefetch = 1
  c.global_batch_size = args.batch
  c.total_steps = args.steps
  c.log_every = 10
  c.checkpoint_every = 50
  c.reconstruct_every = 0
  c.loss = vqgan.default_loss_config()
  c.loss.perceptual_weight = 0.0
  c.loss.pixel_loss = "l2"
  c.loss.disc_weight = 0.5 if args.gan else 0.0
  c.loss.disc_start_step = 2
  c.loss.disc_ndf = 8
  c.loss.disc_layers = 2
  c.loss.disc_num_groups = 4
  c.optim.tblr = 1e-3 * 256 / 8
  c.optim.schedule = "cos"
  c.optim.warmup_steps = min(20, args.steps // 10)
  c.optim.twd = 0.0
  c.optim.b2 = 0.99
  c.optim.clip_norm = 1.0
  c.optim.ema_decay = 0.9
  c.disc_optim = c.optim.copy_and_resolve_references()
  c.eval = rfid_eval.default_eval_config()  # rFID: set eval.fid_inception_path
  c.eval.fid_num_images = 64
  return c
