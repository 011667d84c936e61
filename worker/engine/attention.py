"""Attention over block tables, registered with transformers as the `prefixroute_paged` implementation.

Each forward first writes its new tokens' keys and values into their slots in the page pool, then every
sequence attends over its own pages, gathered per layer into a [sequences, heads, tokens, head dim] view
padded to the longest table and masked by position. The gather is transient (one layer at a time); nothing
is re-packed when the batch's membership changes, and a page shared by several sequences (a cached prefix)
is stored once.

Why not transformers' own paged path: its `PagedAttentionCache` allocates pages itself, and on the CPU (no
flash kernel with block tables) it flattens a batch into one sequence with a block-diagonal mask, so a decode
step over N sequences computes N x (all their tokens) scores instead of each sequence's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from worker.engine.pages import KVPages

ATTN_IMPLEMENTATION = "prefixroute_paged"


@dataclass
class PagedStep:
    """What one forward's attention needs, computed once for all layers."""

    kv: KVPages
    slots: torch.Tensor  # [N * q]: page * page_size + offset of each new token, sequence-major
    gather: torch.Tensor  # [N * M]: each sequence's first M pages (padded with its own first page)
    pages_per_seq: int  # M
    positions: torch.Tensor  # [N, q]: the new tokens' positions (for the rotary embedding)
    kv_len: int  # keys attended: M * page_size, or for one sequence exactly its tokens
    # [N, 1, q, kv_len], additive (0 where query t of sequence i may see key j, else -inf), made once per
    # forward (SDPA would convert a boolean one in every layer); None where no key needs hiding (one sequence's
    # decode) or SDPA's own causal mask is exact (`causal`: one sequence's chunk from position 0).
    mask: torch.Tensor | None
    causal: bool = False
    first_page: int | None = None  # one sequence on consecutive pages from here: a slice instead of a gather


def build_step(kv: KVPages, tables: Sequence[Sequence[int]], starts: Sequence[int], q: int) -> PagedStep:
    """The step for N sequences each adding `q` tokens at position `starts[i]`, its table covering them."""
    B = kv.page_size
    device = kv.data.device
    need = [(s + q + B - 1) // B for s in starts]
    M = max(need)
    gather: list[int] = []
    for table, m in zip(tables, need):
        if len(table) < m:
            raise ValueError(f"block table holds {len(table)} pages; {m} needed")
        gather.extend(table[:m])
        gather.extend([table[0]] * (M - m))
    pos = torch.tensor(starts, dtype=torch.long).unsqueeze(1) + torch.arange(q).unsqueeze(0)  # [N, q]
    page_of = torch.tensor(gather, dtype=torch.long).view(len(need), M)
    slots = (torch.gather(page_of, 1, pos // B) * B + pos % B).flatten().to(device)
    gather_t = torch.tensor(gather, dtype=torch.long, device=device)
    positions = pos.to(device)
    if len(tables) == 1:
        first = gather[0] if gather == list(range(gather[0], gather[0] + M)) else None
        kv_len = starts[0] + q
        if q == 1 or starts[0] == 0:
            return PagedStep(kv, slots, gather_t, M, positions, kv_len, None, causal=q > 1, first_page=first)
    else:
        first, kv_len = None, M * B
    visible = torch.arange(kv_len).view(1, 1, -1) <= pos.unsqueeze(-1)
    mask = torch.zeros(visible.shape, dtype=kv.data.dtype).masked_fill_(~visible, float("-inf"))
    return PagedStep(kv, slots, gather_t, M, positions, kv_len, mask.unsqueeze(1).to(device), first_page=first)


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    paged: PagedStep | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    if paged is None:  # the model used outside the engine (generate, a plain forward): ordinary SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    pages = paged.kv.layer(module.layer_idx)  # [2 * H, P, B, D]: K's heads, then V's
    H2, P, B, D = pages.shape
    N, H, q, _ = key.shape
    new = torch.cat((key, value), dim=1).transpose(0, 1).reshape(H2, N * q, D)
    pages.view(H2, P * B, D).index_copy_(1, paged.slots, new)
    M = paged.pages_per_seq
    if paged.first_page is not None:
        held = pages[:, paged.first_page:paged.first_page + M]  # a view: nothing copied
    else:
        held = pages.index_select(1, paged.gather)
    both = held.reshape(2, H, N, M * B, D)[:, :, :, :paged.kv_len]
    keys, values = both[0].transpose(0, 1), both[1].transpose(0, 1)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=paged.mask, is_causal=paged.causal,
                                         scale=scaling, enable_gqa=query.shape[1] != H)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
