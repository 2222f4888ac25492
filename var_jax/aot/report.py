"""Will a training config fit a TPU slice, and how fast could it run there: its train step (and
sampler) compiled ahead of time for the slice, with the per-chip figures that answer it.

What `var-jax aot` prints and benchmarks/aot_tpu.py builds on. Per compiled program (XLA
describes one chip's partitioned program):

* memory (`memory_analysis()`): arguments, outputs, the outputs aliased with donated arguments,
  temporaries, generated code, and their live total against the chip's HBM;
* FLOPs per chip (`cost_analysis()`): XLA's TPU cost analysis charges a while loop's body once,
  so the program is compiled a second time with the block scan unrolled by 2 and the costs
  corrected (`analysis.loop_corrected`; needs an even depth). The splash training kernel declares
  no cost estimate, so its attention FLOPs are added analytically
  (`flops.kernel_attention_flops_per_example`);
* model FLOPs (`var_jax.models.flops`: the trainer's MFU numerator; for the sampler the
  transformer's matmuls, the decode left out) and the roofline: max(FLOPs / peak FLOP/s,
  bytes / HBM bandwidth) per chip, compute- or memory-bound, and the MFU ceiling it implies.

A program XLA refuses for the chip's HBM raises `DoesNotFitError`.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import ml_collections
from jax.sharding import Mesh

from var_jax.aot import analysis, compile as aot_compile
from var_jax.aot.analysis import Analysis
from var_jax.aot.compile import CompiledProgram
from var_jax.aot.topologies import ChipSpec
from var_jax.errors import ConfigError
from var_jax.inference import placement
from var_jax.inference.bound import SamplerBound
from var_jax.inference.var_model import VARModel
from var_jax.models import flops as var_flops
from var_jax.models.var_config import VARConfig
from var_jax.models.vqvae_config import VQVAEConfig

TRAIN_STEP = "train step"
SAMPLER = "sampler"


class DoesNotFitError(ConfigError):
  """XLA refused to compile the program: its buffers exceed the chip's HBM."""


