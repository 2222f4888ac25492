"""VAR attention: XLA reference vs a dense numpy computation, kernels vs the reference (Pallas
interpret mode on CPU), masks vs var_jax.scales, dispatch and input errors, shard_map under a
mesh of 8 fake CPU devices, and ahead-of-time compiles for TPU (libtpu, no hardware) and GPU
(lowering to Triton, no hardware)."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from var_jax import scales
from var_jax.errors import ConfigError, InputError
from var_jax.ops import attention
from var_jax.kernels import gpu_flash
from var_jax.kernels import splash_block_causal
from var_jax.kernels import splash_masks
from var_jax.kernels import tpu_prefix
from var_jax.kernels import xla_reference
from var_jax.ops import host_cpu

SMALL = (1, 2, 3, 4)  # L = 30
D16 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # L = 680
P512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # L = 2240
KERNELS = ("pallas_tpu", "pallas_gpu")
# Worst |kernel - reference| / max|reference|. float32: both sides compute in float32 and differ
# only in summation order (online softmax, block order); measured ~1e-6. bfloat16: outputs and
# gradients are rounded to bfloat16, whose step at the largest value is 2^-8 = 3.9e-3 of it, and
# the kernels round P·V operands differently from the reference (splash keeps P and V in float32,
# the reference rounds P to bfloat16); measured 1-1.7 steps, allowed 4.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 4 * 2.0**-8}


def _qkv(seed, batch, heads, q_len, head_dim, dtype, kv_len=None):
  """VAR-like inputs: l2-normalised q and k, q times a per-head scale in [4, 30]; v normal."""
  kv_len = q_len if kv_len is None else kv_len
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  normalize = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  scale_H = jnp.linspace(4.0, 30.0, heads)[None, :, None, None]
  q = normalize(jax.random.normal(kq, (batch, heads, q_len, head_dim))) * scale_H
  k = normalize(jax.random.normal(kk, (batch, heads, kv_len, head_dim)))
  v = jax.random.normal(kv, (batch, heads, kv_len, head_dim))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _naive(q, k, v, visible):
  """float64 numpy attention with a dense boolean mask."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bhqd,bhkd->bhqk", q, k)
  logits = np.where(visible, logits, -np.inf)
  probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
  probs /= probs.sum(axis=-1, keepdims=True)
  return np.einsum("bhqk,bhkd->bhqd", probs, v)


def _assert_close(actual, expected, tol, what):
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  assert actual.shape == expected.shape, what
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
  err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)
  assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def _output_and_grads(fn, q, k, v, seed=7):
  """fn(q, k, v) and the gradients of <fn(q, k, v), random cotangent> w.r.t. q, k, v."""
  cot = jax.random.normal(jax.random.PRNGKey(seed), q.shape, jnp.float32)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)
  return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


# ---------------------------------------------------------------------------------------------
# XLA reference and masks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_nums", [SMALL, D16])
def test_xla_block_causal_matches_dense_numpy(patch_nums):
  q, k, v = _qkv(0, 2, 2, scales.seq_len(patch_nums), 16, jnp.float32)
  out = xla_reference.block_causal_attention(q, k, v, patch_nums=patch_nums)
  expected = _naive(q, k, v, scales.block_causal_mask(patch_nums))
  _assert_close(out, expected, 2e-6, "xla block-causal vs float64 numpy")


def test_xla_block_causal_is_bidirectional_within_a_scale_and_blind_to_later_scales():
  q, k, v = _qkv(1, 1, 2, 30, 16, jnp.float32)
  out = xla_reference.block_causal_attention(q, k, v, patch_nums=SMALL)
  # Changing the keys/values of scale 3 (tokens 14..29) leaves scales 0..2 unchanged ...
  k2, v2 = k.at[:, :, 14:].add(1.0), v.at[:, :, 14:].add(1.0)
  out2 = xla_reference.block_causal_attention(q, k2, v2, patch_nums=SMALL)
  np.testing.assert_array_equal(out[:, :, :14], out2[:, :, :14])
  assert not np.allclose(out[:, :, 14:], out2[:, :, 14:])
  # ... and the last token of scale 2 (token 13) sees the first token of scale 2 (token 5).
  v3 = v.at[:, :, 5].add(1.0)
  out3 = xla_reference.block_causal_attention(q, k, v3, patch_nums=SMALL)
  assert not np.allclose(out[:, :, 13], out3[:, :, 13])


