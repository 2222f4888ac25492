"""The var-jax commands' persistent compilation cache (`var_jax.compile_cache`): where it goes,
that a bad directory leaves it off without failing, and that a second `var-jax sample` process
loads the sampler from it instead of compiling (JAX's own cache events, counted in the child)."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import pytest

import helpers
from var_jax import compile_cache
from var_jax.inference.pretrained import convert_files, save_converted

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("environ, expected", [
    ({}, str(pathlib.Path.home() / ".cache" / "var_jax" / "jax_compilation_cache")),
    ({"VAR_JAX_CACHE": "/big/disk/var_jax"}, "/big/disk/var_jax/jax_compilation_cache"),
    ({"VAR_JAX_CACHE": "/big", "JAX_COMPILATION_CACHE_DIR": "/jax/own"}, "/jax/own"),
    ({"JAX_COMPILATION_CACHE_DIR": "/jax/own"}, "/jax/own"),
    ({"VAR_JAX_COMPILATION_CACHE": "/ours", "JAX_COMPILATION_CACHE_DIR": "/jax/own"}, "/ours"),
    ({"VAR_JAX_COMPILATION_CACHE": "gs://bucket/cache"}, "gs://bucket/cache"),
    ({"VAR_JAX_COMPILATION_CACHE": "off", "JAX_COMPILATION_CACHE_DIR": "/jax/own"}, None),
    ({"VAR_JAX_COMPILATION_CACHE": "OFF"}, None),
    ({"VAR_JAX_COMPILATION_CACHE": ""}, None),
])
def test_the_directory_comes_from_the_environment(environ, expected):
  assert compile_cache.directory_from_env(environ) == expected


def test_a_directory_that_cannot_be_made_leaves_the_cache_off(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  before = jax.config.jax_compilation_cache_dir
  assert compile_cache.enable(blocker / "cache") is None
  assert compile_cache.enable(None) is None
  assert jax.config.jax_compilation_cache_dir == before
  assert blocker.read_text() == "not a directory"  # nothing already there is touched


# Runs `var-jax sample` in this child process and prints JAX's cache events as JSON.
_CHILD = textwrap.dedent("""
    import collections, json, sys
    import jax
    events = collections.Counter()
    jax.monitoring.register_event_listener(lambda event, **kwargs: events.update([event]))
    from var_jax import cli
    rc = cli.main(["sample", "--model", sys.argv[1], "--classes", "1,7", "--per-class", "2",
                   "--out", sys.argv[2]])
    print(json.dumps({"rc": rc, "hits": events["/jax/compilation_cache/cache_hits"],
                      "misses": events["/jax/compilation_cache/cache_misses"]}))
""")


def _sample_in_a_new_process(model_dir, out_png, cache) -> dict:
  env = dict(os.environ, VAR_JAX_COMPILATION_CACHE=str(cache), JAX_PLATFORMS="cpu",
             # The tiny model compiles in under JAX's default 1 s threshold for caching a program.
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  done = subprocess.run([sys.executable, "-c", _CHILD, str(model_dir), str(out_png)], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_sample_run_loads_the_sampler_from_the_cache(tmp_path):
  model = convert_files(helpers.FIXTURES / "official_tiny_vae.pth",
                        helpers.FIXTURES / "official_tiny_seed0_var.pth", patch_nums=helpers.PATCH_NUMS)
  model_dir = save_converted(model, tmp_path / "tiny")
  cache = tmp_path / "cache"

  first = _sample_in_a_new_process(model_dir, tmp_path / "first.png", cache)
  assert first["rc"] == 0 and first["hits"] == 0 and first["misses"] >= 1, first
  entries = sorted(p.name for p in cache.iterdir())
  assert entries, "the first run wrote nothing to the cache"

  second = _sample_in_a_new_process(model_dir, tmp_path / "second.png", cache)
  assert second["rc"] == 0 and second["hits"] >= 1 and second["misses"] == 0, second
  assert (tmp_path / "first.png").read_bytes() == (tmp_path / "second.png").read_bytes()
