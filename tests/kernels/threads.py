"""Running a kernel on a given number of torch threads (results must not depend on it)."""

from collections.abc import Callable

import torch


def with_threads(n: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()`` with ``torch.set_num_threads(n)``, the count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)
