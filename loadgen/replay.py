"""Sends timed requests to an OpenAI URL, open-loop at their recorded times (with a speed-up) or closed-loop
with a concurrency cap, and records per request TTFT, inter-token gaps, latency, usage and serving worker."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Job:
    at_s: float  # when to send, seconds from the start of the workload (before speed-up)
    endpoint: str
    body: dict[str, Any]
    api_key: str | None = None


@dataclass
class Result:
    index: int
    sent_s: float  # seconds since the run started
    status: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    worker: str = ""
    route: str = ""
    error: str | None = None
    retry_after: str | None = None  # a refusal's Retry-After header
    # Open loop: how long after its scheduled time the request went out. TTFT and e2e count from the send, so a
    # client that falls behind (its loop or CPU busy) shows here, not there.
    late_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200

    @property
    def refused(self) -> bool:
        """Turned away by admission control (429): said plainly to the client, not lost."""
        return self.status == 429


async def _one(session: aiohttp.ClientSession, url: str, job: Job, index: int, t0: float,
               default_key: str | None, due: float | None = None) -> Result:
    r = Result(index, time.perf_counter() - t0)
    body = {**job.body, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Content-Type": "application/json"}
    key = job.api_key or default_key
    if key:
        headers["Authorization"] = f"Bearer {key}"
    start = time.perf_counter()
    if due is not None:
        r.late_s = max(0.0, start - due)
    last = None
    try:
        async with session.post(url + job.endpoint, data=json.dumps(body), headers=headers) as resp:
            r.status = resp.status
            r.worker = resp.headers.get("x-prefixroute-worker", "")  # "": not known
            r.route = resp.headers.get("x-prefixroute-route", "")
            if resp.status != 200:
                r.error = (await resp.text())[:300]
                r.retry_after = resp.headers.get("Retry-After")
                return r
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    r.error = str(obj["error"].get("message", obj["error"]))[:300]
                    break
                now = time.perf_counter()
                choices = obj.get("choices") or []
                if choices:
                    c = choices[0]
                    text = c.get("text") or (c.get("delta") or {}).get("content")
                    if text:
                        if r.ttft_s is None:
                            r.ttft_s = now - start
                        elif last is not None:
                            r.itls.append(now - last)
                        last = now
                if obj.get("usage"):
                    u = obj["usage"]
                    r.prompt_tokens = int(u.get("prompt_tokens") or 0)
                    r.completion_tokens = int(u.get("completion_tokens") or 0)
                    r.cached_tokens = int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        r.e2e_s = time.perf_counter() - start
        if r.ttft_s is None and r.error is None:
            r.ttft_s = r.e2e_s  # no text came back (e.g. max_tokens hit at once): the whole answer is the first
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        r.error = f"{type(exc).__name__}: {exc}"[:300]
    return r


async def replay(url: str, jobs: list[Job], *, speedup: float = 1.0, concurrency: int | None = None,
                 duration_s: float | None = None, api_key: str | None = None, timeout_s: float = 600.0,
                 on_done: Callable[[Result], None] | None = None) -> list[Result]:
    """Run `jobs` against `url`; open-loop at `at_s / speedup` unless `concurrency` is given (closed loop)."""
    url = url.rstrip("/")
    results: list[Result] = []
    t0 = time.perf_counter()
    deadline = t0 + duration_s if duration_s else None
    conn = aiohttp.TCPConnector(limit=0 if concurrency is None else concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def run(session: aiohttp.ClientSession, i: int, job: Job, due: float | None = None) -> None:
        res = await _one(session, url, job, i, t0, api_key, due)
        results.append(res)
        if on_done:
            on_done(res)

    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        if concurrency is None:
            tasks = []
            base = jobs[0].at_s if jobs else 0.0
            for i, job in enumerate(jobs):
                due = t0 + (job.at_s - base) / speedup
                delay = due - time.perf_counter()
                if deadline and due > deadline:
                    break
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(run(session, i, job, due)))
            await asyncio.gather(*tasks)
        else:
            queue: asyncio.Queue[tuple[int, Job]] = asyncio.Queue()
            for item in enumerate(jobs):
                queue.put_nowait(item)

            async def worker() -> None:
                while not queue.empty() and not (deadline and time.perf_counter() > deadline):
                    i, job = queue.get_nowait()
                    await run(session, i, job)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
    results.sort(key=lambda r: r.index)
    return results
