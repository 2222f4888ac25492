"""Input pipeline: deterministic, resumable, per-host batches of images or pre-tokenized data.

Start from `default_data_config()`, then `make_input_iterator(...)` gives this host's batches;
`scale_to_model_range` maps uint8 images to [-1, 1] on device; `write_pretokenized` writes token
shards for `var-jax pretokenize`.
"""
from var_jax.data.augment import scale_to_model_range
from var_jax.data.config import default_data_config, validate_data_config
from var_jax.data.pipeline import make_input_iterator
from var_jax.data.pretokenize import write_pretokenized

__all__ = [
    "default_data_config",
    "make_input_iterator",
    "scale_to_model_range",
    "validate_data_config",
    "write_pretokenized",
]
