"""A pytest plugin that runs torchvision's own tests with detgraft's NMS and RoIAlign in place of
torchvision's, and proves the swap took effect by counting calls into detgraft's Rust core.

    PYTHONPATH=scripts pytest -p torchvision_swap TORCHVISION_SRC/test/test_ops.py -k "NMS or RoIAlign"

``scripts/torchvision_suite.sh`` runs it twice, with and without the plugin. The whole session
runs inside ``detgraft.ops.everywhere()``, which rebinds every public torchvision name of the
three functions (``torchvision.ops.nms``, ``batched_nms``, ``roi_align``, ``RoIAlign``'s,
``MultiScaleRoIAlign``'s). The summary says how many calls reached the core, per test class; a
session in which none did fails. ``DETGRAFT_UNSKIP=NAME`` also runs the tests named NAME that
torchvision's file skips unconditionally (0.21 skips ``TestRoIAlign.test_autocast_cpu``: "1/5000
flaky failure"). ``DETGRAFT_SWAP=off`` leaves torchvision's ops in place (the run to compare with).
"""

import collections
import os

import pytest

from detgraft import _core, ops

_COUNTED = ("nms", "batched_nms", "roi_align_forward", "roi_align_backward")
_calls: collections.Counter = collections.Counter()
_current = ["?"]
_SWAP = os.environ.get("DETGRAFT_SWAP", "on") != "off"
_swap = ops.everywhere()


def _counting(name: str):
    original = getattr(_core, name)

    def counted(*args, **kwargs):
        _calls[(_current[0], name)] += 1
        return original(*args, **kwargs)

    return counted


def pytest_collection_modifyitems(items) -> None:
    unskip = os.environ.get("DETGRAFT_UNSKIP")
    for item in items if unskip else ():
        if item.originalname == unskip:
            item.own_markers = [m for m in item.own_markers if m.name != "skip"]


def pytest_sessionstart(session) -> None:
    if not _SWAP:
        return
    for name in _COUNTED:
        setattr(_core, name, _counting(name))
    _swap.__enter__()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    _current[0] = item.cls.__name__ if item.cls else item.module.__name__
    try:
        return (yield)
    finally:
        _current[0] = "?"


def pytest_sessionfinish(session, exitstatus) -> None:
    if not _SWAP:
        return
    _swap.__exit__(None, None, None)
    if not _calls:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if not _SWAP:
        return
    terminalreporter.section("calls into detgraft._core")
    by_class = collections.defaultdict(dict)
    for (cls, name), n in sorted(_calls.items()):
        by_class[cls][name] = n
    for cls, names in by_class.items():
        terminalreporter.write_line(f"{cls}: " + ", ".join(f"{k} {v}" for k, v in names.items()))
    if not _calls:
        terminalreporter.write_line("none: the swap did not take effect")
