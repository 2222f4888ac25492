"""Shared helpers of the benchmarks: flags, timing, memory, tables, JSON lines and model set-up.

Each benchmark builds random-weight models (ours, or ours and the official PyTorch ones with the
same weights when VAR_REF points at an official VAR checkout and torch imports), times them and
prints a table plus one JSON line per measurement (lines starting with `{`; `grep '^{'`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import resource
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The official models of the brief: build_vae_var(...) with these arguments (plus depth and the
# device, `official_device`).
OFFICIAL_BUILD_KWARGS = dict(
    V=4096, Cvae=32, ch=160, share_quant_resi=4,
    patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), num_classes=1000, shared_aln=False,
    attn_l2_norm=True, flash_if_available=False, fused_if_available=False)


# -- flags -------------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
  """argparse type: "1,8" -> [1, 8]."""
  try:
    values = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
  if not values or any(v < 1 for v in values):
    raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
  return values


def add_common_flags(parser: argparse.ArgumentParser, *, batch_sizes: str, iters: int) -> None:
  """Flags every benchmark takes."""
  parser.add_argument("--batch-sizes", type=int_list, default=int_list(batch_sizes),
                      help=f"comma-separated batch sizes (default {batch_sizes})")
  parser.add_argument("--iters", type=int, default=iters,
                      help=f"timed steady-state calls per measurement, after the first (default {iters})")
  parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs (default 0)")
  parser.add_argument("--var-ref", default=os.environ.get("VAR_REF", ""),
                      help="official VAR checkout to compare with (default: $VAR_REF; empty: ours only)")
  parser.add_argument("--no-official", action="store_true",
                      help="skip the official PyTorch comparison even when VAR_REF is set")
  parser.add_argument("--torch-warmup", type=int, default=1,
                      help="untimed official calls before its timed ones (default 1; 0: none)")
  parser.add_argument("--official-device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="where the official models run (default auto: cuda when torch sees a "
                           "GPU, else cpu)")


# -- environment -------------------------------------------------------------------------------

def cpu_count() -> int:
  """Cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


TIMING_ENV_VARS = ("XLA_FLAGS", "JAX_DEFAULT_MATMUL_PRECISION", "NVIDIA_TF32_OVERRIDE",
                   "GLIBC_TUNABLES")


def environment() -> dict[str, Any]:
  """Backend, device and versions: printed once and attached to every JSON line."""
  dev = jax.devices()[0]
  return {
      "backend": jax.default_backend(),
      "device": dev.device_kind,
      "num_devices": jax.device_count(),
      "cpu_cores": cpu_count(),
      "jax": jax.__version__,
      # Settings that change what is measured (XLA's autotuning, float32 matmul precision, TF32,
      # glibc's malloc: huge pages change a CPU call's page faults; README, "Sampling speed").
      **{name.lower(): os.environ[name] for name in TIMING_ENV_VARS if os.environ.get(name)},
  }


def print_environment(env: dict[str, Any]) -> None:
  print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))


# -- timing ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Timing:
  """Wall times of one measured callable: the first call and the steady-state calls after it."""
  first_s: float
  steady_s: list[float]

  @property
  def median_s(self) -> float:
    return statistics.median(self.steady_s)

  @property
  def min_s(self) -> float:
    return min(self.steady_s)

  @property
  def first_minus_steady_s(self) -> float:
    """The first call's extra time: tracing + compilation (+ first-run allocation)."""
    return self.first_s - self.median_s


