"""The traffic's prefix tree at the worker's block granularity, and the ideal single cache over it.

Each request's prompt is a chain of block hashes (worker.engine.blocks, seeded with its cache salt, so tenants
never share a node); a node of the tree is one chain hash. The ideal cache is one infinite cache fed in
timestamp order, counted as a worker counts: whole blocks only, never the prompt's last token. A fan-out node
is one that many requests pass through and none of whose children carries most of them: the place where
traffic that shared a prefix goes separate ways.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from worker.engine.blocks import chain_from_bytes, root_hash


def chain(tokens: np.ndarray, block_tokens: int, salt: str | None, start_block: int = 0,
          head: Sequence[bytes] = ()) -> list[bytes]:
    """The block chain of `tokens`; `head` (its first `start_block` hashes, already known) is reused."""
    parent = head[start_block - 1] if start_block else root_hash(salt)
    data = np.ascontiguousarray(tokens[start_block * block_tokens:], dtype="<i8").tobytes()
    return list(head[:start_block]) + chain_from_bytes(data, block_tokens, parent)


def cacheable_blocks(n_tokens: int, block_tokens: int) -> int:
    """Blocks of a prompt a worker can serve from cache: whole ones, never the one holding the last token."""
    return max(0, (n_tokens - 1) // block_tokens)


def ideal_hits(chains: Sequence[Sequence[bytes]], lengths: Sequence[int], block_tokens: int) -> np.ndarray:
    """Cached tokens of each request through one infinite cache, requests in the given order."""
    seen: set[bytes] = set()
    out = np.zeros(len(chains), dtype=np.int64)
    for i, c in enumerate(chains):
        cap = min(len(c), cacheable_blocks(lengths[i], block_tokens))
        h = 0
        while h < cap and c[h] in seen:
            h += 1
        out[i] = h * block_tokens
        seen.update(c)
    return out


@dataclass
class FanOut:
    depth: int  # blocks from the root to the node (0: the salt's root)
    members: list[int]  # requests through the node that continue past it
    largest_child: int  # requests in its most-travelled child


def fan_outs(chains: Sequence[Sequence[bytes]], salts: Sequence[str | None], min_requests: int,
             max_child_share: float = 0.5) -> list[FanOut]:
    """Nodes of the tree of every request's chain (from its salt's root) that at least `min_requests` requests
    pass on from, none of whose children carries more than `max_child_share` of them; shallowest first (ties:
    most requests first)."""
    ids: dict[bytes, int] = {}
    parents: list[int] = []
    children: list[int] = []
    owners: list[int] = []
    depths: list[int] = []
    for i, c in enumerate(chains):
        if not c:
            continue
        root = ids.setdefault(root_hash(salts[i]), len(ids))
        nodes = [ids.setdefault(h, len(ids)) for h in c]
        parents.append(root)
        parents.extend(nodes[:-1])
        children.extend(nodes)
        owners.extend([i] * len(c))
        depths.extend(range(len(c)))
    if not parents:
        return []
    par, chi = np.array(parents), np.array(children)
    # each request passes a node at most once: a node's count of edges out is its requests continuing past it
    through = np.bincount(par, minlength=len(ids))
    largest = np.zeros(len(ids), dtype=np.int64)
    np.maximum.at(largest, par, np.bincount(chi, minlength=len(ids))[chi])
    fan = (through >= min_requests) & (largest <= max_child_share * through)
    sel = np.flatnonzero(fan[par])
    if not len(sel):
        return []
    sel = sel[np.argsort(par[sel], kind="stable")]  # by node, each node's requests in log order
    own, dep = np.array(owners)[sel], np.array(depths)[sel]
    cuts = np.flatnonzero(np.diff(par[sel])) + 1
    out = [FanOut(int(dep[g[0]]), own[g].tolist(), int(largest[par[sel][g[0]]]))
           for g in np.split(np.arange(len(sel)), cuts)]
    out.sort(key=lambda f: (f.depth, -len(f.members)))
    return out
