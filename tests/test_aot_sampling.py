"""`var_jax.sample` / `var_jax.edit` compiled for TPU slices through `aot.lower_sample` /
`aot.lower_edit`: the public calls' own argument checks and placement, on compile-only devices.

Before the mesh-aware sampler, a multi-chip TPU host failed to lower `sample` whenever the batch
divided the chip count ("Mosaic kernels cannot be automatically partitioned"); these compiles go
through the same code as the public call, so they would have failed too. Needs libtpu.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import var_jax
from helpers import model
from var_jax import aot
from var_jax.inference import sampler
from var_jax.inference import placement
from var_jax.train import config_lib
from var_jax.train import train_var

pytestmark = [
    pytest.mark.tpu_backend,
    pytest.mark.skipif(not aot.libtpu_available(), reason="needs libtpu (pip install .[tpu])"),
]

PREFIX_KERNEL = "var_prefix_attention"


@functools.lru_cache(maxsize=None)
def _shipped():
  return var_jax.load_pretrained("shapes-tiny")


def _d16():
  """VAR-d16 at 256 px (all ten scales, 16 layers of width 1024) with a slim tokenizer of the same
  latent layout: the released decoder (ch 160) alone takes ~8 minutes to compile for TPU on 2
  cores, which benchmarks/aot_tpu.py --case sample covers instead."""
  import dataclasses
  config = config_lib.var_imagenet_config(16)
  vae_cfg = dataclasses.replace(aot.tokenizer_config(config), ch=32, num_res_blocks=1,
                                using_sa=False, using_mid_sa=False)
  return aot.abstract_model(train_var.var_config_from(config, vae_cfg), vae_cfg)


def _kernel_scales(model) -> int:
  """Scales with enough query rows for the Pallas prefix kernel (attention.PREFIX_KERNEL_MIN_ROWS)."""
  from var_jax.ops import attention
  return sum(pn * pn >= attention.PREFIX_KERNEL_MIN_ROWS for pn in model.config.patch_nums)


def _compile_and_check(lowered, topology, model, batch_per_chip):
  compiled = lowered.compile()
  kernels = aot.mosaic_kernels(compiled)
  assert kernels.get(PREFIX_KERNEL) == _kernel_scales(model), kernels  # (XLA may add its own)
  chip = aot.chip_spec(topology)
  analysis = aot.analyze(compiled, chip)
  assert analysis.fits and analysis.flops > 0
  images = compiled.out_info[0]
  size = model.tokenizer.config.image_size
  assert images.dtype == jnp.uint8 and images.shape[1:] == (size, size, 3)
  # The per-chip batch of the guidance-doubled KV cache in the optimized HLO.
  cfg = model.config
  stack = f"[{cfg.depth},{2 * batch_per_chip},{cfg.num_heads},"
  assert stack in compiled.as_text()
  # The prefix kernel reads its layer out of the cache stack: its key and value operands are the
  # whole (depth, ...) stack, not a per-layer copy made for it in the layer loop.
  calls = [line for line in compiled.as_text().splitlines()
           if line.lstrip().startswith(f"%{PREFIX_KERNEL}")]
  assert len(calls) == kernels[PREFIX_KERNEL]
  for line in calls:
    operands = line.split("operand_layout_constraints=", 1)[1].split("}}", 1)[0]
    assert operands.count(stack) == 2, line[:300]
  return compiled, analysis


@pytest.mark.parametrize("topology, batch, per_chip", [
    pytest.param("v5e:1x1", 8, 8, marks=pytest.mark.slow),  # ~70 s; the 2x2 cases stay in CI
    ("v5e:2x2", 12, 3),
    pytest.param("v5e:2x2", 3, 1, marks=pytest.mark.slow),  # padded to 4 (4x8 pads 12 to 32)
    # ~50 s: CI keeps v5e:2x2 (the same conv-kernel path) and test_aot_tpu's v4:2x2x1 train step
    pytest.param("v4:2x2x1", 8, 2, marks=pytest.mark.slow),
    pytest.param("v5e:4x8", 12, 1, marks=pytest.mark.slow),  # 32 chips: padded to 32 (~35 s)
])
def test_shipped_model_samples_on_slices(topology, batch, per_chip):
  m = _shipped()
  mesh = aot.topology_mesh(topology)
  labels = np.arange(batch) % m.config.num_classes
  lowered = aot.lower_sample(m, labels, mesh=mesh, cfg=1.5, top_k=900, top_p=0.96)
  compiled, _ = _compile_and_check(lowered, topology, m, per_chip)
  assert compiled.out_info[0].shape[0] == -(-batch // len(mesh.devices.flat)) * len(mesh.devices.flat)
  # The per-image decode loop is for CPU hosts only: a TPU program has one while loop per scale
  # (the layer scan) and none over images.
  assert aot.while_loops(compiled) == len(m.config.patch_nums)
  assert not m.placements  # lowering placed nothing on this host
  # Up to 4 images per chip (ops.conv.AUTO_KERNEL_MAX_IMAGES) the decoder's 3x3 convs are the
  # fused conv kernel: 2 per resnet block (num_res_blocks + 1 per level, 2 in the middle), one per
  # upsampling, the output head; above that XLA's convolutions.
  vae = m.tokenizer.config
  levels = len(vae.ch_mult)
  decoder_convs = 2 * (levels * (vae.num_res_blocks + 1) + 2) + (levels - 1) + 1
  want = decoder_convs if per_chip <= 4 else None
  assert aot.mosaic_kernels(compiled).get("var_conv3x3") == want


def test_sampler_report_counts_every_block_of_the_public_call():
  """The sampler's report takes its costs from the public call's program with the block scans
  fully unrolled (no while loop left, so XLA's cost analysis counts every block of every scale
  once) and its memory from the program as it runs (one loop per scale). On a two-block model of
  three scales with a two-level tokenizer: the report compiles two programs, which for the
  shipped model took ~65 s of the suite (its decoder's many conv kernels), ~12 s here."""
  from var_jax.models.var_config import VARConfig
  from var_jax.models.vqvae_config import VQVAEConfig
  patch_nums = (1, 2, 4)
  vae_cfg = VQVAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=32,
                        num_groups=8, using_sa=False, using_mid_sa=False, patch_nums=patch_nums)
  var_cfg = VARConfig(depth=2, embed_dim=128, num_heads=2, num_classes=4, vocab_size=32,
                      z_channels=8, patch_nums=patch_nums)
  m = aot.abstract_model(var_cfg, vae_cfg)
  mesh = aot.topology_mesh("v5e:2x2")
  report = aot.sampler_report(m.config, m.tokenizer.config, mesh, aot.chip_spec("v5e:2x2"), 8,
                              model=m)
  assert aot.while_loops(report.program.compiled) == len(m.config.patch_nums)
  # The costs' program is the public call traced with every block scan unrolled: the same
  # StableHLO as a lowering of `lower_sample` here (compiling that too would add a third compile).
  with aot.scan_unroll(m.config.depth, slice_each_step=True):
    lowered = aot.lower_sample(m, jax.ShapeDtypeStruct((8,), jnp.int32), mesh=mesh)
  assert lowered.as_text() == report.unrolled.lowered.as_text()
  unrolled = report.unrolled.compiled
  assert aot.while_loops(unrolled) == 0
  cost = unrolled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert report.loop_corrected and "fully unrolled" in report.cost_note
  assert (report.cost.flops, report.cost.bytes_accessed) == (cost["flops"], cost["bytes accessed"])
  assert report.cost.flops > report.as_compiled.flops  # every block, not one per scale
  assert report.cost.peak_bytes == report.as_compiled.peak_bytes


