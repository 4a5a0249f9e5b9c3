"""pytest-benchmark plumbing: the results folder option and the end-of-run
report (one table per op and mode, saved with JSON and a PNG plot)."""
import os

import pytest

from harness import Report

_REPORT = Report()


def pytest_addoption(parser):
    parser.addoption("--results-dir", default=os.path.join(os.path.dirname(__file__), "results"),
                     help="where the benchmark report (JSON, PNG) is written")


@pytest.fixture(scope="session")
def bench_report():
    return _REPORT


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _REPORT.rows:
        return
    tr = terminalreporter
    tr.section("surgellm_kernels benchmark report (ratios within this run)")
    tr.write_line(_REPORT.format_tables())
    for path in _REPORT.save(config.getoption("--results-dir")):
        tr.write_line(f"saved {path}")
