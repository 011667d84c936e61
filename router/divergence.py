"""Early divergence, live: how many leading tokens of a request's stable prefix (the routing key's first P token
ids) some recent request of the same tenant shared. A rollout that puts something variable near the top of the
prompt (a timestamp, a request id) drives it down to that token position.

No token ids or text are kept: per tenant, a bounded set of 64-bit hashes of the request prefixes that end at
every G-th token, seeded by the tenant's key (equal prefixes of two tenants hash apart). A request's shared depth
is the deepest of its checkpoints whose hash the set holds. Cost: about log2(P/G) hash calls and set lookups
for a prefix seen before; one hash call per checkpoint past the shared depth, and one set update, otherwise.
"""

from __future__ import annotations

from collections import OrderedDict
from hashlib import blake2b

from xxhash import xxh3_64_intdigest

GRANULE = 8  # G: tokens between checkpoints


class _TenantHashes:
    """Two generations of hashes: a request's go to `cur`; when they would take it past half the capacity it
    becomes `old` and the previous `old` is dropped. A hash is kept for at least capacity/2 - P/G insertions after
    it was last seen: an approximate LRU set at the cost of one set update per request."""

    __slots__ = ("seed", "cur", "old")

    def __init__(self, seed: int):
        self.seed = seed
        self.cur: set[int] = set()
        self.old: set[int] = set()


class DivergenceTracker:
    """Per tenant (at most `max_tenants`, the least recently active dropped) at most `hashes_per_tenant` hashes."""

    def __init__(self, hashes_per_tenant: int = 2048, max_tenants: int = 256, granule: int = GRANULE):
        self.half = max(1, hashes_per_tenant // 2)
        self.max_tenants = max_tenants
        self.step = granule * 4  # bytes: token ids are packed as uint32
        self._tenants: OrderedDict[str, _TenantHashes] = OrderedDict()
        self._ends: dict[int, range | list[int]] = {}  # packed length -> checkpoint ends (bytes)

    def observe(self, tenant_id: str, key: bytes, packed: bytes) -> int | None:
        """The leading tokens of the packed ids (array("I").tobytes()) that a recent request of this tenant shared:
        0 if none, else a multiple of G, or all of them for an identical prefix. Then remembers this request.
        None for the tenant's first request (nothing to compare with)."""
        state = self._tenants.get(tenant_id)
        first = state is None
        if state is None:
            state = self._tenants[tenant_id] = _TenantHashes(_seed(key))
            if len(self._tenants) > self.max_tenants:
                self._tenants.popitem(last=False)
        else:
            self._tenants.move_to_end(tenant_id)
        if not packed:
            return None if first else 0
        ends = self._ends.get(len(packed))
        if ends is None:
            ends = self._checkpoints(len(packed))
        seed, n = state.seed, len(ends)
        cur, old = state.cur, state.old
        if not first and xxh3_64_intdigest(packed, seed) in cur:
            # The whole prefix again, recently (the usual repeat): every checkpoint is held (they are a leading
            # run) and this request would add none, so one hash answers what the bisection would.
            return len(packed) >> 2
        # Prefixes nest and a request's checkpoints all go into `cur` together, so a shallower checkpoint of a
        # prefix is never forgotten before a deeper one: the held checkpoints are a leading run (bisection finds
        # its end), and so are those in `cur` (when the deepest held is there, so are all before it).
        lo, hi, deepest = 0, n, 0
        while lo < hi:
            mid = (lo + hi) // 2
            h = xxh3_64_intdigest(packed[: ends[mid]], seed)
            if h in cur or h in old:
                lo, deepest = mid + 1, h
            else:
                hi = mid
        recent = lo > 0 and deepest in cur
        if lo < n or not recent:
            top = lo if recent else 0
            if len(cur) + n - top > self.half:
                state.old, cur = cur, set()
                state.cur = cur
                top = 0  # the new generation holds the whole run
            cur.update([xxh3_64_intdigest(packed[:e], seed) for e in ends[top:]])
        if first:
            return None
        return ends[lo - 1] >> 2 if lo else 0

    def _checkpoints(self, n: int) -> range | list[int]:
        ends: range | list[int] = range(self.step, n + 1, self.step)
        if n % self.step:
            ends = [*ends, n]
        if len(self._ends) < 4096:
            self._ends[n] = ends
        return ends

    def held(self) -> int:
        """Hashes held, all tenants together (at most hashes_per_tenant per tenant)."""
        return sum(len(t.cur) + len(t.old) for t in self._tenants.values())


def _seed(key: bytes) -> int:
    return int.from_bytes(blake2b(b"divergence", key=key[:64], digest_size=8).digest(), "little")
