"""Building, loading and registering var-jax's OpenBLAS matmul handler (`ops/cpu_gemm.cc`) for
XLA:CPU, and the switch that turns it off; `ops/cpu_gemm.py` is the op that calls it.

The handler is compiled on first use with the host's C++ compiler ($CXX, else c++) against
jaxlib's FFI headers and the OpenBLAS of the `scipy-openblas32` wheel (a var-jax dependency),
kept under var-jax's cache folder (`compile_cache.cache_root()` / "cpu_gemm", keyed by what it was
built from and against), loaded and registered as the CPU FFI target `TARGET` once per process.
Where that fails (no compiler, say), one warning says why and `available()` is False: the models
then keep XLA's own matmuls. `$VAR_JAX_CPU_GEMM=xla` turns the handler off ("auto", the default,
on). Files, flags and the compiler live here, in the foundation layer, so that the op stays a
pure function of its operands.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
from absl import logging

from var_jax.errors import ConfigError

TARGET = "var_jax_cpu_sgemm"
ENV = "VAR_JAX_CPU_GEMM"
CHOICES = ("auto", "xla")
SOURCE = pathlib.Path(__file__).parent / "ops" / "cpu_gemm.cc"


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


def build_key(source: bytes, jaxlib_version: str, openblas_version: str, openblas_dir: str,
              compiler: str) -> str:
  """The cache key of a built library: what it was compiled from and against, and where the
  OpenBLAS it loads lies (a new virtualenv builds anew)."""
  parts = [source, jaxlib_version.encode(), openblas_version.encode(), openblas_dir.encode(),
           compiler.encode(), platform.machine().encode(), platform.system().encode()]
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
  lib_dir = blas.get_lib_dir()
  key = build_key(source, jaxlib.__version__, blas.__version__, lib_dir, compiler)
  cache_dir = compile_cache.cache_root(environ) / "cpu_gemm" if cache_dir is None else cache_dir
  target = pathlib.Path(cache_dir) / f"libvar_jax_cpu_gemm-{key}.so"
  if target.exists():
    return target
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
  except OSError as err:
    raise BuildError(f"cannot create {target.parent} ({err}); set $VAR_JAX_CACHE to a writable "
                     "folder") from err
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
