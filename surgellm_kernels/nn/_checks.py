"""What the modules check alike: the sizes they are built with, and whether
a tensor has a value to read."""

import operator
from typing import Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake


def check_counts(**counts: int) -> Tuple[int, ...]:
    """Sizes a module is built with (num_features, num_tasks, ...): positive
    integers (numpy's and 0-d integer tensors too, as ``nn.BatchNorm2d``
    takes them), returned as Python ints in the order given."""
    ints = []
    for name, v in counts.items():
        try:
            value = None if isinstance(v, bool) else operator.index(v)
        except TypeError:
            value = None
        if value is None or value < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
        ints.append(value)
    return tuple(ints)


def holds_data(t: Tensor) -> bool:
    """False for meta and fake tensors (shape inference, tracing), which have
    no data, and for any tensor while a fake mode is active."""
    return not (
        t.is_meta
        or is_fake(t)
        or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
    )


def is_vmapped(t: Tensor) -> bool:
    """Whether ``t`` is batched by ``torch.vmap`` at any level, under other
    ``torch.func`` wrappers too (``vmap(grad(f))`` hands ``f`` its batched
    inputs wrapped for ``grad``): a batched tensor has no one value to read."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False