def test_xla_prefix_matches_dense_numpy_and_ignores_the_cache_tail():
  q, k, v = _qkv(2, 2, 2, 9, 16, jnp.float32, kv_len=40)
  out = xla_reference.prefix_attention(q, k, v, kv_len=14)
  _assert_close(out, _naive(q, k[:, :, :14], v[:, :, :14], True), 2e-6, "xla prefix vs numpy")
  tail_changed = xla_reference.prefix_attention(q, k.at[:, :, 14:].set(1e4),
                                                v.at[:, :, 14:].set(1e4), kv_len=14)
  np.testing.assert_array_equal(out, tail_changed)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_prefix_takes_q_with_queries_before_heads(dtype):
  """q_layout="bqhd": q as (B, l, H, D), the projection's layout; the output is (B, H, l, D) and
  equals dense numpy attention on the same q; anything else is refused."""
  q, k, v = _qkv(4, 2, 3, 9, 16, dtype, kv_len=20)
  q_BlHD = jnp.transpose(q, (0, 2, 1, 3))
  out = xla_reference.prefix_attention(q_BlHD, k, v, kv_len=14, q_layout="bqhd")
  assert out.shape == q.shape and out.dtype == dtype
  expected = _naive(q, k[:, :, :14], v[:, :, :14], True)
  _assert_close(out, expected, TOL[dtype] if dtype == jnp.bfloat16 else 2e-6, "q_layout bqhd")
  with pytest.raises(ValueError, match="q_layout"):
    xla_reference.prefix_attention(q, k, v, kv_len=14, q_layout="bhdq")


@pytest.mark.parametrize("patch_nums", [SMALL, D16, P512])
def test_splash_mask_equals_scales_mask_with_padding(patch_nums):
  seq_len = scales.seq_len(patch_nums)
  padded_len = splash_block_causal.padded_seq_len(seq_len)
  mask = splash_masks.block_causal_splash_mask(patch_nums, padded_len, num_heads=3)
  assert mask.shape == (3, padded_len, padded_len)
  dense = mask[0, :, :]
  expected = np.zeros((padded_len, padded_len), bool)
  expected[:seq_len, :seq_len] = scales.block_causal_mask(patch_nums)
  expected[seq_len:, :seq_len] = True  # padding rows see every real token, stay finite
  np.testing.assert_array_equal(dense, expected)
  np.testing.assert_array_equal(mask[2, 5:77, 3:101], expected[5:77, 3:101])  # lazy slices
  # What the kernel evaluates: mask_function(q_sequence, column) on its own blocks.
  head_mask = mask.masks[0]
  cols = np.arange(padded_len)[None, :]
  np.testing.assert_array_equal(head_mask.mask_function(head_mask.q_sequence[:, None], cols),
                                expected)


def test_row_end_mask_rejects_rows_that_see_nothing():
  with pytest.raises(ConfigError, match="between 1 and"):
    splash_masks.RowEndMask(np.array([0, 3, 3]), 3)
  with pytest.raises(ConfigError, match="between 1 and"):
    splash_masks.RowEndMask(np.array([1, 4]), 3)


def test_block_sizes_are_chosen_for_var_shapes():
  assert splash_block_causal.padded_seq_len(680) == 768
  assert splash_block_causal.padded_seq_len(2240) == 2304
  for padded in (768, 2304):
    sizes = splash_block_causal.training_block_sizes(padded)
    assert (sizes.block_q, sizes.block_kv, sizes.block_kv_compute) == (768, 768, 256)
    assert sizes.use_fused_bwd_kernel and sizes.has_backward_blocks
  assert splash_block_causal.training_block_sizes(128).block_q == 128
  assert attention.kv_cache_len(D16) == 768 and attention.kv_cache_len(P512) == 2304


# ---------------------------------------------------------------------------------------------
# Kernels vs the XLA reference, interpret mode
# ---------------------------------------------------------------------------------------------