@pytest.mark.slow  # ~40 s: two compiles (run by hand: pytest -m slow)
def test_bfloat16_weight_stacks_enter_the_tpu_program_as_held():
  """bfloat16 on TPU: the placement holds the blocks' stacks as uint16 bit patterns, which the
  decode loop slices, so the program starts from them as they are. Bitcasting them in the program
  instead was one copy of every stack per call (1.2 GB for VAR-d16 in the compiled program)."""
  import dataclasses
  from unittest import mock
  shipped = _shipped()
  m = var_jax.VARModel(dataclasses.replace(shipped.config, dtype="bfloat16"), shipped.params,
                       shipped.tokenizer)
  depth = m.config.depth
  mesh = aot.topology_mesh("v5e:2x2")

  def stack_bitcasts():
    hlo = aot.lower_sample(m, np.arange(4), mesh=mesh).compile().as_text()
    entry = hlo.split("\nENTRY ", 1)[1]
    return [line for line in entry.splitlines()
            if "bitcast-convert(" in line and f"u16[{depth}," in line.split("=", 1)[1][:40]]

  with mock.patch.object(placement, "held_as_bits", lambda *args: False):
    assert stack_bitcasts()  # the control: bf16 stacks are converted in the program
  assert not stack_bitcasts()


def test_shipped_model_edits_on_a_slice():
  m = _shipped()
  mesh = aot.topology_mesh("v5e:2x2")
  size = m.tokenizer.config.image_size
  keep = np.ones((size, size), np.float32)
  keep[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 0.0
  images = jax.ShapeDtypeStruct((6, size, size, 3), jnp.float32)
  lowered = aot.lower_edit(m, images, keep, [1, 2, 3, 4, 5, 10], mesh=mesh)
  _compile_and_check(lowered, "v5e:2x2", m, 2)


@pytest.mark.slow  # ~3 min on 2 cores: the full d16 compile (run by hand: pytest -m slow)
def test_d16_samples_on_a_slice_with_the_kernel_and_fits():
  m = _d16()
  _, analysis = _compile_and_check(
      aot.lower_sample(m, jax.ShapeDtypeStruct((8,), jnp.int32), mesh=aot.topology_mesh("v5e:2x2")),
      "v5e:2x2", m, 2)
  print(f"d16 sampler, v5e:2x2, batch 8: {analysis.peak_bytes / 2**30:.2f} GiB per chip")


def test_lower_sample_is_the_program_sample_runs():
  """On the 8 CPU devices: the lowering of the abstract view equals that of the placed call."""
  m = model("tiny")
  mesh = placement.default_mesh()
  labels = np.arange(5)
  abstract = aot.lower_sample(m, labels, mesh=mesh, rng=jax.random.key(1), top_k=3).as_text()
  concrete = sampler.build_sample_call(m, labels, rng=jax.random.key(1), top_k=3,
                                        mesh=mesh).lower().as_text()
  assert abstract == concrete


def _unplaced(m):
  """The same model without the placements `model()`'s cached instance holds."""
  return var_jax.VARModel(m.config, m.params, m.tokenizer)


def test_lower_sample_traces_anew_under_scan_unroll(monkeypatch):
  """`aot.scan_unroll` changes what lower_sample traces (the sampler's loop correction relies on
  it): the lowering is a new trace, not jit's cached trace of the same call. On CPU devices with
  TPU's layout (stacked weights): CPU's own is unrolled already (`placement.held_per_layer`)."""
  monkeypatch.setattr(placement, "held_per_layer", lambda path, mesh: False)
  m = _unplaced(model("tiny"))
  assert m.config.depth % 2 == 0
  mesh = placement.default_mesh()
  lower = lambda: aot.lower_sample(m, np.arange(5), mesh=mesh).as_text()
  once = lower()
  with aot.scan_unroll(2):
    unrolled = lower()
  assert unrolled != once and lower() == once


def test_step_sliced_unroll_samples_the_same_tokens(monkeypatch):
  """The loop correction's program (`scan_unroll(2, slice_each_step=True)`, each step's weights
  and cache indexed from the whole stack) computes what the sampler computes: same tokens. On CPU
  devices with TPU's layout (stacked weights, which that correction is for)."""
  monkeypatch.setattr(placement, "held_per_layer", lambda path, mesh: False)
  m = _unplaced(model("tiny"))
  call = sampler.build_sample_call(m, np.arange(3), rng=jax.random.key(4), top_k=5,
                                   mesh=placement.default_mesh())
  with aot.scan_unroll(2, slice_each_step=True):
    lowered = call.lower(fresh=True)
  assert lowered.as_text() != call.lower().as_text()
  with placement.batch_context(call.mesh):
    _, tokens = lowered.compile()(*call.args)
  _, expected = call.run()
  for got, want in zip(tokens, expected):
    np.testing.assert_array_equal(np.asarray(got)[:3], np.asarray(want))


def test_step_sliced_unroll_keeps_scan_semantics():
  """Under `scan_unroll(.., slice_each_step=True)` lax.scan still returns lax.scan's carry and ys,
  forward and reversed, for unrolls that divide the length; others fall back to lax.scan."""
  xs = (jnp.arange(24.0).reshape(6, 4), jnp.arange(6.0))
  step = lambda c, x: (c * 1.5 + x[0].sum() - x[1], (c, 2 * x[1]))
  for reverse in (False, True):
    want = jax.lax.scan(step, 1.0, xs, reverse=reverse)
    for unroll in (2, 3, 4):
      with aot.scan_unroll(unroll, slice_each_step=True):
        got = jax.lax.scan(step, 1.0, xs, reverse=reverse, unroll=unroll)
      jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, want)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_sizes", [(2, 1, 2), (1, 4, 1)], ids=["tensor2", "fsdp4"])
def test_d30_samples_on_16gb_chips_with_sharded_weights(mesh_sizes):
  """VAR-d30 (2.0 B params, 30 heads: tensor 2, not 4) with its weights split over v5e chips."""
  config = config_lib.var_imagenet_config(30)
  vae_cfg = aot.tokenizer_config(config)
  m = aot.abstract_model(train_var.var_config_from(config, vae_cfg), vae_cfg)
  mesh = aot.topology_mesh("v5e:2x2", aot.mesh_config(*mesh_sizes))
  compiled = aot.lower_sample(m, jax.ShapeDtypeStruct((4,), jnp.int32), mesh=mesh).compile()
  analysis = aot.analyze(compiled, aot.chip_spec("v5e:2x2"))
  print(f"d30 sampler, v5e:2x2 mesh {mesh_sizes}, batch 4: {analysis.peak_bytes / 2**30:.2f} GiB "
        f"per chip (arguments {analysis.argument_bytes / 2**30:.2f} GiB)")
  assert analysis.fits
  assert aot.uses_kernel(analysis, PREFIX_KERNEL)
