"""Tests of launch/tpu_train.sh: --dry-run prints the gcloud commands and runs none of them."""
import os
import pathlib
import shlex
import shutil
import stat
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "launch" / "tpu_train.sh"


@pytest.fixture(name="fake_path")
def fixture_fake_path(tmp_path):
  """A PATH whose first entry holds a `gcloud` that records the call and fails loudly."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  marker = tmp_path / "gcloud_was_called"
  gcloud.write_text(
      f"#!/bin/sh\necho \"$*\" >> {shlex.quote(str(marker))}\n"
      "echo 'fake gcloud: a dry run must not call gcloud' >&2\nexit 97\n")
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IXUSR)
  return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", marker


def _run(fake_path, *args, tfds_data_dir="gs://bucket/tfds"):
  path, marker = fake_path
  env = dict(os.environ, PATH=path, TFDS_DATA_DIR=tfds_data_dir)
  result = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
  assert not marker.exists(), f"gcloud was executed: {marker.read_text()}"
  return result


def _commands(stdout):
  """The printed commands ("+ ..." lines), each split into its arguments."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _find(commands, *prefix):
  return [c for c in commands if c[:len(prefix)] == list(prefix)]


BASE_ARGS = ("--tpu", "var-pod", "--zone", "us-central2-b", "--project", "my-proj",
             "--accelerator-type", "v4-32", "--workdir", "gs://bucket/runs/d16")


def test_dry_run_prints_create_copy_setup_and_train_on_all_workers(fake_path, tmp_path):
  config = tmp_path / "var_imagenet.py"
  config.write_text("def get_config(arg=None):\n  return None\n")
  result = _run(fake_path, "--dry-run", *BASE_ARGS, "--config", f"{config}:depth=16", "--spot",
                "--env", "WANDB_MODE=offline", "--config.total_steps=10", "--",
                "--config.lr=3e-4")
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  assert all(c[0] in ("gcloud", "python3") for c in commands)

  [create] = _find(commands, "gcloud", "alpha", "compute", "tpus", "queued-resources", "create")
  assert create[6] == "var-pod"
  for flag in ("--node-id=var-pod", "--zone=us-central2-b", "--project=my-proj",
               "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"):
    assert flag in create

  assert _find(commands, "python3", "-m")  # The local package build.
  copies = _find(commands, "gcloud", "compute", "tpus", "tpu-vm", "scp")
  assert [c[5].endswith((".tar.gz", ".whl")) for c in copies] == [True, False]
  assert copies[0][6].startswith("var-pod:var_jax-")
  assert copies[1][5:7] == [str(config), "var-pod:var_jax_run/var_imagenet.py"]
  assert all("--worker=all" in c and "--zone=us-central2-b" in c for c in copies)

  ssh = _find(commands, "gcloud", "compute", "tpus", "tpu-vm", "ssh", "var-pod")
  remote = {c[-1].split("=", 1)[1]: c for c in ssh if c[-1].startswith("--command=")}
  setup = next(cmd for cmd in remote if "uv venv" in cmd)
  assert "--worker=all" in remote[setup]
  assert "if [ ! -x \"$HOME/var_jax_venv/bin/python\" ]" in setup  # The venv is made once.
  assert "jax[tpu]==0.10.2" in setup and "--reinstall-package var-jax" in setup

  train = next(cmd for cmd in remote if "var-jax\" train" in cmd)
  assert "--worker=all" in remote[train]
  assert "nohup env TFDS_DATA_DIR=gs://bucket/tfds WANDB_MODE=offline" in train
  assert ("train --config var_jax_run/var_imagenet.py:depth=16 --workdir gs://bucket/runs/d16 "
          "--config.total_steps=10 --config.lr=3e-4 >") in train
  assert "-worker-${worker}.log" in train

  tail = next(cmd for cmd in remote if cmd.startswith("tail "))
  assert "--worker=0" in remote[tail] and "-worker-0.log" in tail


def test_dry_run_direct_create_no_tail_and_pip_url(fake_path):
  result = _run(fake_path, "--dry-run", *BASE_ARGS, "--config", "var_jax/configs/missing.py",
                "--direct", "--reserved", "--no-tail", "--package-url",
                "git+https://example.com/var-jax.git@main", tfds_data_dir="")
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  [create] = _find(commands, "gcloud", "compute", "tpus", "tpu-vm", "create")
  assert "--version=tpu-ubuntu2204-base" in create and "--reserved" in create
  assert not _find(commands, "gcloud", "compute", "tpus", "tpu-vm", "scp")
  assert not _find(commands, "python3")
  remote = [c[-1] for c in commands if c[-1].startswith("--command=")]
  assert any("var-jax[tpu,data] @ git+https://example.com/var-jax.git@main" in c for c in remote)
  train = next(c for c in remote if "var-jax\" train" in c)
  assert "TFDS_DATA_DIR" not in train and "--config var_jax/configs/missing.py " in train
  assert not any(c.startswith("--command=tail") for c in remote)
  assert "Follow it with:" in result.stdout


def test_delete_prints_a_forced_async_queued_resource_delete(fake_path):
  result = _run(fake_path, "--dry-run", "--tpu", "var-pod", "--zone", "us-central2-b", "--delete")
  assert result.returncode == 0, result.stderr
  [delete] = _commands(result.stdout)
  assert delete[:7] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "delete",
                        "var-pod"]
  assert {"--force", "--async", "--zone=us-central2-b"} <= set(delete)


@pytest.mark.parametrize("args, message", [
    (("--bogus-flag",), "unknown argument '--bogus-flag'"),
    (("--zone", "us-central2-b", "--config", "c.py", "--workdir", "gs://b/w"), "--tpu is required"),
    (("--tpu", "var-pod", "--zone", "--config"), "--zone needs a value"),
    (("--tpu", "var-pod", "--zone", "z", "--workdir", "gs://b/w"), "--config is required"),
])
def test_bad_arguments_fail_with_usage(fake_path, args, message):
  result = _run(fake_path, "--dry-run", *args)
  assert result.returncode != 0
  assert message in result.stderr and "Usage:" in result.stderr


def test_conflicting_or_missing_slice_flags_fail(fake_path):
  result = _run(fake_path, "--dry-run", *BASE_ARGS, "--config", "c.py", "--spot", "--reserved")
  assert result.returncode != 0 and "at most one of" in result.stderr
  args = [a for a in BASE_ARGS if a not in ("--accelerator-type", "v4-32")]
  result = _run(fake_path, "--dry-run", *args, "--config", "c.py")
  assert result.returncode != 0 and "pass --accelerator-type" in result.stderr


def test_help_prints_usage(fake_path):
  result = _run(fake_path, "--help")
  assert result.returncode == 0 and result.stdout.startswith("Usage:")
  assert "--dry-run" in result.stdout and "--delete" in result.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_passes_shellcheck():
  result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
