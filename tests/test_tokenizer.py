"""The Flax tokenizer against the official one (fixtures from the PyTorch release)."""
import io
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import var_jax
from helpers import bfloat16_gradient_errors
from var_jax.errors import CheckpointError, InputError
from var_jax.models.vqvae import VQVAE
from var_jax.models.vqvae_config import VQVAEConfig

PATCH_NUMS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def ref(fixtures_dir):
  return dict(np.load(fixtures_dir / "official_tiny_seed0.npz"))


@pytest.fixture(scope="module")
def tok(fixtures_dir):
  return var_jax.Tokenizer.from_torch(fixtures_dir / "official_tiny_vae.pth", patch_nums=PATCH_NUMS)


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def test_config_is_inferred_from_shapes(tok):
  cfg = tok.config
  assert (cfg.vocab_size, cfg.z_channels, cfg.ch, cfg.ch_mult) == (64, 8, 32, (1, 1, 2, 2, 4))
  assert (cfg.num_res_blocks, cfg.share_quant_resi, cfg.image_size) == (2, 4, 64)
  assert cfg.phi_table == (0, 1, 2, 3)


def test_latent_matches_official(tok, ref):
  f = tok.apply(jnp.asarray(_nhwc(ref["inp_img"])), method=VQVAE.encode_to_latent)
  np.testing.assert_allclose(np.asarray(f), _nhwc(ref["vae_f"]), atol=1e-4)


def test_encode_indices_identical_to_official(tok, ref):
  idx = tok.encode(_nhwc(ref["inp_img"]))
  assert [i.shape for i in idx] == [(2, p, p) for p in PATCH_NUMS]
  assert all(i.dtype == jnp.int32 for i in idx)
  got = np.concatenate([np.asarray(i).reshape(2, -1) for i in idx], axis=1)
  np.testing.assert_array_equal(got, ref["vae_idx_BL"])


def test_fhat_per_scale_matches_official(tok, ref):
  f_hats = tok.apply(jnp.asarray(_nhwc(ref["inp_img"])), method=VQVAE.encode_fhats)
  for si, f_hat in enumerate(f_hats):
    np.testing.assert_allclose(np.asarray(f_hat), _nhwc(ref["vae_fhat"][si]), atol=1e-4)


def _ref_index_maps(ref):
  flat, out, start = ref["vae_idx_BL"], [], 0
  for p in PATCH_NUMS:
    out.append(jnp.asarray(flat[:, start:start + p * p].reshape(-1, p, p), jnp.int32))
    start += p * p
  return out


def test_decode_matches_official(tok, ref):
  idx = _ref_index_maps(ref)
  f_hat = tok.apply(idx, method=VQVAE.indices_to_fhat)
  np.testing.assert_allclose(np.asarray(f_hat), _nhwc(ref["vae_dec_fhat"]), atol=1e-4)
  unclamped = tok.apply(f_hat, method=VQVAE.decode_fhat_unclamped)
  np.testing.assert_allclose(np.asarray(unclamped), _nhwc(ref["vae_dec_unclamped"]), atol=1e-4)
  img = tok.decode(idx)
  assert img.shape == (2, 64, 64, 3) and img.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(img), _nhwc(ref["vae_rec_img"]), atol=1e-4)


def test_teacher_forcing_input_matches_official(tok, ref):
  x = tok.apply(_ref_index_maps(ref), method=VQVAE.indices_to_var_input)
  assert x.shape == (2, 29, 8)
  np.testing.assert_allclose(np.asarray(x), ref["tf_x_BLCv_wo_first_l"], atol=1e-4)


def test_next_autoregressive_input_walks_to_the_same_fhat(tok, ref):
  idx = _ref_index_maps(ref)
  f_hat = jnp.zeros((2, 4, 4, 8), jnp.float32)
  x_tf = np.asarray(tok.apply(idx, method=VQVAE.indices_to_var_input))
  start = 0
  for si, p in enumerate(PATCH_NUMS):
    h = tok.apply(idx[si], method=VQVAE.lookup)
    f_hat, nxt = tok.apply(si, f_hat, h, method=VQVAE.next_autoregressive_input)
    if si < len(PATCH_NUMS) - 1:
      q = PATCH_NUMS[si + 1]
      np.testing.assert_allclose(np.asarray(nxt).reshape(2, q * q, 8), x_tf[:, start:start + q * q], atol=1e-5)
      start += q * q
  np.testing.assert_allclose(np.asarray(f_hat), _nhwc(ref["vae_fhat"][-1]), atol=1e-4)


def test_training_forward_straight_through_and_usage(tok, ref):
  import jax
  img = jnp.asarray(_nhwc(ref["inp_img"]))
  # Jitted: op by op, the forward and its gradient compiled one program per op (~35 s).
  rec, vq_loss, hits = jax.jit(lambda x: tok.apply(x, method=VQVAE.__call__))(img)
  assert rec.shape == img.shape and np.isfinite(float(vq_loss))
  assert hits.shape == (4, 64) and np.asarray(hits.sum(1)).tolist() == [2 * p * p for p in PATCH_NUMS]
  # Straight-through: the gradient reaches the encoder although argmin has none.
  def loss(p):
    r, l, _ = tok.module.apply({"params": p}, img)
    return jnp.mean(jnp.abs(r - img)) + l
  g = jax.jit(jax.grad(loss))(tok.params)
  assert float(jnp.abs(g["encoder"]["conv_in"]["kernel"]).sum()) > 0
  assert float(jnp.abs(g["quantize"]["embedding"]["embedding"]).sum()) > 0


