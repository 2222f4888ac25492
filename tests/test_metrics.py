"""Metrics logging (TensorBoard + metrics.jsonl), non-finite checks and MFU helpers."""
import logging
import math

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from var_jax.models import flops as var_flops
from var_jax.parallel import sharding
from var_jax.errors import ConfigError
from var_jax.models.var_config import VARConfig
from var_jax.train import metrics


def test_jsonl_lines_parse_and_hold_the_scalars(tmp_path):
  with metrics.MetricsLogger(tmp_path, process_index=0) as logger:
    written = logger.write_scalars(10, {"loss": jnp.float32(2.5), "learning_rate": 3e-4,
                                        "grad_norm": jnp.asarray([1.25])})
    logger.write_scalars(20, {"loss": 2.0, "learning_rate": 2e-4, "grad_norm": 0.5})
    assert written == {"loss": 2.5, "learning_rate": 3e-4, "grad_norm": 1.25}
    # Flushed on every write: readable before the logger is closed.
    assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [10, 20]
  records = metrics.read_metrics(tmp_path)
  assert records[0]["loss"] == 2.5 and records[0]["learning_rate"] == 3e-4
  assert records[1] | {"wall_time": 0} == {"step": 20, "loss": 2.0, "learning_rate": 2e-4,
                                            "grad_norm": 0.5, "wall_time": 0}
  assert records[0]["wall_time"] <= records[1]["wall_time"]
  assert list(tmp_path.glob("events.out.tfevents*")), "no TensorBoard event file"


def test_a_second_logger_appends(tmp_path):
  for step in (1, 2):
    with metrics.MetricsLogger(tmp_path, process_index=0) as logger:
      logger.write_scalars(step, {"loss": float(step)})
  assert [r["loss"] for r in metrics.read_metrics(tmp_path)] == [1.0, 2.0]


def test_other_hosts_write_no_files(tmp_path):
  with metrics.MetricsLogger(tmp_path / "run", process_index=1) as logger:
    logger.write_scalars(1, {"loss": 1.0})
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad", [{"loss": float("nan")}, {"grad_norm": jnp.inf}])
def test_non_finite_loss_or_grad_norm_raises_naming_the_step(tmp_path, bad):
  with metrics.MetricsLogger(tmp_path, process_index=0) as logger:
    with pytest.raises(FloatingPointError, match="at step 42"):
      logger.write_scalars(42, {"learning_rate": 1e-4, **bad})
  (record,) = metrics.read_metrics(tmp_path)  # still logged, for the post-mortem
  assert record["step"] == 42 and not math.isfinite(record[next(iter(bad))])


def test_other_non_finite_scalars_are_only_logged(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  with metrics.MetricsLogger(tmp_path, process_index=0) as logger:
    written = logger.write_scalars(1, {"loss": 1.0, "accuracy_scale_9": float("nan")})  # no raise
    assert written["loss"] == 1.0 and math.isnan(written["accuracy_scale_9"])
  (record,) = metrics.read_metrics(tmp_path)
  assert record["step"] == 1 and record["loss"] == 1.0 and math.isnan(record["accuracy_scale_9"])
  assert any("accuracy_scale_9=nan" in r.getMessage() for r in caplog.records), caplog.text


def test_non_scalar_metric_is_refused(tmp_path):
  with metrics.MetricsLogger(tmp_path, process_index=0) as logger:
    with pytest.raises(ValueError, match="'per_scale' must be a scalar"):
      logger.write_scalars(1, {"per_scale": jnp.ones(3)})


# -- MFU ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, generation", [
    ("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5p", "v5p"),
    ("TPU v5", "v5p"), ("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"), ("cpu", None),
    ("NVIDIA H100 80GB HBM3", None), ("TPU v3", None)])
def test_tpu_generation_from_device_kind(kind, generation):
  assert metrics.tpu_generation(kind) == generation


def test_peak_flops_table_and_override():
  assert metrics.peak_flops_per_device("TPU v5 lite") == 197e12
  assert metrics.peak_flops_per_device("TPU v4") == 275e12
  assert metrics.peak_flops_per_device("cpu") is None
  assert metrics.peak_flops_per_device() is None  # the CPU test devices
  assert metrics.peak_flops_per_device("TPU v4", override=1e12) == 1e12
  with pytest.raises(ConfigError, match="override"):
    metrics.peak_flops_per_device(override=0.0)


def test_compiled_flops_count_the_global_step_on_a_sharded_mesh():
  mesh = sharding.make_mesh()
  a = jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  b = jax.ShapeDtypeStruct((512, 128), jnp.float32, sharding=NamedSharding(mesh, P()))
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  assert metrics.compiled_flops_per_step(compiled, jax.device_count()) == 2 * 256 * 512 * 128


def test_mfu_arithmetic():
  flops = var_flops.flops_per_example(VARConfig(depth=16)) * 768  # a d16 step at batch 768
  # 2 steps/s on 32 v4 chips.
  mfu = metrics.model_flops_utilization(flops, 2.0, 275e12, 32)
  assert mfu == pytest.approx(flops * 2.0 / (275e12 * 32))
  assert 0 < mfu < 1
  with pytest.raises(ConfigError, match="positive peak"):
    metrics.model_flops_utilization(flops, 2.0, 0.0, 32)
