"""router.divergence: the shared depth of a request's stable prefix against its tenant's recent requests."""

from __future__ import annotations

import random
import sys
from array import array

from router.divergence import DivergenceTracker

KEY_A, KEY_B = b"a" * 32, b"b" * 32
P = 256


def packed(ids: list[int]) -> bytes:
    return array("I", ids).tobytes()


def prefix(seed: int, n: int = P) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(49152) for _ in range(n)]


def test_first_request_of_a_tenant_is_not_observed():
    t = DivergenceTracker()
    assert t.observe("a", KEY_A, packed(prefix(1))) is None
    assert t.observe("a", KEY_A, packed(prefix(2))) == 0
    assert t.observe("b", KEY_B, packed(prefix(1))) is None  # another tenant's first


def test_identical_prefixes_share_all_p_tokens():
    t = DivergenceTracker()
    ids = packed(prefix(1))
    t.observe("a", KEY_A, ids)
    assert [t.observe("a", KEY_A, ids) for _ in range(3)] == [P, P, P]
    short = packed(prefix(1, 21))  # a prompt shorter than P, not a multiple of G: all of it
    t.observe("a", KEY_A, short)
    assert t.observe("a", KEY_A, short) == 21


def test_divergence_at_token_k_gives_k_floored_to_the_granule():
    base = prefix(1)
    for k in (0, 1, 7, 8, 9, 15, 16, 31, 32, 33, 100, 200, 255):
        t = DivergenceTracker()
        t.observe("a", KEY_A, packed(base))
        other = list(base)
        other[k] = (other[k] + 1) % 49152
        assert t.observe("a", KEY_A, packed(other)) == k // 8 * 8, k


def test_the_deepest_match_over_recent_requests_counts():
    t = DivergenceTracker()
    base = prefix(1)
    t.observe("a", KEY_A, packed(base[:40] + prefix(2, P - 40)))
    t.observe("a", KEY_A, packed(base[:100] + prefix(3, P - 100)))
    t.observe("a", KEY_A, packed(prefix(4)))
    assert t.observe("a", KEY_A, packed(base)) == 96


def test_tenants_are_isolated():
    t = DivergenceTracker()
    ids = packed(prefix(1))
    t.observe("a", KEY_A, ids)
    t.observe("b", KEY_B, packed(prefix(2)))
    assert t.observe("b", KEY_B, ids) == 0  # tenant a sent it, not b
    assert t.observe("a", KEY_A, ids) == P
    # Even two tenants' ids with one key (a shared secret) keep separate sets.
    t.observe("c", KEY_A, packed(prefix(3)))
    assert t.observe("c", KEY_A, packed(prefix(1))) == 0


def test_a_timestamp_near_the_top_shows_at_its_position():
    t = DivergenceTracker()
    system = prefix(1)
    rng = random.Random(5)
    depths = []
    for i in range(40):
        stamp = [rng.randrange(10) for _ in range(6)]  # varying digits from token 19 on
        depths.append(t.observe("a", KEY_A, packed((system[:19] + stamp + system)[:P])))
    assert depths[0] is None and set(depths[1:]) == {16}


def test_memory_is_bounded_under_100k_random_requests():
    t = DivergenceTracker(hashes_per_tenant=2048, max_tenants=4)
    rng = random.Random(0)
    base = prefix(1)
    for i in range(100_000):
        k = rng.randrange(P)
        ids = base[:k] + [rng.randrange(49152)] + base[k + 1:]  # diverges at k
        t.observe(f"t{i % 6}", KEY_A, packed(ids))
    assert t.held() <= 4 * 2048
    assert len(t._tenants) == 4
    assert len(t._ends) == 1
    assert sum(sys.getsizeof(s.cur) + sys.getsizeof(s.old) for s in t._tenants.values()) < 4 * 300_000


def test_a_hot_prefix_survives_novel_traffic():
    # The hot prefix is touched on every other request; the others each bring P/G new hashes. An LRU keeps it.
    t = DivergenceTracker(hashes_per_tenant=512)
    hot = packed(prefix(1))
    t.observe("a", KEY_A, hot)
    for i in range(2_000):
        t.observe("a", KEY_A, packed(prefix(100 + i)))
        assert t.observe("a", KEY_A, hot) == P


def test_answers_equal_the_definition_over_repeats_and_branches():
    """With room for every hash: the deepest checkpoint (a multiple of G, or a whole prefix) an earlier request of
    the tenant shared, whether the whole prefix repeats (one hash answers) or a branch needs the bisection."""
    rng = random.Random(7)
    roots = [prefix(s, rng.choice([P, 21, 64, 200])) for s in range(6)]
    t = DivergenceTracker(hashes_per_tenant=1 << 20)
    seen: list[list[int]] = []
    for _ in range(400):
        ids = list(rng.choice(roots + seen[-20:])) if seen else list(roots[0])
        if rng.random() < 0.4 and ids:  # branch somewhere, or cut short
            k = rng.randrange(len(ids))
            ids = ids[:k] + prefix(rng.randrange(10**6), len(ids) - k) if rng.random() < 0.7 else ids[:k + 1]
        want = None if not seen else max(
            (e for r in seen for e in [*range(8, len(ids) + 1, 8), len(ids)]
             if r[:e] == ids[:e] and (e % 8 == 0 and e <= len(r) or e == len(r))), default=0)
        assert t.observe("a", KEY_A, packed(ids)) == want
        seen.append(ids)
