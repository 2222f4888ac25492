"""Test set-up: 8 fake CPU devices, before jax is imported anywhere."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The var-jax commands the tests run (in process and in subprocesses) keep no compilation cache
# in the user's home; tests/test_compile_cache.py turns it on in a temporary directory where it
# tests it.
os.environ.setdefault("VAR_JAX_COMPILATION_CACHE", "off")

# One JAX persistent compilation cache for this run, shared by the workers and the processes the
# tests start (notebook kernels, CLI subprocesses): many files compile the same programs (the tiny
# models' samplers, train steps, tokenizers), and each file starts with empty in-memory caches
# (_release_compiled_programs). A program loaded from it is the one the compiler built, as for a
# user whose `var-jax` commands keep their cache. The process that starts the run makes a fresh
# folder (workers inherit its environment) and removes it at the end: nothing carries over from
# one run to the next. `jax_compilation_cache_max_size` turns on JAX's file lock around reads and
# writes, which two workers writing the same entry need.
_CACHE_ENV = "VAR_JAX_TEST_COMPILATION_CACHE"
_OWN_CACHE = _CACHE_ENV not in os.environ
if _OWN_CACHE:
  import tempfile  # noqa: E402
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="var_jax_test_compilation_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_ENV]
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))

import ctypes  # noqa: E402
import gc  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

# A worker that dies under --dist loadfile: its unfinished tests go on, the one it died in gets one
# more run (pytest-xdist 3.8 itself hangs there). Files are handed out longest first.
pytest_plugins = ["xdist_order", "xdist_crash"]

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

try:
  _LIBC = ctypes.CDLL("libc.so.6")
  _LIBC.malloc_trim  # glibc only
except (OSError, AttributeError):
  _LIBC = None


@pytest.fixture(scope="session")
def fixtures_dir():
  return FIXTURES


# A worker keeps what JAX compiled from one test file to the next while it stays under this much
# resident memory: files compile some of the same programs, and clearing after every file cost ~10%
# of the run's time (5 sampling and model files: 321 s with a clear after each file, 289 s without;
# which programs they share was not broken down). Two workers at this size leave most of the
# machine's 24 GB to the tests' own peaks.
_KEEP_COMPILED_BELOW_BYTES = 4 << 30


def _resident_bytes() -> int | None:
  """This process's resident set size (Linux /proc), None where it cannot be read."""
  try:
    with open("/proc/self/statm") as statm:
      return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return None


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """After a test file, drop JAX's compiled programs and collect garbage once the worker has grown
  past `_KEEP_COMPILED_BELOW_BYTES` (always where its size cannot be read).

  A worker runs a few hundred tests in one process, and JAX keeps every program it compiled (and
  what the jit caches hold on to) for the life of the process: never dropped, the two workers
  together grew to 16 GB of this machine's 24 by the end of the suite, and the CI run at 733bc0c
  lost a worker to an abort inside XLA's compiler there. A test that needs a first compile (one
  that counts compiles) clears the caches itself."""
  yield
  resident = _resident_bytes()
  if resident is not None and resident < _KEEP_COMPILED_BELOW_BYTES:
    return
  if "jax" in sys.modules:
    sys.modules["jax"].clear_caches()
  gc.collect()
  if _LIBC is not None:  # hand the freed heap back to the system (glibc keeps it otherwise)
    _LIBC.malloc_trim(0)


def pytest_unconfigure(config):
  """The run's compilation cache goes with the process that made it (the controller under xdist)."""
  if _OWN_CACHE:
    shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)
