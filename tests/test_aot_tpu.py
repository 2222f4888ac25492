"""AOT TPU compilation of the whole VAR train step on a CPU machine (var_jax/aot/), and the
sampler's analytic bytes (the sampler itself: tests/test_aot_sampling.py; FLOPs: tests/test_flops.py).

Needs libtpu (the tpu extra), no TPU: libtpu's compile-only client gives the devices of a v5e
2x2 and a v4 2x2x1 slice, and the programs are partitioned, given their Pallas (Mosaic) kernels and
memory-planned for them. A small model keeps each compile near 20 s on 2 cores: depth 2
(2 heads of 64), patch_nums (1, 2, 3, 4, 5, 6, 8) so that L = 155 >= 128 takes the splash
training kernel at 128 px (with (1, 3, 12), 192 px, each train step compile took ~60% longer),
bfloat16 compute, pre-tokenized batches, and a small tokenizer for the decoder compile.
"""
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from var_jax import aot, scales
from var_jax.train import config_lib
from var_jax.errors import ConfigError
from var_jax.train import train_var

pytestmark = [
    pytest.mark.tpu_backend,
    pytest.mark.skipif(not aot.libtpu_available(), reason="needs libtpu (pip install .[tpu])"),
]

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8)
# (topology, mesh): data x tensor, so both the batch and the heads are split.
SLICES = (("v5e:2x2", aot.mesh_config(2, 1, 2)), ("v4:2x2x1", aot.mesh_config(2, 1, 2)))


def _small_config():
  config = config_lib.var_imagenet_config(16, tiny=True, pretokenized=True)
  config.patch_nums = PATCH_NUMS
  config.model.update(depth=2, dtype="bfloat16", remat_policy="none", attention_impl="auto")
  config.tokenizer = dict(path="random", overrides=dict(
      ch=32, vocab_size=64, z_channels=8, num_res_blocks=1, using_sa=False, using_mid_sa=False))
  config.global_batch_size = 8
  return config


def _check_memory(analysis: aot.Analysis, chip: aot.ChipSpec):
  assert analysis.argument_bytes > 0 and analysis.temp_bytes > 0 and analysis.code_bytes > 0
  assert 0 < analysis.peak_bytes < chip.hbm_bytes
  assert analysis.fits


@pytest.fixture(scope="module", params=SLICES, ids=[s[0] for s in SLICES])
def compiled(request):
  """Train step of the small config compiled for one slice (and the mesh); the sampler is
  compiled in tests/test_aot_sampling.py, through the public call's placement."""
  topology, mesh_config = request.param
  config = _small_config()
  mesh = aot.topology_mesh(topology, mesh_config)
  train = aot.compile_train_step(config, mesh)
  return topology, mesh, train, None


def test_topology_mesh_uses_the_slice_chips(compiled):
  topology, mesh, _, _ = compiled
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert {d.platform for d in mesh.devices.flat} == {"tpu"}
  kind = mesh.devices.flat[0].device_kind
  assert kind == {"v5e:2x2": "TPU v5 lite", "v4:2x2x1": "TPU v4"}[topology]


def test_train_step_compiles_with_splash_and_fits(compiled):
  topology, _, train, _ = compiled
  hlo = train.compiled.as_text()
  # splash forward + fused backward, under shard_map: each chip runs (8/2, 2/2) batch x heads.
  # The batch's images are tokenized in the step: the encoder's 3x3 convs with a GroupNorm-SiLU
  # input (2 per resnet block, 2 blocks in the middle, the output head) are the fused conv
  # kernel where a row is whole sublane tiles (8 float32 values; the kernel flattens rows into
  # the matmuls' M axis), the XLA conv elsewhere: this tokenizer is float32 and 128 px, so
  # its levels are 128, 64, 32, 16 and 8 wide, all of them whole tiles, and the middle and the
  # head (8) are the kernel too.
  vae_cfg = aot.tokenizer_config(_small_config())
  assert vae_cfg.dtype == "float32" and vae_cfg.image_size == 128
  widths = [128 >> level for level in range(len(vae_cfg.ch_mult))]
  lowest = widths[-1]
  encoder_convs = (sum(2 * vae_cfg.num_res_blocks for w in widths if w % 8 == 0)
                   + (2 * 2 + 1) * (lowest % 8 == 0))
  assert encoder_convs == 15
  assert hlo.count(aot.MOSAIC_CALL) == 2 + encoder_convs
  kernels = aot.mosaic_kernels(train.compiled)
  splash = {k: n for k, n in kernels.items() if k.startswith("splash_mha_")}
  assert sum(splash.values()) == 2 and kernels.get("var_conv3x3") == encoder_convs, kernels
  assert "splash_mha_fwd" in hlo and "splash_mha_dkv" in hlo
  padded = 256  # L = 155 padded to a multiple of 128 (splash blocks)
  assert f"bf16[4,1,{padded},64]" in hlo
  chip = aot.chip_spec(topology)
  analysis = aot.analyze(train.compiled, chip)
  assert aot.uses_kernel(analysis, "splash") and not aot.uses_kernel(analysis, "var_prefix")
  _check_memory(analysis, chip)
  # The state is donated: its buffers are reused for the new state.
  assert analysis.alias_bytes > 0
  assert analysis.flops > 0 and analysis.bytes_accessed > 0
  assert train.var_config.seq_len == scales.seq_len(PATCH_NUMS) == 155
  assert train.model_flops > 0 and train.num_params > 0


