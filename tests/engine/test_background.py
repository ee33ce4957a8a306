"""kvloom.engine.background uses the running loop's own primitives: asyncio's, or trio's, also when
trio runs as a guest on an asyncio loop (there ``asyncio.get_running_loop()`` answers as well, so
asking asyncio alone would pick the wrong one)."""

from __future__ import annotations

import asyncio
import threading

import anyio
import trio

from kvloom.engine.background import Waker, spawn_background


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


async def _spawn_then_wake_from_a_thread() -> tuple[object, bool]:
    """Spawn a detached task that records whether trio runs it, then has another thread wake this
    task; returns ``spawn_background``'s handle and the record."""
    waker = Waker()
    ran_in_trio: list[bool] = []

    async def detached() -> None:
        ran_in_trio.append(_in_trio())
        threading.Thread(target=waker.wake_threadsafe).start()

    handle = spawn_background(detached)
    with anyio.fail_after(5):
        await waker.wait(lambda: bool(ran_in_trio))
    return handle, ran_in_trio[0]


def test_on_asyncio_the_detached_task_is_an_asyncio_task() -> None:
    handle, ran_in_trio = asyncio.run(_spawn_then_wake_from_a_thread())
    assert isinstance(handle, asyncio.Task) and not ran_in_trio


def test_on_trio_the_detached_task_is_a_trio_system_task() -> None:
    handle, ran_in_trio = trio.run(_spawn_then_wake_from_a_thread)
    assert handle is None and ran_in_trio


def test_trio_as_a_guest_of_asyncio_is_still_trio() -> None:
    async def host() -> tuple[object, bool]:
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        trio.lowlevel.start_guest_run(
            _spawn_then_wake_from_a_thread, run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            done_callback=finished.set_result,
        )
        result: tuple[object, bool] = (await finished).unwrap()
        return result

    handle, ran_in_trio = asyncio.run(host())
    assert handle is None and ran_in_trio
