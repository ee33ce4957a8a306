"""Host tensors onto the device without waiting for the device.

``torch.tensor(values, device="cuda")`` and ``host.to("cuda")`` copy from pageable memory and then
wait for the stream: every kernel queued before them (a forward in flight) must finish first. A
step built while the previous one runs (the engine's scheduling ahead) must not wait, so its host
data goes through page-locked memory with ``non_blocking=True``.
"""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device``. To CUDA through page-locked memory, so the copy is asynchronous: the host
    goes on building while it runs. torch's caching host allocator keeps the page-locked block alive
    until the copy is done. On CPU the tensor itself."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def tensor_on(values: list[int] | list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device`` without a wait (``to_device``)."""
    return to_device(torch.tensor(values, dtype=dtype), device)
