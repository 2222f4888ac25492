"""Ahead-of-time TPU compilation on a machine without TPUs: meshes, the VAR train step, the sampler.

libtpu's compile-only client hands out device objects for any TPU slice. A jit lowered with
shardings over them is partitioned, fused, given its Mosaic (Pallas) kernels and memory-planned
exactly as on that slice, but never run. Needs libtpu (the `tpu` extra), no TPU.

* `topologies`: chip figures (`CHIPS`), slice names ("v5e:4x4", "v5p-128", "v5litepod-16"),
  the compile-only devices and a ("data", "fsdp", "tensor") mesh over them (`topology_mesh`).
* `compile`: the train step of a VAR training config (`compile_train_step`), the lowered
  `var_jax.sample` / `var_jax.edit` programs (`lower_sample`, `lower_edit`, `compile_sampler`)
  and the tokenizer decode, all from abstract inputs.
* `analysis`: per-chip memory and cost of a compiled program (`analyze`), its Mosaic kernels, the
  loop correction of XLA's cost analysis, the roofline and MFU ceiling.
* `report`: a training config's train step (and sampler) compiled for a slice with those figures
  (`train_step_report`, `sampler_report`): what `var-jax aot` prints, benchmarks/aot_tpu.py too.

FLOPs counted analytically (the MFU numerator, the splash kernel's attention, the sampler's
matmuls) come from `var_jax.models.flops`.
"""
from var_jax.aot.analysis import (MOSAIC_CALL, Analysis, analyze, loop_corrected, mfu_ceiling,
                                  mosaic_kernels, uses_kernel, while_loops)
from var_jax.aot.compile import (CompiledProgram, abstract_batch, abstract_key, abstract_model,
                                 abstract_tokenizer_params, compile_decoder, compile_sampler,
                                 compile_train_step, lower_edit, lower_sample, replicated,
                                 scan_unroll, tokenizer_config)
from var_jax.aot.topologies import (CHIPS, GIB, ChipSpec, chip_spec, libtpu_available,
                                    mesh_config, parse_topology, topology_devices, topology_mesh)
from var_jax.aot.report import (DoesNotFitError, ProgramReport, sampler_bound, sampler_report,
                                train_step_report)

__all__ = [
    "Analysis", "CHIPS", "ChipSpec", "CompiledProgram", "DoesNotFitError", "GIB", "MOSAIC_CALL",
    "ProgramReport", "abstract_batch", "abstract_key", "abstract_model",
    "abstract_tokenizer_params", "analyze", "chip_spec", "compile_decoder", "compile_sampler",
    "compile_train_step", "libtpu_available", "loop_corrected", "lower_edit", "lower_sample",
    "mesh_config", "mfu_ceiling", "mosaic_kernels", "parse_topology", "replicated",
    "sampler_bound", "sampler_report", "scan_unroll", "tokenizer_config", "topology_devices",
    "topology_mesh", "train_step_report", "uses_kernel", "while_loops",
]
