"""The worker pool: membership (static + admin API), health (active probes, passive failures), draining,
and in-flight counts kept incrementally so that a decision never sums over workers.

Each health probe also reads the load the worker reports: a prefixroute worker's /health, another engine's
Prometheus /metrics (protocol.engines; the kind is detected, or given per worker). What it reports beyond this
router's own requests there (other router replicas', direct clients') becomes the worker's external work, which
placement adds to its own counts: waiting requests as prefill of the mean prompt, KV in use (or running
requests) as context held.

Only healthy, non-draining workers are on the ring; when one leaves, only the keys it owned move. A removed
worker's listeners (`on_remove`) are told, so per-worker state elsewhere (metrics series) goes with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from protocol.engines import ENGINES, OPENAI, PREFIXROUTE, SALTED, parse
from router.breaker import STATE_VALUE, Breaker, BreakerConfig
from router.ring import Ring

log = logging.getLogger("prefixroute.router.workers")


@dataclass(eq=False)
class Worker:
    url: str
    weight: int = 1
    healthy: bool = False
    draining: bool = False
    inflight: int = 0
    reserved: int = 0  # request slots handed to admission waiters that have been woken and not yet resumed
    prefill: int = 0  # tokens its in-flight requests are expected to prefill and have not yet started streaming
    context: int = 0  # prompt tokens of its in-flight requests (the KV they hold while they decode)
    fails: int = 0
    models: list[str] = field(default_factory=list)
    cache_tokens: int | None = None  # prompt tokens its prefix cache holds, as its /health says
    breaker: Breaker | None = None  # router.breaker; None: no breaker
    engine: str | None = None  # protocol.engines.KINDS; None: not known yet
    reported: tuple[int, int] | None = None  # (running, waiting) at the last probe, as the worker reports them
    external_prefill: float = 0.0  # work the worker reports beyond this router's requests (module docstring)
    external_context: float = 0.0

    @property
    def queued_prefill(self) -> float:
        """Prompt tokens queued here for prefill: this router's requests and what the worker reports beyond them."""
        return self.prefill + self.external_prefill

    def work(self, decode_weight: float) -> float:
        """The work queued here, in prompt tokens: prefill not started, plus decode_weight x the context held."""
        return self.queued_prefill + decode_weight * (self.context + self.external_context)

    @property
    def name(self) -> str:
        return self.url

    @property
    def usable(self) -> bool:
        # The breaker's on_ring changes only in WorkerPool methods that rebuild the ring (never with the clock).
        return self.healthy and not self.draining and (self.breaker is None or self.breaker.on_ring)

    @property
    def breaker_state(self) -> int:
        """0 closed (or no breaker), 1 half-open, 2 open."""
        return STATE_VALUE[self.breaker.state] if self.breaker else 0


def normalize_url(url: str) -> str:
    try:
        u = URL(url.strip())
    except (ValueError, TypeError):
        u = None
    if u is None or u.scheme not in ("http", "https") or not u.host:
        raise ValueError(f"worker URL must be http(s)://host[:port], got {url!r}")
    return str(u).rstrip("/")


