"""What the router expects each worker's prefix cache to hold: an approximate copy, fed by the router's own
decisions, of block hash chains per worker, each worker's in an LRU of its cache's size in tokens (what the
worker reports on /health, else a default).

A prompt is cut into blocks at fixed character offsets: steps of C characters up to 8 C, then steps of an
eighth of the offset, so a prompt of n characters is O(log n) blocks and two prompts that share a prefix share
every block that ends inside it. Block i's hash chains block i-1's (xxh3, seeded by the tenant), so equal
hashes mean equal prefixes. `match` walks the chain while some worker holds it: O(matched blocks x holders).

Like SGLang's approximate radix tree, the index learns only from routing, not from the workers: it forgets a
block when its worker's LRU passes it, which follows the worker's own LRU when every request on that worker came
through this router.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import xxhash


def block_ends(n: int, chunk: int) -> list[int]:
    """Character offsets at which blocks end, for a text of n characters (the last block may end at n).
    Memoized per (n, chunk) for the lengths seen lately: the caller must not change the list."""
    ends = _ENDS.get((n, chunk))
    if ends is None:
        ends, e = [], 0
        while e < n:
            e = min(n, e + max(chunk, e // 8))
            ends.append(e)
        if len(_ENDS) >= 4096:
            _ENDS.clear()
        _ENDS[(n, chunk)] = ends
    return ends


_ENDS: dict[tuple[int, int], list[int]] = {}


def chain(data: bytes, chunk: int, seed: int) -> tuple[list[int], list[int]]:
    """Block hashes of `data` and the byte offsets at which the blocks end."""
    ends = block_ends(len(data), chunk)
    hashes, h, start = [], seed, 0
    view = memoryview(data)
    digest = xxhash.xxh3_64_intdigest
    for e in ends:
        h = digest(view[start:e], h)  # the parent's hash seeds the block's
        hashes.append(h)
        start = e
    return hashes, ends


class PrefixIndex:
    def __init__(self, tokens_per_worker: int = 400_000):
        self.default_budget = tokens_per_worker
        self._budget: dict[str, int] = {}  # worker -> tokens its cache holds, where the worker says
        self._holders: dict[int, dict[str, None]] = {}  # block hash -> workers expected to hold it
        self._lru: dict[str, OrderedDict[int, int]] = {}  # worker -> its blocks (hash -> tokens), oldest first
        self._used: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def set_budget(self, worker: str, tokens: int) -> None:
        self._budget[worker] = tokens

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Leading blocks of `hashes` each worker is expected to hold (workers holding none are left out)."""
        depth: dict[str, int] = {}
        if not hashes:
            return depth
        first = self._holders.get(hashes[0])
        if not first:
            return depth
        alive = set(first)
        i = 1
        while i < len(hashes):
            hs = self._holders.get(hashes[i])
            if not hs:
                break
            if len(hs) < len(alive) or not alive.issubset(hs.keys()):
                gone = alive - hs.keys()
                for w in gone:
                    depth[w] = i
                alive -= gone
                if not alive:
                    break
            i += 1
        for w in alive:
            depth[w] = i
        return depth

    def insert(self, worker: str, hashes: Sequence[int], tokens: Sequence[int]) -> None:
        """`worker` now holds these blocks; `tokens[i]` counts the prompt's tokens through block i."""
        lru = self._lru.get(worker)
        if lru is None:
            lru = self._lru[worker] = OrderedDict()
        used = self._used.get(worker, 0)
        # the root ends most recent: a chain is forgotten leaf first, as engines evict
        for i in range(len(hashes) - 1, -1, -1):
            h = hashes[i]
            holders = self._holders.get(h)
            if holders is None:
                holders = self._holders[h] = {}
            holders[worker] = None
            size = lru.get(h)
            if size is None:
                size = lru[h] = max(1, tokens[i] - (tokens[i - 1] if i else 0))
                used += size
            else:
                lru.move_to_end(h)
        budget = self._budget.get(worker, self.default_budget)
        while used > budget and lru:
            old, size = lru.popitem(last=False)
            used -= size
            self._drop(old, worker)
        self._used[worker] = used

    def forget_worker(self, worker: str) -> None:
        for h in self._lru.pop(worker, ()):
            self._drop(h, worker)
        self._used.pop(worker, None)
        self._budget.pop(worker, None)  # a worker that returns says its size again

    def _drop(self, h: int, worker: str) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.pop(worker, None)
            if not holders:
                del self._holders[h]
