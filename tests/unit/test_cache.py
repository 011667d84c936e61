"""Block cache invariants: byte budget, pinning, child-before-parent eviction, collision safety."""

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.engine.blocks import block_hashes
from worker.engine.cache import BlockCache

B = 4


def insert_chain(cache: BlockCache, ids: list[int], salt=None, nbytes=10):
    """Mimics the engine: pin what is cached, insert the rest, return the pinned chain."""
    chain = cache.acquire_prefix(ids, salt, len(ids) // B)
    parent = chain[-1] if chain else None
    for i in range(len(chain), len(ids) // B):
        toks = ids[i * B:(i + 1) * B]
        blk = cache.insert(cache.child_hash(parent, salt, toks), parent, toks, object(), nbytes)
        if blk is None:
            break
        chain.append(blk)
        parent = blk
    return chain


def check_invariants(cache: BlockCache):
    assert cache.used_bytes <= cache.capacity_bytes
    assert cache.used_bytes == sum(b.nbytes for b in cache._index.values())
    for blk in cache._index.values():
        assert blk.parent is None or blk.parent.hash in cache, "a cached block's parent must be cached"
        assert (blk.hash in cache._lru) == (blk.refcount == 0)
        assert blk.children == sum(1 for c in cache._index.values() if c.parent is blk)


def test_hit_after_insert_and_salt_isolation():
    c = BlockCache(B, 10_000)
    ids = list(range(20))
    c.release(insert_chain(c, ids))
    hit = c.acquire_prefix(ids, None, 10)
    assert len(hit) == 5
    c.release(hit)
    assert c.acquire_prefix(ids, "tenant-b", 10) == []
    assert len(c.acquire_prefix(ids[:9] + [777] + ids[10:], None, 10)) == 2  # stops at the changed block
    check_invariants(c)


def test_lru_evicts_leaves_first_and_never_pinned():
    c = BlockCache(B, 60)  # room for 6 blocks of 10 bytes
    a = insert_chain(c, list(range(0, 16)))  # 4 blocks, kept pinned
    c.release(insert_chain(c, list(range(100, 108))))  # 2 blocks
    c.release(insert_chain(c, list(range(200, 208))))  # needs room: evicts the 100-chain leaf-first
    assert all(b.hash in c for b in a)
    assert len(c.acquire_prefix(list(range(100, 108)), None, 2)) == 0
    check_invariants(c)
    c.release(a)
    # The older 200-chain goes first, then a's tail (leaf-first), never a's root while its child stays.
    c.release(insert_chain(c, list(range(300, 316))))
    assert len(c.acquire_prefix(list(range(200, 208)), None, 2)) == 0
    got = c.acquire_prefix(list(range(0, 16)), None, 4)
    assert len(got) == 2
    check_invariants(c)


def test_full_cache_of_pinned_blocks_rejects_insert():
    c = BlockCache(B, 20)
    a = insert_chain(c, list(range(8)))
    assert len(a) == 2
    b = insert_chain(c, list(range(50, 58)))
    assert b == [] and c.stats.rejected_blocks == 1
    check_invariants(c)


def test_hash_collision_never_serves_other_tokens():
    c = BlockCache(B, 1000)
    ids = [1, 2, 3, 4]
    h = block_hashes(ids, B)[0]
    c.insert(h, None, [9, 9, 9, 9], object(), 10)  # a block claiming ids' hash with other tokens
    assert c.acquire_prefix(ids, None, 1) == []
    assert c.get(h, ids) is None


ops = st.lists(
    st.tuples(st.integers(0, 5), st.integers(1, 8), st.booleans(), st.sampled_from([None, "s"])), max_size=40
)


@settings(max_examples=60, deadline=None)
@given(ops, st.integers(30, 200))
def test_random_workload_keeps_invariants(workload, capacity):
    c = BlockCache(B, capacity)
    held = []
    for family, nblocks, keep, salt in workload:
        ids = [family * 1000 + i for i in range(nblocks * B)]
        chain = insert_chain(c, ids, salt)
        (held.append(chain) if keep else c.release(chain))
        check_invariants(c)
        pinned = {b.hash for ch in held for b in ch}
        assert pinned <= set(c._index)
        if len(held) > 3:
            c.release(held.pop(0))
    for ch in held:
        c.release(ch)
    c.clear()
    assert len(c) == 0 and c.used_bytes == 0
