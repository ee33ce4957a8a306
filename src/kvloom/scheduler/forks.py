"""Choices of an ``n > 1`` request that wait for their source's prompt KV, then fork it.

Choice 0 of an ``n > 1`` request runs as usual (the source); choices i > 0 (``Request.fork_of``)
wait here until the source has computed its prompt, then start from its KV: its whole blocks
shared, the block holding the last prompt token copied, and only that token to recompute for
their own logits. A source that ends or is preempted first releases its choices to the waiting
queue as ordinary requests (the prefix cache still shares its whole blocks with them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from kvloom.kv_cache.manager import KVCacheManager
from kvloom.scheduler.request import Request, RequestStatus


@dataclass(slots=True)
class ForkStart:
    """What ``Forks.start_ready`` did, for the scheduler to apply to its queues."""

    started: list[Request] = field(default_factory=list)
    """Choices now RUNNING on their source's KV, from the last prompt token: they join the running list."""
    released: list[Request] = field(default_factory=list)
    """Choices that found no seat or no free block: they queue as ordinary requests."""
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    """(source block, choice block) copies the runner applies before the next forward."""


class Forks:
    """The choices waiting for their source's prompt, by source request id.

    Owned by the ``Scheduler`` (engine thread only). A choice is here from ``add`` until
    ``start_ready`` starts it or ``release``/``remove`` take it out; meanwhile it is in the
    scheduler's ``requests`` but in neither its waiting queue nor its running list, and holds no
    blocks. Only a choice whose source the scheduler holds is added (else it queues at once)."""

    def __init__(self) -> None:
        self._source_to_forks: dict[str, list[Request]] = {}
        """Source request id -> its waiting choices, in arrival order."""

    def __len__(self) -> int:
        return sum(len(children) for children in self._source_to_forks.values())

    def __iter__(self) -> Iterator[Request]:
        return (child for children in self._source_to_forks.values() for child in children)

    def add(self, req: Request) -> None:
        """Wait for ``req.fork_of``'s prompt KV."""
        assert req.fork_of is not None
        self._source_to_forks.setdefault(req.fork_of, []).append(req)

    def remove(self, req: Request) -> bool:
        """Take ``req`` out (it ended while waiting here); False if it was not here."""
        if req.fork_of is not None and req in self._source_to_forks.get(req.fork_of, []):
            self._source_to_forks[req.fork_of].remove(req)
            return True
        return False

    def release(self, source_id: str) -> list[Request]:
        """The source can no longer be forked (it ended, or lost its KV): its choices, to queue as
        ordinary requests."""
        return self._source_to_forks.pop(source_id, [])

    def start_ready(self, requests: Mapping[str, Request], kv: KVCacheManager, num_free_seats: int) -> ForkStart:
        """Fork every choice whose source runs with its prompt computed, while ``num_free_seats``
        (running slots under ``max_num_seqs``) and free blocks last. At the first choice of a
        source that cannot fork, it and the rest of that source's choices are released."""
        start = ForkStart()
        for source_id in list(self._source_to_forks):
            source = requests[source_id]
            if source.status is not RequestStatus.RUNNING:
                continue
            if source.num_computed_tokens < source.num_prompt_tokens:
                continue
            children = self._source_to_forks.pop(source_id)
            for i, child in enumerate(children):
                has_seat = num_free_seats > 0
                copies = kv.fork(source_id, child.request_id, child.num_prompt_tokens) if has_seat else None
                if copies is None:
                    start.released.extend(children[i:])
                    break
                num_free_seats -= 1
                start.blocks_to_copy.extend((int(a), int(b)) for a, b in copies)
                child.num_computed_tokens = child.num_prompt_tokens - 1
                child.num_cached_tokens = source.num_cached_tokens
                child.status = RequestStatus.RUNNING
                start.started.append(child)
        return start
