"""Test set-up: 8 fake CPU devices, before jax is imported anywhere."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The var-jax commands the tests run (in process and in subprocesses) keep no compilation cache
# in the user's home; tests/test_cli.py turns it on in a temporary directory where it tests it.
os.environ.setdefault("VAR_JAX_COMPILATION_CACHE", "off")

import pathlib  # noqa: E402

import pytest  # noqa: E402

# A worker that dies under --dist loadfile: its unfinished tests go on, the one it died in gets one
# more run (pytest-xdist 3.8 itself hangs there).
pytest_plugins = ["xdist_crash"]

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir():
  return FIXTURES
