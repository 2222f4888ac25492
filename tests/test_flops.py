"""The model FLOPs count (var_jax/models/flops.py) against XLA's cost analysis of the compiled fwd+bwd.

XLA's CPU cost analysis charges a while loop's body once, so the block scan is unrolled
(`aot.scan_unroll`) and every block is counted. It also charges every elementwise op (norms,
AdaLN modulation, GELU, softmax, the cross-entropy, their gradients), which are O(L C) per layer
against the matmuls' O(L C^2), and its dense XLA attention computes all L^2 (query, key) pairs,
the masked ones too. So the compiled program's FLOPs are compared with ours plus the masked pairs'
12 C each, and must lie between 1x (elementwise FLOPs only add) and 1.06x: at C = 256 the
elementwise ops measured 2-4% of the total here (jax 0.10.2, CPU), growing as 1/C for narrower
models. Counting 6 x all parameters per token (AdaLN, embeddings and positions included, the old
trainer figure) is ~1.45x too high for this config and fails.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta
from jax.extend import core as jax_core

from var_jax import aot, scales
from var_jax.models import flops
from var_jax.models.var import VAR
from var_jax.models.var_config import VARConfig
from var_jax.train import config_lib, train_var

C = 256
BATCH = 2
TOLERANCE = 1.06  # elementwise share at C = 256, see the module docstring


def _config(depth: int) -> VARConfig:
  return VARConfig(depth=depth, embed_dim=C, num_heads=4, num_classes=10, vocab_size=64,
                   z_channels=8, patch_nums=(1, 2, 3, 4), attention_impl="xla", dtype="float32",
                   remat_policy="none", drop_path_rate=0.0, cond_drop_rate=0.0)


def _abstract_params(cfg: VARConfig):
  L = cfg.seq_len
  init = lambda: VAR(cfg).init(jax.random.key(0), jnp.zeros((1,), jnp.int32),
                               jnp.zeros((1, L - cfg.first_l, cfg.z_channels)))["params"]
  return meta.unbox(jax.eval_shape(init))


def _xla_flops_per_example(cfg: VARConfig, prog_si=None) -> float:
  """Compiled forward + backward (grad of the mean CE) of one batch, per example."""
  model = VAR(cfg, train=True, prog_si=prog_si)
  end = scales.seq_len(flops.stage_patch_nums(cfg, prog_si))

  def loss(params, labels, x, targets):
    logits = model.apply({"params": params}, labels, x, rngs={"dropout": jax.random.key(0)})
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

  args = (_abstract_params(cfg), jax.ShapeDtypeStruct((BATCH,), jnp.int32),
          jax.ShapeDtypeStruct((BATCH, end - cfg.first_l, cfg.z_channels), jnp.float32),
          jax.ShapeDtypeStruct((BATCH, end), jnp.int32))
  with aot.scan_unroll(cfg.depth):  # no while loop left: every block is counted
    compiled = jax.jit(jax.grad(loss)).lower(*args).compile()
  assert aot.while_loops(compiled) == 0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / BATCH


def _dense_attention_extra(cfg: VARConfig, prog_si=None) -> float:
  """FLOPs dense XLA attention spends on the masked (query, key) pairs (12 C each, per layer)."""
  mask = scales.block_causal_mask(flops.stage_patch_nums(cfg, prog_si))
  return 12.0 * cfg.depth * cfg.embed_dim * float(mask.size - mask.sum())


def _all_params_count(cfg: VARConfig) -> float:
  """The old trainer figure: 6 x every parameter per token, plus the visible attention."""
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(_abstract_params(cfg)))
  return 6.0 * n * cfg.seq_len + flops.flops_breakdown(cfg)["attention"]


@pytest.fixture(scope="module")
def compiled_flops():
  return {depth: _xla_flops_per_example(_config(depth)) for depth in (2, 4)}


def test_whole_program_matches_xla(compiled_flops):
  for depth, xla in compiled_flops.items():
    cfg = _config(depth)
    ours = flops.flops_per_example(cfg) + _dense_attention_extra(cfg)
    print(f"depth {depth}: XLA {xla:.4g}, ours + masked pairs {ours:.4g}, ratio {xla / ours:.4f}")
    assert 1.0 <= xla / ours <= TOLERANCE, (depth, xla, ours)
    # Going back to 6 x all parameters per token is caught.
    assert _all_params_count(cfg) > 1.3 * xla, (depth, _all_params_count(cfg), xla)


def test_per_block_cost_matches_xla(compiled_flops):
  """depth 4 - depth 2 = two blocks: the per-token block linears, the AdaLN, the attention."""
  xla_block = (compiled_flops[4] - compiled_flops[2]) / 2
  cfg2, cfg4 = _config(2), _config(4)
  ours_block = ((flops.flops_per_example(cfg4) + _dense_attention_extra(cfg4))
                - (flops.flops_per_example(cfg2) + _dense_attention_extra(cfg2))) / 2
  L = cfg2.seq_len
  assert ours_block == 6 * (12 * C * C * L + 6 * C * C) + 12 * C * L * L  # by hand, mlp_ratio 4
  assert 1.0 <= xla_block / ours_block <= TOLERANCE, (xla_block, ours_block)


def test_progressive_stage_matches_xla():
  cfg = _config(2)
  prog_si = 2  # scales 1, 2, 3: ed = 14 tokens
  xla = _xla_flops_per_example(cfg, prog_si)
  ours = flops.flops_per_example(cfg, prog_si) + _dense_attention_extra(cfg, prog_si)
  assert 1.0 <= xla / ours <= TOLERANCE, (xla, ours)
  assert flops.flops_per_example(cfg, prog_si) < flops.flops_per_example(cfg)
  assert flops.flops_per_example(cfg, cfg.num_scales - 1) == flops.flops_per_example(cfg)


def test_breakdown_by_hand_and_bad_stage():
  cfg = VARConfig(depth=16)  # VAR-d16: C 1024, L 680, V 4096, Cvae 32
  parts = flops.flops_breakdown(cfg)
  Cd, L = 1024, 680
  visible = sum((pn * pn) * scales.begin_ends(cfg.patch_nums)[i][1]
                for i, pn in enumerate(cfg.patch_nums))
  assert parts["blocks"] == 6 * 16 * 12 * Cd * Cd * L
  assert parts["head"] == 6 * Cd * 4096 * L
  assert parts["word_embed"] == 4 * 32 * Cd * (L - 1)
  assert parts["adaln"] == 6 * (16 * 6 + 2) * Cd * Cd
  assert parts["attention"] == 12 * 16 * Cd * visible
  assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
  np.testing.assert_allclose(parts["total"], 8.955e11, rtol=1e-3)  # ~0.9 TFLOP per 256 px image
  with pytest.raises(Exception, match="prog_si"):
    flops.flops_per_example(cfg, 10)


def test_sampler_flops_of_d16_match_the_hand_count():
  config = config_lib.var_imagenet_config(16)
  var_cfg = train_var.var_config_from(config, aot.tokenizer_config(config))
  parts = flops.sampler_flops_per_image(var_cfg)
  # C = 1024, mlp 4096, V = 4096, L = 680, two sequences (guidance); per scale the rows attend
  # to every key so far: sum of rows x end over scales = the block-causal mask's visible pairs.
  C, L, V = 1024, 680, 4096
  rows_x_keys = sum((e - b) * e for b, e in scales.begin_ends(var_cfg.patch_nums))
  assert parts["blocks"] == 2 * L * 16 * 2 * (4 * C * C + 2 * C * 4 * C)
  assert parts["attention"] == 2 * 16 * 4 * C * rows_x_keys
  assert parts["head"] == 2 * L * 2 * C * V
  assert parts["adaln"] == 2 * 2 * (16 * 6 + 2) * C * C  # per sequence, once per call
  assert parts["word_embed"] == 2 * (L - 1) * 2 * 32 * C
  assert parts["total"] == pytest.approx(597.06e9, rel=1e-4)
  unguided = flops.sampler_flops_per_image(var_cfg, guidance=False)
  assert unguided["total"] * 2 == parts["total"]
  # One forward pass per sequence: the training count's forward share.
  train = flops.flops_breakdown(var_cfg)
  assert unguided["blocks"] * 3 == train["blocks"] and unguided["attention"] * 3 == train["attention"]
  assert unguided["word_embed"] * 2 == train["word_embed"]


def test_kernel_attention_flops_by_hand():
  cfg = VARConfig(depth=16)
  visible = float(scales.block_causal_mask(cfg.patch_nums).sum())
  assert flops.kernel_attention_flops_per_example(cfg, remat=False) == 14 * 16 * 1024 * visible
  assert flops.kernel_attention_flops_per_example(cfg, remat=True) == 18 * 16 * 1024 * visible
  # The kernel recomputes QK^T in the backward: more than the model count's 12 C per pair.
  assert (flops.kernel_attention_flops_per_example(cfg, remat=False)
          > flops.flops_breakdown(cfg)["attention"])


def test_trainer_logs_these_flops():
  """The figure the loop turns into MFU is this module's, for the model the config builds."""
  import importlib.util
  import pathlib
  from var_jax.train import train_var
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "var_tiny.py"
  spec = importlib.util.spec_from_file_location("var_tiny", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  task, var_cfg = train_var.build_task(module.get_config("steps=2,batch=8"))
  assert task.staging is None
  assert task.flops_per_example == flops.flops_per_example(var_cfg)
  assert task.stage_at(0).flops_per_example == flops.flops_per_example(var_cfg)
  n_all = sum(math.prod(x.shape) for x in jax.tree.leaves(
      meta.unbox(jax.eval_shape(task.init_state, jax.random.key(0)).params)))
  assert task.flops_per_example < 0.9 * 6 * n_all * var_cfg.seq_len  # not 6 x all params per token


def _jaxpr_matmul_counts(jaxpr) -> tuple[float, int]:
  """(FLOPs, output elements) of every convolution and dot in a jaxpr, from the op shapes alone
  (sub-jaxprs included, a scan's body `length` times, a conditional's costlier branch): 2 x
  output elements x the contracted size. The conditionals of these programs hold a CPU block
  convolution's block and a branch without matmuls (ops/conv_rows.py), so the costlier branch is
  the one that runs."""
  flops, elements = 0.0, 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    out = eqn.outvars[0].aval
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
      contracted = rhs.shape[spec[1]] * math.prod(rhs.shape[d] for d in spec[2:])
      flops += 2.0 * math.prod(out.shape) * contracted
      elements += math.prod(out.shape)
    elif name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      flops += 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
      elements += math.prod(out.shape)
    times = eqn.params["length"] if name == "scan" else 1
    subs = [_jaxpr_matmul_counts(sub) for sub in jax_core.jaxprs_in_params(eqn.params)]
    if name == "cond":
      subs = [max(subs)]
    for f, e in subs:
      assert not (f and name == "while"), "matmuls in a while: no static count"
      flops, elements = flops + times * f, elements + times * e
  return flops, elements


def _traced_decoder_counts(vae_cfg) -> tuple[float, int]:
  """`_jaxpr_matmul_counts` of the traced `VQVAE.decode_fhat` of one image with `vae_cfg` (shapes
  only, nothing compiled or run), its convolutions as the config's conv_impl picks them here."""
  from var_jax.models.vqvae import VQVAE
  module = VQVAE(vae_cfg)
  size = vae_cfg.image_size
  params = jax.eval_shape(lambda: module.init(jax.random.key(0),
                                              jnp.zeros((1, size, size, 3)))["params"])
  f_hat = jax.ShapeDtypeStruct((1, vae_cfg.latent_size, vae_cfg.latent_size, vae_cfg.z_channels),
                               jnp.float32)
  jaxpr = jax.make_jaxpr(lambda p, f: module.apply({"params": p}, f, method=VQVAE.decode_fhat))(
      params, f_hat)
  return _jaxpr_matmul_counts(jaxpr.jaxpr)


@pytest.mark.parametrize("overrides", [
    dict(),  # the released 256 px tokenizer
    dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=64, using_sa=False,
         patch_nums=(1, 2, 4), quant_conv_ks=1),
])
def test_decoder_flops_match_the_traced_decoder(overrides):
  """flops.decoder_flops_per_image / decoder_output_elements against the convolutions and dots
  of the traced `VQVAE.decode_fhat` (shapes only, nothing compiled or run), its convolutions
  direct (conv_impl="xla"): the count is the model's math, which Winograd ("auto" for float32 on
  CPU, ops/conv_winograd.py) computes with fewer multiplies."""
  import dataclasses
  from var_jax.models.vqvae_config import VQVAEConfig
  vae_cfg = VQVAEConfig(**overrides)
  traced_flops, traced_elements = _traced_decoder_counts(
      dataclasses.replace(vae_cfg, conv_impl="xla"))
  assert flops.decoder_flops_per_image(vae_cfg)["total"] == traced_flops
  assert flops.decoder_output_elements(vae_cfg) == traced_elements
  if not overrides:  # the released decoder: ~0.39 TFLOP per image (VAR_SPEC's 256 px tokenizer)
    assert 0.39e12 < traced_flops < 0.40e12


