"""The router's aiohttp application: the OpenAI surface in front of the pool, the admin API, health, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import BaseModel, Field, ValidationError

from protocol.engines import SALTED
from protocol.errors import APIError
from protocol.http import metrics_response, openai_app, parse_model, read_json
from protocol.limits import TIME_LIMIT, Limits, check_max_tokens
from protocol.openai import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, now
from protocol.redis import redis_client
from protocol.statskeys import H_EXPECTED, H_KEY, H_TENANT, H_VERSION, BoundedLabels, Keys, label
from router.admission import Admission
from router.breaker import BreakerConfig
from router.divergence import DivergenceTracker
from router.metrics import RouterMetrics
from router.policies import Policy, make_policy
from router.policies.cache_aware import CacheAware
from router.prefix import PrefixKeyer, RouteKeys
from router.proxy import Proxy
from router.settings import RouterSettings
from router.shared import SharedState
from router.stats import RedisState, read_stats
from router.tenants import Tenant, Tenants, check_admin
from router.upstream import UpstreamPool
from router.workers import WorkerPool, normalize_url
from worker.stats import StatsPublisher

log = logging.getLogger("prefixroute.router")


_SENT_TO = web.RequestKey("prefixroute_sent_to", str)  # the worker a request was placed on (admission wakes its queue)


class _WorkerBody(BaseModel):
    url: str
    weight: int = Field(1, ge=1, le=100)


class Router:
    def __init__(self, settings: RouterSettings, tokenizer, policy: Policy | None = None):
        self.settings = settings
        self.pool = WorkerPool(settings.vnodes, settings.fail_threshold, BreakerConfig.from_settings(settings),
                               engine_load=settings.engine_load)
        for w in settings.workers:
            self.pool.add(w.url, w.weight, w.engine)
        self.policy = policy or make_policy(settings)
        self.keyer = PrefixKeyer(tokenizer, settings.prefix_tokens, settings.index_block_bytes)
        if isinstance(self.policy, CacheAware):  # its index follows each worker's cache: its size, its removal
            self.pool.on_remove.append(self.policy.forget_worker)
            self.pool.on_cache_size.append(self.policy.index.set_budget)
        self.tenants = Tenants(settings.tenants, settings.open_tenant_secret.get_secret_value())
        self.admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        self.metrics = RouterMetrics(self.pool, settings.prefix_tokens)
        self.limits = Limits.of(settings)
        self.divergence = DivergenceTracker(max_tenants=len(settings.tenants) + 1)
        self.admission = Admission.from_settings(settings, self.pool, self._refused)
        self.metrics.admission_waiting.set_function(lambda: self.admission.waiting)
        self.client: aiohttp.ClientSession | None = None
        self.proxy: Proxy | None = None
        self._health_task: asyncio.Task | None = None
        self.redis = RedisState(None)
        self._redis_task: asyncio.Task | None = None
        self.engine_stats: StatsPublisher | None = None
        self._engine_stats_task: asyncio.Task | None = None
        self.tenant_label, self.version_label = BoundedLabels(256), BoundedLabels(64)
        self._share_task: asyncio.Task | None = None
        self.shared: SharedState | None = None
        self.stats_keys = Keys(settings.stats_namespace)
        self.metrics.watch_sharing(self)
        self.created = now()
        self.draining = False
        self._cut: asyncio.TimerHandle | None = None

    def app(self) -> web.Application:
        app = openai_app(self, self.settings.max_body_bytes, self.limits)
        app.router.add_get("/admin/workers", self.admin_list)
        app.router.add_post("/admin/workers", self.admin_add)
        app.router.add_delete("/admin/workers", self.admin_remove)
        app.router.add_post("/admin/workers/drain", self.admin_drain)
        app.router.add_post("/admin/route", self.admin_route)
        app.router.add_get("/admin/stats", self.admin_stats)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._drain)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        s = self.settings
        # Health probes and admin calls; requests go through the proxy's own pool (router.upstream).
        self.client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s),
                                            auto_decompress=False)
        # The connect timeout counts only the connecting, not a wait for a free connection: a router at
        # max_connections must queue requests, not mark every worker failed at once.
        self.proxy = Proxy(UpstreamPool(s.max_connections, s.connect_timeout_s, s.request_timeout_s, keepalive_s=60),
                           self.pool, self.metrics, s.max_failover, on_usage=self._engine_usage)
        await self.pool.probe_all(self.client, s.health_timeout_s)
        self._health_task = asyncio.create_task(
            self.pool.health_loop(self.client, s.health_interval_s, s.health_timeout_s))
        if s.redis_url:
            self.redis = RedisState(redis_client(s.redis_url))
            await self.redis.check()
            self._redis_task = asyncio.create_task(self.redis.run())
            if s.share_state or s.discover_workers:
                await self._start_sharing()
            # Other engines' requests, counted by tenant, prefix version and key as a prefixroute worker counts
            # its own (their worker counters come from their sidecars).
            self.engine_stats = StatsPublisher(self.redis.client, self.stats_keys, "router", {}, dict,
                                               s.share_interval_s, worker_counters=False)
            self._engine_stats_task = asyncio.create_task(self.engine_stats.run())

    def _engine_usage(self, usage: dict, tags: dict[str, str]) -> None:
        """An answer from another engine (router.proxy): its usage, counted here by tenant, version and key."""
        try:
            prompt = int(usage.get("prompt_tokens") or 0)
            details = usage.get("prompt_tokens_details")
            cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
            generated = int(usage.get("completion_tokens") or 0)
            expected = int(tags.get(H_EXPECTED) or 0)
        except (TypeError, ValueError):
            return
        tenant, version = self.tenant_label(tags.get(H_TENANT)), self.version_label(tags.get(H_VERSION))
        self.metrics.engine_usage.count(prompt, cached, tenant, version, expected)
        if self.engine_stats is not None:
            self.engine_stats.record(prompt, cached, generated, tenant, version, label(tags.get(H_KEY)), expected)

    async def _start_sharing(self) -> None:
        """Load the shared state before serving (a router starts warm), then keep it in sync."""
        s = self.settings
        policy = self.policy if s.share_state else None
        self.shared = SharedState(self.redis.client, self.stats_keys, policy, self.pool, s.share_interval_s,
                                  s.share_log_entries, discover=s.discover_workers)
        if self.redis.status == "ok":
            try:
                n = await asyncio.wait_for(self.shared.load(), 60)
                log.info("loaded %d shared routing decisions", n)
                if self.shared.discovered:
                    await self.pool.probe_all(self.client, s.health_timeout_s)
            except Exception as exc:  # serve on local state; the sync loop catches up when Redis answers
                log.warning("could not load the shared routing state (%s)", type(exc).__name__)
        self._share_task = asyncio.create_task(self.shared.run())

    async def _drain(self, app: web.Application) -> None:
        """SIGTERM: listening has stopped and aiohttp waits for the requests in flight; those still running after
        the grace period are cut, each ending with an error its client sees."""
        self.draining = True
        log.info("shutting down: %d request(s) in flight get %.0f s", self.pool.total_inflight,
                 self.settings.shutdown_grace_s)
        if self.proxy is not None:
            self._cut = asyncio.get_running_loop().call_later(self.settings.shutdown_grace_s, self.proxy.cut_all)

    async def _stop(self, app: web.Application) -> None:
        if self._cut is not None:
            self._cut.cancel()
        if self.engine_stats is not None:
            self._engine_stats_task.cancel()
            await self.engine_stats.close()  # a last flush
        for task in (self._health_task, self._redis_task, self._share_task):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.redis.close()
        if self.client:
            await self.client.close()
        if self.proxy is not None:
            self.proxy.upstream.close()

    # ---- OpenAI surface -----------------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._route(request, "/v1/chat/completions", ChatCompletionRequest)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._route(request, "/v1/completions", CompletionRequest)

    async def _parse(self, request: web.Request, model_cls) -> tuple[Tenant, Any, RouteKeys]:
        """Authenticate, validate and key a request; answers 4xx/503 (counted) when it cannot be routed."""
        try:
            tenant = self.tenants.authenticate(request.headers.get("Authorization"))
            obj = await read_json(request, self.limits)
            req = parse_model(model_cls, obj)
            req.check_supported()
            check_max_tokens(req, self.settings.max_tokens_limit)
            known = self.pool.models()
            if req.model is not None and known and req.model not in known:
                raise APIError(404, f"The model '{req.model}' does not exist.", param="model", code="model_not_found")
            self.pool.tick()  # an open circuit breaker whose time is over lets its worker back for one trial
            if not self.pool.active:
                raise APIError(503, "No healthy worker is available.", code="no_healthy_worker")
            keys = self.keyer.keys(tenant, req, request.headers.get("x-session-id"))
            cap = self.settings.max_prompt_tokens
            if cap is not None and keys.prompt_tokens > cap:
                raise APIError(400, f"The prompt is about {keys.prompt_tokens} tokens; at most {cap} are allowed.",
                               param="messages" if model_cls is ChatCompletionRequest else "prompt",
                               code="context_length_exceeded")
            return tenant, req, keys
        except APIError as exc:
            self.metrics.rejected.labels(str(exc.status)).inc()
            raise
        except web.HTTPException as exc:  # 413 from the body size limit
            self.metrics.rejected.labels(str(exc.status)).inc()
            raise

    def _refused(self, reason: str) -> None:
        self.metrics.admission_rejected.labels(reason).inc()
        self.metrics.rejected.labels("429").inc()

    async def _route(self, request: web.Request, path: str, model_cls) -> web.StreamResponse:
        limit = self.settings.request_time_limit_s
        if limit is None:
            return await self._admit(request, path, model_cls)
        # The proxy reads TIME_LIMIT when the cancel lands mid-stream (it ends the stream with the error event);
        # before any byte went out the timeout is a 408 here. Either way the upstream request is closed.
        timer = asyncio.timeout(limit)
        request[TIME_LIMIT] = timer
        try:
            async with timer:
                return await self._admit(request, path, model_cls)
        except TimeoutError:
            if not timer.expired():
                raise
            self.metrics.rejected.labels("408").inc()
            raise APIError(408, f"The request ran past its time limit of {limit:g} s.",
                           code="request_timeout") from None

    async def _admit(self, request: web.Request, path: str, model_cls) -> web.StreamResponse:
        tenant, req, keys = await self._parse(request, model_cls)
        admission = self.admission
        gate = admission.enter(tenant.id, keys.prompt_tokens)
        try:
            deadline = await admission.wait_for_room() if admission.enabled else None
            return await self._forward(request, path, tenant, req, keys, deadline)
        finally:
            admission.leave(gate)
            admission.released(request.get(_SENT_TO))

    async def _forward(self, request: web.Request, path: str, tenant: Tenant, req: Any, keys: RouteKeys,
                       deadline: float | None = None) -> web.StreamResponse:
        m = self.metrics
        m.tokenize.observe(keys.tokenize_s)
        m.prefix_tokens.observe(keys.prefix_tokens)
        shared = self.divergence.observe(tenant.id, tenant.key, keys.prefix_ids)
        if shared is not None:
            m.observe_shared(label(tenant.id) or "none", shared)
        decision = self.policy.choose(keys, self.pool, hold=deadline is not None and self.settings.hold_for_cache)
        while decision.hold:  # its best worker is full: wait for a slot there, within the admission wait
            m.admission_held.inc()
            held = decision
            room = await self.admission.wait_for_worker(decision.worker, deadline, decision.prefill)
            if not room and self.admission.refuses_after_hold(
                    held.prefill, lambda: self.policy.choose(keys, self.pool, dry_run=True).prefill):
                raise self.admission.refuse_held()
            decision = self.policy.choose(keys, self.pool, hold=room)
        request[_SENT_TO] = decision.worker
        pool = self.pool
        if self.admission.enabled and not pool.admits(pool.workers[decision.worker], decision.prefill):
            # A policy blind to the bounds (cache_aware honours them) chose a full worker: the least loaded with room.
            decision.worker = min((n for n in pool.active if pool.admits(pool.workers[n], decision.prefill)),
                                  key=pool.inflight, default=decision.worker)
            decision.reason = "load"
        m.fanout.observe(decision.fanout)
        if decision.fanout > 1:
            m.spills.inc()
        salt = tenant.cache_salt(req.cache_salt)
        # Append the tenant's salt to the client's own bytes instead of re-serializing a possibly large body:
        # JSON parsers (the worker's included) keep the last of duplicate keys, so any client-sent cache_salt
        # is overridden by this one. The body is known to be one JSON object.
        raw = (await request.read()).rstrip()
        body = raw[:-1] + b',"cache_salt":"' + salt.encode() + b'"}'
        tags = {H_KEY: keys.short, H_TENANT: tenant.id,
                H_EXPECTED: str(max(0, decision.context - decision.prefill))}
        version = label(req.prefix_version(request.headers.get(H_VERSION)))
        if version is not None:
            tags[H_VERSION] = version
        return await self.proxy.forward(request, path, body, decision, {H_KEY: keys.short}, tags)

    async def models(self, request: web.Request) -> web.Response:
        self.tenants.authenticate(request.headers.get("Authorization"))
        cards = [ModelCard(id=m, created=self.created) for m in self.pool.models()]
        return web.json_response(ModelList(data=cards).model_dump())

    async def health(self, request: web.Request) -> web.Response:
        n = len(self.pool.active)
        status = "shutting down" if self.draining else "ok" if n else "no healthy worker"
        return web.json_response({"status": status, "workers": n, "redis": self.redis.status},
                                 status=200 if n and not self.draining else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return metrics_response(self.metrics.registry)

    # ---- admin --------------------------------------------------------------------------------------------

    def _admin(self, request: web.Request, tenant_request: bool = False) -> None:
        """The admin key, in Authorization; for an endpoint that reads a tenant's request (its key in
        Authorization, as it would be sent), in X-Admin-Key."""
        if tenant_request:
            given = request.headers.get("x-admin-key")
            check_admin(f"Bearer {given}" if given else None, self.admin_key)
        else:
            check_admin(request.headers.get("Authorization"), self.admin_key)

    def _listing(self) -> dict:
        return {"workers": [{"url": w.url, "weight": w.weight, "healthy": w.healthy, "draining": w.draining,
                             "inflight": w.inflight, "models": w.models, "engine": w.engine,
                             "tenant_isolation": w.engine in SALTED if w.engine else None,
                             "reported": dict(zip(("running", "waiting"), w.reported)) if w.reported else None,
                             "breaker": w.breaker.state if w.breaker else None} for w in self.pool.workers.values()]}

    async def _worker_body(self, request: web.Request) -> _WorkerBody:
        try:
            body = _WorkerBody.model_validate(await read_json(request))
            body.url = normalize_url(body.url)
            return body
        except (ValidationError, ValueError) as exc:
            raise APIError(422, f"Invalid worker: {exc}", param="url", code="invalid_worker") from None

    async def admin_route(self, request: web.Request) -> web.Response:
        """The decision the router would make for this body and headers, neither forwarded nor counted."""
        self._admin(request, tenant_request=True)
        path = request.query.get("path", "/v1/chat/completions")
        model_cls = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}.get(path)
        if model_cls is None:
            raise APIError(400, "'path' must be /v1/chat/completions or /v1/completions.", param="path")
        _, _, keys = await self._parse(request, model_cls)
        d = self.policy.choose(keys, self.pool, dry_run=True)
        return web.json_response({"key": keys.short, "session": keys.session.hex()[:12] if keys.session else None,
                                  "worker": d.worker, "reason": d.reason, "fanout": d.fanout,
                                  "candidates": list(d.candidates) or [d.worker],
                                  "expected_cached_tokens": d.context - d.prefill})

    async def admin_stats(self, request: web.Request) -> web.Response:
        """Hit stats from Redis, the same on every router replica."""
        self._admin(request)
        if self.redis.client is None:
            return web.json_response({"redis": "off"})
        try:
            body = await asyncio.wait_for(read_stats(self.redis.client, self.stats_keys), 5.0)
        except Exception as exc:
            self.redis.status = "down"
            raise APIError(503, f"Redis is unavailable ({type(exc).__name__}).", code="stats_unavailable") from None
        return web.json_response({"redis": "ok", **body})

    async def admin_list(self, request: web.Request) -> web.Response:
        self._admin(request)
        return web.json_response(self._listing())

    async def admin_add(self, request: web.Request) -> web.Response:
        self._admin(request)
        body = await self._worker_body(request)
        w = self.pool.add(body.url, body.weight)
        await self.pool.probe(self.client, w, self.settings.health_timeout_s)
        return web.json_response(self._listing(), status=201)

    async def admin_remove(self, request: web.Request) -> web.Response:
        self._admin(request)
        body = await self._worker_body(request)
        if not self.pool.remove(body.url):
            raise APIError(404, f"No worker {body.url}.", param="url", code="unknown_worker")
        return web.json_response(self._listing())

    async def admin_drain(self, request: web.Request) -> web.Response:
        self._admin(request)
        body = await self._worker_body(request)
        if not self.pool.drain(body.url):
            raise APIError(404, f"No worker {body.url}.", param="url", code="unknown_worker")
        return web.json_response(self._listing())