# v4 marked slow for CI time: the v4 sampler compile (test_aot_sampling) holds the same decoder.
@pytest.mark.parametrize("topology,mesh_config", [
    SLICES[0], pytest.param(*SLICES[1], marks=pytest.mark.slow)], ids=[s[0] for s in SLICES])
def test_decoder_compiles_alone(topology, mesh_config):
  """The small config's tokenizer decoding 64 px (latent 4x4) rather than its 128: the same convs
  (kernel or XLA's by the same widths rule), in less compile time (~11 s here; ~31 s at 192)."""
  mesh = aot.topology_mesh(topology, mesh_config)
  vae_cfg = dataclasses.replace(aot.tokenizer_config(_small_config()), patch_nums=(1, 2, 4))
  decoder = aot.compile_decoder(vae_cfg, mesh, batch=4)
  analysis = aot.analyze(decoder.compiled, aot.chip_spec(topology))
  assert analysis.flops > 0 and analysis.fits
  assert decoder.compiled.out_info.shape == (4, 64, 64, 3)
  # Levels 4, 8, 16, 32, 64 px wide: the 3x3 convs of the four levels a sublane tile (8) wide or
  # more are the kernel, 2 per resnet block (num_res_blocks + 1 = 2 per level) and the upsampling
  # into each, plus the output head: 4 * 2 * 2 + 4 + 1. conv_in, the middle and the 4 px level
  # stay XLA's.
  assert vae_cfg.ch_mult == (1, 1, 2, 2, 4) and vae_cfg.num_res_blocks == 1
  assert aot.mosaic_kernels(decoder.compiled) == {"var_conv3x3": 4 * 2 * 2 + 4 + 1}


def test_loop_correction_adds_the_uncounted_trips():
  base = aot.Analysis(argument_bytes=1, output_bytes=1, alias_bytes=0, temp_bytes=1, code_bytes=1,
                      hbm_bytes=10, flops=10.0, bytes_accessed=100.0, transcendentals=1.0,
                      optimal_s=-1.0, mosaic_calls=0, peak_flops=1.0, hbm_bandwidth=1.0)
  # Body counted once: 10 = 4 outside + 6 body; unroll=2 counts it twice: 16.
  unrolled = dataclasses.replace(base, flops=16.0, bytes_accessed=130.0, transcendentals=2.0)
  corrected = aot.loop_corrected(base, unrolled, trips=4)
  assert corrected.flops == 4 + 4 * 6
  assert corrected.bytes_accessed == 70 + 4 * 30
  assert corrected.optimal_s == -1.0
  assert corrected.peak_bytes == base.peak_bytes
  with pytest.raises(ConfigError):
    aot.loop_corrected(base, unrolled, trips=3)


def _stacked_mlp():
  """A scan of 8 two-matmul layers over stacked bfloat16 weights (a scanned transformer's shape)."""
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      h = nn.Dense(512, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(x)
      return nn.Dense(256, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(
          jax.nn.gelu(h)), None

  return nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=8)()


def test_step_sliced_unroll_counts_the_blocks_as_run():
  """The loop correction with `slice_each_step` charges what the looped program reads: each
  layer's weights once (the matmuls' inputs; the activations of 4 rows per chip are ~1% on top)
  and every layer's FLOPs; lax.scan's own unroll=2 copies a 2-layer block of the stacked weights
  per trip and so overcounts the bytes (the failure this guards against)."""
  chip = aot.chip_spec("v5e:2x2")
  mesh = aot.topology_mesh("v5e:2x2", aot.mesh_config(4, 1, 1))
  split = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  x = jax.ShapeDtypeStruct((16, 256), jnp.bfloat16, sharding=split("data"))
  params = jax.eval_shape(lambda: _stacked_mlp().init(
      jax.random.key(0), jnp.zeros((16, 256), jnp.bfloat16), None))
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=split()), params)

  def scanned(unroll, **kw):
    run = lambda p, x: _stacked_mlp().apply(p, x, None)[0]
    with aot.scan_unroll(unroll, **kw), jax.set_mesh(mesh):
      return aot.analyze(jax.jit(functools.partial(run)).lower(params, x).compile(), chip)

  weight_bytes = 8 * 2 * 256 * 512 * 2
  matmul_flops = 8 * 2 * 2 * 4 * 256 * 512  # per chip: 4 rows
  looped = scanned(1)
  corrected = aot.loop_corrected(looped, scanned(2, slice_each_step=True), trips=8)
  assert weight_bytes <= corrected.bytes_accessed <= 1.1 * weight_bytes
  assert matmul_flops <= corrected.flops <= 1.1 * matmul_flops
  block_copied = aot.loop_corrected(looped, scanned(2), trips=8)
  assert block_copied.bytes_accessed > 1.5 * weight_bytes


