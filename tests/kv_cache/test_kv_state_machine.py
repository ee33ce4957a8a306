"""The KV cache manager under random sequences of operations (hypothesis, stateful).

Rules: new requests (with prefix-cache lookups), growing a request, computing its tokens (which
caches its full blocks), forking, freeing, pinning and unpinning prefixes, resetting the prefix
cache. A model alongside records what each physical block holds (the tokens whose KV was written
into it). After every operation:

- the pool's own invariants hold (free queue == blocks with refcount 0, cached hashes consistent);
- every refcount is exactly the number of request tables and pins holding the block (never negative),
  and free + used = total;
- no block is listed twice in one request's table;
- every cached block holds exactly the tokens it is cached under, and a request's prefix hits hold
  exactly its own tokens at those positions (a hit never serves another prefix's KV);
- pinned blocks are never evicted: they stay cached, holding the same tokens;
- a request only ever writes into blocks it alone holds.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from kvloom.kv_cache.block_pool import BlockId
from kvloom.kv_cache.manager import KVCacheManager
from tests.fakes import state_machine_settings

BLOCK_SIZE = 4
NUM_BLOCKS = 24

# A tiny alphabet and shared stems make prefix hits (and hash-chain reuse) common.
STEMS = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5]]
prompts = st.builds(
    lambda stem, tail: stem + tail,
    st.sampled_from([[], *STEMS]),
    st.lists(st.integers(0, 6), min_size=1, max_size=14),
)


class KVManagerMachine(RuleBasedStateMachine):
    requests = Bundle("requests")
    pins = Bundle("pins")

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, watermark=0.1)
        self.tokens: dict[str, list[int]] = {}
        """Each live request's tokens (its table covers all of them)."""
        self.computed: dict[str, int] = {}
        """How many of them have their KV written."""
        self.content: dict[int, dict[int, int]] = {}
        """Physical block -> {offset: token} written into it (the model of the KV memory)."""
        self.pinned: dict[int, tuple[list[BlockId], list[int]]] = {}
        self.next_id = 0

    # ---- rules ---------------------------------------------------------------------------
    @rule(target=requests, token_ids=prompts)
    def new_request(self, token_ids: list[int]) -> str:
        rid = f"r{self.next_id}"
        self.next_id += 1
        hits = self.kv.find_cached_prefix(rid, token_ids)
        for i, bid in enumerate(hits):  # a hit holds exactly this request's tokens there
            assert self._block_tokens(bid) == token_ids[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
        free_before = self.kv.pool.num_free_blocks
        if self.kv.allocate_slots(rid, len(token_ids), new_request=True, cached=hits) is None:
            assert self.kv.pool.num_free_blocks == free_before, "a refused allocation takes nothing"
            self.kv.free(rid)  # drops the lookup's hashes, as the scheduler does
            return rid
        self.tokens[rid] = list(token_ids)
        self.computed[rid] = len(hits) * BLOCK_SIZE
        return rid

    @rule(rid=requests, extra=st.lists(st.integers(0, 6), min_size=1, max_size=6))
    def grow(self, rid: str, extra: list[int]) -> None:
        if rid not in self.tokens or self.computed[rid] < len(self.tokens[rid]):
            return  # decode appends only after the previous tokens were computed
        new_len = len(self.tokens[rid]) + len(extra)
        free_before = self.kv.pool.num_free_blocks
        if self.kv.allocate_slots(rid, new_len) is None:
            assert self.kv.pool.num_free_blocks == free_before
            return
        self.tokens[rid].extend(extra)

    @rule(rid=requests)
    def compute(self, rid: str) -> None:
        if rid not in self.tokens:
            return
        tokens, blocks = self.tokens[rid], self.kv.get_block_ids(rid)
        for pos in range(self.computed[rid], len(tokens)):
            bid = blocks[pos // BLOCK_SIZE]
            assert self.kv.pool.blocks[bid].ref_cnt == 1, f"{rid} writes into block {bid}, which others hold"
            self.content.setdefault(bid, {})[pos % BLOCK_SIZE] = tokens[pos]
        self.computed[rid] = len(tokens)
        self.kv.cache_computed_blocks(rid, tokens, len(tokens))

    @rule(target=requests, src=requests)
    def fork(self, src: str) -> str:
        dst = f"r{self.next_id}"
        self.next_id += 1
        if src not in self.tokens or self.computed[src] < len(self.tokens[src]):
            return dst
        num_tokens = len(self.tokens[src])
        copies = self.kv.fork(src, dst, num_tokens)
        if copies is None:
            return dst
        for s, d in copies:  # the runner copies the block's KV before the next forward
            self.content[d] = dict(self.content.get(s, {}))
        self.tokens[dst] = list(self.tokens[src])
        self.computed[dst] = num_tokens - 1  # dst writes its own last token
        return dst

    @rule(rid=consumes(requests))
    def free(self, rid: str) -> None:
        if rid in self.tokens:
            self.kv.free(rid)
            del self.tokens[rid], self.computed[rid]

    @rule(target=pins, token_ids=prompts)
    def pin(self, token_ids: list[int]) -> int:
        held = self.kv.pin(token_ids)
        key = self.next_id
        self.next_id += 1
        self.pinned[key] = (held, token_ids[: len(held) * BLOCK_SIZE])
        return key

    @rule(key=consumes(pins))
    def unpin(self, key: int) -> None:
        held, _ = self.pinned.pop(key)
        self.kv.unpin(held)

    @rule()
    def reset_prefix_cache(self) -> None:
        held = {b.block_id for b in self.kv.pool.hash_to_block.values() if b.ref_cnt > 0}
        self.kv.reset_prefix_cache()
        assert {b.block_id for b in self.kv.pool.hash_to_block.values()} == held

    # ---- invariants ----------------------------------------------------------------------
    def _block_tokens(self, bid: BlockId) -> list[int]:
        written = self.content.get(bid, {})
        return [written.get(i, -1) for i in range(BLOCK_SIZE)]

    @invariant()
    def refcounts_are_exactly_the_holders(self) -> None:
        pool = self.kv.pool
        pool.check_invariants()
        expected = [0] * NUM_BLOCKS
        for rid in self.tokens:
            table = self.kv.get_block_ids(rid)
            assert len(set(table)) == len(table), f"{rid} lists a block twice: {table}"
            assert len(table) == -(-len(self.tokens[rid]) // BLOCK_SIZE)
            for bid in table:
                expected[bid] += 1
        for held, _ in self.pinned.values():
            for bid in held:
                expected[bid] += 1
        assert [b.ref_cnt for b in pool.blocks] == expected
        assert pool.num_free_blocks == expected.count(0)
        assert pool.num_free_blocks + sum(1 for n in expected if n) == NUM_BLOCKS

    @invariant()
    def cached_blocks_hold_their_tokens(self) -> None:
        for block in self.kv.pool.hash_to_block.values():
            assert list(block.token_ids) == self._block_tokens(block.block_id)

    @invariant()
    def pinned_blocks_are_never_evicted(self) -> None:
        for held, token_ids in self.pinned.values():
            for i, bid in enumerate(held):
                block = self.kv.pool.blocks[bid]
                assert block.block_hash is not None, f"pinned block {bid} was evicted"
                assert list(block.token_ids) == token_ids[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]

    def teardown(self) -> None:
        for rid in list(self.tokens):
            self.kv.free(rid)
        for held, _ in self.pinned.values():
            self.kv.unpin(held)
        self.kv.check_all_free()


KVManagerMachine.TestCase.settings = state_machine_settings(ci_examples=150, stress_examples=2000)
test_kv_manager_state_machine = KVManagerMachine.TestCase
