"""The sampler's transformer matmuls, JAX against torch, at VAR's shapes on this backend.

  JAX_PLATFORMS=cpu python benchmarks/bench_matmul.py                       # d16, batch 8, bf16
  JAX_PLATFORMS=cpu PYTHONPATH=<torch> python benchmarks/bench_matmul.py --dtypes bfloat16,float32

For the dense layers of one block (qkv C -> 3C, proj C -> C, fc1 C -> 4C, fc2 4C -> C; C = 64 x
depth) at the rows of a sampling step (2 x batch x pn², guidance doubling the batch) of the given
scales, times the model's matmul as it computes it on one device (operands in the dtype, float32
accumulation, a float32 bias, the result cast back; float32 on CPU through OpenBLAS,
`ops/cpu_gemm.py`, else XLA's dot: the script prints which) and, where torch is importable,
torch's `addmm` in the same dtype (what the official runs under `torch.autocast`), alternating
the two call by call so that a host whose speed drifts slows both alike. Prints GFLOP/s per layer and the block's total: the
figure that says how far the sampler's largest ops sit from the other framework's on this host.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import _common
import var_jax
from var_jax.models import precision
from var_jax.ops import cpu_gemm


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  _common.add_common_flags(parser, batch_sizes="8", iters=5)
  parser.add_argument("--depth", type=int, default=16, help="VAR depth; width 64 x depth (default 16)")
  parser.add_argument("--scales", type=_common.int_list, default="13,16",
                      help="comma-separated side lengths pn of the sampling steps (default 13,16)")
  parser.add_argument("--dtypes", default="bfloat16", help="comma-separated dtypes (default bfloat16)")
  args = parser.parse_args(argv)
  if args.depth < 1:
    parser.error(f"--depth must be positive, got {args.depth}")
  args.dtypes = [d for d in args.dtypes.split(",") if d]
  unknown = [d for d in args.dtypes if d not in ("float32", "bfloat16")]
  if unknown or not args.dtypes:
    parser.error(f"--dtypes takes float32 and/or bfloat16, got {unknown or 'none'}")
  return args


def block_layers(width: int) -> list[tuple[str, int, int]]:
  """(name, in features, out features) of one VAR block's dense layers."""
  return [("qkv", width, 3 * width), ("proj", width, width), ("fc1", width, 4 * width),
          ("fc2", 4 * width, width)]


def _import_torch():
  try:
    import torch
  except ImportError:
    return None
  return torch


@jax.jit
def dense(x, w, b):
  """A dense layer as the model computes it (`precision.Dense`): float32 accumulation and bias,
  cast back; called on one device, so that on CPU float32 takes the model's OpenBLAS path."""
  return precision.einsum("...i,io->...o", x, w, bias=b)


def _seconds(call) -> float:
  t0 = time.perf_counter()
  call()
  return time.perf_counter() - t0


def main(argv=None) -> None:
  args = parse_args(argv)
  env = _common.environment()
  torch = None if args.no_official else _import_torch()
  env["torch"] = torch.__version__ if torch is not None else "off (--no-official) or not importable"
  _common.print_environment(env)
  width = 64 * args.depth
  one_device = var_jax.sampling_mesh(devices=jax.devices()[:1])
  with jax.set_mesh(one_device):
    for dtype_name in args.dtypes:
      ones = jnp.ones((2, 2), dtype_name)
      path = "OpenBLAS (ops/cpu_gemm.py)" if cpu_gemm.enabled(ones, ones) else "XLA's dot"
      print(f"JAX's {dtype_name} matmuls: {path}")
    _measure(args, torch, width)


def _measure(args, torch, width: int) -> None:
  rows_out = []
  for dtype_name in args.dtypes:
    dtype = jnp.dtype(dtype_name)
    torch_dtype = getattr(torch, dtype_name) if torch is not None else None
    for batch in args.batch_sizes:
      for pn in args.scales:
        m = 2 * batch * pn * pn
        total = {"jax": 0.0, "torch": 0.0}
        for name, k, n in block_layers(width):
          rng = np.random.default_rng(args.seed)
          x, w = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n)))
          bias = rng.standard_normal(n).astype(np.float32)
          xj, wj, bj = jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(bias)
          jax_call = lambda: jax.block_until_ready(dense(xj, wj, bj))
          jax_call()
          calls = {"jax": jax_call}
          if torch is not None:
            xt, wt, bt = (torch.from_numpy(a).to(torch_dtype) for a in (x, w, bias))
            calls["torch"] = lambda: torch.addmm(bt, xt, wt)
            calls["torch"]()
          best = dict.fromkeys(calls, float("inf"))
          for _ in range(max(args.iters, 1)):  # alternate, so drift slows both alike
            for key, call in calls.items():
              best[key] = min(best[key], _seconds(call))
          flops = 2.0 * m * k * n
          row = {"dtype": dtype_name, "batch": batch, "pn": pn, "layer": name,
                 "shape": f"({m}, {k}) x ({k}, {n})", "jax_ms": 1e3 * best["jax"],
                 "jax_gflops": flops / best["jax"] / 1e9}
          total["jax"] += best["jax"]
          if torch is not None:
            row.update(torch_ms=1e3 * best["torch"], torch_gflops=flops / best["torch"] / 1e9,
                       jax_over_torch=best["jax"] / best["torch"])
            total["torch"] += best["torch"]
          rows_out.append(row)
          _common.emit(row)
        block_flops = sum(2.0 * m * k * n for _, k, n in block_layers(width))
        row = {"dtype": dtype_name, "batch": batch, "pn": pn, "layer": "block",
               "shape": f"{m} rows", "jax_ms": 1e3 * total["jax"],
               "jax_gflops": block_flops / total["jax"] / 1e9}
        if torch is not None:
          row.update(torch_ms=1e3 * total["torch"], torch_gflops=block_flops / total["torch"] / 1e9,
                     jax_over_torch=total["jax"] / total["torch"])
        rows_out.append(row)
  columns = [("dtype", "dtype", ""), ("batch", "batch", "d"), ("pn", "pn", "d"),
             ("layer", "layer", ""), ("shape", "shape", ""), ("JAX ms", "jax_ms", ".2f"),
             ("JAX GFLOP/s", "jax_gflops", ".0f")]
  if torch is not None:
    columns += [("torch ms", "torch_ms", ".2f"), ("torch GFLOP/s", "torch_gflops", ".0f"),
                ("JAX / torch time", "jax_over_torch", ".2f")]
  _common.print_table(f"VAR-d{args.depth} block matmuls per sampling step", rows_out, columns)


if __name__ == "__main__":
  main()
