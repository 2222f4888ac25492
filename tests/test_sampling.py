"""var_jax.sample and var_jax.edit: greedy parity with the official sampler, filters, editing."""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import var_jax
from helpers import TAGS, concat_tokens, model, reference, tokenizer
from var_jax import aot
from var_jax.errors import InputError
from var_jax.inference import filters, sampler


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("cfg,cfg_tag", [(1.5, "cfg1p5"), (4.0, "cfg4")])
def test_greedy_tokens_and_images_match_official(tag, cfg, cfg_tag):
  ref = reference(tag)
  m = model(tag)
  images, tokens = var_jax.sample(m, ref["sample_label"], rng=jax.random.key(0), cfg=cfg, top_k=1,
                                  top_p=0.0, return_tokens=True)
  np.testing.assert_array_equal(concat_tokens(tokens), ref[f"greedy_{cfg_tag}_idx_BL"])
  ref_img = ref[f"greedy_{cfg_tag}_img"].transpose(0, 2, 3, 1)  # official output, in [0, 1]
  decoded = (np.asarray(tokenizer().decode(tokens)) + 1) / 2
  np.testing.assert_allclose(decoded, ref_img, atol=1e-4)
  assert images.dtype == jnp.uint8 and images.shape == (2, 64, 64, 3)
  assert np.abs(np.asarray(images, np.int32) - np.round(ref_img * 255)).max() <= 1


def test_same_key_same_images_and_no_recompile():
  m = model("tiny")
  labels = np.array([1, 2, 3, 4])
  a = var_jax.sample(m, labels, rng=jax.random.key(7))
  size = sampler._generate_jit._cache_size()
  b = var_jax.sample(m, labels, rng=jax.random.key(7))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = var_jax.sample(m, labels, rng=jax.random.key(8), cfg=3.0, top_k=10, top_p=0.5)
  assert sampler._generate_jit._cache_size() == size  # new options, same executable
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_more_smooth_is_deterministic_and_differs():
  m = model("tiny")
  a = var_jax.sample(m, [1, 2], rng=jax.random.key(0), more_smooth=True)
  b = var_jax.sample(m, [1, 2], rng=jax.random.key(0), more_smooth=True)
  c = var_jax.sample(m, [1, 2], rng=jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def _official_filter(logits, top_k, top_p):
  """A direct numpy transcription of the documented semantics (VAR_SPEC §6.3), row by row."""
  out = logits.copy()
  for row in out.reshape(-1, out.shape[-1]):
    if top_k > 0:
      thr = np.sort(row)[::-1][top_k - 1]
      row[row < thr] = -np.inf
    if top_p > 0:
      order = np.argsort(row, kind="stable")
      srt = row[order]
      p = np.exp(srt - srt.max())
      p /= p.sum()
      remove = np.cumsum(p) <= 1 - top_p
      remove[-1] = False
      row[order[remove]] = -np.inf
  return out


def test_filter_matches_official_semantics():
  rng = np.random.default_rng(0)
  for top_k, top_p in [(0, 0.0), (1, 0.0), (5, 0.0), (0, 0.5), (20, 0.9), (64, 0.96), (3, 1.0)]:
    logits = (rng.standard_normal((2, 7, 64)) * 2).astype(np.float32)
    got = np.asarray(filters.filter_top_k_top_p(jnp.asarray(logits), top_k, top_p))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(_official_filter(logits, top_k, top_p)))


def test_top_k_keeps_ties_at_threshold():
  logits = jnp.asarray([[[3.0, 2.0, 2.0, 1.0]]])
  got = np.asarray(filters.filter_top_k_top_p(logits, 2, 0.0))
  assert np.isfinite(got).tolist() == [[[True, True, True, False]]]


