"""Peak memory of a training process on pre-tokenized data, per checkout (issue 14: before / after).

  python benchmarks/input_memory.py                     # 10k and 100k records, before and after
  python benchmarks/input_memory.py --records 10000 --tree after=/work/main --processes 0,2

Each run is the real trainer, `python -m var_jax.cli train` (what `var-jax train` runs), started
as a child with PYTHONPATH = the checkout, on a generated config: VAR depth 2 in float32 with the
d16 layout (patch_nums 1,2,3,4,5,6,8,10,13,16, L = 680, so a record is 10 variants x 680 int16 =
13.6 KB), a random tokenizer with vocab 4096, batch 16, --steps steps (default 3), data.num_workers
2 and, where the checkout's data config has it, data.num_processes from --processes. The data are
synthetic pre-tokenized records written once under --data-root per format:
* v1 (npz shards read wholly into memory; what 3b19fe8 reads): written directly with np.savez in
  its layout (benchmarks/bench_input.py `write_tokens_v1`), so no var_jax is imported for it;
* v2 (array_record, read lazily): written by the checkout's own writer (bench_input's
  `write_tokens_package`, run with that checkout on PYTHONPATH).

Measured per run: ru_maxrss of the trainer (os.wait4: the largest RSS of it or of any descendant
it reaped; what `/usr/bin/time -v` calls maximum resident set size), and, sampled every 0.1 s from
/proc, the peak sum of RSS and of PSS over the trainer and its live descendants (grain worker
processes are separate processes: ru_maxrss takes the largest one, the sums take them all; PSS
shares pages fairly between processes so copies made with fork count once). The per-record slope
between the smallest and largest --records is printed per checkout.

Default checkouts: before = a git worktree of 3b19fe8 at <data-root>/old (make it once with
`git worktree add /work/scratch/bench_input/old 3b19fe8`), after = this checkout.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import bench_input  # noqa: E402  (its data writers; it imports var_jax only inside functions)

DEFAULT_ROOT = bench_input.DEFAULT_ROOT
D16 = bench_input.PATCH_NUMS[256]

CONFIG = '''"""bench: input_memory.py's trainer config (generated; depth 2, d16 layout, pre-tokenized)."""
from var_jax.train import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, steps=3, batch=16, workers=2, processes=0)
  c = config_lib.var_imagenet_config(16, True, False)
  c.patch_nums = {patch_nums}
  c.tokenizer = dict(path="random", seed=0, overrides=dict(ch=32, vocab_size=4096, z_channels=8))
  c.data.source = "pretokenized"
  c.data.image_size = 256
  c.data.num_workers = args.workers
  if "num_processes" in c.data:
    c.data.num_processes = args.processes
  elif args.processes:
    raise ValueError("this checkout's data config has no num_processes")
  c.global_batch_size = args.batch
  c.total_steps = args.steps
  c.log_every = 1
  c.checkpoint_every = args.steps
  c.sample_every = 0
  return c
