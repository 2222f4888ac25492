"""host_cpu: the AMX flag read from /proc/cpuinfo's text."""
from __future__ import annotations

import pytest

from var_jax.ops import host_cpu

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu vme sse2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 arch_capabilities
bugs\t\t: spectre_v1
"""
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16x
"""


@pytest.mark.parametrize("text, expected", [
    (SAPPHIRE_RAPIDS, True),
    (ZEN4, False),                                   # AVX-512 BF16 alone, and a flag it prefixes
    ("flags\t: amx_tile amx_int8\n", False),         # tiles without bf16
    ("model name\t: Intel amx_bf16 edition\n", False),  # only the flags line counts
    ("", False),
])
def test_flags_have_amx_bf16(text, expected):
  assert host_cpu.flags_have_amx_bf16(text) is expected


def test_has_amx_bf16_reads_the_cpuinfo_file_and_is_false_without_one(monkeypatch, tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text(SAPPHIRE_RAPIDS)
  monkeypatch.setattr(host_cpu, "CPUINFO", str(info))
  host_cpu.has_amx_bf16.cache_clear()
  try:
    assert host_cpu.has_amx_bf16() is True
    monkeypatch.setattr(host_cpu, "CPUINFO", str(tmp_path / "missing"))
    host_cpu.has_amx_bf16.cache_clear()
    assert host_cpu.has_amx_bf16() is False
  finally:
    host_cpu.has_amx_bf16.cache_clear()
