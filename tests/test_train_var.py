"""VAR training: sharded step == unsharded step, SIGTERM + resume == uninterrupted, two processes."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from var_jax.parallel import sharding
from var_jax.train import config_lib
from var_jax.data.pipeline import make_input_iterator
from var_jax.errors import ConfigError
from var_jax.train import train_var

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "var_tiny.py"


def _tiny_config(**updates):
  import importlib.util
  spec = importlib.util.spec_from_file_location("var_tiny", TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("steps=2,batch=8")
  config.update(updates)
  return config


def _one_step(config, mesh):
  """Init + one train step of the tiny config on `mesh`; returns (loss, params) on host."""
  task, _ = train_var.build_task(config)
  rules = sharding.logical_axis_rules(None, mesh)
  rng = jax.random.key(0)
  state, shardings = sharding.init_sharded(task.init_state, rng, mesh, rules)
  local = next(make_input_iterator(config.data, global_batch=config.global_batch_size, seed=0,
                                   **task.data_kwargs))
  batch = sharding.make_global_batch(local, mesh)
  repl = NamedSharding(mesh, P())
  frozen = jax.device_put(task.frozen, repl)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jax.jit(task.train_step, in_shardings=(shardings, sharding.batch_sharding(mesh), repl, repl),
                   out_shardings=(shardings, repl))
    new_state, metrics = step(state, batch, frozen, jax.random.key(1))
  return metrics, jax.device_get(new_state.params), new_state


def test_sharded_step_equals_unsharded():
  config = _tiny_config()
  # Open AdaLN gates (official init 1e-5..1e-3 leaves most gradients near Adam's eps).
  config.model["init_adaln_gamma"] = 0.5
  devices = np.asarray(jax.devices())
  assert devices.size == 8, "conftest provides 8 CPU devices"
  mesh_8 = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  mesh_1 = sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)], devices=devices[:1])
  metrics_8, params_8, state_8 = _one_step(config, mesh_8)
  metrics_1, params_1, _ = _one_step(config, mesh_1)
  # The weights really are split: fc1's kernel over fsdp (embed) and tensor (mlp).
  spec = state_8.params["blocks"]["ffn"]["fc1"]["kernel"].sharding.spec
  assert tuple(spec) == (None, "fsdp", "tensor")
  np.testing.assert_allclose(float(metrics_8["loss"]), float(metrics_1["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(metrics_8["grad_norm"]), float(metrics_1["grad_norm"]), rtol=1e-5)
  # Tolerance: Adam's first update is lr * g / (|g| + 1e-8). Where a gradient is itself ~1e-8
  # (AdaLN biases behind 1e-3 gates) reduction-order noise can even flip its sign, so every element
  # must agree to within 2 lr (two opposite Adam steps), and all but a sliver of them to 1e-3 lr.
  lr = float(metrics_1["learning_rate"])
  total = loose = 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params_8), jax.tree.leaves(params_1)):
    diff = np.abs(np.asarray(a) - np.asarray(b))
    assert diff.max() <= 2.02 * lr, (jax.tree_util.keystr(path), diff.max(), lr)  # + decay, rounding
    total += diff.size
    loose += int((diff > 1e-3 * lr).sum())
  assert loose / total < 0.01, (loose, total)
  print(f'{loose} of {total} elements differ by more than 1e-3 lr')


def test_config_errors_are_clear(tmp_path):
  config = _tiny_config()
  config.data.image_size = 32
  with pytest.raises(ConfigError, match="the tokenizer.s image size"):
    train_var.train(config, tmp_path / "a")
  config = _tiny_config()
  config.model["embed_dim"] = 100
  config.model["num_heads"] = 3
  with pytest.raises(ConfigError, match="divisible"):
    train_var.build_task(config)
  config = _tiny_config()
  config.model["dtype"] = "float16"  # VAR's attention takes float32 / bfloat16 only
  with pytest.raises(ConfigError, match=r"dtype must be float32 or bfloat16, got 'float16' \(VAR's"):
    train_var.build_task(config)
  from var_jax.models.vqvae_config import VQVAEConfig
  with pytest.raises(ConfigError, match=r"VQVAEConfig.dtype must be float32 or bfloat16.*loss scaling"):
    VQVAEConfig(dtype="float16")
  with pytest.raises(KeyError, match="unknown config argument"):
    config_lib.parse_arg("dpeth=3", depth=2)


def _env(devices: int, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", **extra)
  return env


def _train_cmd(workdir, arg, *overrides):
  return [sys.executable, "-m", "var_jax.cli", "train", f"--config={TINY}:{arg}", f"--workdir={workdir}",
          *overrides]


def _losses(workdir) -> dict[int, float]:
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.mark.slow  # ~3 min on 2 cores: four training processes (run by hand: pytest -m slow)
def test_sigterm_then_rerun_resumes_exactly(tmp_path):
  arg = "steps=24,batch=8"
  full = tmp_path / "full"
  out = subprocess.run(_train_cmd(full, arg), env=_env(1), check=True, capture_output=True,
                       text=True, timeout=600).stderr
  # Quiet by default: one metrics line per log step (log_every=1 here), a closing summary, no
  # third-party INFO (Orbax logs ~40 lines per checkpoint).
  assert len([l for l in out.splitlines() if "] accuracy=" in l]) == 24, out[-3000:]
  assert "Finished: steps 1-24" in out and "final loss" in out, out[-3000:]
  assert "orbax" not in out.lower() and "INFO:absl" not in out, out[-3000:]
  rerun = subprocess.run(_train_cmd(full, arg), env=_env(1), check=True, capture_output=True,
                         text=True, timeout=600).stderr
  assert "Already finished at step 24 (total_steps=24)" in rerun, rerun[-3000:]
  # The interrupted run loads its batches in two grain worker processes (the full run in-process):
  # its iterator state is saved with each checkpoint and restored on the rerun.
  cut = tmp_path / "cut"
  workers = "--config.data.num_processes=2"
  proc = subprocess.Popen(_train_cmd(cut, arg, workers), env=_env(1), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline:
    path = cut / "metrics.jsonl"
    if path.exists() and len(path.read_text().splitlines()) >= 4:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  stopped = max(_losses(cut))
  saved = sorted(int(p.name) for p in (cut / "checkpoints").iterdir() if p.name.isdigit())
  assert stopped < 24 and saved[-1] == stopped, (stopped, saved)
  data_state = json.loads((cut / "checkpoints" / str(stopped) / "data" / "process_0-of-1.json").read_text())
  assert data_state["step"] == stopped and data_state["layout"]["num_processes"] == 2, data_state
  subprocess.run(_train_cmd(cut, arg, workers), env=_env(1), check=True, capture_output=True, timeout=600)
  resumed, reference = _losses(cut), _losses(full)
  assert sorted(resumed) == list(range(1, 25))
  for step in range(stopped + 1, 25):
    np.testing.assert_allclose(resumed[step], reference[step], rtol=1e-6, err_msg=f"step {step}")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  """jax.distributed over localhost (gloo CPU collectives), 1 device each == 1 process, 2 devices."""
  arg = "steps=3,batch=8"
  one = tmp_path / "one"
  subprocess.run(_train_cmd(one, arg), env=_env(2), check=True, capture_output=True, timeout=600)
  two = tmp_path / "two"
  port = _free_port()
  procs = [subprocess.Popen(_train_cmd(two, arg), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                     JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  a, b = _losses(one), _losses(two)
  assert sorted(a) == sorted(b) == [1, 2, 3]
  for step in a:
    np.testing.assert_allclose(b[step], a[step], rtol=1e-5, err_msg=f"step {step}")


def test_sample_hook_on_a_mesh_with_more_batch_shards_than_images(tmp_path):
  """3 sample classes (6 guided sequences) on 8 batch shards: the hook pads to the mesh, writes
  its grid, and the checkpoint of that step is on disk first."""
  from PIL import Image
  config = _tiny_config(sample_every=2, sample_classes=[1, 2, 3], checkpoint_every=2,
                        async_checkpointing=False, stop_on_hook_error=True)
  config.total_steps = 2
  train_var.train(config, str(tmp_path))
  assert (tmp_path / "checkpoints" / "2").exists()
  grid = tmp_path / "samples" / "step_00000002.png"
  with Image.open(grid) as im:
    width, height = im.size
  # Three 64 px tiles make a 2 x 2 grid (2 px padding); the 5 padding images would make it 3 x 3.
  assert (width, height) == (2 * (64 + 2) + 2,) * 2