def _check_training(impl, patch_nums, batch, heads, dtype, seed=3):
  q, k, v = _qkv(seed, batch, heads, scales.seq_len(patch_nums), 64, dtype)
  kernel = lambda q, k, v: attention.block_causal_attention(
      q, k, v, patch_nums=patch_nums, impl=impl, interpret=True)
  reference = lambda q, k, v: attention.block_causal_attention(
      q, k, v, patch_nums=patch_nums, impl="xla")
  out, grads = _output_and_grads(kernel, q, k, v)
  out_ref, grads_ref = _output_and_grads(reference, q, k, v)
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  _assert_close(out, out_ref, TOL[dtype], f"{impl} output")
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    _assert_close(g, g_ref, TOL[dtype], f"{impl} d{name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", KERNELS)
def test_training_kernel_matches_reference_small(impl, dtype):
  _check_training(impl, SMALL, batch=1, heads=2, dtype=dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", KERNELS)
def test_training_kernel_matches_reference_d16_two_heads(impl, dtype):
  _check_training(impl, D16, batch=1, heads=2, dtype=dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", KERNELS)
def test_training_kernel_matches_reference_d16_full(impl, dtype):
  _check_training(impl, D16, batch=2, heads=16, dtype=dtype)


def test_splash_padding_keys_are_masked_and_padding_rows_finite():
  q, k, v = _qkv(4, 1, 2, 30, 64, jnp.float32)
  kernel = splash_block_causal.make_block_causal_kernel(SMALL, num_heads=2, interpret=True)
  pad = lambda x, fill: jnp.concatenate([x[0], jnp.full((2, 128 - 30, 64), fill)], axis=1)
  out_zero = kernel(pad(q, 0.0), pad(k, 0.0), pad(v, 0.0))
  out_junk = kernel(pad(q, 3.0), pad(k, 50.0), pad(v, 1e6))
  assert np.all(np.isfinite(np.asarray(out_junk)))
  np.testing.assert_array_equal(out_zero[:, :30], out_junk[:, :30])
  reference = xla_reference.block_causal_attention(q, k, v, patch_nums=SMALL)
  _assert_close(out_zero[None, :, :30], reference, TOL[jnp.float32], "splash on padded input")


def _check_prefix(impl, patch_nums, batch, heads, dtype, cache_len, seed=5, only=None):
  """The kernel against the XLA path at every scale of `patch_nums` (or the scales in `only`)."""
  for si, (pn, (_, end)) in enumerate(zip(patch_nums, scales.begin_ends(patch_nums))):
    if only is not None and si not in only:
      continue
    q, k, v = _qkv(seed + si, batch, heads, pn * pn, 64, dtype, kv_len=cache_len)
    # Junk past the prefix: entries of later scales not written yet must not leak in.
    k = k.at[:, :, end:].set(jnp.asarray(40.0, dtype))
    v = v.at[:, :, end:].set(jnp.asarray(1e4, dtype))
    out = attention.prefix_attention(q, k, v, kv_len=end, impl=impl, interpret=True)
    out_ref = attention.prefix_attention(q, k, v, kv_len=end, impl="xla")
    assert out.shape == q.shape and out.dtype == dtype
    _assert_close(out, out_ref, TOL[dtype],
                  f"{impl} prefix, scale {si} ({pn * pn} rows, {end} keys)")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", KERNELS)
def test_prefix_kernel_matches_reference_at_d16s_first_unaligned_and_last_scales(impl, dtype):
  # One query row over one key; 25 rows over 55 keys (neither a multiple of a tile); 256 rows over
  # the whole 680-key prefix of the 768-row cache. The slow test below takes every scale, 16 heads.
  _check_prefix(impl, D16, batch=2, heads=2, dtype=dtype, cache_len=attention.kv_cache_len(D16),
                only=(0, 4, 9))


@pytest.mark.parametrize("impl", KERNELS)
def test_prefix_kernel_small_layout_and_unaligned_cache(impl):
  # Cache of exactly L = 30 entries: not a multiple of any kernel block.
  _check_prefix(impl, SMALL, batch=2, heads=2, dtype=jnp.float32, cache_len=30)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", KERNELS)
def test_prefix_kernel_matches_reference_d16_full(impl, dtype):
  _check_prefix(impl, D16, batch=4, heads=16, dtype=dtype, cache_len=attention.kv_cache_len(D16))


def _stacked_cache(seed, layers, batch, heads, cache_len, end, dtype):
  """A (layers, B, H, S, D) key and value stack, each layer different, junk past `end`."""
  ks, vs = [], []
  for n in range(layers):
    _, k, v = _qkv(seed + n, batch, heads, 1, 64, dtype, kv_len=cache_len)
    ks.append(k.at[:, :, end:].set(jnp.asarray(40.0 + n, dtype)))
    vs.append(v.at[:, :, end:].set(jnp.asarray(1e4, dtype)))
  return jnp.stack(ks), jnp.stack(vs)


@pytest.mark.parametrize("impl", ("xla",) + KERNELS)
def test_prefix_attention_on_a_stacked_cache_reads_the_traced_layer(impl):
  # The decode loop hands the whole (layers, ...) cache and a traced layer index: the TPU kernel
  # picks the layer in its DMAs, the other paths index it. Expectation: the reference on the
  # layer's slice, taken here with numpy indexing.
  dtype, end = jnp.bfloat16, 14
  k_NBHSD, v_NBHSD = _stacked_cache(30, 3, 2, 2, 30, end, dtype)
  q, _, _ = _qkv(40, 2, 2, 9, 64, dtype)
  run = jax.jit(lambda q, k, v, layer: attention.prefix_attention(
      q, k, v, kv_len=end, impl=impl, interpret=True, layer=layer))
  for layer in range(3):
    out = run(q, k_NBHSD, v_NBHSD, jnp.int32(layer))
    expected = xla_reference.prefix_attention(q, k_NBHSD[layer], v_NBHSD[layer], kv_len=end)
    assert out.shape == q.shape and out.dtype == dtype
    _assert_close(out, expected, TOL[dtype], f"{impl} on layer {layer} of the stack")
  if impl == "pallas_tpu":  # the kernel gets the stack itself, not a slice of it
    jaxpr = str(jax.make_jaxpr(run)(q, k_NBHSD, v_NBHSD, jnp.int32(0)))
    assert "dynamic_slice" not in jaxpr and "pallas_call" in jaxpr


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_layer_prefix_is_the_layers_first_rows(platform, monkeypatch):
  # Each backend's form (CPU indexes the layer then slices, others slice once) against numpy.
  monkeypatch.setattr(attention, "computation_platform", lambda: platform)
  stack = np.random.default_rng(3).standard_normal((3, 2, 2, 30, 8)).astype(np.float32)
  get = jax.jit(attention.layer_prefix, static_argnums=2)
  for layer, kv_len in ((0, 1), (2, 14), (1, 30)):
    np.testing.assert_array_equal(get(stack, jnp.int32(layer), kv_len), stack[layer, :, :, :kv_len])


def test_prefix_attention_stack_and_layer_must_agree():
  q, k, v = _qkv(41, 1, 2, 4, 64, jnp.float32, kv_len=30)
  with pytest.raises(InputError, match="must be the stacked cache"):
    attention.prefix_attention(q, k, v, kv_len=5, layer=0)
  with pytest.raises(InputError, match="agree on batch, heads and head_dim"):
    attention.prefix_attention(q[:, :1], k[None], v[None], kv_len=5, layer=0)
  with pytest.raises(InputError, match="kv_len=31"):
    attention.prefix_attention(q, k[None], v[None], kv_len=31, layer=0)


def test_prefix_plan_fits_vmem_and_needs_no_query_padding_for_var_scales():
  for pns in (D16, P512):
    cache_len = attention.kv_cache_len(pns)
    for pn, (_, end) in zip(pns, scales.begin_ends(pns)):
      kv_block = tpu_prefix.kv_block_rows(end, cache_len, jnp.bfloat16)
      assert end <= kv_block <= min(end + 15, cache_len)
      heads, rows, padded = tpu_prefix.plan_blocks(
          16, pn * pn, kv_block, 64, jnp.bfloat16)
      assert 16 % heads == 0 and padded % rows == 0
      assert padded == pn * pn  # every VAR scale either fits one block or is a multiple of 16
      assert 3 * rows * kv_block * 4 <= 6 * 2**20


# ---------------------------------------------------------------------------------------------
# Dispatch and bad input
# ---------------------------------------------------------------------------------------------


def _has_pallas_call(fn, *args):
  return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_auto_on_cpu_is_the_xla_path():
  q, k, v = _qkv(6, 1, 2, 30, 64, jnp.float32)
  train = lambda q, k, v: attention.block_causal_attention(q, k, v, patch_nums=SMALL)
  assert not _has_pallas_call(train, q, k, v)
  np.testing.assert_array_equal(train(q, k, v),
                                xla_reference.block_causal_attention(q, k, v, patch_nums=SMALL))
  sample = lambda q, k, v: attention.prefix_attention(q[:, :, :16], k, v, kv_len=30)
  assert not _has_pallas_call(sample, q, k, v)
  kernel = lambda q, k, v: attention.block_causal_attention(
      q, k, v, patch_nums=SMALL, impl="pallas_tpu", interpret=True)
  assert _has_pallas_call(kernel, q, k, v)


@pytest.mark.parametrize("platform, device_kind, expected, allowed_kernel", [
    ("tpu", "TPU v5 lite", "pallas_tpu", "pallas_tpu"),
    # GPU: "auto" is XLA until benchmarks/gpu_check.py has run on a GPU (GPU_AUTO_IMPL); the
    # Pallas GPU kernel is still there by name.
    ("gpu", "NVIDIA H100", "xla", "pallas_gpu"),
    ("cpu", "cpu", "xla", None)])
def test_auto_follows_the_platform_of_the_active_mesh(platform, device_kind, expected,
                                                      allowed_kernel):
  device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform=platform)
  mesh = jax.sharding.AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,),
                                   abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    assert attention._resolve_impl("auto", False) == expected  # pylint: disable=protected-access
    assert attention._resolve_impl("xla", False) == "xla"  # pylint: disable=protected-access
    for impl in KERNELS:
      if impl == allowed_kernel:
        assert attention._resolve_impl(impl, False) == impl  # pylint: disable=protected-access
      else:
        with pytest.raises(ConfigError, match=f"needs a {impl[7:].upper()} backend"):
          attention._resolve_impl(impl, False)  # pylint: disable=protected-access


