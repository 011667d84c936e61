"""The circuit breaker's state machine on an injected clock (router.breaker), and WorkerPool keeping a worker off
the ring while its breaker is open, letting exactly one trial through when half-open, and ignoring probes."""

from __future__ import annotations

import pytest

from router.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, BreakerConfig
from router.settings import RouterSettings, parse_args
from router.workers import WorkerPool


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def breaker(**kw) -> tuple[Breaker, Clock]:
    clock = Clock()
    cfg = {"failures": 3, "error_rate": 0.5, "window": 10, "min_requests": 6, "open_s": 5.0, "max_open_s": 30.0}
    return Breaker(BreakerConfig(**{**cfg, **kw}), clock), clock


def test_consecutive_failures_open_it_and_a_success_resets_the_count():
    b, _ = breaker()
    b.failure(), b.failure(), b.success(), b.failure(), b.failure()
    assert b.state == CLOSED and b.on_ring and b.admit() == "normal"
    b.failure()
    assert b.state == OPEN and not b.on_ring and b.opens == 1 and b.admit() is None


def test_the_error_share_opens_it_only_with_enough_outcomes_in_the_window():
    b, _ = breaker(failures=0)  # only the share
    for _ in range(4):
        b.failure()
    assert b.state == CLOSED  # 4 of 4 failed, but fewer than min_requests outcomes
    b.success()
    assert b.state == CLOSED  # 4 of 5
    b.failure()
    assert b.state == OPEN  # 5 of 6 >= 0.5
    b2, _ = breaker(failures=0)
    for ok in [True, False] * 5:  # alternating: 5 of 10 failed, never 3 in a row
        b2.success() if ok else b2.failure()
    assert b2.state == OPEN and b2.opens == 1
    b3, _ = breaker(failures=0)
    for ok in [True, True, False] * 6:  # a third fails: below the share
        b3.success() if ok else b3.failure()
    assert b3.state == CLOSED


def test_the_window_slides_old_failures_out():
    b, _ = breaker(failures=0, window=6, min_requests=6, error_rate=0.5)
    for _ in range(2):
        b.failure()
    for _ in range(10):
        b.success()
    assert b.failed_in_window == 0 and len(b.outcomes) == 6
    for _ in range(2):
        b.failure()
    assert b.state == CLOSED  # 2 of 6
    b.failure()
    assert b.state == OPEN  # 3 of 6


def test_open_then_half_open_with_one_trial_whose_success_closes_it():
    b, clock = breaker()
    for _ in range(3):
        b.failure()
    assert b.state == OPEN and b.open_until == clock.t + 5.0
    clock.t += 4.9
    assert not b.poll() and b.state == OPEN and b.admit() is None
    clock.t += 0.1
    assert b.poll() and b.state == HALF_OPEN and b.on_ring
    assert b.admit() == "trial" and not b.on_ring
    assert b.admit() is None and b.admit() is None  # exactly one trial
    b.success()  # a request sent before it opened ends well: not the trial, no effect
    b.failure()
    assert b.state == HALF_OPEN and b.trial
    b.success(trial=True)
    assert b.state == CLOSED and b.on_ring and b.open_for == 5.0 and b.consecutive == 0 and not b.outcomes
    assert b.admit() == "normal"


def test_a_failed_trial_reopens_it_for_twice_as_long_up_to_the_cap_and_a_close_resets_the_time():
    b, clock = breaker()
    for _ in range(3):
        b.failure()
    lengths = []
    for _ in range(5):
        clock.t = b.open_until
        assert b.poll() and b.admit() == "trial"
        b.failure(trial=True)
        assert b.state == OPEN
        lengths.append(b.open_until - clock.t)
    assert lengths == [10.0, 20.0, 30.0, 30.0, 30.0] and b.opens == 6
    clock.t = b.open_until
    b.poll()
    assert b.admit() == "trial"
    b.success(trial=True)
    for _ in range(3):
        b.failure()
    assert b.state == OPEN and b.open_until - clock.t == 5.0  # back to the base time


def test_an_abandoned_trial_frees_the_slot_and_outcomes_while_open_do_not_count():
    b, clock = breaker()
    for _ in range(3):
        b.failure()
    for _ in range(5):  # late answers of requests sent before it opened
        b.success()
        b.failure()
    assert b.state == OPEN and b.opens == 1 and not b.outcomes
    clock.t = b.open_until
    b.poll()
    assert b.admit() == "trial"
    b.abandon(trial=True)
    assert b.state == HALF_OPEN and b.on_ring and b.admit() == "trial"


def test_the_pool_keeps_an_open_worker_off_the_ring_probes_do_not_close_it_and_one_trial_gets_through():
    clock = Clock()
    pool = WorkerPool(vnodes=8, fail_threshold=100, clock=clock,
                      breaker=BreakerConfig(failures=2, open_s=5.0, max_open_s=20.0))
    a, b = "http://127.0.0.1:9001", "http://127.0.0.1:9002"
    for u in (a, b):
        pool.mark_ok(pool.add(u).name)
    assert set(pool.active) == {a, b}
    for _ in range(2):
        assert pool.admit(a) == "normal"
        pool.request_failed(a)
    assert pool.active == [b] and pool.workers[a].healthy and pool.workers[a].breaker_state == 2
    assert pool.admit(a) is None
    pool.mark_ok(a)  # a passing /health probe
    assert pool.active == [b] and pool.workers[a].breaker.state == OPEN
    clock.t += 5.0
    pool.tick()
    assert set(pool.active) == {a, b} and pool.workers[a].breaker_state == 1
    pool.acquire(a)
    assert pool.admit(a) == "trial" and pool.active == [b]  # off the ring while its trial runs
    assert pool.admit(a) is None
    pool.request_failed(a, trial=True)
    assert pool.active == [b] and pool.workers[a].breaker.open_for == 10.0
    pool.release(a)
    clock.t += 10.0
    pool.tick()
    pool.acquire(a)
    assert pool.admit(a) == "trial"
    pool.request_ok(a, trial=True)
    assert set(pool.active) == {a, b} and pool.workers[a].breaker_state == 0
    assert pool.active_inflight == 1  # the trial, still running, counted once the worker is back
    pool.release(a)
    assert pool.active_inflight == 0 and pool.total_inflight == 0


def test_a_slow_first_byte_counts_for_the_breaker_only():
    pool = WorkerPool(vnodes=8, fail_threshold=2, clock=Clock(), breaker=BreakerConfig(failures=3))
    a = pool.add("http://127.0.0.1:9001").name
    pool.mark_ok(a)
    for _ in range(2):
        pool.request_slow(a)
    assert pool.workers[a].fails == 0 and pool.active == [a]
    pool.request_slow(a)
    assert pool.active == [] and pool.workers[a].healthy


def test_settings_and_flags_build_the_config():
    s = parse_args(["--breaker-failures", "7", "--breaker-error-rate", "0.3", "--breaker-window", "40",
                    "--breaker-min-requests", "12", "--breaker-open-s", "2", "--breaker-max-open-s", "8",
                    "--breaker-slow-s", "1.5"])
    assert BreakerConfig.from_settings(s) == BreakerConfig(7, 0.3, 40, 12, 2.0, 8.0, 1.5)
    assert BreakerConfig.from_settings(parse_args(["--no-breaker"])) is None
    assert BreakerConfig.from_settings(RouterSettings()) == BreakerConfig()
    with pytest.raises(ValueError):
        RouterSettings(breaker_error_rate=1.5)
