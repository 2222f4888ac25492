"""VAR-d20 on ImageNet 256 px, the official recipe (README: bs 768, 250 epochs, tblr 1e-4, alng 1e-3, wpe 0.1).

  var-jax train --config configs/var_d20.py --workdir gs://BUCKET/var_d20 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets
Args: `:tiny` (a 2-step CPU smoke run on generated data), `:pretokenized` (read token shards).
"""
from var_jax.train import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, tiny=False, pretokenized=False)
  return config_lib.var_imagenet_config(20, args.tiny, args.pretokenized)