def test_sampler_bound_by_hand():
  """SamplerBound: FLOPs, bytes and the roofline of d16 sampling, batch 2, against a hand count."""
  from var_jax.inference.bound import SamplerBound
  from var_jax.models.vqvae_config import VQVAEConfig
  config = config_lib.var_imagenet_config(16)
  var_cfg = train_var.var_config_from(config, aot.tokenizer_config(config))
  vae_cfg = VQVAEConfig()
  kw = dict(var_param_bytes=1000, vae_param_bytes=500, peak_flops=1e12, bandwidth=1e9)
  bound = SamplerBound.of(var_cfg, vae_cfg, 2, **kw)
  C, L, V, depth = 1024, 680, 4096, 16
  item = 2  # the recipe samples in bfloat16
  seqs = 4  # guidance: two sequences per image
  assert bound.bytes["weights"] == 10 * 1000
  assert bound.bytes["cache"] == seqs * 2 * depth * C * item * (L + 1710)  # visible prefixes 1710
  assert bound.bytes["logits"] == 2 * seqs * L * V * 4
  assert bound.bytes["activations"] == seqs * L * C * depth * item
  assert bound.bytes["decoder_weights"] == 500
  assert bound.total_flops == pytest.approx(
      2 * flops.sampler_flops_per_image(var_cfg)["total"]
      + 2 * flops.decoder_flops_per_image(vae_cfg)["total"])
  assert bound.seconds == pytest.approx(max(bound.total_flops / 1e12, bound.total_bytes / 1e9),
                                        rel=1e-12)  # the parts' times summed, not their FLOPs
  assert bound.bound == ("compute" if bound.total_flops / 1e12 > bound.total_bytes / 1e9
                         else "memory")
  on_chip = SamplerBound.of(var_cfg, vae_cfg, 2, weights_on_chip=True, **kw)
  assert bound.total_bytes - on_chip.total_bytes == 9 * 1000
  once = SamplerBound.of(var_cfg, vae_cfg, 2, var_once_bytes=300, **kw)  # 700 per scale, 300 once
  assert once.bytes["weights"] == 10 * 700 + 300
  with pytest.raises(ValueError, match="var_once_bytes"):
    SamplerBound.of(var_cfg, vae_cfg, 2, var_once_bytes=1001, **kw)
  free = SamplerBound.of(var_cfg, vae_cfg, 2, guidance=False, **kw)
  assert free.bytes["logits"] == bound.bytes["logits"] / 2
  with pytest.raises(ValueError, match="positive"):
    SamplerBound.of(var_cfg, vae_cfg, 0, **kw)


