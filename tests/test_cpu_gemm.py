"""float32 matmuls through OpenBLAS inside XLA:CPU programs (`ops/cpu_gemm.py`): numbers against
float64 numpy, where the models route to it, and the public call on one CPU device against the
official fixtures."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import var_jax
from helpers import concat_tokens, model, reference
from var_jax.errors import ConfigError
from var_jax.inference import sampler
from var_jax.models import precision
from var_jax import cpu_gemm_library
from var_jax.ops import cpu_gemm


def one_device_mesh():
  """The mesh a user's call on one CPU device runs under (`var_jax.sampling_mesh`)."""
  return var_jax.sampling_mesh(devices=jax.devices()[:1])


def test_the_handler_builds_here():
  """CI and this machine have a C++ compiler: the fast path must be what the suite runs."""
  assert cpu_gemm_library.available()


@pytest.mark.parametrize("G,Gw,M,K,N", [
    (1, 1, 1, 7, 5),        # one row, too narrow to split over threads
    (1, 1, 33, 64, 1000),   # columns split into chunks, the last one short
    (3, 3, 5, 70, 130),     # a weight per group (the Winograd matmuls)
    (4, 1, 18, 96, 200),    # one weight shared by every group
    (2, 2, 4, 1, 129),      # K = 1
])
def test_matmul_matches_float64(G, Gw, M, K, N):
  rng = np.random.default_rng(G * 1000 + N)
  x = rng.standard_normal((G, M, K)).astype(np.float32)
  w = rng.standard_normal((Gw, K, N)).astype(np.float32)
  got = np.asarray(jax.jit(cpu_gemm.matmul)(x, w))
  want = np.einsum("gmk,gkn->gmn", x.astype(np.float64), np.broadcast_to(w, (G, K, N)))
  assert got.shape == (G, M, N) and got.dtype == np.float32
  # float32 sums of K products of unit normals: rounding grows like sqrt(K) x eps x |terms|
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.sqrt(K) * 4)


def test_matmul_rejects_bad_operands():
  x = np.zeros((2, 3, 4), np.float32)
  with pytest.raises(ValueError, match="do not match"):
    cpu_gemm.matmul(x, np.zeros((2, 5, 6), np.float32))
  with pytest.raises(ValueError, match="its G 1 or x.s"):
    cpu_gemm.matmul(x, np.zeros((3, 4, 6), np.float32))
  with pytest.raises(ValueError, match=r"\(G, M, K\)"):
    cpu_gemm.matmul(x[0], np.zeros((4, 6), np.float32))
  with pytest.raises(ValueError, match="float32"):
    cpu_gemm.matmul(x.astype(jnp.bfloat16), np.zeros((2, 4, 6), jnp.bfloat16))