@pytest.mark.parametrize("looped", [False, True], ids=["unrolled", "looped"])
@pytest.mark.parametrize("bits_per_pass", [1, 2, 4, 5])
def test_filter_matches_official_semantics_at_full_vocabulary(bits_per_pass, looped):
  # The released models' setting (k 900 of 4096, p 0.96) and edge values, on logits with the
  # spread the official sampler sees, some tied; under jit with traced k and p; with each radix
  # width (4 is TPU's, 1 CPU's; 5 leaves a first pass of 2 bits), the passes unrolled (TPU, GPU)
  # and in a loop (CPU).
  rng = np.random.default_rng(1)
  logits = (rng.standard_normal((3, 5, 4096)) * 3).astype(np.float32)
  logits[:, :, :64] = np.round(logits[:, :, :64])
  jitted = jax.jit(functools.partial(filters.filter_top_k_top_p, bits_per_pass=bits_per_pass,
                                     looped=looped))
  for top_k, top_p in [(900, 0.96), (4096, 0.96), (1, 0.5), (900, 0.0), (0, 0.3), (2, 1.0),
                       (100, 0.0)]:
    want = np.isfinite(_official_filter(logits, top_k, top_p))
    np.testing.assert_array_equal(np.isfinite(jitted(jnp.asarray(logits), top_k, top_p)), want)


def test_filter_radix_width_is_checked():
  logits = jnp.zeros((1, 1, 8))
  for bad in (0, 17, 2.0, True):
    with pytest.raises(InputError, match="bits_per_pass"):
      filters.filter_top_k_top_p(logits, 2, 0.5, bits_per_pass=bad)


@pytest.mark.parametrize("looped", [False, True], ids=["unrolled", "looped"])
@pytest.mark.parametrize("bits_per_pass", [1, 4])
def test_filter_on_negative_infinities_and_signed_zeros(bits_per_pass, looped):
  logits = jnp.asarray([[[-np.inf, -0.0, 0.0, -1.0, -np.inf, 2.0]]], jnp.float32)
  filter_ = functools.partial(filters.filter_top_k_top_p, bits_per_pass=bits_per_pass,
                              looped=looped)
  np.testing.assert_array_equal(  # k-th largest (3rd) is -0.0 == 0.0: both survive
      np.isfinite(filter_(logits, 3, 0.0)),
      [[[False, True, True, False, False, True]]])
  np.testing.assert_array_equal(  # the 2nd largest is a zero too: -0.0 < 0.0 is false
      np.isfinite(filter_(logits, 2, 0.0)),
      [[[False, True, True, False, False, True]]])
  np.testing.assert_array_equal(  # everything below the maximum carries < 0.5 of the mass
      np.isfinite(filter_(logits, 0, 0.5)),
      [[[False, False, False, False, False, True]]])


def test_filter_passes_loop_on_cpu_and_unroll_on_tpu():
  """CPU: the radix passes in a loop (a few fusions to compile instead of 64 per scale); a TPU
  mesh (compile-only devices here): unrolled, so that XLA's cost analysis counts every pass."""
  logits = jax.ShapeDtypeStruct((2, 3, 64), jnp.float32)
  jaxpr = lambda: str(jax.make_jaxpr(filters.filter_top_k_top_p)(logits, 5, 0.9))
  assert jax.default_backend() == "cpu" and jaxpr().count("scan[") == 2  # top-k, top-p
  if not aot.libtpu_available():
    pytest.skip("the TPU half needs libtpu (pip install .[tpu])")
  with jax.set_mesh(aot.topology_mesh("v5e:2x2")):
    assert "scan[" not in jaxpr()


def test_filter_keeps_the_dtype_and_does_not_sort():
  logits = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 64)), jnp.bfloat16)
  got = filters.filter_top_k_top_p(logits, 5, 0.9)
  assert got.dtype == jnp.bfloat16
  want = _official_filter(np.asarray(logits, np.float32), 5, 0.9)
  np.testing.assert_array_equal(np.isfinite(np.asarray(got, np.float32)), np.isfinite(want))
  jaxpr = str(jax.make_jaxpr(filters.filter_top_k_top_p)(logits, 5, 0.9))
  assert "sort" not in jaxpr  # the thresholds are radix selects, linear in V


def test_guidance_ramp():
  assert filters.guidance_scale(1.5, 0, 10) == 0.0
  assert filters.guidance_scale(1.5, 9, 10) == 1.5
  assert filters.guidance_scale(4.0, 1, 4) == pytest.approx(4 / 3)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(cfg=-1.0), "cfg"), (dict(cfg=float("nan")), "cfg"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
])
def test_bad_options_rejected_before_compile(kwargs, msg):
  with pytest.raises(InputError, match=msg):
    var_jax.sample(model("tiny"), [1], rng=jax.random.key(0), **kwargs)


