"""var_jax: VAR (Visual AutoRegressive modeling, next-scale prediction) in JAX/Flax."""
__version__ = "0.1.0"