def _gpu_checks_passed() -> list[str]:
  """benchmarks/results/gpu_check_*.json files from a real GPU whose kernel numerics passed."""
  import json
  import pathlib
  results = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
  passed = []
  for path in sorted(results.glob("gpu_check_*.json")) if results.exists() else []:
    record = json.loads(path.read_text())
    if (record["environment"]["backend"] == "gpu" and not record["tiny"]
        and not record["pallas_gpu_interpreted"] and record["verdict"]["pallas_gpu_numerics_ok"]):
      passed.append(path.name)
  return passed


def test_gpu_auto_stays_xla_until_a_gpu_check_is_committed():
  """GPU_AUTO_IMPL may become "pallas_gpu" only with a passing benchmarks/gpu_check.py run from a
  real GPU committed under benchmarks/results/ (the H200's numerics pass; its throughput sections
  have not run, so "auto" is still XLA there)."""
  assert attention.GPU_AUTO_IMPL in ("xla", "pallas_gpu")
  if attention.GPU_AUTO_IMPL == "pallas_gpu":
    assert _gpu_checks_passed(), "no passing gpu_check_*.json from a GPU in benchmarks/results/"


def test_committed_gpu_checks_hold_every_path_within_tolerance():
  """The committed GPU evidence itself: every pallas_gpu path of both dtypes (training out and
  its three gradients, the prefix of each of the 10 scales) within tolerance of XLA, XLA within
  tolerance of float64, read from the rows' errors rather than the script's verdict."""
  import json
  import pathlib
  results = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
  records = [json.loads(p.read_text()) for p in sorted(results.glob("gpu_check_*.json"))]
  records = [r for r in records if r["environment"]["backend"] == "gpu" and not r["tiny"]]
  if not records:
    pytest.skip("no gpu_check run from a GPU committed")
  tolerance = {"float32": 1e-5, "bfloat16": 4 * 2.0**-8}
  for record in records:
    checks = [r for r in record["rows"] if r["section"] == "numerics" and "tolerance" in r]
    for dtype in ("float32", "bfloat16"):
      kernel = [r for r in checks if r["impl"] == "pallas_gpu" and r["dtype"] == dtype]
      assert len(kernel) == 4 + 10, (dtype, [r["path"] for r in kernel])
      assert len([r for r in checks if r["impl"] == "xla" and r["dtype"] == dtype]) == 1 + 10
    for r in checks:
      assert r["tolerance"] == tolerance[r["dtype"]]
      assert 0 <= r["error"] <= tolerance[r["dtype"]], r


