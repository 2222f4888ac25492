"""VAR on ImageNet with the official per-depth recipes (VAR_SPEC §5.5).

  var-jax train --config configs/var_imagenet.py:depth=16 --workdir gs://BUCKET/var_d16
Args: depth (16, 20, 24, 30, 36), tiny (2 layers, 16 images, 2 steps on generated data),
pretokenized (read token shards from data.data_dir instead of encoding images in the step).
"""
from var_jax.train import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, depth=16, tiny=False, pretokenized=False)
  return config_lib.var_imagenet_config(args.depth, args.tiny, args.pretokenized)
