"""`var-jax aot`: a training config's train step and sampler compiled for a TPU slice on this CPU
machine, the printed per-chip figures checked against the same programs compiled here directly.

Needs libtpu (the tpu extra), no TPU. configs/var_tiny.py on a v5e-4 with pre-tokenized batches
(no tokenizer encode in the step) keeps each compile within ~20 s on 2 cores.
"""
import contextlib
import io
import json
import re

import jax
import jax.numpy as jnp
import pytest

from var_jax import aot, cli
from var_jax.models import flops
from var_jax.train import config_lib, train_var

pytestmark = [
    pytest.mark.tpu_backend,
    pytest.mark.skipif(not aot.libtpu_available(), reason="needs libtpu (pip install .[tpu])"),
]

CONFIG = "configs/var_tiny.py"
OVERRIDES = ["--config.data.source=pretokenized"]
TOPOLOGY = "v5e-4"
SAMPLE_BATCH = 8
UNITS = {"MiB": 2**20, "GiB": 2**30, "MFLOP": 1e6, "GFLOP": 1e9, "TFLOP": 1e12, "PFLOP": 1e15}


def _run(capsys, *args):
  code = cli.main(["aot", *args])
  out, err = capsys.readouterr()
  return code, out, err


def _amount(text: str, label: str) -> float:
  """The number after `label` in `text`, in bytes or FLOPs ("arguments 16.8 MiB" -> 16.8 * 2**20)."""
  match = re.search(re.escape(label) + r" ([\d.]+) (MiB|GiB|MFLOP|GFLOP|TFLOP|PFLOP)", text)
  assert match, (label, text)
  return float(match.group(1)) * UNITS[match.group(2)]


def _section(out: str, kind: str) -> str:
  """The printed lines of one program ("train step" or "sampler"), up to the next one."""
  start = out.index(f"\n{kind}: ") + 1
  end = out.find("\n{", start)  # its JSON line
  return out[start:end]


def _records(out: str) -> dict:
  return {r["kind"]: r for r in (json.loads(line) for line in out.splitlines() if line.startswith("{"))}


def _close(printed: float, exact: float, text_unit_step: float):
  """A figure printed rounded: within half a step of its last digit (or 5e-4 relative)."""
  assert abs(printed - exact) <= max(text_unit_step / 2, 5e-4 * abs(exact)) + 1e-9, (printed, exact)


@pytest.fixture(scope="module")
def printed():
  """One `var-jax aot ... --sample --json` run: the train step and the sampler, loop-corrected
  (capsys is function-scoped, so the output is captured by hand)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(["aot", "--config", CONFIG, "--topology", TOPOLOGY, *OVERRIDES, "--sample",
                     "--sample-batch", str(SAMPLE_BATCH), "--json"])
  return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def direct():
  """The same config, mesh and programs compiled here through var_jax.aot's compile functions."""
  config = config_lib.load_config_file(CONFIG, OVERRIDES)
  mesh = aot.topology_mesh(TOPOLOGY, config.mesh)
  train = aot.compile_train_step(config, mesh)
  with aot.scan_unroll(2):  # depth 2: the block scan fully unrolled, every block counted
    train_unrolled = aot.compile_train_step(config, mesh)
  vae_cfg = aot.tokenizer_config(config)
  var_cfg = train_var.var_config_from(config, vae_cfg)
  model = aot.abstract_model(var_cfg, vae_cfg)
  labels = jax.ShapeDtypeStruct((SAMPLE_BATCH,), jnp.int32)
  sampler = aot.lower_sample(model, labels, mesh=mesh).compile()
  with aot.scan_unroll(var_cfg.depth, slice_each_step=True):
    sampler_unrolled = aot.lower_sample(model, labels, mesh=mesh).compile()
  return dict(config=config, mesh=mesh, var_cfg=var_cfg, train=train.compiled,
              train_unrolled=train_unrolled.compiled, sampler=sampler,
              sampler_unrolled=sampler_unrolled)


def _memory(compiled):
  memory = compiled.memory_analysis()
  return memory[0] if isinstance(memory, (list, tuple)) else memory


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def _check_memory(text: str, record: dict, compiled):
  memory = _memory(compiled)
  exact = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
           "aliased with donated arguments": memory.alias_size_in_bytes,
           "temps": memory.temp_size_in_bytes, "code": memory.generated_code_size_in_bytes}
  total = (exact["arguments"] + exact["outputs"] - exact["aliased with donated arguments"]
           + exact["temps"] + exact["code"])
  for label, value in exact.items():
    _close(_amount(text, label), value, 0.1 * 2**20)
  _close(_amount(text, "memory total per chip:"), total, 0.1 * 2**20)
  assert "of 16.00 GiB HBM" in text and text.count(": fits") == 1
  assert (record["argument_bytes"], record["output_bytes"], record["alias_bytes"],
          record["temp_bytes"], record["code_bytes"], record["live_bytes"]) == (
              exact["arguments"], exact["outputs"], exact["aliased with donated arguments"],
              exact["temps"], exact["code"], total)


