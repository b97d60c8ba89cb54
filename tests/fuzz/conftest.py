"""The fuzz tests' summary: how many inputs each suite tried (per route or parser, and strategy), the HTTP statuses
they got, and how long each suite took (its tests' wall time, input generation included)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.fuzz.fuzzing import REPORT_ENV, TALLY

# test function -> the suite its time counts towards
SUITES = {"test_schema_operation": "schemathesis", "test_hostile_json": "hostile JSON", "test_raw_bodies": "hostile JSON",
          "test_multipart_uploads": "multipart uploads"}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    name = item.name.split("[")[0]
    suite = "properties" if item.module.__name__.endswith("test_properties") else SUITES.get(name)
    started = time.monotonic()
    try:
        return (yield)
    finally:
        if suite is not None:
            TALLY.timed(suite, started)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not TALLY.counts:
        return
    terminalreporter.section("fuzzing")
    for line in TALLY.lines():
        terminalreporter.write_line(line)
    report = os.environ.get(REPORT_ENV)
    if report:
        Path(report).write_text(json.dumps(TALLY.as_dict(), indent=2) + "\n")
        terminalreporter.write_line(f"written to {report}")