def call_seconds(fn: Callable[[], Any]) -> float:
  """Wall seconds of one call of `fn`, waiting for its JAX result (block_until_ready; a call that
  returns None, such as one that waits for its own device, is timed as it returns)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


@dataclasses.dataclass(frozen=True)
class HostUsage:
  """The kernel's share of one call: this process's system CPU seconds and minor page faults
  (getrusage deltas over the call). On CPU they are mostly fresh memory being mapped and zeroed:
  glibc's malloc hands large blocks back to the kernel when they are freed, so every call of an
  XLA executable or a torch loop faults its buffers in again (README, "Sampling speed")."""
  system_s: float
  minor_faults: int


def recording_host_usage(fn: Callable[[], Any], record: list[HostUsage]) -> Callable[[], Any]:
  """`fn`, waiting for its JAX result, with every call's HostUsage appended to `record`."""
  def call():
    before = resource.getrusage(resource.RUSAGE_SELF)
    out = jax.block_until_ready(fn())
    after = resource.getrusage(resource.RUSAGE_SELF)
    record.append(HostUsage(after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt))
    return out
  return call


def time_calls(fn: Callable[[], Any], iters: int) -> Timing:
  """JAX: calls `fn` 1 + iters times, waiting for its result (block_until_ready) each time.

  The first call (trace + compile + run) is timed on its own.
  """
  first = call_seconds(fn)
  return Timing(first, [call_seconds(fn) for _ in range(max(iters, 1))])


def time_alternately(fns: dict[str, Callable[[], Any]], iters: int) -> dict[str, list[float]]:
  """JAX: each of `fns` called `iters` times, in turn, waiting for each result; the seconds of
  every call per name. Alternating makes a host whose speed drifts slow them all alike."""
  times = {name: [] for name in fns}
  for _ in range(max(iters, 1)):
    for name, fn in fns.items():
      times[name].append(call_seconds(fn))
  return times


def compare_sample_programs(variants: dict[str, tuple[Any, Callable[[], Any]]], labels,
                            seed: int, iters: int, title: str) -> dict[str, list[float]]:
  """`var_jax.sample`'s program (`sampler.build_sample_call`, cfg and filters at their defaults)
  for each variant name -> (model, a context manager factory held while the call is built, traced
  and compiled); prints each one's lower and compile seconds, whether their images and tokens are
  identical (where not: whether the int32 token maps are, and how far the uint8 images differ),
  their alternated call times and the first / second ratio of the medians."""
  from var_jax.inference import sampler
  built, outputs = {}, {}
  for name, (model, context) in variants.items():
    with context():
      call = sampler.build_sample_call(model, labels, rng=jax.random.key(seed))
      t0 = time.perf_counter()
      lowered = call.lower(fresh=True)
      t1 = time.perf_counter()
      compiled = lowered.compile()
    print(f"{title} {name}: lower {t1 - t0:.1f} s, compile {time.perf_counter() - t1:.1f} s",
          flush=True)
    built[name] = lambda call=call, compiled=compiled: compiled(*call.args)
    outputs[name] = jax.device_get(built[name]())
  first, second = list(variants)[:2]
  pairs = list(zip(jax.tree.leaves(outputs[first]), jax.tree.leaves(outputs[second])))
  same = all(np.array_equal(a, b) for a, b in pairs)
  print(f"  images and tokens identical: {same}")
  if not same:  # the call returns (uint8 images, int32 token maps)
    tokens = all(np.array_equal(a, b) for a, b in pairs if a.dtype != np.uint8)
    diffs = np.concatenate([np.abs(a.astype(np.int16) - b.astype(np.int16)).ravel()
                            for a, b in pairs if a.dtype == np.uint8])
    print(f"  tokens identical: {tokens}; image values differ by at most {diffs.max()} / 255, "
          f"{100 * np.mean(diffs > 0):.2f}% of them by any")
  times = time_alternately(built, iters)
  for name, ts in times.items():
    print(f"  {name}: " + " ".join(f"{t:.2f}" for t in ts)
          + f" s (median {float(np.median(ts)):.2f}, min {min(ts):.2f})")
  ratio = np.median(times[first]) / np.median(times[second])
  turns = turn_speedups(times[second], times[first])
  print(f"  {first} / {second} (medians): x{ratio:.3f}; per turn: median x{np.median(turns):.3f} "
        f"(x{min(turns):.3f}-x{max(turns):.3f})", flush=True)
  return times