'''


def tree_format_version(tree: str) -> int:
  """token_shards.FORMAT_VERSION of a checkout, read from its source."""
  with open(os.path.join(tree, "var_jax", "data", "token_shards.py")) as f:
    match = re.search(r"^FORMAT_VERSION\s*=\s*(\d+)", f.read(), re.M)
  if not match:
    raise SystemExit(f"no FORMAT_VERSION in {tree}/var_jax/data/token_shards.py")
  return int(match.group(1))


def tree_has_num_processes(tree: str) -> bool:
  with open(os.path.join(tree, "var_jax", "data", "config.py")) as f:
    return "config.num_processes" in f.read()


def ensure_set(root: str, tree: str, version: int, count: int) -> str:
  """A synthetic d16-layout set of `count` records in format `version`, made once."""
  directory = os.path.join(root, f"mem_tokens_v{version}_{count}")
  if os.path.exists(os.path.join(directory, "meta.json")):
    return directory
  t0 = time.perf_counter()
  num_shards = max(1, count // 12_500)
  if version == 1:
    bench_input.write_tokens_v1(directory, count, D16, num_shards)
  else:  # the checkout's own writer, imported from the checkout
    code = ("import sys, bench_input; v = bench_input.write_tokens_package(sys.argv[1], "
            "int(sys.argv[2]), bench_input.PATCH_NUMS[256], int(sys.argv[3])); "
            f"assert v == {version}, v")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, HERE]), JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code, directory, str(count), str(num_shards)],
                   env=env, check=True)
  print(f"wrote {count} records (v{version}, {num_shards} shards) in {directory} in "
        f"{time.perf_counter() - t0:.0f} s", flush=True)
  return directory


def _tree_pids(pid: int) -> list[int]:
  pids, todo = [], [pid]
  while todo:
    p = todo.pop()
    pids.append(p)
    todo.extend(bench_input._children(p))  # pylint: disable=protected-access
  return pids


def _kib(path: str, key: str) -> int:
  try:
    with open(path) as f:
      for line in f:
        if line.startswith(key):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


class Sampler(threading.Thread):
  """Peak summed RSS and PSS (KiB) of a process tree, sampled until `stop`."""

  def __init__(self, pid: int, interval: float = 0.1):
    super().__init__(daemon=True)
    self.pid, self.interval = pid, interval
    self.peak_rss = self.peak_pss = self.peak_procs = 0
    self.stop = threading.Event()

  def run(self):
    while not self.stop.is_set():
      pids = _tree_pids(self.pid)
      rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
      pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
      self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
      self.peak_procs = max(self.peak_procs, len(pids))
      self.stop.wait(self.interval)


def run_trainer(tree: str, data_dir: str, workdir: str, config_path: str, *, steps: int,
                processes: int, log_path: str) -> dict:
  shutil.rmtree(workdir, ignore_errors=True)
  env = dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [sys.executable, "-m", "var_jax.cli", "train",
         "--config", f"{config_path}:steps={steps},processes={processes}",
         "--workdir", workdir, f"--config.data.data_dir={data_dir}"]
  t0 = time.perf_counter()
  with open(log_path, "w") as log:
    child = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = Sampler(child.pid)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    sampler.stop.set()
    sampler.join()
  child.returncode = os.waitstatus_to_exitcode(status)
  row = {"cmd": " ".join(cmd), "exit": child.returncode, "wall_s": time.perf_counter() - t0,
         "ru_maxrss_mib": usage.ru_maxrss / 1024, "peak_tree_rss_mib": sampler.peak_rss / 1024,
         "peak_tree_pss_mib": sampler.peak_pss / 1024, "max_processes": sampler.peak_procs,
         "log": log_path}
  if child.returncode:
    with open(log_path) as f:
      row["error"] = f.read()[-600:]
  return row


def parse_trees(values: list[str] | None, root: str) -> list[tuple[str, str]]:
  if not values:
    return [("before (3b19fe8)", os.path.join(root, "old")), ("after (this checkout)", REPO)]
  trees = []
  for value in values:
    label, _, path = value.partition("=")
    if not path:
      raise SystemExit(f"--tree LABEL=PATH, got {value!r}")
    trees.append((label, os.path.abspath(path)))
  return trees


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--records", type=bench_input._int_list, default=[10_000, 100_000],  # pylint: disable=protected-access
                 help="set sizes (default 10000,100000)")
  p.add_argument("--tree", action="append", help="LABEL=CHECKOUT (repeatable; default before = "
                 "<data-root>/old, after = this checkout)")
  p.add_argument("--processes", type=bench_input._int_list, default=[0],  # pylint: disable=protected-access
                 help="data.num_processes per run, for checkouts that have it (default 0)")
  p.add_argument("--steps", type=int, default=3, help="training steps per run (default 3)")
  p.add_argument("--data-root", default=DEFAULT_ROOT, help=f"default {DEFAULT_ROOT}")
  args = p.parse_args(argv)
  trees = parse_trees(args.tree, args.data_root)
  for label, tree in trees:
    if not os.path.isdir(os.path.join(tree, "var_jax")):
      raise SystemExit(f"{label}: {tree} is not a var-jax checkout (for 3b19fe8: git worktree add "
                       f"{os.path.join(args.data_root, 'old')} 3b19fe8)")
  logs = os.path.join(args.data_root, "logs")
  os.makedirs(logs, exist_ok=True)
  config_dir = tempfile.mkdtemp(prefix="input_memory_")
  config_path = os.path.join(config_dir, "input_memory_config.py")
  with open(config_path, "w") as f:
    f.write(CONFIG.format(patch_nums=tuple(D16)))
  print(f"{bench_input.cpu_count()} CPU cores; trainer: VAR depth 2, d16 layout (L=680, "
        f"10 variants), batch 16, {args.steps} steps, data.num_workers 2", flush=True)
  rows = []
  for label, tree in trees:
    version = tree_format_version(tree)
    commit = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    procs = args.processes if tree_has_num_processes(tree) else [0]
    for count in args.records:
      data_dir = ensure_set(args.data_root, tree, version, count)
      data_mib = sum(os.path.getsize(os.path.join(data_dir, n)) for n in os.listdir(data_dir)) / 2**20
      for n in procs:
        tag = re.sub(r"\W+", "_", label).strip("_")
        row = {"part": "memory", "tree": label, "path": tree,
               "commit": commit + ("+dirty" if dirty else ""), "format": version,
               "records": count, "data_mib": data_mib, "processes": n}
        row.update(run_trainer(tree, data_dir, os.path.join(args.data_root, f"mem_run_{tag}"),
                               config_path, steps=args.steps, processes=n,
                               log_path=os.path.join(logs, f"memory_{tag}_{count}_p{n}.log")))
        rows.append(row)
        print(json.dumps(row), flush=True)
  shutil.rmtree(config_dir, ignore_errors=True)
  bench_input.print_table(
      "peak memory of `var-jax train` on pre-tokenized records (MiB)", rows,
      [("checkout", "tree", ""), ("commit", "commit", ""), ("format", "format", "d"),
       ("records", "records", ",d"), ("data on disk", "data_mib", ",.0f"),
       ("procs", "processes", "d"), ("ru_maxrss", "ru_maxrss_mib", ",.0f"),
       ("peak tree RSS", "peak_tree_rss_mib", ",.0f"), ("peak tree PSS", "peak_tree_pss_mib", ",.0f"),
       ("processes seen", "max_processes", "d"), ("wall s", "wall_s", ".0f"), ("exit", "exit", "d")])
  for label, _ in trees:
    for n in args.processes:
      mine = sorted((r for r in rows if r["tree"] == label and r["processes"] == n and not r["exit"]),
                    key=lambda r: r["records"])
      if len(mine) >= 2 and mine[-1]["records"] > mine[0]["records"]:
        span = mine[-1]["records"] - mine[0]["records"]
        slope = {k: (mine[-1][k] - mine[0][k]) * 2**20 / span
                 for k in ("ru_maxrss_mib", "peak_tree_rss_mib", "peak_tree_pss_mib")}
        print(f"{label}, {n} worker processes: bytes per extra record: ru_maxrss "
              f"{slope['ru_maxrss_mib']:,.0f}, tree RSS {slope['peak_tree_rss_mib']:,.0f}, tree "
              f"PSS {slope['peak_tree_pss_mib']:,.0f} (a record's tokens are "
              f"{10 * bench_input._seq_len(D16) * 2:,} bytes)")  # pylint: disable=protected-access
  return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
