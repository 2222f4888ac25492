"""Shared loaders for the official fixtures (see tests/fixtures/README.md)."""
import functools
import pathlib

import jax.numpy as jnp
import numpy as np

import var_jax

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
PATCH_NUMS = (1, 2, 3, 4)
TAGS = ("tiny", "tiny_saln")


@functools.lru_cache(maxsize=None)
def reference(tag: str) -> dict:
  return dict(np.load(FIXTURES / f"official_{tag}_seed0.npz"))


@functools.lru_cache(maxsize=None)
def tokenizer() -> var_jax.Tokenizer:
  return var_jax.Tokenizer.from_torch(FIXTURES / "official_tiny_vae.pth", patch_nums=PATCH_NUMS)


@functools.lru_cache(maxsize=None)
def model(tag: str) -> var_jax.VARModel:
  return var_jax.VARModel.from_torch(FIXTURES / f"official_{tag}_seed0_var.pth", tokenizer())


def split_tokens(idx_BL: np.ndarray, patch_nums=PATCH_NUMS) -> list:
  """(B, L) concatenated tokens -> list of (B, pn, pn) int32 maps."""
  out, start = [], 0
  for p in patch_nums:
    out.append(jnp.asarray(idx_BL[:, start:start + p * p].reshape(-1, p, p), jnp.int32))
    start += p * p
  return out


def concat_tokens(maps) -> np.ndarray:
  return np.concatenate([np.asarray(m).reshape(m.shape[0], -1) for m in maps], axis=1)