def test_bad_images_rejected(tok):
  good = np.zeros((1, 64, 64, 3), np.float32)
  cases = [
      (np.zeros((64, 64, 3), np.float32), "NHWC"),
      (np.zeros((1, 3, 64, 64), np.float32), "NHWC"),
      (np.zeros((1, 32, 32, 3), np.float32), "64x64"),
      (good.astype(np.uint8), "floating"),
      (good + 2.0, r"\[-1, 1\]"),
      (np.full_like(good, np.nan), r"\[-1, 1\]"),
  ]
  for images, msg in cases:
    with pytest.raises(InputError, match=msg):
      tok.encode(images)


def test_bad_index_maps_rejected(tok):
  good = [np.zeros((1, p, p), np.int32) for p in PATCH_NUMS]
  with pytest.raises(InputError, match="list of 4"):
    tok.decode(good[:3])
  with pytest.raises(InputError, match=r"\(B, 3, 3\)"):
    tok.decode(good[:2] + [np.zeros((1, 2, 2), np.int32)] + good[3:])
  with pytest.raises(InputError, match="outside"):
    tok.decode(good[:3] + [np.full((1, 4, 4), 64, np.int32)])
  with pytest.raises(InputError, match="integer"):
    tok.decode(good[:3] + [np.zeros((1, 4, 4), np.float32)])


def test_wrong_model_checkpoint_rejected(fixtures_dir):
  with pytest.raises(CheckpointError, match="VQVAE"):
    var_jax.Tokenizer.from_torch(fixtures_dir / "official_tiny_seed0_var.pth")


def test_mismatched_shapes_listed(fixtures_dir):
  sd = var_jax.load_torch_checkpoint(fixtures_dir / "official_tiny_vae.pth")
  sd = dict(sd)
  sd["decoder.conv_out.weight"] = np.zeros((3, 16, 3, 3), np.float32)
  del sd["encoder.mid.block_2.conv1.bias"]
  sd["encoder.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(CheckpointError) as e:
    var_jax.Tokenizer.from_torch(sd, patch_nums=PATCH_NUMS)
  msg = str(e.value)
  assert "missing (1): encoder/mid/block_2/conv1/bias" in msg
  assert "unexpected (1): encoder/extra/scale" in msg
  assert "decoder/conv_out/kernel: checkpoint (3, 3, 16, 3) vs model (3, 3, 32, 3)" in msg


def test_truncated_file_rejected(fixtures_dir, tmp_path):
  data = (fixtures_dir / "official_tiny_vae.pth").read_bytes()
  bad = tmp_path / "truncated.pth"
  bad.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError):
    var_jax.Tokenizer.from_torch(bad)


def test_malicious_pickle_refused(tmp_path):
  marker = tmp_path / "pwned"
  payload = (b"\x80\x02cposix\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little")
             + f"touch {marker}".encode() + b"q\x01\x85q\x02Rq\x03.")
  path = tmp_path / "evil.pth"
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("evil/data.pkl", payload)
    z.writestr("evil/version", "3\n")
  path.write_bytes(buf.getvalue())
  with pytest.raises(var_jax.errors.UnsafeCheckpointError):
    var_jax.Tokenizer.from_torch(path)
  assert not marker.exists()


def test_bf16_decoder_gradients_sum_in_float32():
  """Every gradient of a bf16 decoder (all its convs the precision.Conv layers, conv_impl="xla")
  is float32 autodiff's of the same parameters up to the bf16 forward's rounding (at most 3.9%
  measured, the first convs' kernels): the convs' biases join their float32 sums, so their
  gradients sum over (batch, height, width) in float32. With flax's nn.Conv adding them in bf16,
  XLA:CPU summed in bf16: 11 bias gradients (attention qkv, conv) were 13-40% off."""
  cfg = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                    num_groups=8, patch_nums=(1, 2, 4, 8, 16), conv_impl="xla")
  rng = np.random.default_rng(0)
  target = jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
  f_hat = jnp.asarray(rng.standard_normal((4, 16, 16, 8)), jnp.float32)
  # The decoder's and post_quant_conv's parameters, the biases made non-zero.
  params = jax.jit(lambda key: jax.tree.map(
      lambda p: p + 0.02 * jax.random.normal(key, p.shape),
      VQVAE(cfg).init(key, f_hat, method=VQVAE.decode_fhat)["params"]))(jax.random.PRNGKey(0))

  def loss(p, c):
    image = VQVAE(c).apply({"params": p}, f_hat, method=VQVAE.decode_fhat)
    return jnp.mean((image.astype(jnp.float32) - target) ** 2)

  errors = bfloat16_gradient_errors(loss, params, cfg)
  assert len(errors) == 78, len(errors)
  worst = {k: e for k, e in errors.items() if e > 0.1}
  assert not worst, worst