def time_torch(fn: Callable[[], Any], iters: int, warmup: int,
               synchronize: Callable[[], None] = lambda: None) -> Timing:
  """PyTorch: `warmup` untimed calls, then `iters` timed ones, each followed by `synchronize`
  (`Official.synchronize`: waits for the GPU's queue; nothing on CPU, where torch is synchronous).

  `first_s` is the first call's time, whether it was a warm-up call or the first timed one.
  """
  def call() -> float:
    t0 = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - t0

  first = None
  for _ in range(warmup):
    elapsed = call()
    first = elapsed if first is None else first
  steady = [call() for _ in range(max(iters, 1))]
  return Timing(steady[0] if first is None else first, steady)


def aot_compile(jitted, *args, **kwargs):
  """(compiled, lower_s, compile_s): trace+lower, then XLA compile, of a jitted function."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args, **kwargs)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, t1 - t0, t2 - t1


def matmul_flops_per_s(n: int = 2048, iters: int = 5, dtype: str = "float32") -> float:
  """Achieved FLOP/s of one (n, n) @ (n, n) matmul on one device of the default backend (best of
  iters), the operands in `dtype`, accumulated in float32, through the models' own choice of
  matmul: OpenBLAS for float32 on one CPU device (`ops/cpu_gemm.py`), XLA's dot otherwise."""
  import var_jax
  from var_jax.ops import cpu_gemm
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32).astype(dtype)

  def product(x, y):
    if cpu_gemm.enabled(x, y):
      return cpu_gemm.matmul(x[None], y[None])[0]
    return jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)

  mm = jax.jit(product)
  with jax.set_mesh(var_jax.sampling_mesh(devices=jax.devices()[:1])):
    t = time_calls(lambda: mm(a, b), iters)
  return 2.0 * n ** 3 / t.min_s


def stream_bytes_per_s(gib: float = 1.0, iters: int = 5) -> float:
  """Achieved memory read bandwidth of the default backend: a jitted sum over a `gib` GiB float32
  array, far larger than any cache (best of iters)."""
  x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  t = time_calls(lambda: total(x), iters)
  return x.size * 4 / t.min_s


def torch_matmul_flops_per_s(official: "Official", n: int = 2048, iters: int = 5) -> float:
  """Achieved float32 FLOP/s of torch's (n, n) @ (n, n) matmul on the official models' device
  (best of iters)."""
  g = official.torch.Generator().manual_seed(0)
  a = official.tensor(official.torch.randn(n, n, generator=g).numpy())
  b = official.tensor(official.torch.randn(n, n, generator=g).numpy())
  t = time_torch(lambda: a @ b, iters, warmup=1, synchronize=official.synchronize)
  return 2.0 * n ** 3 / t.min_s


# -- memory ------------------------------------------------------------------------------------

def reset_peak_rss() -> bool:
  """Resets the process's peak RSS (Linux VmHWM) so the next reading covers one phase only."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _own_status_bytes(field: str) -> int | None:
  """A size field of this process's /proc/self/status ("VmHWM:", "VmRSS:") in bytes, or None
  where there is none (not Linux)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def peak_rss_since_reset() -> int | None:
  """Peak RSS in bytes since the last `reset_peak_rss` (Linux VmHWM), or None elsewhere."""
  return _own_status_bytes("VmHWM:")


def resident_bytes() -> int | None:
  """This process's resident memory now in bytes (Linux VmRSS), or None elsewhere."""
  return _own_status_bytes("VmRSS:")


