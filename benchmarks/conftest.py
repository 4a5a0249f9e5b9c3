"""pytest-benchmark plumbing: the results folder option and the end-of-run
report (one table per op and mode, saved with JSON and a PNG plot)."""

import ctypes
import os

import pytest

import harness
from harness import Report


def _steady_state_malloc() -> str:
    """Keep freed blocks of up to 32 MiB in glibc's heap instead of returning
    them to the OS, so that a tensor allocated every call does not page-fault
    every call -- the steady state of a training loop with a tuned allocator
    (PyTorch's CPU tuning guide suggests jemalloc/tcmalloc for the same
    reason). It applies to every implementation alike. Larger tensors still
    come fresh from the OS (glibc caps the threshold at 32 MiB)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        if libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30):
            return "glibc, mmap threshold 32 MiB, no trimming"
    except (OSError, AttributeError):
        pass
    return "default"


harness.ALLOCATOR = _steady_state_malloc()

_REPORT = Report()


def pytest_addoption(parser):
    parser.addoption(
        "--results-dir",
        default=os.path.join(os.path.dirname(__file__), "results"),
        help="where the benchmark report (JSON, PNG) is written",
    )


@pytest.fixture(scope="session")
def bench_report():
    return _REPORT


@pytest.fixture(scope="module", autouse=True)
def _turns_of_the_last_case():
    """A module's last case takes its turns before the next module runs."""
    yield
    _REPORT.finish_turns()


def pytest_keyboard_interrupt(excinfo):
    _REPORT.interrupted = True  # report what was measured, time nothing more


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    _REPORT.finish_turns()
    if not _REPORT.rows and not _REPORT.sections:
        return
    tr = terminalreporter
    tr.section("surgellm_kernels benchmark report (ratios within this run)")
    info = harness.machine_info()
    tr.write_line(", ".join(f"{k}: {v}" for k, v in info.items() if k != "backends"))
    load, cores = info.get("load average (1 min)"), info["cores"] or 1
    if load is not None and load > 1.5 * cores:
        tr.write_line(
            f"note: the machine was busy (load average {load} on {cores} cores): other work "
            "shared the cores, so these ratios are noisier than on an idle machine"
        )
    tr.write_line(f"backends: {info['backends']}")
    tr.write_line(harness.CAPTION)
    tr.write_line(_REPORT.format_tables())
    for path in _REPORT.save(config.getoption("--results-dir")):
        tr.write_line(f"saved {path}")
