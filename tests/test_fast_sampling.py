"""Faster-than-exact sampling: cfg=0 runs B sequences; collaborative decoding (drafter + refiner).

The official tiny and tiny_saln fixtures are two different models on one tokenizer: tiny drafts,
tiny_saln refines. Expectations come from the official greedy fixtures and from each model's
teacher-forcing logits (`VARModel.logits`), never from the sampler's own code.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import var_jax
from helpers import PATCH_NUMS, concat_tokens, model, reference, tokenizer
from var_jax import aot
from var_jax.errors import InputError
from var_jax.models.var import VAR
from var_jax.models.vqvae import VQVAE

K = len(PATCH_NUMS)
ENDS = np.cumsum([pn * pn for pn in PATCH_NUMS])
BEGINS = ENDS - [pn * pn for pn in PATCH_NUMS]


def _greedy_argmax(m, labels, tokens, cfg):
  """Per-token argmax of the guided teacher-forcing logits of `m` on `tokens` (B, L)."""
  labels = np.asarray(labels)
  cond = np.asarray(m.logits(labels, tokens))
  if cfg == 0:
    return cond.argmax(-1)
  null = np.asarray(m.logits(np.full_like(labels, m.config.num_classes), tokens))
  t = np.concatenate([np.full(pn * pn, cfg * si / (K - 1)) for si, pn in enumerate(PATCH_NUMS)])
  return ((1 + t[None, :, None]) * cond - t[None, :, None] * null).argmax(-1)


@pytest.mark.parametrize("draft_scales, plain", [(K, "tiny"), (0, "tiny_saln")])
def test_draft_scales_at_the_ends_are_plain_sampling(draft_scales, plain):
  labels = np.array([0, 3, 5, 9])
  key = jax.random.key(11)
  got, got_tokens = var_jax.sample(model("tiny"), labels, rng=key, refiner=model("tiny_saln"),
                                   draft_scales=draft_scales, return_tokens=True)
  want, want_tokens = var_jax.sample(model(plain), labels, rng=key, return_tokens=True)
  np.testing.assert_array_equal(concat_tokens(got_tokens), concat_tokens(want_tokens))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("draft_scales, plain", [(K, "tiny"), (0, "tiny_saln")])
def test_draft_scales_at_the_ends_give_the_official_greedy_tokens(draft_scales, plain):
  ref = reference(plain)
  _, tokens = var_jax.sample(model("tiny"), ref["sample_label"], rng=jax.random.key(0), cfg=1.5,
                             top_k=1, top_p=0.0, refiner=model("tiny_saln"),
                             draft_scales=draft_scales, return_tokens=True)
  np.testing.assert_array_equal(concat_tokens(tokens), ref["greedy_cfg1p5_idx_BL"])


@pytest.mark.parametrize("draft_scales", [1, pytest.param(2, marks=pytest.mark.slow),
                                          pytest.param(3, marks=pytest.mark.slow)])  # ~20 s each
def test_refined_scales_follow_the_refiners_teacher_forcing(draft_scales):
  """Greedy: the drafted scales are the drafter's official greedy tokens; every refined token is
  the argmax of the refiner's guided teacher-forcing logits given the tokens before it (which
  checks the refiner's one-pass prefill of the drafted prefix)."""
  ref = reference("tiny")
  labels = ref["sample_label"]
  _, tokens = var_jax.sample(model("tiny"), labels, rng=jax.random.key(0), cfg=1.5, top_k=1,
                             top_p=0.0, refiner=model("tiny_saln"), draft_scales=draft_scales,
                             return_tokens=True)
  idx_BL = concat_tokens(tokens)
  drafted = ENDS[draft_scales - 1]
  np.testing.assert_array_equal(idx_BL[:, :drafted], ref["greedy_cfg1p5_idx_BL"][:, :drafted])
  want = _greedy_argmax(model("tiny_saln"), labels, tokens, cfg=1.5)
  np.testing.assert_array_equal(idx_BL[:, drafted:], want[:, drafted:])
  # Not the drafter's continuation: the refiner changed something.
  assert not np.array_equal(idx_BL, ref["greedy_cfg1p5_idx_BL"])


def test_prefill_logits_and_cache_equal_scale_by_scale_decoding():
  """The VAR module's prefill of scales 0..si: its logits equal teacher forcing, and decoding the
  next scale from its cache equals teacher forcing's next rows."""
  m = model("tiny_saln")
  ref = reference("tiny")
  labels = np.asarray(ref["sample_label"])
  tokens = [t for t in tokenizer().check_index_maps(
      [ref["greedy_cfg1p5_idx_BL"][:, b:e].reshape(-1, pn, pn)
       for b, e, pn in zip(BEGINS, ENDS, PATCH_NUMS)])]
  x_BlC = tokenizer().module.apply({"params": tokenizer().params}, tokens,
                                   method=VQVAE.indices_to_var_input)
  full = np.asarray(m.logits(labels, tokens))
  si = 2
  prefill_logits, mutated = VAR(m.config, decode_scale=si, prefill=True).apply(
      {"params": m.params}, labels, x_BlC[:, :ENDS[si] - 1], mutable=["cache"])
  np.testing.assert_allclose(np.asarray(prefill_logits), full[:, :ENDS[si]], rtol=1e-5, atol=1e-5)
  nxt, _ = VAR(m.config, decode_scale=si + 1).apply(
      {"params": m.params, "cache": mutated["cache"]}, labels, x_BlC[:, ENDS[si] - 1:ENDS[si + 1] - 1],
      mutable=["cache"])
  np.testing.assert_allclose(np.asarray(nxt), full[:, ENDS[si]:ENDS[si + 1]], rtol=1e-5, atol=1e-5)


