"""The benchmark report's arithmetic (benchmarks/harness.py): ratios pair
rounds of one group of turns only, and each row's figures use its own bytes."""

import importlib.util
import sys
import time
import warnings
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "harness.py"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("benchmark_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def _add(harness, report, shape, impl, seconds, mode="eval", device="cpu"):
    row = harness.Row("fused_iwn", mode, shape, "torch.float32", device, impl, median_ms=1.0)
    report.begin_case(row.case)
    report.add(row)
    report.take_turns(row, lambda: time.sleep(seconds), {})
    return row


def test_a_case_that_comes_back_pairs_no_rounds_of_two_groups(harness):
    """Its implementations take turns in a group of their own; a ratio to an
    implementation of the first group was computed anyway, pairing rounds
    of two groups (or raising in zip(strict=True) where their counts
    differed, losing the whole report)."""
    report = harness.Report()
    _add(harness, report, "32x16", "eager", 1e-3)
    _add(harness, report, "32x16", harness.PROXY, 1e-4)
    _add(harness, report, "64x16", "eager", 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the harness says the case came back
        _add(harness, report, "32x16", "torch.compile", 5e-4)
        _add(harness, report, "32x16", "fused_iwn[cpu]", 1e-4)
    report.finish_turns()
    rows = {(d["shape"], d["impl"]): d for d in report.table_rows()}
    late_rows = (rows[("32x16", "torch.compile")], rows[("32x16", "fused_iwn[cpu]")])
    for d in late_rows:
        assert d["vs_eager"] is None and d["roofline"] is None  # eager, proxy: other group
    assert late_rows[1]["vs_compile"] > 1  # within its own group
    assert rows[("32x16", harness.PROXY)]["vs_eager"] > 1


def test_vs_copy_uses_each_rows_own_bytes(harness):
    """The copy moves the op's ideal bytes; a row that moves fewer (ATen's
    LayerNorm, the addcmul proxy) was compared as if it moved those."""
    report = harness.Report()
    op = harness.TENSORS_MOVED["fused_iwn"]["eval"]
    for impl, seconds in (
        ("fused_iwn[cuda]", 4e-3),
        (harness.PROXY, 2e-3 * harness.PROXY_TENSORS / op),
        (harness.COPY, 2e-3),
    ):
        _add(harness, report, "32x16", impl, seconds)
    report.finish_turns()
    rows = {d["impl"]: d for d in report.table_rows()}
    # the proxy moves its bytes as fast as the copy moves the op's: 1, not op / 4
    assert rows[harness.PROXY]["vs_copy"] == pytest.approx(1.0, rel=0.3)
    assert rows["fused_iwn[cuda]"]["vs_copy"] == pytest.approx(0.5, rel=0.3)


def test_the_shapes_override_gives_each_file_the_shapes_of_its_rank(harness, monkeypatch):
    """One SURGELLM_BENCH_SHAPES serves the 2-D ops and the 4-D BatchNorm
    file: a 4-D shape given to a 2-D op failed to unpack, and a 2-D one
    failed channels_last."""
    monkeypatch.setenv(harness.SHAPES_ENV, "32x16,8x4x3x3,4096x768")
    assert harness.shapes([(1, 2)]) == [(32, 16), (4096, 768)]
    assert harness.shapes([(1, 2, 3, 4)]) == [(8, 4, 3, 3)]
    monkeypatch.setenv(harness.SHAPES_ENV, "32x16")
    assert harness.shapes([(1, 2, 3, 4)]) == []  # no case, not the defaults
    monkeypatch.delenv(harness.SHAPES_ENV)
    assert harness.shapes([(1, 2, 3, 4)]) == [(1, 2, 3, 4)]
