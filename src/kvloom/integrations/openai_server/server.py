"""Running the app with uvicorn (``kvloom serve``): the port is bound before the model loads,
and a shutdown ends in bounded time, without tracebacks.

- ``bind(host, port)`` binds the listening socket first, so a busy port fails at once, before
  any weights load, with a ``ConfigError`` naming it. uvicorn listens on that socket once the
  app's lifespan has loaded the model (until then connections are refused).
- ``GracefulServer``: the first SIGINT or SIGTERM stops accepting connections and gives the
  in-flight requests ``grace`` seconds to finish, then aborts them; a second signal aborts them
  at once. An aborted request ends as kvloom ends any abort (``finish_reason="abort"``: a
  stream sends its last chunk and ``[DONE]``), so its connection closes cleanly; then the
  app's lifespan closes the engine and ``run`` returns. Unlike uvicorn's own handling, a
  second signal neither skips closing the engine nor leaves tasks to be cancelled at exit,
  and no signal is re-raised once the server stopped: nothing prints a traceback.
  uvicorn's ``timeout_graceful_shutdown``, ``grace`` + ``BACKSTOP_S``, still cancels whatever
  an abort did not end (a client that stopped reading).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI

from kvloom.errors import ConfigError

logger = logging.getLogger("uvicorn.error")
"""uvicorn's own logger: these lines come out with its format and ``--log-level``."""

BACKSTOP_S = 5
"""Seconds past the grace period after which uvicorn cancels the requests an abort did not end."""


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, not listening yet. ``SO_REUSEADDR`` (as uvicorn sets
    it) lets a restarted server take its port back from connections in TIME_WAIT, never from a
    server listening there. Raises ``ConfigError`` naming the flag at fault."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"--host: cannot resolve {host!r} ({exc.strerror})") from exc
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port: {host}:{port} is already in use (another server listens there); stop it "
                              "or pick another --port") from exc
        raise ConfigError(f"--host/--port: cannot listen on {host}:{port} ({exc.strerror})") from exc
    return sock


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str, grace: float) -> uvicorn.Config:
    """uvicorn's settings for ``GracefulServer``: its own timeout is the backstop past ``grace``."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=math.ceil(grace) + BACKSTOP_S)


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a bounded, quiet shutdown (see the module docstring).

    ``abort_in_flight`` aborts the app's in-flight requests and returns how many; it runs on
    the server's event loop, never in the signal handler itself.
    """

    def __init__(self, config: uvicorn.Config, abort_in_flight: Callable[[], int], grace: float) -> None:
        super().__init__(config)
        self._abort_in_flight = abort_in_flight
        self._grace = grace
        self._signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:  # uvicorn logs where it listens only for sockets it bound itself
            host, port = sockets[0].getsockname()[:2]
            logger.info("kvloom serving on http://%s:%d (CTRL+C stops it; in-flight requests then get %g s to "
                        "finish)", host if ":" not in host else f"[{host}]", port, self._grace)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """A signal handler: it only records the signal and schedules work on the loop."""
        self._signals += 1
        self.should_exit = True
        if self._loop is None or self._loop.is_closed():
            return
        if self._signals == 1:
            self._loop.call_soon_threadsafe(self._start_grace)
        else:
            self._loop.call_soon_threadsafe(self._abort, "interrupted again")

    def _start_grace(self) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_later(self._grace, self._abort, f"the {self._grace:g} s grace period is over")
        logger.info("Shutting down: in-flight requests get %g s to finish (CTRL+C again aborts them now)",
                    self._grace)

    def _abort(self, reason: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        aborted = self._abort_in_flight()
        if aborted:
            logger.warning("Aborting %d in-flight request(s): %s", aborted, reason)
