"""Block store of the prefix cache: index by chain hash, refcounts, LRU eviction inside a byte budget.

Payload-agnostic: the real worker stores a KV page id per block (the page pool frees the page when the
cache lets it go: `on_evict`), the sim backend stores nothing and charges the same bytes. Invariants:
- a cached block's parent is cached (a child is always evicted before its parent);
- a block with refcount > 0 (pinned by a running request) is never evicted;
- used bytes never exceed the capacity: a block that cannot be made room for is not inserted.
Only unpinned blocks sit in the LRU list. Chains are released leaf-first, so a child is always older
in the LRU than its parent and the LRU front is a leaf.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.engine.blocks import block_hash, root_hash


@dataclass(eq=False)
class Block:
    hash: bytes
    parent: Block | None
    token_ids: tuple[int, ...]
    payload: Any
    nbytes: int
    refcount: int = 0
    children: int = 0


@dataclass
class CacheStats:
    lookups: int = 0
    lookup_tokens: int = 0
    hit_tokens: int = 0
    inserted_blocks: int = 0
    evicted_blocks: int = 0
    rejected_blocks: int = 0


@dataclass
class BlockCache:
    block_size: int
    capacity_bytes: int
    _index: dict[bytes, Block] = field(default_factory=dict)
    _lru: OrderedDict[bytes, Block] = field(default_factory=OrderedDict)
    used_bytes: int = 0
    stats: CacheStats = field(default_factory=CacheStats)
    on_evict: Callable[[Any], None] | None = None  # told each evicted block's payload

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, h: bytes) -> bool:
        return h in self._index

    # ---- lookup -------------------------------------------------------------------------------------------

    @property
    def evictable(self) -> int:
        """Blocks no running request pins: all of them can be evicted (leaves first)."""
        return len(self._lru)

    def acquire_prefix(self, token_ids: Sequence[int], salt: str | None, max_blocks: int,
                       record: bool = True) -> list[Block]:
        """Pin and return the longest run of cached full blocks from the start of `token_ids`; `record`: count
        the lookup in the stats (an engine that may hand the pins back counts it with `record_lookup`)."""
        B = self.block_size
        parent = root_hash(salt)
        found: list[Block] = []
        for i in range(min(max_blocks, len(token_ids) // B)):
            toks = tuple(token_ids[i * B:(i + 1) * B])
            h = block_hash(parent, toks)
            blk = self._index.get(h)
            # Compare the tokens too: a hash collision must never serve another prefix's KV.
            if blk is None or blk.token_ids != toks:
                break
            found.append(blk)
            parent = h
        for blk in found:
            self._pin(blk)
        if record:
            self.record_lookup(len(token_ids), len(found) * B)
        return found

    def record_lookup(self, tokens: int, hit_tokens: int) -> None:
        self.stats.lookups += 1
        self.stats.lookup_tokens += tokens
        self.stats.hit_tokens += hit_tokens

    # ---- insertion ----------------------------------------------------------------------------------------

    def child_hash(self, parent: Block | None, salt: str | None, token_ids: Sequence[int]) -> bytes:
        return block_hash(parent.hash if parent is not None else root_hash(salt), token_ids)

    def get(self, h: bytes, token_ids: Sequence[int]) -> Block | None:
        """A cached block by hash, pinned, if its tokens match."""
        blk = self._index.get(h)
        if blk is None or blk.token_ids != tuple(token_ids):
            return None
        self._pin(blk)
        return blk

    def insert(self, h: bytes, parent: Block | None, token_ids: Sequence[int], payload: Any,
               nbytes: int) -> Block | None:
        """Insert a new block (pinned) under a pinned `parent`; None if it can't fit or the hash is taken."""
        if h in self._index or nbytes > self.capacity_bytes:
            self.stats.rejected_blocks += 1
            return None
        if parent is not None and parent.hash not in self._index:
            raise ValueError("parent block is not cached")
        if not self._make_room(nbytes):
            self.stats.rejected_blocks += 1
            return None
        blk = Block(h, parent, tuple(token_ids), payload, nbytes, refcount=1)
        self._index[h] = blk
        self.used_bytes += nbytes
        if parent is not None:
            parent.children += 1
        self.stats.inserted_blocks += 1
        return blk

    def release(self, blocks: Sequence[Block]) -> None:
        """Unpin a chain (given root-first); released leaf-first so children age before parents."""
        for blk in reversed(blocks):
            blk.refcount -= 1
            if blk.refcount < 0:
                raise RuntimeError("block released more often than acquired")
            if blk.refcount == 0 and blk.hash in self._index:
                self._lru[blk.hash] = blk

    # ---- internals ----------------------------------------------------------------------------------------

    def _pin(self, blk: Block) -> None:
        if blk.refcount == 0:
            self._lru.pop(blk.hash, None)
        blk.refcount += 1

    def _make_room(self, nbytes: int) -> bool:
        while self.used_bytes + nbytes > self.capacity_bytes:
            victim = self._lru_leaf()
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _lru_leaf(self) -> Block | None:
        for blk in self._lru.values():
            if blk.children == 0:
                return blk
        return None

    def evict_one(self) -> bool:
        """Evict the least recently used unpinned leaf; False if every block is pinned."""
        victim = self._lru_leaf()
        if victim is None:
            return False
        self._evict(victim)
        return True

    def _evict(self, blk: Block) -> None:
        del self._lru[blk.hash]
        del self._index[blk.hash]
        self.used_bytes -= blk.nbytes
        if blk.parent is not None:
            blk.parent.children -= 1
        payload, blk.payload = blk.payload, None
        self.stats.evicted_blocks += 1
        if self.on_evict is not None:
            self.on_evict(payload)

    def clear(self) -> None:
        """Drop every unpinned block (pinned ones stay: running requests own them)."""
        while self.evict_one():
            pass
