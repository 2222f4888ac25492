"""Model-agnostic training machinery: optimizer, checkpoints, metrics."""
