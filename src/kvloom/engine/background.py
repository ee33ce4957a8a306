"""What differs between asyncio and trio: starting a detached task, waking the loop from a thread.

Which of the two runs the caller is asked of anyio (``anyio.lowlevel.current_token``), the
library the engine's own waiting goes through: no other package is needed to tell them apart
(trio is imported only when trio is the one running, so the caller has it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel


def running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The asyncio loop running the caller, or None when trio runs it (anyio sees trio even as a
    guest on top of an asyncio loop, where ``asyncio.get_running_loop()`` would answer).

    Raises ``anyio.NoEventLoopError`` (a ``RuntimeError``) outside any event loop, and
    ``RuntimeError`` under an event loop anyio supports but this module does not."""
    native = anyio.lowlevel.current_token().native_token
    if isinstance(native, asyncio.AbstractEventLoop):
        return native
    import trio

    if isinstance(native, trio.lowlevel.TrioToken):
        return None
    raise RuntimeError(f"kvloom runs on asyncio or trio, not under {type(native).__module__}")


def event_loop_identity() -> object:
    """The event loop running the caller, as anyio sees it: the asyncio loop, or trio's token for
    the current run (also for trio as a guest on an asyncio loop)."""
    return anyio.lowlevel.current_token().native_token


def spawn_background(fn: Callable[[], Awaitable[None]]) -> object:
    """Start ``fn`` outside any task group, so ``start`` and ``aclose`` may run in different
    tasks (Jupyter cells, framework lifespans). ``fn`` must never raise. Returns a handle to
    keep alive (asyncio holds tasks only weakly)."""
    loop = running_asyncio_loop()
    if loop is None:
        import trio

        trio.lowlevel.spawn_system_task(fn)
        return None
    return loop.create_task(fn())  # type: ignore[arg-type]


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
        loop = running_asyncio_loop()
        if loop is None:
            import trio

            self._call_soon: Callable[[Callable[[], object]], object] = trio.lowlevel.current_trio_token().run_sync_soon
        else:
            self._call_soon = loop.call_soon_threadsafe

    def wake(self) -> None:
        """From the loop thread, in ordinary code (not a finalizer)."""
        assert threading.get_ident() == self._loop_thread, "Waker.wake() off the loop: use wake_threadsafe()"
        self._event.set()

    def wake_threadsafe(self) -> None:
        """From any thread, finalizers included. A loop already closed needs no waking."""
        self.post(self._set)

    def post(self, fn: Callable[[], object]) -> bool:
        """Run ``fn`` on the loop soon, from any thread (calls run in the order posted); False when the loop
        has closed, and ``fn`` will never run."""
        try:
            self._call_soon(fn)
        except RuntimeError:  # asyncio: the loop is closed
            return False
        except Exception as exc:  # trio: RunFinishedError
            if type(exc).__name__ != "RunFinishedError":
                raise
            return False
        return True

    def _set(self) -> None:
        self._event.set()

    async def wait(self, ready: Callable[[], bool]) -> None:
        """Until ``ready()`` holds; checks it first (no await between the check and the
        wait, so a wake cannot slip between them)."""
        while not ready():
            self._event = anyio.Event()
            await self._event.wait()
