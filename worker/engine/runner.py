"""Model runner: runs the transformer over a sequence's new tokens on top of its KV, returns last logits.

`decode` runs all decoding sequences in one forward (a left-padded batch, see batch.py); a lone sequence
decodes on its own cache, exactly as it prefilled.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any, Protocol

import torch

from worker.engine import kv as kvmod
from worker.engine.batch import DecodeBatch
from worker.engine.loader import LoadedModel
from worker.engine.sequence import Sequence


class Runner(Protocol):
    """What the engine needs of a runner: the model's (ModelRunner) or the GPU cost model's (sim.SimRunner)."""

    loaded: LoadedModel
    device: torch.device
    kv_bytes_per_token: int

    def stop_token_ids(self) -> frozenset[int]: ...
    def forward(self, seq: Sequence, token_ids: list[int]) -> torch.Tensor: ...
    def decode(self, seqs: Seq[Sequence]) -> list[torch.Tensor]: ...
    def kv_from_blocks(self, payloads: list[Any], reserve_tokens: int) -> Any: ...
    def block_payloads(self, seq: Sequence, start: int, end: int, block_size: int) -> list[Any]: ...


class ModelRunner:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        cfg = self.model.config
        self.num_layers = int(cfg.num_hidden_layers)
        heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        itemsize = torch.empty((), dtype=loaded.dtype).element_size()
        self.kv_bytes_per_token = 2 * self.num_layers * heads * head_dim * itemsize
        self.batch = DecodeBatch(self.num_layers, self.device)

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
        """Append `token_ids` to `seq`'s KV and return the logits at the last position (float32, [vocab])."""
        if seq.kv is None:
            seq.kv = kvmod.new_kv(self.num_layers)
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, cache=seq.kv, use_cache=True, logits_to_keep=1)
        seq.num_computed += len(token_ids)
        return out.logits[0, -1].float()

    def decode(self, seqs: Seq[Sequence]) -> list[torch.Tensor]:
        self.batch.sync(seqs)
        if len(seqs) == 1:
            return [self.forward(seqs[0], [seqs[0].output_ids[-1]])]
        return self.batch.step(self.model)

    def kv_from_blocks(self, payloads: list[torch.Tensor], reserve_tokens: int):
        return kvmod.kv_from_blocks(payloads, self.num_layers, reserve_tokens)

    def block_payloads(self, seq: Sequence, start: int, end: int, block_size: int) -> list[torch.Tensor]:
        return kvmod.block_payloads(self.batch.kv_of(seq), start, end, block_size)