def lifetime_peak_rss() -> int:
  """Peak RSS in bytes over the whole process (resource.getrusage)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024


def device_peak_bytes() -> int | None:
  """Accelerator peak bytes in use (GPU/TPU `memory_stats`), None where not reported (CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # Backends without memory stats raise or return None.
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def memory_analysis(compiled) -> dict[str, int]:
  """temp/argument/output/alias/code bytes of a compiled executable ({} when unavailable)."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # Not every backend implements it.
    return {}
  if isinstance(ma, (list, tuple)):
    ma = ma[0] if ma else None
  if ma is None:
    return {}
  out = {}
  for name in ("temp", "argument", "output", "alias", "generated_code"):
    value = getattr(ma, f"{name}_size_in_bytes", None)
    if value is not None:
      out[f"{name}_bytes"] = int(value)
  return out


def mib(n: float | None) -> str:
  return "-" if n is None else f"{n / 2 ** 20:.0f}"


# -- output ------------------------------------------------------------------------------------

def emit(record: dict[str, Any]) -> None:
  """One measurement as one JSON line."""
  print(json.dumps(record, sort_keys=False), flush=True)


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
  """Prints rows as an aligned table; columns are (header, key, format spec); missing -> "-"."""
  cells = [[h for h, _, _ in columns]]
  for row in rows:
    line = []
    for _, key, fmt in columns:
      value = row.get(key)
      line.append("-" if value is None else (format(value, fmt) if fmt else str(value)))
    cells.append(line)
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  print(f"\n== {title} ==")
  for i, r in enumerate(cells):
    print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    if i == 0:
      print("  ".join("-" * w for w in widths))
  print(flush=True)


def speedup(ours_s: float | None, official_s: float | None) -> float | None:
  """ours/official speed (= official time / our time): > 1 means ours is faster."""
  if not ours_s or not official_s:
    return None
  return official_s / ours_s


def turn_speedups(ours_s: Sequence[float], official_s: Sequence[float]) -> list[float]:
  """official time / our time of each turn of alternated calls (`time_alternately`: the i-th
  calls of the two sides ran next to each other). A host whose speed drifts between phases
  minutes long moves both calls of a turn alike, so these ratios spread less than the calls do,
  and their median is steadier than the ratio of the two medians (which may pair a call of a
  fast phase with one of a slow phase)."""
  if len(ours_s) != len(official_s):
    raise ValueError(f"turns need as many calls on each side, got {len(ours_s)} and {len(official_s)}")
  return [o / t for t, o in zip(ours_s, official_s)]


# -- models ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Official:
  """The official PyTorch models (random weights) on `device`, for side-by-side timing."""
  torch: Any
  vae: Any
  var: Any
  device: str = "cpu"

  def tensor(self, array, dtype=None):
    """A numpy array (or array-like) as a torch tensor on the models' device."""
    array = np.ascontiguousarray(array if dtype is None else np.asarray(array, dtype))
    return self.torch.from_numpy(array.copy() if not array.flags.writeable else array).to(self.device)

  def synchronize(self) -> None:
    """Waits for the device's queued work (a timing boundary); nothing on CPU."""
    if self.device == "cuda":
      self.torch.cuda.synchronize()

  def release_memory(self) -> None:
    """Hands torch's cached GPU blocks back to the driver (nothing on CPU): JAX, which runs next
    in the same process, cannot use memory that torch's caching allocator keeps."""
    if self.device == "cuda":
      self.torch.cuda.empty_cache()

  def autocast(self, dtype: str):
    """torch.autocast to `dtype` on the models' device; nothing for float32."""
    if dtype == "float32":
      return contextlib.nullcontext()
    return self.torch.autocast(self.device, dtype=getattr(self.torch, dtype))


def official_device(args, torch) -> str:
  """--official-device, with auto = cuda when torch sees a GPU. (The official VAR draws its
  sampling generator on cuda whenever one is visible, so on a GPU machine its models must be
  there too.)"""
  choice = getattr(args, "official_device", "auto")
  if choice == "auto":
    return "cuda" if torch.cuda.is_available() else "cpu"
  if choice == "cuda" and not torch.cuda.is_available():
    raise SystemExit("--official-device cuda: torch sees no GPU here (torch.cuda.is_available() "
                     "is False); use cpu or auto.")
  return choice


def import_official(args) -> tuple[Any | None, str]:
  """torch, with the official checkout at args.var_ref importable, or (None, why not).

  On success the string describes the comparison (checkout, torch version, threads); torch runs
  on every core this process may use.
  """
  if args.no_official:
    return None, "--no-official"
  if not args.var_ref:
    return None, "VAR_REF not set"
  if not os.path.isfile(os.path.join(args.var_ref, "models", "var.py")):
    return None, f"VAR_REF={args.var_ref} has no models/var.py"
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    return None, f"torch does not import ({err})"
  if args.var_ref not in sys.path:
    sys.path.insert(0, args.var_ref)
  torch.set_num_threads(cpu_count())
  return torch, (f"official code from {args.var_ref}, torch {torch.__version__}, "
                 f"{torch.get_num_threads()} threads")


def load_official(args, depth: int) -> tuple[Official | None, str]:
  """Builds the official VQVAE and VAR-d{depth} from args.var_ref, or says why not."""
  torch, why = import_official(args)
  if torch is None:
    return None, why
  from models import build_vae_var  # The official checkout's package, found through VAR_REF.
  warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast.*", category=FutureWarning)
  device = official_device(args, torch)
  torch.manual_seed(args.seed)
  with contextlib.redirect_stdout(io.StringIO()):
    vae, var = build_vae_var(depth=depth, device=device, **OFFICIAL_BUILD_KWARGS)
  with torch.no_grad():
    for p in vae.parameters():  # The official VQVAE leaves its weights uninitialised.
      torch.nn.init.normal_(p, std=0.02)
  vae.eval()
  var.eval()
  return Official(torch, vae, var, device), f"{why}, on {device}"


def _numpy_state_dict(module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def tokenizer_from_official(official: Official):
  import var_jax
  return var_jax.Tokenizer.from_torch(_numpy_state_dict(official.vae))


def var_model_from_official(official: Official, tokenizer):
  import var_jax
  return var_jax.VARModel.from_torch(_numpy_state_dict(official.var), tokenizer)


def random_tokenizer(seed: int, **overrides):
  """The released 256 px tokenizer config (with `overrides`) with random weights (no torch)."""
  import var_jax
  from var_jax.models import vqvae
  from var_jax.models.vqvae_config import VQVAEConfig
  cfg = VQVAEConfig(**overrides)
  return var_jax.Tokenizer(cfg, jax.jit(vqvae.init_params, static_argnums=0)(cfg, jax.random.key(seed)))


def var_config_for(depth: int, tokenizer_config, **overrides):
  """The VARConfig of a VAR-d{depth} over a tokenizer with `tokenizer_config`; `overrides` are
  further VARConfig fields (num_classes, dtype, attention_impl, ...)."""
  from var_jax.models.var_config import VARConfig
  tc = tokenizer_config
  return VARConfig(depth=depth, vocab_size=tc.vocab_size, z_channels=tc.z_channels,
                   patch_nums=tc.patch_nums, **overrides)


def random_var_model(depth: int, tokenizer, seed: int, **overrides):
  """A VAR-d{depth} with random (official-init) weights for `tokenizer` (no torch); `overrides`
  as in `var_config_for`."""
  import flax
  import var_jax
  from var_jax.models import var as var_model
  cfg = var_config_for(depth, tokenizer.config, **overrides)
  init = jax.jit(var_model.init_params, static_argnums=0)
  params = flax.core.meta.unbox(init(cfg, jax.random.key(seed + 1)))
  return var_jax.VARModel(cfg, params, tokenizer)


def models(args, depth: int, *, need_var: bool):
  """(official or None, why, tokenizer, VARModel or None): ours share the official weights if any."""
  official, why = load_official(args, depth)
  if official is not None:
    tok = tokenizer_from_official(official)
    model = var_model_from_official(official, tok) if need_var else None
  else:
    tok = random_tokenizer(args.seed)
    model = random_var_model(depth, tok, args.seed) if need_var else None
  return official, why, tok, model


def random_index_maps(seed: int, batch: int, patch_nums: Sequence[int], vocab_size: int) -> list[np.ndarray]:
  """Uniform random token maps [(B, pn, pn) int32] * K."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab_size, (batch, pn, pn), dtype=np.int32) for pn in patch_nums]
