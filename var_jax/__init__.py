"""var_jax: VAR (Visual AutoRegressive modeling, next-scale prediction) in JAX/Flax.

    import jax, var_jax
    model = var_jax.load_pretrained("d16")
    images = var_jax.sample(model, [207, 360], rng=jax.random.key(0))   # uint8 (2, 256, 256, 3)
"""
from var_jax import errors
from var_jax.inference.placement import sampling_mesh
from var_jax.inference.edit import edit
from var_jax.inference.sampler import sample
from var_jax.inference.tokenizer import Tokenizer
from var_jax.checkpoints.torch_pickle import load_torch_checkpoint
from var_jax.inference.var_model import VARModel
from var_jax.inference.pretrained import load_pretrained

__version__ = "0.1.0"

__all__ = ["Tokenizer", "VARModel", "edit", "errors", "load_pretrained", "load_torch_checkpoint", "sample",
           "sampling_mesh"]