def test_top_k_at_or_above_the_vocabulary_keeps_every_token():
  # The tiny model has 64 codes: k = 64, k = 65, k = 10_000 and k = 0 (off) all keep every token.
  m, key = model("tiny"), jax.random.key(3)
  ref = np.asarray(var_jax.sample(m, [1, 2], rng=key, top_k=0, top_p=0.0))
  for k in (64, 65, 10_000):
    np.testing.assert_array_equal(np.asarray(var_jax.sample(m, [1, 2], rng=key, top_k=k, top_p=0.0)), ref)
  assert not np.array_equal(np.asarray(var_jax.sample(m, [1, 2], rng=key, top_k=1, top_p=0.0)), ref)


def test_bad_labels_and_rng_rejected():
  with pytest.raises(InputError, match="outside"):
    var_jax.sample(model("tiny"), [1, 12], rng=jax.random.key(0))
  with pytest.raises(InputError, match="PRNG key"):
    var_jax.sample(model("tiny"), [1], rng=0)


def test_edit_rejects_bad_masks_and_images():
  m = model("tiny")
  images = np.zeros((1, 64, 64, 3), np.uint8)
  with pytest.raises(InputError, match="image size"):
    var_jax.edit(m, images, np.ones((32, 32)), [1], rng=jax.random.key(0))
  with pytest.raises(InputError, match=r"\[0, 1\]"):
    var_jax.edit(m, images, np.full((64, 64), 2.0), [1], rng=jax.random.key(0))
  with pytest.raises(InputError, match="64x64"):
    var_jax.edit(m, np.zeros((1, 32, 32, 3), np.uint8), np.ones((4, 4)), [1], rng=jax.random.key(0))


_HLO_ARRAY = re.compile(r"= (\w+)\[([\d,]*)\](?:\{[^}]*\})? ([\w-]+)\(")


def _ops_making(hlo: str, shapes: set) -> set:
  """The opcodes of every instruction (any computation, fused ones too) that makes an array of
  one of `shapes` (tuples of dims), whatever its dtype."""
  return {op for _, dims, op in _HLO_ARRAY.findall(hlo)
          if tuple(int(d) for d in dims.split(",") if d) in shapes}


@pytest.mark.parametrize("dtype", [
    "float32", pytest.param("bfloat16", marks=pytest.mark.slow)])  # ~34 s: the same placement code