def test_sampler_bound_charges_the_decoder_at_its_own_peak():
  """A float32 decoder behind a bfloat16 transformer: each part's FLOPs at its own rate."""
  from var_jax.inference.bound import SamplerBound
  from var_jax.models.vqvae_config import VQVAEConfig
  config = config_lib.var_imagenet_config(16)
  var_cfg = train_var.var_config_from(config, aot.tokenizer_config(config))
  vae_cfg = VQVAEConfig()
  kw = dict(var_param_bytes=1000, vae_param_bytes=500, peak_flops=4e12, bandwidth=1e15)
  mixed = SamplerBound.of(var_cfg, vae_cfg, 2, decoder_peak_flops=1e12, **kw)
  transformer = 2 * flops.sampler_flops_per_image(var_cfg)["total"]
  decoder = 2 * flops.decoder_flops_per_image(vae_cfg)["total"]
  assert mixed.compute_s == pytest.approx(transformer / 4e12 + decoder / 1e12)
  assert mixed.seconds == pytest.approx(mixed.compute_s) and mixed.bound == "compute"
  same = SamplerBound.of(var_cfg, vae_cfg, 2, **kw)  # no decoder peak: one rate for all
  assert same.compute_s == pytest.approx((transformer + decoder) / 4e12)
  with pytest.raises(ValueError, match="decoder_peak_flops"):
    SamplerBound.of(var_cfg, vae_cfg, 2, decoder_peak_flops=0.0, **kw)


