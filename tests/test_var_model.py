"""The Flax VAR transformer against the official one (fixtures), conversion and config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

import var_jax
from helpers import TAGS, bfloat16_gradient_errors, model, reference, split_tokens, tokenizer
from var_jax.checkpoints import from_torch
from var_jax.errors import CheckpointError, ConfigError, InputError
from var_jax.models.var import VAR
from var_jax.models.var_config import VARConfig
from var_jax.models.vqvae_config import PATCH_NUMS_512


@pytest.mark.parametrize("tag", TAGS)
def test_config_inferred_from_shapes(tag):
  cfg = model(tag).config
  assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.num_classes) == (2, 128, 2, 10)
  assert cfg.shared_aln == (tag == "tiny_saln")
  assert (cfg.vocab_size, cfg.z_channels, cfg.patch_nums) == (64, 8, (1, 2, 3, 4))


@pytest.mark.parametrize("tag", TAGS)
def test_logits_match_official(tag):
  ref = reference(tag)
  logits = model(tag).logits(ref["tf_label"], split_tokens(ref["vae_idx_BL"]))
  assert logits.shape == (2, 30, 64) and logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), ref["tf_logits"], atol=1e-4)


@pytest.mark.parametrize("tag", TAGS)
def test_block_inputs_and_loss_and_grads_match_official(tag):
  """Teacher-forcing loss and every parameter gradient against torch autograd."""
  ref = reference(tag)
  m = model(tag)
  x = ref["tf_x_BLCv_wo_first_l"]
  target = jnp.asarray(ref["vae_idx_BL"])

  def loss_fn(params):
    logits = VAR(m.config).apply({"params": params}, ref["tf_label"], x)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, target[..., None], axis=-1))

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(m.params)  # jitted: op by op is slower
  np.testing.assert_allclose(float(loss), float(ref["tf_loss"]), rtol=1e-5)
  # Map the official gradient names onto our tree with the same converter as the weights.
  sd_grads = {k[len("grad/var/"):]: v for k, v in ref.items() if k.startswith("grad/var/")}
  expected = from_torch.var_params_from_torch(
      {**sd_grads, "lvl_1L": ref["lvl_1L"], "attn_bias_for_masking": ref["attn_bias_for_masking"]}, m.config)
  flat_got = jax.tree_util.tree_leaves_with_path(grads)
  flat_exp = dict(jax.tree_util.tree_leaves_with_path(expected))
  assert len(flat_got) == len(flat_exp)
  for path, g in flat_got:
    e = flat_exp[path]
    np.testing.assert_allclose(np.asarray(g), e, atol=2e-5 + 1e-4 * np.abs(e).max(),
                               err_msg=jax.tree_util.keystr(path))
  # The clamped scale_mul element (last block, last head) gets exactly zero gradient.
  assert float(grads["blocks"]["attn"]["scale_mul_1H11"][1, 1]) == 0.0


def test_class_dropout_only_in_training_and_driven_by_key():
  import dataclasses
  m = model("tiny")
  ref = reference("tiny")
  x = ref["tf_x_BLCv_wo_first_l"]
  labels = jnp.asarray([3] * 2)
  params = {"params": m.params}
  # Drop path off to isolate the label dropout.
  cfg = dataclasses.replace(m.config, drop_path_rate=0.0)
  base = np.asarray(VAR(cfg).apply(params, labels, x))
  null = np.asarray(VAR(cfg).apply(params, jnp.full((2,), cfg.num_classes), x))
  assert not np.allclose(base, null, atol=1e-3)  # the label matters
  all_drop = dataclasses.replace(cfg, cond_drop_rate=0.999999)
  # Eval mode keeps every label whatever the rate; training with rate ~1 drops every one.
  np.testing.assert_allclose(np.asarray(VAR(all_drop).apply(params, labels, x)), base, atol=1e-5)
  out = VAR(all_drop, train=True).apply(params, labels, x, rngs={"dropout": jax.random.key(1)})
  np.testing.assert_allclose(np.asarray(out), null, atol=1e-5)
  # Rate 0.5: the key picks, per image, the labelled or the null forward; same key, same pick.
  half = VAR(dataclasses.replace(cfg, cond_drop_rate=0.5), train=True)
  apply_half = jax.jit(lambda key: half.apply(params, labels, x, rngs={"dropout": key}))
  picks = []
  for seed in range(8):
    out = np.asarray(apply_half(jax.random.key(seed)))
    for b in range(2):
      dropped = not np.allclose(out[b], base[b], atol=1e-5)
      if dropped:
        np.testing.assert_allclose(out[b], null[b], atol=1e-5)
      picks.append(dropped)
  assert any(picks) and not all(picks), picks
  np.testing.assert_array_equal(np.asarray(apply_half(jax.random.key(7))), out)


@pytest.mark.parametrize("tag", TAGS)
def test_kv_cached_decode_equals_teacher_forcing(tag):
  """Scale-by-scale decode with teacher-forced inputs reproduces the full masked forward."""
  m = model(tag)
  ref = reference(tag)
  tok = tokenizer()
  idx = split_tokens(ref["vae_idx_BL"])
  labels = jnp.asarray(ref["tf_label"])
  full = np.asarray(m.logits(labels, idx))
  x = np.asarray(tok.apply(idx, method=var_jax.models.vqvae.VQVAE.indices_to_var_input))
  cache, start = None, 0
  for si, pn in enumerate(m.config.patch_nums):
    variables = {"params": m.params} if cache is None else {"params": m.params, "cache": cache}
    x_in = None if si == 0 else x[:, start - 1:start - 1 + pn * pn]
    out, mutated = VAR(m.config, decode_scale=si).apply(variables, labels, x_in, mutable=["cache"])
    cache = mutated["cache"]
    np.testing.assert_allclose(np.asarray(out), full[:, start:start + pn * pn], atol=2e-5)
    start += pn * pn


def _silu(x):
  return x / (1.0 + np.exp(-x))


@pytest.mark.parametrize("tag", TAGS)
def test_decode_keeps_the_labels_adaln_from_the_first_scale(tag):
  """Scale 0 keeps every block's and the head's AdaLN projection of the label in the cache (checked
  against numpy from the weights); later scales read it there, not the projection weights: with
  those weights turned to NaN they give the same logits, and without scale 0's cache an error."""
  m = model(tag)
  cfg, params = m.config, jax.tree.map(np.asarray, m.params)
  labels = jnp.asarray([3, cfg.num_classes])  # a class and the null class
  _, mutated = VAR(cfg, decode_scale=0).apply({"params": m.params}, labels, mutable=["cache"])
  cache = mutated["cache"]
  C = cfg.embed_dim
  act = _silu(params["class_emb"]["embedding"][np.asarray(labels)].astype(np.float64))
  if cfg.shared_aln:
    shared = act @ params["shared_ada_lin"]["kernel"] + params["shared_ada_lin"]["bias"]
    want = params["blocks"]["ada_gss"][:, None] + shared.reshape(1, 2, 6, C)
  else:
    lin = params["blocks"]["ada_lin"]
    want = (np.einsum("bc,lcd->lbd", act, lin["kernel"]) + lin["bias"][:, None]).reshape(-1, 2, 6, C)
  np.testing.assert_allclose(np.asarray(cache["block_adaln"]), want, rtol=1e-5, atol=1e-6)
  head = params["head_nm"]["ada_lin"]
  np.testing.assert_allclose(np.asarray(cache["head_adaln"]),
                             (act @ head["kernel"] + head["bias"]).reshape(2, 2, C),
                             rtol=1e-5, atol=1e-6)

  x_in = jax.random.normal(jax.random.key(0), (2, 4, cfg.z_channels))
  variables = {"params": m.params, "cache": cache}
  scale1 = VAR(cfg, decode_scale=1)
  logits, _ = scale1.apply(variables, labels, x_in, mutable=["cache"])
  poisoned = jax.tree.map(lambda x: x, m.params)
  for where in (("blocks", "ada_lin"), ("head_nm", "ada_lin"), ("shared_ada_lin",)):
    node = poisoned
    for key in where[:-1]:
      node = node[key]
    if where[-1] in node:
      node[where[-1]] = jax.tree.map(lambda w: jnp.full_like(w, jnp.nan), node[where[-1]])
  again, _ = scale1.apply({"params": poisoned, "cache": cache}, labels, x_in, mutable=["cache"])
  np.testing.assert_array_equal(np.asarray(again), np.asarray(logits))
  assert np.isfinite(np.asarray(logits)).all()
  with pytest.raises(ValueError, match="cache that scale 0"):
    scale1.apply({"params": m.params}, labels, x_in, mutable=["cache"])


