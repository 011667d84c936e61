"""The router's prefix index: block ends at fixed offsets, chained hashes, longest expected match per worker,
per-worker LRU forgetting leaf blocks first."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from router.index import PrefixIndex, block_ends, chain


@given(st.integers(0, 200_000), st.integers(16, 4096))
def test_block_ends_are_fixed_offsets_and_few(n, c):
    ends = block_ends(n, c)
    assert (ends[-1] if ends else 0) == n and ends == sorted(set(ends))
    longer = block_ends(n + 10_000, c)
    assert longer[: max(0, len(ends) - 1)] == ends[:-1]  # a longer text shares every block that ends inside the shorter
    # C-sized steps up to 8 C, then each step grows the offset by at least an eighth: O(log n) blocks
    assert len(ends) <= 8 + 1 + max(0, math.ceil(math.log(max(1.0, n / (8 * c)), 1.12)))


def test_chains_share_exactly_their_common_prefix_blocks():
    a = b"x" * 5000 + b"tail-a"
    b = b"x" * 5000 + b"tail-b" + b"y" * 3000
    ha, ea = chain(a, 256, seed=1)
    hb, eb = chain(b, 256, seed=1)
    common = sum(1 for e in ea if e <= 5000)
    assert ha[:common] == hb[:common] and ha[common] != hb[common]
    assert chain(a, 256, seed=2)[0][0] != ha[0]  # another tenant's seed: nothing in common


def test_match_is_the_longest_run_of_leading_blocks_per_worker():
    idx = PrefixIndex(tokens_per_worker=100)
    idx.insert("w1", [1, 2, 3, 4], [1, 2, 3, 4])
    idx.insert("w2", [1, 2, 9], [1, 2, 3])
    assert idx.match([1, 2, 3, 4, 5]) == {"w1": 4, "w2": 2}
    assert idx.match([1, 2, 9]) == {"w1": 2, "w2": 3}
    assert idx.match([7, 1, 2]) == {} and idx.match([]) == {}


def test_each_worker_forgets_its_least_recent_blocks_leaf_first():
    idx = PrefixIndex(tokens_per_worker=400)
    idx.insert("w", [1, 2, 3], [100, 200, 300])
    idx.insert("w", [10, 11], [50, 150])  # 450 tokens > 400: the oldest leaf (3) goes, its root stays
    assert idx.match([1, 2, 3]) == {"w": 2} and idx.match([10, 11]) == {"w": 2}
    idx.set_budget("w", 150)  # the worker says its cache is smaller: the next insert trims to it
    idx.insert("w", [10], [50])
    assert idx.match([1]) == {} and idx.match([10, 11]) == {"w": 2}
    idx.insert("v", [1, 2, 3], [1, 2, 3])
    idx.forget_worker("w")
    assert idx.match([1, 2, 3]) == {"v": 3} and idx.match([10]) == {}
    assert len(idx) == 3