@pytest.mark.parametrize("name, canonical, generation", [
    ("v5e:4x4", "v5e:4x4", "v5e"), ("v4-32", "v4:2x2x4", "v4"), ("v5p-128", "v5p:4x4x4", "v5p"),
    ("v5e-256", "v5e:16x16", "v5e"), ("v5litepod-16", "v5e:4x4", "v5e"),
    ("v6e-8", "v6e:2x4", "v6e"),
])
def test_parse_topology(name, canonical, generation):
  assert aot.parse_topology(name) == (canonical, aot.CHIPS[generation])


@pytest.mark.parametrize("name", ["v5e", "v9:2x2", "v4-33", "v5e-12", "tpu"])
def test_parse_topology_rejects(name):
  with pytest.raises(ConfigError):
    aot.parse_topology(name)


def test_slice_device_counts():
  assert len(aot.topology_devices("v4-32")) == 16  # megacore: one device per chip
  assert len(aot.topology_devices("v5e:1x1")) == 1


@pytest.mark.parametrize("depth", [16, 24, 30, 36])
@pytest.mark.parametrize("topology", ["v5p-128", "v4-32", "v5e-256", "v6e-64", "v5p-16"])
def test_recipe_meshes_lay_out_on_common_slices(depth, topology):
  """`launch/tpu_train.sh` and `var-jax aot` build the mesh from the recipe: it must map onto
  each slice's torus as is (no physical axis split), with the weights split over every chip from
  d24 up."""
  config = config_lib.var_imagenet_config(depth)
  mesh = aot.topology_mesh(topology, config.mesh)
  chips = len(aot.topology_devices(topology))
  assert mesh.size == chips
  if depth >= 24:
    assert dict(mesh.shape) == {"data": 1, "fsdp": chips, "tensor": 1}
  else:
    assert dict(mesh.shape) == {"data": chips, "fsdp": 1, "tensor": 1}


def test_sampler_bound_per_chip_follows_the_mesh():
  """aot.sampler_bound: the batch padded and split over data x fsdp, the weights in the compute
  dtype, a tensor axis sharing each chip's work (8 CPU devices stand in for the chips)."""
  from var_jax.inference.bound import SamplerBound
  from var_jax.parallel import sharding
  config = config_lib.var_imagenet_config(16)
  vae_cfg = aot.tokenizer_config(config)
  var_cfg = train_var.var_config_from(config, vae_cfg)
  model = aot.abstract_model(var_cfg, vae_cfg)
  mesh = sharding.make_mesh([("data", 4), ("fsdp", 1), ("tensor", 2)])
  chip = aot.chip_spec("v5e:2x4")
  got = aot.sampler_bound(model, mesh, chip, batch=10)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(model.params))
  decoder = sum(math.prod(x.shape) for name in ("decoder", "post_quant_conv")
                for x in jax.tree.leaves(model.tokenizer.params[name]))
  # Read once per call: the AdaLN projections (16 blocks' 6C x C and the head's 2C x C, with
  # biases), the class embedding (1000 classes + the null one), positions and level embeddings.
  C, L = var_cfg.embed_dim, var_cfg.seq_len
  once = (16 * (6 * C * C + 6 * C) + 2 * C * C + 2 * C + 1001 * C + C + L * C + 10 * C)
  want = SamplerBound.of(var_cfg, vae_cfg, 3,  # 10 images padded to 12, over data 4
                         var_param_bytes=2 * num_params,  # the recipe samples in bfloat16
                         var_once_bytes=2 * once,
                         vae_param_bytes=4 * decoder,  # the tokenizer in float32
                         peak_flops=2 * chip.peak_flops, bandwidth=2 * chip.hbm_bandwidth)
  assert got == want
  assert got.seconds == pytest.approx(max(want.total_flops / chip.peak_flops,
                                          want.total_bytes / chip.hbm_bandwidth) / 2)
