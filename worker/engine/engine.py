"""The engine: one thread that owns the model, the block cache and the scheduler, and runs the step loop.

Handlers talk to it only through `submit` and `abort` (thread-safe); each sequence's `sink` receives
its events on the engine thread and is responsible for handing them to its own event loop.

KV memory is one pool of pages (`cache_bytes` of them) shared by running requests and the prefix cache, as on
a GPU engine: a request is admitted when the pages its prompt needs beyond its cache hit are free or held only
by the cache (evicted on demand); a decoding request that needs a page when none is left preempts the youngest
running request, which is recomputed later (its computed blocks handed to the cache first, so mostly hits).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

from worker.engine.cache import BlockCache
from worker.engine.runner import Runner
from worker.engine.scheduler import Scheduler
from worker.engine.sequence import Sequence, Status, TextState

SHUTTING_DOWN = "worker shutting down"  # the error of every sequence still in the engine when it stops
log = logging.getLogger("prefixroute.worker.engine")


@dataclass
class EngineConfig:
    block_size: int = 16
    cache_bytes: int = 1 << 30
    max_num_seqs: int = 16
    max_batch_tokens: int = 512
    cache_generated: bool = True
    prefix_caching: bool = True  # False: no lookups and no inserts (every request a full prefill)
    # Admit a request only while the running requests' KV (kv_reserve each) fits in this many tokens, as a GPU
    # engine whose running and cached KV share one pool does (vLLM). None: max_num_seqs alone bounds admission.
    max_kv_tokens: int | None = None
    output_weight: float = 1.0  # a generated token in prompt-token units (worker.engine.scheduler)


class Engine:
    def __init__(self, runner: Runner, config: EngineConfig):
        self.runner = runner
        self.config = config
        self.tokenizer = runner.loaded.tokenizer
        self.block_bytes = runner.kv_bytes_per_token * config.block_size
        self.cache = BlockCache(config.block_size, config.cache_bytes, on_evict=runner.release)
        runner.bind(config.cache_bytes // self.block_bytes, config.block_size, self.cache.evict_one)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_batch_tokens, config.max_kv_tokens,
                                   config.output_weight)
        self.stop_token_ids = runner.stop_token_ids()
        self._inbox: queue.SimpleQueue[tuple[str, Sequence]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.busy_s = 0.0  # wall seconds spent in steps: the GPU's busy time, the worker's load
        self.generated_tokens = 0
        self.preemptions = 0

    # ---- thread-safe API ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, seq: Sequence) -> None:
        self._inbox.put(("add", seq))
        self._wake.set()

    def abort(self, seq: Sequence) -> None:
        self._inbox.put(("abort", seq))
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_used_bytes(self) -> int | None:
        """Bytes of KV pages referenced by running requests or the cache; None where the runner has no pages."""
        used = self.runner.used_pages()
        return None if used is None else used * self.block_bytes

    @property
    def capacity_tokens(self) -> int | None:
        """Tokens of KV the pool holds: the longest request (prompt + output) that can run; None: unbounded."""
        return self.runner.capacity_tokens

    # ---- the loop -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopped.is_set():
            self._drain_inbox()
            if not len(self.scheduler):
                self.runner.idle()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as exc:  # a failed forward ends the sequences of that step, not the worker
                log.exception("engine step failed")
                for seq in list(self.scheduler.running):
                    self._finish(seq, error=f"{type(exc).__name__} in the engine")
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, error=SHUTTING_DOWN)

    def _drain_inbox(self) -> None:
        while True:
            try:
                op, seq = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                cap = self.capacity_tokens
                if cap is not None and seq.num_prompt + 1 > cap:
                    self._finish(seq, error=f"the prompt needs {seq.num_prompt + 1} tokens of KV; the worker's "
                                            f"pool holds {cap}")
                else:
                    self.scheduler.add(seq)
            elif seq.status is not Status.FINISHED:
                self._finish(seq, reason="abort", notify=False)

    def step(self) -> None:
        t0 = time.perf_counter()
        plan = self.scheduler.plan(self._admit)
        for seq, n in plan.prefill:
            start = seq.num_computed
            ids = seq.prompt_ids if seq.num_prefill == seq.num_prompt else seq.all_ids()
            logits = self.runner.forward(seq, ids[start:start + n])
            # Each chunk's full blocks become visible to other requests right away (as SGLang caches an
            # unfinished request's chunks), so a request admitted behind a long prompt finds what is done of it.
            self._cache_blocks(seq)
            if not seq.prefilling:
                self._sample(seq, logits)
        decoding = self._grow([s for s in plan.decode if s.status is Status.RUNNING])
        if decoding:
            for seq, logits in zip(decoding, self.runner.decode(decoding)):
                self._sample(seq, logits)
        self.steps += 1
        self.busy_s += time.perf_counter() - t0

    # ---- per-sequence work --------------------------------------------------------------------------------

    def _admit(self, seq: Sequence, alone: bool) -> bool:
        """Pin the sequence's cache hit and take pages for the rest of its prefill; False (nothing taken) if the
        pool cannot hold them while keeping a page of headroom per running request."""
        B = self.config.block_size
        resumed = seq.sampler is not None  # preempted earlier: prompt and output so far are recomputed
        ids = seq.all_ids() if resumed else seq.prompt_ids
        # At least one token must be computed to get logits (as vLLM caps a full hit).
        max_blocks = (seq.num_prefill - 1) // B if self.config.prefix_caching else 0
        blocks = self.cache.acquire_prefix(ids, seq.salt, max_blocks, record=False)
        free = self.runner.available_pages()
        if free is not None and not alone:
            need = -(-seq.num_prefill // B) - len(blocks)
            if free + self.cache.evictable < need + len(self.scheduler.running):
                self.cache.release(blocks)
                return False
        seq.blocks = blocks
        self.runner.attach(seq, [b.payload for b in blocks])
        if not self.runner.reserve(seq, seq.num_prefill):
            raise RuntimeError("the KV pool cannot hold a lone request's prompt")  # excluded at submit
        seq.num_computed = len(blocks) * B
        if not resumed:
            self.cache.record_lookup(seq.num_prompt, seq.num_computed)
            seq.num_cached_tokens = seq.num_computed
            seq.sampler = self.runner.sampler(seq.params)
            seq.text = TextState(self._decode, seq.params.stop)
        return True

    def _grow(self, decoding: list[Sequence]) -> list[Sequence]:
        """Give each decoding sequence room for its next token, preempting the youngest running sequences while
        the pool has none; returns those still decoding."""
        for seq in decoding:
            while seq.status is Status.RUNNING and not self.runner.reserve(seq, seq.num_computed + 1):
                victim = self.scheduler.running[-1]
                if victim is seq and len(self.scheduler.running) == 1:
                    self._finish(seq, reason="length", text=seq.text.finish())  # the whole pool is its own
                else:
                    self._preempt(victim)
        return [s for s in decoding if s.status is Status.RUNNING]

    def _preempt(self, seq: Sequence) -> None:
        if not seq.prefilling:
            self._cache_blocks(seq)  # its blocks go to the cache, so recomputing it is mostly hits
        self.scheduler.preempt(seq)
        self.cache.release(seq.blocks)
        seq.blocks = []
        self.runner.free(seq)
        seq.num_computed = 0
        self.preemptions += 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> None:
        tok = seq.sampler(logits)
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        seq.output_ids.append(tok)
        self.generated_tokens += 1
        if tok in seq.params.stop_token_ids:
            self._finish(seq, reason="stop", text=seq.text.finish())
            return
        delta, stopped = seq.text.update(seq.output_ids)
        if stopped:
            self._finish(seq, reason="stop", text=delta)
        elif len(seq.output_ids) >= seq.params.max_tokens:
            self._finish(seq, reason="length", text=delta + seq.text.finish())
        else:
            seq.sink(seq.event(delta))

    def _cache_blocks(self, seq: Sequence) -> None:
        """Insert the sequence's full blocks past those it already pins (prompt, and generated if enabled)."""
        if not self.config.prefix_caching:
            return
        B = self.config.block_size
        n = seq.num_computed if self.config.cache_generated else min(seq.num_computed, seq.num_prompt)
        first, last = len(seq.blocks), n // B
        if last <= first:
            return
        # Called after every prefill chunk: no copy of a long prompt unless the blocks reach generated tokens.
        ids = seq.prompt_ids if last * B <= seq.num_prompt else seq.all_ids()
        parent = seq.blocks[-1] if seq.blocks else None
        payloads = self.runner.block_payloads(seq, first, last)
        for i in range(first, last):
            toks = ids[i * B:(i + 1) * B]
            h = self.cache.child_hash(parent, seq.salt, toks)
            blk = self.cache.get(h, toks)
            if blk is not None:  # computed meanwhile by another request: share its page, free ours
                self.runner.replace(seq, i, blk.payload)
            else:
                if h in self.cache:
                    break  # same hash, other tokens: a collision; the chain stops here
                payload = payloads[i - first]
                blk = self.cache.insert(h, parent, toks, payload, self.block_bytes)
                if blk is None:
                    break  # no room: everything left is pinned by running requests
                self.runner.retain(payload)  # the cache's reference to the page
            seq.blocks.append(blk)
            parent = blk

    def _finish(self, seq: Sequence, reason: str | None = None, text: str = "", error: str | None = None,
                notify: bool = True) -> None:
        if seq.status is Status.RUNNING and error is None and reason != "abort":
            self._cache_blocks(seq)
        self.scheduler.remove(seq)
        self.cache.release(seq.blocks)
        seq.blocks = []
        self.runner.free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason if reason != "abort" else None
        if notify:
            seq.sink(seq.event(text, error=error))
