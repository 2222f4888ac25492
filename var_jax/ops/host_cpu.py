"""What this host's CPU can do, for choices that XLA's CPU backend makes too slowly by itself.

`has_amx_bf16`: Intel AMX bfloat16 tiles. Where the CPU has them, XLA runs a batched bf16 matmul
with a float32 result about twice as fast as the same matmul from float32 operands (VAR-d16's
sampling attention: 3.0 vs 5.5 s of a batch-8 call); on a CPU without them (measured: AMD EPYC
with AVX-512 BF16) the bf16 path of those matmuls is several times slower than float32.
"""
from __future__ import annotations

import functools

CPUINFO = "/proc/cpuinfo"


def flags_have_amx_bf16(cpuinfo_text: str) -> bool:
  """Whether a /proc/cpuinfo text lists the `amx_bf16` flag (on its first `flags` line)."""
  for line in cpuinfo_text.splitlines():
    name, _, value = line.partition(":")
    if name.strip() == "flags":
      return "amx_bf16" in value.split()
  return False


@functools.cache
def has_amx_bf16() -> bool:
  """This host's CPU has AMX bf16 tiles (Linux; False where /proc/cpuinfo cannot be read)."""
  try:
    with open(CPUINFO, encoding="utf-8", errors="replace") as f:
      return flags_have_amx_bf16(f.read())
  except OSError:
    return False
