"""float32 matmuls on CPU through OpenBLAS, inside XLA programs (an XLA FFI custom call).

Why: XLA:CPU's own GEMM runs VAR's matmuls slower than an optimised BLAS. On a 2-core AMD EPYC
(Zen 3, AVX2) a 4096^3 float32 matmul ran at 125 GFLOP/s in XLA against 164 in torch (MKL); eight
d16 MLPs (1024 -> 4096 -> 1024) at 18-50 rows took x1.3-1.9 longer in XLA than through this call,
and the public float32 sampling call of VAR-d16 at batch 8 went from 58.4 to 51.7 s with the
transformer's matmuls moved here (medians of 3 alternated calls, identical tokens and images).
`jax.pure_callback` to numpy cannot do this: it copies its operands and costs more than it saves.

How: `cpu_gemm.cc`, an XLA FFI handler, is compiled on first use with the host's C++ compiler
($CXX, else c++) against jaxlib's FFI headers and the OpenBLAS of the `scipy-openblas32` wheel
(a var-jax dependency), cached under var-jax's cache folder (`compile_cache.cache_root()`,
keyed by the source and both libraries' versions), and registered as the CPU target `TARGET`.
OpenBLAS runs single-threaded inside it; the handler splits the output columns over XLA's
intra-op threads. Where the build fails (no compiler, say), a warning says why once and every
matmul stays XLA's: results differ only by float32 rounding.

When (`enabled`): float32 operands, and a computation placed on one CPU device (the active mesh,
`jax.set_mesh`, has one device: what `var_jax.sample`, `edit` and `VARModel.logits` set up on a
CPU host); never on TPU or GPU, and not on multi-device meshes, where XLA's partitioner would
gather a custom call's operands. `$VAR_JAX_CPU_GEMM=xla` turns it off ("auto", the default, on).
Gradients through it are XLA's dots (`custom_jvp`).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
from absl import logging

from var_jax.errors import ConfigError

TARGET = "var_jax_cpu_sgemm"
ENV = "VAR_JAX_CPU_GEMM"
CHOICES = ("auto", "xla")
SOURCE = pathlib.Path(__file__).with_name("cpu_gemm.cc")


class BuildError(RuntimeError):
  """The handler could not be compiled or loaded (the message says why)."""


def choice(environ=os.environ) -> str:
  """$VAR_JAX_CPU_GEMM: "auto" (default) or "xla"."""
  value = environ.get(ENV, "auto").strip().lower() or "auto"
  if value not in CHOICES:
    raise ConfigError(f"${ENV} must be one of {CHOICES}, got {environ.get(ENV)!r}: 'auto' runs "
                      "float32 matmuls on one CPU device through OpenBLAS, 'xla' keeps XLA's own.")
  return value


def _openblas():
  try:
    import scipy_openblas32
  except ImportError as err:
    raise BuildError("the scipy-openblas32 package is missing (pip install scipy-openblas32)") from err
  return scipy_openblas32


def build_key(source: bytes, jaxlib_version: str, openblas_version: str, compiler: str) -> str:
  """The cache key of a built library: what it was compiled from and against."""
  parts = [source, jaxlib_version.encode(), openblas_version.encode(), compiler.encode(),
           platform.machine().encode(), platform.system().encode()]
  return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def build(cache_dir: pathlib.Path | None = None, environ=os.environ) -> pathlib.Path:
  """Compiles `cpu_gemm.cc` (once per key) and returns the shared library's path.

  Raises BuildError with the compiler's message where it cannot."""
  import jaxlib
  from var_jax import compile_cache
  blas = _openblas()
  cxx = environ.get("CXX", "c++")
  compiler = shutil.which(cxx)
  if compiler is None:
    raise BuildError(f"no C++ compiler {cxx!r} on PATH (install g++ or clang, or set $CXX)")
  source = SOURCE.read_bytes()
  key = build_key(source, jaxlib.__version__, blas.__version__, compiler)
  cache_dir = compile_cache.cache_root(environ) / "cpu_gemm" if cache_dir is None else cache_dir
  target = pathlib.Path(cache_dir) / f"libvar_jax_cpu_gemm-{key}.so"
  if target.exists():
    return target
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
  except OSError as err:
    raise BuildError(f"cannot create {target.parent} ({err}); set $VAR_JAX_CACHE to a writable "
                     "folder") from err
  lib_dir = blas.get_lib_dir()
  # Built beside the target and renamed over it: processes building at once never load a half-
  # written library.
  fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
             f"-I{jax.ffi.include_dir()}", f"-I{blas.get_include_dir()}", str(SOURCE),
             "-o", partial, f"-L{lib_dir}", f"-l{blas.get_library()}", f"-Wl,-rpath,{lib_dir}"]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
      raise BuildError(f"{' '.join(command)} failed:\n{done.stderr.strip()[-2000:]}")
    os.replace(partial, target)
  except (OSError, subprocess.TimeoutExpired) as err:
    raise BuildError(f"{' '.join(command)} failed: {err}") from err
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return target


@functools.cache
def _registered() -> bool:
  """Builds, loads and registers the handler once per process; False (with one warning) where
  that fails."""
  try:
    library = ctypes.CDLL(str(build()))
    library.VarJaxCpuGemmInit()
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.VarJaxCpuSgemm), platform="cpu")
  except (BuildError, OSError, AttributeError) as err:
    logging.warning("var-jax's OpenBLAS matmuls are off, XLA's own run instead (same results up "
                    "to float32 rounding, slower on CPU): %s", err)
    return False
  return True


_REGISTERING = threading.Lock()


def available() -> bool:
  """Whether the handler is built and registered in this process (building it on first call;
  threads tracing at once wait for one build)."""
  with _REGISTERING:
    return _registered()


def _platform(mesh) -> str:
  device = mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def enabled(*operands) -> bool:
  """Whether matmuls of these operands, traced now, run through OpenBLAS (module docstring)."""
  if any(jnp.result_type(x) != jnp.float32 for x in operands):
    return False
  if choice() == "xla":
    return False
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size != 1 or _platform(mesh) != "cpu":
    return False
  return available()


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
