"""A per-worker circuit breaker: closed -> open after consecutive failures or a high error share over the last
outcomes; open for a while (doubling on each re-open, capped); then half-open, where exactly one trial request
may go to the worker: its success closes the breaker, its failure re-opens it.

Failures are what the proxy counts before a worker's first byte (refused connections, 5xx answers, broken
transports, timeouts, optionally a first byte slower than `slow_s`). A health probe is no outcome: a flaky worker
answers /health fine. The breaker only keeps state; WorkerPool keeps the worker off the ring while it is not
`on_ring` and moves it from open to half-open (`poll`) when the open time is over.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # the metric's encoding


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 5  # consecutive failures that open it (0: this trigger is off)
    error_rate: float = 0.5  # failure share over the window that opens it
    window: int = 20  # outcomes the share is taken over
    min_requests: int = 10  # outcomes in the window before the share counts
    open_s: float = 5.0
    max_open_s: float = 60.0
    slow_s: float | None = None  # a first byte slower than this counts as a failure (None: never)

    @classmethod
    def from_settings(cls, s) -> BreakerConfig | None:
        """From RouterSettings' breaker_* fields; None when the breaker is off."""
        if not s.breaker:
            return None
        return cls(s.breaker_failures, s.breaker_error_rate, s.breaker_window, s.breaker_min_requests,
                   s.breaker_open_s, max(s.breaker_open_s, s.breaker_max_open_s), s.breaker_slow_s)


class Breaker:
    def __init__(self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.state = CLOSED
        self.consecutive = 0
        self.outcomes: deque[bool] = deque(maxlen=max(1, config.window))  # True: a failure
        self.failed_in_window = 0
        self.open_for = config.open_s  # the length of the next (or current) open period
        self.open_until = 0.0
        self.trial = False  # half-open: the one trial request is in flight
        self.opens = 0  # times it opened (re-opens included)

    @property
    def on_ring(self) -> bool:
        """Whether requests may be routed to the worker: closed, or half-open with its trial not yet taken."""
        return self.state == CLOSED or (self.state == HALF_OPEN and not self.trial)

    def poll(self) -> bool:
        """Open and its time is over: half-open. True when the state changed."""
        if self.state == OPEN and self.clock() >= self.open_until:
            self.state, self.trial = HALF_OPEN, False
            return True
        return False

    def admit(self) -> str | None:
        """A request is about to be sent: "normal" (closed), "trial" (half-open: this one is the trial; no other
        is admitted until it ends), or None (open, or the trial is already in flight)."""
        if self.state == CLOSED:
            return "normal"
        if self.state == HALF_OPEN and not self.trial:
            self.trial = True
            return "trial"
        return None

    def success(self, trial: bool = False) -> None:
        if trial:
            if self.state == HALF_OPEN and self.trial:
                self._close()
            return
        if self.state == CLOSED:  # outcomes of requests sent before it opened do not count later
            self.consecutive = 0
            self._push(False)

    def failure(self, trial: bool = False) -> None:
        if trial:
            if self.state == HALF_OPEN and self.trial:
                self._open(min(self.open_for * 2, self.config.max_open_s))
            return
        if self.state != CLOSED:
            return
        self.consecutive += 1
        self._push(True)
        c = self.config
        n = len(self.outcomes)
        if (c.failures and self.consecutive >= c.failures) or (
                n >= c.min_requests and self.failed_in_window >= c.error_rate * n):
            self._open(c.open_s)

    def abandon(self, trial: bool = False) -> None:
        """A request ended with no outcome (its client left, or the router shut down): a trial's slot is free."""
        if trial and self.state == HALF_OPEN:
            self.trial = False

    def _push(self, failed: bool) -> None:
        if len(self.outcomes) == self.outcomes.maxlen and self.outcomes[0]:
            self.failed_in_window -= 1
        self.outcomes.append(failed)
        self.failed_in_window += failed

    def _reset_window(self) -> None:
        self.outcomes.clear()
        self.failed_in_window = 0
        self.consecutive = 0

    def _open(self, duration: float) -> None:
        self.state, self.trial = OPEN, False
        self.open_for = duration
        self.open_until = self.clock() + duration
        self.opens += 1
        self._reset_window()

    def _close(self) -> None:
        self.state, self.trial = CLOSED, False
        self.open_for = self.config.open_s
        self._reset_window()
