"""Model runner: runs the transformer over a sequence's new tokens on top of its KV, returns last logits.

`decode` takes a list of sequences so that callers are written for batched decode; today it runs them one
forward each (batching sequences of unequal cached lengths needs padded KV or a paged attention kernel).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from worker.engine import kv as kvmod
from worker.engine.loader import LoadedModel
from worker.engine.sequence import Sequence


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
        return [self.forward(s, [s.output_ids[-1]]) for s in seqs]

    def kv_from_blocks(self, payloads: list[torch.Tensor], reserve_tokens: int):
        return kvmod.kv_from_blocks(payloads, self.num_layers, reserve_tokens)

    @staticmethod
    def block_payloads(seq: Sequence, start: int, end: int, block_size: int) -> list[torch.Tensor]:
        return kvmod.block_payloads(seq.kv, start, end, block_size)
