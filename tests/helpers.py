"""Shared loaders for the official fixtures (see tests/fixtures/README.md)."""
import dataclasses
import functools
import pathlib

import jax
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


def read_token_shard(path, num_variants: int, seq_len: int, token_dtype: str = "<i2") -> dict:
  """A pre-tokenized array_record shard decoded by its documented layout (token_shards' docstring),
  independently of var_jax: {"tokens": (n, K, L), "labels": (n,), "source_indices": (n,)}."""
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(str(path))
  try:
    records = reader.read_all()
  finally:
    reader.close()
  layout = np.dtype([("label", "<i4"), ("source_index", "<i8"),
                     ("tokens", token_dtype, (num_variants, seq_len))])
  rows = np.frombuffer(b"".join(records), layout)
  assert all(len(record) == layout.itemsize for record in records)
  return {"tokens": rows["tokens"], "labels": rows["label"], "source_indices": rows["source_index"]}


def write_v1_token_set(directory, meta: dict, shards: list) -> None:
  """A format-v1 pre-tokenized set as earlier versions wrote it: meta.json (format_version 1) and
  tokens-SSSSS-of-TTTTT.npz holding tokens (n, K, L), labels (n,), source_indices (n,)."""
  import json
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
  for shard, arrays in enumerate(shards):
    np.savez(directory / f"tokens-{shard:05d}-of-{len(shards):05d}.npz", **arrays)


def bfloat16_gradient_errors(loss, params, float32_config, **bfloat16) -> dict:
  """{parameter path: relative L2 error} of the gradient of `loss(params, config)` computed with
  `dataclasses.replace(float32_config, dtype="bfloat16", **bfloat16)`, against float32 autodiff of
  the same parameters under `float32_config`."""
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  want = jax.tree_util.tree_flatten_with_path(grad(params, float32_config))[0]
  got = jax.tree.leaves(grad(params, dataclasses.replace(float32_config, dtype="bfloat16",
                                                         **bfloat16)))
  errors = {}
  for (path, w), g in zip(want, got):
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    errors[jax.tree_util.keystr(path)] = np.linalg.norm(g - w) / np.linalg.norm(w)
  return errors