def test_gpu_check_refuses_to_run_without_a_gpu():
  import pathlib
  import subprocess
  import sys
  script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True, text=True,
                        env=env, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "no GPU here" in proc.stderr and "--allow-cpu" in proc.stderr


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_impl_on_cpu_without_interpret_is_a_config_error(impl):
  q, k, v = _qkv(6, 1, 2, 30, 64, jnp.float32)
  with pytest.raises(ConfigError, match="valid choices"):
    attention.block_causal_attention(q, k, v, patch_nums=SMALL, impl=impl)
  with pytest.raises(ConfigError, match="valid choices"):
    attention.prefix_attention(q, k, v, kv_len=5, impl=impl)


def test_unknown_impl_and_bad_config_are_config_errors():
  q, k, v = _qkv(6, 1, 2, 30, 64, jnp.float32)
  with pytest.raises(ConfigError, match=r"valid choices are \('auto', 'xla', 'pallas_tpu', "):
    attention.block_causal_attention(q, k, v, patch_nums=SMALL, impl="splash")
  with pytest.raises(ConfigError, match="valid choices"):
    attention.prefix_attention(q, k, v, kv_len=5, impl="cudnn")
  with pytest.raises(ConfigError, match="patch_nums"):
    attention.block_causal_attention(q, k, v, patch_nums=(2, 1), impl="xla")
  with pytest.raises(ConfigError, match="interpret"):
    attention.block_causal_attention(q, k, v, patch_nums=SMALL, interpret="yes")


