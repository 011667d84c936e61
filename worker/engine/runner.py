"""Model runner: runs the transformer over sequences' new tokens on their block tables, returns last logits.

A sequence's KV lives in pages of one pool (pages.py): `attach` puts cached pages into its table, `reserve`
allocates pages for tokens to come, `free` drops its references. `forward` computes a prefill chunk of one
sequence, `decode` one token for every decoding sequence in a single forward; both go through the paged
attention (attention.py), so a batch has no KV of its own and nothing is copied when its membership changes.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any, Protocol

import torch

from worker.engine.attention import ATTN_IMPLEMENTATION, build_step
from worker.engine.loader import LoadedModel
from worker.engine.pages import KVPages, PagePool
from worker.engine.sampling import Sampler, SamplingParams
from worker.engine.sequence import Sequence


class Runner(Protocol):
    """What the engine needs of a runner: the model's (ModelRunner) or the GPU cost model's (sim.SimRunner).

    Block payloads are whatever the runner stores per cached block (a page id here, nothing in the sim)."""

    loaded: LoadedModel
    device: torch.device
    kv_bytes_per_token: int
    capacity_tokens: int | None  # tokens of KV the pool holds in all; None: not bounded by the runner

    def stop_token_ids(self) -> frozenset[int]: ...
    def bind(self, num_pages: int, page_size: int, evict: Callable[[], bool]) -> None: ...
    def available_pages(self) -> int | None: ...
    def used_pages(self) -> int | None: ...
    def attach(self, seq: Sequence, payloads: list[Any]) -> None: ...
    def reserve(self, seq: Sequence, tokens: int) -> bool: ...
    def free(self, seq: Sequence) -> None: ...
    def block_payloads(self, seq: Sequence, first: int, last: int) -> list[Any]: ...
    def retain(self, payload: Any) -> None: ...
    def release(self, payload: Any) -> None: ...
    def replace(self, seq: Sequence, index: int, payload: Any) -> None: ...
    def forward(self, seq: Sequence, token_ids: list[int]) -> torch.Tensor: ...
    def decode(self, seqs: Seq[Sequence]) -> list[torch.Tensor]: ...
    def idle(self) -> None: ...  # the engine has run out of work (the sim's clock restarts)
    def sampler(self, params: SamplingParams) -> Callable[[torch.Tensor], int]: ...  # a new sequence's


class ModelRunner:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        cfg = self.model.config
        self.num_layers = int(cfg.num_hidden_layers)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        itemsize = torch.empty((), dtype=loaded.dtype).element_size()
        self.kv_bytes_per_token = 2 * self.num_layers * self.kv_heads * self.head_dim * itemsize
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True) and window < loaded.max_model_len:
            # The paged attention masks by position only: a window would be silently ignored.
            raise ValueError(f"{type(self.model).__name__} uses sliding-window attention ({window} tokens), which "
                             "the worker's paged attention does not implement")
        self.model.config._attn_implementation = ATTN_IMPLEMENTATION
        self.kv: KVPages | None = None
        self.pool: PagePool | None = None
        self.steps = 0  # forwards run, batched decode steps among them
        self.batched_steps = 0

    # ---- pages --------------------------------------------------------------------------------------------

    def bind(self, num_pages: int, page_size: int, evict: Callable[[], bool]) -> None:
        """Allocate the page pool (an engine's, replacing any earlier one)."""
        self.kv = None  # free the old pool before allocating the new one
        self.kv = KVPages(self.num_layers, self.kv_heads, self.head_dim, num_pages, page_size, self.loaded.dtype,
                          self.device)
        self.pool = PagePool(num_pages, evict)

    @property
    def capacity_tokens(self) -> int | None:
        return None if self.kv is None else self.kv.num_pages * self.kv.page_size

    def available_pages(self) -> int | None:
        return self.pool.num_free

    def used_pages(self) -> int | None:
        return self.pool.num_used

    def attach(self, seq: Sequence, payloads: list[int]) -> None:
        for page in payloads:
            self.pool.retain(page)
        seq.pages = list(payloads)

    def reserve(self, seq: Sequence, tokens: int) -> bool:
        """Make `seq`'s table hold `tokens` tokens; False (keeping what it got) if the pool runs out."""
        while len(seq.pages) * self.kv.page_size < tokens:
            page = self.pool.alloc()
            if page is None:
                return False
            seq.pages.append(page)
        return True

    def free(self, seq: Sequence) -> None:
        for page in seq.pages:
            self.pool.release(page)
        seq.pages = []

    def block_payloads(self, seq: Sequence, first: int, last: int) -> list[int]:
        return seq.pages[first:last]

    def retain(self, payload: int) -> None:
        self.pool.retain(payload)

    def release(self, payload: int) -> None:
        self.pool.release(payload)

    def replace(self, seq: Sequence, index: int, payload: int) -> None:
        """Point block `index` of `seq`'s table at a cached page holding the same tokens, freeing its own."""
        old = seq.pages[index]
        if old != payload:
            self.pool.retain(payload)
            seq.pages[index] = payload
            self.pool.release(old)

    # ---- forwards -----------------------------------------------------------------------------------------

    def stop_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for src in (self.model.generation_config.eos_token_id, self.loaded.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(int(x) for x in src)
        return frozenset(ids)

    @torch.inference_mode()
    def forward(self, seq: Sequence, token_ids: list[int]) -> torch.Tensor:
        """Compute `token_ids` after `seq`'s KV (its table must hold them) and return the logits at the last
        position (float32, [vocab])."""
        logits = self._run([seq], [token_ids])
        return logits[0]

    @torch.inference_mode()
    def decode(self, seqs: Seq[Sequence]) -> list[torch.Tensor]:
        if len(seqs) > 1:
            self.batched_steps += 1
        return list(self._run(seqs, [[s.output_ids[-1]] for s in seqs]).unbind(0))

    def idle(self) -> None:
        pass

    def sampler(self, params: SamplingParams) -> Sampler:
        return Sampler(params, self.device)

    def _run(self, seqs: Seq[Sequence], token_ids: list[list[int]]) -> torch.Tensor:
        q = len(token_ids[0])
        step = build_step(self.kv, [s.pages for s in seqs], [s.num_computed for s in seqs], q)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, position_ids=step.positions, use_cache=False, logits_to_keep=1, paged=step)
        for s in seqs:
            s.num_computed += q
        self.steps += 1
        return out.logits[:, -1].float()
