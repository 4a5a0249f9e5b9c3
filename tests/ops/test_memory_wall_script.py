"""scripts/memory_wall.py --phases: every phase of one IWN and one gate
training step is found in the profile, timed and given its ideal bytes."""

import importlib.util
from pathlib import Path

import pytest
import torch

from surgellm_kernels import backends

pytestmark = pytest.mark.skipif(
    not backends(torch.device("cpu"))["cpu"].available, reason="the C++ extension is not built"
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "memory_wall.py"


def load_script():
    spec = importlib.util.spec_from_file_location("memory_wall", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_phases_profile_every_phase(capsys):
    memory_wall = load_script()
    table, addcmul_gbs = memory_wall.phases(64, 48, torch.float32, calls=2)
    assert set(table) == set(memory_wall.PHASE_TENSORS)
    assert addcmul_gbs > 0
    for phase, row in table.items():
        assert row["ms"] > 0, phase
        assert (row["gb_per_s"] > 0) == (row["tensors"] > 0), phase
    out = capsys.readouterr().out
    assert "_iwn_group_moments" in out and "_surgical_gate_backward" in out


def test_sorted_labels_are_the_same_labels_in_runs(capsys):
    memory_wall = load_script()
    shuffled = memory_wall.class_labels(500, 10, torch.Generator().manual_seed(3))
    ordered = memory_wall.class_labels(500, 10, torch.Generator().manual_seed(3), True)
    assert not torch.equal(shuffled, ordered)
    assert torch.equal(ordered, shuffled.sort().values)
    assert (ordered.diff() != 0).sum() == len(ordered.unique()) - 1  # one run per class
    table = memory_wall.label_order(64, 48, torch.float32, calls=2, rounds=2)
    assert {p for p in table} == {p for p in memory_wall.PHASE_TENSORS if "_iwn_" in p}
    assert all(shuffled > 0 and ordered > 0 for shuffled, ordered in table.values())
    assert "random / sorted" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,named",
    [
        (["--threads", "0"], "--threads"),
        (["--rounds", "0"], "--rounds"),
        (["--calls", "-1"], "--calls"),
        (["--shapes", "64"], "--shapes"),
        (["--shapes", "64x8,"], "--shapes"),
        (["--shapes", "0x8"], "--shapes"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, named, monkeypatch, capsys):
    """Each was a traceback (or, for a trailing comma, a traceback after the
    first shape's results)."""
    memory_wall = load_script()
    monkeypatch.setattr("sys.argv", ["memory_wall.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        memory_wall.main()
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert named in captured.err and captured.out == ""


def test_iwn_vs_batchnorm_refuses_an_unknown_dtype(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "iwn_vs_batchnorm", SCRIPT.parent / "iwn_vs_batchnorm.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr("sys.argv", ["iwn_vs_batchnorm.py", "--dtypes", "foo"])
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    assert exit_info.value.code == 2
    assert "argument --dtypes: invalid choice" in capsys.readouterr().err


def test_shapes_are_read_as_pairs():
    assert load_script().shape_list("4096x768, 7x3") == [(4096, 768), (7, 3)]
