"""pytest-xdist under `--dist loadfile` when a worker process dies: no hang, one retry.

pytest-xdist 3.8 (the newest release) hangs once a worker dies under `--dist loadfile`: its
scheduler puts every file the dead worker was given back on the queue, finished ones included,
hands the replacement worker a file with nothing left to run and waits for it forever
(pytest-dev/pytest-xdist#784 and #1323; the fix is merged but unreleased). A native abort then
costs the whole CI budget and names no test: CI at 733bc0c lost 90 minutes that way when XLA's CPU
compiler aborted, without a message, inside test_train_var's sample hook (passed in every other
run, here and in CI).

`LoadFileScheduling` here puts back only the tests the dead worker had not finished, and gives
the test it died in one more run in a fresh worker: the first crash is reported as a rerun ("R",
with the crash in the summary), a second one fails the test. A test that crashes every time
still fails; one that crashed once in a native library does not sink the run.

tests/conftest.py loads this plugin; tests/test_xdist_crash.py checks it in pytest runs of its own.
"""
from __future__ import annotations

import collections

import pytest
from xdist.scheduler import LoadFileScheduling as _XdistLoadFileScheduling

import xdist_order

RETRIES = 1


class LoadFileScheduling(_XdistLoadFileScheduling):
  """xdist's file-at-a-time scheduling with a dead worker's unfinished tests re-queued, and the
  files handed out longest first (`xdist_order`)."""

  def __init__(self, config, log=None):
    super().__init__(config, log)
    self.crashes: collections.Counter[str] = collections.Counter()
    self.file_seconds = xdist_order.load(config.getoption("file_seconds", xdist_order.FILE_SECONDS))
    self.ordered = False

  def _assign_work_unit(self, node):
    """xdist's, with the queue put in `xdist_order` the first time (xdist fills it and hands out
    the first files in one call, `schedule`)."""
    if not self.ordered:
      self.workqueue = xdist_order.longest_first(self.workqueue, self.file_seconds)
      self.ordered = True
    super()._assign_work_unit(node)

  def remove_node(self, node):
    """Called when `node` finished (returns None) or died (returns the test it died in)."""
    workload = self.assigned_work.pop(node)
    unfinished = {scope: unit for scope, unit in workload.items() if not all(unit.values())}
    if not unfinished:
      return None
    # The worker runs its tests in the order given: the first unfinished one is where it died.
    crashed = next(nodeid for unit in unfinished.values() for nodeid, done in unit.items() if not done)
    self.crashes[crashed] += 1
    if self.crashes[crashed] > RETRIES:
      scope = self._split_scope(crashed)
      unfinished[scope][crashed] = True
      if all(unfinished[scope].values()):
        del unfinished[scope]
    self.workqueue.update(unfinished)
    for other in self.assigned_work:
      self._reschedule(other)
    return crashed

  def _reschedule(self, node):
    """xdist's, until `node` holds two tests or no files are left. A worker holds back its last
    test until it is given another or told to stop, and xdist gives a replacement worker one file:
    one with a single test left would wait forever."""
    super()._reschedule(node)
    while (not node.shutting_down and node in self.assigned_work
           and self._pending_of(self.assigned_work[node]) < 2):
      super()._reschedule(node)  # one more file, or the node is told to stop when none are left

  def will_rerun(self, nodeid: str) -> bool:
    return 0 < self.crashes[nodeid] <= RETRIES


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """Ours for --dist loadfile, xdist's own otherwise."""
  if config.getvalue("dist") == "loadfile":
    return LoadFileScheduling(config, log)
  return None


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
  """A test that gets another run is reported as a rerun, not a failure."""
  if isinstance(sched, LoadFileScheduling) and sched.will_rerun(crashitem):
    report.outcome = "rerun"
    report.longrepr = f"{report.longrepr}; it runs once more in a fresh worker"


def pytest_report_teststatus(report, config):
  """The rerun outcome (pytest itself knows passed, failed and skipped)."""
  if report.outcome == "rerun":
    return "rerun", "R", ("RERUN", {"yellow": True})
  return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  """The crashes that were rerun, by name."""
  reruns = terminalreporter.stats.get("rerun", [])
  if reruns:
    terminalreporter.write_sep("=", f"{len(reruns)} worker crash(es), rerun in a fresh worker", yellow=True)
    for rep in reruns:
      terminalreporter.write_line(str(rep.longrepr))
