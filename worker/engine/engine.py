"""The engine: one thread that owns the model, the block cache and the scheduler, and runs the step loop.

Handlers talk to it only through `submit` and `abort` (thread-safe); each sequence's `sink` receives
its events on the engine thread and is responsible for handing them to its own event loop.
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
from worker.engine.sampling import Sampler
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
    # Admit a request only while the running requests' KV (kv_reserve each) fits in this many tokens, as a GPU
    # engine whose running and cached KV share one pool does (vLLM). None: max_num_seqs alone bounds admission.
    max_kv_tokens: int | None = None


class Engine:
    def __init__(self, runner: Runner, config: EngineConfig):
        self.runner = runner
        self.config = config
        self.tokenizer = runner.loaded.tokenizer
        self.cache = BlockCache(config.block_size, config.cache_bytes)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_batch_tokens, config.max_kv_tokens)
        self.stop_token_ids = runner.stop_token_ids()
        self.block_bytes = runner.kv_bytes_per_token * config.block_size
        self._inbox: queue.SimpleQueue[tuple[str, Sequence]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.busy_s = 0.0  # wall seconds spent in steps: the GPU's busy time, the worker's load
        self.generated_tokens = 0

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

    # ---- the loop -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopped.is_set():
            self._drain_inbox()
            if not len(self.scheduler):
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
                self.scheduler.add(seq)
            elif seq.status is not Status.FINISHED:
                self._finish(seq, reason="abort", notify=False)

    def step(self) -> None:
        t0 = time.perf_counter()
        plan = self.scheduler.plan()
        for seq in plan.admitted:
            self._admit(seq)
        for seq, n in plan.prefill:
            start = seq.num_computed
            logits = self.runner.forward(seq, seq.prompt_ids[start:start + n])
            if not seq.prefilling:
                self._cache_blocks(seq)  # prompt blocks become visible to other requests right away
                self._sample(seq, logits)
        decoding = [s for s in plan.decode if s.status is Status.RUNNING]
        if decoding:
            for seq, logits in zip(decoding, self.runner.decode(decoding)):
                self._sample(seq, logits)
        self.steps += 1
        self.busy_s += time.perf_counter() - t0

    # ---- per-sequence work --------------------------------------------------------------------------------

    def _admit(self, seq: Sequence) -> None:
        B = self.config.block_size
        # At least one prompt token must be computed to get logits (as vLLM caps a full hit).
        max_blocks = (seq.num_prompt - 1) // B
        seq.blocks = self.cache.acquire_prefix(seq.prompt_ids, seq.salt, max_blocks)
        seq.num_cached_tokens = len(seq.blocks) * B
        seq.kv = self.runner.kv_from_blocks([b.payload for b in seq.blocks], seq.kv_reserve)
        seq.num_computed = seq.num_cached_tokens
        seq.sampler = Sampler(seq.params, self.runner.device)
        seq.text = TextState(self._decode, seq.params.stop)

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
        B = self.config.block_size
        ids = seq.all_ids()[: seq.num_computed]
        if not self.config.cache_generated:
            ids = ids[: seq.num_prompt]
        first, last = len(seq.blocks), len(ids) // B
        if last <= first:
            return
        parent = seq.blocks[-1] if seq.blocks else None
        payloads = None
        for i in range(first, last):
            toks = ids[i * B:(i + 1) * B]
            h = self.cache.child_hash(parent, seq.salt, toks)
            blk = self.cache.get(h, toks)
            if blk is None:
                if h in self.cache:
                    break  # same hash, other tokens: a collision; the chain stops here
                if payloads is None:
                    payloads = self.runner.block_payloads(seq, first * B, last * B, B)
                payload = payloads[i - first]
                blk = self.cache.insert(h, parent, toks, payload, self.block_bytes)
                if blk is None:
                    break  # no room: everything left is pinned by running requests
            seq.blocks.append(blk)
            parent = blk

    def _finish(self, seq: Sequence, reason: str | None = None, text: str = "", error: str | None = None,
                notify: bool = True) -> None:
        if seq.status is Status.RUNNING and error is None and reason != "abort":
            self._cache_blocks(seq)
        self.scheduler.remove(seq)
        self.cache.release(seq.blocks)
        seq.blocks = []
        seq.kv = None
        seq.status = Status.FINISHED
        seq.finish_reason = reason if reason != "abort" else None
        if notify:
            seq.sink(seq.event(text, error=error))
