"""Tokenizer training: the loss falls on CPU, the GAN path runs, SIGTERM + rerun resumes exactly."""
import importlib.util
import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from var_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "vqvae_tiny.py"
sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_train_var import _env  # noqa: E402  (same subprocess environment)


def _cmd(workdir, arg):
  return [sys.executable, "-m", "var_jax.cli", "train-tokenizer", f"--config={TINY}:{arg}", f"--workdir={workdir}"]


def _metrics(workdir):
  return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~1 min on 2 cores: 300 training steps (run by hand: pytest -m slow)
def test_reconstruction_loss_falls(tmp_path):
  subprocess.run(_cmd(tmp_path, "steps=300,batch=8"), env=_env(1), check=True, capture_output=True, timeout=900)
  rows = _metrics(tmp_path)
  first, last = rows[0], rows[-1]
  assert last["step"] == 300
  # Loose, honest bounds from a 300-step CPU run: the pixel MSE at least halves and PSNR rises 3 dB.
  assert last["pixel"] < 0.5 * first["pixel"], (first["pixel"], last["pixel"])
  assert last["psnr"] > first["psnr"] + 3.0, (first["psnr"], last["psnr"])
  assert 0 < last["codebook_usage"] <= 1
  # The trained tokenizer loads for VAR training (EMA weights).
  from var_jax.train.train_vqvae import load_trained_tokenizer
  cfg, params = load_trained_tokenizer(tmp_path, patch_nums=(1, 2, 4, 8))
  assert cfg.image_size == 32 and params["quantize"]["embedding"]["embedding"].shape == (64, 8)
  with pytest.raises(ConfigError, match="patch_nums"):
    load_trained_tokenizer(tmp_path, patch_nums=(1, 2, 3, 8))


def _tiny_config(arg):
  spec = importlib.util.spec_from_file_location("vqvae_tiny", TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_gan_starts_at_disc_start_step_with_the_adaptive_weight(tmp_path):
  arg = "steps=4,batch=4,gan=true"
  loss_cfg = _tiny_config(arg).loss
  assert (loss_cfg.disc_start_step, loss_cfg.disc_weight, loss_cfg.vq_weight) == (2, 0.5, 1.0)
  assert loss_cfg.adaptive_disc_weight
  subprocess.run(_cmd(tmp_path, arg) + ["--config.log_every=1"], env=_env(1), check=True,
                 capture_output=True, timeout=900)
  rows = _metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for r in rows:
    # A row's "step" counts the steps done: row s logs training step s - 1.
    live = r["step"] - 1 >= 2
    assert all(np.isfinite(v) for v in r.values()), r
    assert r["gan"] != 0 and r["adaptive_weight"] > 0
    if live:
      # taming's adaptive weight (a gradient-norm ratio, not the fixed 1) times disc_weight.
      assert r["adaptive_weight"] != pytest.approx(1.0, abs=1e-3), r
      assert r["gan_weight"] == pytest.approx(0.5 * r["adaptive_weight"], rel=1e-6), r
      assert r["disc_factor"] == 1.0 and r["disc_loss"] > 0, r
    else:
      assert r["gan_weight"] == 0.0 and r["disc_factor"] == 0.0 and r["disc_loss"] == 0.0, r
    # The gated GAN term is in the loss the generator minimises.
    assert r["loss"] == pytest.approx(r["rec"] + r["vq"] + r["gan_weight"] * r["gan"], rel=1e-5), r


@pytest.mark.slow
def test_sigterm_then_rerun_resumes_exactly(tmp_path):
  arg = "steps=60,batch=4,gan=true"
  every_step = ["--config.log_every=1"]
  full = tmp_path / "full"
  subprocess.run(_cmd(full, arg) + every_step, env=_env(1), check=True, capture_output=True, timeout=900)
  cut = tmp_path / "cut"
  proc = subprocess.Popen(_cmd(cut, arg) + every_step, env=_env(1), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while time.time() < deadline:
    path = cut / "metrics.jsonl"
    if path.exists() and len(path.read_text().splitlines()) >= 2:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  # The signal stopped the run before its end, at a step it checkpointed and logged.
  stopped = max(r["step"] for r in _metrics(cut))
  saved = sorted(int(p.name) for p in (cut / "checkpoints").iterdir() if p.name.isdigit())
  assert stopped < 60 and saved[-1] == stopped, (stopped, saved)
  assert f"Stopped at step {stopped} on a preemption signal" in err, err[-3000:]
  subprocess.run(_cmd(cut, arg) + every_step, env=_env(1), check=True, capture_output=True, timeout=900)
  a = {r["step"]: r for r in _metrics(full)}
  b = {r["step"]: r for r in _metrics(cut)}
  assert sorted(a) == sorted(b) == list(range(1, 61))
  for step in a:
    for key in ("loss", "pixel", "psnr", "disc_loss", "gan_weight"):
      np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-5, err_msg=f"{key} at step {step}")