@pytest.mark.slow  # ~4 min on 2 cores: the CLI's compiles and the direct ones (pytest -m slow)
def test_train_step_figures_match_a_direct_compile(printed, direct):
  code, out, err = printed
  assert code == 0, err
  assert out.startswith("v5e-4 (v5e:2x2): 4 x TPU v5 lite, per chip 16 GiB HBM")
  text, record = _section(out, "train step"), _records(out)["train step"]
  assert "global batch 16 (4 per chip)" in text and "mesh data 4 x fsdp 1 x tensor 1" in text
  _check_memory(text, record, direct["train"])
  # FLOPs: the loop-corrected count is the fully unrolled program's (depth 2).
  assert record["flops_compiled"] == _flops(direct["train"])
  full = _flops(direct["train_unrolled"])
  assert record["loop_corrected"] and record["flops"] == pytest.approx(full, rel=1e-6)
  assert full > _flops(direct["train"])  # the correction added the block XLA counted once
  _close(_amount(text, "FLOPs per chip per step:"), full, 0)
  assert "loop-corrected" in text and "splash" not in text  # L = 30: XLA attention, no kernel
  model_flops = flops.flops_per_example(direct["var_cfg"]) * 16
  _close(_amount(text, "model FLOPs per step:"), model_flops, 0)
  assert record["model_flops_per_chip"] == model_flops / 4
  # Roofline: max of compute and memory time against v5e's peaks; the MFU ceiling from them.
  peak, bandwidth = aot.CHIPS["v5e"].peak_flops, aot.CHIPS["v5e"].hbm_bandwidth
  roofline = max(full / peak, record["bytes"] / bandwidth)
  assert record["roofline_s"] == pytest.approx(roofline)
  assert record["mfu_ceiling"] == pytest.approx(model_flops / 4 / (roofline * peak))
  assert f"({record['bound']}-bound); MFU ceiling {100 * record['mfu_ceiling']:.1f}%" in text


@pytest.mark.slow  # ~4 min on 2 cores: the CLI's compiles and the direct ones (pytest -m slow)
def test_sampler_figures_match_a_direct_compile(printed, direct):
  code, out, err = printed
  assert code == 0, err
  text, record = _section(out, "sampler"), _records(out)["sampler"]
  assert f"images per call {SAMPLE_BATCH} (2 per chip)" in text
  _check_memory(text, record, direct["sampler"])
  assert record["flops_compiled"] == _flops(direct["sampler"])
  # Every scale's blocks counted: the costs of the program with its block scans fully unrolled.
  unrolled = direct["sampler_unrolled"].cost_analysis()
  unrolled = unrolled[0] if isinstance(unrolled, (list, tuple)) else unrolled
  assert record["loop_corrected"] and record["flops"] > record["flops_compiled"]
  assert record["flops"] == float(unrolled["flops"])
  assert record["bytes"] == float(unrolled["bytes accessed"])
  assert "fully unrolled" in text
  _close(_amount(text, "FLOPs per chip per call:"), record["flops"], 0)
  model_flops = flops.sampler_flops_per_image(direct["var_cfg"])["total"] * SAMPLE_BATCH
  _close(_amount(text, "model FLOPs per call:"), model_flops, 0)
  assert "var_prefix_attention" in text  # the Pallas kernel of the placed sampler
  assert out.rstrip().endswith("fits: the train step and the sampler on v5e-4 with mesh "
                               "{'data': 4, 'fsdp': 1, 'tensor': 1}")


@pytest.mark.parametrize("args, message", [
    (["--topology", "v5e-3"], "No standard v5e slice 'v5e-3'"),
    (["--topology", "v9-8"], "Unknown TPU generation in 'v9-8'"),
    (["--topology", "tpu"], "Topology 'tpu'"),
    (["--config", "configs/no_such.py"], "configs/no_such.py: no such config file"),
    (["--config.no_such_field=1"], "no_such_field"),
    (["--config", "configs/vqvae_tiny.py"], "is not a VAR training config"),
    (["--mesh=3,1,1"], "mesh"),
])
def test_bad_input_is_a_one_line_error(capsys, args, message):
  base = {"--config": CONFIG, "--topology": TOPOLOGY}
  for flag, value in zip(args[::2], args[1::2]):
    if flag in base:
      base[flag] = value
  rest = [a for a in args if a.startswith("--config.") or a.startswith("--mesh=")]
  code, out, err = _run(capsys, *[x for kv in base.items() for x in kv], *rest)
  assert code == 2, (out, err)
  lines = [line for line in err.splitlines() if line.startswith("var-jax aot:")]
  assert len(lines) == 1 and lines[0].startswith("var-jax aot: error: ") and message in lines[0], err


def test_missing_libtpu_is_an_error(capsys, monkeypatch):
  monkeypatch.setattr(aot, "libtpu_available", lambda: False)
  code, _, err = _run(capsys, "--config", CONFIG, "--topology", TOPOLOGY)
  assert code == 2 and err.startswith("var-jax aot: error: libtpu is not installed")


def test_a_program_that_does_not_fit_is_an_error(capsys):
  """A million images per step on one 16 GiB chip: XLA refuses it; no second compile."""
  code, out, err = _run(capsys, "--config", CONFIG, "--topology", "v5e-1", *OVERRIDES,
                        "--batch", str(2**20))
  assert code == 2, (out, err)
  assert "var-jax aot: error: the train step does not fit in the 16 GiB of HBM of a v5e chip" in err
  assert "unrolled by 2" not in err


def test_unknown_flag_exits_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["aot", "--config", CONFIG, "--topology", TOPOLOGY, "--bogus"])
  assert exit_info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_no_mfu_ceiling_without_the_loop_correction(capsys):
  """Without the unroll-2 compile XLA counts one block per scan: the roofline time is too short,
  and an MFU ceiling from it would read far above 100%."""
  code, out, err = _run(capsys, "--config", CONFIG, "--topology", TOPOLOGY, *OVERRIDES,
                        "--no-loop-correction", "--json")
  assert code == 0, err
  text, record = _section(out, "train step"), _records(out)["train step"]
  assert not record["loop_corrected"] and record["mfu_ceiling"] is None
  assert "MFU ceiling" not in text.replace("no MFU ceiling without the loop correction", "")
  assert "no MFU ceiling without the loop correction" in text
