"""The suite's xdist plugins (tests/xdist_crash.py, tests/xdist_order.py) in pytest runs of their
own: a worker that aborts under --dist loadfile neither hangs the run nor loses the tests it had not
run, and the files are handed out longest first by the recorded seconds."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

TESTS = pathlib.Path(__file__).parent

FILES = {
    "test_a.py": "def test_a1(): pass\ndef test_a2(): pass\n",
    # The crash sits between two tests of its file; test_c is a file with a single test (xdist
    # 3.8 alone gives a replacement worker that file and waits for it forever).
    "test_b.py": ("import os, pathlib\n"
                  "def test_b1(): pass\n"
                  "def test_abort():\n"
                  "  marker = pathlib.Path(os.environ['CRASH_MARKER'])\n"
                  "  if os.environ['CRASH'] == 'always' or not marker.exists():\n"
                  "    marker.write_text('crashed')\n"
                  "    os.abort()\n"
                  "def test_b3(): pass\n"),
    "test_c.py": "def test_c1(): pass\n",
}


def _run(tmp_path, workers: int, crash: str) -> subprocess.CompletedProcess:
  for name, text in FILES.items():
    (tmp_path / name).write_text(text)
  env = dict(os.environ, PYTHONPATH=str(TESTS), CRASH=crash, CRASH_MARKER=str(tmp_path / "marker"))
  # A hang is what this guards against: the timeout turns one into a failure of this test.
  return subprocess.run(
      [sys.executable, "-m", "pytest", "-p", "xdist_crash", "-p", "no:cacheprovider", "-n", str(workers),
       "--dist", "loadfile", "-rA", "-q", str(tmp_path)],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def _outcomes(stdout: str) -> dict[str, str]:
  """test id -> PASSED / FAILED from the -rA summary."""
  outcomes = {}
  for line in stdout.splitlines():
    word, _, rest = line.partition(" ")
    if word in ("PASSED", "FAILED"):
      outcomes[rest.split(" ")[0].split("::")[-1]] = word
  return outcomes


@pytest.mark.parametrize("workers", [1, 2])
def test_a_test_that_crashed_once_runs_again_and_the_run_goes_on(tmp_path, workers):
  proc = _run(tmp_path, workers, crash="once")
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert _outcomes(proc.stdout) == {name: "PASSED" for name in
                                    ("test_a1", "test_a2", "test_b1", "test_abort", "test_b3", "test_c1")}
  assert "1 rerun" in proc.stdout and "crashed while running 'test_b.py::test_abort'" in proc.stdout


def test_a_test_that_crashes_every_time_fails_and_the_rest_still_run(tmp_path):
  proc = _run(tmp_path, 2, crash="always")
  assert proc.returncode == 1, proc.stdout[-3000:]
  outcomes = _outcomes(proc.stdout)
  assert outcomes.pop("test_abort") == "FAILED"
  assert outcomes == {name: "PASSED" for name in ("test_a1", "test_a2", "test_b1", "test_b3", "test_c1")}


def test_files_go_longest_first_by_the_record_and_a_run_records_its_seconds(tmp_path):
  files = {"test_a.py": "def test_a1(): pass\n",
           "test_b.py": "def test_b1(): pass\ndef test_b2(): pass\ndef test_b3(): pass\n",
           "test_c.py": "import time\ndef test_c1(): time.sleep(0.3)\n"}
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  record = tmp_path / "seconds.json"
  # test_b has no entry: 3 tests count as 6 s, between test_c and test_a.
  record.write_text(json.dumps({"test_a.py": 5.0, "test_c.py": 9.0, "test_gone.py": 1.0}))
  env = dict(os.environ, PYTHONPATH=str(TESTS))
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-p", "xdist_order", "-p", "xdist_crash", "-p", "no:cacheprovider",
       "-n", "1", "--dist", "loadfile", "-v", "--file-seconds", str(record), "--record-file-seconds",
       str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout[-3000:]
  ran = [line.split()[-1].split("::")[0] for line in proc.stdout.splitlines() if " PASSED " in line]
  assert ran == ["test_c.py", "test_b.py", "test_b.py", "test_b.py", "test_a.py"], proc.stdout[-3000:]
  recorded = json.loads(record.read_text())
  assert recorded.keys() == {"test_a.py", "test_b.py", "test_c.py", "test_gone.py"}
  assert recorded["test_gone.py"] == 1.0 and 0.3 <= recorded["test_c.py"] < 5
