"""A replica that applies another's decision records ends in the same state and makes the same decisions;
sessions expire; dry runs count nothing."""

from __future__ import annotations

import random

from router.policies.base import DecisionRecord
from router.policies.cache_aware import CacheAware
from router.rate import RateTable
from tests.unit.test_routing import Clock, pool_of, req


def policy(clock: Clock) -> CacheAware:
    return CacheAware(spill_rpm=3, rates=RateTable(clock=clock), session_ttl_s=600)


def traffic(rng: random.Random, n: int):
    """Requests on a few shared documents, conversations and one-off prompts."""
    for i in range(n):
        doc = rng.randrange(6)
        kind = rng.random()
        if kind < 0.5:
            yield req([doc, 100 + doc, 1000 + i], key=doc)
        elif kind < 0.8:
            conv = rng.randrange(10)
            yield req([50 + conv, 500 + conv, 5000 + i], key=50 + conv, session=conv)
        else:
            yield req([10_000 + i, 20_000 + i], key=10_000 + i)


def test_applied_records_make_the_same_decisions():
    clock, rng = Clock(), random.Random(1)
    pool = pool_of(8)
    a, b, cold = policy(clock), policy(clock), policy(clock)
    records: list[bytes] = []
    a.on_decision = lambda rec: records.append(rec.to_json())
    for k in traffic(rng, 300):
        a.choose(k, pool)
        clock.t += 0.5
    for data in records:
        b.apply(DecisionRecord.from_json(data))
    probes = list(traffic(random.Random(2), 200))
    on_a = [a.choose(k, pool, dry_run=True) for k in probes]
    on_b = [b.choose(k, pool, dry_run=True) for k in probes]
    on_cold = [cold.choose(k, pool, dry_run=True) for k in probes]
    assert [(d.worker, d.reason, d.fanout) for d in on_a] == [(d.worker, d.reason, d.fanout) for d in on_b]
    assert sum(x.worker == y.worker for x, y in zip(on_a, on_cold)) < len(probes)  # sharing changed something
    assert len(records) == 300 and len(a.sessions) == len(b.sessions)


def test_dry_runs_count_nothing():
    clock = Clock()
    pool = pool_of(4)
    p = policy(clock)
    for _ in range(50):
        d = p.choose(req([1, 2, 3], key=1, session=7), pool, dry_run=True)
        assert d.fanout == 1
    assert len(p.rates) == 0 and len(p.index) == 0 and not p.sessions


def test_an_idle_session_stops_pinning_its_worker():
    clock = Clock()
    pool = pool_of(8)
    p = policy(clock)
    first = p.choose(req([1, 2], key=1, session=3), pool).worker
    clock.t += 10
    assert p._session(req([7], session=3).session) == first
    clock.t += 601
    assert p._session(req([7], session=3).session) is None
    # a late record from another replica does not overwrite a newer turn
    newer = p.sessions[req([7], session=3).session]
    p.apply(DecisionRecord(clock.t - 700, "http://127.0.0.1:9001", b"g", [99], [16], req([7], session=3).session))
    assert p.sessions[req([7], session=3).session] == newer


def test_records_from_a_skewed_clock_neither_crash_nor_inflate_decisions():
    """Router replicas' clocks differ: a record 12 h ahead or behind this replica's clock is applied, and the
    next decisions still run and weigh it as at most one request."""
    clock = Clock()
    pool = pool_of(4)
    p = policy(clock)
    first = p.choose(req([1, 2], key=1), pool).worker
    p.apply(DecisionRecord(clock.t + 12 * 3600, first, b"g", [5], [16], None))
    p.apply(DecisionRecord(clock.t - 12 * 3600, first, b"h", [6], [16], None))
    assert p.recent.get(first, clock.t) <= 3.0
    for i in range(20):  # ties on a seen prefix consult the decayed counts
        p.choose(req([1, 2, 100 + i], key=1), pool)
        clock.t += 1
    assert 0 < p.recent.get(first, clock.t) < 30


def test_a_record_from_a_clock_ahead_does_not_outrank_this_routers_later_turns():
    clock = Clock()
    p = policy(clock)
    session = req([7], session=3).session
    p.apply(DecisionRecord(clock.t + 12 * 3600, "http://127.0.0.1:9001", b"g", [99], [16], session))
    clock.t += 5
    p._remember(session, "http://127.0.0.1:9002", clock.t)  # this router's next turn of the session
    assert p._session(session) == "http://127.0.0.1:9002"
    for _ in range(10):
        p.apply(DecisionRecord(clock.t + 12 * 3600, "http://127.0.0.1:9001", b"g", [99], [16], None))
    clock.t += 600  # ten decisions ten minutes ago weigh as such, not as decisions still to come
    assert p.recent.get("http://127.0.0.1:9001", clock.t) < 10 * 2.72 ** -9


def test_a_removed_worker_leaves_nothing_behind_in_the_policy():
    """Workers come and go (autoscaling): what the policy keeps per worker goes with each."""
    clock = Clock()
    pool = pool_of(4)
    p = policy(clock)
    for i in range(40):
        p.choose(req([i, 1000 + i], key=i), pool)
    gone = next(iter(p.recent._v))
    p.index.set_budget(gone, 1000)
    p.forget_worker(gone)
    assert gone not in p.recent._v and gone not in p.index._budget and gone not in p.index._lru
    assert all(gone not in holders for holders in p.index._holders.values())
