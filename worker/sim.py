"""The sim backend: the real engine (scheduler, block cache, hash chain, sampling, HTTP API) driven by a GPU
cost model instead of a model, so routing can be tested at 8 to 64 replicas on a CPU.

`SimRunner` stands where `ModelRunner` stands: each prefill chunk and each decode step sleeps for the time the
profiled GPU would take, and the "logits" always pick one filler token. The prefix cache is the real
`BlockCache` with no payloads, charged the profile's KV bytes per block, so hits, misses and evictions are
exactly those of a worker with that much KV memory. Token counts come from the real tokenizer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from protocol.modelfiles import load_tokenizer, resolve_model_path, served_name
from worker.engine.loader import LoadedModel
from worker.engine.sampling import SamplingParams
from worker.engine.sequence import Sequence


@dataclass(frozen=True)
class GpuProfile:
    """Service-time constants of one GPU serving one model. Derivations for the default:

    H100 SXM (989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, 80 GB) serving Llama-3.1-8B in bf16 (16 GB of weights,
    32 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes = 128 KiB of KV per token):
    - prefill: 2 x 8e9 FLOP per token at ~40% MFU -> ~25k tokens/s; chunked-prefill engines measure 15-20k,
      so 18k tokens/s, plus attention over the cached context at 1/8 of a token's cost per 1k tokens of it;
    - decode step: reading the weights once (16 GB / 3.35 TB/s = 4.8 ms) plus each running sequence's KV
      (128 KiB x context / 3.35 TB/s = 39 ns per context token), plus ~1.5 ms of scheduling and launches;
    - KV memory: 80 GB - 16 GB weights - ~8 GB activations and runtime = 56 GB -> ~427k tokens.
    """

    name: str = "h100-llama3-8b"
    prefill_tokens_per_s: float = 18_000.0
    prefill_ctx_factor_per_1k: float = 0.125
    decode_weights_s: float = 0.0048
    decode_s_per_ctx_token: float = 39e-9
    step_overhead_s: float = 0.0015
    kv_bytes_per_token: int = 131_072
    kv_capacity_bytes: int = 56 * 10**9
    max_model_len: int = 131_072
    max_num_seqs: int = 256
    max_batch_tokens: int = 8192  # tokens per engine step (decode + prefill chunks), vLLM's default on this GPU

    def prefill_s(self, new_tokens: int, context: int) -> float:
        attn = 1.0 + self.prefill_ctx_factor_per_1k * (context + new_tokens / 2) / 1000
        return new_tokens * attn / self.prefill_tokens_per_s

    def decode_s(self, contexts: Seq[int]) -> float:
        return self.decode_weights_s + self.decode_s_per_ctx_token * sum(contexts)


PROFILES = {p.name: p for p in (GpuProfile(),)}


class SimRunner:
    """Duck-types ModelRunner for the engine; time passes `speedup` times faster than on the real GPU."""

    MAX_LAG_S = 0.1  # wall seconds the simulated clock may run behind before it is reset to now

    def __init__(self, loaded: LoadedModel, profile: GpuProfile, speedup: float = 1.0, token_scale: float = 1.0,
                 filler: str = " the"):
        self.loaded = loaded
        self.profile = profile
        self.speedup = speedup
        # A trace replayed with its 512-token blocks cut to 16 tokens runs with token_scale 32: each token
        # served then costs, and occupies cache, like the 32 it stands for.
        self.scale = token_scale
        self.device = torch.device("cpu")
        self.kv_bytes_per_token = int(profile.kv_bytes_per_token * token_scale)
        tok = loaded.tokenizer
        ids = tok(filler, add_special_tokens=False).input_ids
        self.filler_id = ids[0]
        self._logits = torch.full((len(tok),), float("-inf"))
        self._logits[self.filler_id] = 0.0
        self.busy_s = 0.0  # simulated GPU time spent, for stats
        self._due: float | None = None  # when (perf_counter) the simulated GPU ends the work charged so far

    def stop_token_ids(self) -> frozenset[int]:
        eos = self.loaded.tokenizer.eos_token_id
        return frozenset([eos]) if eos is not None else frozenset()

    def _spend(self, seconds: float) -> None:
        """Sleep until the simulated GPU would end this work. The clock runs on from the end of the previous
        work, not from now: the engine's own Python between and within steps (and a thread's wait for the GIL
        among many replicas in one process) is the step overhead the profile already charges, so it must not
        add to it, as relative sleeps did (docs/benchmarks/sim_pace). A lag past MAX_LAG_S (a CPU that cannot
        keep up) is dropped, not caught up."""
        self.busy_s += seconds
        now = time.perf_counter()
        due = self._due
        if due is None or due < now - self.MAX_LAG_S:
            due = now
        due += seconds / self.speedup
        self._due = due
        if due - now >= 0.0005:  # sleeps that time.sleep can honour; shorter ones are owed to the next
            time.sleep(due - now)

    def idle(self) -> None:
        """The engine has nothing to run: the next work starts the simulated GPU's clock afresh."""
        self._due = None

    def sampler(self, params: SamplingParams) -> Callable[[torch.Tensor], int]:
        """The filler token, which any sampling of the sim's logits picks (its only finite logit), without the
        softmax over the vocabulary: that cost 88% of a 32-replica sim process's CPU under load."""
        return self._filler

    def _filler(self, logits: torch.Tensor) -> int:
        return self.filler_id

    def _real(self, seq: Sequence, n: int) -> int:
        """The real tokens the first n of the sequence's tokens stand for: each prompt token `scale` of them (a
        trace's block cut short), each generated token one (the answer is not scaled: max_tokens is real)."""
        p = seq.num_prompt
        return int(min(n, p) * self.scale) + max(0, n - p)

    def forward(self, seq: Sequence, token_ids: list[int]) -> torch.Tensor:
        ctx = seq.num_computed
        real_ctx = self._real(seq, ctx)
        self._spend(self.profile.step_overhead_s + self.profile.prefill_s(
            self._real(seq, ctx + len(token_ids)) - real_ctx, real_ctx))
        seq.num_computed += len(token_ids)
        return self._logits

    def decode(self, seqs: Seq[Sequence]) -> list[torch.Tensor]:
        self._spend(self.profile.step_overhead_s + self.profile.decode_s([self._real(s, s.num_computed)
                                                                          for s in seqs]))
        for s in seqs:
            s.num_computed += 1
        return [self._logits] * len(seqs)

    # No KV to hold: the sim's pool is the scheduler's token bound (max_kv_tokens) and the cache's byte budget.
    capacity_tokens = None

    def bind(self, num_pages: int, page_size: int, evict) -> None:
        pass

    def available_pages(self) -> None:
        return None

    def used_pages(self) -> None:
        return None

    def attach(self, seq: Sequence, payloads: list) -> None:
        pass

    def reserve(self, seq: Sequence, tokens: int) -> bool:
        return True

    def free(self, seq: Sequence) -> None:
        pass

    def block_payloads(self, seq: Sequence, first: int, last: int) -> list[None]:
        return [None] * (last - first)

    def retain(self, payload: None) -> None:
        pass

    def release(self, payload: None) -> None:
        pass

    def replace(self, seq: Sequence, index: int, payload: None) -> None:
        pass


def load_sim(model: str | None, served_model_name: str | None, profile: GpuProfile) -> LoadedModel:
    """Only the tokenizer of the model: the sim serves its name and token counts, and no weights."""
    path = resolve_model_path(model)
    tok = load_tokenizer(path)
    return LoadedModel(None, tok, served_model_name or served_name(path), path, torch.device("cpu"), torch.float32,
                       profile.max_model_len)
