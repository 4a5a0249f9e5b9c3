"""torch.library.opcheck on the user-facing ops: the schema (no output
aliases an input, mutations declared), the autograd registration, the fake
kernels against the real ones, and AOT dispatch with dynamic shapes."""

import pytest
import torch
from torch.library import opcheck

from surgellm_kernels import backends

pytestmark = pytest.mark.skipif(
    not backends()["cpu"].available, reason="the C++ extension is not built"
)
F, C = 5, 3


def _leaf(shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype).requires_grad_()


def _assert_passes(op, args, kwargs=None):
    result = opcheck(op, args, kwargs or {})
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("gate", [None, "vec", "full"])
@pytest.mark.parametrize("training", [True, False])
def test_iwn(dtype, gate, training):
    x = _leaf((2, 4, F), dtype)
    labels = torch.arange(8).remainder(C).view(2, 4) if training else None
    g = {None: None, "vec": _leaf(F), "full": _leaf((2, 4, F), dtype)}[gate]
    args = (x, labels, g, _leaf(F), _leaf(F), torch.zeros(F), torch.ones(F))
    kwargs = dict(training=training, num_classes=C if training else None)
    _assert_passes(torch.ops.surgellm.iwn.default, args, kwargs)


@pytest.mark.parametrize("channels_last", [False, True])
def test_iwn_channels_first(channels_last):
    x = torch.randn(4, F, 3, 2)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    args = (x.requires_grad_(), torch.arange(4).remainder(C), None, _leaf(F), None)
    kwargs = dict(training=True, num_classes=C, feature_dim=1)
    _assert_passes(torch.ops.surgellm.iwn.default, (*args, torch.zeros(F), torch.ones(F)), kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("affine", [False, True])
def test_surgical_gate(dtype, affine):
    h, s, logits = (_leaf((2, 3, F), dtype) for _ in range(3))
    params = (_leaf(F), _leaf(F)) if affine else (None, None)
    _assert_passes(torch.ops.surgellm.surgical_gate.default, (h, s, logits, *params))
