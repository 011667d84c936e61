"""Iteration-level scheduler: each step gives every decoding sequence one token and the token budget left to
prefill chunks, first come, first served: the running sequences' chunks first, then waiting sequences admitted
while budget, the batch and the KV pool have room. No request waits for another to finish. A preempted sequence
goes back to the head of the queue."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from worker.engine.sequence import Sequence, Status


@dataclass
class StepPlan:
    admitted: list[Sequence]
    prefill: list[tuple[Sequence, int]]  # (sequence, number of prompt tokens to compute this step)
    decode: list[Sequence]


class Scheduler:
    def __init__(self, max_num_seqs: int, max_batch_tokens: int, max_kv_tokens: int | None = None,
                 output_weight: float = 1.0):
        """`output_weight`: what a generated token weighs in the step budget and the KV pool, in the units of
        prompt tokens (the sim's 1 / token_scale, where each prompt token stands for token_scale real ones)."""
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_kv_tokens = max_kv_tokens
        self.output_weight = output_weight
        self.kv_tokens = 0  # reserved by the running sequences
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.kv_tokens -= self._reserve(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _reserve(self, seq: Sequence) -> int:
        if self.output_weight == 1.0:
            return seq.kv_reserve
        return seq.num_prompt + math.ceil((seq.kv_reserve - seq.num_prompt) * self.output_weight)

    def preempt(self, seq: Sequence) -> None:
        """Back to the head of the queue (its KV dropped by the engine): it is recomputed when re-admitted."""
        self.remove(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def plan(self, admit: Callable[[Sequence, bool], bool] | None = None) -> StepPlan:
        """`admit(seq, alone)`, when given, takes the sequence's KV pages (and its cache hit, which it counts as
        computed) and says whether they were there; `alone` says nothing else is running (such a request must be
        admitted). As vLLM's scheduler does, the running sequences are planned first: one token for each decoding
        one, then the oldest prefilling ones take the token budget in chunks; waiting sequences are admitted
        only while budget is left, so one looks the cache up when its prefill can start, after the blocks that
        earlier chunks cached, rather than when it arrived behind a long prompt."""
        decode = [s for s in self.running if not s.prefilling]
        budget = max(self.max_batch_tokens - math.ceil(len(decode) * self.output_weight), 1)
        prefill = []
        for seq in self.running:  # first come, first served
            if budget <= 0:
                break
            if seq.prefilling:
                n = min(seq.num_prefill - seq.num_computed, budget)
                prefill.append((seq, n))
                budget -= n
        admitted = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            head = self.waiting[0]
            need = self._reserve(head)
            if self.running and self.max_kv_tokens is not None and self.kv_tokens + need > self.max_kv_tokens:
                break  # the oldest waits for KV to free up; a lone request is always admitted
            head.num_prefill = head.num_prompt + len(head.output_ids)
            if admit is not None and not admit(head, not self.running):
                break
            seq = self.waiting.popleft()
            self.kv_tokens += need
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            n = min(seq.num_prefill - seq.num_computed, budget)
            prefill.append((seq, n))
            budget -= n
        return StepPlan(admitted, prefill, decode)
