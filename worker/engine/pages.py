"""The KV page pool: one tensor holding every page of every layer, and the refcounts that say who holds a page.

A page holds one cache block's worth of tokens (the block size) of keys and values for all layers. A running
sequence's block table lists its pages; the prefix cache's blocks are pages of the same pool, so a cache hit
puts the cached page into the sequence's table (one more reference) instead of copying it, and a block the
sequence fills is handed to the cache the same way. A page is free when nobody references it. When none is
free, the pool asks the cache to evict an unpinned leaf block (whose page only the cache held).

Layout: [layers, 2 (K, V), kv heads, pages, page size, head dim]. Within one layer, one page of one head is
contiguous and a head's pages are consecutive, so gathering sequences' pages is one index_select per layer (K
and V together), and its result views as [sequences, heads, tokens, head dim] without another copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class PagePool:
    """Refcounted page ids with a free list. `evict` frees room: it evicts one unpinned cached block (releasing
    its page) and says whether there was one."""

    def __init__(self, num_pages: int, evict: Callable[[], bool] | None = None):
        self.num_pages = num_pages
        self.evict = evict
        self._refs = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # popped from the end: low page ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def refs(self, page: int) -> int:
        return self._refs[page]

    def alloc(self) -> int | None:
        """A fresh page with one reference, evicting cached blocks if none is free; None if nothing is left."""
        while not self._free:
            if self.evict is None or not self.evict():
                return None
        page = self._free.pop()
        self._refs[page] = 1
        return page

    def retain(self, page: int) -> None:
        if self._refs[page] <= 0:
            raise RuntimeError(f"page {page} is free")
        self._refs[page] += 1

    def release(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free.append(page)
        elif self._refs[page] < 0:
            raise RuntimeError(f"page {page} released more often than referenced")


class KVPages:
    """The pool's storage: keys and values of `num_pages` pages for every layer (allocated once, up front, as a
    GPU engine does; on the CPU the memory is only touched as pages are written)."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, num_pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.page_size = page_size
        self.num_pages = num_pages
        self.data = torch.empty((num_layers, 2, kv_heads, num_pages, page_size, head_dim), dtype=dtype,
                                device=device)

    @property
    def page_bytes(self) -> int:
        return self.data[:, :, :, 0].numel() * self.data.element_size()

    def layer(self, index: int) -> torch.Tensor:
        """One layer's pages, [2 x kv heads (K's, then V's), pages, page size, head dim]: K and V are written
        and gathered in one call each."""
        d = self.data[index]
        return d.view(d.shape[0] * d.shape[1], *d.shape[2:])
