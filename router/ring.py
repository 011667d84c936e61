"""The consistent-hash ring (uhashring: virtual nodes, weights) and the ring order of workers from a key.

`order(key)` is every worker, distinct, in ring order from the key's position: the home worker first, then
the workers a spilled or overloaded key moves to. It is memoized per ring position, so a decision costs one
bisect (O(log vnodes)) once the ring is warm, whatever the number of workers, and a key's position is memoized
too (the last 65,536 keys), so a repeated key costs one dict lookup.
"""

from __future__ import annotations

from bisect import bisect
from hashlib import md5

from uhashring import HashRing

_MAX_POSITIONS = 1 << 16  # memoized key positions; a hot group's key is looked up on each of its requests


class Ring:
    def __init__(self, vnodes: int = 160):
        self.vnodes = vnodes
        self._weights: dict[str, int] = {}
        self._points: list[int] = []
        self._owners: list[str] = []
        self._orders: dict[int, list[str]] = {}
        self._positions: dict[bytes, int] = {}  # key -> its position, for the keys seen lately (bounded)

    def __len__(self) -> int:
        return len(self._weights)

    def set_members(self, weights: dict[str, int]) -> None:
        """Rebuild for these workers (name -> weight); a worker's points depend only on its name and weight,
        so removing one worker moves only the keys it owned."""
        if weights == self._weights:
            return
        self._weights = dict(weights)
        nodes = {name: {"weight": w, "vnodes": self.vnodes} for name, w in weights.items()}
        points = HashRing(nodes=nodes).get_points() if nodes else []
        self._points = [p for p, _ in points]
        self._owners = [n for _, n in points]
        self._orders = {}
        self._positions = {}

    def position(self, key: bytes) -> int:
        p = self._positions.get(key)
        if p is None:
            p = bisect(self._points, key_point(key))
            p = 0 if p == len(self._points) else p
            if len(self._positions) >= _MAX_POSITIONS:
                self._positions.clear()
            self._positions[key] = p
        return p

    def order(self, key: bytes) -> list[str]:
        if not self._points:
            return []
        pos = self.position(key)
        order = self._orders.get(pos)
        if order is None:
            order, seen, n = [], set(), len(self._points)
            for i in range(n):
                owner = self._owners[(pos + i) % n]
                if owner not in seen:
                    seen.add(owner)
                    order.append(owner)
                    if len(order) == len(self._weights):
                        break
            self._orders[pos] = order
        return order


def key_point(key: bytes) -> int:
    """A key's point on the ring: uhashring's own hash of the key's hex form (int of its md5 hexdigest), without
    the hexdigest's parsing."""
    return int.from_bytes(md5(key.hex().encode()).digest(), "big")


def jump_hash(key: int, buckets: int) -> int:
    """Lamping & Veach's jump consistent hash: bucket in [0, buckets); growing `buckets` by one moves only
    1/(buckets+1) of the keys, all into the new bucket. O(log buckets)."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b