class WorkerPool:
    def __init__(self, vnodes: int = 160, fail_threshold: int = 2, breaker: BreakerConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, engine_load: bool = True):
        self.clock = clock  # the breakers' clock
        self.ring = Ring(vnodes)
        self.fail_threshold = fail_threshold
        self.breaker_config = breaker  # None: workers get no circuit breaker
        self._breakers_due: float | None = None  # the earliest time an open breaker may turn half-open
        self.workers: dict[str, Worker] = {}
        self.active: list[str] = []
        self._models: list[str] | None = None
        self.total_inflight = 0  # every worker's requests, drained and failed ones included
        self.active_inflight = 0  # requests on the workers of `active` (the ring): what a load bound averages
        self.on_remove: list[Callable[[str], None]] = []
        self.on_cache_size: list[Callable[[str, int], None]] = []  # a worker told its cache's size in tokens
        self.max_inflight: int | None = None  # admission's per-worker bound (router.admission); policies honour it
        self.max_prefill: int | None = None  # admission's bound on a worker's queued prefill tokens
        self.engine_load = engine_load  # weigh the load workers report beyond this router's requests
        self.mean_prompt = 0.0  # prompt tokens per request, a moving mean: a reported waiting request's prefill

    # ---- PoolView -----------------------------------------------------------------------------------------

    def inflight(self, name: str) -> int:
        w = self.workers.get(name)
        return w.inflight if w else 0

    def worker(self, name: str) -> Worker | None:
        return self.workers.get(name)

    def admits(self, w: Worker, prefill: int) -> bool:
        """Admission's per-worker bounds (router.admission): another request that would prefill `prefill` tokens
        there keeps `w` within its requests in flight and its queued prefill tokens. An idle worker takes any
        request, even one longer than the token bound. A slot reserved for a woken admission waiter
        (router.admission) counts as in flight."""
        if self.max_inflight is not None and w.inflight + w.reserved >= self.max_inflight:
            return False
        return self.max_prefill is None or w.prefill == 0 or w.prefill + prefill <= self.max_prefill

    def on_ring(self, name: str) -> bool:
        w = self.workers.get(name)
        return w is not None and w.usable

    # ---- membership ---------------------------------------------------------------------------------------

    def add(self, url: str, weight: int = 1, engine: str | None = None) -> Worker:
        """`engine`: its kind (protocol.engines.KINDS); None or "auto": detected by its probes."""
        url = normalize_url(url)
        engine = None if engine == "auto" else engine
        w = self.workers.get(url)
        if w is None:
            w = self.workers[url] = Worker(url, weight, engine=engine)
            if self.breaker_config is not None:
                w.breaker = Breaker(self.breaker_config, self.clock)
        else:
            w.weight, w.draining = weight, False
            w.engine = engine or w.engine
        self._rebuild()
        return w

    def remove(self, url: str) -> bool:
        w = self.workers.pop(normalize_url(url), None)
        if w is None:
            return False
        self.total_inflight -= w.inflight
        self._rebuild()
        for listener in self.on_remove:
            listener(w.name)
        return True

    def drain(self, url: str) -> bool:
        w = self.workers.get(normalize_url(url))
        if w is None:
            return False
        w.draining = True
        self._rebuild()
        return True

    def _rebuild(self) -> None:
        self.active = [n for n, w in self.workers.items() if w.usable]
        self._models = None
        self.active_inflight = sum(self.workers[n].inflight for n in self.active)
        self.ring.set_members({n: self.workers[n].weight for n in self.active})

    # ---- in-flight ----------------------------------------------------------------------------------------

    def acquire(self, name: str, prefill: int = 0, context: int = 0) -> Worker | None:
        """A request goes to `name`: `prefill` tokens it is expected to compute there, `context` its prompt.
        Returns the worker charged: pass it to `prefilled` and `release`, so that a request that outlives its
        worker's removal (and the URL's return as a new worker) takes nothing back from the new one."""
        self.mean_prompt += 0.01 * (context - self.mean_prompt)
        self._add(name, 1, prefill, context)
        return self.workers.get(name)

    def prefilled(self, name: str, prefill: int, held: Worker | None = None) -> None:
        """The request's first token came back: its prefill is done (it still decodes, holding its context)."""
        self._add(name, 0, -prefill, 0, held)

    def release(self, name: str, prefill: int = 0, context: int = 0, held: Worker | None = None) -> None:
        """The request ended; `prefill` is what `prefilled` did not already take back."""
        w = self.workers.get(name)
        if w is not None and w.inflight > 0:
            self._add(name, -1, -prefill, -context, held)

    def _add(self, name: str, requests: int, prefill: int, context: int, held: Worker | None = None) -> None:
        w = self.workers.get(name)
        if w is None or (held is not None and w is not held):
            return
        w.inflight += requests
        # never below zero (a release after the worker's counts were reset)
        w.prefill = w.prefill + prefill if w.prefill + prefill > 0 else 0
        w.context = w.context + context if w.context + context > 0 else 0
        self.total_inflight += requests
        b = w.breaker
        if w.healthy and not w.draining and (b is None or b.on_ring):  # Worker.usable, inlined (every request)
            self.active_inflight += requests

    # ---- health -------------------------------------------------------------------------------------------

    def mark_failed(self, name: str, immediate: bool = False) -> None:
        """Passive detection: a refused connection takes the worker out at once; other errors count."""
        w = self.workers.get(name)
        if w is None:
            return
        w.fails = max(w.fails + 1, self.fail_threshold if immediate else 0)
        if w.healthy and w.fails >= self.fail_threshold:
            log.warning("worker %s leaves the ring (failures)", name)
            w.healthy = False
            self._rebuild()

    def mark_ok(self, name: str, models: list[str] | None = None) -> None:
        w = self.workers.get(name)
        if w is None:
            return
        w.fails = 0
        if models is not None and models != w.models:
            w.models = models
            self._models = None
        if not w.healthy:
            log.info("worker %s joins the ring", name)
            w.healthy = True
            self._rebuild()

    # ---- circuit breakers (router.breaker): outcomes of requests, never of probes ---------------------------

    def tick(self) -> None:
        """Open breakers whose time is over turn half-open (their worker rejoins the ring for one trial). O(1)
        until the earliest is due; called before each decision and on each health round."""
        due = self._breakers_due
        if due is None or self.clock() < due:
            return
        changed, self._breakers_due = False, None
        for w in self.workers.values():
            b = w.breaker
            if b is None:
                continue
            if b.poll():
                changed = True
                log.info("worker %s: circuit breaker half-open (one trial request)", w.name)
            elif b.state == "open":
                self._due(b.open_until)
        if changed:
            self._rebuild()

    def _due(self, t: float) -> None:
        if self._breakers_due is None or t < self._breakers_due:
            self._breakers_due = t

    def admit(self, name: str) -> str | None:
        """Before a request is sent to `name`: "normal", "trial" (its breaker is half-open and this request is
        the one trial; the worker leaves the ring until it ends) or None (its breaker refuses: try another)."""
        w = self.workers.get(name)
        if w is None:
            return None
        if w.breaker is None:
            return "normal"
        self.tick()
        verdict = w.breaker.admit()
        if verdict == "trial":
            self._rebuild()
        return verdict

    def request_ok(self, name: str, trial: bool = False) -> None:
        """The worker's answer began (first byte) in good time."""
        w = self.workers.get(name)
        if w is None:
            return
        w.fails = 0  # fail_threshold counts only consecutive failures
        b = w.breaker
        if b is not None:
            was = b.on_ring
            b.success(trial)
            if trial:
                log.info("worker %s: circuit breaker closed (trial succeeded)", name)
            if b.on_ring != was:
                self._rebuild()

    def request_failed(self, name: str, trial: bool = False, immediate: bool = False) -> None:
        """A request to the worker failed before its first byte (`immediate`: a refused connection)."""
        self.mark_failed(name, immediate)
        self._breaker_failure(name, trial, "failures")

    def request_slow(self, name: str, trial: bool = False) -> None:
        """The worker's first byte came, slower than breaker_slow_s: a failure for its breaker only."""
        w = self.workers.get(name)
        if w is not None:
            w.fails = 0
            self._breaker_failure(name, trial, "slow first bytes")

    def _breaker_failure(self, name: str, trial: bool, why: str) -> None:
        w = self.workers.get(name)
        b = w.breaker if w is not None else None
        if b is None:
            return
        opens, was = b.opens, b.on_ring
        b.failure(trial)
        if b.opens != opens:
            log.warning("worker %s: circuit breaker open for %.1f s (%s)", name, b.open_for,
                        "its trial failed" if trial else why)
            self._due(b.open_until)
        if b.on_ring != was:
            self._rebuild()

    def request_abandoned(self, name: str, trial: bool) -> None:
        """A request ended with no outcome (its client left, shutdown): a trial's slot opens again."""
        w = self.workers.get(name)
        if w is not None and w.breaker is not None and trial:
            was = w.breaker.on_ring
            w.breaker.abandon(trial)
            if w.breaker.on_ring != was:
                self._rebuild()

    async def probe(self, client: aiohttp.ClientSession, w: Worker, timeout: float) -> None:
        t = aiohttp.ClientTimeout(total=timeout)
        models = None
        try:
            async with client.get(w.url + "/health", timeout=t) as r:
                ok = r.status == 200
                try:  # other engines answer /health with no body or plain text
                    health = await r.json(content_type=None) if ok else None
                except ValueError:
                    health = None
            tokens = health.get("cache_capacity_tokens") if isinstance(health, dict) else None
            kv_tokens = None
            if isinstance(tokens, int):  # a prefixroute worker
                w.engine = PREFIXROUTE
                self._reported(w, health.get("running"), health.get("waiting"), None)
            elif ok and w.engine not in (PREFIXROUTE, OPENAI):  # another engine, or not known yet: its metrics
                async with client.get(w.url + "/metrics", timeout=t) as r:
                    reading = parse(await r.text(), w.engine if w.engine in ENGINES else None) \
                        if r.status == 200 else None
                if reading is None:
                    w.engine = w.engine or OPENAI  # no metrics known here: not asked again
                    log.warning("worker %s: no engine metrics known here (load not read) and no cache_salt known: "
                                "tenants' identical prefixes may share its cache", w.name)
                else:
                    if w.engine is None and reading.kind not in SALTED:
                        log.warning("worker %s is a %s server: it ignores cache_salt, so tenants' identical "
                                    "prefixes share its cache", w.name, reading.kind)
                    w.engine, tokens = reading.kind, reading.capacity_tokens
                    if reading.kv_usage is not None and tokens:
                        # less a block per running request: KV is held in whole blocks, prompts are not
                        kv_tokens = reading.kv_usage * tokens - (reading.running or 0) * (reading.block_size or 0)
                    self._reported(w, reading.running, reading.waiting, kv_tokens)
            if isinstance(tokens, int) and tokens > 0 and tokens != w.cache_tokens:
                w.cache_tokens = tokens
                for listener in self.on_cache_size:
                    listener(w.name, tokens)
            if ok and (not w.healthy or not w.models):
                async with client.get(w.url + "/v1/models", timeout=t) as m:
                    if m.status == 200:
                        models = [d["id"] for d in (await m.json()).get("data", [])]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError):
            ok = False
        if ok:
            self.mark_ok(w.name, models)
        else:
            self.mark_failed(w.name)

    def _reported(self, w: Worker, running: object, waiting: object, kv_tokens: float | None) -> None:
        """What the worker reports running and waiting (and, from an engine, the KV tokens its running requests
        hold) beyond this router's own requests there becomes its external work."""
        if not isinstance(running, int) or not isinstance(waiting, int):
            w.reported, w.external_prefill, w.external_context = None, 0.0, 0.0
            return
        w.reported = (running, waiting)
        if not self.engine_load:
            return
        others = max(0, running + waiting - w.inflight)
        queued = min(waiting, others)  # the others' requests still waiting for their prefill
        mean = self.mean_prompt
        w.external_prefill = queued * mean
        w.external_context = max(0.0, kv_tokens - w.context) if kv_tokens is not None else (others - queued) * mean

    async def probe_all(self, client: aiohttp.ClientSession, timeout: float) -> None:
        await asyncio.gather(*(self.probe(client, w, timeout) for w in list(self.workers.values())))

    async def health_loop(self, client: aiohttp.ClientSession, interval: float, timeout: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.tick()
                await self.probe_all(client, timeout)
            except Exception:  # the loop must survive anything a probe does
                log.exception("health round failed")

    def models(self) -> list[str]:
        """The models the ring's workers serve (recomputed only when membership or a worker's models change)."""
        if self._models is None:
            seen: dict[str, None] = {}
            for n in self.active:
                for m in self.workers[n].models:
                    seen.setdefault(m)
            self._models = list(seen)
        return self._models
