"""`var-jax fid-stats` and `var-jax evaluate` end to end on the shipped model, with random Inception
weights in pytorch-fid's layout (the real ones cannot be downloaded here).

Expectations are computed independently of the pipeline: the images of the saved sample batch go
through the network directly, and FID's trace term from the few samples themselves (below);
tests/test_fid.py checks the implementation's Frechet distance against scipy's sqrtm, as the ADM
evaluator takes it.
"""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from test_fid import random_state_dict, write_pth
from var_jax import cli
from var_jax.eval import inception

N = 24


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> pathlib.Path:
  return write_pth(tmp_path_factory.mktemp("w") / inception.WEIGHTS_FILENAME, random_state_dict(0))


@pytest.fixture(scope="module")
def ref(tmp_path_factory, weights) -> pathlib.Path:
  out = tmp_path_factory.mktemp("ref") / "shapes_ref.npz"
  assert cli.main(["fid-stats", "--shapes", "32", "--image-size", "64", "--fid-inception",
                   str(weights), "--out", str(out)]) == 0
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, weights, ref):
  d = tmp_path_factory.mktemp("eval")
  argv = ["evaluate", "--num-samples", str(N), "--ref", str(ref), "--fid-inception", str(weights),
          "--out", str(d / "r.json"), "--save-samples", str(d / "s.npz"), "--psnr-images", "8"]
  assert cli.main(argv) == 0
  return d, argv, json.loads((d / "r.json").read_text())


def _adm_features(weights, images):
  net = inception.load_adm_inception(weights)
  pool, spatial = jax.jit(lambda p, x: inception.pool_and_spatial_features(net.module, p, x))(
      net.params, np.asarray(images, np.float32))
  return np.asarray(pool, np.float64), np.asarray(spatial, np.float64)


def _few_sample_fid(a, b_mu, b_sigma):
  """FID of the N samples `a` (N, D) against (b_mu, b_sigma) with N < D: the samples' covariance is
  A^T A with A = (a - mean) / sqrt(N - 1), and the nonzero eigenvalues of A^T A S_b, whose square
  roots sum to Tr((S_a S_b)^(1/2)), are those of the N x N matrix A S_b A^T. (scipy's sqrtm of the
  2048-d product took ~14 s per call here; tests/test_fid.py compares against it.)"""
  n, mu = len(a), a.mean(0)
  A = (a - mu) / np.sqrt(n - 1)
  eigenvalues = np.linalg.eigvalsh(A @ b_sigma @ A.T)  # symmetric positive semi-definite
  trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
  return float(((mu - b_mu) ** 2).sum() + (A * A).sum() + np.trace(b_sigma) - 2 * trace_sqrt)


def test_fid_stats_writes_the_reference_of_the_shapes_data(ref, weights):
  from var_jax.data import shapes
  images, _ = shapes.generate(range(32), seed=0, image_size=64)
  pool, spatial = _adm_features(weights, images)
  with np.load(ref) as data:
    np.testing.assert_allclose(data["pool_features"], pool, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data["mu"], pool.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data["sigma_s"], np.cov(spatial, rowvar=False), rtol=1e-4, atol=1e-5)


def test_evaluate_writes_the_contract_keys_and_saves_the_samples(run):
  d, _, result = run
  for key in ("fid", "sfid", "inception_score", "precision", "recall", "num_samples"):
    assert key in result, key
  assert result["num_samples"] == N and result["num_reference_images"] == 32
  assert result["class_consistency"] > 0.9
  with np.load(d / "s.npz") as batch:
    assert batch["arr_0"].shape == (N, 64, 64, 3) and batch["arr_0"].dtype == np.uint8


def test_samples_are_class_balanced_and_drawn_from_their_own_keys(run):
  # Image i: class i % 10, key fold_in(key(seed), i), whatever the batch and device count.
  from var_jax.inference.pretrained import load_pretrained
  from var_jax.inference.sampler import sample
  d, _, _ = run
  with np.load(d / "s.npz") as batch:
    saved = batch["arr_0"]
  key = jax.random.key(0)
  idx = np.array([3, 17])
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx.astype(np.uint32))
  again = np.asarray(sample(load_pretrained("shapes-tiny"), idx % 10, rng=keys))
  np.testing.assert_array_equal(again, saved[idx])


def test_metrics_equal_an_independent_computation_from_the_saved_images(run, ref, weights):
  d, _, result = run
  with np.load(d / "s.npz") as batch:
    pool, spatial = _adm_features(weights, batch["arr_0"])
  with np.load(ref) as data:
    want_fid = _few_sample_fid(pool, data["mu"], data["sigma"])
    want_sfid = _few_sample_fid(spatial, data["mu_s"], data["sigma_s"])
  np.testing.assert_allclose(result["fid"], want_fid, rtol=1e-3)
  np.testing.assert_allclose(result["sfid"], want_sfid, rtol=1e-3)


def test_the_sample_batch_gives_the_same_numbers(run, ref, weights):
  d, _, result = run
  assert cli.main(["evaluate", "--sample-batch", str(d / "s.npz"), "--ref", str(ref),
                   "--fid-inception", str(weights), "--out", str(d / "batch.json")]) == 0
  again = json.loads((d / "batch.json").read_text())
  for key in ("fid", "sfid", "inception_score"):
    np.testing.assert_allclose(again[key], result[key], rtol=1e-4)
  assert (again["precision"], again["recall"]) == (result["precision"], result["recall"])


