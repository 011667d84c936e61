"""Checks a running cluster from outside, as its users meet it: `python -m deploy.smoke --router URL --workers N
[--admin-key K] [--prometheus URL] [--out DIR]`. It waits for the router's /health, sends OpenAI SDK chat requests
(plain and streamed; the second on a shared system prompt must report cached tokens), reads the hit stats from
Redis through /admin/stats, waits for Prometheus to have every target up, and replays a short loadgen workload.
Exits non-zero at the first failed check. deploy/compose-test.sh and the local-cluster test use it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from openai import OpenAI

MODEL = "SmolLM2-135M-Instruct"
SYSTEM = {"role": "system", "content": "You answer questions about a small bakery. " * 20}


class SmokeError(AssertionError):
    """A check failed; the message says which and what was seen."""


def _until(what: str, check: Callable[[], str | None], timeout_s: float, every_s: float = 1.0) -> None:
    """Polls `check` (None when satisfied, else why not) until it passes or `timeout_s` runs out."""
    deadline = time.monotonic() + timeout_s
    why = "never checked"
    while time.monotonic() < deadline:
        try:
            why = check()
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        if why is None:
            return
        time.sleep(every_s)
    raise SmokeError(f"{what}: not within {timeout_s:.0f} s ({why})")


def wait_healthy(router: str, workers: int, timeout_s: float = 600,
                 gone: Callable[[], str | None] = lambda: None) -> dict:
    """Waits for /health 200 with `workers` workers; `gone` says why waiting is pointless (a process exited)."""
    def check() -> str | None:
        if (why := gone()) is not None:
            raise SmokeError(why)
        r = httpx.get(router + "/health", timeout=3)
        if r.status_code != 200:
            return f"/health {r.status_code}"
        body = r.json()
        return None if body.get("workers") == workers else f"/health says {body}"

    _until(f"router healthy with {workers} workers", check, timeout_s)
    return httpx.get(router + "/health", timeout=3).json()


def check_chat(router: str, api_key: str = "unused") -> dict:
    """Two requests on one system prompt (the second must hit the cache) and one streamed request."""
    client = OpenAI(base_url=router + "/v1", api_key=api_key, max_retries=0, timeout=120)
    cached = []
    for q in ("What does bread cost?", "When do you open?"):
        r = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                           messages=[SYSTEM, {"role": "user", "content": q}])
        if not r.choices or r.usage is None:
            raise SmokeError(f"chat completion without choices or usage: {r}")
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    if not (cached[0] == 0 and cached[1] > 0):
        raise SmokeError(f"cached_tokens {cached}: want 0 then > 0 on the shared system prompt")
    stream = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[SYSTEM, {"role": "user", "content": "Do you bake cakes?"}])
    text, usage = [], None
    for chunk in stream:
        text.extend(c.delta.content or "" for c in chunk.choices)
        usage = chunk.usage or usage
    if usage is None or usage.completion_tokens < 1 or not "".join(text):
        raise SmokeError(f"streamed chat: text {''.join(text)!r}, usage {usage}")
    return {"cached_tokens": cached, "streamed_tokens": usage.completion_tokens,
            "streamed_cached_tokens": usage.prompt_tokens_details.cached_tokens}


def check_admin_stats(router: str, admin_key: str, min_requests: int, timeout_s: float = 30) -> dict:
    """The workers' hit stats as Redis has them (they are written about once a second)."""
    seen: dict = {}

    def check() -> str | None:
        r = httpx.get(router + "/admin/stats", headers={"Authorization": f"Bearer {admin_key}"}, timeout=5)
        if r.status_code != 200:
            return f"/admin/stats {r.status_code} {r.text[:200]}"
        seen.update(r.json())
        c = seen.get("cluster", {})
        if seen.get("redis") != "ok":
            return f"redis {seen.get('redis')}"
        if c.get("requests", 0) < min_requests or c.get("cached_tokens", 0) < 1:
            return f"cluster {c}"
        return None

    _until("/admin/stats from Redis", check, timeout_s)
    return {"cluster": seen["cluster"], "workers": len(seen["workers"])}


def check_prometheus(prometheus: str, targets: int, timeout_s: float = 90) -> dict:
    """Every scrape target up: the router and each worker."""
    seen: list = []

    def check() -> str | None:
        active = httpx.get(prometheus + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        seen[:] = [(t["labels"]["job"], t["labels"]["instance"], t["health"]) for t in active]
        if len(active) != targets or any(h != "up" for *_, h in seen):
            return f"targets {seen}"
        return None

    _until(f"Prometheus with {targets} targets up", check, timeout_s, every_s=2)
    return {"targets": [f"{job} {inst}" for job, inst, _ in seen]}


def run_loadgen(router: str, out: Path, requests: int = 12, api_key: str = "unused") -> dict:
    """A short open-loop synthetic replay through the router: no request may fail."""
    cmd = [sys.executable, "-m", "loadgen", "synth", "zipf", "--url", router, "--requests", str(requests),
           "--rate", "4", "--max-tokens", "4", "--api-key", api_key, "--out", str(out), "--quiet"]
    subprocess.run(cmd, check=True, timeout=300, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    if summary.get("errors") != 0 or summary.get("requests") != requests:
        raise SmokeError(f"loadgen: {summary.get('requests')} requests, {summary.get('errors')} errors")
    return {k: summary[k] for k in ("requests", "errors", "cached_token_ratio") if k in summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--router", required=True, help="the router's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--workers", type=int, required=True, help="how many workers the router must see")
    p.add_argument("--admin-key", help="check /admin/stats (hit stats from Redis) with this key")
    p.add_argument("--prometheus", help="check that this Prometheus has the router and every worker up")
    p.add_argument("--out", type=Path, help="where loadgen writes its results (a temporary folder otherwise)")
    p.add_argument("--health-timeout", type=float, default=600)
    args = p.parse_args(argv)
    router = args.router.rstrip("/")
    report: dict = {}
    try:
        report["health"] = wait_healthy(router, args.workers, args.health_timeout)
        report["chat"] = check_chat(router)
        with tempfile.TemporaryDirectory() as tmp:
            report["loadgen"] = run_loadgen(router, args.out or Path(tmp) / "loadgen")
        if args.admin_key:
            report["admin_stats"] = check_admin_stats(router, args.admin_key, min_requests=3)
        if args.prometheus:
            report["prometheus"] = check_prometheus(args.prometheus.rstrip("/"), args.workers + 1)
    except (SmokeError, subprocess.SubprocessError, httpx.HTTPError, OSError) as exc:
        print(json.dumps(report, indent=1), file=sys.stderr)
        print(f"smoke: FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1))
    print("smoke: all checks passed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
