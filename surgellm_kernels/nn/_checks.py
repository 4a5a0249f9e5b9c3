"""What the modules check alike: the sizes they are built with, and whether
a tensor has a value to read."""

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake


def check_counts(**counts: int) -> None:
    """Sizes a module is built with (num_features, num_tasks, ...): positive ints."""
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def holds_data(t: Tensor) -> bool:
    """False for meta and fake tensors (shape inference, tracing), which have
    no data, and for any tensor while a fake mode is active."""
    return not (
        t.is_meta
        or is_fake(t)
        or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
    )
