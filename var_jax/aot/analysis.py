"""Per-chip figures of a compiled TPU program: memory, cost, the Mosaic kernels it calls, roofline.

`analyze` reads XLA's `memory_analysis()` and `cost_analysis()` of one device's partitioned
program. XLA's TPU cost analysis charges a while loop's body once, so the scanned blocks are
counted once rather than depth times; `loop_corrected` fixes that from a second compile with the
block scan unrolled by 2 (`compile.scan_unroll`). The roofline is max(FLOPs / peak FLOP/s,
bytes / HBM bandwidth) against the chip's figures (`topologies.CHIPS`). Analytic FLOPs (model,
attention kernel, sampler) are `var_jax.models.flops`'s; the sampler's least work is
`var_jax.inference.bound`'s.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from var_jax.aot.topologies import ChipSpec
from var_jax.errors import ConfigError

MOSAIC_CALL = "tpu_custom_call"  # the HLO custom-call target of a Pallas TPU (Mosaic) kernel


@dataclasses.dataclass(frozen=True)
class Analysis:
  """Per-chip figures of a compiled SPMD program (XLA describes one device's partitioned program).

  Attributes:
    argument_bytes, output_bytes, alias_bytes, temp_bytes, code_bytes: `memory_analysis()`.
    peak_bytes: argument + output - alias + temp + code: live HBM at the program's peak, an
      upper bound that counts donated outputs once.
    hbm_bytes: the chip's HBM.
    flops, bytes_accessed, transcendentals: `cost_analysis()`; Pallas calls count only what their
      CostEstimate declares (splash declares nothing).
    optimal_s: the TPU cost model's time estimate (-1 where it has none).
    mosaic_calls: Mosaic (Pallas TPU) custom-call sites in the optimized HLO.
    kernels: ((kernel name, call sites), ...) of those: ours (splash_mha_*, var_prefix_attention)
      and any XLA emits itself (e.g. "online-softmax" for a softmax feeding a matmul).
    peak_flops, hbm_bandwidth: the chip's peaks.
  """
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  hbm_bytes: int
  flops: float
  bytes_accessed: float
  transcendentals: float
  optimal_s: float
  mosaic_calls: int
  peak_flops: float
  hbm_bandwidth: float
  kernels: tuple[tuple[str, int], ...] = ()

  @property
  def peak_bytes(self) -> int:
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.hbm_bytes

  @property
  def compute_s(self) -> float:
    return self.flops / self.peak_flops

  @property
  def memory_s(self) -> float:
    return self.bytes_accessed / self.hbm_bandwidth

  @property
  def roofline_s(self) -> float:
    """max(flops / peak FLOP/s, bytes / HBM bandwidth): a lower bound on one call's time."""
    return max(self.compute_s, self.memory_s)

  @property
  def bound(self) -> str:
    return "compute" if self.compute_s >= self.memory_s else "memory"


def analyze(compiled: Any, chip: ChipSpec) -> Analysis:
  """Per-chip memory and cost figures of `compiled` for `chip`."""
  memory = compiled.memory_analysis()
  if isinstance(memory, (list, tuple)):
    memory = memory[0]
  if memory is None:
    raise RuntimeError("memory_analysis() returned None for this executable.")
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return Analysis(
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      code_bytes=int(memory.generated_code_size_in_bytes),
      hbm_bytes=chip.hbm_bytes,
      flops=float(cost.get("flops", 0.0)),
      bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      transcendentals=float(cost.get("transcendentals", 0.0)),
      optimal_s=float(cost.get("optimal_seconds", -1.0)),
      mosaic_calls=compiled.as_text().count(MOSAIC_CALL),
      peak_flops=chip.peak_flops,
      hbm_bandwidth=chip.hbm_bandwidth,
      kernels=tuple(sorted(mosaic_kernels(compiled).items())),
  )


def mosaic_kernels(compiled: Any) -> dict[str, int]:
  """{kernel name: call sites} of the Mosaic custom calls in `compiled`'s optimized HLO.

  The name is the HLO instruction's without its ".N" suffix: "splash_mha_fwd_residuals",
  "var_prefix_attention", or XLA's own "online-softmax".
  """
  counts: dict[str, int] = {}
  for line in compiled.as_text().splitlines():
    if f'custom_call_target="{MOSAIC_CALL}"' not in line:
      continue
    name = re.sub(r"\.\d+$", "", line.split("=", 1)[0].strip().lstrip("%"))
    counts[name] = counts.get(name, 0) + 1
  return counts


def uses_kernel(analysis: Analysis, prefix: str) -> bool:
  """Whether a Mosaic kernel whose name starts with `prefix` (e.g. "splash") is called."""
  return any(name.startswith(prefix) for name, _ in analysis.kernels)


def loop_corrected(looped: Analysis, unrolled2: Analysis, trips: int) -> Analysis:
  """Costs of a program whose scanned blocks XLA's cost analysis counted only once.

  The TPU `cost_analysis()` charges a while loop's body once, whatever its trip count. With the
  same program compiled with the block scan unrolled by 2 (`unroll=2`; every loop body then holds
  two blocks), the difference of the two analyses is one trip of every block loop (the forward
  and backward loops of training; the loop of each sampled scale). Adding (trips - 1) of it gives
  the full program. Memory figures stay those of `looped`, the real program.

  Args:
    looped: analysis of the program as it runs (unroll=1).
    unrolled2: analysis of the same program compiled with unroll=2.
    trips: the scans' length (the model depth; must be even for unroll=2 to divide it).
  """
  if trips % 2:
    raise ConfigError(f"loop_corrected needs an even trip count (depth), got {trips}.")
  def full(name: str) -> float:
    once, twice = getattr(looped, name), getattr(unrolled2, name)
    return once + (trips - 1) * (twice - once)

  optimal = full("optimal_s") if looped.optimal_s >= 0 and unrolled2.optimal_s >= 0 else -1.0
  return dataclasses.replace(looped, flops=full("flops"), bytes_accessed=full("bytes_accessed"),
                             transcendentals=full("transcendentals"), optimal_s=optimal)


def while_loops(compiled: Any) -> int:
  """Number of while loops in the optimized HLO of `compiled`."""
  return sum(" while(" in line for line in compiled.as_text().splitlines())


def mfu_ceiling(model_flops: float, num_chips: int, analysis: Analysis) -> float:
  """Model FLOPs per chip / (roofline time x peak FLOP/s): the best MFU the program allows."""
  return model_flops / num_chips / (analysis.roofline_s * analysis.peak_flops)