def test_on_cpu_the_blocks_read_each_layers_weights_where_it_lies(dtype):
  """On CPU the placement holds every block weight as one array per layer and the model unrolls
  its blocks over them (`var.weights_per_layer`): in the compiled program of the public call no
  instruction makes a copy, slice or conversion of a layer's matmul weight (only the program's
  parameters have those shapes), where the loop over stacks slices each layer's weights out of
  them once per scale. Its tokens and images equal that loop's (bfloat16: over uint16 stacks,
  TPU's layout, `var.stacks_as_uint16`)."""
  import dataclasses
  from unittest import mock
  from var_jax.models import var as var_module
  m32 = model("tiny")
  make = lambda: var_jax.VARModel(dataclasses.replace(m32.config, dtype=dtype), m32.params,
                                  m32.tokenizer)
  m, m_stacked = make(), make()  # two models: each caches its own placement
  labels = np.array([1, 2])
  # one device: shapes as the model has them (no batch padding or partitioning)
  kw = dict(rng=jax.random.key(3), cfg=1.5, top_k=20, top_p=0.9,
            mesh=var_jax.sampling_mesh(devices=jax.devices()[:1]))
  C = m32.config.embed_dim
  # the matmul weights of one layer: qkv (C, 3, H, D), proj (H, D, C), fc1, fc2, ada_lin kernels
  kernels = {tuple(x.shape[1:]) for x in jax.tree.leaves(m32.params["blocks"])
             if x.ndim >= 3 and math.prod(x.shape[1:]) >= C * C}
  assert len(kernels) >= 4, kernels
  # and their views as one matmul's operand (the float32 OpenBLAS call, `ops/cpu_gemm.py`, takes
  # (1, K, N)): (in, out) splits, with and without a leading 1
  views = lambda s: {v for i in range(1, len(s))
                     for v in [(math.prod(s[:i]), math.prod(s[i:]))]} | {s}
  kernels = {w for s in kernels for v in views(s) for w in (v, (1, *v))}

  def ran(m):
    """The program `sample` just ran: lowering the same call again hits jit's caches."""
    return sampler.build_sample_call(m, labels, **kw).lower().compile().as_text()

  with mock.patch.object(var_module, "weights_per_layer", lambda platform=None: False):
    stacked = var_jax.sample(m_stacked, labels, return_tokens=True, **kw)
    stacked_ops = _ops_making(ran(m_stacked), kernels)
  assert stacked_ops - {"parameter"}, "the loop over stacks no longer slices them: nothing is checked"
  images, tokens = var_jax.sample(m, labels, return_tokens=True, **kw)
  assert _ops_making(ran(m), kernels) <= {"parameter", "bitcast"}
  np.testing.assert_array_equal(np.asarray(images), np.asarray(stacked[0]))
  for got, want in zip(tokens, stacked[1]):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _attention_dot_operands(hlo: str, num_heads: int, *, pairs_per_block: int | None = None) -> list:
  """The operand types of every matmul batched over (sequences, heads) in a compiled program:
  the attention's QK and PV, as XLA runs them (after its own widening of any operand). With
  `pairs_per_block`, those of the CPU block loop instead: batched over that many (sequence, head)
  pairs, as one batch axis (XLA drops the block's leading axis of 1)."""
  types = dict(re.findall(r"\n\s*(?:ROOT )?%(\S+) = (\w+)\[", hlo))
  if pairs_per_block is not None:
    dots = re.findall(r"= \w+\[(\d+),\d+,\d+\]\S* dot\(%(\S+), %(\S+)\), lhs_batch_dims=\{0\}", hlo)
    return [(types[a], types[b]) for pairs, a, b in dots if int(pairs) == pairs_per_block]
  dots = re.findall(r"= \w+\[\d+,(\d+),[\d,]*\]\S* dot\(%(\S+), %(\S+)\), lhs_batch_dims=\{0,1\}", hlo)
  return [(types[a], types[b]) for heads, a, b in dots if int(heads) == num_heads]


