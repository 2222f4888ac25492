"""Tests of var_jax.checkpoints.torch_pickle: reading torch.save files with neither torch nor running code.

Odd and malicious files are assembled here by hand (zip + protocol-2 pickle, the layout torch.save
uses), so these tests need no torch. The cross-checks against torch.load skip when torch is absent.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import zipfile
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from var_jax import errors, scales
from var_jax.checkpoints.torch_pickle import load_torch_checkpoint

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PATCH_NUMS = (1, 2, 3, 4)
VAR_FIXTURES = ("official_tiny_seed0", "official_tiny_saln_seed0")


# ------------------------------------------------------------------------------------------------
# A tiny pickle assembler (protocol 2, the opcodes torch.save emits) and a zip writer.


@dataclasses.dataclass(frozen=True)
class Global:
  """GLOBAL opcode: push module.name."""
  module: str
  name: str


@dataclasses.dataclass(frozen=True)
class Reduce:
  """Push func(*args) via REDUCE."""
  func: Any
  args: tuple


@dataclasses.dataclass(frozen=True)
class PersId:
  """BINPERSID opcode: push persistent_load(pid)."""
  pid: tuple


@dataclasses.dataclass(frozen=True)
class Build:
  """Push `target`, then BUILD it with `state`."""
  target: Any
  state: Any


class Memo:
  """A container pushed once (BINPUT) and referred to again with BINGET, to make cycles."""

  def __init__(self, index: int, items: dict):
    self.index = index
    self.items = items


@dataclasses.dataclass(frozen=True)
class Get:
  """BINGET opcode: push memo entry `index`."""
  index: int


def _emit(obj: Any, out: bytearray) -> None:
  if isinstance(obj, Global):
    out += b"c" + f"{obj.module}\n{obj.name}\n".encode()
  elif isinstance(obj, Reduce):
    _emit(obj.func, out)
    _emit(obj.args, out)
    out += b"R"
  elif isinstance(obj, PersId):
    _emit(obj.pid, out)
    out += b"Q"
  elif isinstance(obj, Build):
    _emit(obj.target, out)
    _emit(obj.state, out)
    out += b"b"
  elif isinstance(obj, Memo):
    out += b"}" + b"q" + bytes([obj.index]) + b"("
    for k, v in obj.items.items():
      _emit(k, out)
      _emit(v, out)
    out += b"u"
  elif isinstance(obj, Get):
    out += b"h" + bytes([obj.index])
  elif obj is None:
    out += b"N"
  elif isinstance(obj, bool):
    out += b"\x88" if obj else b"\x89"
  elif isinstance(obj, int):
    out += b"J" + struct.pack("<i", obj)
  elif isinstance(obj, str):
    data = obj.encode()
    out += b"X" + struct.pack("<I", len(data)) + data
  elif isinstance(obj, tuple):
    out += b"("
    for item in obj:
      _emit(item, out)
    out += b"t"
  elif isinstance(obj, list):
    out += b"]("
    for item in obj:
      _emit(item, out)
    out += b"e"
  elif isinstance(obj, dict):
    out += b"}("
    for k, v in obj.items():
      _emit(k, out)
      _emit(v, out)
    out += b"u"
  else:
    raise TypeError(f"the test assembler cannot emit {type(obj).__name__}")


def assemble(obj: Any) -> bytes:
  out = bytearray(b"\x80\x02")
  _emit(obj, out)
  return bytes(out + b".")


def empty_hooks() -> Reduce:
  return Reduce(Global("collections", "OrderedDict"), ())


def tensor(storage_type: str, key: str, numel: int, size: tuple, stride: tuple, offset: int = 0,
           metadata: dict | None = None) -> Reduce:
  """The pickle of torch._utils._rebuild_tensor_v2 over storage `key`, as torch writes it."""
  storage = PersId(("storage", Global("torch", storage_type), key, "cpu", numel))
  args = (storage, offset, size, stride, False, empty_hooks())
  if metadata is not None:
    args += (metadata,)
  return Reduce(Global("torch._utils", "_rebuild_tensor_v2"), args)


def write_checkpoint(path: pathlib.Path, pickled: bytes, storages: dict[str, bytes],
                     byteorder: str | None = "little", with_data_pkl: bool = True) -> pathlib.Path:
  """A zip laid out like torch.save's: archive/data.pkl, archive/byteorder, archive/data/<key>."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    if with_data_pkl:
      z.writestr("archive/data.pkl", pickled)
    z.writestr("archive/.format_version", "1")
    if byteorder is not None:
      z.writestr("archive/byteorder", byteorder)
    for key, data in storages.items():
      z.writestr(f"archive/data/{key}", data)
    z.writestr("archive/version", "3\n")
  return path


