"""``kvloom serve`` in a real process on 127.0.0.1, stopped as a user stops it (SIGINT, Ctrl+C)
while a long stream is in flight: the first interrupt lets it run for ``--shutdown-grace``
seconds, then aborts it; a second interrupt aborts it at once. Either way the stream ends
cleanly (``finish_reason="abort"``, then ``[DONE]``), the process exits 0 in bounded time and
prints no traceback."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest

pytestmark = pytest.mark.slow

STARTUP_S = 180.0
"""How long the server may take to import, load the demo model and answer /health (2 busy CPUs)."""
EXIT_S = 60.0
"""How long the process may take to exit once the streams are aborted (it closes the engine)."""
LONG = {"model": "demo", "prompt": "Tell me everything.", "max_tokens": 2000, "ignore_eos": True, "stream": True}
"""A stream of minutes on this model: it ends early only when aborted."""


class Server:
    """One ``python -m kvloom serve`` process; its stderr is collected as it comes."""

    def __init__(self, model: Path, *flags: str) -> None:
        with socket.socket() as probe:  # a free port (the server binds it again at once)
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvloom", "serve", "--model", str(model), "--model-name", "demo",
             "--port", str(self.port), *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "".join(self.stderr)
            try:
                if httpx2.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready after {STARTUP_S} s:\n{''.join(self.stderr)}")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.stderr):
            assert time.monotonic() < deadline, f"no {text!r} in the log:\n{''.join(self.stderr)}"
            time.sleep(0.05)

    def interrupt(self) -> float:
        """SIGINT, as Ctrl+C sends it; returns when it was sent."""
        self.proc.send_signal(signal.SIGINT)
        return time.monotonic()

    def wait_exit(self) -> tuple[int, str]:
        """The exit status and the whole stderr; fails if the process outlives ``EXIT_S``."""
        try:
            code = self.proc.wait(timeout=EXIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running {EXIT_S} s after the streams should have ended:\n"
                                 f"{''.join(self.stderr)}") from None
        self._reader.join(10)
        return code, "".join(self.stderr)


class Stream:
    """One long streamed completion, read in a thread: its SSE ``data:`` payloads and when it ended."""

    def __init__(self, url: str) -> None:
        self.events: list[str] = []
        self.ended_at: float | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        try:
            with httpx2.stream("POST", f"{url}/v1/completions", json=LONG, timeout=EXIT_S + STARTUP_S) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line.removeprefix("data: "))
        except BaseException as exc:  # the test reports it
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def wait_for_chunks(self, n: int) -> None:
        deadline = time.monotonic() + 60
        while len(self.events) < n:
            assert self.ended_at is None and time.monotonic() < deadline, (self.error, self.events)
            time.sleep(0.02)

    def join(self) -> None:
        self._thread.join(EXIT_S)
        assert self.ended_at is not None, "the stream is still open"

    def assert_aborted_cleanly(self) -> None:
        assert self.error is None, f"the stream was cut: {self.error!r}"
        assert self.events[-1] == "[DONE]", self.events[-3:]
        assert json.loads(self.events[-2])["choices"][0]["finish_reason"] == "abort", self.events[-3:]


@contextmanager
def serving(model: Path, *flags: str) -> Iterator[Server]:
    server = Server(model, *flags)
    try:
        server.wait_ready()
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def test_an_interrupt_gives_in_flight_streams_the_grace_period_then_aborts_them(demo_dir: Path) -> None:
    with serving(demo_dir, "--shutdown-grace", "2") as server:
        stream = Stream(server.url)
        stream.wait_for_chunks(3)
        interrupted = server.interrupt()
        code, stderr = server.wait_exit()
    stream.join()
    assert stream.ended_at is not None
    assert code == 0, stderr
    stream.assert_aborted_cleanly()
    assert stream.ended_at - interrupted >= 1.9, "aborted before the grace period was over"
    assert "Aborting 1 in-flight request(s): the 2 s grace period is over" in stderr, stderr
    assert "Traceback" not in stderr, stderr


def test_a_second_interrupt_aborts_in_flight_streams_at_once_without_tracebacks(demo_dir: Path) -> None:
    with serving(demo_dir) as server:  # the default grace period: 10 s
        stream = Stream(server.url)
        stream.wait_for_chunks(3)
        first = server.interrupt()
        server.wait_for_log("Shutting down")  # the first one is handled: the next is a second one
        server.interrupt()
        code, stderr = server.wait_exit()
    stream.join()
    assert stream.ended_at is not None
    assert code == 0, stderr
    stream.assert_aborted_cleanly()
    assert stream.ended_at - first < 10, "the stream waited for the grace period"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.count("\n") < 20, stderr