def test_bfloat16_on_cpu_attention_runs_bf16_matmuls_and_blocks_carry_16_bit_values(monkeypatch):
  """On a CPU with AMX the bf16 sampler's attention multiplies bf16 operands (`host_cpu`): in the
  compiled program of the public call both of its matmuls take bf16 operands, in one call and in
  the loop over blocks of (sequence, head) pairs (XLA:CPU widened the QK matmul to float32 when
  its q was a transpose: `xla_reference.masked_attention`'s q_layout). Blocks, once the logits
  outgrow CPU_LOGITS_BLOCK_BYTES, cross the compiled loop as 16-bit values (`ops.float_bits`),
  where XLA:CPU would carry float32 copies; no loop carries a whole cache stack (given the stacks,
  XLA copied them into the loop per layer); the tokens and images equal the one-call ones."""
  import dataclasses
  from var_jax.ops import attention, host_cpu
  monkeypatch.setattr(host_cpu, "has_amx_bf16", lambda: True)
  m32 = model("tiny")
  cfg = m32.config
  bf16 = lambda: var_jax.VARModel(dataclasses.replace(cfg, dtype="bfloat16"), m32.params,
                                  m32.tokenizer)
  labels = np.array([1, 2, 3, 4])
  # one device, so that the loop's shapes are the whole batch's (no batch padding or partitioning)
  kw = dict(rng=jax.random.key(5), cfg=1.5, top_k=20, top_p=0.9,
            mesh=var_jax.sampling_mesh(devices=jax.devices()[:1]))
  m = bf16()
  whole = var_jax.sample(m, labels, return_tokens=True, **kw)  # one call at every scale
  whole_hlo = sampler.build_sample_call(m, labels, **kw).lower().compile().as_text()
  whole_dots = _attention_dot_operands(whole_hlo, cfg.num_heads)
  assert len(whole_dots) >= 2 * (len(cfg.patch_nums) - 1), whole_dots  # QK and PV, every scale
  assert all(pair == ("bf16", "bf16") for pair in whole_dots), whole_dots
  attention_loop = r"while\([^\n]*op_name=\"[^\"]*/attn/while"
  assert not re.search(attention_loop, whole_hlo)
  # Blocks of 2 pairs from the second scale on (logits of pn^2 x kv_len float32 per pair; every
  # pair counts as large). The
  # constant is read at trace time: the public call's program is traced anew
  # (`Call.lower(fresh=True)`, past jit's trace cache) and run compiled.
  per_block = 2
  monkeypatch.setattr(attention, "CPU_LOGITS_BLOCK_BYTES", per_block * 4 * 4 * 5)
  monkeypatch.setattr(attention, "CPU_BLOCK_MIN_PAIR_LOGITS_BYTES", 0)
  call = sampler.build_sample_call(bf16(), labels, **kw)
  compiled = call.lower(fresh=True).compile()
  images, tokens = compiled(*call.args)
  hlo = compiled.as_text()
  block_dots = _attention_dot_operands(hlo, cfg.num_heads, pairs_per_block=per_block)
  assert block_dots and all(pair == ("bf16", "bf16") for pair in block_dots), block_dots
  carries = re.findall(r"= \(([^)]*)\) while\(", hlo)
  head_dim, pairs = cfg.embed_dim // cfg.num_heads, 2 * len(labels) * cfg.num_heads  # guidance

  def blocks(dtype):
    """The loop-carried (pairs, rows, head_dim) outputs of the block loop."""
    found = (tuple(map(int, dims.split(","))) for carry in carries
             for dims in re.findall(dtype + r"\[(\d+,\d+,\d+)\]", carry))
    return [d for d in found if d[0] == pairs and d[2] == head_dim]

  assert re.search(attention_loop, hlo)
  assert blocks("(?:u16|bf16|f32)"), "the attention runs over no blocks: nothing is checked"
  assert not blocks("f32"), blocks("f32")
  stack = rf"\[{cfg.depth},(?:{2 * len(labels)},{cfg.num_heads}|{pairs}),\d+,{head_dim}\]"  # or flat
  assert not any(re.search(stack, carry) for carry in carries), carries
  np.testing.assert_array_equal(np.asarray(images), np.asarray(whole[0]))
  for got, want in zip(tokens, whole[1]):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_decode_mode_initialises_and_applies_in_bfloat16():
  """A decode-mode VAR initialises as before (its params created, not sliced as uint16); applied to
  bfloat16 params on CPU, its cache comes back as the uint16 bit patterns of the bf16 keys."""
  from var_jax.models.var import VAR
  from var_jax.models.var_config import VARConfig
  cfg = VARConfig(depth=2, embed_dim=64, num_heads=2, dtype="bfloat16", vocab_size=32,
                  z_channels=8, patch_nums=(1, 2, 3))
  labels = jnp.zeros((2,), jnp.int32)
  # Jitted: op by op, the two inits and the apply compile one program per op (~17 s).
  variables = jax.jit(VAR(cfg, decode_scale=0).init)(jax.random.key(0), labels)
  teacher = jax.jit(VAR(cfg).init)(jax.random.key(0), labels, jnp.zeros((2, 13, 8)))
  blocks = lambda v: jax.tree.map(lambda x: (x.shape, x.dtype), v["params"]["blocks"])
  assert blocks(variables) == blocks(teacher)  # the same stacked block params
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables["params"])
  apply = functools.partial(VAR(cfg, decode_scale=0).apply, mutable=["cache"])
  logits, mutated = jax.jit(apply)({"params": params}, labels)
  keys = mutated["cache"]["cached_key"]
  assert logits.shape == (2, 1, 32) and keys.dtype == jnp.uint16
  # row 0 of every layer holds the first token's keys: finite bf16 values, l2-normalised per head
  k0 = np.asarray(jax.lax.bitcast_convert_type(keys[:, :, :, 0], jnp.bfloat16), np.float32)
  np.testing.assert_allclose(np.linalg.norm(k0, axis=-1), 1.0, atol=1e-2)
