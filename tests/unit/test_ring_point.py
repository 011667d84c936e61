"""router.ring.key_point is uhashring's own key hash, so ring positions are those uhashring would give."""

import os

from uhashring import HashRing

from router.ring import Ring, key_point


def test_key_point_is_uhashrings_hash():
    hashi = HashRing(nodes={}).hashi
    for _ in range(2000):
        key = os.urandom(16)
        assert key_point(key) == hashi(key.hex())


def test_position_matches_uhashring_lookup():
    ring = Ring(vnodes=40)
    ring.set_members({"a": 1, "b": 2, "c": 1})
    ref = HashRing(nodes={n: {"weight": w, "vnodes": 40} for n, w in {"a": 1, "b": 2, "c": 1}.items()})
    for _ in range(2000):
        key = os.urandom(16)
        assert ring.order(key)[0] == ref.get_node(key.hex())
