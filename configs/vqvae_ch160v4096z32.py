"""The released tokenizer's architecture (vae_ch160v4096z32: V=4096, Cvae=32, ch=160), trained
from scratch with the VQGAN-style recipe on ImageNet 256 px.

  var-jax train-tokenizer --config configs/vqvae_ch160v4096z32.py --workdir gs://BUCKET/vqvae \
      --config.data.data_dir=gs://BUCKET/tfds --config.loss.lpips_vgg_path=... --config.loss.lpips_lin_path=...
The official tokenizer was trained elsewhere (OpenImages, unreleased code); this recipe follows the
common VQGAN settings. The architecture matches the released file exactly, so the official weights
can also be fine-tuned: --config.init_from is for var-jax runs, for the .pth use
`var-jax convert` and the converted params. Add --config.eval.fid_inception_path=PATH (pytorch-fid's
pt_inception-2015-12-05-6726825d.pth) to log rFID on ImageNet validation images.
Args: tiny (a 2-step CPU smoke run on generated data at 64 px).
"""
from var_jax.train import config_lib
from var_jax.models.vqvae_config import PATCH_NUMS_256
from var_jax.train import rfid_eval
from var_jax.train.losses import vqgan


def get_config(arg=None):
  args = config_lib.parse_arg(arg, tiny=False)
  c = config_lib.base_train_config()
  c.patch_nums = PATCH_NUMS_256
  c.vqvae = dict(vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                 num_groups=32, beta=0.25, quant_resi=0.5, share_quant_resi=4, dtype="bfloat16")
  c.data.image_size = 256
  c.global_batch_size = 256
  c.total_steps = 400_000
  c.log_every = 100
  c.checkpoint_every = 5000
  c.reconstruct_every = 5000
  c.loss = vqgan.default_loss_config()
  c.loss.disc_start_step = 20_000
  c.loss.reseed_dead_codes = True
  c.optim.tblr = 1e-4
  c.optim.schedule = "cos"
  c.optim.warmup_steps = 5000
  c.optim.wpe = 0.1
  c.optim.twd = 0.0
  c.optim.b1, c.optim.b2 = 0.5, 0.9
  c.optim.clip_norm = 1.0
  c.optim.ema_decay = 0.999
  c.disc_optim = c.optim.copy_and_resolve_references()
  c.disc_optim.ema_decay = 0.0
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  # rFID on 10k ImageNet validation images every 5000 steps once eval.fid_inception_path is set.
  c.eval = rfid_eval.default_eval_config()
  c.eval.every = 5000
  if args.tiny:
    c.patch_nums = (1, 2, 3, 4)
    c.vqvae.update(ch=32, vocab_size=64, z_channels=8, dtype="float32")
    c.data.source, c.data.image_size, c.data.num_workers = "shapes", 64, 2
    c.global_batch_size, c.total_steps, c.log_every, c.checkpoint_every, c.reconstruct_every = 4, 2, 1, 1, 0
    c.loss.perceptual_weight, c.loss.disc_start_step = 0.0, 1
    c.optim.warmup_steps = 1
    c.disc_optim.warmup_steps = 1
  return c
