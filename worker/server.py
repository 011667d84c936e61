"""The worker's OpenAI-compatible HTTP surface (aiohttp): chat and text completions, streaming or not,
models, health and metrics. Requests become engine Sequences; events come back through an asyncio.Queue."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from protocol.errors import APIError
from protocol.http import SSE_DONE, SSE_HEADERS, metrics_response, openai_app, parse_model, read_json, sse
from protocol.limits import Limits, check_max_tokens
from protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    make_usage,
    new_id,
    now,
)
from protocol.prompt import prompt_text
from protocol.statskeys import H_EXPECTED, H_KEY, H_TENANT, H_VERSION, BoundedLabels, label
from worker.engine.engine import SHUTTING_DOWN, Engine
from worker.engine.loader import LoadedModel
from worker.engine.sampling import SamplingParams
from worker.engine.sequence import SeqEvent, Sequence
from worker.metrics import WorkerMetrics
from worker.settings import WorkerSettings
from worker.stats import StatsPublisher

log = logging.getLogger("prefixroute.worker")


@dataclass
class _Tags:
    stats: StatsPublisher | None
    tenant: str | None
    version: str | None
    key: str | None
    expected: int | None


@dataclass
class _Prepared:
    prompt_ids: list[int]
    params: SamplingParams


class WorkerServer:
    def __init__(self, settings: WorkerSettings, loaded: LoadedModel, engine: Engine):
        self.settings = settings
        self.loaded = loaded
        self.engine = engine
        self.tokenizer = loaded.tokenizer
        self.vocab_size = len(self.tokenizer)
        self.metrics = WorkerMetrics(engine)
        self.stats: StatsPublisher | None = None  # set when the worker reports to Redis
        self.tenant_label = BoundedLabels(64)
        self.version_label = BoundedLabels(64)
        self.created = now()
        self.draining = False  # shutting down: new requests get 503 (a router retries them elsewhere)
        self.fault_rng = random.Random(f"fault:{settings.name}")  # testing faults, reproducible per worker

    @property
    def context_length(self) -> int:
        """The longest request served: the model's context, or less when the KV pool holds less."""
        cap = self.engine.capacity_tokens
        return self.loaded.max_model_len if cap is None else min(self.loaded.max_model_len, cap)

    def gauges(self) -> dict[str, int]:
        """The engine's live state, as the stats in Redis carry it."""
        e, c = self.engine, self.engine.cache
        return {"evictions": c.stats.evicted_blocks, "cache_bytes": c.used_bytes,
                "cache_capacity_bytes": c.capacity_bytes, "running": e.num_running, "waiting": e.num_waiting}

    def app(self) -> web.Application:
        app = openai_app(self, self.settings.max_body_bytes, Limits.of(self.settings))
        # SGLang's native info endpoints, which SGLang's router probes on every worker it is given.
        for path in ("/get_model_info", "/model_info"):
            app.router.add_get(path, self.model_info)
        for path in ("/get_server_info", "/server_info"):
            app.router.add_get(path, self.server_info)
        return app

    # ---- plain endpoints ----------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        card = ModelCard(id=self.loaded.name, created=self.created, max_model_len=self.context_length)
        return web.json_response(ModelList(data=[card]).model_dump())

    async def health(self, request: web.Request) -> web.Response:
        e = self.engine
        alive = e.alive and not self.draining
        status = "shutting down" if self.draining else "ok" if e.alive else "engine stopped"
        body = {"status": status, "running": e.num_running, "waiting": e.num_waiting,
                # what a router's prefix index sizes this worker's cache by
                "cache_capacity_tokens": e.cache.capacity_bytes // e.runner.kv_bytes_per_token}
        return web.json_response(body, status=200 if alive else 503)

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": self.loaded.name, "tokenizer_path": str(self.loaded.path),
                                  "is_generation": True, "max_model_len": self.context_length})

    async def server_info(self, request: web.Request) -> web.Response:
        e = self.engine
        return web.json_response({
            "model_path": self.loaded.name, "served_model_name": self.loaded.name,
            "max_total_num_tokens": e.cache.capacity_bytes // e.runner.kv_bytes_per_token,
            "page_size": e.config.block_size, "max_running_requests": e.config.max_num_seqs,
            "context_length": self.context_length, "worker_id": self.settings.name,
            "backend": self.settings.backend})

    async def prometheus(self, request: web.Request) -> web.Response:
        return metrics_response(self.metrics.registry)

    # ---- completions --------------------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat", parse_model(ChatCompletionRequest, await read_json(request)))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions", parse_model(CompletionRequest, await read_json(request)))

    async def _serve(self, request: web.Request, endpoint: str,
                     req: ChatCompletionRequest | CompletionRequest) -> web.StreamResponse:
        started = time.monotonic()
        try:
            await self._inject_faults()
            req.check_supported()
            check_max_tokens(req, self.settings.max_tokens_limit)
            self._check_model(req.model)
            prep = await asyncio.to_thread(self._prepare, req)
            if self.draining:
                raise APIError(503, "The worker is shutting down; retry on another.", code="server_shutting_down")
            if self.engine.num_waiting >= self.settings.max_waiting:
                raise APIError(503, "Worker is overloaded; retry later.", code="overloaded")
        except APIError as exc:
            self.metrics.requests.labels(endpoint, str(exc.status)).inc()
            raise
        events: asyncio.Queue[SeqEvent] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        seq = Sequence(prep.prompt_ids, prep.params, req.cache_salt,
                       sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        self.engine.submit(seq)
        stream = _EventStream(seq, events, self.metrics, started, self._tags(request, req))
        try:
            if req.stream:
                resp = await self._stream(request, endpoint, req, stream)
            else:
                resp = await self._complete(endpoint, req, stream)
        except asyncio.CancelledError:  # the client disconnected (handler cancellation)
            self.metrics.requests.labels(endpoint, "499").inc()
            raise
        finally:
            if not stream.done:  # client went away or the handler failed: free the engine slot
                self.engine.abort(seq)
        self.metrics.requests.labels(endpoint, "499" if stream.client_gone else str(resp.status)).inc()
        return resp

    async def _inject_faults(self) -> None:
        """Testing (fault_error_rate, fault_delay_s): a flaky worker's 500 at once, a slow worker's wait."""
        s = self.settings
        if s.fault_error_rate and self.fault_rng.random() < s.fault_error_rate:
            raise APIError(500, "Injected fault (testing: fault_error_rate).", code="injected_fault")
        if s.fault_delay_s:
            await asyncio.sleep(s.fault_delay_s)

    def _tags(self, request: web.Request, req: ChatCompletionRequest | CompletionRequest) -> _Tags:
        """What stats and metrics count this request under: what the router sent, else the request's own."""
        h = request.headers
        try:
            expected = int(h.get(H_EXPECTED, ""))
        except ValueError:
            expected = None
        version = req.prefix_version(h.get(H_VERSION))
        return _Tags(self.stats, self.tenant_label(h.get(H_TENANT)), self.version_label(version), label(h.get(H_KEY)),
                     expected)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.loaded.name:
            raise APIError(404, f"The model '{model}' does not exist; this worker serves '{self.loaded.name}'.",
                           param="model", code="model_not_found")

    def _prepare(self, req: ChatCompletionRequest | CompletionRequest) -> _Prepared:
        """Prompt token ids and sampling parameters, with every length check done (runs in a thread)."""
        prompt = prompt_text(self.tokenizer, req)
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        else:
            if any(t < 0 or t >= self.vocab_size for t in prompt):
                raise APIError(400, f"Prompt token ids must lie in [0, {self.vocab_size}).", param="prompt")
            ids = prompt
        if not ids:
            raise APIError(400, "The prompt is empty.", param="prompt")
        ctx = self.context_length
        cap = self.settings.max_prompt_tokens
        if cap is not None and len(ids) > cap:
            raise APIError(400, f"The prompt is {len(ids)} tokens; at most {cap} are allowed.",
                           param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        limit = req.token_limit()
        if len(ids) >= ctx or (limit is not None and len(ids) + limit > ctx):
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{len(ids) + (limit or 0)} tokens ({len(ids)} in the prompt, {limit or 0} for the completion). "
                "Please reduce the length of the prompt or the completion.",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        temperature = 1.0 if req.temperature is None else req.temperature
        params = SamplingParams(
            max_tokens=limit if limit is not None else ctx - len(ids),
            temperature=temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            seed=req.seed,
            stop=req.stop_list(),
            stop_token_ids=self.engine.stop_token_ids,
        )
        return _Prepared(ids, params)

    async def _complete(self, endpoint: str, req: ChatCompletionRequest | CompletionRequest,
                        stream: _EventStream) -> web.Response:
        parts = []
        async for ev in stream:
            parts.append(ev.text)
        last = stream.last
        if last.error:
            err = _engine_error(last.error)
            return web.json_response(err.body(), status=err.status)
        usage = make_usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)
        text = "".join(parts)
        if endpoint == "chat":
            body = ChatCompletion(id=new_id("chatcmpl"), created=now(), model=self.loaded.name, usage=usage,
                                  choices=[ChatChoice(message=AssistantMessage(content=text),
                                                      finish_reason=last.finish_reason)])
        else:
            body = Completion(id=new_id("cmpl"), created=now(), model=self.loaded.name, usage=usage,
                              choices=[CompletionChoice(text=text, finish_reason=last.finish_reason)])
        return web.Response(text=body.model_dump_json(), content_type="application/json")

    async def _stream(self, request: web.Request, endpoint: str, req: ChatCompletionRequest | CompletionRequest,
                      stream: _EventStream) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await resp.prepare(request)
        rid, created, model = new_id("chatcmpl" if endpoint == "chat" else "cmpl"), now(), self.loaded.name

        def chunk(text: str | None, finish: str | None, first: bool = False):
            if endpoint == "chat":
                delta = ChatDelta(role="assistant", content="") if first else ChatDelta(content=text)
                return ChatCompletionChunk(id=rid, created=created, model=model,
                                           choices=[ChatChunkChoice(delta=delta, finish_reason=finish)])
            return Completion(id=rid, created=created, model=model,
                              choices=[CompletionChoice(text=text or "", finish_reason=finish)])

        try:
            role_sent = endpoint != "chat"
            async for ev in stream:
                if not role_sent:  # with the first token, as vLLM does: a router reads the first byte as TTFT
                    await resp.write(sse(chunk(None, None, first=True)))
                    role_sent = True
                if ev.error:
                    await resp.write(sse(_engine_error(ev.error).body()))
                    break
                if ev.text or ev.finished:
                    await resp.write(sse(chunk(ev.text if ev.text or endpoint != "chat" else None, ev.finish_reason)))
            last = stream.last
            if req.include_usage and not last.error:
                usage = make_usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)
                if endpoint == "chat":
                    final = ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)
                else:
                    final = Completion(id=rid, created=created, model=model, choices=[], usage=usage)
                await resp.write(sse(final))
            await resp.write(SSE_DONE)
            await resp.write_eof()
        except ConnectionResetError:
            stream.client_gone = True  # _serve aborts the sequence and records 499 (nginx's "client closed")
        return resp


