"""VAR-d36 on ImageNet 512 px with shared AdaLN, the official recipe (bs 768, 350 epochs, tblr 8e-5, alng 5e-6, twde 0.08).

  var-jax train --config configs/var_d36.py --workdir gs://BUCKET/var_d36 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets
Args: `:tiny` (a 2-step CPU smoke run on generated data), `:pretokenized` (read token shards).
"""
from var_jax.train import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, tiny=False, pretokenized=False)
  return config_lib.var_imagenet_config(36, args.tiny, args.pretokenized)
