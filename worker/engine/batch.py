"""Batched decode: the decoding sequences share one left-padded KV per layer and one forward per step.

The batch is re-packed only when its membership changes (a sequence finishes prefill, ends or is aborted);
between changes every step appends one column in place. While in a batch a sequence's KV lives in its row
(`kv_of` gives a view without the padding); a sequence decoding alone keeps its own cache.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from worker.engine.kv import GrowableLayer, new_kv
from worker.engine.sequence import Sequence

_HEADROOM = 64  # columns reserved past the longest member at each re-pack


class DecodeBatch:
    def __init__(self, num_layers: int, device: torch.device):
        self.num_layers = num_layers
        self.device = device
        self.seqs: list[Sequence] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [N, width]: 1 for real tokens, 0 for left padding
        self.pads: list[int] = []
        self.steps = 0  # batched forwards run
        self.repacks = 0

    def __contains__(self, seq: Sequence) -> bool:
        return any(s is seq for s in self.seqs)

    def kv_of(self, seq: Sequence) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of `seq` as [heads, tokens, head_dim] views, from its row or its own cache."""
        for i, s in enumerate(self.seqs):
            if s is seq:
                p = self.pads[i]
                return [(layer.keys[i, :, p:], layer.values[i, :, p:]) for layer in self.cache.layers]
        return [(layer.keys[0], layer.values[0]) for layer in seq.kv.layers]

    def sync(self, seqs: Seq[Sequence]) -> None:
        """Make the batch hold exactly `seqs` (in order), moving KV between rows and own caches as needed."""
        if len(seqs) == len(self.seqs) and all(a is b for a, b in zip(seqs, self.seqs)):
            return
        sources = {s.id: self.kv_of(s) for s in seqs}  # views into the old batch or the sequences' own KV
        if len(seqs) < 2:
            for s in seqs:  # a lone sequence decodes on its own cache again
                if s.kv is None:
                    s.kv = _own_cache(sources[s.id], self.num_layers)
            self._reset()
            return
        lengths = [s.num_computed for s in seqs]
        width = max(lengths)
        cache = new_kv(self.num_layers)
        for li, layer in enumerate(cache.layers):
            k0 = sources[seqs[0].id][li][0]
            template = k0.new_empty((len(seqs), k0.shape[0], 0, k0.shape[-1]))
            layer.lazy_initialization(template, template)
            layer.reserve(template, width + _HEADROOM)
            for i, s in enumerate(seqs):
                pad = width - lengths[i]
                k, v = sources[s.id][li]
                layer._kbuf[i, :, :pad].zero_()
                layer._vbuf[i, :, :pad].zero_()
                layer._kbuf[i, :, pad:width].copy_(k)
                layer._vbuf[i, :, pad:width].copy_(v)
            _set_len(layer, width)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=self.device)
        for i, n in enumerate(lengths):
            mask[i, width - n:] = 1
        for s in seqs:
            s.kv = None  # the row is now the only copy
        self.seqs, self.cache, self.mask = list(seqs), cache, mask
        self.pads = [width - n for n in lengths]
        self.repacks += 1

    @torch.inference_mode()
    def step(self, model) -> list[torch.Tensor]:
        n = len(self.seqs)
        ids = torch.tensor([[s.output_ids[-1]] for s in self.seqs], dtype=torch.long, device=self.device)
        pos = torch.tensor([[s.num_computed] for s in self.seqs], dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((n, 1))], dim=1)
        out = model(input_ids=ids, attention_mask=self.mask, position_ids=pos, cache=self.cache, use_cache=True,
                    logits_to_keep=1)
        for s in self.seqs:
            s.num_computed += 1
        self.steps += 1
        return list(out.logits[:, -1].float().unbind(0))

    def _reset(self) -> None:
        self.seqs, self.cache, self.mask, self.pads = [], None, None, []


def _set_len(layer: GrowableLayer, n: int) -> None:
    layer._len = n
    layer.keys = layer._kbuf[:, :, :n]
    layer.values = layer._vbuf[:, :, :n]


def _own_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], num_layers: int):
    cache = new_kv(num_layers)
    for layer, (k, v) in zip(cache.layers, kv):
        layer.update(k.unsqueeze(0), v.unsqueeze(0))
    return cache
