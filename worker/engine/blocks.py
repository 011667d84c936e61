"""The block hash chain: h_0 = H(root(salt), tokens[0:B]), h_i = H(h_{i-1}, tokens[iB:(i+1)B]).

This is the only definition of a block's identity; the block cache, the sim backend and tests import it.
The salt (vLLM's `cache_salt`) is mixed into the first block only, so tenants with different salts share
no block of any chain. blake2b is stable across processes and Python versions, unlike `hash()`.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from hashlib import blake2b

DIGEST_SIZE = 16
_VERSION = b"prefixroute/blocks/v1"


def root_hash(salt: str | None) -> bytes:
    """The parent of a chain's first block: distinct for each salt, and for 'no salt'."""
    h = blake2b(_VERSION, digest_size=DIGEST_SIZE)
    if salt is not None:
        h.update(b"\x01salt")
        h.update(salt.encode("utf-8"))
    else:
        h.update(b"\x00")
    return h.digest()


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Hash of one full block given its parent's hash; token ids are hashed as little-endian int64."""
    h = blake2b(parent, digest_size=DIGEST_SIZE)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str | None = None,
                 max_blocks: int | None = None) -> list[bytes]:
    """Hashes of every full block of `token_ids` (a trailing partial block has none)."""
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    return chain_from_bytes(array("q", token_ids[:n * block_size]).tobytes(), block_size, root_hash(salt))


def chain_from_bytes(data: bytes, block_size: int, parent: bytes) -> list[bytes]:
    """The chain after `parent` over token ids given as little-endian int64 bytes (a numpy int64 array's
    `tobytes()`), one hash per full block: `block_hash` without building a list per block, for analyses that
    hash millions of blocks."""
    step = 8 * block_size
    out: list[bytes] = []
    for i in range(0, len(data) - step + 1, step):
        h = blake2b(parent, digest_size=DIGEST_SIZE)
        h.update(data[i:i + step])
        parent = h.digest()
        out.append(parent)
    return out