def rewrite_zip(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
  """Copies the zip `src` to `dst`, passing each (name, bytes) through `edit` (None drops it)."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
    for name in zin.namelist():
      data = edit(name, zin.read(name))
      if data is not None:
        zout.writestr(name, data)
  return dst


# ------------------------------------------------------------------------------------------------
# The official fixtures.


def test_vae_fixture_loads_all_float32_entries(fixtures_dir):
  sd = load_torch_checkpoint(fixtures_dir / "official_tiny_vae.pth")
  assert len(sd) == 324
  assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in sd.values())
  hits = sd["quantize.ema_vocab_hit_SV"]
  assert hits.shape == (4, 64)
  assert not hits.any()
  assert sd["quantize.embedding.weight"].shape == (64, 8)
  assert sd["decoder.conv_out.weight"].shape == (3, 32, 3, 3)
  assert all(v.flags.c_contiguous and v.flags.writeable for v in sd.values())


@pytest.mark.parametrize("name", VAR_FIXTURES)
def test_var_fixture_entries_shapes_and_dtypes(fixtures_dir, name):
  sd = load_torch_checkpoint(fixtures_dir / f"{name}_var.pth")
  assert len(sd) == 38
  assert {k for k, v in sd.items() if v.dtype != np.float32} == {"lvl_1L"}
  assert sd["lvl_1L"].dtype == np.int64
  assert sd["pos_1LC"].shape == (1, 30, 128)
  assert sd["head.weight"].shape == (64, 128)
  if "saln" in name:
    assert sd["shared_ada_lin.1.weight"].shape == (768, 128)
    assert sd["shared_ada_lin.1.bias"].shape == (768,)
    assert sd["blocks.0.ada_gss"].shape == (1, 1, 6, 128)
    assert not any(k.startswith("blocks.") and ".ada_lin." in k for k in sd)
  else:
    assert sd["blocks.1.ada_lin.1.weight"].shape == (768, 128)
  # Every parameter the reference generator differentiated has the shape of its gradient.
  with np.load(fixtures_dir / f"{name}.npz") as ref:
    grads = {k[len("grad/var/"):]: ref[k] for k in ref.files if k.startswith("grad/var/")}
    np.testing.assert_array_equal(sd["attn_bias_for_masking"], ref["attn_bias_for_masking"])
    np.testing.assert_array_equal(sd["lvl_1L"], ref["lvl_1L"])
  assert grads
  for key, grad in grads.items():
    assert sd[key].shape == grad.shape, key


@pytest.mark.parametrize("name", VAR_FIXTURES)
def test_var_fixture_buffers_match_the_token_layout(fixtures_dir, name):
  sd = load_torch_checkpoint(fixtures_dir / f"{name}_var.pth")
  np.testing.assert_array_equal(sd["lvl_1L"], scales.scale_ids(PATCH_NUMS)[None, :])
  bias = sd["attn_bias_for_masking"]
  assert bias.shape == (1, 1, 30, 30)
  mask = scales.block_causal_mask(PATCH_NUMS)
  assert np.all(bias[0, 0][mask] == 0)
  assert np.all(np.isneginf(bias[0, 0][~mask]))
  zero_k = [k for k in sd if k.endswith("attn.zero_k_bias")]
  assert zero_k == ["blocks.0.attn.zero_k_bias", "blocks.1.attn.zero_k_bias"]
  for key in zero_k:
    assert sd[key].shape == (128,)
    assert not sd[key].any()


def test_open_binary_file_object_gives_the_same_arrays_and_stays_open(fixtures_dir):
  path = fixtures_dir / "official_tiny_seed0_var.pth"
  by_path = load_torch_checkpoint(path)
  with open(path, "rb") as f:
    by_file = load_torch_checkpoint(f)
    assert not f.closed
  assert list(by_file) == list(by_path)
  for key in by_path:
    np.testing.assert_array_equal(by_file[key], by_path[key])


def test_loading_does_not_import_torch(fixtures_dir):
  code = (
      "import sys\n"
      "from var_jax.checkpoints.torch_pickle import load_torch_checkpoint\n"
      f"sd = load_torch_checkpoint({str(fixtures_dir / 'official_tiny_seed0_var.pth')!r})\n"
      "assert len(sd) == 38, len(sd)\n"
      "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
      "assert not loaded, loaded\n"
      "print('ok')\n")
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "ok"


# ------------------------------------------------------------------------------------------------
# Hand-built files: layout details.


def test_strided_offset_bf16_and_nested_keys_without_torch(tmp_path):
  base = np.arange(24, dtype=np.float32)
  bf16 = np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16)
  sd = {
      "model": {
          # A transposed slice: rows 1.. and columns 2.. of a 4x6 matrix, then .t().
          "view": tensor("FloatStorage", "0", 24, (4, 3), (1, 6), offset=8),
          "full": tensor("FloatStorage", "0", 24, (4, 6), (6, 1)),
          "expanded": tensor("FloatStorage", "0", 24, (2, 3), (0, 1), offset=5),
          "scalar": tensor("FloatStorage", "0", 24, (), (), offset=23),
          "empty": tensor("FloatStorage", "0", 24, (0, 5), (5, 1)),
          "layers": [tensor("BFloat16Storage", "1", 3, (3,), (1,)), 7],
      },
      "step": 1000,
      "name": "var",
      "nothing": None,
  }
  path = write_checkpoint(tmp_path / "c.pth", assemble(sd),
                          {"0": base.tobytes(), "1": bf16.tobytes()})
  out = load_torch_checkpoint(path)
  assert list(out) == ["model.view", "model.full", "model.expanded", "model.scalar", "model.empty",
                       "model.layers.0"]
  grid = base.reshape(4, 6)
  np.testing.assert_array_equal(out["model.view"], grid[1:, 2:].T)
  np.testing.assert_array_equal(out["model.full"], grid)
  np.testing.assert_array_equal(out["model.expanded"], np.broadcast_to(base[5:8], (2, 3)))
  assert out["model.scalar"].shape == () and out["model.scalar"] == 23
  assert out["model.empty"].shape == (0, 5)
  assert out["model.layers.0"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(out["model.layers.0"].view(np.uint16), bf16.view(np.uint16))
  # Arrays are independent copies: writing one leaves the others intact.
  out["model.full"][:] = -1
  np.testing.assert_array_equal(out["model.view"], grid[1:, 2:].T)


def test_big_endian_file_is_converted_to_native(tmp_path):
  values = np.array([1.0, -2.5, 3e-8], dtype=np.float32)
  ids = np.array([1, -2, 2**40], dtype=np.int64)
  sd = {"w": tensor("FloatStorage", "0", 3, (3,), (1,)),
        "i": tensor("LongStorage", "1", 3, (3,), (1,))}
  path = write_checkpoint(tmp_path / "be.pth", assemble(sd),
                          {"0": values.astype(">f4").tobytes(), "1": ids.astype(">i8").tobytes()},
                          byteorder="big")
  out = load_torch_checkpoint(path)
  np.testing.assert_array_equal(out["w"], values)
  np.testing.assert_array_equal(out["i"], ids)
  assert out["w"].dtype.isnative and out["i"].dtype.isnative


def test_missing_byteorder_record_means_little_endian(tmp_path):
  values = np.array([0.25, 7.0], dtype="<f4")
  path = write_checkpoint(tmp_path / "old.pth", assemble({"w": tensor("FloatStorage", "0", 2,
                                                                       (2,), (1,))}),
                          {"0": values.tobytes()}, byteorder=None)
  np.testing.assert_array_equal(load_torch_checkpoint(path)["w"], values)


# ------------------------------------------------------------------------------------------------
# Malicious pickles: refused before anything runs.


def _os_system_pickle(marker: pathlib.Path) -> bytes:
  command = f"touch '{marker}'"
  return assemble(Reduce(Global("os", "system"), (command,)))


def _eval_inside_state_dict_pickle(marker: pathlib.Path) -> bytes:
  # A real tensor first, then builtins.eval via STACK_GLOBAL (protocol 4), as a dict value.
  payload = f"open({str(marker)!r}, 'w').write('x')"
  head = assemble({"ok": tensor("FloatStorage", "0", 2, (2,), (1,))})[:-2]  # Drop SETITEMS, STOP.
  evil = bytearray()
  _emit("evil", evil)
  _emit("builtins", evil)
  _emit("eval", evil)
  evil += b"\x93"  # STACK_GLOBAL.
  _emit((payload,), evil)
  evil += b"R"
  return head + bytes(evil) + b"u."


def _inst_pickle(marker: pathlib.Path) -> bytes:
  # Protocol 0 INST opcode: subprocess.call(['touch', marker]).
  out = bytearray(b"(")
  _emit(["touch", str(marker)], out)
  return bytes(out + b"isubprocess\ncall\n.")


@pytest.mark.parametrize("make_pickle,asked_for", [
    (_os_system_pickle, "os.system"),
    (_eval_inside_state_dict_pickle, "builtins.eval"),
    (_inst_pickle, "subprocess.call"),
])
def test_malicious_pickle_is_refused_without_side_effect(tmp_path, make_pickle, asked_for):
  marker = tmp_path / "pwned"
  pickled = make_pickle(marker)

  # The payload is a well-formed pickle that really asks for the global and calls it.
  calls = []

  class Recording(pickle.Unpickler):

    def find_class(self, module, name):
      return lambda *args: calls.append((f"{module}.{name}", args))

    def persistent_load(self, pid):
      return pid

  Recording(__import__("io").BytesIO(pickled)).load()
  assert any(called == asked_for for called, _ in calls)

  path = write_checkpoint(tmp_path / "evil.pth", pickled,
                          {"0": np.zeros(2, np.float32).tobytes()})
  with pytest.raises(errors.UnsafeCheckpointError) as info:
    load_torch_checkpoint(path)
  message = str(info.value)
  assert asked_for in message
  assert "evil.pth" in message
  assert "refused" in message
  assert not marker.exists()


def test_pickle_build_on_a_rebuild_function_is_refused(tmp_path):
  # BUILD with slot state would setattr(__defaults__) on the function the loader hands out.
  target = Global("torch._utils", "_rebuild_tensor_v2")
  pickled = assemble(Build(target, (None, {"__defaults__": ({"conj": True},)})))
  path = write_checkpoint(tmp_path / "build.pth", pickled, {})
  with pytest.raises(errors.UnsafeCheckpointError, match="BUILD"):
    load_torch_checkpoint(path)


def test_torchscript_archive_gets_a_hint(tmp_path):
  pickled = assemble(Reduce(Global("__torch__.model", "VAR"), ()))
  path = write_checkpoint(tmp_path / "scripted.pt", pickled, {})
  with pytest.raises(errors.UnsafeCheckpointError, match="TorchScript"):
    load_torch_checkpoint(path)


# ------------------------------------------------------------------------------------------------
# Broken files: each a CheckpointError that names the file and says what to do.


def test_missing_file(tmp_path):
  with pytest.raises(errors.CheckpointError, match="no such file") as info:
    load_torch_checkpoint(tmp_path / "nope.pth")
  assert "nope.pth" in str(info.value)


def test_truncated_fixture(tmp_path, fixtures_dir):
  data = (fixtures_dir / "official_tiny_seed0_var.pth").read_bytes()
  path = tmp_path / "half.pth"
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(errors.CheckpointError) as info:
    load_torch_checkpoint(path)
  message = str(info.value)
  assert "half.pth" in message
  assert "truncated" in message
  assert "again" in message


def test_empty_file(tmp_path):
  path = tmp_path / "empty.pth"
  path.write_bytes(b"")
  with pytest.raises(errors.CheckpointError, match="is empty"):
    load_torch_checkpoint(path)


def test_non_zip_file(tmp_path):
  path = tmp_path / "weights.txt"
  path.write_text("these are not weights\n")
  with pytest.raises(errors.CheckpointError) as info:
    load_torch_checkpoint(path)
  message = str(info.value)
  assert "weights.txt" in message
  assert "not a zip archive" in message
  assert "torch.save" in message


def test_legacy_torch_format_is_named(tmp_path):
  # The legacy format starts with the pickled magic number 0x1950a86a20f9469cfc6c.
  path = tmp_path / "legacy.pth"
  path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1] + b"\x80\x02}q\x00.")
  with pytest.raises(errors.CheckpointError) as info:
    load_torch_checkpoint(path)
  message = str(info.value)
  assert "legacy (pre-1.6)" in message
  assert "torch.save(" in message


def test_zip_without_data_pkl(tmp_path):
  path = write_checkpoint(tmp_path / "nodata.pth", b"", {"0": b"\0" * 8}, with_data_pkl=False)
  with pytest.raises(errors.CheckpointError) as info:
    load_torch_checkpoint(path)
  message = str(info.value)
  assert "nodata.pth" in message
  assert "data.pkl" in message
  assert "archive/data/0" in message  # What the zip does hold.


def test_storage_record_shorter_than_declared(tmp_path, fixtures_dir):
  # Storage 2 of the VAR fixture is lvl_1L: 30 int64 = 240 bytes. Keep 100 of them.
  path = rewrite_zip(fixtures_dir / "official_tiny_seed0_var.pth", tmp_path / "short.pth",
                     lambda name, data: data[:100] if name.endswith("/data/2") else data)
  with pytest.raises(errors.CheckpointError) as info:
    load_torch_checkpoint(path)
  message = str(info.value)
  assert "short.pth" in message
  assert "'data/2' holds 100 bytes, shorter than the 30 x int64 = 240 bytes" in message


def test_missing_storage_record(tmp_path, fixtures_dir):
  path = rewrite_zip(fixtures_dir / "official_tiny_seed0_var.pth", tmp_path / "gap.pth",
                     lambda name, data: None if name.endswith("/data/5") else data)
  with pytest.raises(errors.CheckpointError, match="storage 'data/5', which the archive does not"):
    load_torch_checkpoint(path)


def test_tensor_larger_than_its_storage(tmp_path):
  sd = {"w": tensor("FloatStorage", "0", 4, (3, 2), (2, 1), offset=1)}
  path = write_checkpoint(tmp_path / "big.pth", assemble(sd), {"0": b"\0" * 16})
  with pytest.raises(errors.CheckpointError) as info:
    load_torch_checkpoint(path)
  assert "needs 7 elements of storage 'data/0', which holds only 4" in str(info.value)


def test_corrupt_pickle(tmp_path):
  path = write_checkpoint(tmp_path / "garbled.pth", b"\x80\x02}(X\xff\xff\xff\xff", {})
  with pytest.raises(errors.CheckpointError, match="data.pkl is not a valid torch pickle"):
    load_torch_checkpoint(path)


@pytest.mark.parametrize("root,expected", [
    (tensor("FloatStorage", "0", 2, (2,), (1,)), "a single tensor, not a dict"),
    ([1, 2], "holds a list, not a dict of tensors"),
    ({"a": {"b": tensor("FloatStorage", "0", 2, (2,), (1,))},
      "a.b": tensor("FloatStorage", "0", 2, (2,), (1,))}, "same key 'a.b'"),
    ({(1, 2): tensor("FloatStorage", "0", 2, (2,), (1,))}, "only str and int keys"),
    (Memo(5, {"self": Get(5)}), "appears twice"),
])
def test_contents_that_are_not_a_state_dict(tmp_path, root, expected):
  path = write_checkpoint(tmp_path / "odd.pth", assemble(root), {"0": b"\0" * 8})
  with pytest.raises(errors.CheckpointError, match=expected):
    load_torch_checkpoint(path)


def test_unsupported_dtype_is_named(tmp_path):
  sd = {"q": tensor("QInt8Storage", "0", 2, (2,), (1,))}
  path = write_checkpoint(tmp_path / "q.pth", assemble(sd), {"0": b"\0\0"})
  with pytest.raises(errors.CheckpointError, match="quantized tensors are not supported") as info:
    load_torch_checkpoint(path)
  assert not isinstance(info.value, errors.UnsafeCheckpointError)


def test_not_a_path_or_file():
  with pytest.raises(errors.InputError, match="path or a seekable binary file"):
    load_torch_checkpoint(42)


# ------------------------------------------------------------------------------------------------
# Cross-checks against torch itself (skipped where torch is not installed, as in CI).


def _torch_bits(t) -> tuple[str, tuple, bytes]:
  """(dtype, shape, bytes) of a torch tensor, with bfloat16/float8 taken bit for bit."""
  import torch  # pylint: disable=import-outside-toplevel
  t = t.resolve_conj().resolve_neg().contiguous()
  name = str(t.dtype).removeprefix("torch.")
  if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
    raw = t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.uint8).numpy()
  else:
    raw = t.numpy()
  return name, tuple(t.shape), raw.tobytes()


def _numpy_bits(a: np.ndarray) -> tuple[str, tuple, bytes]:
  return a.dtype.name, a.shape, np.ascontiguousarray(a).tobytes()


def test_matches_torch_load_bit_for_bit(tmp_path, fixtures_dir):
  torch = pytest.importorskip("torch")
  for name in ("official_tiny_vae", *(f"{n}_var" for n in VAR_FIXTURES)):
    path = fixtures_dir / f"{name}.pth"
    ours = load_torch_checkpoint(path)
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ours) == list(theirs)
    for key, t in theirs.items():
      assert _numpy_bits(ours[key]) == _torch_bits(t), (name, key)

  gen = torch.Generator().manual_seed(0)
  base = torch.randn(5, 7, generator=gen)
  made = {
      "transposed_slice": base[1:, 2:].t(),
      "offset_row": base[3],
      "strided": base[::2, ::3],
      "expanded": base[0, :3].expand(4, 3),
      "contiguous": base,
      "bf16": torch.randn(3, 4, generator=gen).to(torch.bfloat16),
      "bf16_view": torch.randn(4, 6, generator=gen).to(torch.bfloat16)[:, 1::2],
      "f16": torch.randn(2, 3, generator=gen).to(torch.float16).t(),
      "f16_special": torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 6e-8],
                                  dtype=torch.float16),
      "f64": torch.randn(3, generator=gen, dtype=torch.float64),
      "i32": torch.arange(-3, 3, dtype=torch.int32),
      "u8": torch.arange(250, 256, dtype=torch.uint8),
      "bool": torch.tensor([True, False, True]),
      "uint16": torch.arange(65530, 65536, dtype=torch.int32).to(torch.uint16),
      "float8": torch.randn(5, generator=gen).to(torch.float8_e4m3fn),
      "conj": torch.randn(3, generator=gen, dtype=torch.complex64).conj(),
      "param": torch.nn.Parameter(torch.ones(2, 2)),
      "nested": {"inner": torch.zeros(1, dtype=torch.int64)},
  }
  path = tmp_path / "made.pth"
  torch.save(made, path)
  ours = load_torch_checkpoint(path)
  theirs = torch.load(path, map_location="cpu", weights_only=True)
  assert list(ours) == [k for k in made if k != "nested"] + ["nested.inner"]
  for key in made:
    if key == "nested":
      continue
    assert _numpy_bits(ours[key]) == _torch_bits(theirs[key].detach()), key
  assert _numpy_bits(ours["nested.inner"]) == _torch_bits(theirs["nested"]["inner"])
  assert ours["bf16"].dtype == ml_dtypes.bfloat16
  assert ours["f16"].dtype == np.float16
  np.testing.assert_array_equal(ours["transposed_slice"], base[1:, 2:].t().numpy())


def test_torch_legacy_format_file_is_refused_with_a_resave_hint(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "legacy.pth"
  torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
  with pytest.raises(errors.CheckpointError, match=r"legacy \(pre-1.6\)"):
    load_torch_checkpoint(path)