def test_gradients_through_the_matmul_are_those_of_the_product():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 20)).astype(np.float32)
  w = rng.standard_normal((2, 20, 9)).astype(np.float32)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  got = jax.grad(loss(cpu_gemm.matmul), argnums=(0, 1))(x, w)
  want = jax.grad(loss(lambda x, w: jnp.einsum("gmk,gkn->gmn", x, w,
                                               precision=jax.lax.Precision.HIGHEST)),
                  argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("subscripts,x_shape,w_shape", [
    ("...i,io->...o", (2, 3, 16), (16, 24)),      # Dense
    ("...i,io->...o", (16,), (16, 8)),            # Dense on one vector
    ("blc,cjhd->bljhd", (2, 5, 16), (16, 3, 2, 4)),  # attention's q, k, v
    ("blhd,hdc->blc", (2, 5, 2, 4), (2, 4, 16)),     # attention's output projection
])
def test_the_models_einsums_are_one_matmul(subscripts, x_shape, w_shape):
  rng = np.random.default_rng(len(subscripts))
  x = rng.standard_normal(x_shape).astype(np.float32)
  w = rng.standard_normal(w_shape).astype(np.float32)
  got = cpu_gemm.einsum_as_matmul(subscripts, jnp.asarray(x), jnp.asarray(w))
  want = np.einsum(subscripts, x.astype(np.float64), w.astype(np.float64))
  assert got is not None and got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("subscripts,x_shape,w_shape", [
    ("bqc,bkc->bqk", (2, 3, 4), (2, 5, 4)),    # a batch letter in both operands
    ("ktc,kco->kto", (3, 4, 5), (3, 5, 6)),
    ("ij,kj->ik", (3, 4), (5, 4)),             # w contracted on its last axis
    ("ij,jk->ki", (3, 4), (4, 5)),             # the output transposed
    ("ij,jk,kl->il", (3, 4), (4, 5)),          # three operands
])
def test_other_einsums_are_left_to_xla(subscripts, x_shape, w_shape):
  x, w = jnp.zeros(x_shape), jnp.zeros(w_shape)
  assert cpu_gemm.einsum_as_matmul(subscripts, x, w) is None


def test_enabled_on_one_cpu_device_for_float32_only(monkeypatch):
  x = jnp.zeros((4, 8), jnp.float32)
  assert not cpu_gemm.enabled(x, x)  # no mesh: nothing says the program runs on one device
  with jax.set_mesh(var_jax.sampling_mesh()):  # every device
    assert len(jax.devices()) > 1 and not cpu_gemm.enabled(x, x)
  with jax.set_mesh(one_device_mesh()):
    assert cpu_gemm.enabled(x, x)
    assert not cpu_gemm.enabled(x.astype(jnp.bfloat16), x)
    monkeypatch.setenv(cpu_gemm_library.ENV, "xla")
    assert not cpu_gemm.enabled(x, x)
    monkeypatch.setenv(cpu_gemm_library.ENV, "openblas")
    with pytest.raises(ConfigError, match="VAR_JAX_CPU_GEMM"):
      cpu_gemm.enabled(x, x)


def test_a_failed_build_warns_once_and_leaves_xla(monkeypatch, caplog):
  def fail(*args, **kwargs):
    raise cpu_gemm_library.BuildError("no C++ compiler 'c++' on PATH")
  monkeypatch.setattr(cpu_gemm_library, "build", fail)
  with caplog.at_level(logging.WARNING):
    assert cpu_gemm_library._registered.__wrapped__() is False  # the uncached body: this process keeps its build
  assert "no C++ compiler" in caplog.text and "XLA's own" in caplog.text
  # and with the handler unavailable, the models' einsums are XLA's dots
  monkeypatch.setattr(cpu_gemm_library, "available", lambda: False)
  x = jnp.ones((3, 16))
  with jax.set_mesh(one_device_mesh()):
    hlo = jax.jit(lambda x, w: precision.einsum("...i,io->...o", x, w)).lower(x, x.T).as_text()
  assert cpu_gemm.TARGET not in hlo and "dot_general" in hlo


def test_build_names_a_missing_compiler(tmp_path):
  with pytest.raises(cpu_gemm_library.BuildError, match="no C..? compiler '/nonexistent/c[+][+]'"):
    cpu_gemm_library.build(tmp_path, environ={"CXX": "/nonexistent/c++"})
  assert not list(tmp_path.iterdir())


def test_build_is_cached_by_its_key(tmp_path):
  first = cpu_gemm_library.build(tmp_path)
  stamp = first.stat().st_mtime_ns
  assert cpu_gemm_library.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
  assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no half-built files left


@pytest.mark.parametrize("tag", ["tiny", "tiny_saln"])
def test_public_sample_on_one_cpu_device_runs_openblas_and_matches_official(tag):
  """`var_jax.sample` on one CPU device (the usual CPU host): its compiled program calls the
  OpenBLAS target (and on the 8-device mesh it does not), and its greedy tokens and images are the
  official code's."""
  ref = reference(tag)
  m = model(tag)
  kw = dict(rng=jax.random.key(0), cfg=1.5, top_k=1, top_p=0.0,
            mesh=one_device_mesh())
  labels = ref["sample_label"]
  images, tokens = var_jax.sample(m, labels, return_tokens=True, **kw)
  assert cpu_gemm.TARGET in sampler.build_sample_call(m, labels, **kw).lower().as_text()
  np.testing.assert_array_equal(concat_tokens(tokens), ref["greedy_cfg1p5_idx_BL"])
  ref_img = np.round(ref["greedy_cfg1p5_img"].transpose(0, 2, 3, 1) * 255)
  assert np.abs(np.asarray(images, np.int32) - ref_img).max() <= 1
  kw["mesh"] = var_jax.sampling_mesh()
  assert cpu_gemm.TARGET not in sampler.build_sample_call(m, labels, **kw).lower().as_text()
