"""Test files handed out longest first under --dist loadfile, by the seconds of a recorded run.

xdist hands out the files in order of their number of tests, so a file of two long tests (the
notebooks) starts last and runs alone while the other worker idles: 200 s of a 1500 s run on two
cores. Handing out the longest files first (the LPT rule) leaves the short ones for the end,
where they even the workers out. The figures only order the files: a stale or missing entry
costs time, never a test.

`pytest --record-file-seconds` writes the record (FILE_SECONDS, or --file-seconds) from the run it
ends: every phase of every test, summed per file; entries of files the run did not touch are kept,
so record a full run. A file missing from it counts DEFAULT_TEST_SECONDS per test.
"""
from __future__ import annotations

import collections
import json
import pathlib

import pytest

FILE_SECONDS = pathlib.Path(__file__).with_name("file_seconds.json")
DEFAULT_TEST_SECONDS = 2.0


def load(path: pathlib.Path = FILE_SECONDS) -> dict[str, float]:
  """{test file's node id: seconds}; empty when there is no record."""
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return {}


def longest_first(workqueue: dict, seconds: dict[str, float]) -> collections.OrderedDict:
  """xdist's work queue ({file: {test id: done}}) reordered by recorded seconds, longest first
  (ties keep xdist's order)."""
  def cost(item):
    scope, tests = item
    return seconds.get(scope, DEFAULT_TEST_SECONDS * len(tests))
  return collections.OrderedDict(sorted(workqueue.items(), key=cost, reverse=True))


def pytest_addoption(parser):
  parser.addoption("--file-seconds", type=pathlib.Path, default=FILE_SECONDS,
                   help="the seconds per test file that order the files under --dist loadfile "
                        f"(default tests/{FILE_SECONDS.name})")
  parser.addoption("--record-file-seconds", action="store_true",
                   help="write each test file's seconds in this run to --file-seconds")


class _Recorder:
  """Sums the reports' durations per file (in the controller, which gets every worker's)."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.seconds: collections.Counter[str] = collections.Counter()

  def pytest_runtest_logreport(self, report):
    self.seconds[report.nodeid.split("::", 1)[0]] += report.duration

  def pytest_sessionfinish(self, session):
    merged = {**load(self.path), **{f: round(s, 1) for f, s in self.seconds.items()}}
    self.path.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
  if config.getoption("record_file_seconds") and not hasattr(config, "workerinput"):
    config.pluginmanager.register(_Recorder(config.getoption("file_seconds")), "file_seconds_recorder")
