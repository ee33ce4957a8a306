"""What the layers with a fused C form on CPU share: taking ``kvloom.kernels.elementwise_cpu`` on request."""

from __future__ import annotations

from types import ModuleType


class FusesOnCpu:
    """A layer (``RMSNorm``, ``SiluAndMul``, ``ApplyRotary``) that can run ``kvloom.kernels.elementwise_cpu``.

    Until :meth:`fuse_on_cpu` is called, ``_kernels`` is None and the layer runs torch ops only; after it,
    the layer's forward uses the kernels for the inputs they take (each layer checks) and torch ops for
    the rest. The runner calls it on every such layer when the C attention backend runs.
    """

    _kernels: ModuleType | None = None

    def fuse_on_cpu(self) -> None:
        """Use the C kernels where they apply; raises ``NativeBuildError`` where they cannot be built."""
        from kvloom.kernels import elementwise_cpu

        elementwise_cpu.load()
        self._kernels = elementwise_cpu