def _engine_error(error: str) -> APIError:
    if error == SHUTTING_DOWN:
        return APIError(503, "The worker shut down before the answer was complete; retry the request.",
                        code="server_shutting_down")
    return APIError(500, f"Generation failed: {error}.", code="engine_error")


class _EventStream:
    """Iterates a sequence's events until the last one, recording metrics as they pass."""

    def __init__(self, seq: Sequence, events: asyncio.Queue[SeqEvent], metrics: WorkerMetrics, started: float,
                 tags: _Tags | None = None):
        self.seq = seq
        self.tags = tags
        self.events = events
        self.metrics = metrics
        self.started = started
        self.done = False
        self.client_gone = False
        self.last: SeqEvent | None = None

    async def __aiter__(self) -> AsyncIterator[SeqEvent]:
        last_t, last_n = None, 0
        while not self.done:
            ev = await self.events.get()
            if ev.completion_tokens > last_n:
                t = time.monotonic()
                if last_t is None:
                    self.metrics.ttft.observe(t - self.started)
                else:  # inter-token latency, per token of this event
                    gap = (t - last_t) / (ev.completion_tokens - last_n)
                    for _ in range(ev.completion_tokens - last_n):
                        self.metrics.itl.observe(gap)
                last_t, last_n = t, ev.completion_tokens
            if ev.finished:
                self.done = True
                self.last = ev
                if not ev.error:
                    m = self.metrics
                    m.prompt_tokens.inc(ev.prompt_tokens)
                    m.cached_tokens.inc(ev.cached_tokens)
                    m.generation_tokens.inc(ev.completion_tokens)
                    m.e2e.observe(time.monotonic() - self.started)
                    t = self.tags
                    if t is not None:
                        m.count_labelled(ev.prompt_tokens, ev.cached_tokens, t.tenant, t.version, t.expected)
                        if t.stats is not None:
                            t.stats.record(ev.prompt_tokens, ev.cached_tokens, ev.completion_tokens, t.tenant,
                                           t.version, t.key, t.expected)
            yield ev