@pytest.mark.parametrize("depth,expected", [(16, 310_283_520), (20, 600_917_136), (24, 1_033_399_360),
                                            (30, 2_010_020_356), (36, 2_353_893_904)])
def test_parameter_counts_equal_official(depth, expected):
  kw = dict(depth=depth)
  if depth == 36:
    kw.update(shared_aln=True, patch_nums=PATCH_NUMS_512)
  cfg = VARConfig(**kw)
  abstract = jax.eval_shape(lambda: VAR(cfg).init(
      jax.random.key(0), jnp.zeros((1,), jnp.int32), jnp.zeros((1, cfg.seq_len - 1, 32))))
  leaves = jax.tree.leaves(meta.unbox(abstract["params"]))
  assert sum(int(np.prod(x.shape)) for x in leaves) == expected


def test_params_carry_logical_axis_names():
  cfg = VARConfig(depth=2, patch_nums=(1, 2), num_classes=10, vocab_size=64, z_channels=8)
  abstract = jax.eval_shape(lambda: VAR(cfg).init(
      jax.random.key(0), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 4, 8))))
  specs = meta.get_partition_spec(abstract["params"]) if hasattr(meta, "get_partition_spec") else None
  import flax.linen as nn
  specs = nn.get_partition_spec(abstract)["params"]
  assert tuple(specs["blocks"]["attn"]["mat_qkv"]) == ("layers", "embed", None, "heads", "kv")
  assert tuple(specs["blocks"]["attn"]["proj_kernel"]) == ("layers", "heads", "kv", "embed")
  assert tuple(specs["blocks"]["ffn"]["fc1"]["kernel"]) == ("layers", "embed", "mlp")
  assert tuple(specs["head"]["kernel"]) == ("embed", "vocab")
  assert tuple(specs["class_emb"]["embedding"]) == ("classes", "embed")


