"""Starting the engine's background task detached from the caller's task."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import sniffio


def spawn_background(fn: Callable[[], Awaitable[None]]) -> object:
    """Start ``fn`` outside any task group, so ``start`` and ``aclose`` may run in different
    tasks (Jupyter cells, framework lifespans). ``fn`` must never raise. Returns a handle to
    keep alive (asyncio holds tasks only weakly)."""
    if sniffio.current_async_library() == "trio":
        import trio

        trio.lowlevel.spawn_system_task(fn)
        return None
    import asyncio

    return asyncio.get_running_loop().create_task(fn())  # type: ignore[arg-type]
