"""VAR-d24 on ImageNet 256 px, the official recipe (README: bs 768, 350 epochs, tblr 8e-5, alng 1e-4, wpe 0.01).

  var-jax train --config configs/var_d24.py --workdir gs://BUCKET/var_d24 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets
Args: `:tiny` (a 2-step CPU smoke run on generated data), `:pretokenized` (read token shards).
"""
from var_jax.train import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, tiny=False, pretokenized=False)
  return config_lib.var_imagenet_config(24, args.tiny, args.pretokenized)
