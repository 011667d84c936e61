"""The page pool's refcounts and free list, and the per-step slots, gathers and masks of paged attention."""

from __future__ import annotations

import pytest
import torch

from worker.engine.attention import build_step
from worker.engine.pages import KVPages, PagePool


def test_pages_are_freed_when_the_last_reference_goes_and_eviction_refills_the_free_list():
    evicted: list[int] = []
    cached = [0, 1]  # pages only "the cache" holds, evicted on demand

    def evict() -> bool:
        if not cached:
            return False
        page = cached.pop(0)
        evicted.append(page)
        pool.release(page)
        return True

    pool = PagePool(3, evict)
    a, b, c = pool.alloc(), pool.alloc(), pool.alloc()
    assert (a, b, c) == (0, 1, 2) and pool.num_free == 0
    pool.retain(c)  # shared by two holders
    pool.release(c)
    assert pool.num_free == 0 and pool.refs(c) == 1
    assert pool.alloc() == 0 and evicted == [0]  # no free page: the cache gave one up
    assert pool.alloc() == 1 and evicted == [0, 1]
    assert pool.alloc() is None  # nothing left to evict
    pool.release(c)
    assert pool.num_free == 1 and pool.alloc() == c
    with pytest.raises(RuntimeError):
        pool.release(c) or pool.release(c)  # released more often than referenced


def test_step_slots_gather_and_mask_follow_each_block_table():
    kv = KVPages(num_layers=1, kv_heads=1, head_dim=2, num_pages=8, page_size=4, dtype=torch.float32,
                 device=torch.device("cpu"))
    # Sequence 0: 5 tokens computed on pages [6, 2], adds 1 (position 5, page 2 slot 1).
    # Sequence 1: 2 tokens computed on page [3], adds 1 (position 2, page 3 slot 2).
    step = build_step(kv, [[6, 2], [3, 7]], [5, 2], 1)
    assert step.slots.tolist() == [2 * 4 + 1, 3 * 4 + 2]
    assert step.pages_per_seq == 2 and step.gather.tolist() == [6, 2, 3, 3]  # padded with its own first page
    assert step.positions.tolist() == [[5], [2]]
    assert step.mask.shape == (2, 1, 1, 8)
    seen = step.mask == 0
    assert seen[0, 0, 0].tolist() == [True] * 6 + [False] * 2
    assert seen[1, 0, 0].tolist() == [True] * 3 + [False] * 5
    assert torch.isneginf(step.mask[~seen]).all()
    # A prefill chunk of 3 tokens after 2: causal within the chunk, all of the past visible, exactly 5 keys.
    chunk = build_step(kv, [[1, 4]], [2], 3)
    assert chunk.slots.tolist() == [6, 7, 16] and chunk.kv_len == 5 and chunk.first_page is None
    assert (chunk.mask[0, 0] == 0).int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # One sequence decoding on consecutive pages: a slice of the pool, no mask; from position 0: SDPA's causal.
    alone = build_step(kv, [[3, 4, 5]], [6], 1)
    assert alone.first_page == 3 and alone.mask is None and alone.kv_len == 7 and not alone.causal
    fresh = build_step(kv, [[3, 4]], [0], 6)
    assert fresh.mask is None and fresh.causal
    with pytest.raises(ValueError):
        build_step(kv, [[1]], [2], 3)  # the table does not cover the new tokens


@pytest.mark.parametrize("tables,starts,q", [
    ([[6, 2, 0], [3, 7, 1], [5, 4, 8]], [9, 2, 5], 1),  # batched decode, unequal lengths
    ([[2, 3, 4]], [9], 1),  # one sequence on consecutive pages
    ([[7, 1, 5]], [3], 5),  # a chunk after cached tokens
    ([[7, 1, 5]], [0], 9),  # a chunk from the start
])
def test_paged_attention_equals_sdpa_over_each_sequences_own_contiguous_kv(tables, starts, q):
    from worker.engine.attention import paged_attention

    torch.manual_seed(0)
    H, Hq, D, B = 2, 4, 8, 4
    kv = KVPages(1, H, D, 9, B, torch.float32, torch.device("cpu"))
    kv.data.normal_()
    past_k = [torch.randn(H, s, D) for s in starts]
    past_v = [torch.randn(H, s, D) for s in starts]
    pages = kv.layer(0)
    for table, k, v in zip(tables, past_k, past_v):  # the past tokens, written where the tables say
        for t in range(k.shape[1]):
            pages[:H, table[t // B], t % B] = k[:, t]
            pages[H:, table[t // B], t % B] = v[:, t]
    N = len(tables)
    query, key, value = torch.randn(N, Hq, q, D), torch.randn(N, H, q, D), torch.randn(N, H, q, D)

    class Layer:
        layer_idx = 0

    got, _ = paged_attention(Layer(), query, key, value, None, paged=build_step(kv, tables, starts, q))
    for i in range(N):
        k = torch.cat([past_k[i], key[i]], dim=1).repeat_interleave(Hq // H, 0)
        v = torch.cat([past_v[i], value[i]], dim=1).repeat_interleave(Hq // H, 0)
        s = starts[i]
        mask = torch.arange(s + q).view(1, -1) <= (s + torch.arange(q)).view(-1, 1)
        want = torch.nn.functional.scaled_dot_product_attention(query[i:i + 1], k[None], v[None], attn_mask=mask)
        assert torch.allclose(got[i:i + 1], want.transpose(1, 2), atol=1e-5)
