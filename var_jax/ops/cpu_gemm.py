"""float32 matmuls on CPU through OpenBLAS, inside XLA programs (an XLA FFI custom call).

Why: XLA:CPU's own GEMM runs VAR's matmuls slower than an optimised BLAS. On a 2-core AMD EPYC
(Zen 3, AVX2) a 4096^3 float32 matmul ran at 125 GFLOP/s in XLA, 164 in torch (MKL) and 181
through this call; eight d16 MLPs (1024 -> 4096 -> 1024) at 18-50 rows took x1.3-1.9 longer in
XLA. The public float32 sampling call of VAR-d16 there went from 9.63 to 6.91 s at batch 1 and
from 56.2 to 45.4 s at batch 8 (`benchmarks/bench_sample.py`, README).
`jax.pure_callback` to numpy cannot do this: it copies its operands and costs more than it saves.

How: `cpu_gemm.cc`, an XLA FFI handler that `cpu_gemm_library` compiles on first use (against
jaxlib's FFI headers and the `scipy-openblas32` wheel's OpenBLAS), caches and registers as the CPU
target `TARGET`. OpenBLAS runs single-threaded inside it; the handler splits the output columns
over XLA's intra-op threads. Where the build fails (no compiler, say), a warning says why once and
every matmul stays XLA's: results differ only by float32 rounding.

When (`enabled`): float32 operands, and a computation placed on one CPU device (the active mesh,
`jax.set_mesh`, has one device: what `var_jax.sample`, `edit` and `VARModel.logits` set up on a
CPU host); never on TPU or GPU, and not on multi-device meshes, where XLA's partitioner would
gather a custom call's operands. `$VAR_JAX_CPU_GEMM=xla` turns it off ("auto", the default, on).
Gradients through it are XLA's dots (`custom_jvp`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from var_jax import cpu_gemm_library
from var_jax.ops import attention as attention_ops

TARGET = cpu_gemm_library.TARGET


def enabled(*operands) -> bool:
  """Whether matmuls of these operands, traced now, run through OpenBLAS (module docstring)."""
  if any(jnp.result_type(x) != jnp.float32 for x in operands):
    return False
  if cpu_gemm_library.choice() == "xla":
    return False
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size != 1 or attention_ops.computation_platform() != "cpu":
    return False
  return cpu_gemm_library.available()


def _check(x_GMK, w_GKN) -> None:
  if x_GMK.ndim != 3 or w_GKN.ndim != 3:
    raise ValueError(f"cpu_gemm.matmul takes x (G, M, K) and w (G or 1, K, N), got shapes "
                     f"{x_GMK.shape} and {w_GKN.shape}.")
  if w_GKN.shape[1] != x_GMK.shape[2] or w_GKN.shape[0] not in (1, x_GMK.shape[0]):
    raise ValueError(f"cpu_gemm.matmul: x {x_GMK.shape} and w {w_GKN.shape} do not match (w's "
                     "K must be x's, and its G 1 or x's).")
  if x_GMK.dtype != jnp.float32 or w_GKN.dtype != jnp.float32:
    raise ValueError(f"cpu_gemm.matmul takes float32 operands, got {x_GMK.dtype} and "
                     f"{w_GKN.dtype}.")


@jax.custom_jvp
def matmul(x_GMK: jax.Array, w_GKN: jax.Array) -> jax.Array:
  """x @ w per group through OpenBLAS: x (G, M, K), w (G, K, N) or (1, K, N) shared, float32;
  returns (G, M, N) float32. CPU only, and only after `available()`."""
  _check(x_GMK, w_GKN)
  out = jax.ShapeDtypeStruct((x_GMK.shape[0], x_GMK.shape[1], w_GKN.shape[2]), jnp.float32)
  return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x_GMK, w_GKN)


@matmul.defjvp
def _matmul_jvp(primals, tangents):
  x, w = primals
  dx, dw = tangents
  return matmul(x, w), jnp.matmul(dx, w) + jnp.matmul(x, dw)


def einsum_as_matmul(subscripts: str, x: jax.Array, w: jax.Array) -> jax.Array | None:
  """`jnp.einsum(subscripts, x, w)` through `matmul` when it is one matmul in disguise: x's
  trailing letters contracted with w's leading ones in the same order, every other letter kept in
  place ("...i,io->...o", "blc,cjhd->bljhd", "blhd,hdc->blc"); None for any other einsum."""
  spec = subscripts.replace(" ", "")
  if spec.count("->") != 1 or spec.count(",") != 1:
    return None
  inputs, out = spec.split("->")
  xs, ws = inputs.split(",")
  if xs.startswith("...") and out.startswith("..."):
    lead = x.ndim - (len(xs) - 3)
    if lead < 0:
      return None
    filler = "".join(chr(0x100 + i) for i in range(lead))  # letters no subscript uses
    xs, out = filler + xs[3:], filler + out[3:]
  if ("." in xs + ws + out or len(xs) != x.ndim or len(ws) != w.ndim
      or len(set(xs)) != len(xs) or len(set(ws)) != len(ws)):
    return None
  k = sum(c in xs for c in ws)
  if k == 0 or xs[len(xs) - k:] != ws[:k] or out != xs[:len(xs) - k] + ws[k:]:
    return None
  free_x, contracted, free_w = x.shape[:x.ndim - k], x.shape[x.ndim - k:], w.shape[k:]
  if contracted != w.shape[:k]:
    return None  # jnp.einsum says what is wrong
  K = math.prod(contracted)
  y = matmul(x.reshape(1, math.prod(free_x), K), w.reshape(1, K, math.prod(free_w)))
  return y.reshape(*free_x, *free_w)