def test_official_init_statistics():
  cfg = VARConfig(depth=4, patch_nums=(1, 2, 3), num_classes=10, vocab_size=256, z_channels=8,
                  init_adaln_gamma=1e-3)
  params = meta.unbox(jax.jit(VAR(cfg).init)(jax.random.key(0), jnp.zeros((2,), jnp.int32),
                                             jnp.zeros((2, 13, 8)))["params"])
  sigma = cfg.init_sigma
  np.testing.assert_allclose(np.std(params["blocks"]["ffn"]["fc1"]["kernel"]), sigma, rtol=0.05)
  np.testing.assert_allclose(np.std(params["blocks"]["ffn"]["fc2"]["kernel"]), sigma / np.sqrt(8), rtol=0.05)
  np.testing.assert_allclose(np.std(params["head"]["kernel"]), sigma * 0.02, rtol=0.05)
  ada = np.asarray(params["blocks"]["ada_lin"]["kernel"])
  C = cfg.embed_dim
  np.testing.assert_allclose(np.std(ada[..., :2 * C]), sigma * 1e-3, rtol=0.05)
  np.testing.assert_allclose(np.std(ada[..., 2 * C:]), sigma * 0.5, rtol=0.05)
  np.testing.assert_allclose(params["blocks"]["attn"]["scale_mul_1H11"], np.log(4.0), rtol=1e-6)
  assert not np.any(params["head"]["bias"]) and not np.any(params["blocks"]["attn"]["q_bias"])


def test_vocab_mismatch_names_the_tokenizer(fixtures_dir):
  sd = dict(var_jax.load_torch_checkpoint(fixtures_dir / "official_tiny_seed0_var.pth"))
  sd["head.weight"] = np.zeros((128, 128), np.float32)
  sd["head.bias"] = np.zeros((128,), np.float32)
  with pytest.raises(CheckpointError, match="128 codes but the tokenizer has 64"):
    var_jax.VARModel.from_torch(sd, tokenizer())


def test_shape_mismatch_and_wrong_patch_nums(fixtures_dir):
  sd = dict(var_jax.load_torch_checkpoint(fixtures_dir / "official_tiny_seed0_var.pth"))
  bad = dict(sd)
  bad["blocks.1.ffn.fc2.weight"] = np.zeros((128, 256), np.float32)
  with pytest.raises(CheckpointError, match="mis-shaped blocks/ffn/fc2/kernel across blocks"):
    var_jax.VARModel.from_torch(bad, tokenizer())
  other = var_jax.Tokenizer(tokenizer().config.__class__(**{**tokenizer().config.to_dict(),
                                                           "patch_nums": (1, 2, 4)}), tokenizer().params)
  with pytest.raises(CheckpointError, match="30 positions"):
    var_jax.VARModel.from_torch(sd, other)
  with pytest.raises(CheckpointError, match="VAR"):
    var_jax.VARModel.from_torch(fixtures_dir / "official_tiny_vae.pth", tokenizer())