def test_unguided_greedy_tokens_follow_the_conditional_argmax():
  labels = np.array([1, 4, 7])
  _, tokens = var_jax.sample(model("tiny"), labels, rng=jax.random.key(0), cfg=0.0, top_k=1,
                             top_p=0.0, return_tokens=True)
  np.testing.assert_array_equal(concat_tokens(tokens),
                                _greedy_argmax(model("tiny"), labels, tokens, cfg=0.0))


def test_unguided_sampling_runs_half_the_transformer():
  """cfg=0 compiles a program of B sequences: the transformer's FLOPs (the program's less the
  decoder's, from XLA's cost analysis) halve against guided sampling."""
  m = model("tiny")
  mesh = var_jax.sampling_mesh(devices=jax.devices()[:1])
  labels = np.array([3])  # one image on one device: the decoder runs once, outside any loop

  def flops(lowered):
    return lowered.cost_analysis()["flops"]

  guided = flops(aot.lower_sample(m, labels, mesh=mesh, cfg=1.5))
  free = flops(aot.lower_sample(m, labels, mesh=mesh, cfg=0.0))
  tc = m.tokenizer.config
  f_hat = jax.ShapeDtypeStruct((1, tc.latent_size, tc.latent_size, tc.z_channels), jnp.float32)
  decoder = flops(jax.jit(lambda p, f: VQVAE(tc).apply({"params": p}, f, method=VQVAE.decode_fhat))
                  .lower(m.tokenizer.params, f_hat))
  transformer_free, transformer_guided = free - decoder, guided - decoder
  assert transformer_free > 0
  assert transformer_guided / transformer_free == pytest.approx(2.0, rel=0.1)


def _other_tokenizer():
  tok = tokenizer()
  params = jax.tree.map(lambda x: np.asarray(x) + 1e-3, tok.params)
  return var_jax.Tokenizer(tok.config, params)


def test_refiner_on_another_tokenizer_is_refused():
  saln = model("tiny_saln")
  refiner = var_jax.VARModel(saln.config, saln.params, _other_tokenizer())
  with pytest.raises(InputError, match="does not share the drafter's tokenizer"):
    var_jax.sample(model("tiny"), [1], rng=jax.random.key(0), refiner=refiner)


def test_refiner_on_an_equal_tokenizer_object_is_accepted():
  tok = tokenizer()
  copy = var_jax.Tokenizer(tok.config, jax.tree.map(np.array, tok.params))
  saln = model("tiny_saln")
  refiner = var_jax.VARModel(saln.config, saln.params, copy)
  got = var_jax.sample(model("tiny"), [2], rng=jax.random.key(1), refiner=refiner, draft_scales=0)
  want = var_jax.sample(saln, [2], rng=jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("kwargs, message", [
    (dict(draft_scales=2), "draft_scales needs a refiner"),
    (dict(refiner="tiny_saln"), "refiner must be a var_jax.VARModel"),
    (dict(refiner=None, draft_scales=K + 1), "draft_scales needs a refiner"),
])
def test_bad_collaborative_arguments(kwargs, message):
  with pytest.raises(InputError, match=message):
    var_jax.sample(model("tiny"), [1], rng=jax.random.key(0), **kwargs)


@pytest.mark.parametrize("draft_scales", [-1, K + 1, 1.5, True])
def test_draft_scales_out_of_range_is_refused(draft_scales):
  with pytest.raises(InputError, match=rf"draft_scales must be an int in \[0, {K}\]"):
    var_jax.sample(model("tiny"), [1], rng=jax.random.key(0), refiner=model("tiny_saln"),
                   draft_scales=draft_scales)


def test_refiner_with_other_classes_is_refused():
  saln = model("tiny_saln")
  config = dataclasses.replace(saln.config, num_classes=saln.config.num_classes + 1)
  emb = saln.params["class_emb"]["embedding"]
  params = {**saln.params, "class_emb": {"embedding": np.concatenate([emb, emb[:1]])}}
  refiner = var_jax.VARModel(config, params, saln.tokenizer)
  with pytest.raises(InputError, match="the refiner has 11 classes and the drafter 10"):
    var_jax.sample(model("tiny"), [1], rng=jax.random.key(0), refiner=refiner)


def test_collaborative_sampling_on_a_2x2x2_mesh_equals_one_device():
  """Both models split over data x fsdp x tensor, in one program: the same tokens as on one
  device; a second call transfers no weights (both stay placed)."""
  labels = np.arange(6) % 10
  key = jax.random.key(4)
  mesh = var_jax.sampling_mesh(2, 2, 2)
  drafter, refiner = model("tiny"), model("tiny_saln")
  _, sharded = var_jax.sample(drafter, labels, rng=key, refiner=refiner, draft_scales=2,
                              mesh=mesh, return_tokens=True)
  _, single = var_jax.sample(drafter, labels, rng=key, refiner=refiner, draft_scales=2,
                             mesh=var_jax.sampling_mesh(devices=jax.devices()[:1]),
                             return_tokens=True)
  np.testing.assert_array_equal(concat_tokens(sharded), concat_tokens(single))
  qkv = refiner.placements[mesh].var_params["blocks"]["attn"]["mat_qkv"][0]  # layer 0 (on CPU)
  assert len(qkv.sharding.device_set) == 8 and qkv.sharding.shard_shape(qkv.shape) != qkv.shape
  with jax.transfer_guard("disallow"):
    _, again = var_jax.sample(drafter, labels, rng=key, refiner=refiner, draft_scales=2,
                              mesh=mesh, return_tokens=True)
  np.testing.assert_array_equal(concat_tokens(again), concat_tokens(sharded))
