"""The shipped ml_collections config files (installed as var_jax.configs; load them by path or name)."""