@dataclasses.dataclass(frozen=True)
class ProgramReport:
  """A compiled program's per-chip figures.

  Attributes:
    kind: TRAIN_STEP or SAMPLER.
    program: the compiled program (its mesh, batch, params, model FLOPs over all chips).
    chip: the chip's figures.
    as_compiled: `analysis.analyze` of the program as it runs (its memory is the answer to
      "does it fit").
    cost: the costs the roofline uses: `as_compiled`'s, loop-corrected where `loop_corrected`,
      plus `kernel_flops`.
    kernel_flops: FLOPs per chip counted analytically for kernels that declare none to XLA
      (splash attention in training), included in `cost.flops`.
    loop_corrected: whether `cost` counts every block: the train step's from the unroll-2
      correction (`analysis.loop_corrected`), the sampler's from its fully unrolled program.
    cost_note: how the costs were obtained, for the printed lines.
    unroll_compile_s: seconds of that second compile (None without it).
    unrolled: the program of that second compile (the sampler with its block scans fully
      unrolled, the train step's unrolled by 2), or None without it.
  """
  kind: str
  program: CompiledProgram
  chip: ChipSpec
  as_compiled: Analysis
  cost: Analysis
  kernel_flops: float
  loop_corrected: bool
  cost_note: str
  unroll_compile_s: float | None
  unrolled: CompiledProgram | None = None

  @property
  def chips(self) -> int:
    return self.program.mesh.devices.size

  @property
  def batch_per_chip(self) -> int:
    """Examples each chip runs: the batch split over ("data", "fsdp"), padded up for the sampler."""
    return -(-self.program.batch // placement.batch_shards(self.program.mesh))

  @property
  def fits(self) -> bool:
    return self.as_compiled.fits

  @property
  def model_flops_per_chip(self) -> float | None:
    flops = self.program.model_flops
    return None if flops is None else flops / self.chips

  @property
  def mfu_ceiling(self) -> float | None:
    """Model FLOPs / (roofline time x peak); None without model FLOPs or without the loop
    correction (XLA then counts one block per scan, the roofline time is too short and the
    ceiling comes out far above 100%)."""
    flops = self.program.model_flops
    if flops is None or not self.loop_corrected:
      return None
    return analysis.mfu_ceiling(flops, self.chips, self.cost)

  def lines(self) -> list[str]:
    """The figures as printed by `var-jax aot`, one string per line."""
    p, a, c = self.program, self.as_compiled, self.cost
    mesh = " x ".join(f"{name} {size}" for name, size in p.mesh.shape.items())
    kind = p.mesh.devices.flat[0].device_kind
    what = "global batch" if self.kind == TRAIN_STEP else "images per call"
    cfg = p.var_config
    out = [f"{self.kind}: VAR-d{cfg.depth}, {p.num_params / 1e6:.1f} M params, {cfg.image_size} px, "
           f"{what} {p.batch} ({self.batch_per_chip} per chip), {cfg.dtype}, mesh {mesh} over "
           f"{self.chips} x {kind}; compiled in {p.lower_s + p.compile_s:.1f} s",
           f"  memory per chip: arguments {format_bytes(a.argument_bytes)}, outputs "
           f"{format_bytes(a.output_bytes)} (aliased with donated arguments "
           f"{format_bytes(a.alias_bytes)}), temps {format_bytes(a.temp_bytes)}, code "
           f"{format_bytes(a.code_bytes)}",
           f"  memory total per chip: {format_bytes(a.peak_bytes)} of {format_bytes(a.hbm_bytes)} "
           f"HBM ({100 * a.peak_bytes / a.hbm_bytes:.1f}%; arguments + outputs - aliased + temps "
           f"+ code): {'fits' if a.fits else 'DOES NOT FIT'}"]
    per = "step" if self.kind == TRAIN_STEP else "call"
    kernel = (f", incl. {format_flops(self.kernel_flops)} of splash attention counted analytically"
              if self.kernel_flops else "")
    out.append(f"  FLOPs per chip per {per}: {format_flops(c.flops)} ({self.cost_note}{kernel}); "
               f"{format_bytes(c.bytes_accessed)} accessed")
    if p.model_flops is not None:
      counted = ("var_jax.models.flops, the trainer's MFU count" if self.kind == TRAIN_STEP else
                 "var_jax.models.flops, transformer matmuls; the decode not counted")
      out.append(f"  model FLOPs per {per}: {format_flops(p.model_flops)}, "
                 f"{format_flops(self.model_flops_per_chip)} per chip ({counted})")
    roofline = (f"  roofline per chip: compute {format_seconds(c.compute_s)}, memory "
                f"{format_seconds(c.memory_s)} -> {format_seconds(c.roofline_s)} per {per} "
                f"({c.bound}-bound)")
    if self.mfu_ceiling is not None:
      roofline += f"; MFU ceiling {100 * self.mfu_ceiling:.1f}%"
    elif p.model_flops is not None:
      roofline += "; no MFU ceiling without the loop correction"
    out.append(roofline + f"; <= {p.batch / c.roofline_s:,.0f} images/s")
    kernels = ", ".join(f"{name} x{count}" for name, count in a.kernels) or "none"
    out.append(f"  Mosaic kernels: {kernels}")
    return out

  def record(self) -> dict[str, Any]:
    """The figures as a JSON-able dict (bytes, FLOPs and seconds per chip unless named)."""
    p, a, c = self.program, self.as_compiled, self.cost
    return dict(
        kind=self.kind, chips=self.chips, device_kind=p.mesh.devices.flat[0].device_kind,
        mesh=dict(p.mesh.shape), batch=p.batch, batch_per_chip=self.batch_per_chip,
        params=p.num_params, dtype=p.var_config.dtype, lower_s=p.lower_s,
        compile_s=p.compile_s, unroll_compile_s=self.unroll_compile_s,
        mosaic_calls=a.mosaic_calls, kernels=dict(a.kernels),
        argument_bytes=a.argument_bytes, output_bytes=a.output_bytes, alias_bytes=a.alias_bytes,
        temp_bytes=a.temp_bytes, code_bytes=a.code_bytes, live_bytes=a.peak_bytes,
        hbm_bytes=a.hbm_bytes, fits=a.fits,
        flops_compiled=a.flops, bytes_compiled=a.bytes_accessed,
        loop_corrected=self.loop_corrected, flops=c.flops, bytes=c.bytes_accessed,
        kernel_flops_added=self.kernel_flops,
        model_flops=p.model_flops, model_flops_per_chip=self.model_flops_per_chip,
        compute_s=c.compute_s, memory_s=c.memory_s, roofline_s=c.roofline_s, bound=c.bound,
        mfu_ceiling=self.mfu_ceiling, cost_model_s=c.optimal_s)


def format_bytes(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_flops(n: float) -> str:
  for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
    if n >= scale:
      return f"{n / scale:.4g} {unit}"
  return f"{n / 1e6:.4g} MFLOP"


def format_seconds(s: float) -> str:
  return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"


def _compile(compile_fn: Callable[[int], CompiledProgram], unroll: int, what: str,
             chip: ChipSpec) -> CompiledProgram:
  try:
    return compile_fn(unroll)
  except jax.errors.JaxRuntimeError as err:
    if "RESOURCE_EXHAUSTED" not in str(err):
      raise
    first = str(err).strip().splitlines()[0]
    raise DoesNotFitError(f"the {what} does not fit in the {chip.hbm_bytes / 2**30:.0f} GiB of HBM "
                          f"of a {chip.generation} chip (XLA: {first}); a smaller batch per chip, "
                          "the weights split over fsdp or tensor, or a remat policy "
                          "(model.remat_policy) needs less") from None


def _report(kind: str, compile_fn: Callable[[int], CompiledProgram], chip: ChipSpec,
            loop_correction: bool, kernel_flops: Callable[[Analysis, CompiledProgram], float],
            log: Callable[[str], None] | None) -> ProgramReport:
  log = log or (lambda _: None)
  program = _compile(compile_fn, 1, kind, chip)
  raw = analysis.analyze(program.compiled, chip)
  log(f"compiled the {kind} in {program.lower_s + program.compile_s:.1f} s")
  depth = program.var_config.depth
  cost, corrected, unroll_s, unrolled_program = raw, False, None, None
  if not raw.fits:
    note = "as compiled, scanned blocks counted once; no correction for a program that does not fit"
  elif not loop_correction:
    note = "as compiled: XLA counts each scanned block once"
  elif depth % 2 and kind != SAMPLER:
    note = f"as compiled: XLA counts each scanned block once; depth {depth} is odd, no correction"
  else:
    # The sampler (no gradients) unrolls its block scans fully: the unroll-2 correction charges
    # (depth - 1) times whatever XLA decides differently outside the loops between its two
    # compiles. For VAR-d16's sampler (bf16, 2 images, one v5e chip, slim tokenizer) XLA staged a
    # different set of weight stacks into VMEM in each, which moved the corrected bytes to
    # 15.2 GB in one build and 20.7 GB in the next, against 16.4 and 14.7 GB fully unrolled.
    unroll = depth if kind == SAMPLER else 2
    log(f"compiling the {kind} again with the block scan unrolled by {unroll}, to count every block")
    t0 = time.perf_counter()
    try:
      unrolled_program = _compile(compile_fn, unroll, kind, chip)
      unrolled = analysis.analyze(unrolled_program.compiled, chip)
    except DoesNotFitError:
      note = (f"as compiled: XLA counts each scanned block once; the unroll-{unroll} compile did "
              "not fit")
    else:
      unroll_s = time.perf_counter() - t0
      if kind == SAMPLER:
        cost = dataclasses.replace(raw, flops=unrolled.flops, bytes_accessed=unrolled.bytes_accessed,
                                   transcendentals=unrolled.transcendentals,
                                   optimal_s=unrolled.optimal_s)
        note = ("XLA cost analysis of the program with the block scans fully unrolled (each step's "
                "weights indexed from the whole stack)")
      else:
        cost = analysis.loop_corrected(raw, unrolled, depth)
        note = "XLA cost analysis, loop-corrected"
      corrected = True
  added = kernel_flops(raw, program)
  cost = dataclasses.replace(cost, flops=cost.flops + added)
  return ProgramReport(kind, program, chip, raw, cost, added, corrected, note, unroll_s,
                       unrolled_program)


def train_step_report(config: ml_collections.ConfigDict, mesh: Mesh, chip: ChipSpec, *,
                      global_batch: int | None = None, loop_correction: bool = True,
                      log: Callable[[str], None] | None = None) -> ProgramReport:
  """The train step of `config` (`compile.compile_train_step`) compiled for `mesh` and its figures.

  Args:
    config: a VAR training config; `config.mesh` is ignored in favour of `mesh`.
    mesh: e.g. `topologies.topology_mesh("v5p-128", config.mesh)`.
    chip: the mesh's chip (`topologies.chip_spec`).
    global_batch: images per step; default `config.global_batch_size`.
    loop_correction: compile a second time with the block scan unrolled by 2 for exact FLOPs.
    log: called with a progress line before and after each compile.

  Raises:
    DoesNotFitError: XLA refused the program for the chip's HBM.
  """
  def compile_fn(unroll):
    return aot_compile.compile_train_step(config, mesh, global_batch=global_batch, unroll=unroll)

  def splash_flops(raw: Analysis, program: CompiledProgram) -> float:
    if not analysis.uses_kernel(raw, "splash"):
      return 0.0
    var_cfg = program.var_config
    per_example = var_flops.kernel_attention_flops_per_example(
        var_cfg, remat=var_cfg.remat_policy != "none")
    return per_example * program.batch / program.mesh.devices.size

  return _report(TRAIN_STEP, compile_fn, chip, loop_correction, splash_flops, log)


def sampler_report(var_cfg: VARConfig, vae_cfg: VQVAEConfig, mesh: Mesh, chip: ChipSpec,
                   batch: int, *, loop_correction: bool = True, model: VARModel | None = None,
                   log: Callable[[str], None] | None = None) -> ProgramReport:
  """`var_jax.sample` of `batch` labels on `mesh` (`compile.compile_sampler`, through
  `lower_sample`: the public call's placement) compiled and its figures. Arguments as
  `train_step_report`; `model` defaults to `compile.abstract_model(var_cfg, vae_cfg)`."""
  model = aot_compile.abstract_model(var_cfg, vae_cfg) if model is None else model

  def compile_fn(unroll):
    return aot_compile.compile_sampler(var_cfg, vae_cfg, mesh, batch, unroll=unroll, model=model)

  return _report(SAMPLER, compile_fn, chip, loop_correction, lambda raw, program: 0.0, log)


def sampler_bound(model: VARModel, mesh: Mesh, chip: ChipSpec, batch: int, *,
                  guidance: bool = True) -> SamplerBound:
  """The true bound per chip of `var_jax.sample(model, batch labels, mesh=mesh)` on `chip`
  (`var_jax.inference.bound`): the batch padded and split over the mesh's batch axes, the weights
  stored in the compute dtypes and replicated; a "tensor" axis shares each chip's work, so the
  bound is divided by its size (still a lower bound)."""
  per_chip = placement.padded_size(batch, mesh) // placement.batch_shards(mesh)
  bound = SamplerBound.for_model(model, per_chip, peak_flops=chip.peak_flops,
                                 bandwidth=chip.hbm_bandwidth, guidance=guidance, platform="tpu")
  tensor = mesh.shape.get("tensor", 1)
  return dataclasses.replace(
      bound, peak_flops=bound.peak_flops * tensor, bandwidth=bound.bandwidth * tensor,
      decoder_peak_flops=(None if bound.decoder_peak_flops is None
                          else bound.decoder_peak_flops * tensor))