def test_bad_inputs_are_input_errors():
  q, k, v = _qkv(6, 1, 2, 30, 64, jnp.float32)
  call = lambda q, k, v, pns=SMALL: attention.block_causal_attention(q, k, v, patch_nums=pns)
  with pytest.raises(InputError, match="4-D"):
    call(q[0], k[0], v[0])
  with pytest.raises(InputError, match="L=14"):
    call(q, k, v, pns=(1, 2, 3))
  with pytest.raises(InputError, match="float32 or bfloat16"):
    call(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16))
  with pytest.raises(InputError, match="share one dtype"):
    call(q, k.astype(jnp.bfloat16), v)
  with pytest.raises(InputError, match="shapes differ"):
    call(q, k[:, :1], v)
  with pytest.raises(InputError, match="must be an array"):
    call(np.asarray(q).tolist(), k, v)
  prefix = lambda q, k, v, kv_len=5: attention.prefix_attention(q, k, v, kv_len=kv_len)
  for bad in (0, 31):
    with pytest.raises(InputError, match=r"kv_len=.* must be in \[1, cache length 30\]"):
      prefix(q, k, v, kv_len=bad)
  for bad in (5.0, True, jnp.int32(5)):
    with pytest.raises(InputError, match="static Python int"):
      prefix(q, k, v, kv_len=bad)
  with pytest.raises(InputError, match="static Python int"):
    jax.jit(lambda n: prefix(q, k, v, kv_len=n))(5)
  with pytest.raises(InputError, match="agree on batch, heads and head_dim"):
    prefix(q[:, :1], k, v)
  with pytest.raises(InputError, match="cache shapes differ"):
    prefix(q, k, v[:, :, :20])
  assert prefix(q, k, v, kv_len=np.int64(5)).shape == q.shape
  q48, k48, v48 = _qkv(6, 1, 2, 30, 48, jnp.float32)
  with pytest.raises(InputError, match="power of two"):
    attention.block_causal_attention(q48, k48, v48, patch_nums=SMALL, impl="pallas_gpu",
                                     interpret=True)


# ---------------------------------------------------------------------------------------------
# Under a mesh: shard_map over ("data", "fsdp") x "tensor"
# ---------------------------------------------------------------------------------------------


def _cpu_mesh(shape=(2, 2, 2)):
  devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
  return Mesh(devices, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


@pytest.mark.parametrize("impl", KERNELS)
def test_kernels_under_a_mesh_match_reference(impl):
  assert jax.device_count() >= 8, "tests/conftest.py asks for 8 fake CPU devices"
  mesh = _cpu_mesh()
  q, k, v = _qkv(8, 4, 2, 30, 64, jnp.float32)
  sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "tensor"))
  q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
  train = lambda q, k, v: attention.block_causal_attention(
      q, k, v, patch_nums=SMALL, impl=impl, interpret=True)
  with jax.set_mesh(mesh):
    assert "shard_map" in str(jax.make_jaxpr(train)(q, k, v))
    out, grads = _output_and_grads(jax.jit(train), q, k, v)
    cache_q = q[:, :, :9]
    sample = jax.jit(lambda q, k, v: attention.prefix_attention(
        q, k, v, kv_len=14, impl=impl, interpret=True))
    out_prefix = sample(cache_q, k, v)
    # The decode loop's form: a (layers, ...) stack split the same way, one layer picked.
    stack_sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), "tensor"))
    k_stack, v_stack = (jax.device_put(jnp.stack([x * 0.5, x]), stack_sharding) for x in (k, v))
    stacked = jax.jit(lambda q, k, v, layer: attention.prefix_attention(
        q, k, v, kv_len=14, impl=impl, interpret=True, layer=layer))
    out_stacked = stacked(cache_q, k_stack, v_stack, jnp.int32(1))
  assert out.sharding.is_equivalent_to(sharding, out.ndim)
  _assert_close(out_stacked, xla_reference.prefix_attention(cache_q, k, v, kv_len=14),
                TOL[jnp.float32], f"{impl} prefix on a stacked cache under mesh")
  out_ref, grads_ref = _output_and_grads(
      lambda q, k, v: xla_reference.block_causal_attention(q, k, v, patch_nums=SMALL), q, k, v)
  _assert_close(out, out_ref, TOL[jnp.float32], f"{impl} under mesh")
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    _assert_close(g, g_ref, TOL[jnp.float32], f"{impl} d{name} under mesh")
  _assert_close(out_prefix, xla_reference.prefix_attention(cache_q, k, v, kv_len=14),
                TOL[jnp.float32], f"{impl} prefix under mesh")