def test_bad_labels_and_configs():
  m = model("tiny")
  idx = split_tokens(reference("tiny")["vae_idx_BL"])
  with pytest.raises(InputError, match=r"outside \[0, 11\)"):
    m.logits(np.array([3, 11]), idx)
  with pytest.raises(InputError, match="batch"):
    m.logits(np.array([3, 4, 5]), idx)
  with pytest.raises(ConfigError, match="divisible"):
    VARConfig(depth=2, embed_dim=100, num_heads=3)
  with pytest.raises(ConfigError, match="attention_impl"):
    VARConfig(depth=2, attention_impl="flash")


def test_bf16_ffn_gelu_is_float32_rounded_once():
  """In bfloat16 the FFN's tanh-GELU is computed in float32 and rounded once, as torch's bf16 GELU
  is: with fc1 and fc2 as identities the block returns GELU(x) correctly rounded to bfloat16
  (a bf16-op-by-op GELU, with its constants rounded too, misses many of them)."""
  from var_jax.models.var import FFN  # pylint: disable=import-outside-toplevel
  cfg = VARConfig(depth=2, embed_dim=128, num_heads=2, dtype="bfloat16")
  C, M = cfg.embed_dim, cfg.mlp_dim
  params = {"fc1": {"kernel": jnp.eye(C, M), "bias": jnp.zeros(M)},
            "fc2": {"kernel": jnp.eye(M, C), "bias": jnp.zeros(C)}}
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64, C)) * 3, jnp.bfloat16)
  out = np.asarray(FFN(cfg).apply({"params": params}, x), np.float64)
  x64 = np.asarray(x, np.float64)
  gelu64 = 0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64 ** 3)))
  rounded = np.asarray(jnp.asarray(gelu64, jnp.float32).astype(jnp.bfloat16), np.float64)
  # Below x = -3 the formula's 1 + tanh cancels in float32 (in torch too): compare above it.
  exact = (out == rounded)[x64 > -3]
  assert exact.mean() > 0.995, exact.mean()  # measured 0.9986; bf16 op by op: 0.63


def test_bf16_gradients_sum_in_float32():
  """Every parameter's gradient of a bf16 VAR at 680 tokens per image (d16's scales) is float32
  autodiff's of the same parameters up to the bf16 forward's rounding (at most 0.7% measured): the
  biases' and AdaLN gammas' gradients sum their output gradients over the batch and tokens in
  float32. With biases added in bf16 (flax's nn.Dense) and gammas multiplied in bf16, XLA:CPU
  summed those gradients in bf16: the head bias's 14.6% off, the attention and FFN biases'
  2.2-2.4%."""
  cfg = VARConfig(depth=2, embed_dim=64, num_heads=2, vocab_size=64,
                  patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
  B, rng = 8, np.random.default_rng(0)
  labels = jnp.asarray(rng.integers(0, cfg.num_classes, B))
  x = jnp.asarray(rng.standard_normal((B, cfg.seq_len - cfg.first_l, cfg.z_channels)), jnp.float32)
  target = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, cfg.seq_len, 1)))
  # Non-zero biases and gammas (they start at zero), so every gradient path carries values.
  params = jax.jit(lambda key: jax.tree.map(lambda p: p + 0.02 * jax.random.normal(key, p.shape),
                                            VAR(cfg).init(key, labels, x)["params"]))(
                                                jax.random.PRNGKey(0))

  def loss(p, c):
    logits = VAR(c).apply({"params": p}, labels, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), target, -1))

  errors = bfloat16_gradient_errors(loss, params, cfg)
  assert len(errors) == 22
  worst = {k: e for k, e in errors.items() if e > 0.012}
  assert not worst, worst


def test_bf16_ffn_backward_saves_no_float32_activation(capsys):
  """The float32 GELU is recomputed in the backward: the residuals a bf16 FFN keeps for its
  gradient (JAX's printed list) hold no float32 array of the (batch, length, mlp) activation."""
  from var_jax.models.var import FFN  # pylint: disable=import-outside-toplevel
  cfg = VARConfig(depth=2, embed_dim=128, num_heads=2, dtype="bfloat16")
  x = jnp.ones((2, 30, cfg.embed_dim), jnp.bfloat16)
  params = FFN(cfg).init(jax.random.PRNGKey(0), x)["params"]
  loss = lambda p, x: jnp.sum(FFN(cfg).apply({"params": p}, x).astype(jnp.float32))
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(loss, params, x)
  lines = capsys.readouterr().out.splitlines()
  activation = f"[2,30,{cfg.mlp_dim}]"
  assert any(line.startswith("bf16" + activation) for line in lines), lines
  assert not [line for line in lines if line.startswith("f32" + activation)], lines