@pytest.mark.slow  # re-runs the evaluation (run by hand: pytest -m slow)
def test_an_interrupted_evaluation_resumes_from_its_chunks(run, capsys):
  d, argv, result = run
  chunks = sorted((d / "r.features" / "process_0").glob("chunk_*.npz"))
  assert len(chunks) >= 1
  chunks[-1].unlink()                               # never written
  if len(chunks) > 1:
    chunks[0].write_bytes(b"cut short")             # written halfway: sampled again
  (d / "s.npz").unlink()
  assert cli.main(argv) == 0
  again = json.loads((d / "r.json").read_text())
  for key in ("fid", "sfid", "inception_score", "precision", "recall", "class_consistency"):
    assert again[key] == result[key], key
  # Other settings are refused, nothing deleted.
  capsys.readouterr()
  assert cli.main(argv[:-2] + ["--cfg", "2.0"]) == 2
  assert "cfg: 1.5 then, 2.0 now" in capsys.readouterr().err
  assert len(list((d / "r.features" / "process_0").glob("chunk_*.npz"))) == len(chunks)


def test_bad_evaluate_inputs_are_clear_errors(tmp_path, weights, ref, capsys):
  cases = [
      (["--ref", str(ref)], "--ref and --fid-inception go together"),
      (["--sample-batch", str(tmp_path / "x.npz")], "--sample-batch needs --ref"),
      (["--ref", str(tmp_path / "missing.npz"), "--fid-inception", str(weights)], "not found"),
      (["--ref", str(ref), "--fid-inception", str(tmp_path / "no.pth")], "FID Inception weights not found"),
      (["--num-samples", "3", "--ref", str(ref), "--fid-inception", str(weights)], "must be > 3"),
  ]
  for args, message in cases:
    assert cli.main(["evaluate", *args, "--features-dir", str(tmp_path / "f")]) == 2, args
    assert message in capsys.readouterr().err, args
  assert cli.main(["fid-stats", "--images", str(tmp_path), "--fid-inception", str(weights),
                   "--out", str(tmp_path / "r.npz")]) == 2
  assert "holds no image files" in capsys.readouterr().err


def test_fid_stats_of_an_image_folder_crops_like_adm(tmp_path, weights):
  from PIL import Image
  rng = np.random.default_rng(0)
  for i, (h, w) in enumerate([(80, 100), (64, 64), (150, 130), (70, 90)]):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
  assert cli.main(["fid-stats", "--images", str(tmp_path), "--image-size", "64", "--fid-inception",
                   str(weights), "--out", str(tmp_path / "ref.npz")]) == 0
  with np.load(tmp_path / "ref.npz") as data:
    assert data["pool_features"].shape == (4, inception.FEATURE_DIM)


@pytest.mark.slow  # ~80 s: a tiny training run with the hook (run by hand: pytest -m slow)
def test_training_logs_adm_metrics_periodically(tmp_path, weights, ref):
  from test_train_var import _tiny_config
  from var_jax.train import train_var
  config = _tiny_config(checkpoint_every=2, async_checkpointing=False, stop_on_hook_error=True)
  config.fid_eval = dict(every=2, num_samples=8, ref=str(ref), inception_path=str(weights),
                         batch_per_device=1)
  train_var.train(config, str(tmp_path / "run"))
  logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  at_2 = [m for m in logged if m.get("step") == 2 and "fid" in m]
  assert at_2, logged
  for key in ("fid", "sfid", "inception_score", "precision", "recall"):
    assert np.isfinite(at_2[0][key]), key
  assert not (tmp_path / "run" / "fid_eval" / "step_00000002").exists()


def test_training_with_a_missing_reference_fails_before_training(tmp_path, weights):
  from test_train_var import _tiny_config
  from var_jax.errors import ConfigError
  from var_jax.train import train_var
  config = _tiny_config()
  config.fid_eval = dict(every=2, ref=str(tmp_path / "nope.npz"), inception_path=str(weights))
  with pytest.raises(ConfigError, match="fid_eval.ref: no file at"):
    train_var.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # ~2 min: two processes joined by jax.distributed over localhost
def test_two_hosts_give_the_one_host_numbers(tmp_path, weights, ref):
  """Each host samples its share, features are gathered, host 0 writes the JSON: the same numbers
  as one process over the same number of devices."""
  import subprocess
  import sys
  from test_train_var import _env, _free_port
  argv = [sys.executable, "-m", "var_jax.cli", "evaluate", "--num-samples", "10", "--batch-size",
          "4", "--ref", str(ref), "--fid-inception", str(weights), "--psnr-images", "0"]
  subprocess.run(argv + ["--out", str(tmp_path / "one.json")], env=_env(2), check=True,
                 capture_output=True, timeout=900)
  port = _free_port()
  procs = [subprocess.Popen(argv + ["--out", str(tmp_path / "two.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env=_env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
  one = json.loads((tmp_path / "one.json").read_text())
  two = json.loads((tmp_path / "two.json").read_text())
  for key in ("fid", "sfid", "inception_score"):
    np.testing.assert_allclose(two[key], one[key], rtol=1e-4, err_msg=key)
  for key in ("precision", "recall", "class_consistency", "num_samples"):
    assert two[key] == one[key], key
  # Each host kept its own share's chunks: 5 images each, in calls of at most 4.
  shares = [sorted(p.name for p in (tmp_path / "two.features" / f"process_{i}").glob("chunk_*"))
            for i in range(2)]
  assert shares == [["chunk_00000000_00000004.npz", "chunk_00000004_00000005.npz"],
                    ["chunk_00000005_00000009.npz", "chunk_00000009_00000010.npz"]]
