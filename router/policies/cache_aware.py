"""cache_aware: place each request where its first token comes soonest for the fleet, counting what each
worker is expected to hold of its prompt and the work already queued there.

- Expected hit: the prefix index (router.index) gives, per worker, the leading blocks of the prompt it is
  expected to hold; hit_w is the tokens of those blocks.
- Load: load_w = prompt tokens its in-flight requests still have to prefill (until their first streamed byte)
  + decode_weight x the context they hold while decoding (their KV, which slows each decode step), each plus
  the worker's external work: what it reports queued and held beyond this router's requests (router.workers).
- Cost: cost_w = load_w + prefill_weight x (prompt tokens - hit_w). prefill_weight (32) > 1 because a miss
  costs more than this request's wait: the GPU time it takes delays whatever queues behind it, and a prefix
  recomputed on a second worker evicts something there. Ties: fewest in flight, then fewest sent lately
  (except for a prompt seen nowhere), then ring order.
- Group: the prompt's longest prefix seen before (a shared system prompt or document, or a conversation's
  previous turn); a prompt seen nowhere is its own group, named by its routing key. The group's rate over 60 s
  decides whether it spills: k = 1 at or below R requests/minute, else its fair share of the fleet, k =
  max(2, ceil(N x share)) workers in ring order from the group's home; those k count as holding what the group
  shares, so a hot group's new requests spread over them by load, while a quiet one stays where it is cached.
  The width is the group's share, not its rate over R: each worker it spreads to computes its prefix once,
  and a group with half the traffic needs half the fleet, not all of it (a document carrying half the requests
  at 32 workers 1x: 95.5% of pooled against 93.7% when it spread over the whole fleet, offline;
  docs/benchmarks/fanout/).
- Candidates: the group's k ring workers, the workers holding a prefix of the prompt, the worker of the client's
  explicit session (prompt_cache_key, user, x-session-id), and the least-loaded worker of the fleet. A prompt
  cached nowhere costs the same prefill everywhere: it goes to the least-loaded worker (its ring home when loads
  tie), and the index makes that worker its home. A conversation's next turn finds its last turn's worker as the
  deepest match; conversations sharing a hot document part where their own turns begin.
- Bound: a worker whose in-flight count would exceed ceil(c x mean) + s, the mean over the ring's workers, is no
  candidate while its load is at or above the ring's mean and some ring worker has no prefill queued; if none is
  left, the next ring worker under the count bound takes the request. Past the count but below the mean load, a
  worker holds many cheap requests (cache hits, decodes); with every worker's prefill queued (overload), a
  worker given the request in its place would recompute the prefix on a fleet with no room for it. Both moves
  cost hits and TTFT under 2x overload (docs/benchmarks, "The count bound").
- State: the index (an LRU of blocks per worker, sized by the worker's reported cache), the rate table and the
  session table are bounded and may start empty: requests then go by ring order and load, and the index refills
  from the decisions.

Cost per decision: one bisect on the ring, O(k) for the fan-out, O(matched blocks x holders) for the index,
O(workers) for the least-loaded scan.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from router.index import PrefixIndex
from router.policies.base import Decision, DecisionRecord, PoolView
from router.prefix import RouteKeys
from router.rate import DecayedCounts, RateTable
from router.workers import Worker


class CacheAware:
    name = "cache_aware"

    def __init__(self, spill_rpm: float = 15.0, window_s: float = 60.0, max_keys: int = 100_000,
                 rates: RateTable | None = None, max_sessions: int = 100_000, index: PrefixIndex | None = None,
                 prefill_weight: float = 32.0, decode_weight: float = 0.01, load_factor: float = 1.25,
                 load_slack: float = 4.0, session_ttl_s: float = 3600.0):
        self.R = spill_rpm
        self.rates = rates if rates is not None else RateTable(window_s=window_s, max_keys=max_keys)
        self.index = index if index is not None else PrefixIndex()
        self.max_sessions = max_sessions
        # explicit session -> (worker of its last turn, when); a session idle for session_ttl_s is forgotten
        self.sessions: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self.session_ttl_s = session_ttl_s
        self.recent = DecayedCounts(window_s)  # requests sent to each worker lately
        self.prefill_weight = prefill_weight
        self.decode_weight = decode_weight
        self.c = load_factor
        self.s = load_slack
        # Called with every decision's record (router.shared sends them to the other router replicas).
        self.on_decision: Callable[[DecisionRecord], None] | None = None

    def fanout(self, rate: float, share: float, n: int) -> int:
        if rate <= self.R or n <= 1:
            return 1
        return min(n, max(2, math.ceil(n * share)))

    def load(self, pool: PoolView, name: str) -> float:
        w = pool.worker(name)
        return w.work(self.decode_weight) if w is not None else math.inf

    def choose(self, keys: RouteKeys, pool: PoolView, dry_run: bool = False, hold: bool = False) -> Decision:
        """The decision; with `hold`, when the best worker is full (admission's per-worker bound) and beats every
        worker with room, a held decision naming it, which changes no state: the caller waits for room there
        and asks again (`hold=False` once it may wait no longer)."""
        depth = self.index.match(keys.blocks)
        seen = max(depth.values(), default=0)
        # The request's group: its longest prefix seen before (a shared system prompt or document, or the
        # conversation's previous turn); a prompt seen nowhere is its own group, named by its routing key.
        group = keys.blocks[seen - 1].to_bytes(8, "little") if seen else keys.key
        order = pool.ring.order(group)
        n = len(order)
        # A held decision changes no state: its request is counted once, when it is placed.
        rate, share = self.rates.peek(group) if dry_run or hold else self.rates.hit(group)
        k = self.fanout(rate, share, n)
        last = self._session(keys.session) if keys.session is not None else None
        least, least_load = "", math.inf
        dw = self.decode_weight
        total_load, room = 0.0, False  # room: some worker has no prefill queued
        works: dict[str, tuple[Worker, float]] = {}  # the ring's workers: exactly the usable ones (router.workers)
        workers = pool.workers
        for name in pool.active:
            w = workers[name]
            queued = w.prefill + w.external_prefill
            work = queued + dw * (w.context + w.external_context)  # Worker.work, inlined: once per worker
            works[name] = (w, work)
            total_load += work
            if not queued:
                room = True
            if work < least_load:
                least, least_load = name, work
        head = [order[i] for i in range(k)]  # the first k only: O(k), not a copy of the whole order
        candidates = dict.fromkeys(head)
        if depth:
            candidates.update(dict.fromkeys(depth))
        if last is not None:
            candidates[last] = None
        candidates[least] = None
        # A spilled group's fan-out workers all come to hold what its requests share: count it as held there,
        # so its new requests spread over them by load.
        fan = set(head) if k > 1 else ()
        total = keys.prompt_tokens
        most = max(0, total - 1)  # an expected hit never covers the prompt's last token, as engines count
        block_tokens = keys.block_tokens

        balance = math.ceil(self.c * (pool.active_inflight + 1) / n) + self.s
        mean_load = total_load / n if n else 0.0
        now = self.rates.clock()
        pw = self.prefill_weight
        recent = self.recent.get
        # Ties: fewest in flight; then fewest requests sent lately (`recent`, looked up only on a tie), but for a
        # prompt seen nowhere, which an idle fleet places at its ring home in every router process.
        pick, best_cost, best_inflight, pick_hit = "", math.inf, 0, 0
        full, full_cost, full_inflight, full_hit = "", math.inf, 0, 0  # the best worker only admission rules out
        for name in candidates:
            entry = works.get(name)
            if entry is None:  # off the ring: unhealthy, draining or its breaker open
                continue
            w, load = entry
            inflight = w.inflight
            if inflight + 1 > balance and room and load >= mean_load:
                continue
            blocks = seen if name in fan else depth.get(name, 0)
            hit = min(block_tokens[blocks - 1], most) if blocks else 0
            cost = load + pw * (total - hit)
            if cost > best_cost or (cost == best_cost and inflight > best_inflight):
                continue
            if not pool.admits(w, total - hit):
                if cost < full_cost or (cost == full_cost and (
                        inflight < full_inflight or (inflight == full_inflight and seen
                                                     and recent(name, now) < recent(full, now)))):
                    full, full_cost, full_inflight, full_hit = name, cost, inflight, hit
            elif cost < best_cost or inflight < best_inflight or (
                    seen and pick and recent(name, now) < recent(pick, now)):
                pick, best_cost, best_inflight, pick_hit = name, cost, inflight, hit
        if hold and full and (full_cost, full_inflight) < (best_cost, best_inflight) or (
                hold and full and (full_cost, full_inflight) == (best_cost, best_inflight) and seen
                and recent(full, now) < recent(pick, now)):
            # Placing it elsewhere would recompute what the full worker holds, on a fleet that is out of room:
            # waiting for that worker's next free slot costs less.
            return Decision(full, "hold", order, 0, k, prefill=total - full_hit, context=total,
                            candidates=list(candidates), hold=True)
        if hold and not dry_run:
            self.rates.hit(group)
        if not pick:  # every candidate is over the bound: the next ring worker under it
            pick = next((name for name in order if pool.inflight(name) + 1 <= balance
                         and pool.admits(pool.worker(name), total)), least)
            pick_hit = min(keys.tokens_through(depth.get(pick, 0)), most)
        if pick == last:
            reason = "session"
        elif pick == order[0]:
            reason = "affinity"
        elif pick in fan:
            reason = "spill"
        else:
            reason = "cache" if pick_hit else "load"
        if not dry_run:
            self.index.insert(pick, keys.blocks, keys.block_tokens)
            self.recent.add(pick, now)
            if keys.session is not None:
                self._remember(keys.session, pick, now)
            if self.on_decision is not None:
                self.on_decision(DecisionRecord(now, pick, group, keys.blocks, keys.block_tokens, keys.session))
        return Decision(pick, reason, order, 0, k, prefill=total - pick_hit, context=total,
                        candidates=list(candidates))

    def apply(self, rec: DecisionRecord) -> None:
        """Another router replica's decision: the state it changed there changes here the same way (the group's
        rate at its time, the prefix index, the session table)."""
        # A replica whose clock runs ahead must not date state in this one's future (its counts would not decay,
        # its sessions would outrank this router's newer turns for as long as the skew).
        t = min(rec.t, self.rates.clock())
        self.rates.hit_at(rec.group, t)
        self.index.insert(rec.worker, rec.blocks, rec.block_tokens)
        self.recent.add(rec.worker, t)
        if rec.session is not None:
            self._remember(rec.session, rec.worker, t)

    def forget_worker(self, worker: str) -> None:
        """The worker left the pool: what it held and its recent count go (a worker that returns starts afresh)."""
        self.index.forget_worker(worker)
        self.recent.forget(worker)

    def _session(self, session: bytes) -> str | None:
        entry = self.sessions.get(session)
        if entry is None or entry[1] < self.rates.clock() - self.session_ttl_s:
            return None
        return entry[0]

    def _remember(self, session: bytes, worker: str, at: float) -> None:
        old = self.sessions.get(session)
        if old is not None and old[1] > at:  # a late record from another replica: the newer turn stays
            return
        self.sessions[session] = (worker, at)
        self.sessions.move_to_end(session)
        if len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
