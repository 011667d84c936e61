"""Per-key request rates over a sliding window, in O(1) per request and bounded memory; decayed per-worker counts.

Each key keeps counts in `buckets` time slices covering the window; the total over all keys is kept the
same way, so a key's share of the traffic is one division. Keys idle for a whole window are dropped, and
at most `max_keys` are tracked (least recently seen dropped first).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class WindowCounter:
    __slots__ = ("counts", "epochs", "total", "last")

    def __init__(self, buckets: int):
        self.counts = [0] * buckets
        self.epochs = [-1] * buckets  # which time slice each bucket currently counts
        self.total = 0
        self.last = -1  # the epoch of the last expiry: nothing more expires within it

    def add(self, epoch: int, n: int = 1) -> None:
        self.expire(epoch)
        i = epoch % len(self.counts)
        self.counts[i] += n
        self.total += n

    def expire(self, epoch: int) -> None:
        if epoch == self.last:
            return
        self.last = epoch
        b = len(self.counts)
        for i in range(b):
            if self.counts[i] and self.epochs[i] <= epoch - b:
                self.total -= self.counts[i]
                self.counts[i] = 0
        i = epoch % b
        if self.epochs[i] != epoch:
            self.total -= self.counts[i]
            self.counts[i] = 0
            self.epochs[i] = epoch


class RateTable:
    def __init__(self, window_s: float = 60.0, buckets: int = 12, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.slice_s = window_s / buckets
        self.buckets = buckets
        self.max_keys = max_keys
        self.clock = clock
        self._keys: OrderedDict[bytes, WindowCounter] = OrderedDict()
        self._all = WindowCounter(buckets)

    def __len__(self) -> int:
        return len(self._keys)

    def _epoch(self) -> int:
        return int(self.clock() // self.slice_s)

    def hit(self, key: bytes) -> tuple[float, float]:
        """Count one request for `key`; returns (its rate in requests/minute, its share of all requests)."""
        e = int(self.clock() // self.slice_s)
        c = self._keys.get(key)
        if c is None:
            c = self._count(key, e, e)
        else:  # _count's work for a known key at the current slice, inlined: it runs on every request
            self._keys.move_to_end(key)
            i = e % self.buckets
            for counter in (c, self._all):
                if counter.last != e:
                    counter.expire(e)
                counter.counts[i] += 1
                counter.total += 1
        return c.total * 60.0 / self.window_s, c.total / self._all.total

    def hit_at(self, key: bytes, t: float) -> None:
        """Count one request of `key` made at time `t` (another router replica's, arriving late); one older
        than the window no longer counts."""
        now = self._epoch()
        e = int(t // self.slice_s)
        if e > now - self.buckets:
            self._count(key, min(e, now), now)

    def _count(self, key: bytes, e: int, now: int) -> WindowCounter:
        c = self._keys.get(key)
        if c is None:
            self._trim(now, room_for_one=True)
            c = self._keys[key] = WindowCounter(self.buckets)
        else:
            self._keys.move_to_end(key)
        for counter in (c, self._all):
            counter.expire(now)  # a late request's slice must not reset one that counts newer ones
            counter.add(e)
        return c

    def peek(self, key: bytes) -> tuple[float, float]:
        """What `hit` would return for one more request of `key`, counting nothing."""
        e = self._epoch()
        c = self._keys.get(key)
        n = 1
        if c is not None:
            c.expire(e)
            n += c.total
        self._all.expire(e)
        return n * 60.0 / self.window_s, n / (self._all.total + 1)

    def rate(self, key: bytes) -> float:
        c = self._keys.get(key)
        if c is None:
            return 0.0
        c.expire(self._epoch())
        return c.total * 60.0 / self.window_s

    def _trim(self, epoch: int, room_for_one: bool = False) -> None:
        # Drop idle keys from the cold end (amortized O(1): each key is dropped once), then enforce the cap.
        cap = self.max_keys - (1 if room_for_one else 0)
        while self._keys:
            k, c = next(iter(self._keys.items()))
            c.expire(epoch)
            if c.total and len(self._keys) <= cap:
                break
            del self._keys[k]


class DecayedCounts:
    """Per-name counts that decay by e every `tau_s` seconds: recent work per worker, for tie-breaks."""

    def __init__(self, tau_s: float = 60.0):
        self.tau_s = tau_s
        self._v: dict[str, tuple[float, float]] = {}  # name -> (value, at)

    def get(self, name: str, now: float) -> float:
        v = self._v.get(name)
        if v is None:
            return 0.0
        value, at = v
        # `at` may be ahead of `now`: another router replica's record, from a clock ahead of this one's. Counts
        # never grow backwards in time (exp of hours / tau overflows).
        return value * math.exp((at - now) / self.tau_s) if now > at else value

    def forget(self, name: str) -> None:
        self._v.pop(name, None)

    def add(self, name: str, now: float, n: float = 1.0) -> None:
        v = self._v.get(name)
        if v is not None and now < v[1]:  # a late record: add it decayed to the newer time
            self._v[name] = (v[0] + n * math.exp((now - v[1]) / self.tau_s), v[1])
        else:
            self._v[name] = (self.get(name, now) + n, now)
