"""What differs between asyncio and trio: starting a detached task, waking the loop from a thread."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable

import anyio
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


class Waker:
    """Wakes one waiting task of the loop it was made on, from the loop or from any thread.

    ``anyio.Event.set`` is not thread-safe, so another thread (or a finalizer, which may run
    anywhere, even inside the loop's own code) never calls it: ``wake_threadsafe`` schedules
    the set on the loop (``call_soon_threadsafe`` / trio's ``run_sync_soon``). Create it on
    the loop.
    """

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._loop_thread = threading.get_ident()
        if sniffio.current_async_library() == "trio":
            import trio

            self._call_soon: Callable[[Callable[[], object]], object] = trio.lowlevel.current_trio_token().run_sync_soon
        else:
            import asyncio

            self._call_soon = asyncio.get_running_loop().call_soon_threadsafe

    def wake(self) -> None:
        """From the loop thread, in ordinary code (not a finalizer)."""
        assert threading.get_ident() == self._loop_thread, "Waker.wake() off the loop: use wake_threadsafe()"
        self._event.set()

    def wake_threadsafe(self) -> None:
        """From any thread, finalizers included. A loop already closed needs no waking."""
        try:
            self._call_soon(self._set)
        except RuntimeError:  # asyncio: the loop is closed
            pass
        except Exception as exc:  # trio: RunFinishedError
            if type(exc).__name__ != "RunFinishedError":
                raise

    def _set(self) -> None:
        self._event.set()

    async def wait(self, ready: Callable[[], bool]) -> None:
        """Until ``ready()`` holds; checks it first (no await between the check and the
        wait, so a wake cannot slip between them)."""
        while not ready():
            self._event = anyio.Event()
            await self._event.wait()