@pytest.mark.parametrize("dtype,amx", [("float32", False), ("bfloat16", False),
                                       ("bfloat16", True)])
def test_cpu_bound_charges_the_decoder_the_convolutions_it_runs(monkeypatch, dtype, amx):
  """SamplerBound(platform="cpu")'s decoder FLOPs are those of the traced decode of the released
  tokenizer with the default conv_impl on CPU: Winograd's batched matmuls through its block loops
  (F(4x4) at 64 px and up in float32, F(2x2) below and in bfloat16 without AMX), the bfloat16
  row blocks' matmuls over each block's rows and its 2 halo rows, XLA's convolutions; without a
  platform (the official's work) and on TPU every conv is direct."""
  from var_jax.inference.bound import SamplerBound
  from var_jax.models.vqvae_config import VQVAEConfig
  from var_jax.ops import host_cpu
  monkeypatch.setattr(host_cpu, "has_amx_bf16", lambda: amx)
  config = config_lib.var_imagenet_config(16)
  var_cfg = train_var.var_config_from(config, aot.tokenizer_config(config))
  vae_cfg = VQVAEConfig(dtype=dtype)
  traced_flops, _ = _traced_decoder_counts(vae_cfg)
  kw = dict(var_param_bytes=1000, vae_param_bytes=500, peak_flops=1e12, bandwidth=1e9)
  on_cpu = SamplerBound.of(var_cfg, vae_cfg, 1, platform="cpu", **kw)
  assert on_cpu.flops["decoder"] == traced_flops
  direct = flops.decoder_flops_per_image(vae_cfg)["total"]
  assert SamplerBound.of(var_cfg, vae_cfg, 1, **kw).flops["decoder"] == direct
  assert SamplerBound.of(var_cfg, vae_cfg, 1, platform="tpu", **kw).flops["decoder"] == direct
  # The released decoder's share of the direct work: most of it is wide 3x3 convs.
  want_ratio = {("float32", False): (0.25, 0.4), ("bfloat16", False): (0.4, 0.5),
                ("bfloat16", True): (1.05, 1.07)}[dtype, amx]  # row blocks: (32 + 2) / 32
  assert want_ratio[0] <= traced_flops / direct <= want_ratio[1]