def test_mesh_with_indivisible_batch_or_heads_is_an_input_error():
  mesh = _cpu_mesh()
  q, k, v = _qkv(9, 2, 2, 30, 64, jnp.float32)  # batch 2 over data x fsdp = 4
  with jax.set_mesh(mesh):
    with pytest.raises(InputError, match="not divisible by the 4 shards"):
      attention.block_causal_attention(q, k, v, patch_nums=SMALL, impl="pallas_tpu",
                                       interpret=True)
    q, k, v = _qkv(9, 4, 3, 30, 64, jnp.float32)  # 3 heads over tensor = 2
    with pytest.raises(InputError, match="heads .* not divisible by the 2 shards"):
      attention.block_causal_attention(q, k, v, patch_nums=SMALL, impl="pallas_tpu",
                                       interpret=True)


def test_mesh_without_tensor_axis_shards_batch_only():
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"),
              axis_types=(AxisType.Auto,) * 2)
  q, k, v = _qkv(10, 4, 3, 30, 64, jnp.float32)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda q, k, v: attention.block_causal_attention(
        q, k, v, patch_nums=SMALL, impl="pallas_tpu", interpret=True))(q, k, v)
  _assert_close(out, xla_reference.block_causal_attention(q, k, v, patch_nums=SMALL),
                TOL[jnp.float32], "batch-only mesh")


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compiles
# ---------------------------------------------------------------------------------------------

_HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.tpu_backend
@pytest.mark.skipif(not _HAS_LIBTPU, reason="needs libtpu (pip install .[tpu])")
def test_tpu_aot_compile_contains_mosaic_calls_under_shard_map():
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  desc = topologies.get_topology_desc(
      platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
      chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False))
  mesh = Mesh(np.array(desc.devices).reshape(2, 1, 2), ("data", "fsdp", "tensor"),
              axis_types=(AxisType.Auto,) * 3)
  spec = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "tensor"))
  patch_nums = (1, 2, 3, 4, 5, 6, 8, 10)  # L = 255, padded to 256
  x = jax.ShapeDtypeStruct((4, 4, scales.seq_len(patch_nums), 64), jnp.bfloat16, sharding=spec)

  def train_step(q, k, v):  # impl="auto": the mesh's devices are TPUs, so splash
    loss = lambda q, k, v: jnp.sum(attention.block_causal_attention(
        q, k, v, patch_nums=patch_nums).astype(jnp.float32) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  def sample_step(q, k, v):  # impl="auto": XLA for 4 query rows, the Pallas kernel for 100
    small = attention.prefix_attention(q[:, :, :4], k, v, kv_len=5)
    large = attention.prefix_attention(q[:, :, 155:255], k, v, kv_len=255)
    return small, large

  with jax.set_mesh(mesh):
    train = jax.jit(train_step).trace(x, x, x).lower().compile()
    sample = jax.jit(sample_step).trace(x, x, x).lower().compile()
  train_hlo, sample_hlo = train.as_text(), sample.as_text()
  assert train_hlo.count("tpu_custom_call") == 2  # splash forward + fused dq/dkv backward
  assert "splash_mha_fwd" in train_hlo and "splash_mha_dkv" in train_hlo
  assert sample_hlo.count("tpu_custom_call") == 1 and "var_prefix_attention" in sample_hlo
  # Each device ran the kernels on its own (4/2, 4/2) batch x head shard.
  assert "bf16[2,2,256,64]" in train_hlo


def test_gpu_kernels_lower_to_triton_without_a_gpu():
  q = jax.ShapeDtypeStruct((1, 2, 30, 64), jnp.bfloat16)

  def train_step(q, k, v):
    loss = lambda q, k, v: jnp.sum(gpu_flash.block_causal_attention(
        q, k, v, patch_nums=SMALL, interpret=False).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  sample = lambda q, k, v: gpu_flash.prefix_attention(q[:, :, :9], k, v, kv_len=14,
                                                          interpret=False)
  for fn in (train_step, sample):
    hlo = jax.jit(fn).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton_kernel_call" in hlo or "__gpu$xla.gpu.triton" in hlo, hlo[:2000]


def _has_loop(fn, *args) -> bool:
  """Whether fn's jaxpr (nested ones included) holds a loop (scan or while); traced anew (a fresh wrapper:
  JAX caches traces by function, and the block size is read while tracing)."""
  def walk(jaxpr):
    return any(eqn.primitive.name in ("scan", "while") or any(
        walk(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params)) for eqn in jaxpr.eqns)
  return walk(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("stacked", [False, True])
def test_cpu_prefix_attention_in_blocks_matches_float64_attention(monkeypatch, dtype, stacked):
  """Pairs with large logits on CPU run as a loop over blocks of (sequence, head) pairs: with
  blocks of 3 of the 6 pairs (one block straddles two sequences) the output still equals float64
  attention over the first kv_len cache rows (of the traced layer, for a stacked cache), and the
  rows past kv_len stay unread. Small pairs run as one call, however small the block budget."""
  q, k, v = _qkv(6, 3, 2, 9, 64, dtype, kv_len=32)
  k_NBHSD = jnp.stack([k * 0.5, k, k * 2]).at[1, :, :, 14:].set(1e4)
  v_NBHSD = jnp.stack([v * 0.5, v, v * 2]).at[1, :, :, 14:].set(1e4)
  if stacked:
    args = (q, k_NBHSD, v_NBHSD, jnp.int32(1))
    fn = lambda q, k, v, layer: attention.prefix_attention(q, k, v, kv_len=14, impl="xla",
                                                           layer=layer)
  else:
    args = (q, k_NBHSD[1], v_NBHSD[1])
    fn = lambda q, k, v: attention.prefix_attention(q, k, v, kv_len=14, impl="xla")
  assert not _has_loop(fn, *args)
  monkeypatch.setattr(attention, "CPU_LOGITS_BLOCK_BYTES", 3 * 4 * 9 * 14)  # 3 pairs per block
  assert not _has_loop(fn, *args)  # 504-byte pairs: under CPU_BLOCK_MIN_PAIR_LOGITS_BYTES
  monkeypatch.setattr(attention, "CPU_BLOCK_MIN_PAIR_LOGITS_BYTES", 4 * 9 * 14)
  assert _has_loop(fn, *args), "no block loop: nothing is checked"
  out = jax.jit(lambda *a: fn(*a))(*args)
  assert out.dtype == dtype and out.shape == q.shape
  expected = _naive(q, k[:, :, :14], v[:, :, :14], np.ones((9, 14), bool))
  _assert_close(out, expected, TOL[dtype], f"CPU prefix attention in blocks, {jnp.dtype(dtype)}")


def test_cpu_pairs_per_block_divides_the_pairs_and_fits_the_budget(monkeypatch):
  """The block is the most (sequence, head) pairs that divide the shard's pairs and whose float32
  logits fit CPU_LOGITS_BLOCK_BYTES; a single pair's logits over it still make a block of 1."""
  monkeypatch.setattr(attention, "CPU_LOGITS_BLOCK_BYTES", 1000)
  assert attention._pairs_per_block(12, 100) == 6  # 10 fit, 6 is the largest divisor <= 10
  assert attention._pairs_per_block(7, 100) == 7
  assert attention._pairs_per_block(7, 150) == 1  # 6 would fit, but 7 is prime
  assert attention._pairs_per_block(8, 5000) == 1


def _dot_operand_dtypes(fn, *args):
  """The operand dtypes of every dot_general in fn's jaxpr, nested jaxprs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(tuple(str(var.aval.dtype) for var in eqn.invars))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize("amx", [True, False])
def test_cpu_prefix_attention_takes_bf16_operands_only_on_amx_hosts(monkeypatch, amx):
  """On CPU a bf16 call multiplies bf16 operands where the host has AMX and float32 ones elsewhere
  (host_cpu); both agree with float64 attention to bf16 accuracy. float32 stays float32."""
  monkeypatch.setattr(host_cpu, "has_amx_bf16", lambda: amx)
  q, k, v = _qkv(12, 3, 2, 9, 64, jnp.bfloat16, kv_len=20)
  sample = lambda q, k, v: attention.prefix_attention(q, k, v, kv_len=14, impl="xla")
  expected_dtype = "bfloat16" if amx else "float32"
  dtypes = _dot_operand_dtypes(sample, q, k, v)
  assert len(dtypes) == 2 and all(d == (expected_dtype, expected_dtype) for d in dtypes), dtypes
  out = jax.jit(sample)(q, k, v)
  assert out.dtype == jnp.bfloat16
  expected = _naive(q, k[:, :, :14], v[:, :, :14], np.ones((9, 14), bool))
  _assert_close(out, expected, TOL[jnp.bfloat16], f"CPU prefix attention, amx={amx}")
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  assert all(d == ("float32", "float32") for d in _dot_operand_dtypes(sample, q32, k32, v32))
