"""The requests the app is answering now, so that a server shutting down can end them.

A request is tracked from when the app hands it to the engine until its answer is sent or
its stream closed. ``abort_all`` ends every tracked request in the engine: each finishes with
``finish_reason="abort"``, so a stream sends its last chunk and ``[DONE]`` and a waiting
request gets its partial answer, instead of a connection cut mid-response.

Invariants: used on the event loop only (the app's routes, and a server's shutdown scheduled
on that loop). Tickets are held weakly, so one whose holder is gone without finishing (a
streaming response never started) stops being tracked by itself. A request still being
tokenized in a worker thread (a very long prompt) is not in the engine yet, and an abort does
not reach it; the server's own shutdown timeout bounds that case.
"""

from __future__ import annotations

import weakref

from kvloom.engine.async_engine import AsyncEngine


class Ticket:
    """One tracked request; the route (or its response stream) holds it while it runs."""

    __slots__ = ("__weakref__", "request_id")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id


class InFlight:
    """The app's in-flight requests over ``engine``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._tickets: weakref.WeakSet[Ticket] = weakref.WeakSet()

    def start(self, request_id: str) -> Ticket:
        """Track ``request_id`` (the id the engine knows it by) until ``finish``."""
        ticket = Ticket(request_id)
        self._tickets.add(ticket)
        return ticket

    def finish(self, ticket: Ticket) -> None:
        """Stop tracking ``ticket`` (idempotent)."""
        self._tickets.discard(ticket)

    def request_ids(self) -> list[str]:
        """The tracked requests' ids, sorted."""
        return sorted(t.request_id for t in self._tickets)

    def abort_all(self) -> int:
        """Abort every tracked request in the engine; returns how many. They stay tracked until
        their answers are sent (within about one engine step)."""
        ids = self.request_ids()
        for request_id in ids:
            self._engine.abort(request_id)
        return len(ids)
