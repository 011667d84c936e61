"""A sequence's KV cache: transformers' DynamicCache with layers that grow in place (amortized O(1) per token).

The stock DynamicLayer concatenates on every step, copying the whole KV per decoded token. This layer keeps
a buffer with spare capacity and exposes a view of its filled part, so the model sees the same tensors.
It also builds a cache from prefix-cache blocks and cuts block payloads out of a cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

_MIN_CAPACITY = 256


class GrowableLayer(DynamicLayer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._len = 0

    def reserve(self, template: torch.Tensor, capacity: int) -> None:
        """Ensure room for `capacity` tokens; `template` gives batch, heads, head_dim, dtype and device."""
        if self._kbuf is not None and self._kbuf.shape[-2] >= capacity:
            return
        b, h, _, d = template.shape
        kbuf = torch.empty((b, h, capacity, d), dtype=template.dtype, device=template.device)
        vbuf = torch.empty_like(kbuf)
        if self._kbuf is not None and self._len:
            kbuf[:, :, : self._len].copy_(self._kbuf[:, :, : self._len])
            vbuf[:, :, : self._len].copy_(self._vbuf[:, :, : self._len])
        self._kbuf, self._vbuf = kbuf, vbuf

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        need = self._len + n
        cap = 0 if self._kbuf is None else self._kbuf.shape[-2]
        if need > cap:
            self.reserve(key_states, max(need, 2 * cap, _MIN_CAPACITY))
        self._kbuf[:, :, self._len:need].copy_(key_states)
        self._vbuf[:, :, self._len:need].copy_(value_states)
        self._len = need
        self.keys = self._kbuf[:, :, :need]
        self.values = self._vbuf[:, :, :need]
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized and self.keys is not None:
            self._len = self.keys.shape[-2]


def new_kv(num_layers: int) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [GrowableLayer() for _ in range(num_layers)]
    return cache


def kv_from_blocks(payloads: Sequence[torch.Tensor], num_layers: int, reserve_tokens: int) -> DynamicCache:
    """A cache holding the concatenated blocks ([L, 2, H, B, D] each), with room for `reserve_tokens` in all."""
    cache = new_kv(num_layers)
    if not payloads:
        return cache
    L, _, H, B, D = payloads[0].shape
    n = B * len(payloads)
    # One allocation and one cat for all layers: per layer [H, capacity, D] stays contiguous inside it, so
    # the layers' buffers are plain views (a per-layer cat costs ~5x more in call overhead on the CPU).
    buf = payloads[0].new_empty((L, 2, 1, H, max(n, reserve_tokens), D))
    torch.cat(payloads, dim=3, out=buf[:, :, 0, :, :n])
    for li, layer in enumerate(cache.layers):
        kbuf, vbuf = buf[li, 0], buf[li, 1]
        layer.lazy_initialization(kbuf, vbuf)
        layer._kbuf, layer._vbuf, layer._len = kbuf, vbuf, n
        layer.keys, layer.values = kbuf[:, :, :n], vbuf[:, :, :n]
    return cache


def block_payloads(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int, end: int,
                   block_size: int) -> list[torch.Tensor]:
    """Contiguous [L, 2, H, B, D] tensors for the blocks covering tokens [start, end) of a sequence's KV,
    given per layer as ([H, T, D] keys, [H, T, D] values)."""
    keys = torch.stack([k[:, start:end] for k, _ in kv])
    values = torch.stack([v[:, start:end] for _, v in kv])
    both = torch.stack((keys, values), dim=1)  # [L, 2, H, T, D]
    L, _, H, T, D = both.shape
    per_block = both.view(L, 2, H, T // block_size, block_size, D).permute(3, 0, 1, 2, 4, 5)
    # one copy per block: a block must own its storage so that evicting it frees its bytes.
    return [b.contiguous() for b in per_block.unbind(0)]
