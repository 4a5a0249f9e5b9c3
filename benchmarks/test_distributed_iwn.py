"""Data-parallel IWN: the cost of synchronized statistics, 2 gloo ranks.

The ranks run in processes of their own (benchmarks/distributed_iwn.py):
this benchmark's own time is the whole 2-process run, and the figures that
matter -- each rank's synced and unsynced step, their ratio, the bytes per
step -- go to the report and to ``extra_info``.
"""

import pytest
import torch.distributed as dist

import distributed_iwn
import harness

SECTION = "data-parallel IWN: synced vs unsynced statistics"
ROWS, STEPS = harness.sized(quick=(512, 5), default=(512, 20), full=(4096, 20))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")
def test_synced_iwn_two_ranks(benchmark, bench_report):
    result = benchmark.pedantic(
        distributed_iwn.measure, kwargs=dict(rows=ROWS, steps=STEPS), rounds=1, iterations=1
    )
    benchmark.extra_info.update({"op": "iwn", "impl": "synced, 2 ranks", **result})
    bench_report.add_section_line(SECTION, distributed_iwn.describe(result))
