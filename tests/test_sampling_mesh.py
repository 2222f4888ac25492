"""var_jax.sample / edit on a mesh of 8 fake CPU devices: any batch on any device count, images
that depend only on (key, index, label), weights placed once, kernels only under a mesh.

Expectations come from independent runs on one device (a one-device mesh) and from smaller
batches, never from the placement code itself.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import var_jax
from helpers import concat_tokens, model, reference
from var_jax.inference import placement
from var_jax.errors import ConfigError, InputError
from var_jax.ops import attention


def _one_device():
  return var_jax.sampling_mesh(devices=jax.devices()[:1])


def _pixels_off(a, b):
  """Pixels (over all channels) that differ, and the largest difference in uint8 levels."""
  diff = np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32))
  return int((diff > 0).sum()), int(diff.max())


def test_batch_of_12_on_8_devices_equals_one_device_and_prefix_equals_batch_of_3():
  m = model("tiny")
  labels = np.arange(12) % 10
  key = jax.random.key(3)
  a, ta = var_jax.sample(m, labels, rng=key, return_tokens=True)  # 8 devices, padded to 16
  assert a.shape == (12, 64, 64, 3) and len(a.sharding.device_set) == 8
  b, tb = var_jax.sample(m, labels, rng=key, return_tokens=True, mesh=_one_device())
  c, tc = var_jax.sample(m, labels[:3], rng=key, return_tokens=True)  # 3 on 8 devices
  # Tokens: exactly equal (a float near-tie in the filter or the draw would show here).
  np.testing.assert_array_equal(concat_tokens(ta), concat_tokens(tb))
  np.testing.assert_array_equal(concat_tokens(ta)[:3], concat_tokens(tc))
  # Images: the decode of identical tokens by differently partitioned programs may round a few
  # pixels the other way: at most 1 level, on under 0.1% of the values.
  for x, y in ((a, b), (np.asarray(a)[:3], c)):
    off, worst = _pixels_off(x, y)
    assert worst <= 1 and off <= 1e-3 * np.asarray(x).size, (off, worst)


def test_per_image_keys_make_images_independent_of_the_batch():
  """Image i uses fold_in(rng, i): passing those keys for a subset gives the same tokens."""
  m = model("tiny")
  key = jax.random.key(5)
  _, full = var_jax.sample(m, [1, 2, 3, 4, 5], rng=key, return_tokens=True)
  keys = jnp.stack([jax.random.fold_in(key, i) for i in (3, 1)])
  _, part = var_jax.sample(m, [4, 2], rng=keys, return_tokens=True)
  np.testing.assert_array_equal(concat_tokens(part), concat_tokens(full)[[3, 1]])
  with pytest.raises(InputError, match="3 keys for 2 images"):
    var_jax.sample(m, [4, 2], rng=jnp.stack([key] * 3))


def test_greedy_parity_holds_on_every_split():
  """The official greedy tokens on a data x fsdp x tensor mesh (test_sampling.py checks the
  default 8-device mesh, where the batch of 2 is padded to 8)."""
  ref = reference("tiny")
  m = model("tiny")
  for mesh in (var_jax.sampling_mesh(2, 2, 2),):
    _, tokens = var_jax.sample(m, ref["sample_label"], rng=jax.random.key(0), cfg=1.5, top_k=1,
                               top_p=0.0, return_tokens=True, mesh=mesh)
    np.testing.assert_array_equal(concat_tokens(tokens), ref["greedy_cfg1p5_idx_BL"])


def test_second_call_transfers_no_weights():
  m = model("tiny_saln")
  labels = np.arange(16) % 10
  key = jax.random.key(0)
  first = var_jax.sample(m, labels, rng=key)
  placed = m.placements[placement.default_mesh()]
  leaf = jax.tree.leaves(placed.var_params)[0]
  assert isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) == 8
  with jax.transfer_guard("disallow"):  # any implicit host<->device copy raises
    second = var_jax.sample(m, labels, rng=key)
  assert m.placements[placement.default_mesh()] is placed  # the same device arrays
  np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
  m.params = dict(m.params)  # new params: placed anew
  var_jax.sample(m, labels, rng=key)
  assert m.placements[placement.default_mesh()] is not placed


def test_one_cpu_device_placement_shares_the_models_stacks_instead_of_copying_them():
  """On one CPU device the blocks' weights are held per layer (`placement.held_per_layer`); for a
  float32 model whose params are arrays on that device (as `var_jax.load_pretrained` gives),
  each layer's array is the stack's own memory at that layer's offset (no second copy of the
  weights) wherever that offset keeps the 64-byte alignment XLA:CPU's buffers have (elsewhere,
  e.g. a 2-float layer, the layer is copied), and the samples equal those of the same params
  given as host copies."""
  m = model("tiny")
  one = var_jax.sampling_mesh(devices=jax.devices()[:1])
  on_device = var_jax.VARModel(m.config, jax.device_put(m.params, jax.devices()[0]), m.tokenizer)
  on_host = var_jax.VARModel(m.config, jax.tree.map(np.array, m.params), m.tokenizer)
  sample = lambda mm: np.asarray(var_jax.sample(mm, [1, 2], rng=jax.random.key(3), mesh=one))
  images = sample(on_device)
  stacks = jax.tree.leaves(on_device.params["blocks"])
  held = jax.tree.leaves(on_device.placements[one].var_params["blocks"],
                         is_leaf=lambda x: isinstance(x, tuple))
  assert len(stacks) == len(held) > 0
  shared = 0
  for stack, layers in zip(stacks, held):
    assert isinstance(layers, tuple) and len(layers) == stack.shape[0]
    layer_bytes = stack.nbytes // stack.shape[0]
    for i, a in enumerate(layers):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(stack)[i])
      if i * layer_bytes % 64 == 0:
        assert a.unsafe_buffer_pointer() == stack.unsafe_buffer_pointer() + i * layer_bytes
        shared += a.nbytes
  assert shared > 0.99 * sum(s.nbytes for s in stacks)
  np.testing.assert_array_equal(sample(on_host), images)


def test_weights_split_over_fsdp_and_tensor():
  m = model("tiny")
  mesh = var_jax.sampling_mesh(2, 2, 2)
  var_jax.sample(m, [1], rng=jax.random.key(0), mesh=mesh)
  # On CPU one array per layer (`placement.held_per_layer`), each split as a layer of the stack.
  layers = m.placements[mesh].var_params["blocks"]["attn"]["mat_qkv"]  # depth x (C, 3, H, D)
  assert isinstance(layers, tuple) and len(layers) == 2
  stack = np.asarray(m.params["blocks"]["attn"]["mat_qkv"])
  for i, qkv in enumerate(layers):
    assert qkv.shape == (128, 3, 2, 64)
    assert qkv.sharding.shard_shape(qkv.shape) == (64, 3, 1, 64)  # embed/fsdp, heads/tensor
    np.testing.assert_array_equal(np.asarray(qkv), stack[i])


def test_bfloat16_model_stores_matmul_weights_in_bfloat16_with_identical_logits():
  """Weights the model casts at use are stored in bf16 (on CPU the blocks' weights one array per
  layer): logits from them equal those from float32 storage, cast at use."""
  import dataclasses
  base = model("tiny")
  cfg = dataclasses.replace(base.config, dtype="bfloat16")
  m = var_jax.VARModel(cfg, base.params, base.tokenizer)
  ref = reference("tiny")
  from helpers import split_tokens
  maps = split_tokens(ref["vae_idx_BL"])
  m.logits(ref["tf_label"], maps)
  placed = m.placements[placement.default_mesh()].var_params
  # The blocks' weights one bfloat16 array per layer (on CPU; TPU holds uint16 stacks).
  qkv = np.asarray(base.params["blocks"]["attn"]["mat_qkv"], np.float32)
  layers = placed["blocks"]["attn"]["mat_qkv"]
  assert len(layers) == cfg.depth
  np.testing.assert_array_equal(np.stack([np.asarray(x) for x in layers]), qkv.astype(jnp.bfloat16))
  assert all(x.dtype == jnp.bfloat16 for x in placed["blocks"]["ffn"]["fc1"]["kernel"])
  assert placed["head"]["kernel"].dtype == jnp.bfloat16
  assert placed["word_embed"]["kernel"].dtype == jnp.float32  # used in float32
  assert all(x.dtype == jnp.float32 for x in placed["blocks"]["attn"]["scale_mul_1H11"])
  # The same one-device program on the stored weights and on the float32 ones (cast at use), both
  # one array per layer.
  x = m.tokenizer.apply(maps, method=var_jax.inference.tokenizer.VQVAE.indices_to_var_input)
  forward = jax.jit(lambda p: m.module.apply({"params": p}, jnp.asarray(ref["tf_label"], jnp.int32), x))
  stored = jax.device_get(placed)
  f32 = dict(base.params, blocks=jax.tree.map(lambda s: tuple(np.asarray(s)), base.params["blocks"]))
  np.testing.assert_array_equal(np.asarray(forward(stored)), np.asarray(forward(f32)))


@pytest.mark.parametrize("layout", ["per_layer", "uint16_stacks"])
def test_bfloat16_placement_of_on_device_params_holds_the_same_bit_patterns(layout, monkeypatch):
  """Params already on device (a training state's, as the trainer's sample hook passes them) are
  sliced, cast and bit-cast on device: the placed weights hold the same values (and bit
  patterns) as when the params come from the host, in CPU's layout (one bfloat16 array per
  layer) and in TPU's (uint16 stacks; here on CPU devices, with the per-layer choice off)."""
  import dataclasses
  if layout == "uint16_stacks":
    monkeypatch.setattr(placement, "held_per_layer", lambda path, mesh: False)
  base = model("tiny")
  cfg = dataclasses.replace(base.config, dtype="bfloat16")
  on_device = jax.tree.map(jnp.asarray, base.params)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(on_device))
  ref = reference("tiny")
  from helpers import split_tokens
  maps = split_tokens(ref["vae_idx_BL"])
  placed = []
  for params in (base.params, on_device):
    m = var_jax.VARModel(cfg, params, base.tokenizer)
    m.logits(ref["tf_label"], maps)
    placed.append(m.placements[placement.default_mesh()].var_params)
  host, device = placed
  qkv = device["blocks"]["attn"]["mat_qkv"]
  if layout == "uint16_stacks":
    assert qkv.dtype == jnp.uint16 and qkv.shape[0] == cfg.depth
  else:
    assert len(qkv) == cfg.depth and all(x.dtype == jnp.bfloat16 for x in qkv)
  assert jax.tree.structure(device) == jax.tree.structure(host)
  for got, want in zip(jax.tree.leaves(device), jax.tree.leaves(host)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_edit_on_8_devices_equals_one_device():
  m = model("tiny")
  images = reference("tiny")["inp_img"].transpose(0, 2, 3, 1)
  images = np.concatenate([images, images[::-1], images])  # 6 images on 8 devices
  keep = np.ones((64, 64), np.float32)
  keep[16:48, 16:48] = 0.0
  labels = [3, 5, 1, 10, 2, 4]
  _, ta = var_jax.edit(m, images, keep, labels, rng=jax.random.key(1), return_tokens=True)
  _, tb = var_jax.edit(m, images, keep, labels, rng=jax.random.key(1), return_tokens=True,
                       mesh=_one_device())
  np.testing.assert_array_equal(concat_tokens(ta), concat_tokens(tb))


def test_bad_mesh_is_an_input_error():
  with pytest.raises(InputError, match="jax.sharding.Mesh"):
    var_jax.sample(model("tiny"), [1], rng=jax.random.key(0), mesh="tpu")
  # 2 heads do not split over 4 tensor shards: said before anything is placed or traced.
  with pytest.raises(InputError, match=r"'tensor' has size 4, which does not divide .* heads 2"):
    var_jax.sample(model("tiny"), [1], rng=jax.random.key(0), mesh=var_jax.sampling_mesh(2, 1, 4))


def test_kernel_without_mesh_on_many_devices_fails_at_trace_time():
  """A Pallas kernel traced without a mesh on a multi-device process: a clear ConfigError when
  tracing, instead of 'Mosaic kernels cannot be automatically partitioned' on a pod."""
  from var_jax.kernels import mesh_sharding
  q = jnp.zeros((2, 2, 4, 8))
  called = []
  with pytest.raises(ConfigError, match="without an active mesh"):
    jax.jit(lambda x: mesh_sharding.shard_map_over_batch_and_heads(
        lambda a: called.append(1) or a, x, kernel="pallas_tpu")).lower(q)
  assert not called
  # Under a mesh it runs per shard (and interpret-mode kernels, plain XLA, need no mesh).
  mesh = var_jax.sampling_mesh(2, 1, 2)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda x: mesh_sharding.shard_map_over_batch_and_heads(lambda a: a * 2, x))(q)
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  assert attention.prefix_attention(q, q, q, kv_len=4, impl="pallas_tpu", interpret=True).shape == q.shape
